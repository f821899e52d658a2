"""Where the host time of a ``SuperTokenAttention`` call goes (issue 11): ``cProfile`` over a run
of calls enqueued back to back, reported per module call, by function and by where the code lives
(this library's Python, torch's Python, Triton's Python, calls into C / C++: ATen, the dispatcher,
the CUDA and Triton launchers). Triton's launcher (``JITFunction.run`` and everything below it:
binding the arguments, the specialisation key, the kernel cache, the driver launch) is split out,
with its launches per call, since its cost shows only on a GPU.

The profiler slows every Python call down, so the per-call host time is also taken without it
(``time.thread_time`` around the same run): the profile gives the shares, that figure the time.
On a GPU the calls are not synchronised between them. ``gpu_behind`` says that the GPU still had
work queued when the host had enqueued the last call (the GPU slower than the host): keep
``--calls`` times the launches per call well under CUDA's launch queue (about a thousand), or a
full queue would hold the host up and count in its time.

    python benchmarks/host_profile.py --device cuda --backend triton --out host_profile_triton.json
    python benchmarks/host_profile.py --device cpu --backend cpu --batch 1 --side 16   # the proxy
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

#: Where a profiled function's code lives, by its file (first match wins).
PLACES = (("stvit_kernels", os.sep + "stvit_kernels" + os.sep),
          ("triton", os.sep + "triton" + os.sep),
          ("torch", os.sep + "torch" + os.sep))


def place(filename: str) -> str:
    """``stvit_kernels`` / ``triton`` / ``torch`` Python, ``C`` (a builtin: ATen, the dispatcher,
    the launchers' C parts), or ``other`` Python (the standard library, this script)."""
    if filename == "~":
        return "C"
    for name, part in PLACES:
        if part in filename:
            return name
    return "other"


def _is_triton_run(key) -> bool:
    filename, _, func = key
    # JITFunction.run; InterpretedFunction.run under TRITON_INTERPRET
    return (func == "run" and place(filename) == "triton"
            and filename.endswith(("jit.py", "interpreter.py")))


def summarise(stats: pstats.Stats, calls: int, top: int = 25) -> dict:
    """Per module call (µs, counts) from a profile of ``calls`` module calls."""
    entries = stats.stats  # (file, line, func) -> (primitive calls, calls, tottime, cumtime, callers)
    total = sum(tt for _, _, tt, _, _ in entries.values())
    by_place: dict = {}
    for (filename, _, _), (_, _, tt, _, _) in entries.items():
        p = place(filename)
        by_place[p] = by_place.get(p, 0.0) + tt
    runs = [(nc, ct) for key, (_, nc, _, ct, _) in entries.items() if _is_triton_run(key)]
    rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]

    def name(key):
        filename, line, func = key
        return func if filename == "~" else f"{os.path.basename(filename)}:{line}({func})"

    per = 1e6 / calls
    return dict(
        profiled_us=total * per,
        by_place_us={k: v * per for k, v in sorted(by_place.items(), key=lambda kv: -kv[1])},
        triton_run_us=sum(ct for _, ct in runs) * per,
        triton_launches=sum(nc for nc, _ in runs) / calls,
        top=[dict(function=name(k), calls=nc / calls, self_us=tt * per, cumulative_us=ct * per)
             for k, (_, nc, tt, ct, _) in rows])


def profile(step, calls: int, device: torch.device) -> dict:
    """Host time per call unprofiled (CPU time of this thread), then the profile's figures.

    On a GPU autograd runs a backward on its device thread, where neither ``time.thread_time``
    nor ``cProfile`` (both of this thread) would see it: both run with autograd's multithreading
    off (the backward on this thread). ``enqueue_wall_us`` and ``wall_us`` are taken the way a
    user runs, multithreading on (the hand-over to the device thread included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(20):
        step()
    sync()
    w0 = time.perf_counter()
    for _ in range(calls):
        step()
    enqueue = time.perf_counter() - w0
    sync()
    wall = time.perf_counter() - w0
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(5):
            step()
        sync()
        t0 = time.thread_time()
        for _ in range(calls):
            step()
        host = time.thread_time() - t0
        sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
        sync()
    out = dict(host_us=host / calls * 1e6, enqueue_wall_us=enqueue / calls * 1e6,
               wall_us=wall / calls * 1e6, gpu_behind=wall > 1.2 * enqueue)
    out.update(summarise(pstats.Stats(prof), calls))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--side", type=int, default=56)
    ap.add_argument("--stoken", type=int, default=8)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--stub-triton", action="store_true",
                    help="every Triton kernel launch a no-op (the host path alone, on a CPU under "
                         "TRITON_INTERPRET=1; common.stub_triton_launches)")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import stvit_kernels as sk

    if args.stub_triton:
        common.stub_triton_launches()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    m = sk.SuperTokenAttention(args.dim, args.stoken, num_heads=args.heads, qkv_bias=True,
                               backend=args.backend).to(device, dtype)
    x = torch.randn(args.batch, args.dim, args.side, args.side, device=device, dtype=dtype)
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            m(x)

    params = list(m.parameters())

    def fwd_bwd():
        # as bench_ops.py's step: the gradients of the last call dropped, so that autograd hands
        # each leaf its new gradient instead of adding it to the old one (six add kernels, x's
        # 51 MB at stage 1, B=64, in the 2026-12-04 profiles)
        xg.grad = None
        for p in params:
            p.grad = None
        torch.autograd.backward([m(xg)], [g])

    results = {}
    for mode in args.modes:
        r = profile(fwd if mode == "fwd" else fwd_bwd, args.calls, device)
        results[mode] = r
        print(f"{mode}: host {r['host_us']:.1f} µs/call unprofiled (enqueue {r['enqueue_wall_us']:.1f}, "
              f"wall {r['wall_us']:.1f}"
              f"{', the GPU behind' if r['gpu_behind'] else ''}); profiled "
              f"{r['profiled_us']:.1f}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["by_place_us"].items())
              + f"; Triton launcher {r['triton_run_us']:.1f} µs in {r['triton_launches']:g} launches")
        for t in r["top"][:15]:
            print(f"    {t['self_us']:8.2f} self {t['cumulative_us']:8.2f} cum  x{t['calls']:<5g} {t['function']}")
    if args.out:
        meta = common.metadata(device, sys.argv[1:] if argv is None else argv)
        meta.update(backend=sk.explain(x) if args.backend == "auto" else args.backend,
                    shape=dict(batch=args.batch, dim=args.dim, side=args.side, stoken=args.stoken,
                               heads=args.heads), dtype=args.dtype, calls=args.calls,
                    triton_launches_stubbed=args.stub_triton)
        with open(args.out, "w") as f:
            json.dump(dict(kind="host_profile", meta=meta, results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
