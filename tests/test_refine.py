"""The lean training path: the refine attention written out (``stvit::refine_attention_forward`` /
``_backward``, :class:`stvit_kernels._library.Refine`) and the whole module as one call each way
(``stvit::sta_forward`` / ``sta_backward``, one C++ autograd node: ``stvit::sta``).

Each is checked against the composition it replaces (SDPA and autograd's graph; the module's
per-piece path of associate, refine and upsample), outputs and every gradient, with float64
gradchecks of the hand-written backwards, opcheck of the new operators, and the rules that decide
which path runs.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import stvit_kernels as sk
import stvit_kernels.module as module_mod
from stvit_kernels import _library
from stvit_kernels.backends import CompiledBackend, TritonBackend

from .utils import TOL, autograd_node_names, device_for, rel_error, seed_for

pytestmark = pytest.mark.skipif("cpu" not in sk.available_backends(),
                                reason="the compiled extension is not built")


def _devices():
    out = [pytest.param("cpu", id="cpu")]
    if "cuda" in sk.available_backends():
        out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return out


def _grads(m, x, g):
    for p in m.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(g)
    return y.detach(), [x.grad] + [p.grad for p in m.parameters()], y.grad_fn


@pytest.fixture
def sdpa_refine(monkeypatch):
    """Within the test: the refine always takes the SDPA composite."""
    def force():
        monkeypatch.setattr(module_mod, "REFINE_FUSED_MAX_TOKENS", 0)
    return force


# (B, C, heads, H, W, qkv_bias)
REFINE_CASES = [
    pytest.param(2, 16, 2, 7, 7, True, id="B2-C16-h2-N49"),
    pytest.param(3, 12, 3, 2, 3, False, id="B3-C12-h3-N6-nobias"),
    pytest.param(1, 8, 1, 1, 1, True, id="B1-C8-h1-N1"),
    pytest.param(2, 32, 4, 16, 16, True, id="B2-C32-h4-N256"),
]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C,heads,H,W,bias", REFINE_CASES)
def test_written_out_refine_matches_sdpa(device, dtype, B, C, heads, H, W, bias, sdpa_refine):
    torch.manual_seed(seed_for("refine-written-out", B, C, heads, H, W, bias, dtype))
    m = sk.RefineAttention(C, num_heads=heads, qkv_bias=bias).to(device, dtype)
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)
    g = torch.randn(B, C, H, W, device=device, dtype=dtype)
    y, grads, fn = _grads(m, x, g)
    assert type(fn).__name__ == "RefineBackward"
    with torch.no_grad():
        y_nograd = m(x)
    sdpa_refine()
    y_ref, grads_ref, fn_ref = _grads(m, x, g)
    assert type(fn_ref).__name__ != "RefineBackward"
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(y_nograd, y_ref, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("heads,bias", [(1, True), (2, False)])
def test_refine_gradcheck(heads, bias):
    torch.manual_seed(seed_for("refine-gradcheck", heads, bias))
    C = 4
    m = sk.RefineAttention(C, num_heads=heads, qkv_bias=bias).double()
    x = torch.randn(2, C, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias]

    def f(x, *p):
        return _library.Refine.apply(x, *p, heads, 0.7)

    torch.autograd.gradcheck(f, (x, *params))


#: The autograd node of stvit::sta (csrc/ops.cpp: a torch::autograd::Function in C++).
STA_NODE = "CppNode<stvit::SuperTokenStep>"

# (B, C, heads, H, W, stoken_size, n_iter)
STEP_CASES = [
    pytest.param(2, 16, 1, 16, 16, (8, 8), 1, id="B2-C16-16x16-s8"),
    pytest.param(2, 12, 3, 13, 21, (4, 5), 2, id="B2-C12-h3-13x21-s4x5-pad-it2"),
    pytest.param(1, 8, 2, 5, 3, (8, 8), 1, id="B1-C8-5x3-smaller-than-one-stoken"),
    pytest.param(3, 16, 2, 28, 28, (4, 4), 3, id="B3-C16-28x28-s4-it3"),
]


def _step_backends():
    """(device, backend) of the one-node paths: the compiled family's C++ step on each device, the
    Triton family's composed one (on a GPU, or the interpreter)."""
    out = [pytest.param(device, "auto", id=device) for device in ("cpu", "cuda")
           if device in sk.available_backends()]
    if "triton" in sk.available_backends():
        out.append(pytest.param(device_for("triton"), "triton", id="triton"))
    return out


