"""The plan limits of the CUDA STA kernels swept at the STViT-S stage shapes (issue 12: tiles chosen
for the shape, or autotuned with a cache; this measures which choice the defaults should be).

The plan (``csrc/cuda/sta_kernels.cuh``, ``plan_cells``) has four runtime limits, which
``stvit_kernels._C._set_cuda_plan`` overrides for the whole process:

* ``max_threads``: threads per block (32..256);
* ``tile_pixels``: the pixels a tile of an aggregating kernel aims at (wider tiles: less
  partial-sum workspace, fewer blocks);
* ``smem_block``: the shared memory an aggregating block may take before it opts in for more,
  given here as blocks per SM (``shared memory per SM / k - 1 KB``; the default is 4);
* ``cache_x``: an aggregating block keeps its batch of x on chip (1) or re-reads it (0).

For each op of the module's hot path at B=64 (the fused affinity + aggregation of the forward,
``cell_kernel<kFused>`` + its reduction; the aggregation of the backward, ``cell_kernel<kAggregate>``
+ reduction; the upsampling; the pool), stage 1 and stage 2, float32 and bfloat16, every
configuration is timed (``triton.testing.do_bench``: median, L2 flushed between calls), turned into
a share of the copy bandwidth by the byte model of ``bench_ops.py``, and checked against the
default configuration's output (the sums' order changes with the tile: relative L2 error
<= 1e-5 in float32, 1e-2 in bfloat16; a configuration that fails is marked, not ranked). The
table gives, per op, the default and the best configuration.

    python benchmarks/tune_cuda.py --out benchmarks/results/<gpu>-<date>/tune_cuda.json
    python benchmarks/tune_cuda.py --device cpu --smoke       # the script itself, no GPU (tests)

On the CPU the knobs change nothing (the CPU kernels have no plan); ``--smoke`` exists so that
the script is tested without a GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_ops  # noqa: E402
import common  # noqa: E402
from stvit_kernels import _C  # noqa: E402

#: (name, C, side, stoken): the STViT-S stages 1 and 2
STAGES = (("stage1", 64, 56, 8), ("stage2", 128, 28, 4))
BATCH = 64
OPS = ("affinity_aggregate", "aggregate", "upsample", "pool")
#: the knobs each op's plan reads (pool launches a fixed block size)
KNOBS = {"affinity_aggregate": ("max_threads", "tile_pixels", "blocks_per_sm", "cache_x"),
         "aggregate": ("max_threads", "tile_pixels", "blocks_per_sm", "cache_x"),
         "upsample": ("max_threads",), "pool": ()}
GRID = dict(max_threads=(64, 128, 256), tile_pixels=(256, 512, 1024, 2048),
            blocks_per_sm=(2, 3, 4, 6), cache_x=(1,))
DEFAULT = dict(max_threads=0, tile_pixels=0, blocks_per_sm=0, cache_x=-1)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def configs(op: str, smoke: bool) -> List[Dict[str, int]]:
    """The default first, then the grid over the op's knobs (the others at their default), and for
    the aggregating ops the default with x re-read."""
    knobs = KNOBS[op]
    out = [dict(DEFAULT)]
    if not knobs:
        return out
    if smoke:
        return out + [dict(DEFAULT, max_threads=64)]
    for values in itertools.product(*(GRID[k] for k in knobs)):
        out.append(dict(DEFAULT, **dict(zip(knobs, values))))
    if "cache_x" in knobs:
        out.append(dict(DEFAULT, cache_x=0))
    return out


def smem_per_sm(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_multiprocessor", 228 * 1024))


def apply(cfg: Dict[str, int], device: torch.device) -> None:
    """The configuration's overrides, for the CUDA kernels (nothing to set for the CPU ones,
    which a build without CUDA has alone)."""
    if device.type != "cuda":
        return
    smem_block = 0
    if cfg["blocks_per_sm"] > 0:
        smem_block = smem_per_sm(device) // cfg["blocks_per_sm"] - 1024
    _C._set_cuda_plan(cfg["max_threads"], cfg["tile_pixels"], smem_block, cfg["cache_x"])


def op_call(op: str, x, s, A, h: int, scale: float) -> Callable[[], object]:
    ops = torch.ops.stvit
    return {"affinity_aggregate": lambda: ops.affinity_aggregate(x, s, h, h, scale),
            "aggregate": lambda: ops.aggregate(x, A, h, h),
            "upsample": lambda: ops.upsample(s, A, h, h),
            "pool": lambda: ops.pool(x, h, h)}[op]


def bytes_moved(op: str, B: int, C: int, side: int, stoken: int, elt: int) -> int:
    if op == "pool":  # read x, write s
        return (B * C * side * side + B * C * (side // stoken) ** 2) * elt
    case = bench_ops.Case(op, B, C, side, stoken, 1)
    return bench_ops.byte_model(case, elt)["fwd"]


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.05:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def _flat(out) -> List[torch.Tensor]:
    return [t.float() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def rel_err(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))


def run(device: torch.device, dtypes, smoke: bool, copy_gbs: Optional[float]) -> Dict:
    rows = []
    stages = (("smoke", 16, 16, 4),) if smoke else STAGES
    batch = 2 if smoke else BATCH
    for (stage, C, side, stoken), dtype in itertools.product(stages, dtypes):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, C, side, side, generator=g).to(device, dtype)
        s = torch.nn.functional.avg_pool2d(x.float(), stoken).to(dtype)
        A = torch.softmax(torch.randn(batch, 9, side, side, generator=g), 1).to(device, dtype)
        scale = C ** -0.5
        elt = torch.finfo(dtype).bits // 8
        for op in OPS:
            fn = op_call(op, x, s, A, stoken, scale)
            nbytes = bytes_moved(op, batch, C, side, stoken, elt)
            ref = None
            for cfg in configs(op, smoke):
                apply(cfg, device)
                try:
                    out = _flat(fn())
                    ref = out if ref is None else ref   # the default configuration's, first
                    err = rel_err(out, ref)
                    ms = time_ms(fn, device)
                finally:
                    apply(DEFAULT, device)
                gbps = nbytes / ms / 1e6
                rows.append(dict(op=op, stage=stage, dtype=str(dtype).replace("torch.", ""),
                                 batch=batch, dim=C, side=side, stoken=stoken, config=cfg,
                                 default=cfg == DEFAULT, ms=ms, bytes=nbytes, gbps=gbps,
                                 bw_frac=gbps / copy_gbs if copy_gbs else None, rel_err=err,
                                 ok=err <= TOL[dtype]))
                print(f"{op:18s} {stage:6s} {rows[-1]['dtype']:8s} {_cfg_str(cfg):42s} "
                      f"{ms * 1e3:8.1f} us {gbps:7.0f} GB/s"
                      + (f" {100 * gbps / copy_gbs:5.1f}%" if copy_gbs else "")
                      + ("" if rows[-1]["ok"] else f"  WRONG (rel err {err:.2e})"), flush=True)
    return dict(rows=rows, summary=summarise(rows))


def _cfg_str(cfg: Dict[str, int]) -> str:
    changed = {k: v for k, v in cfg.items() if v != DEFAULT[k]}
    return "default" if not changed else " ".join(f"{k}={v}" for k, v in changed.items())


def summarise(rows: List[Dict]) -> List[Dict]:
    out = []
    keys = sorted({(r["op"], r["stage"], r["dtype"]) for r in rows})
    for op, stage, dt in keys:
        sel = [r for r in rows if (r["op"], r["stage"], r["dtype"]) == (op, stage, dt)]
        default = next(r for r in sel if r["default"])
        ok = [r for r in sel if r["ok"]]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        out.append(dict(op=op, stage=stage, dtype=dt, default_ms=default["ms"],
                        default_bw_frac=default["bw_frac"],
                        best=_cfg_str(best["config"]) if best else None,
                        best_ms=best["ms"] if best else None,
                        best_bw_frac=best["bw_frac"] if best else None,
                        speedup=default["ms"] / best["ms"] if best else None,
                        wrong=[_cfg_str(r["config"]) for r in sel if not r["ok"]]))
    return out


def table(summary: List[Dict]) -> str:
    lines = ["| op | stage | dtype | default us | default % copy | best config | best us | "
             "best % copy | default / best |", "|---|---|---|---:|---:|---|---:|---:|---:|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}"  # noqa: E731
    for s in summary:
        lines.append(f"| {s['op']} | {s['stage']} | {s['dtype']} | {s['default_ms'] * 1e3:.1f} | "
                     f"{pct(s['default_bw_frac'])} | {s['best']} | "
                     f"{s['best_ms'] * 1e3:.1f} | {pct(s['best_bw_frac'])} | {s['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--smoke", action="store_true", help="a tiny shape and two configurations")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not _C.built_with_cuda():
        raise SystemExit("stvit_kernels._C was built without the CUDA kernels")
    copy = common.copy_bandwidth(device) if device.type == "cuda" else None
    copy_gbs = copy["gbps"] if copy else None
    result = run(device, [getattr(torch, d) for d in a.dtypes], a.smoke, copy_gbs)
    result["meta"] = dict(common.metadata(device, sys.argv), copy_gbs=copy_gbs)
    print(table(result["summary"]))
    if a.out:
        common.save_json(a.out, result)


if __name__ == "__main__":
    main()
