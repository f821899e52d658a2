"""Mixed precision: the ops and the module under ``torch.autocast``, and low-precision inputs.

Accuracy rule (issue 5): against a float64 truth, a fused backend's error is at most 2x (3x for
gradients) the error the reference backend makes in the same precision. Errors are relative L2
norms over the whole tensor.
"""
from __future__ import annotations

import pytest
import torch

import stvit_kernels as sk
from stvit_kernels.backends import resolve

from .utils import autograd_node_names, device_for, make_inputs, rel_error, seed_for

FUSED = [b for b in sk.available_backends() if b != "reference"]


def _device_types():
    out = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
    if torch.cuda.is_available():
        out += [pytest.param("cuda", torch.float16, id="cuda-f16", marks=pytest.mark.cuda),
                pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda)]
    return out


def _backends_for(device_type):
    return [b for b in FUSED if device_for(b) == device_type]


def _module_run(device, dtype, backend, x64, g64, params, autocast):
    """Output and input gradient of the module with the given state; ``autocast``: run under
    torch.autocast(dtype) from float32 inputs, else in float64 (the truth)."""
    m = sk.SuperTokenAttention(32, 8, n_iter=2, num_heads=2, backend=backend).to(device)
    m.load_state_dict(params)
    if autocast:
        x = x64.float().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            y = m(x)
        assert y.dtype == dtype
    else:
        m = m.double()
        x = x64.clone().requires_grad_()
        y = m(x)
    (gx,) = torch.autograd.grad(y, x, g64.to(y.dtype))
    return y.detach(), gx


@pytest.mark.parametrize("device,dtype", _device_types())
def test_module_autocast_accuracy(device, dtype):
    backends = _backends_for(device)
    if not backends:
        pytest.skip("no fused backend for this device")
    torch.manual_seed(seed_for("autocast-module", device, dtype))
    params = sk.SuperTokenAttention(32, 8, n_iter=2, num_heads=2).state_dict()
    # 30x21: padded to 32x24 inside
    x64 = torch.randn(2, 32, 30, 21, dtype=torch.float64, device=device)
    g64 = torch.randn(2, 32, 30, 21, dtype=torch.float64, device=device)
    y_true, gx_true = _module_run(device, dtype, "reference", x64, g64, params, autocast=False)
    y_ref, gx_ref = _module_run(device, dtype, "reference", x64, g64, params, autocast=True)
    err_ref = rel_error(y_ref, y_true), rel_error(gx_ref, gx_true)
    assert err_ref[0] < 0.05 and err_ref[1] < 0.05, err_ref  # the reference itself is sane
    for backend in backends:
        y, gx = _module_run(device, dtype, backend, x64, g64, params, autocast=True)
        err = rel_error(y, y_true), rel_error(gx, gx_true)
        assert err[0] <= 2 * err_ref[0], (backend, err, err_ref)
        assert err[1] <= 3 * err_ref[1], (backend, err, err_ref)


@pytest.mark.parametrize("device,dtype", _device_types())
def test_ops_autocast_accuracy(device, dtype):
    """Each op under autocast from float32 inputs: the outputs come in the autocast dtype and the
    accuracy rule holds for outputs and input gradients."""
    backends = _backends_for(device)
    if not backends:
        pytest.skip("no fused backend for this device")
    t = make_inputs(2, 24, 16, 24, 8, 8, dtype=torch.float64, device=device,
                    seed=seed_for("autocast-ops", device, dtype))
    cases = {
        "affinity": (lambda x, s, A, b: (sk.stoken_affinity(x, s, 8, backend=b),), ("x", "s")),
        "aggregate": (lambda x, s, A, b: sk.stoken_aggregate(x, A, 8, backend=b), ("x", "A")),
        "upsample": (lambda x, s, A, b: (sk.stoken_upsample(s, A, 8, backend=b),), ("s", "A")),
    }
    for name, (fn, wrt) in cases.items():
        def run(backend, autocast):
            ins = {k: (t[k].float() if autocast else t[k].clone()).requires_grad_() for k in ("x", "s", "A")}
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                outs = fn(ins["x"], ins["s"], ins["A"], backend)
            if autocast:
                assert all(o.dtype == dtype for o in outs), (name, [o.dtype for o in outs])
            seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                     .to(device=device, dtype=o.dtype) for i, o in enumerate(outs)]
            grads = torch.autograd.grad(outs, [ins[k] for k in wrt], seeds)
            return [o.detach() for o in outs], grads

        outs_true, grads_true = run("reference", False)
        outs_ref, grads_ref = run("reference", True)
        for backend in backends:
            outs, grads = run(backend, True)
            for o, o_ref, o_true in zip(outs, outs_ref, outs_true):
                assert rel_error(o, o_true) <= 2 * rel_error(o_ref, o_true) + 1e-6, (name, backend)
            for g, g_ref, g_true in zip(grads, grads_ref, grads_true):
                assert rel_error(g, g_true) <= 3 * rel_error(g_ref, g_true) + 1e-6, (name, backend)