@pytest.mark.parametrize("device,backend", _step_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C,heads,H,W,size,n_iter", STEP_CASES)
def test_module_one_step_matches_per_piece(device, backend, dtype, B, C, heads, H, W, size, n_iter,
                                           monkeypatch):
    torch.manual_seed(seed_for("one-step", B, C, heads, H, W, size, n_iter, dtype))
    m = sk.SuperTokenAttention(C, size, n_iter=n_iter, num_heads=heads, qkv_bias=True,
                               backend=backend)
    m = m.to(device, dtype)
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)
    g = torch.randn(B, C, H, W, device=device, dtype=dtype)
    y, grads, fn = _grads(m, x, g)
    nodes = autograd_node_names(fn)
    node = "FamilyStepBackward" if backend == "triton" else STA_NODE
    assert node in nodes and "UpsampleBackward" not in nodes, nodes
    with torch.no_grad():
        y_nograd = m(x)
    if backend == "triton":
        monkeypatch.setattr(TritonBackend, "composed_step", False)
    else:
        monkeypatch.setattr(CompiledBackend, "one_step", False)
    y_ref, grads_ref, _ = _grads(m, x, g)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(y_nograd, y_ref, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("step", ["compiled", "triton"])
def test_one_step_gradcheck(step):
    if step == "triton" and "triton" not in sk.available_backends():
        pytest.skip("the triton backend is not available")
    device = device_for("triton") if step == "triton" else "cpu"
    torch.manual_seed(seed_for("one-step-gradcheck"))
    C, heads, h, w = 4, 2, 2, 3
    m = sk.SuperTokenAttention(C, (h, w), n_iter=2, num_heads=heads, qkv_bias=True).double()
    r = m.stoken_refine.to(device)
    x = torch.randn(1, C, 4, 6, dtype=torch.float64, device=device)
    params = [r.qkv.weight, r.qkv.bias, r.proj.weight, r.proj.bias]

    # the parameters' gradients are true gradients; x's is the module's (A and den constants,
    # as in the official model), checked against the per-piece path above
    def f(*p):
        if step == "triton":
            return _library.FamilyStep.apply("triton", x, *p, h, w, m.scale, 2, heads, r.scale)
        return torch.ops.stvit.sta(x, *p, h, w, m.scale, 2, heads, r.scale)

    torch.autograd.gradcheck(f, params)


def _grad_fn_names(m, x):
    return autograd_node_names(m(x.requires_grad_()).grad_fn)


def test_which_path_runs(monkeypatch):
    x = torch.randn(1, 8, 16, 16)
    one = STA_NODE
    assert one in _grad_fn_names(sk.SuperTokenAttention(8, 8, num_heads=2), x.clone())
    # another backend, the conv refine, no refine, dropout in training: the per-piece path
    assert one not in _grad_fn_names(sk.SuperTokenAttention(8, 8, num_heads=2, backend="reference"),
                                     x.clone())
    assert one not in _grad_fn_names(sk.SuperTokenAttention(8, 8, refine_attention=False), x.clone())
    assert one not in _grad_fn_names(sk.SuperTokenAttention(8, 8, refine=False), x.clone())
    drop = sk.SuperTokenAttention(8, 8, num_heads=2, attn_drop=0.1)
    assert one not in _grad_fn_names(drop, x.clone())
    if "triton" in sk.available_backends():  # its step composed in Python, autocast included
        xt = x.to(device_for("triton"))
        tm = sk.SuperTokenAttention(8, 8, num_heads=2, backend="triton").to(xt.device)
        assert "FamilyStepBackward" in _grad_fn_names(tm, xt.clone())
        tdrop = sk.SuperTokenAttention(8, 8, num_heads=2, attn_drop=0.1, backend="triton")
        with torch.autocast(xt.device.type, dtype=torch.bfloat16):
            assert "FamilyStepBackward" in _grad_fn_names(tm, xt.clone())
            # dropout in training: the per-piece path (which ends in the upsampling's node;
            # torch 2.11 walks no further)
            names = _grad_fn_names(tdrop.to(xt.device), xt.clone())
        assert "FamilyStepBackward" not in names and "UpsampleBackward" in names
    assert one in _grad_fn_names(drop.eval(), x.clone())
    # more super tokens than REFINE_FUSED_MAX_TOKENS: SDPA
    monkeypatch.setattr(module_mod, "REFINE_FUSED_MAX_TOKENS", 3)
    assert one not in _grad_fn_names(sk.SuperTokenAttention(8, 8, num_heads=2), x.clone())
    assert one in _grad_fn_names(sk.SuperTokenAttention(8, 8, num_heads=2), x[..., :8, :8].clone())


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,heads", [(2, 2), (2, 1), (1, 2)], ids=["B2-h2", "B2-h1", "B1-h2"])
def test_opcheck_step_and_refine_ops(device, dtype, B, heads):
    """Also the fakes' strides: one head (or B=1) saves q, k, v as views, not a copy."""
    torch.manual_seed(seed_for("opcheck-step", dtype, B, heads))
    C, h, w = 6, 2, 3
    m = sk.SuperTokenAttention(C, (h, w), num_heads=heads, qkv_bias=True).to(device, dtype)
    r = m.stoken_refine
    x = torch.randn(B, C, 4, 9, device=device, dtype=dtype)
    W = (r.qkv.weight.detach(), r.qkv.bias.detach(), r.proj.weight.detach(), r.proj.bias.detach())
    ops = torch.ops.stvit
    y, A, den, s, qkvh, attn, o = ops.sta_forward(x, *W, h, w, m.scale, 2, heads, r.scale)
    g = torch.randn_like(y)
    samples = [
        (ops.sta_forward.default, (x, *W, h, w, m.scale, 2, heads, r.scale)),
        (ops.sta_forward.default, (x, W[0], None, W[2], None, h, w, m.scale, 1, heads, r.scale)),
        (ops.sta.default, (x, *W, h, w, m.scale, 2, heads, r.scale)),
        (ops.sta.default, (x.clone().requires_grad_(), *(t.clone().requires_grad_() for t in W), h,
                           w, m.scale, 2, heads, r.scale)),
        (ops.sta_backward.default, (g, A, den, s, qkvh, attn, o, W[0], W[2], h, w, heads, r.scale)),
        (ops.refine_attention_forward.default, (s, *W, heads, r.scale)),
        (ops.refine_attention_backward.default,
         (torch.randn_like(s), s, qkvh, attn, o, W[0], W[2], heads, r.scale)),
    ]
    if dtype == torch.float32:
        # under autocast: the inputs cast inside (dtype argument), the backward on the uncast
        # weights (and for the refine the uncast s)
        bf = torch.bfloat16
        y, A, den, s, qkvh, attn, o = ops.sta_forward(x, *W, h, w, m.scale, 2, heads, r.scale, bf)
        _, rq, ra, ro = ops.refine_attention_forward(s.float(), *W, heads, r.scale, bf)
        samples += [
            (ops.sta_forward.default, (x, *W, h, w, m.scale, 2, heads, r.scale, bf)),
            (ops.sta.default, (x, *W, h, w, m.scale, 1, heads, r.scale, bf)),
            (ops.sta_backward.default, (torch.randn_like(y), A, den, s, qkvh, attn, o, W[0], W[2],
                                        h, w, heads, r.scale)),
            (ops.sta_backward.default, (torch.randn_like(y), A, den, s, qkvh, attn, o, W[0], W[2],
                                        h, w, heads, r.scale, torch.float32)),
            (ops.refine_attention_forward.default, (s.float(), *W, heads, r.scale, bf)),
            (ops.refine_attention_backward.default,
             (torch.randn_like(s), s.float(), rq, ra, ro, W[0], W[2], heads, r.scale)),
        ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_fake_sta_forward_lays_out_the_super_tokens_as_each_device_does():
    """sta_forward's super tokens: contiguous from the CPU kernels, token-major (channels_last
    strides, what the refine's products read without a copy) from the CUDA ones; the fake says
    which, so torch.compile's stride checks hold (the real CUDA layout against this fake:
    test_opcheck_step_and_refine_ops on a GPU). Fake CUDA tensors need no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for dev in ("cpu", "cuda"):
            x = torch.empty(2, 6, 4, 9, device=dev)
            wq, bq = torch.empty(18, 6, 1, 1, device=dev), torch.empty(18, device=dev)
            wp, bp = torch.empty(6, 6, 1, 1, device=dev), torch.empty(6, device=dev)
            y, A, den, s, qkvh, attn, o = torch.ops.stvit.sta_forward(
                x, wq, bq, wp, bp, 2, 3, 0.4, 1, 2, 0.5)
            assert s.shape == (2, 6, 2, 3) and y.shape == x.shape
            assert s.is_contiguous() == (dev == "cpu"), (dev, s.stride())
            assert s.permute(0, 2, 3, 1).is_contiguous() == (dev == "cuda"), (dev, s.stride())


def test_half_inputs_keep_the_attention_core_in_float32():
    """bfloat16 in, the softmax saved for the backward in float32, and the result as close to a
    float64 truth as the SDPA composite's in bfloat16."""
    torch.manual_seed(seed_for("refine-bf16"))
    C, heads = 32, 2
    m64 = sk.RefineAttention(C, num_heads=heads, qkv_bias=True).double()
    x64 = torch.randn(2, C, 7, 7, dtype=torch.float64)
    m16 = sk.RefineAttention(C, num_heads=heads, qkv_bias=True).to(torch.bfloat16)
    m16.load_state_dict(m64.state_dict())
    x16 = x64.to(torch.bfloat16).requires_grad_()
    ops = torch.ops.stvit
    _, qkvh, attn, _ = ops.refine_attention_forward(
        x16.detach(), m16.qkv.weight, m16.qkv.bias, m16.proj.weight, m16.proj.bias, heads, m16.scale)
    assert qkvh.dtype == attn.dtype == torch.float32
    with torch.no_grad():
        truth = m64(x64)
        ours = m16(x16.detach()).double()
        sdpa = m16._forward_python(x16.detach(), 0.0).double()
    assert (ours - truth).abs().max() <= 2 * (sdpa - truth).abs().max() + 1e-3


def _aten_calls(fn, names) -> int:
    """Calls of the ATen ops ``names`` that ``fn`` makes, by the profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in names)


def _copies(fn) -> int:
    """aten::copy_ calls (the relayouts and casts) that ``fn`` makes."""
    return _aten_calls(fn, ("aten::copy_",))


@contextlib.contextmanager
def cpu_refine_limit(limit):
    """Within: the CPU refine kernel takes calls of up to ``limit`` multiply-adds (0: none, ATen's
    matrix products always; None: the default limit)."""
    from stvit_kernels import _C
    if limit is None:
        yield
        return
    previous = _C._set_refine_cpu_limit(limit)
    try:
        yield
    finally:
        _C._set_refine_cpu_limit(previous)


@contextlib.contextmanager
def cpu_isa(name):
    from stvit_kernels import _C
    previous = _C.cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)


_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")

# (B, C, heads, H, W, qkv_bias): one token; 4 (the proxy's grid, a 2x4 tile exactly); odd counts
# (edge tiles, the softmax's scalar tail); head sizes of no whole vector (d = 3, 4, 10: the dot
# products' tails, and none of the vector loop at all); 49 (STViT's grid at 224^2); 256 (the
# written-out refine's most).
KERNEL_CASES = [
    pytest.param(1, 64, 1, 2, 2, True, id="B1-C64-h1-N4"),
    pytest.param(1, 8, 1, 1, 1, True, id="B1-C8-h1-N1"),
    pytest.param(3, 12, 3, 1, 5, False, id="B3-C12-h3-N5-d4-nobias"),
    pytest.param(2, 20, 2, 3, 3, True, id="B2-C20-h2-N9-d10"),
    pytest.param(2, 6, 2, 7, 1, True, id="B2-C6-h2-N7-d3"),
    pytest.param(2, 64, 1, 7, 7, True, id="B2-C64-h1-N49"),
    pytest.param(1, 40, 5, 7, 7, False, id="B1-C40-h5-N49-d8"),
    pytest.param(1, 16, 2, 16, 16, True, id="B1-C16-h2-N256"),
]


@pytest.mark.parametrize("isa", ["auto", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C,heads,H,W,bias", KERNEL_CASES)
def test_cpu_refine_kernel_matches_aten(B, C, heads, H, W, bias, dtype, isa, poison_outputs):
    """The CPU refine kernels (forward and backward) against the ATen matrix products they
    replace: every output, in the same layout, with no matrix product run; and bitwise the same
    on 1 and 2 threads (an item is one thread's, in a fixed order). Outputs start as NaN
    (poison), so one left unwritten fails. Float64 agrees to 1e-12; in float32 the two sum in
    other orders (a weight gradient sums B * N products), so there the accuracy rule of
    test_autocast.py holds: against a float64 truth, the kernel's error is at most 2x (3x for
    gradients) ATen's, or one rounding."""
    torch.manual_seed(seed_for("refine-kernel", B, C, heads, H, W, bias, dtype))
    s = torch.randn(B, C, H, W, dtype=dtype)
    wq = torch.randn(3 * C, C, 1, 1, dtype=dtype) * C ** -0.5
    wp = torch.randn(C, C, 1, 1, dtype=dtype) * C ** -0.5
    bq, bp = (torch.randn(3 * C, dtype=dtype), torch.randn(C, dtype=dtype)) if bias else [None] * 2
    g = torch.randn(B, C, H, W, dtype=dtype)
    ops = torch.ops.stvit

    def run(dt=dtype):
        s_, wq_, bq_, wp_, bp_, g_ = (None if t is None else t.to(dt)
                                      for t in (s, wq, bq, wp, bp, g))
        scale = (C // heads) ** -0.5
        out, qkvh, attn, o = ops.refine_attention_forward(s_, wq_, bq_, wp_, bp_, heads, scale)
        grads = ops.refine_attention_backward(g_, s_, qkvh, attn, o, wq_, wp_, heads, scale)
        return (out, qkvh, attn, o) + tuple(grads)

    with cpu_refine_limit(0):
        want = run()
        truth = run(torch.float64) if dtype == torch.float32 else want  # the rule's truth
        assert _aten_calls(run, _MATMULS) > 0
    threads = torch.get_num_threads()
    with cpu_refine_limit(1 << 40), cpu_isa(isa):
        assert _aten_calls(run, _MATMULS) == 0
        try:
            torch.set_num_threads(1)
            one = run()
            torch.set_num_threads(2)
            two = run()
        finally:
            torch.set_num_threads(threads)
    names = ("out", "qkvh", "attn", "o", "ds", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b")
    for i, (name, a, b, w, t) in enumerate(zip(names, one, two, want, truth)):
        assert a.stride() == w.stride(), name
        assert torch.equal(a, b), name
        if dtype == torch.float64:
            torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
        else:
            err, err_aten = rel_error(a, t), rel_error(w, t)
            assert err <= (2 if i < 4 else 3) * max(err_aten, 2.0 ** -24), (name, err, err_aten)


def test_cpu_refine_kernel_takes_small_full_precision_calls_only():
    """Float and double within the limit; beyond it, the half types and non-contiguous inputs
    go to ATen's matrix products."""
    C = 8
    op = torch.ops.stvit.refine_attention_forward

    def matmuls(dtype, s=None):
        s = torch.randn(2, C, 2, 2, dtype=dtype) if s is None else s
        wq, wp = torch.randn(3 * C, C, 1, 1, dtype=dtype), torch.randn(C, C, 1, 1, dtype=dtype)
        return _aten_calls(lambda: op(s, wq, None, wp, None, 2, 0.5), _MATMULS)

    work = 2 * 4 * C * (4 * C + 2 * 4)  # B N C (4 C + 2 N)
    assert matmuls(torch.float32) == matmuls(torch.float64) == 0
    assert matmuls(torch.bfloat16) > 0 and matmuls(torch.float16) > 0
    assert matmuls(torch.float32, torch.randn(2, 2, 2, C).permute(0, 3, 1, 2)) > 0
    with cpu_refine_limit(work):
        assert matmuls(torch.float32) == 0
    with cpu_refine_limit(work - 1):
        assert matmuls(torch.float32) > 0
    with refine_kernels(False):  # the switch of every refine kernel
        assert matmuls(torch.float32) > 0


@pytest.mark.parametrize("env,initially", [(None, True), ("1", True), ("0", False)])
def test_refine_kernels_switch_starts_from_the_environment(env, initially):
    """STVIT_REFINE_KERNELS=0 starts a process with the refine kernels off (an A/B of whole
    processes, benchmarks/gpu_check.sh); unset or anything else, on."""
    import os
    import subprocess
    import sys
    environ = {k: v for k, v in os.environ.items() if k != "STVIT_REFINE_KERNELS"}
    if env is not None:
        environ["STVIT_REFINE_KERNELS"] = env
    code = "from stvit_kernels import _C; print(_C._set_refine_kernels_enabled(True))"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == str(initially)


@pytest.mark.parametrize("kernel", [False, True], ids=["aten", "cpu-kernel"])
@pytest.mark.parametrize("heads,dtype,fwd_copies,bwd_copies", [
    pytest.param(1, torch.float32, 1, 0, id="1head-f32"),
    pytest.param(1, torch.float64, 1, 0, id="1head-f64"),
    pytest.param(2, torch.float32, 2, 0, id="2heads-f32"),
    pytest.param(1, torch.bfloat16, 3, 2, id="1head-bf16"),
])
def test_refine_copies_only_where_the_layout_needs_one(heads, dtype, fwd_copies, bwd_copies,
                                                       kernel):
    """B=1 (the token-major input is a view then). Without a cast, q, k, v are views of the qkv
    product, and with one head the attention output is the bmm's own. The forward's one copy is
    then the proj bias that addmm broadcasts into its output. Several heads also copy the
    head-interleaved attention output. A cast (half inputs, float32 core) copies q, k, v and the
    output one way and the two gradients the other way. The CPU kernel (float, double) writes
    every output in place: no copy."""
    torch.manual_seed(seed_for("refine-copies", heads, dtype))
    C = 16
    m = sk.RefineAttention(C, num_heads=heads).to(dtype)  # no qkv bias, as the official default
    W = (m.qkv.weight.detach(), None, m.proj.weight.detach(), m.proj.bias.detach())
    s = torch.randn(1, C, 3, 3, dtype=dtype)
    ops = torch.ops.stvit
    if kernel and dtype in (torch.float32, torch.float64):
        fwd_copies = 0
    with cpu_refine_limit(None if kernel else 0):
        out, qkvh, attn, o = ops.refine_attention_forward(s, *W, heads, m.scale)
        assert _copies(lambda: ops.refine_attention_forward(s, *W, heads, m.scale)) == fwd_copies
    g = torch.randn_like(out)
    assert _copies(lambda: ops.refine_attention_backward(
        g, s, qkvh, attn, o, W[0], W[2], heads, m.scale)) == bwd_copies


@contextlib.contextmanager
def refine_kernels(enabled):
    """Within: the refine kernels (CPU and CUDA) may take calls (or, off, never do)."""
    from stvit_kernels import _C
    previous = _C._set_refine_kernels_enabled(enabled)
    try:
        yield
    finally:
        _C._set_refine_kernels_enabled(previous)


@contextlib.contextmanager
def nan_empty():
    """Within: every fresh tensor ATen allocates (the kernels' outputs among them) starts as NaN,
    on any device, so an element a kernel leaves unwritten shows."""
    import torch.utils.deterministic as det
    was_det, was_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


def _cuda_kernels_run(fn):
    """Names of the CUDA kernels that ``fn`` launches, by the profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


_EPS = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in sk.available_backends(), reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,C,heads,H,W,bias", KERNEL_CASES + [
    pytest.param(2, 320, 5, 2, 2, True, id="B2-C320-h5-N4")])
def test_cuda_refine_kernels_match_aten(B, C, heads, H, W, bias, dtype):
    """The CUDA refine kernels (the attention core of the forward, between two batched BLAS
    products, and of the backward) against the ATen operators they replace, every output of
    refine_attention_forward / _backward, with fresh outputs NaN-filled. Float64 agrees to 1e-10;
    elsewhere the accuracy rule of test_autocast.py: against a float64 truth, the kernels' error
    is at most 2x (3x for gradients) ATen's, or one rounding of the dtype. The kernels take every
    case whose (image, head) block fits in the H100 / H200's 227 KB of shared memory: all but
    N = 256, which must stay on ATen's path (C = 320, 5 heads: d = 64, both kernels)."""
    torch.manual_seed(seed_for("cuda-refine-kernel", B, C, heads, H, W, bias, dtype))
    dev = "cuda"
    s = torch.randn(B, C, H, W, dtype=torch.float64)
    wq = torch.randn(3 * C, C, 1, 1, dtype=torch.float64) * C ** -0.5
    wp = torch.randn(C, C, 1, 1, dtype=torch.float64) * C ** -0.5
    bq, bp = (torch.randn(3 * C, dtype=torch.float64),
              torch.randn(C, dtype=torch.float64)) if bias else [None] * 2
    g = torch.randn(B, C, H, W, dtype=torch.float64)
    ops = torch.ops.stvit
    scale = (C // heads) ** -0.5

    def run(dt=dtype):
        s_, wq_, bq_, wp_, bp_, g_ = (None if t is None else t.to(dev, dt)
                                      for t in (s, wq, bq, wp, bp, g))
        out, qkvh, attn, o = ops.refine_attention_forward(s_, wq_, bq_, wp_, bp_, heads, scale)
        grads = ops.refine_attention_backward(g_, s_, qkvh, attn, o, wq_, wp_, heads, scale)
        return (out, qkvh, attn, o) + tuple(grads)

    with refine_kernels(False), nan_empty():
        want = run()
        truth = run(torch.float64)
    fits = H * W <= 100
    with refine_kernels(True), nan_empty():
        names = _cuda_kernels_run(run)
        got = run()
    assert any("refine_core_forward_kernel" in n for n in names) == fits, sorted(names)
    assert any("refine_core_backward_kernel" in n for n in names) == fits, sorted(names)
    labels = ("out", "qkvh", "attn", "o", "ds", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b")
    for i, (name, a, w, t) in enumerate(zip(labels, got, want, truth)):
        assert a.shape == w.shape and a.dtype == w.dtype and a.stride() == w.stride(), name
        assert not a.isnan().any(), name
        if dtype == torch.float64:
            torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
        else:
            eps = _EPS[torch.float32 if i in (1, 2) else dtype]  # qkvh, attn: float32 for all
            err, err_aten = rel_error(a, t), rel_error(w, t)
            assert err <= (2 if i < 4 else 3) * max(err_aten, eps), (name, err, err_aten)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_sta_backward_runs_no_aten_op_between_its_kernels(dtype):
    """The CPU backward step's last kernel, upsample(g / (den + 1e-12), A), reads the refine
    kernel's token-major gradient in place and divides as it stages it: no aten::add, div or
    copy_ on the way (before 2026-12-08 an add, a division and a relayout copy preceded it). The
    values: test_associate_backward_any_layout_of_g (token-major g) and the step's gradchecks."""
    torch.manual_seed(seed_for("cpu-step-ops", dtype))
    C, h, w, heads = 16, 4, 4, 2
    m = sk.SuperTokenAttention(C, (h, w), num_heads=heads, qkv_bias=True).to(dtype)
    r = m.stoken_refine
    W = (r.qkv.weight.detach(), r.qkv.bias.detach(), r.proj.weight.detach(), r.proj.bias.detach())
    x = torch.randn(2, C, 12, 16, dtype=dtype)
    ops = torch.ops.stvit
    y, A, den, s, qkvh, attn, o = ops.sta_forward(x, *W, h, w, m.scale, 1, heads, r.scale)
    g = torch.randn_like(y)
    calls = _aten_calls(lambda: ops.sta_backward(g, A, den, s, qkvh, attn, o, W[0], W[2], h, w,
                                                 heads, r.scale),
                        ("aten::add", "aten::div", "aten::copy_", "aten::contiguous"))
    assert calls == 0


@pytest.mark.cuda
@pytest.mark.parametrize("heads", [1, 2])
def test_cuda_sta_step_copies_nothing(heads):
    """The CUDA module step in float32 relays out nothing: the super tokens come out of the
    reduction token-major (sta_forward) and so does the aggregated gradient of the refine output
    (sta_backward), the layouts the refine's products read as they are; before, each backward
    copied both to token-major ([B * N, C]) first."""
    torch.manual_seed(seed_for("cuda-step-copies", heads))
    C, h, w = 16, 4, 4
    m = sk.SuperTokenAttention(C, (h, w), num_heads=heads, qkv_bias=True).cuda()
    r = m.stoken_refine
    W = (r.qkv.weight.detach(), r.qkv.bias.detach(), r.proj.weight.detach(), r.proj.bias.detach())
    x = torch.randn(2, C, 12, 16, device="cuda")
    ops = torch.ops.stvit

    def fwd():
        return ops.sta_forward(x, *W, h, w, m.scale, 1, heads, r.scale)

    y, A, den, s, qkvh, attn, o = fwd()
    assert s.permute(0, 2, 3, 1).is_contiguous(), s.stride()
    g = torch.randn_like(y)

    def bwd():
        return ops.sta_backward(g, A, den, s, qkvh, attn, o, W[0], W[2], h, w, heads, r.scale)

    assert _copies(fwd) == 0
    assert _copies(bwd) == 0
    # and the results: the step against the module in float64 on the CPU, the gradients of x and
    # of the four refine parameters (the bias gradients: row_sums_cuda's matrix-vector products)
    m64 = copy.deepcopy(m).double().cpu()
    x64 = x.double().cpu().requires_grad_()
    y64 = m64(x64)
    r64 = m64.stoken_refine
    want = torch.autograd.grad(y64, (x64, r64.qkv.weight, r64.qkv.bias, r64.proj.weight,
                                     r64.proj.bias), g.double().cpu())
    torch.testing.assert_close(y.double().cpu(), y64, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"), bwd(), want):
        torch.testing.assert_close(a.double().cpu().view(b.shape), b, rtol=1e-4, atol=1e-4,
                                   msg=lambda e, name=name: f"{name}: {e}")
