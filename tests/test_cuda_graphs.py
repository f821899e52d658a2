"""CUDA graphs: ``torch.compile(mode="reduce-overhead")`` and ``torch.cuda.make_graphed_callables``
over ``SuperTokenAttention`` and ``stvit_small``, forward and forward + backward, on every GPU
backend: no graph break (fullgraph), no recompilation, and the eager results. Nothing on the path
may synchronise with the host or allocate outside the caching allocator, or capture fails."""
import copy

import pytest
import torch

import stvit
import stvit_kernels as sk

from .utils import seed_for

pytestmark = pytest.mark.cuda

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in sk.available_backends()]


def _module(backend):
    torch.manual_seed(seed_for("graphs-module", backend))
    return sk.SuperTokenAttention(64, 8, n_iter=2, num_heads=2, qkv_bias=True,
                                  backend=backend).cuda()


def _fwd_bwd(fn, x, g):
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach().clone(), gx.clone()  # graph outputs are overwritten by the next replay


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_module_reduce_overhead(backend):
    torch._dynamo.reset()
    m = _module(backend)
    compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    xs = [torch.randn(4, 64, 50, 44, device="cuda", requires_grad=True) for _ in range(4)]
    g = torch.randn(4, 64, 50, 44, device="cuda")
    _fwd_bwd(compiled, xs[0], g)  # compile and record
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in xs[1:]:
            y, gx = _fwd_bwd(compiled, x, g)
            y_e, gx_e = _fwd_bwd(m, x, g)
            torch.testing.assert_close(y, y_e, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gx, gx_e, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference: one more compilation (grad mode is guarded), then replays
        compiled(xs[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for x in xs[1:]:
                torch.testing.assert_close(compiled(x).clone(), m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_module_reduce_overhead_interleaved(backend):
    """The benchmark's sequence of calls (benchmarks/bench_ops.py under --compile-mode
    reduce-overhead): no-grad forwards and forward + backward steps interleaved, outputs dropped,
    each call a new step of CUDA-graph trees (cudagraph_mark_step_begin). Eager results throughout,
    no recompilation after the first two calls."""
    torch._dynamo.reset()
    m = _module(backend)
    compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    xs = [torch.randn(4, 64, 48, 40, device="cuda", requires_grad=True) for _ in range(3)]
    g = torch.randn(4, 64, 48, 40, device="cuda")

    def call(x):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    _fwd_bwd(call, xs[0], g)
    with torch.no_grad():
        call(xs[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(6):
            x = xs[i % len(xs)]
            with torch.no_grad():
                torch.testing.assert_close(call(x).clone(), m(x), rtol=1e-4, atol=1e-5)
                call(x)   # an output nobody reads
            y, gx = _fwd_bwd(call, x, g)
            y_e, gx_e = _fwd_bwd(m, x, g)
            torch.testing.assert_close(y, y_e, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gx, gx_e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_module_make_graphed_callables(backend):
    m = _module(backend)
    ref = copy.deepcopy(m)
    x0 = torch.randn(4, 64, 56, 56, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(m, (x0,))
    g = torch.randn(4, 64, 56, 56, device="cuda")
    for _ in range(3):
        x = torch.randn(4, 64, 56, 56, device="cuda", requires_grad=True)
        y, gx = _fwd_bwd(graphed, x, g)
        y_e, gx_e = _fwd_bwd(ref, x, g)
        torch.testing.assert_close(y, y_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gx, gx_e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_stvit_small_reduce_overhead_train(backend):
    """Training steps of stvit_small under reduce-overhead: same outputs and parameter gradients as
    eager, no recompilation on later steps."""
    torch._dynamo.reset()
    torch.manual_seed(seed_for("graphs-stvit-small", backend))
    model = stvit.stvit_small(num_classes=10, drop_path_rate=0.0).cuda().train()
    eager = copy.deepcopy(model)
    xs = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(3)]

    def step(fn, m, x):
        m.zero_grad(set_to_none=True)
        out = fn(x)
        out.square().mean().backward()
        return out.detach().clone(), [p.grad.clone() for p in m.parameters()]

    with sk.use_backend(backend):
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        step(compiled, model, xs[0])
        step(eager, eager, xs[0])  # the same BN statistics on both sides
        with torch._dynamo.config.patch(error_on_recompile=True):
            for x in xs[1:]:
                out, grads = step(compiled, model, x)
                out_e, grads_e = step(eager, eager, x)
                torch.testing.assert_close(out, out_e, rtol=1e-3, atol=1e-4)
                for a, b in zip(grads, grads_e):
                    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_stvit_small_reduce_overhead_inference(backend):
    torch._dynamo.reset()
    torch.manual_seed(seed_for("graphs-stvit-small-infer", backend))
    model = stvit.stvit_small(num_classes=10).cuda().eval()
    xs = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(3)]
    with sk.use_backend(backend), torch.no_grad():
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        compiled(xs[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for x in xs:
                torch.testing.assert_close(compiled(x).clone(), model(x), rtol=1e-3, atol=1e-4)
