"""The Triton backend against the reference.

Without a GPU these run the kernels under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by ``conftest.py``), which is slow: the shape lists below are chosen to keep this file within a
few minutes on a 2-core machine. The tests marked ``cuda`` repeat the checks on a GPU with a
realistic shape, float16 and bfloat16.
"""
import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the triton backend cannot run")

import stvit_kernels as sk  # noqa: E402
from stvit_kernels import _library  # noqa: E402
from stvit_kernels import reference as ref  # noqa: E402
from stvit_kernels import triton_kernels as tk  # noqa: E402
from stvit_kernels._utils import normalise as lib_normalise  # noqa: E402
from stvit_kernels.backends import get_backend  # noqa: E402

from .utils import GRAD_SHAPES, OP_SHAPES, TOL, make_inputs, seed_for  # noqa: E402

TRITON = get_backend("triton")
REF = get_backend("reference")
HALF = [torch.float16, torch.bfloat16]
# CPU tensors under the interpreter; with a GPU the kernels are compiled and take CUDA tensors
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# every output and workspace the kernels get starts as NaN (tests/conftest.py)
# every test here runs the Triton kernels, on the GPU when there is one: all in the GPU tier
pytestmark = [pytest.mark.usefixtures("poison_outputs"), pytest.mark.gpu]


def _inputs(key, B, C, H, W, h, w, dtype=torch.float32, device=DEVICE):
    """:func:`make_inputs` with a fresh seed for this test (``key``) and case."""
    return make_inputs(B, C, H, W, h, w, dtype=dtype, device=device,
                       seed=seed_for(key, B, C, H, W, h, w, dtype))


def _outputs(be, t, h, w, scale):
    """Every primitive of a backend on the inputs ``t`` (from :func:`make_inputs`), by name."""
    x, s, A = t["x"], t["s"], t["A"]
    num, den = be.aggregate(x, A, h, w)
    fA, fnum, fden = be.affinity_aggregate(x, s, h, w, scale)
    return {
        "affinity": be.affinity(x, s, h, w, scale, True),
        "logits": be.affinity(x, s, h, w, scale, False),
        "num": num, "den": den,
        "upsample": be.upsample(s, A, h, w),
        "fused.A": fA, "fused.num": fnum, "fused.den": fden,
        "pool": be.pool(x, h, w),
    }


def _double(t):
    return {k: v.double() if torch.is_tensor(v) else v for k, v in t.items()}


