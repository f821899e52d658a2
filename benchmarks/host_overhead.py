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

    .venv/bin/python benchmarks/host_overhead.py [--out results/host_overhead.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def per_call_us(fns, n=5000, rounds=15):
    """Per call of each of ``fns``: the best of ``rounds`` blocks of ``n`` calls, the functions
    taking turns block by block (so a busy spell of a shared machine hits them all)."""
    for fn in fns:
        for _ in range(n // 5):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.thread_time()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.thread_time() - t) / n * 1e6)
    return best


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
    times = per_call_us([fn for _, fn in rows])
    out = [dict(name=name, us=us) for (name, _), us in zip(rows, times)]
    floor = out[0]["us"]
    for r in out:
        r["over_aten_us"] = r["us"] - floor
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    rows = measure()
    print(f"{'registration':62s} {'us/call':>8s} {'over ATen':>10s}")
    for r in rows:
        print(f"{r['name']:62s} {r['us']:8.2f} {r['over_aten_us']:10.2f}")
    if args.out:
        meta = common.metadata(torch.device("cpu"), sys.argv[1:] if argv is None else argv)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
