"""Time SuperTokenAttention against dense global attention at STViT-S stage-1 shapes.

Every available STA backend (reference, cpu, cuda, triton) and dense global attention
(``F.scaled_dot_product_attention`` over all H*W tokens with the same dim and heads: the same
refine attention applied to the full map), forward and forward+backward, at the token grids of
224², 384² and 512² inputs (56², 96², 128² tokens; STViT-S stage 1: C=64, 1 head, 8x8 super
tokens). CPU timings use ``torch.utils.benchmark`` (median of blocked runs); on a GPU, CUDA events
via ``triton.testing.do_bench``.

    python benchmarks/bench_sta.py                      # the quick CPU run of `make bench`
    python benchmarks/bench_sta.py --device cuda --batch 64 --save benchmarks/results/sta_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch
import torch.utils.benchmark as tb

import stvit_kernels as sk


def _time(fn, device: str, min_run_time: float) -> float:
    """Median seconds per call."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up
    return tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                    ).blocked_autorange(min_run_time=min_run_time).median


def _step(module, x, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                module(x)
    else:
        def run():
            x.grad = None
            module(x).sum().backward()
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--stoken", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[56, 96, 128],
                   help="token grid sides (input resolution / 4)")
    p.add_argument("--backends", nargs="+", default=None, help="default: every available one")
    p.add_argument("--no-dense", action="store_true", help="skip dense attention")
    p.add_argument("--min-run-time", type=float, default=0.5, help="CPU: seconds per measurement")
    p.add_argument("--save", default=None, help="write the results as JSON to this path")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = args.backends or [b for b in sk.available_backends()
                                 if sk.backends.get_backend(b).decline_reason(device, dtype) is None]
    torch.manual_seed(0)
    sta = sk.SuperTokenAttention(args.dim, args.stoken, num_heads=args.heads, qkv_bias=True)
    dense = sk.RefineAttention(args.dim, num_heads=args.heads, qkv_bias=True)
    sta, dense = sta.to(device, dtype), dense.to(device, dtype)

    rows = []
    for n in args.tokens:
        x = torch.randn(args.batch, args.dim, n, n, device=device, dtype=dtype, requires_grad=True)
        providers = [(f"sta-{b}", sta, b) for b in backends]
        if not args.no_dense:
            providers.append(("dense-sdpa", dense, None))
        for mode in ("fwd", "fwd+bwd"):
            for name, module, backend in providers:
                with sk.use_backend(backend or "auto"):
                    t = _time(_step(module, x, mode), device.type, args.min_run_time)
                rows.append(dict(tokens=n * n, side=n, mode=mode, provider=name, ms=t * 1e3))
                print(f"  {n}x{n} {mode:8s} {name:16s} {t * 1e3:10.2f} ms", file=sys.stderr)

    print(f"\nSuperTokenAttention vs dense attention: B={args.batch}, C={args.dim}, "
          f"heads={args.heads}, stoken={args.stoken}, {args.dtype}, {device.type} "
          f"({torch.get_num_threads()} threads)")
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fused = [k for k in names if k.startswith("sta-") and k != "sta-reference"]
    extra = (["ref/fused"] if fused and "sta-reference" in names else []) + \
            (["dense/sta"] if "dense-sdpa" in names else [])
    print(f"{'tokens':>10s} {'mode':8s} " + " ".join(f"{n:>14s}" for n in names)
          + " " + " ".join(f"{e:>10s}" for e in extra) + "   (ms; ratios: x faster)")
    for n in args.tokens:
        for mode in ("fwd", "fwd+bwd"):
            r = {x["provider"]: x["ms"] for x in rows if x["side"] == n and x["mode"] == mode}
            best = min(r[k] for k in names if k.startswith("sta-"))
            cells = [f"{r[k]:14.2f}" for k in names]
            if "ref/fused" in extra:
                cells.append(f"{r['sta-reference'] / min(r[k] for k in fused):9.1f}x")
            if "dense/sta" in extra:
                cells.append(f"{r['dense-sdpa'] / best:9.1f}x")
            print(f"{f'{n}x{n}':>10s} {mode:8s} " + " ".join(cells))

    if args.save:
        meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
                    or platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
                    triton=_triton_version(), cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
                    command="python " + " ".join(sys.argv), args=vars(args))
        with open(args.save, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
        print(f"saved {args.save}")


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
