"""The CPU kernels index tensors of more than 2**31 elements correctly.

One bfloat16 image ``x [1, 2100, 1024, 1024]`` (2.2e9 elements, 4.4 GB; with the upsampling's output
and the aggregation's workspace about 10.5 GB at the peak) through the three public ops on the
``cpu`` backend, checked cheaply against the reference on small pieces:

* the affinity (a sum over all channels) in the corner cells of the grid and in a band across the
  middle, against the reference on those cells' 3 x 3-cell neighbourhoods only;
* the outputs that are local in the channels (the aggregation's ``num``, the upsampling's ``y``) on
  their last channels, whose elements lie past 2**31, against the reference on those channels only,
  and ``den`` (which depends on the affinity alone) everywhere.

(tests/test_triton.py::test_gpu_64bit_offsets does the same for the Triton kernels on a GPU.)
"""
import pytest
import torch

import stvit_kernels as sk
from stvit_kernels import reference as ref

from .utils import TOL, seed_for

C, H, W, SIZE = 2100, 1024, 1024, 8
NEEDED_GIB = 12


def _available_gib():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return float("inf")  # not Linux: let it try


pytestmark = [
    pytest.mark.skipif("cpu" not in sk.available_backends(), reason="the cpu backend is not built"),
    pytest.mark.skipif(_available_gib() < NEEDED_GIB,
                       reason=f"needs about {NEEDED_GIB} GiB of free memory"),
]


def _big_input(g):
    """x: 64 random channels, repeated with a different random shift along W (cyclic) for every
    block of 64 channels: generating 2.2e9 random numbers would take longer than the whole test."""
    x = torch.empty(1, C, H, W, dtype=torch.bfloat16)
    base = torch.randn(1, 64, H, W, generator=g).to(torch.bfloat16)
    for c0 in range(0, C, 64):
        n = min(64, C - c0)
        k = int(torch.randint(W, (1,), generator=g))
        x[:, c0:c0 + n, :, k:] = base[:, :n, :, :W - k]
        x[:, c0:c0 + n, :, :k] = base[:, :n, :, W - k:]
    return x


def _close(got, want, what):
    torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16],
                               msg=lambda m: f"{what}: {m}")


def test_cpu_indexing_past_2_31_elements():
    assert C * H * W > 2**31
    g = torch.Generator().manual_seed(seed_for("scale"))
    x = _big_input(g)
    hh, ww = H // SIZE, W // SIZE
    s = torch.randn(1, C, hh, ww, generator=g).to(torch.bfloat16)
    scale = C ** -0.5
    with torch.no_grad():
        A = sk.stoken_affinity(x, s, SIZE, backend="cpu")
        assert A.shape == (1, 9, H, W) and A.dtype == torch.bfloat16
        assert torch.isfinite(A).all()
        _close(A.float().sum(1), torch.ones(1, H, W), "sum of A")
        # rows u0 .. u0+3 and columns v0 .. v0+3 of cells: the reference on that window is exact
        # for the cells whose 3 x 3 neighbourhood it holds (all of its cells on the grid's edges)
        for u0, v0 in [(0, 0), (hh - 3, ww - 3), (0, ww - 3), (hh - 3, 0), (hh // 2, 0),
                       (hh // 2, ww - 3)]:
            rows, cols = slice(u0 * SIZE, (u0 + 3) * SIZE), slice(v0 * SIZE, (v0 + 3) * SIZE)
            want = ref.affinity(x[:, :, rows, cols].float(), s[:, :, u0:u0 + 3, v0:v0 + 3].float(),
                                SIZE, SIZE, scale)
            inner_r = slice(0 if u0 == 0 else SIZE, 2 * SIZE if u0 + 3 < hh else 3 * SIZE)
            inner_c = slice(0 if v0 == 0 else SIZE, 2 * SIZE if v0 + 3 < ww else 3 * SIZE)
            _close(A[:, :, rows, cols][:, :, inner_r, inner_c], want[:, :, inner_r, inner_c],
                   f"A in the cells ({u0}.., {v0}..)")

        last = slice(C - 24, C)  # elements from 2076 * 2**20 > 2**31 on
        y = sk.stoken_upsample(s, A, SIZE, backend="cpu")
        assert y.shape == x.shape
        for chans, what in ((last, "y, last channels"), (slice(0, 8), "y, first channels")):
            _close(y[:, chans], ref.upsample(s[:, chans].float(), A.float(), SIZE, SIZE), what)
        del y

        num, den = sk.stoken_aggregate(x, A, SIZE, backend="cpu")
        assert num.shape == s.shape and den.shape == (1, 1, hh, ww)
        want_num, want_den = ref.aggregate(x[:, last].float(), A.float(), SIZE, SIZE)
        _close(num[:, last], want_num, "num, last channels")
        _close(den, want_den, "den")
