"""The compiled backends against the reference: the C++ ``cpu`` kernels (always) and the ``cuda``
kernels (tests marked ``cuda``, skipped without a GPU).

Without the extension this module is skipped, unless ``STVIT_EXPECT_COMPILED=1`` (set by the
Makefile): then a missing build fails. ``STVIT_EXPECT_CUDA=1`` (set by the Makefile when nvcc is on
the PATH) makes a build without the CUDA kernels fail, which is how CI proves the CUDA build.
"""
import contextlib
import copy
import os

import pytest
import torch

import stvit_kernels as sk
from stvit_kernels import _ext
from stvit_kernels.backends import get_backend

from .utils import GRAD_SHAPES, OP_SHAPES, TOL, device_for, make_inputs, op_results, seed_for


def _flag(name):
    return os.environ.get(name, "0").strip() not in ("", "0")


EXPECT_COMPILED = _flag("STVIT_EXPECT_COMPILED")
EXPECT_CUDA = _flag("STVIT_EXPECT_CUDA")
LOAD_ERROR = _ext.load_error()

if LOAD_ERROR is not None and not (EXPECT_COMPILED or EXPECT_CUDA):
    pytest.skip(f"the compiled extension is not available ({LOAD_ERROR}); set "
                "STVIT_EXPECT_COMPILED=1 to make this a failure", allow_module_level=True)

REF = get_backend("reference")
HALF = [torch.float16, torch.bfloat16]
FULL = [torch.float32, torch.float64]
BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# the CPU kernels exist for the baseline ISA of the build and, on x86-64, for AVX2 + FMA
CPU_ISAS = ["auto", "default"]
# every output and workspace of the CPU kernels starts as NaN (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("poison_outputs")
# Cell widths that take the CPU kernels' special paths (a cell row of 4, 8 or 16 pixels, with a
# number of pixels per cell that is not a whole number of vectors), beside the shared OP_SHAPES.
CPU_SHAPES = OP_SHAPES + [
    pytest.param(2, 6, 9, 12, 3, 4, id="B2-C6-9x12-s3x4-partial-vector"),
    pytest.param(1, 17, 10, 16, 5, 8, id="B1-C17-10x16-s5x8"),
    pytest.param(2, 3, 4, 32, 2, 16, id="B2-C3-4x32-s2x16"),
]


def _C():
    from stvit_kernels import _C

    return _C


def _require(backend):
    """Fail (not skip) when the extension or its CUDA kernels are expected but missing."""
    if LOAD_ERROR is not None:
        pytest.fail(f"the compiled extension is not available: {LOAD_ERROR}")
    if backend == "cuda" and not _ext.built_with_cuda():
        if EXPECT_CUDA:
            pytest.fail("STVIT_EXPECT_CUDA=1 but the extension was built without CUDA kernels")
        pytest.skip("the extension was built without CUDA kernels")
    return get_backend(backend)


@contextlib.contextmanager
def cpu_isa(name):
    previous = _C().cpu_isa()
    _C().set_cpu_isa(name)
    try:
        yield
    finally:
        _C().set_cpu_isa(previous)


def _inputs(key, B, C, H, W, h, w, dtype, device="cpu"):
    return make_inputs(B, C, H, W, h, w, dtype=dtype, device=device,
                       seed=seed_for(key, B, C, H, W, h, w, dtype))


def _assert_close(got, want, dtype, name):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOL[dtype],
                               msg=lambda m: f"{name}: {m}")


def _primitive_outputs(be, t, h, w, scale):
    """Every primitive's outputs on the inputs of make_inputs, by name."""
    x, s, A = t["x"], t["s"], t["A"]
    out = {
        "affinity": be.affinity(x, s, h, w, scale, True),
        "logits": be.affinity(x, s, h, w, scale, False),
        "upsample": be.upsample(s, A, h, w),
    }
    out["num"], out["den"] = be.aggregate(x, A, h, w)
    out["fused.A"], out["fused.num"], out["fused.den"] = be.affinity_aggregate(x, s, h, w, scale)
    return out


