"""Host cost of a call from Python, by the way an operator is registered (issue 11).

The same trivial kernel (``x + 1`` on a 4 x 4 CPU tensor) behind each registration that
stvit_kernels could use, timed per call on one thread (``time.thread_time``: CPU time of this
thread, which a busy shared machine disturbs less than wall time), best of several blocks taken in
turns:

* the ATen op called directly (the floor: what any kernel call costs);
* ``torch.library.define`` + ``impl`` (what stvit_kernels uses for its raw operators), called
  through its ``OpOverload``;
* ``torch.library.custom_op``, without and with ``register_autograd`` (what it used before);
* ``torch.autograd.Function.apply`` around the define + impl operator (how stvit_kernels adds
  autograd: one Function per public op or module step).

and, second, the call paths of ``SuperTokenAttention`` at the host-overhead proxy's shape (B=1,
C=64, 16x16, 8x8 super tokens, 1 head, ``cpu`` backend), forward and forward + backward, in turns:

* ``per-piece, SDPA refine``: associate, the refine as SDPA with its autograd graph, upsample
  (each its own call and autograd node; the path before the one-call module);
* ``per-piece, written-out refine``: the same with the refine as one call / one autograd node;
* ``one call``: ``stvit::sta_forward`` / ``sta_backward`` (one autograd node), the default.

    .venv/bin/python benchmarks/host_overhead.py [--out results/cpu_host_overhead.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def measure():
    torch.set_num_threads(1)
    x = torch.randn(4, 4)
    xg = x.clone().requires_grad_()

    lib = torch.library.Library("stvit_overhead", "FRAGMENT")
    lib.define("plain(Tensor x) -> Tensor")
    lib.impl("plain", lambda t: t.add(1), "CPU")
    plain = torch.ops.stvit_overhead.plain.default

    @torch.library.custom_op("stvit_overhead::co", mutates_args=())
    def co(t: torch.Tensor) -> torch.Tensor:
        return t.add(1)

    @torch.library.custom_op("stvit_overhead::co_grad", mutates_args=())
    def co_grad(t: torch.Tensor) -> torch.Tensor:
        return t.add(1)

    co_grad.register_autograd(lambda ctx, g: g)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return plain(t)

        @staticmethod
        def backward(ctx, g):
            return g

    rows = [
        ("aten op (x.add(1))", lambda: x.add(1)),
        ("define + impl, OpOverload", lambda: plain(x)),
        ("custom_op", lambda: co(x)),
        ("custom_op + register_autograd", lambda: co_grad(x)),
        ("custom_op + register_autograd, input requires grad", lambda: co_grad(xg)),
        ("autograd.Function.apply(define + impl)", lambda: Fn.apply(x)),
        ("autograd.Function.apply(define + impl), input requires grad", lambda: Fn.apply(xg)),
    ]
    times = common.per_call_us([fn for _, fn in rows])
    out = [dict(name=name, us=us) for (name, _), us in zip(rows, times)]
    floor = out[0]["us"]
    for r in out:
        r["over_aten_us"] = r["us"] - floor
    return out


def measure_paths():
    """Per call of SuperTokenAttention's three call paths (module docstring), fwd and fwd+bwd."""
    import contextlib

    import stvit_kernels as sk
    import stvit_kernels.module as module_mod
    from stvit_kernels.backends import CompiledBackend

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = sk.SuperTokenAttention(64, 8, num_heads=1, qkv_bias=True, backend="cpu")
    xs = [torch.randn(1, 64, 16, 16, requires_grad=True) for _ in range(8)]
    gs = [torch.randn(1, 64, 16, 16) for _ in range(8)]
    paths = {"per-piece, SDPA refine": (0, False), "per-piece, written-out refine": (256, False),
             "one call": (module_mod.REFINE_FUSED_MAX_TOKENS, True)}
    default = (module_mod.REFINE_FUSED_MAX_TOKENS, CompiledBackend.one_step)

    @contextlib.contextmanager
    def path(max_tokens, one_step):
        module_mod.REFINE_FUSED_MAX_TOKENS, CompiledBackend.one_step = max_tokens, one_step
        try:
            yield
        finally:
            module_mod.REFINE_FUSED_MAX_TOKENS, CompiledBackend.one_step = default

    def call(cfg, mode):
        it = iter(range(1 << 62))

        def fwd():
            with path(*cfg), torch.no_grad():
                m(xs[next(it) % 8])

        def fwd_bwd():
            i = next(it) % 8
            xs[i].grad = None
            for p in m.parameters():
                p.grad = None
            with path(*cfg):
                torch.autograd.backward([m(xs[i])], [gs[i]])
        return fwd if mode == "fwd" else fwd_bwd

    rows = []
    for mode in ("fwd", "fwd+bwd"):
        times = common.per_call_us([call(cfg, mode) for cfg in paths.values()], n=200, rounds=25)
        rows += [dict(path=name, mode=mode, us=us) for name, us in zip(paths, times)]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    rows = measure()
    print(f"{'registration':62s} {'us/call':>8s} {'over ATen':>10s}")
    for r in rows:
        print(f"{r['name']:62s} {r['us']:8.2f} {r['over_aten_us']:10.2f}")
    paths = measure_paths()
    print(f"\n{'SuperTokenAttention path (B=1, C=64, 16x16, 8x8, cpu)':62s} {'mode':>8s} {'us/call':>8s}")
    for r in paths:
        print(f"{r['path']:62s} {r['mode']:>8s} {r['us']:8.1f}")
    if args.out:
        meta = common.metadata(torch.device("cpu"), sys.argv[1:] if argv is None else argv)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows, module_paths=paths), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
