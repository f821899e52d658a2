"""Awkward but valid inputs give the right answer, on every available backend.

Non-contiguous views (strided slices, transposed-back and expanded tensors), channels_last tensors,
an empty batch, an image smaller than one super token (the module), ``stoken_size`` as an int or a
pair, and huge logits. Fresh kernel outputs are NaN-poisoned (tests/conftest.py).
"""
import copy

import pytest
import torch

import stvit_kernels as sk

from stvit_kernels._utils import pair

from .utils import TOL, device_for, make_inputs, op_results, seed_for

BACKENDS = sk.available_backends()
FUSED = [b for b in BACKENDS if b != "reference"]
OPS = ["affinity", "aggregate", "upsample", "associate"]
F32 = TOL[torch.float32]

pytestmark = pytest.mark.usefixtures("poison_outputs")



def _inputs(key, B, C, H, W, h, w, backend, dtype=torch.float32):
    return make_inputs(B, C, H, W, h, w, dtype=dtype, device=device_for(backend),
                       seed=seed_for(key, B, C, H, W, h, w))


def _same(got, want, exact, where):
    """Every result of ``got`` equals (``exact``: bitwise) or is close to the one of ``want``."""
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name].cpu(), want[name].cpu()
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {name}"
        if exact:
            assert torch.equal(a, b), f"{where}: {name} differs (max {(a - b).abs().max()})"
        else:
            torch.testing.assert_close(a, b, **F32, msg=lambda m: f"{where}: {name}: {m}")


# ------------------------------------------------------------------------------------------------
# Layouts: every tensor of a call (inputs and incoming gradients) as a non-contiguous view with the
# same values, or channels_last. `cpu` and `cuda` must give bitwise the result they give on the
# contiguous tensors (they copy the same numbers to contiguous NCHW); `triton` reads through the
# strides and is bounded across layouts (see test_layouts_match_contiguous); the reference (plain
# PyTorch) may sum in another order.
# ------------------------------------------------------------------------------------------------

