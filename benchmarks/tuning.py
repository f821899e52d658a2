"""The sweep that ``tune_cuda.py`` and ``tune_triton.py`` share: for each op of the module's hot
path at the STViT-S stage shapes (B=64) and each dtype, every configuration of a backend's plan is
applied, its output checked against the default configuration's (the sums' order changes with the
tiles: relative L2 error <= 1e-5 in float32, 1e-2 in bfloat16; a configuration that fails is
marked, not ranked) and timed (``triton.testing.do_bench`` on a GPU: median, L2 flushed between
calls), its time turned into a share of the copy bandwidth by the byte model of ``bench_ops.py``.
The summary gives, per op, stage and dtype, the default and the best configuration.

A backend's script gives a :class:`Tuner`: its ops, how to call one, its configurations (the
default first) and how to apply one.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Callable, ContextManager, Dict, Hashable, List, NamedTuple, Optional, Sequence

import torch

import bench_ops
import common

#: (name, C, side, stoken): the STViT-S stages 1 and 2
STAGES = (("stage1", 64, 56, 8), ("stage2", 128, 28, 4))
SMOKE_STAGES = (("smoke", 16, 16, 4),)
BATCH = 64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


class Tuner(NamedTuple):
    ops: Sequence[str]
    #: op, x, s, A, stoken, scale -> a call of the op
    call: Callable[..., Callable[[], object]]
    #: op, smoke -> the configurations (dicts), the default first
    configs: Callable[[str, bool], List[Dict[str, int]]]
    #: a configuration, the device -> a context in which launches use it
    apply: Callable[[Dict[str, int], torch.device], ContextManager]
    #: op, configuration, x, stoken -> what it launches at x's shape (a configuration with the
    #: key of an earlier one is skipped); None: every configuration runs
    key: Optional[Callable[..., Hashable]] = None


def op_calls(prefix: str = "") -> Callable[..., Callable[[], object]]:
    """``Tuner.call`` for the ops ``torch.ops.stvit.<prefix><op>`` (``""``: the compiled family,
    ``"triton_"``: the Triton one)."""
    def call(op: str, x, s, A, h: int, scale: float) -> Callable[[], object]:
        fn = getattr(torch.ops.stvit, prefix + op)
        args = {"affinity_aggregate": (x, s, h, h, scale), "aggregate": (x, A, h, h),
                "upsample": (s, A, h, h), "pool": (x, h, h)}[op]
        return lambda: fn(*args)
    return call


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


def bytes_moved(op: str, B: int, C: int, side: int, stoken: int, elt: int) -> int:
    if op == "pool":  # read x, write s
        return (B * C * side * side + B * C * (side // stoken) ** 2) * elt
    case = bench_ops.Case(op, B, C, side, stoken, 1)
    return bench_ops.byte_model(case, elt)["fwd"]


def _flat(out) -> List[torch.Tensor]:
    return [t.float() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def rel_err(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))


def cfg_str(cfg: Dict[str, int], default: Dict[str, int]) -> str:
    changed = {k: v for k, v in cfg.items() if v != default[k]}
    return "default" if not changed else " ".join(f"{k}={v}" for k, v in changed.items())


def sweep(tuner: Tuner, device: torch.device, dtypes, smoke: bool, copy_gbs: Optional[float],
          stages: Sequence[str] = (), save: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Every (stage, dtype, op, configuration) in turn; ``stages`` picks stages by name (all if
    empty). Each row is printed as it is measured, and ``save`` (if given) gets the results so far
    after each op, so that a sweep cut short by a time box still leaves its JSON."""
    rows = []
    chosen = SMOKE_STAGES if smoke else [s for s in STAGES if not stages or s[0] in stages]
    batch = 2 if smoke else BATCH
    for (stage, C, side, stoken), dtype in itertools.product(chosen, dtypes):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, C, side, side, generator=g).to(device, dtype)
        s = torch.nn.functional.avg_pool2d(x.float(), stoken).to(dtype)
        A = torch.softmax(torch.randn(batch, 9, side, side, generator=g), 1).to(device, dtype)
        scale = C ** -0.5
        elt = torch.finfo(dtype).bits // 8
        for op in tuner.ops:
            fn = tuner.call(op, x, s, A, stoken, scale)
            nbytes = bytes_moved(op, batch, C, side, stoken, elt)
            cfgs = tuner.configs(op, smoke)
            ref, seen = None, set()
            for cfg in cfgs:
                if tuner.key is not None:
                    key = tuner.key(op, cfg, x, stoken)
                    if key in seen:
                        continue
                    seen.add(key)
                with tuner.apply(cfg, device):
                    out = _flat(fn())
                    ref = out if ref is None else ref   # the default configuration's, first
                    err = rel_err(out, ref)
                    ms = time_ms(fn, device)
                gbps = nbytes / ms / 1e6
                rows.append(dict(op=op, stage=stage, dtype=str(dtype).replace("torch.", ""),
                                 batch=batch, dim=C, side=side, stoken=stoken, config=cfg,
                                 default=cfg == cfgs[0], ms=ms, bytes=nbytes, gbps=gbps,
                                 bw_frac=gbps / copy_gbs if copy_gbs else None, rel_err=err,
                                 ok=err <= TOL[dtype]))
                print(f"{op:18s} {stage:6s} {rows[-1]['dtype']:8s} {cfg_str(cfg, cfgs[0]):42s} "
                      f"{ms * 1e3:8.1f} us {gbps:7.0f} GB/s"
                      + (f" {100 * gbps / copy_gbs:5.1f}%" if copy_gbs else "")
                      + ("" if rows[-1]["ok"] else f"  WRONG (rel err {err:.2e})"), flush=True)
            if save is not None:
                save(dict(rows=rows, summary=summarise(rows), partial=True))
    return dict(rows=rows, summary=summarise(rows), partial=False)


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
                        best=cfg_str(best["config"], default["config"]) if best else None,
                        best_ms=best["ms"] if best else None,
                        best_bw_frac=best["bw_frac"] if best else None,
                        speedup=default["ms"] / best["ms"] if best else None,
                        wrong=[cfg_str(r["config"], default["config"]) for r in sel if not r["ok"]]))
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


def main(tuner: Tuner, doc: str, check: Callable[[torch.device], None] = lambda device: None,
         argv=None) -> None:
    """The command line of a tuning script: ``--device``, ``--dtypes``, ``--stages``, ``--smoke``,
    ``--out``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--stages", nargs="+", default=[], choices=[s[0] for s in STAGES],
                   help="the stages to sweep (default: all)")
    p.add_argument("--smoke", action="store_true", help="a tiny shape and two configurations")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    check(device)
    copy = common.copy_bandwidth(device) if device.type == "cuda" else None
    copy_gbs = copy["gbps"] if copy else None
    meta = dict(common.metadata(device, sys.argv if argv is None else argv), copy_gbs=copy_gbs)

    def save(result: Dict) -> None:
        if a.out:
            common.save_json(a.out, dict(result, meta=meta))

    result = sweep(tuner, device, [getattr(torch, d) for d in a.dtypes], a.smoke, copy_gbs,
                   a.stages, save)
    print(table(result["summary"]))
    save(result)
