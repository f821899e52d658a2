"""The reference backend against the loop implementation, and its float64 gradients."""
import pytest
import torch

import stvit_kernels as sk
from stvit_kernels import reference as ref

from . import loops
from .utils import GRAD_SHAPES, make_inputs, seed_for

LOOP_SHAPES = [
    pytest.param(1, 3, 6, 6, 2, 2, id="B1-C3-6x6-s2-grid3x3"),
    pytest.param(2, 2, 4, 6, 4, 3, id="B2-C2-4x6-s4x3-grid1x2"),
    pytest.param(1, 4, 5, 5, 5, 5, id="B1-C4-5x5-s5-grid1x1"),
    pytest.param(1, 1, 6, 4, 3, 1, id="B1-C1-6x4-s3x1"),
    pytest.param(2, 5, 9, 8, 3, 4, id="B2-C5-9x8-s3x4-grid3x2"),
]


@pytest.mark.parametrize("B,C,H,W,h,w", LOOP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ops_match_loops(B, C, H, W, h, w, dtype):
    t = make_inputs(B, C, H, W, h, w, dtype=dtype, seed=seed_for("loops", B, C, H, W, h, w, dtype))
    x, s, A = t["x"], t["s"], t["A"]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    scale = 0.7

    got = sk.stoken_affinity(x, s, (h, w), scale=scale, backend="reference")
    torch.testing.assert_close(got.double(), loops.affinity(x, s, h, w, scale), **tol)
    torch.testing.assert_close(got.sum(1), torch.ones(B, H, W, dtype=dtype), **tol)

    num, den = sk.stoken_aggregate(x, A, (h, w), backend="reference")
    lnum, lden = loops.aggregate(x, A, h, w)
    torch.testing.assert_close(num.double(), lnum, **tol)
    torch.testing.assert_close(den.double(), lden, **tol)

    y = sk.stoken_upsample(s, A, (h, w), backend="reference")
    torch.testing.assert_close(y.double(), loops.upsample(s, A, h, w), **tol)


def test_invalid_neighbours_have_zero_logit():
    # 1x1 grid: only slot 4 is valid, the other 8 logits are 0 and share the softmax.
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    s = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    logits = ref.affinity(x, s, 3, 3, 0.5, softmax=False)
    assert torch.equal(logits[:, [0, 1, 2, 3, 5, 6, 7, 8]], torch.zeros(1, 8, 3, 3, dtype=torch.float64))
    A = ref.affinity(x, s, 3, 3, 0.5)
    expected4 = torch.sigmoid(logits[:, 4] - torch.log(torch.tensor(8.0, dtype=torch.float64)))
    torch.testing.assert_close(A[:, 4], expected4)


def test_default_scale_is_channel_count():
    t = make_inputs(1, 7, 4, 4, 2, 2, dtype=torch.float64, seed=seed_for("scale"))
    a = sk.stoken_affinity(t["x"], t["s"], 2, backend="reference")
    b = sk.stoken_affinity(t["x"], t["s"], 2, scale=7 ** -0.5, backend="reference")
    assert torch.equal(a, b)


@pytest.mark.parametrize("B,C,H,W,h,w", GRAD_SHAPES)
def test_gradcheck(B, C, H, W, h, w):
    t = make_inputs(B, C, H, W, h, w, dtype=torch.float64, seed=seed_for("gradcheck", B, C, H, W))
    x, s, A = (t[k].requires_grad_() for k in ("x", "s", "A"))
    size = (h, w)
    assert torch.autograd.gradcheck(lambda x, s: sk.stoken_affinity(x, s, size, backend="reference"), (x, s))
    assert torch.autograd.gradcheck(lambda x, A: sk.stoken_aggregate(x, A, size, backend="reference"), (x, A))
    assert torch.autograd.gradcheck(lambda s, A: sk.stoken_upsample(s, A, size, backend="reference"), (s, A))


@pytest.mark.parametrize("B,C,H,W,h,w", GRAD_SHAPES)
def test_backward_formulas_with_reference_primitives(B, C, H, W, h, w):
    """float64 gradcheck of every autograd Function of ``stvit_kernels._library`` (the backward
    formulas every fused backend uses) on the reference primitives as a kernel family."""
    from stvit_kernels import _library as L

    fam = L.reference_kernels().name
    t = make_inputs(B, C, H, W, h, w, dtype=torch.float64, seed=seed_for("formulas", B, C, H, W))
    x, s, A = (t[k].requires_grad_() for k in ("x", "s", "A"))
    scale = C ** -0.5
    assert torch.autograd.gradcheck(lambda x, s: L.Affinity.apply(fam, x, s, h, w, scale, True), (x, s))
    assert torch.autograd.gradcheck(lambda x, s: L.Affinity.apply(fam, x, s, h, w, scale, False), (x, s))
    assert torch.autograd.gradcheck(lambda x, A: L.Aggregate.apply(fam, x, A, h, w), (x, A))
    assert torch.autograd.gradcheck(lambda s, A: L.Upsample.apply(fam, s, A, h, w), (s, A))
    assert torch.autograd.gradcheck(lambda x, s: L.AffinityAggregate.apply(fam, x, s, h, w, scale), (x, s))
    # associate: the gradient into x through num only, A and den constant, none into s
    g = torch.randn(B, C, H // h, W // w, dtype=torch.float64)
    for s0, n_iter in ((s, 1), (None, 2)):
        stokens, A1 = L.Associate.apply(fam, x, s0, h, w, scale, n_iter)
        assert not A1.requires_grad
        (dx,) = torch.autograd.grad(stokens, x, g)
        with torch.no_grad():
            s1 = torch.nn.functional.avg_pool2d(x, (h, w)) if s0 is None else s0
            for _ in range(n_iter - 1):
                _, num, den = ref.affinity_aggregate(x, s1, h, w, scale)
                s1 = num / (den + 1e-12)
            A0 = ref.affinity(x, s1, h, w, scale)
        num, den0 = ref.aggregate(x, A0, h, w)
        stokens_ref = num / (den0 + 1e-12)
        (dx_ref,) = torch.autograd.grad(stokens_ref, x, g)
        torch.testing.assert_close(stokens, stokens_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(A1, A0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
