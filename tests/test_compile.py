"""torch.library registration and torch.compile.

* ``torch.library.opcheck`` on every raw operator of every kernel family that can run here
  (schema, fake implementation vs real outputs, AOT dispatch with static and dynamic shapes). The
  raw operators are not differentiable (the autograd Functions of ``stvit_kernels._library`` are):
  they are checked without gradients;
* ``torch.compile(fullgraph=True)`` of ``SuperTokenAttention`` (every backend) and ``stvit_small``:
  no graph break, no recompilation on a second call of the same shape, the same forward and
  backward results as eager.
"""
from __future__ import annotations

import pytest
import torch

import stvit
import stvit_kernels as sk
from stvit_kernels import _library

from .utils import TOL, device_for, make_inputs, seed_for


def _families():
    """(kernel family, device) for each family that can run here."""
    out = []
    if "cpu" in sk.available_backends():
        out.append(pytest.param(lambda: _library.compiled_kernels(), "cpu", id="stvit-cpu"))
    if "cuda" in sk.available_backends():
        out.append(pytest.param(lambda: _library.compiled_kernels(), "cuda", id="stvit-cuda",
                                marks=pytest.mark.cuda))
    if "triton" in sk.available_backends():
        out.append(pytest.param(lambda: _library.TRITON, device_for("triton"), id="triton"))
    return out


# (B, C, H, W, h, w, dtype)
OPCHECK_CASES = [
    pytest.param(2, 5, 4, 6, 2, 3, torch.float64, id="B2-C5-4x6-s2x3-f64"),
    pytest.param(1, 3, 8, 8, 8, 8, torch.float32, id="B1-C3-8x8-s8-grid1-f32"),
]


@pytest.mark.parametrize("family,device", _families())
@pytest.mark.parametrize("B,C,H,W,h,w,dtype", OPCHECK_CASES)
def test_opcheck(family, device, B, C, H, W, h, w, dtype):
    K = family()
    t = make_inputs(B, C, H, W, h, w, dtype=dtype, device=device,
                    seed=seed_for("opcheck", B, C, H, W, dtype))
    x, s, A, gnum = t["x"], t["s"], t["A"], t["gnum"]
    den = t["gden"].abs()
    scale = C ** -0.5
    samples = {
        "affinity": [(x, s, h, w, scale, True), (x, s, h, w, scale, False)],
        "aggregate": [(x, A, h, w)],
        "upsample": [(s, A, h, w)],
        "affinity_aggregate": [(x, s, h, w, scale)],
        "pool": [(x, h, w)],
        "associate": [(x, s, h, w, scale, 1), (x, None, h, w, scale, 2)],
        "associate_backward": [(gnum, A, den, h, w)],
    }
    assert set(samples) == set(_library.Kernels._fields[1:])
    for name, args_list in samples.items():
        op = getattr(K, name)
        if not isinstance(op, torch._ops.OpOverload):  # a Python composite of the family's ops
            continue
        for args in args_list:
            torch.library.opcheck(op, args)


def _module_case(backend, n_iter=2):
    torch.manual_seed(seed_for("compile-module", backend))
    dev = device_for(backend)
    m = sk.SuperTokenAttention(16, (4, 3), n_iter=n_iter, num_heads=2, backend=backend).to(dev)
    # 14x17 is padded to 16x18 inside: the pad / crop are traced too
    return m, [torch.randn(2, 16, 14, 17, device=dev, requires_grad=True) for _ in range(2)]


def _fwd_bwd(fn, x, g):
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y, gx


def _check_compiled_matches_eager(module, inputs, compiled, tol):
    g = torch.randn(inputs[0].shape, device=inputs[0].device)
    with torch._dynamo.config.patch(error_on_recompile=False):
        y, gx = _fwd_bwd(compiled, inputs[0], g)
    # the second call of the same shape must reuse the graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        y2, gx2 = _fwd_bwd(compiled, inputs[1], g)
    for x, yc, gc in ((inputs[0], y, gx), (inputs[1], y2, gx2)):
        ye, gxe = _fwd_bwd(module, x, g)
        torch.testing.assert_close(yc, ye, **tol)
        torch.testing.assert_close(gc, gxe, **tol)


@pytest.mark.parametrize("backend", sk.available_backends())
def test_compile_module_fullgraph(backend):
    """Dynamo captures the module in one graph with every backend (AOTAutograd traces the
    backward through the autograd Functions and the raw operators' fake implementations)."""
    torch._dynamo.reset()
    module, inputs = _module_case(backend)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    _check_compiled_matches_eager(module, inputs, compiled, TOL[torch.float32])


@pytest.mark.parametrize("backend", sk.available_backends())
def test_compile_module_autocast(backend):
    """The same under bfloat16 autocast (the one-call operators' and the refine's ``dtype``
    argument traced as a constant): one graph, no recompilation, the eager results."""
    torch._dynamo.reset()
    module, inputs = _module_case(backend)
    device_type = inputs[0].device.type

    def run(x):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return module(x)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    _check_compiled_matches_eager(run, inputs, compiled, TOL[torch.bfloat16])


def test_compile_module_inductor():
    """The default compiler (inductor) on the default backend choice."""
    torch._dynamo.reset()
    module, inputs = _module_case(None)
    compiled = torch.compile(module, fullgraph=True)
    _check_compiled_matches_eager(module, inputs, compiled, dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("backend", sk.available_backends())
def test_compile_ops_fullgraph(backend):
    """The three public ops composed by hand, full backward, under torch.compile."""
    torch._dynamo.reset()
    t = make_inputs(2, 6, 9, 10, 3, 5, device=device_for(backend), seed=seed_for("compile-ops", backend))
    x, s = t["x"].requires_grad_(), t["s"].requires_grad_()

    def fn(x, s):
        A = sk.stoken_affinity(x, s, (3, 5), backend=backend)
        num, den = sk.stoken_aggregate(x, A, (3, 5), backend=backend)
        y = sk.stoken_upsample(num / (den + 1e-12), A, (3, 5), backend=backend)
        return y

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y, ye = compiled(x, s), fn(x, s)
    torch.testing.assert_close(y, ye, **TOL[torch.float32])
    grads = torch.autograd.grad(y, (x, s), t["gy"])
    grads_e = torch.autograd.grad(ye, (x, s), t["gy"])
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_compile_stvit_small_train_step(device):
    """stvit_small, training mode, forward + backward in one captured graph, the same outputs and
    parameter gradients as eager; no recompilation on the second step."""
    torch._dynamo.reset()
    torch.manual_seed(seed_for("compile-stvit-small"))
    model = stvit.stvit_small(num_classes=10, drop_path_rate=0.0).to(device).train()  # deterministic
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64, device=device)

    def step(fn):
        model.zero_grad()
        out = fn(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_c, grads_c = step(compiled)
    out_e, grads_e = step(model)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) > 100
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(compiled)