def _check_primitives(backend, B, C, H, W, h, w, dtype, compare_dtype=None):
    """The backend's primitives in `dtype` against the reference on the same inputs in
    `compare_dtype` (default: `dtype`)."""
    be = _require(backend)
    t = _inputs(("prims", backend), B, C, H, W, h, w, dtype, device_for(backend))
    want_dtype = compare_dtype or dtype
    t_ref = {k: v.to(device="cpu", dtype=want_dtype) for k, v in t.items()}
    for scale in (C ** -0.5, 1.0):
        got = _primitive_outputs(be, t, h, w, scale)
        want = _primitive_outputs(REF, t_ref, h, w, scale)
        for name in want:
            assert got[name].dtype == dtype and got[name].device == t["x"].device, name
            _assert_close(got[name], want[name], dtype, f"{name} (scale={scale})")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("B,C,H,W,h,w", CPU_SHAPES)
def test_cpu_primitives_match_reference(B, C, H, W, h, w, dtype, isa):
    _require("cpu")
    with cpu_isa(isa):
        _check_primitives("cpu", B, C, H, W, h, w, dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_tiles_beyond_the_scratch_arena(isa):
    """A band of 64 cells x 130 channels x 64 pixels needs 2 MiB of tiles, more than a thread's
    scratch arena keeps (1 MiB): those come from the heap, next to arena buffers, and the results
    are the same."""
    _require("cpu")
    with cpu_isa(isa):
        _check_primitives("cpu", 1, 130, 8, 512, 8, 8, torch.float32)
        x = _inputs("arena", 1, 130, 8, 512, 8, 8, torch.float32)["x"]
        want = torch.ops.stvit.associate(x, torch.ops.stvit.pool(x, 8, 8), 8, 8, 0.1, 1)
        for a, b in zip(torch.ops.stvit.associate(x, None, 8, 8, 0.1, 1), want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FULL + HALF, ids=str)
@pytest.mark.parametrize("B,C,H,W,h,w", CPU_SHAPES)
def test_pool_matches_avg_pool2d(B, C, H, W, h, w, dtype, backend):
    """stvit::pool, the module's initial super tokens, against avg_pool2d in float64; its
    registration (opcheck; a raw operator, without gradient)."""
    _require(backend)
    t = make_inputs(B, C, H, W, h, w, dtype=torch.float64, device=device_for(backend),
                    seed=seed_for("pool", B, C, H, W, dtype))
    x = t["x"].to(dtype)
    s = sk.ops.initial_stokens(x, (h, w), backend=backend)
    expected = torch.nn.functional.avg_pool2d(x.double(), (h, w))
    tol = TOL[dtype] if dtype in HALF else dict(rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(s.double(), expected, **tol)
    if dtype == torch.float64:
        torch.library.opcheck(torch.ops.stvit.pool.default, (t["x"][:1, :2].clone(), h, w))


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("n_iter", [1, 2])
@pytest.mark.parametrize("dtype", FULL + HALF, ids=str)
@pytest.mark.parametrize("B,C,H,W,h,w", CPU_SHAPES)
def test_associate_pools_in_its_first_pass_bitwise(B, C, H, W, h, w, dtype, n_iter, isa):
    """stvit::associate without s computes the initial super tokens (the cell means) in the same
    pass over x as the first association: the same function, bit for bit, as pool first and
    associate from its s. On two threads too (each range of bands pools the rows it needs)."""
    _require("cpu")
    x = _inputs("pooled", B, C, H, W, h, w, torch.float64)["x"].to(dtype)
    scale = C ** -0.5 if C else 1.0
    threads = torch.get_num_threads()
    try:
        with cpu_isa(isa):
            for n in (1, 2):
                torch.set_num_threads(n)
                want = torch.ops.stvit.associate(x, torch.ops.stvit.pool(x, h, w), h, w, scale, n_iter)
                got = torch.ops.stvit.associate(x, None, h, w, scale, n_iter)
                for a, b in zip(got, want):
                    assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("B,C,H,W,h,w", CPU_SHAPES)
def test_cpu_half_primitives_match_float64_reference(B, C, H, W, h, w, dtype, isa):
    _require("cpu")
    with cpu_isa(isa):
        _check_primitives("cpu", B, C, H, W, h, w, dtype, compare_dtype=torch.float64)


def _op_grads(backend, t, size, dtype):
    """Outputs and input gradients of the three public ops, by name (tests/utils.op_results)."""
    return {k: v for op in ("affinity", "aggregate", "upsample")
            for k, v in op_results(op, backend, t, size, dtype).items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("B,C,H,W,h,w", OP_SHAPES)
def test_public_ops_and_grads_match_reference(B, C, H, W, h, w, dtype, backend):
    _require(backend)
    t = _inputs(("grads", backend), B, C, H, W, h, w, dtype, device_for(backend))
    got = _op_grads(backend, t, (h, w), dtype)
    want = _op_grads("reference", {k: v.cpu() for k, v in t.items()}, (h, w), dtype)
    for name in want:
        _assert_close(got[name], want[name], dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("B,C,H,W,h,w", OP_SHAPES)
def test_half_public_ops_and_grads_match_float64_reference(B, C, H, W, h, w, dtype, backend):
    _require(backend)
    t = _inputs(("grads-half", backend), B, C, H, W, h, w, dtype, device_for(backend))
    got = _op_grads(backend, t, (h, w), dtype)
    want = _op_grads("reference", {k: v.cpu() for k, v in t.items()}, (h, w), torch.float64)
    for name in want:
        assert got[name].dtype == dtype, name
        _assert_close(got[name], want[name], dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,C,H,W,h,w", GRAD_SHAPES)
def test_gradcheck(B, C, H, W, h, w, backend):
    _require(backend)
    t = _inputs(("gradcheck", backend), B, C, H, W, h, w, torch.float64, device_for(backend))
    x, s, A = (t[k].requires_grad_() for k in ("x", "s", "A"))
    size = (h, w)
    assert torch.autograd.gradcheck(
        lambda x, s: sk.stoken_affinity(x, s, size, backend=backend), (x, s))
    assert torch.autograd.gradcheck(
        lambda x, A: sk.stoken_aggregate(x, A, size, backend=backend), (x, A))
    assert torch.autograd.gradcheck(
        lambda s, A: sk.stoken_upsample(s, A, size, backend=backend), (s, A))


# Large enough that the CPU kernels split the work over threads (many bands per call).
DETERMINISM_SHAPES = [
    pytest.param(4, 32, 32, 48, 4, 4, id="B4-C32-32x48-s4"),
    pytest.param(3, 13, 14, 21, 7, 3, id="B3-C13-14x21-s7x3"),
]


def _all_outputs(be, t, h, w, scale):
    out = _primitive_outputs(be, t, h, w, scale)
    return [out[k] for k in sorted(out)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,C,H,W,h,w", DETERMINISM_SHAPES)
def test_bitwise_deterministic(B, C, H, W, h, w, backend):
    be = _require(backend)
    t = _inputs(("determinism", backend), B, C, H, W, h, w, torch.float32, device_for(backend))
    first = _all_outputs(be, t, h, w, C ** -0.5)
    second = _all_outputs(be, t, h, w, C ** -0.5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,C,H,W,h,w", DETERMINISM_SHAPES)
def test_cpu_results_independent_of_thread_count(B, C, H, W, h, w):
    be = _require("cpu")
    t = _inputs("threads", B, C, H, W, h, w, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_outputs(be, t, h, w, C ** -0.5)
        torch.set_num_threads(2)
        two = _all_outputs(be, t, h, w, C ** -0.5)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_neighbours_have_exactly_zero_logit(backend):
    """1x1 grid: the 8 slots outside the grid have logit exactly 0 and share the softmax; the
    upsampling and the aggregation ignore them whatever A holds there."""
    be = _require(backend)
    t = _inputs(("invalid", backend), 2, 5, 3, 4, 3, 4, torch.float64, device_for(backend))
    x, s, A = t["x"], t["s"], t["A"]
    invalid = [0, 1, 2, 3, 5, 6, 7, 8]
    logits = be.affinity(x, s, 3, 4, 0.5, False)
    assert torch.equal(logits[:, invalid], torch.zeros_like(logits[:, invalid]))
    garbage = A.clone()
    garbage[:, invalid] = float("nan")
    y = be.upsample(s, garbage, 3, 4)
    num, den = be.aggregate(x, garbage, 3, 4)
    torch.testing.assert_close(y, A[:, 4:5] * s, **TOL[torch.float64])
    torch.testing.assert_close(den, A[:, 4:5].sum(dim=(2, 3), keepdim=True), **TOL[torch.float64])
    torch.testing.assert_close(num, (A[:, 4:5] * x).sum(dim=(2, 3), keepdim=True),
                               **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    be = _require(backend)
    dev = device_for(backend)
    x = torch.randn(0, 6, 8, 12, device=dev)
    s = torch.randn(0, 6, 2, 3, device=dev)
    A = torch.randn(0, 9, 8, 12, device=dev)
    assert be.affinity(x, s, 4, 4, 0.5, True).shape == (0, 9, 8, 12)
    num, den = be.aggregate(x, A, 4, 4)
    assert num.shape == (0, 6, 2, 3) and den.shape == (0, 1, 2, 3)
    assert be.upsample(s, A, 4, 4).shape == (0, 6, 8, 12)
    A2, num2, den2 = be.affinity_aggregate(x, s, 4, 4, 0.5)
    assert A2.shape == (0, 9, 8, 12) and num2.shape == (0, 6, 2, 3) and den2.shape == (0, 1, 2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last_inputs(backend):
    _require(backend)
    B, C, H, W, h, w = 2, 6, 12, 10, 4, 5
    t = _inputs(("layout", backend), B, C, H, W, h, w, torch.float32, device_for(backend))
    x_cl = t["x"].to(memory_format=torch.channels_last)
    s_t = t["s"].transpose(2, 3).contiguous().transpose(2, 3)
    got = sk.stoken_affinity(x_cl, s_t, (h, w), backend=backend)
    want = sk.stoken_affinity(t["x"].cpu(), t["s"].cpu(), (h, w), backend="reference")
    _assert_close(got, want, torch.float32, "affinity")
    A_nc = torch.cat([t["A"], t["A"]], dim=3)[..., :W]
    assert not A_nc.is_contiguous()
    got_y = sk.stoken_upsample(s_t, A_nc, (h, w), backend=backend)
    want_y = sk.stoken_upsample(t["s"].cpu(), t["A"].cpu(), (h, w), backend="reference")
    _assert_close(got_y, want_y, torch.float32, "upsample")


@pytest.mark.parametrize("dtype", FULL + HALF, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_associate_backward_any_layout_of_g(backend, dtype):
    """stvit::associate_backward, upsample(g / (den + 1e-12), A): g contiguous, token-major (the
    layout the refine's backward leaves it in, which the CUDA kernel reads in place, dividing as
    it stages) and transposed (a copy first), against the reference in float64."""
    _require(backend)
    B, C, H, W, h, w = 2, 6, 12, 10, 4, 5
    t = _inputs(("assoc-bwd", backend), B, C, H, W, h, w, torch.float64, device_for(backend))
    den = torch.rand(B, 1, H // h, W // w, dtype=torch.float64, device=t["x"].device) * 4 + 0.25
    A, g, den = t["A"].to(dtype), t["s"].to(dtype), den.to(dtype)
    want = REF.upsample(g.double().cpu() / (den.double().cpu() + 1e-12), A.double().cpu(), h, w)
    layouts = {"contiguous": g,
               "token-major": g.to(memory_format=torch.channels_last),
               "transposed": g.transpose(2, 3).contiguous().transpose(2, 3)}
    for name, g_in in layouts.items():
        got = torch.ops.stvit.associate_backward(g_in, A, den, h, w)
        assert got.is_contiguous(), name
        _assert_close(got, want, dtype, f"associate_backward (g {name})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_check_their_inputs(backend):
    """torch.ops.stvit.* validate their inputs themselves (the Python layer does too)."""
    _require(backend)
    dev = device_for(backend)
    ops = torch.ops.stvit
    x = torch.randn(1, 4, 8, 8, device=dev)
    s = torch.randn(1, 4, 2, 2, device=dev)
    A = torch.randn(1, 9, 8, 8, device=dev)
    with pytest.raises(RuntimeError, match="4-D"):
        ops.affinity(x[0], s, 4, 4, 1.0, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.affinity(x, s.double(), 4, 4, 1.0, True)
    # any layout is taken (copied to contiguous NCHW inside)
    torch.testing.assert_close(ops.affinity(x.transpose(2, 3).contiguous().transpose(2, 3), s, 4, 4,
                                            1.0, True), ops.affinity(x, s, 4, 4, 1.0, True))
    with pytest.raises(RuntimeError, match="divisible"):
        ops.affinity(x, s, 3, 4, 1.0, True)
    with pytest.raises(RuntimeError, match="positive"):
        ops.upsample(s, A, 0, 4)
    with pytest.raises(RuntimeError, match=r"s must have shape"):
        ops.affinity_aggregate(x, s[:, :, :1].contiguous(), 4, 4, 1.0)
    with pytest.raises(RuntimeError, match=r"A must have shape"):
        ops.aggregate(x, A[:, :8].contiguous(), 4, 4)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.upsample(s, A[:, :, :4].contiguous(), 4, 4)
    with pytest.raises(RuntimeError, match="float32, float64"):
        ops.upsample(s.int(), A.int(), 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_iter", [1, 2])
@pytest.mark.parametrize("dtype", FULL, ids=str)
def test_associate_matches_reference(n_iter, dtype, backend):
    _require(backend)
    B, C, H, W, h, w = 2, 12, 15, 12, 5, 4
    t = _inputs(("associate", backend, n_iter), B, C, H, W, h, w, dtype, device_for(backend))
    results = []
    for be, dev in ((backend, device_for(backend)), ("reference", "cpu")):
        x = t["x"].to(dev).requires_grad_()
        s0 = torch.nn.functional.avg_pool2d(x.detach(), (h, w))
        s, A = sk.associate(x, s0, (h, w), n_iter=n_iter, backend=be)
        dx, = torch.autograd.grad(s, x, t["gnum"].to(dev))
        results.append((s, A, dx))
    for name, got, want in zip(("stokens", "A", "dx"), *results):
        _assert_close(got, want, dtype, name)


# (C, heads, H, W, stoken_size, n_iter, refine_attention)
MODULE_CASES = [
    pytest.param(16, 2, 16, 16, (8, 8), 1, True, id="C16-16x16-s8"),
    pytest.param(12, 3, 13, 21, (4, 5), 2, True, id="C12-13x21-s4x5-pad-it2"),
    pytest.param(10, 1, 11, 14, (4, 3), 1, False, id="C10-11x14-s4x3-pad-convrefine"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FULL, ids=str)
@pytest.mark.parametrize("C,heads,H,W,size,n_iter,refine_attention", MODULE_CASES)
def test_module_forward_backward_matches_reference(C, heads, H, W, size, n_iter,
                                                   refine_attention, dtype, backend):
    _require(backend)
    dev = device_for(backend)
    torch.manual_seed(seed_for("module", backend, C, H, W, size, n_iter, dtype))
    # the reference runs on the same device: the refine (linear, SDPA) is then the same code on
    # both sides and the comparison sees the STA kernels only
    ref_module = sk.SuperTokenAttention(C, size, n_iter=n_iter, refine_attention=refine_attention,
                                        num_heads=heads, qkv_bias=True).to(dtype).to(dev)
    module = copy.deepcopy(ref_module)
    x = torch.randn(2, C, H, W, dtype=dtype, device=dev)
    g = torch.randn(2, C, H, W, dtype=dtype, device=dev)
    results = []
    for m, be in ((module, backend), (ref_module, "reference")):
        xi = x.clone().requires_grad_()
        with sk.use_backend(be):
            y = m(xi)
        params = list(m.parameters())
        dx, *dparams = torch.autograd.grad(y, [xi, *params], g)
        results.append([y, dx, *dparams])
    names = ["y", "dx"] + [f"d{n}" for n, _ in ref_module.named_parameters()]
    for name, got, want in zip(names, *results):
        _assert_close(got, want, dtype, name)


def test_cuda_kernels_built_when_expected():
    """STVIT_EXPECT_CUDA=1 (the Makefile sets it when nvcc is on the PATH): the build must contain
    the CUDA kernels. This is how CI, which has no GPU, proves that they compile and link."""
    if not EXPECT_CUDA:
        pytest.skip("STVIT_EXPECT_CUDA is not set")
    assert LOAD_ERROR is None, f"the compiled extension is not available: {LOAD_ERROR}"
    assert _ext.built_with_cuda(), ("STVIT_EXPECT_CUDA=1 but stvit_kernels._C was built without "
                                    "the CUDA kernels; rebuild with STVIT_FORCE_CUDA=1 to see why")


def test_extension_loads_and_reports_itself():
    if LOAD_ERROR is not None:
        pytest.fail(f"the compiled extension is not available: {LOAD_ERROR}")
    C = _C()
    assert C.torch_version().split("+")[0] == torch.__version__.split("+")[0]
    assert C.cpu_isa() in ("avx2", "default")
    assert "cpu" in sk.available_backends()
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        C.set_cpu_isa("sse9")