def _check_all(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# Forward primitives
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,C,H,W,h,w", OP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_primitives_match_reference(B, C, H, W, h, w, dtype):
    t = _inputs("triton-prim", B, C, H, W, h, w, dtype)
    scale = C ** -0.5
    got = _outputs(TRITON, t, h, w, scale)
    _check_all(got, _outputs(REF, t, h, w, scale), **TOL[dtype])
    # invalid neighbours have logit exactly 0 and A sums to 1 over the 9 slots
    ones = torch.ones(B, 1, H // h, W // w, dtype=dtype, device=DEVICE)
    valid = ref.broadcast_neighbours(ones, h, w) > 0
    assert torch.all(got["logits"][~valid] == 0)
    torch.testing.assert_close(got["affinity"].sum(1), torch.ones(B, H, W, dtype=dtype, device=DEVICE),
                               **TOL[dtype])


# (B, C, H, W, h, w) for the half-precision checks: the tl.dot path with a 64- and a 16-pixel cell,
# and the broadcast path with an odd cell.
HALF_SHAPES = [
    pytest.param(2, 16, 16, 16, 8, 8, id="B2-C16-16x16-s8-dot"),
    pytest.param(1, 32, 12, 8, 4, 4, id="B1-C32-12x8-s4-dot"),
    pytest.param(1, 3, 9, 15, 3, 5, id="B1-C3-9x15-s3x5-odd"),
]


def _check_half(got, truth, torch_half, dtype, factor):
    """A half-precision kernel output against the float64 truth: the error must be within
    ``factor`` x the error of plain PyTorch (the reference) in the same precision (a floor of a
    quarter ulp at 1.0 avoids flakiness where PyTorch happens to be exact), and within TOL."""
    eps = torch.finfo(dtype).eps
    for name in truth:
        assert got[name].dtype == dtype, name
        err = (got[name].double() - truth[name]).abs().max().item()
        torch_err = (torch_half[name].double() - truth[name]).abs().max().item()
        limit = factor * torch_err + eps / 4
        assert err <= limit, (f"{name}: max error {err:.3g} vs float64, plain PyTorch in {dtype} makes "
                              f"{torch_err:.3g} (limit {limit:.3g})")
        torch.testing.assert_close(got[name].double(), truth[name], **TOL[dtype],
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,C,H,W,h,w", HALF_SHAPES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_against_float64(B, C, H, W, h, w, dtype):
    t = _inputs("triton-half", B, C, H, W, h, w, dtype)
    scale = C ** -0.5
    got = _outputs(TRITON, t, h, w, scale)
    truth = _outputs(REF, _double(t), h, w, scale)
    torch_half = _outputs(REF, t, h, w, scale)
    # the interpreter truncates float32 -> bfloat16 casts (a GPU rounds to nearest): twice the error
    factor = 4 if dtype == torch.bfloat16 and tk._interpreting() else 2
    _check_half(got, truth, torch_half, dtype, factor)


@pytest.mark.parametrize("B,C,H,W,h,w", [
    pytest.param(1, 16, 8, 16, 8, 8, id="B1-C16-8x16-s8-dot-4blocks"),
    pytest.param(2, 5, 10, 12, 5, 6, id="B2-C5-10x12-s5x6-2blocks-masked"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cells_larger_than_one_pixel_block(monkeypatch, B, C, H, W, h, w, dtype):
    """Cells of more than ``_MAX_BLOCK_P`` pixels: the affinity and upsampling grids get a pixel-block
    axis, the aggregation loops, and the fused kernel accumulates its workspace rows."""
    monkeypatch.setattr(tk, "_MAX_BLOCK_P", 16)
    assert tk._plan(dtype, C, h, w).N_PB > 1
    t = _inputs("triton-blocks", B, C, H, W, h, w, dtype)
    scale = 0.7
    _check_all(_outputs(TRITON, t, h, w, scale), _outputs(REF, t, h, w, scale), **TOL[dtype])


@pytest.mark.parametrize("limits", [
    pytest.param(dict(num_warps=1, tile=256, pool_tile=16), id="small-tiles-1-warp"),
    pytest.param(dict(num_warps=8, max_block_p=16, tile=8192, pool_tile=8192), id="big-tiles-8-warps"),
])
def test_plan_overrides(limits):
    """plan_overrides (the tuning knobs): every primitive agrees with the reference under other
    tiles and warps (loops over pixel blocks and channel chunks where they no longer fit), the
    plan follows the limits, and they are restored afterwards; unknown names and values refuse."""
    B, C, H, W, h, w = 2, 40, 8, 12, 4, 3
    t = _inputs("triton-plan-overrides", B, C, H, W, h, w)
    before = tk._plan(torch.float32, C, h, w)
    with tk.plan_overrides(**limits):
        plan = tk._plan(torch.float32, C, h, w)
        assert plan.num_warps == limits["num_warps"]
        assert plan.BLOCK_C == max(16, min(64, limits["tile"] // plan.BLOCK_P))
        got = _outputs(TRITON, t, h, w, 0.7)
    assert tk._plan(torch.float32, C, h, w) == before
    assert (tk._MAX_BLOCK_P, tk._TILE, tk._POOL_TILE, tk._NUM_WARPS) == (256, 4096, 2048, 0)
    _check_all(got, _outputs(REF, t, h, w, 0.7), **TOL[torch.float32])
    for bad in (dict(warps=2), dict(num_warps=3), dict(tile=100), dict(max_block_p=8)):
        with pytest.raises(ValueError, match="plan limit"):
            with tk.plan_overrides(**bad):
                pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_associate_backward_divides_as_it_loads(dtype):
    """stvit::triton_associate_backward, upsample(g / (den + 1e-12), A) in one kernel: against
    normalise then the reference upsampling (the two roundings of the composite it replaced), g
    contiguous, channels_last and transposed."""
    B, C, H, W, h, w = 2, 6, 8, 12, 4, 3
    t = _inputs("triton-assoc-bwd", B, C, H, W, h, w, torch.float64)
    den = torch.rand(B, 1, H // h, W // w, dtype=torch.float64, device=DEVICE) * 4 + 0.25
    g, A, den = t["s"].to(dtype), t["A"].to(dtype), den.to(dtype)
    want = REF.upsample(lib_normalise(g, den).double(), A.double(), h, w)
    tol = TOL[dtype] if dtype in HALF else dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 \
        else dict(rtol=1e-12, atol=1e-12)
    for g_in in (g, g.to(memory_format=torch.channels_last), g.transpose(2, 3).contiguous().transpose(2, 3)):
        got = torch.ops.stvit.triton_associate_backward(g_in, A, den, h, w)
        assert got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_associate_divides_in_the_reduction(dtype):
    """stvit::triton_associate, the association stage in one call (the pool, then per iteration the
    fused pass and a reduction that writes num / (den + 1e-12)). float32 / float64: bit for bit the
    composite of the family's other operators (dividing the unrounded sums is dividing num and den
    rounded to the same dtype). float16 / bfloat16: it divides before rounding, once, so it is held
    to the half-precision rule against the float64 truth; a reduction that skipped the division
    fails every dtype."""
    B, C, H, W, h, w = 2, 6, 8, 12, 4, 3
    t = _inputs("triton-associate-op", B, C, H, W, h, w, torch.float64)
    scale = C ** -0.5
    ops = torch.ops.stvit
    composite = _library.composite_associate(ops.triton_affinity_aggregate, ops.triton_pool)
    ref_composite = _library.composite_associate(REF.affinity_aggregate, REF.pool)
    for s, n_iter in ((None, 1), (t["s"], 1), (None, 3)):
        x_in = t["x"].to(dtype)
        s_in = None if s is None else s.to(dtype)
        got = dict(zip(("stokens", "A", "den"), ops.triton_associate(x_in, s_in, h, w, scale, n_iter)))
        if dtype in HALF:
            truth = dict(zip(got, ref_composite(x_in.double(), None if s is None else s_in.double(),
                                                h, w, scale, n_iter)))
            torch_half = dict(zip(got, ref_composite(x_in, s_in, h, w, scale, n_iter)))
            factor = 4 if dtype == torch.bfloat16 and tk._interpreting() else 2
            _check_half(got, truth, torch_half, dtype, factor)
        else:
            want = composite(x_in, s_in, h, w, scale, n_iter)
            for name, b in zip(got, want):
                assert torch.equal(got[name], b), (name, s is None, n_iter)
    with pytest.raises(ValueError, match="n_iter must be >= 1"):  # as the C++ op's TORCH_CHECK
        ops.triton_associate(t["x"], None, h, w, scale, 0)


def test_strided_inputs():
    """channels_last, transposed and sliced inputs are read through their strides."""
    B, C, H, W, h, w = 2, 6, 8, 12, 4, 3
    t = _inputs("triton-strided", B, C, H, W, h, w)
    x, s, A = t["x"], t["s"], t["A"]
    xs = x.to(memory_format=torch.channels_last)
    ss = s.transpose(2, 3).contiguous().transpose(2, 3)
    As = torch.cat([A, torch.zeros_like(A)], dim=3)[..., :W]
    assert not (xs.is_contiguous() or ss.is_contiguous() or As.is_contiguous())
    strided = _outputs(TRITON, dict(x=xs, s=ss, A=As), h, w, 0.5)
    _check_all(strided, _outputs(REF, t, h, w, 0.5), **TOL[torch.float32])
    for out in strided.values():
        assert out.is_contiguous()


@pytest.mark.parametrize("B,C", [(0, 4), (2, 0)], ids=["B0", "C0"])
def test_empty_batch_or_channels(B, C):
    h = w = 2
    t = _inputs("triton-empty", B, C, 4, 6, h, w)
    got = _outputs(TRITON, t, h, w, 1.0)
    _check_all(got, _outputs(REF, t, h, w, 1.0), **TOL[torch.float32])


def test_deterministic():
    """Two runs give bitwise identical results (no atomics; fixed summation order)."""
    B, C, H, W, h, w = 2, 16, 16, 16, 8, 8
    t = _inputs("triton-det", B, C, H, W, h, w)
    first = _outputs(TRITON, t, h, w, 0.25)
    second = _outputs(TRITON, t, h, w, 0.25)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ------------------------------------------------------------------------------------------------
# Gradients through the public ops (backward passes built from the forward primitives)
# ------------------------------------------------------------------------------------------------

def _op_grads(t, h, w, backend):
    """Outputs and every input gradient of the three ops, with the incoming gradients of ``t``."""
    size = (h, w)
    x, s, A = (t[k].detach().clone().requires_grad_() for k in ("x", "s", "A"))
    out = {}
    a = sk.stoken_affinity(x, s, size, backend=backend)
    out["affinity"] = a
    out["affinity.dx"], out["affinity.ds"] = torch.autograd.grad(a, (x, s), t["gA"])
    num, den = sk.stoken_aggregate(x, A, size, backend=backend)
    out["num"], out["den"] = num, den
    out["aggregate.dx"], out["aggregate.dA"] = torch.autograd.grad((num, den), (x, A),
                                                                   (t["gnum"], t["gden"]))
    _, den = sk.stoken_aggregate(x, A, size, backend=backend)
    out["aggregate.dA(den only)"], = torch.autograd.grad(den, A, t["gden"])
    y = sk.stoken_upsample(s, A, size, backend=backend)
    out["upsample"] = y
    out["upsample.ds"], out["upsample.dA"] = torch.autograd.grad(y, (s, A), t["gy"])
    return {k: v.detach() for k, v in out.items()}


# The shapes of OP_SHAPES whose grids have at most 2 x 12 cells (the interpreter runs one program per
# cell; the primitives themselves are checked on every shape above).
GRAD_OP_SHAPES = [p for p in OP_SHAPES
                  if p.values[0] * (p.values[2] // p.values[4]) * (p.values[3] // p.values[5]) <= 24]


@pytest.mark.parametrize("B,C,H,W,h,w", GRAD_OP_SHAPES)
def test_op_gradients_match_reference(B, C, H, W, h, w):
    t = _inputs("triton-grad", B, C, H, W, h, w)
    got = _op_grads(t, h, w, "triton")
    want = _op_grads(t, h, w, "reference")
    _check_all(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("B,C,H,W,h,w", GRAD_SHAPES)
def test_gradcheck(B, C, H, W, h, w):
    t = _inputs("triton-gradcheck", B, C, H, W, h, w, torch.float64)
    x, s, A = (t[k].requires_grad_() for k in ("x", "s", "A"))
    size = (h, w)
    kw = dict(fast_mode=True)  # full Jacobians are too slow under the interpreter
    be = "triton"
    assert torch.autograd.gradcheck(lambda x, s: sk.stoken_affinity(x, s, size, backend=be), (x, s), **kw)
    assert torch.autograd.gradcheck(lambda x, A: sk.stoken_aggregate(x, A, size, backend=be), (x, A), **kw)
    assert torch.autograd.gradcheck(lambda s, A: sk.stoken_upsample(s, A, size, backend=be), (s, A), **kw)


# ------------------------------------------------------------------------------------------------
# The association stage and the module
# ------------------------------------------------------------------------------------------------

def test_associate_matches_reference():
    B, C, H, W, size = 2, 16, 12, 8, (4, 4)
    t = _inputs("triton-associate", B, C, H, W, *size)
    g = torch.randn(B, C, H // 4, W // 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        x = t["x"].detach().clone().requires_grad_()
        s, A = sk.associate(x, t["s"], size, n_iter=2, backend=backend)
        dx, = torch.autograd.grad(s, x, g)
        results[backend] = {"stokens": s.detach(), "A": A, "dx": dx}
    _check_all(results["triton"], results["reference"], **TOL[torch.float32])


def _module_run(m, x, g):
    """Output, input gradient and parameter gradients of a module for the incoming gradient g."""
    x = x.clone().requires_grad_()
    y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    return {"y": y.detach(), "dx": grads[0],
            **{f"d{n}": gp for (n, _), gp in zip(m.named_parameters(), grads[1:])}}


def test_module_forward_backward_matches_reference():
    torch.manual_seed(seed_for("triton-module"))
    C = 16
    m = sk.SuperTokenAttention(C, (4, 4), n_iter=2, num_heads=2, qkv_bias=True, backend="triton")
    m = m.to(DEVICE)
    m_ref = copy.deepcopy(m)
    m_ref.backend = "reference"
    x = torch.randn(2, C, 13, 10, device=DEVICE)  # padded to 16 x 12: a 4 x 3 grid
    g = torch.randn_like(x)
    _check_all(_module_run(m, x, g), _module_run(m_ref, x, g), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# On a GPU: realistic sizes, float16 / bfloat16, compiled kernels
# ------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    pytest.param(2, 64, 56, 56, 8, 8, id="B2-C64-56x56-s8"),
    pytest.param(2, 128, 28, 28, 4, 4, id="B2-C128-28x28-s4"),
    pytest.param(1, 40, 30, 18, 5, 3, id="B1-C40-30x18-s5x3"),
    # RGB superpixels: 3 channels padded to a 16-wide tl.dot, 256-pixel cells (the largest block)
    pytest.param(2, 3, 64, 48, 16, 16, id="B2-C3-64x48-s16-rgb"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("B,C,H,W,h,w", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_gpu_primitives(B, C, H, W, h, w, dtype):
    t = _inputs("triton-gpu", B, C, H, W, h, w, dtype, device="cuda")
    scale = C ** -0.5
    got = _outputs(TRITON, t, h, w, scale)
    if dtype in HALF:
        truth = _outputs(REF, _double(t), h, w, scale)
        _check_half(got, truth, _outputs(REF, t, h, w, scale), dtype, factor=2)
    else:
        _check_all(got, _outputs(REF, t, h, w, scale), **TOL[dtype])
    again = _outputs(TRITON, t, h, w, scale)
    for name in got:
        assert torch.equal(got[name], again[name]), f"{name} is not deterministic"


@pytest.mark.cuda
@pytest.mark.parametrize("B,C,H,W,h,w", GPU_SHAPES)
def test_gpu_gradients(B, C, H, W, h, w):
    t = _inputs("triton-gpu-grad", B, C, H, W, h, w, device="cuda")
    _check_all(_op_grads(t, h, w, "triton"), _op_grads(t, h, w, "reference"), **TOL[torch.float32])


@pytest.mark.cuda
def test_gpu_module():
    torch.manual_seed(seed_for("triton-gpu-module"))
    C = 64
    m = sk.SuperTokenAttention(C, 8, num_heads=2, qkv_bias=True, backend="triton").cuda()
    m_ref = copy.deepcopy(m)
    m_ref.backend = "reference"
    x = torch.randn(2, C, 60, 52, device="cuda")
    g = torch.randn_like(x)
    _check_all(_module_run(m, x, g), _module_run(m_ref, x, g), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gpu_module_half(dtype):
    """The module in half precision: its error against the float64 module within 2x that of the
    same module on the reference backend in the same precision."""
    torch.manual_seed(seed_for("triton-gpu-module-half", dtype))
    C = 64
    m = sk.SuperTokenAttention(C, 8, num_heads=2, qkv_bias=True, backend="triton").cuda().to(dtype)
    m_ref = copy.deepcopy(m)
    m_ref.backend = "reference"
    x = torch.randn(2, C, 60, 52, device="cuda").to(dtype)
    y = m(x)
    y_ref = m_ref(x)
    truth = copy.deepcopy(m_ref).double()(x.double())
    err = (y.double() - truth).abs().max().item()
    ref_err = (y_ref.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps / 4, (err, ref_err)


@pytest.mark.cuda
def test_gpu_64bit_offsets():
    """Images of more than 2**31 elements: channel offsets past int32 inside an image, and batch
    offsets past int32. The last batch entry and the last channels must come out as computed from
    small inputs."""
    B, C, H, W, h, w = 2, 136, 4096, 4096, 8, 8  # C * H * W = 2.28e9 > 2**31 - 1
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs about 40 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(seed_for("triton-gpu-int64"))
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.float16, generator=g)
    s = torch.nn.functional.avg_pool2d(x, (h, w))
    A, num, den = TRITON.affinity_aggregate(x, s, h, w, C ** -0.5)
    # batch offsets: the last image alone (a view: its batch offset is in the pointer)
    A1, num1, den1 = TRITON.affinity_aggregate(x[1:], s[1:], h, w, C ** -0.5)
    assert torch.equal(A[1:], A1) and torch.equal(num[1:], num1) and torch.equal(den[1:], den1)
    # channel offsets: affinity against the reference (one image), and the channel-local outputs
    # against the same computation on the last 16 channels only (other block sizes: not bitwise)
    tol = TOL[torch.float16]
    torch.testing.assert_close(A1, REF.affinity(x[1:], s[1:], h, w, C ** -0.5), **tol)
    del A1, num1, den1
    last = slice(C - 16, C)
    torch.testing.assert_close(num[:, last], TRITON.aggregate(x[:, last], A, h, w)[0], **tol)
    y = TRITON.upsample(s, A, h, w)
    torch.testing.assert_close(y[:, last], TRITON.upsample(s[:, last], A, h, w), **tol)