@pytest.mark.parametrize("device,dtype", _device_types())
@pytest.mark.parametrize("what", ["module", "refine"])
def test_autocast_casts_inside_the_operators(device, dtype, what):
    """Under autocast the module's one call (``stvit::sta_forward``) and the written-out refine
    cast x and the parameters themselves (their ``dtype`` argument): outputs and every gradient
    equal, bit for bit, those of the same module converted to the autocast dtype by hand (its
    gradients cast to float32, as autograd returns them), with no cast node on autograd's graph
    (the module's per-piece path, on reference, casts x as a node of its own). On triton the
    module is one node composed in Python (FamilyStep), which casts x inside it."""
    torch.manual_seed(seed_for("autocast-inside", device, dtype, what))
    backends = [b for b in sk.available_backends() if device_for(b) == device] or ["reference"]
    for backend in backends:
        def make():
            if what == "module":
                return sk.SuperTokenAttention(16, (4, 3), num_heads=2, qkv_bias=True,
                                              backend=backend)
            return sk.RefineAttention(16, num_heads=2, qkv_bias=True)
        m, m_half = make().to(device), make()
        m_half.load_state_dict(m.state_dict())
        m_half = m_half.to(device, dtype)
        x = torch.randn(2, 16, 7, 9, device=device, requires_grad=True)
        g = torch.randn(2, 16, 7, 9, device=device, dtype=dtype)
        with torch.autocast(device, dtype=dtype):
            y = m(x)
        assert y.dtype == dtype
        be = resolve(x, backend)
        if what == "refine" or be.one_step or be.composed_step:  # else x is cast per piece
            names = autograd_node_names(y.grad_fn)
            # the walk reached the leaves (x, the parameters), so a cast node would have shown
            assert "AccumulateGrad" in names, (backend, names)
            assert not any(n.startswith("ToCopyBackward") for n in names), (backend, names)
        y.backward(g)
        x_half = x.detach().to(dtype).requires_grad_()
        y_half = m_half(x_half)
        y_half.backward(g)
        torch.testing.assert_close(y, y_half, rtol=0, atol=0, msg=backend)
        assert x.grad.dtype == torch.float32
        torch.testing.assert_close(x.grad, x_half.grad.float(), rtol=0, atol=0, msg=backend)
        for (name, p), p_half in zip(m.named_parameters(), m_half.parameters()):
            assert p.grad.dtype == torch.float32, name
            torch.testing.assert_close(p.grad, p_half.grad.float(), rtol=0, atol=0,
                                       msg=f"{backend} {name}")


def test_autocast_mixed_input_dtypes():
    """Under autocast a float32 x and bfloat16 super tokens are both run in bfloat16, like matmul;
    float64 inputs are left alone; outside autocast mixed dtypes are an error."""
    t = make_inputs(1, 8, 8, 8, 4, 4, seed=seed_for("autocast-mixed"))
    x, s = t["x"], t["s"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        A = sk.stoken_affinity(x, s, 4)
        assert A.dtype == torch.bfloat16
        A64 = sk.stoken_affinity(x.double(), s.double(), 4)
        assert A64.dtype == torch.float64
    with pytest.raises(TypeError, match="same dtype"):
        sk.stoken_affinity(x, s, 4)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_normalisation_safe_in_half(backend, dtype):
    """A super token that no pixel picks has ``den == 0`` exactly; in float16 ``den + 1e-12`` would
    be 0 and ``num / den`` NaN. It must come out 0 (the normalisation runs in float32)."""
    dev = device_for(backend)
    x = torch.full((1, 4, 16, 16), 10.0, dtype=dtype, device=dev)
    s = torch.full((1, 4, 4, 4), 10.0, dtype=dtype, device=dev)
    s[:, :, 1, 2] = 0  # logit 0 against 200 for every other valid neighbour: exp(-200) == 0
    stokens, A = sk.associate(x, s, 4, n_iter=1, backend=backend)
    _, den = sk.stoken_aggregate(x.double(), A.double(), 4, backend="reference")
    assert den[0, 0, 1, 2] == 0 and (den > 0).sum() == 15  # the case the test is about
    assert torch.isfinite(stokens).all()
    assert (stokens[:, :, 1, 2] == 0).all()
    torch.testing.assert_close(stokens[:, :, 0, 0].float().cpu(), torch.full((1, 4), 10.0),
                               rtol=2e-3, atol=0)
    # the module path (pooling inside the association) too
    stokens2, _ = sk.associate(x, None, 4, n_iter=1, backend=backend)
    assert torch.isfinite(stokens2).all()