def strided(t):
    """Every other element of a twice-as-wide buffer: stride 2 along W."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def transposed_back(t):
    """H and W swapped in memory: strides (.., 1, H)."""
    return t.transpose(2, 3).contiguous().transpose(2, 3)


def expanded(t):
    """The first batch entry and the first row of every plane broadcast (stride 0): other values
    than ``t``, so the comparison runs on ``.contiguous()`` copies of the views."""
    return t[:1, :, :1].expand(t.shape)


def channels_last(t):
    return t.to(memory_format=torch.channels_last)


LAYOUTS = [strided, transposed_back, expanded, channels_last]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_match_contiguous(backend, op):
    """The contract of README "Determinism": ``cpu`` and ``cuda`` give bitwise the result they
    give on the contiguous tensors (they read the same numbers in the same order). ``triton`` is
    bitwise run to run for one layout, and across layouts within float32 rounding (16 ulp of the
    output's largest element): Triton compiles a kernel per stride specialisation (a stride equal
    to 1, multiples of 16), and the register layout the compiler picks for each, which orders the
    in-register sums, may differ (on an H200 channels_last moved ``den`` by 1 ulp). The
    reference (plain PyTorch) is close."""
    B, C, H, W, h, w = 2, 5, 4, 6, 2, 3  # a 2 x 2 grid: few programs for the Triton interpreter
    base = _inputs("layout", B, C, H, W, h, w, backend)
    size = (h, w)
    on_base = op_results(op, backend, base, size)
    for layout in LAYOUTS:
        t = {k: layout(v) for k, v in base.items()}
        assert not any(t[k].is_contiguous() for k in ("x", "s", "A", "gA", "gy", "gnum"))
        contiguous = {k: v.contiguous() for k, v in t.items()}
        got = op_results(op, backend, t, size)
        want = on_base if layout is not expanded else op_results(op, backend, contiguous, size)
        where = f"{layout.__name__} vs contiguous"
        if backend == "triton":
            _same(op_results(op, backend, t, size), got, True, f"{layout.__name__} run to run")
            for name in want:
                a, b = got[name].cpu(), want[name].cpu()
                assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {name}"
                err = (a - b).abs().max().item()
                bound = 16 * torch.finfo(b.dtype).eps * b.abs().max().item()
                assert err <= bound, f"{where}: {name} differs by {err:.3g} (bound {bound:.3g})"
        else:
            _same(got, want, backend != "reference", where)
        if backend != "reference":
            _same(got, op_results(op, "reference", contiguous, size), False,
                  f"{layout.__name__} vs reference")


def _module_results(m, backend, x, g):
    """Output, input gradient and parameter gradients of the module for the incoming gradient g."""
    x = x.detach().requires_grad_()
    with sk.use_backend(backend):
        y = m(x)
    dx, *dparams = torch.autograd.grad(y, [x, *m.parameters()], g)
    return {"y": y.detach(), "dx": dx,
            **{f"d{n}": d for (n, _), d in zip(m.named_parameters(), dparams)}}


@pytest.mark.parametrize("layout", [channels_last, strided], ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_layouts_match_contiguous(backend, layout):
    """The module on a channels_last / strided input (padded: 7 x 5 with 4 x 4 super tokens)."""
    torch.manual_seed(seed_for("module-layout", backend))
    C = 8
    dev = device_for(backend)
    m = sk.SuperTokenAttention(C, 4, n_iter=2, num_heads=2, qkv_bias=True).to(dev)
    x = torch.randn(1, C, 7, 5, device=dev)
    g = torch.randn(1, C, 7, 5, device=dev)
    got = _module_results(m, backend, layout(x), layout(g))
    # the refine convolutions may pick another algorithm for channels_last: close, not bitwise
    _same(got, _module_results(m, backend, x, g), exact=False, where=layout.__name__)


# ------------------------------------------------------------------------------------------------
# Sizes: empty batch, an image smaller than one super token, stoken_size as int or pair
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, op):
    t = _inputs("empty", 0, 6, 8, 12, 4, 3, backend)
    got = op_results(op, backend, t, (4, 3), n_iter=2)
    want = {"affinity": (0, 9, 8, 12), "affinity.dx": (0, 6, 8, 12), "affinity.ds": (0, 6, 2, 4),
            "aggregate.num": (0, 6, 2, 4), "aggregate.den": (0, 1, 2, 4),
            "aggregate.dx": (0, 6, 8, 12), "aggregate.dA": (0, 9, 8, 12),
            "upsample": (0, 6, 8, 12), "upsample.ds": (0, 6, 2, 4), "upsample.dA": (0, 9, 8, 12),
            "associate.stokens": (0, 6, 2, 4), "associate.A": (0, 9, 8, 12),
            "associate.dx": (0, 6, 8, 12)}
    assert got, op
    for name, out in got.items():
        assert tuple(out.shape) == want[name], name
        assert out.dtype == torch.float32 and out.device == t["x"].device, name


@pytest.mark.parametrize("stoken_size", [8, (8, 4), (6, 16)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_image_smaller_than_one_stoken(backend, stoken_size):
    """5 x 3 images: padded to one cell, the rest cropped; same as the reference backend."""
    torch.manual_seed(seed_for("small-image", backend, stoken_size))
    C = 8
    ref = sk.SuperTokenAttention(C, stoken_size, n_iter=2, num_heads=2, qkv_bias=True)
    dev = device_for(backend)
    m = copy.deepcopy(ref).to(dev)
    x = torch.randn(2, C, 5, 3)
    g = torch.randn(2, C, 5, 3)
    got = _module_results(m, backend, x.to(dev), g.to(dev))
    want = _module_results(ref, "reference", x, g)
    assert got["y"].shape == (2, C, 5, 3)
    _same(got, want, exact=False, where=f"{backend} vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_module(backend):
    dev = device_for(backend)
    m = sk.SuperTokenAttention(8, (4, 3), num_heads=2).to(dev)
    x = torch.randn(0, 8, 9, 7, device=dev)
    res = _module_results(m, backend, x, torch.randn(0, 8, 9, 7, device=dev))
    assert res["y"].shape == x.shape and res["dx"].shape == x.shape
    for name, d in res.items():
        if name.startswith("dstoken_refine"):
            assert torch.all(d == 0), name  # no tokens: no parameter gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_stoken_size_int_or_pair(backend):
    """``4`` and ``(4, 4)`` are the same super-token size, for the ops and the module (``[4, 4]``,
    ``torch.Size([4, 4])`` and NumPy integers too: test_stoken_size_forms)."""
    t = _inputs("int-or-pair", 1, 3, 4, 8, 4, 4, backend)
    for op in OPS:
        _same(op_results(op, backend, t, (4, 4)), op_results(op, backend, t, 4), exact=True,
              where=op)
    torch.manual_seed(seed_for("int-or-pair-module"))
    m_int = sk.SuperTokenAttention(3, 4, num_heads=1).to(device_for(backend))
    m_pair = copy.deepcopy(m_int)
    m_pair.stoken_size = (4, 4)
    assert sk.SuperTokenAttention(3, [4, 4], num_heads=1).stoken_size == m_int.stoken_size == (4, 4)
    with sk.use_backend(backend):
        assert torch.equal(m_int(t["x"]), m_pair(t["x"]))


def test_stoken_size_forms():
    np = pytest.importorskip("numpy")
    for size in (4, (4, 4), [4, 4], torch.Size([4, 4]), np.int64(4), (np.int32(4), 4)):
        assert pair(size) == (4, 4) and type(pair(size)[0]) is int, size
    assert pair((8, 2)) == (8, 2)


# ------------------------------------------------------------------------------------------------
# Huge logits
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits(backend, dtype):
    """x scaled by 1e4: logits of order 1e8. The softmax stays finite and sums to 1 over the 9
    slots; the association stage and every gradient stay finite; results match the reference."""
    B, C, H, W, h, w = 2, 6, 9, 8, 3, 4
    t = _inputs("huge", B, C, H, W, h, w, backend, dtype)
    t["x"] = t["x"] * 1e4
    t["s"] = t["s"] * 1e4
    for op, name in (("affinity", "affinity"), ("associate", "associate.A")):
        got = op_results(op, backend, t, (h, w))
        for out_name, out in got.items():
            assert torch.isfinite(out).all(), f"{out_name} is not finite"
        A = got[name]
        assert A.min() >= 0 and A.max() <= 1
        torch.testing.assert_close(A.sum(1), torch.ones(B, H, W, dtype=dtype, device=A.device),
                                   **TOL[dtype])
        if backend != "reference":
            want = op_results(op, "reference", {k: v.cpu() for k, v in t.items()}, (h, w))[name]
            # a relative error of ~1e-7 moves a 1e8 logit by ~10, which would matter at a near-tie
            # of the two largest logits (none in these inputs): elsewhere A is 0 or 1 up to rounding
            torch.testing.assert_close(A.cpu(), want, rtol=0,
                                       atol=1e-4 if dtype == torch.float32 else 1e-10)
