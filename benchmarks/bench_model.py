"""STViT-S/B/L throughput (images per second): the official algorithm and the reference backend
against the best fused backend.

For every model, ``mode`` (``infer``: forward under ``torch.no_grad`` in eval mode; ``train``: one
training step, forward + cross-entropy + backward + AdamW step, in train mode), ``precision``
(``float32``, or ``autocast``: ``torch.autocast`` in bfloat16 around the forward and the loss) and
with or without ``torch.compile`` (the model compiled, default settings; compile time is not
timed), the model runs once with every super token attention replaced by the official algorithm op
for op (``official``: ``benchmarks/official.py`` with the same weights, the model a user of the
official code runs), once on the ``reference`` backend and once on the best fused backend of the
device (``cuda`` > ``triton`` on a GPU, ``cpu`` on a CPU: what ``auto`` picks). All start from the
same weights; inputs are random images cycled from a small
pool (never zeros), labels random. Timing as in ``bench_ops.py`` (GPU: ``do_bench`` median with
``--rep-ms`` of repetitions, one provider after the other; CPU: ``torch.utils.benchmark``, the two
models timed in interleaved rounds); images/s = batch / median time. On a GPU also the peak extra
memory of one step (``torch.cuda.max_memory_allocated``).

A fourth provider, ``no-sta``, is the model with every super token attention replaced by its
input (:class:`WithoutSTA`): the time of the rest of the step. From it, per setting, the share
of the step the STA takes (``1 - t(no-sta) / t``, for the official model and for ours) and the
Amdahl bound ``t(official) / t(no-sta)``, the most any STA can gain over the official model.
``no-sta`` also removes the global attention of stages 3 and 4 (STAs of 1x1 super tokens); a
fifth, ``official-no-super``, removes only the super-token STAs of the official model, for their
own share and bound.

Targets (GPU, computed): STViT-S inference, float32, eager, fused >= 1.5x the reference-backend
model; STViT-S training step, bf16 autocast, eager, fused >= 1.2x the official model (its row
carries the Amdahl bound). The other settings' ratios are listed for information.

    python benchmarks/bench_model.py --quick        # CPU: STViT-S, batch 2, fp32, infer + train, eager
    python benchmarks/bench_model.py --device cuda  # STViT-S/B/L, batch 64, 224², fp32 + autocast,
                                                    # infer + train, eager + compiled
    python benchmarks/bench_model.py --device cuda --models small --compile on --modes infer
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import traceback
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from official import OfficialStokenAttention  # noqa: E402

import stvit  # noqa: E402
import stvit_kernels as sk  # noqa: E402

MODELS = {"small": stvit.stvit_small, "base": stvit.stvit_base, "large": stvit.stvit_large}
#: The model without its super token attention: every SuperTokenAttention (all four stages; at 1x1
#: super tokens, stages 3 and 4, it is global attention) returns its input. The rest of the step
#: (stem, convolutions, norms, MLPs, head, loss, optimizer) is the same in every provider, so its
#: time bounds what any STA can gain (Amdahl): see sta_shares.
NO_STA = "no-sta"
#: The official model without its super-token STAs (stoken size > 1, stages 1 and 2), the global
#: attention of stages 3 and 4 kept official: ``1 - t(official-no-super) / t(official)`` is the
#: share of the official step that the super-token STA takes, ``t(official) /
#: t(official-no-super)`` the most that replacing only it (the kernels of this project) can gain.
NO_SUPER = "official-no-super"
#: The providers the fused backends are measured against (no-sta, official-no-super are
#: yardsticks, not rivals).
BASELINES = ("official", "reference", NO_STA, NO_SUPER)


class WithoutSTA(torch.nn.Module):
    """Stands in for one SuperTokenAttention: its input, unchanged (no parameters, no work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def set_backend(model: torch.nn.Module, backend: str) -> None:
    """Point every super token attention of the model at one backend; ``official`` replaces each
    by the official algorithm with the same weights, ``no-sta`` by :class:`WithoutSTA`;
    ``official-no-super`` those with super tokens by :class:`WithoutSTA`, the others by the
    official algorithm."""
    if backend in ("official", NO_STA, NO_SUPER):
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, sk.SuperTokenAttention):
                    gone = backend == NO_STA or (backend == NO_SUPER and
                                                 tuple(child.stoken_size) != (1, 1))
                    setattr(parent, name, WithoutSTA() if gone else
                            OfficialStokenAttention.from_module(child))
        return
    for m in model.modules():
        if isinstance(m, sk.SuperTokenAttention):
            m.backend = backend


def make_step(model, mode: str, precision: str, device, pool, labels, compiled: bool):
    """``(step, optimizer)``: one inference call or one training step on the next input batch."""
    amp_dtype = torch.bfloat16
    autocast = precision == "autocast"
    run = torch.compile(model) if compiled else model
    cyc = common.Cycle(list(zip(pool, labels)))

    def ctx():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=autocast)

    if mode == "infer":
        model.eval()

        def step():
            x, _ = cyc.next()
            with torch.no_grad(), ctx():
                return run(x)
        return step, None

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        x, y = cyc.next()
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
    return step, opt


def _failure(e: BaseException, compiled: bool, print_tb: bool = True) -> Dict:
    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    what = "out of memory" if oom else ("torch.compile failed" if compiled else "failed")
    if not oom and print_tb:
        traceback.print_exc(limit=4, file=sys.stderr)
    return dict(status="skipped" if oom or compiled else "error", note=f"{what}: {type(e).__name__}: {msg}")


def run_group(base_model, name, providers, mode, precision, compiled, args, device, pool, labels) -> List[Dict]:
    """One setting for every provider: on a GPU one after the other (``do_bench``), on a CPU both
    models alive and timed in interleaved rounds (the load of a shared machine weighs on both)."""
    rows = {p: dict(model=name, provider=p, backend=p, mode=mode, precision=precision, compile=compiled,
                    batch=args.batch, resolution=args.resolution) for p in providers}
    steps: Dict[str, object] = {}
    keep = []   # models and optimizers of the CPU steps

    def build(p):
        model = copy.deepcopy(base_model)
        set_backend(model, p)
        step, opt = make_step(model, mode, precision, device, pool, labels, compiled)
        # warm-up: compilation (2 calls: the first compiles, the second checks for a recompile) or
        # one call on the CPU (do_bench warms up by itself)
        for _ in range(2 if compiled else (1 if device.type == "cpu" else 0)):
            step()
        common.sync(device)
        return step, (model, opt)

    for p in providers:
        try:
            step, objs = build(p)
            if device.type == "cuda":
                rows[p].update(common.time_call(step, device, args.min_run_time, rep_ms=args.rep_ms))
                rows[p]["peak_bytes"] = common.cuda_peak_bytes(step, device)
                rows[p]["status"] = "ok"
            else:
                steps[p] = step
                keep.append(objs)
        except Exception as e:  # noqa: BLE001
            rows[p].update(_failure(e, compiled))
        finally:
            if device.type == "cuda":
                step = objs = None
                if compiled:
                    torch._dynamo.reset()
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
    if steps:
        try:
            timings, errors = common.time_interleaved(steps, args.min_run_time, min_rounds=3, block_s=0.0)
            for p, t in timings.items():
                rows[p].update(t, status="ok")
            for p, e in errors.items():
                traceback.print_exception(type(e), e, e.__traceback__, limit=4, file=sys.stderr)
                rows[p].update(_failure(e, compiled, print_tb=False))
        finally:
            steps.clear()
            keep.clear()
            if compiled:
                torch._dynamo.reset()
    for p, r in rows.items():
        if r.get("status") == "ok":
            r["images_per_s"] = args.batch / (r["ms"] * 1e-3)
            print(f"  {name:6s} {p:10s} {mode:6s} {precision:9s} {'compiled' if compiled else 'eager':9s}"
                  f" {common.fmt_ms(r['ms']):>9s} ms  {r['images_per_s']:9.1f} img/s", file=sys.stderr)
        else:
            print(f"  {name:6s} {p:10s} {mode:6s} {precision:9s} {r.get('note')}", file=sys.stderr)
    return list(rows.values())


#: (setting, baseline) -> threshold of the fused / baseline images/s on a GPU: the issues'
#: targets (STViT-S inference float32 eager >= 1.5x the reference backend; bf16 training step
#: >= 1.2x the official model, or the Amdahl bound of sta_shares showing why not)
GPU_TARGETS = {(("small", "infer", "float32", False), "reference"): 1.5,
               (("small", "train", "autocast", False), "official"): 1.2}


def sta_shares(sel: List[Dict]) -> Dict:
    """For one setting's rows (status ok): the share of the step that the super token attention
    takes, ``1 - t(no-sta) / t(provider)``, per provider, and the Amdahl bound ``t(official) /
    t(no-sta)``: the most any STA implementation can gain over the official model there; with
    official-no-super, the same two for the super-token STA of stages 1 and 2 alone (the global
    attention of stages 3 and 4 is a STA with 1x1 super tokens, run by other code)."""
    t = {r["provider"]: r["ms"] for r in sel}
    out = {}
    if NO_STA in t:
        out["share"] = {p: 1 - t[NO_STA] / ms for p, ms in t.items() if p not in (NO_STA, NO_SUPER)}
        if "official" in t:
            out["amdahl_bound_vs_official"] = t["official"] / t[NO_STA]
    if NO_SUPER in t and "official" in t:  # the super-token STA alone
        out["super_share_official"] = 1 - t[NO_SUPER] / t["official"]
        out["amdahl_bound_super_vs_official"] = t["official"] / t[NO_SUPER]
    return out


def speedups(rows: List[Dict], device) -> List[Dict]:
    """Fused / official and fused / reference images-per-second ratios for every measured setting,
    with the STA's share of the step and the Amdahl bound where no-sta ran (sta_shares); the
    issues' targets (GPU_TARGETS) carry a threshold, the rest are for information."""
    out = []
    ok = [r for r in rows if r.get("status") == "ok"]
    for key in dict.fromkeys((r["model"], r["mode"], r["precision"], r["compile"]) for r in rows):
        sel = [r for r in ok if (r["model"], r["mode"], r["precision"], r["compile"]) == key]
        fus = [r for r in sel if r["provider"] not in BASELINES]
        model, mode, precision, compiled = key
        for base in ("official", "reference"):
            ref = [r for r in sel if r["provider"] == base]
            if base == "official" and not any(r["provider"] == base for r in rows):
                continue   # not a provider of this run
            value = (max(r["images_per_s"] for r in fus) / ref[0]["images_per_s"]) if ref and fus else None
            threshold = GPU_TARGETS.get((key, base)) if device.type == "cuda" else None
            details = {base: ref[0]["images_per_s"] if ref else None,
                       "fused": {r["provider"]: r["images_per_s"] for r in fus}}
            if base == "official":
                details.update(sta_shares(sel))
            out.append(dict(
                name=(f"{device.type}: STViT-{model[0].upper()} {mode}, {precision}, "
                      f"{'compiled' if compiled else 'eager'}: fused / {base} images/s"),
                threshold=threshold, value=value, unit="x",
                met=None if value is None or threshold is None else bool(value >= threshold),
                details=details,
                note=None if value is not None else "not measured (a setting failed or was skipped)"))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized: STViT-S, batch 2, float32, infer + train, eager (a couple of minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--batch", type=int, default=None, help="default 64 (--quick: 2)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--precisions", nargs="+", choices=["float32", "autocast"], default=None)
    p.add_argument("--modes", nargs="+", choices=["infer", "train"], default=None)
    p.add_argument("--compile", choices=["off", "on", "both"], default=None,
                   help="default: both (--quick: off; compiling the model takes minutes on 2 cores)")
    p.add_argument("--providers", nargs="+", default=None,
                   help="official, reference, no-sta, official-no-super and backends to compare "
                        "(default: official, reference, the best fused backend, no-sta and "
                        "official-no-super)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="CPU: seconds per measurement")
    p.add_argument("--rep-ms", type=int, default=1000, help="GPU: do_bench repetition time")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<device kind>_model.json)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing JSON of the same device (settings measured again replace "
                        "the old rows): the GPU suite runs model by model")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--plot", action="store_true", help="also draw <stem>.png (plot.py)")
    args = p.parse_args(argv)
    q = args.quick
    args.models = args.models or (["small"] if q else list(MODELS))
    args.batch = args.batch or (2 if q else 64)
    args.precisions = args.precisions or (["float32"] if q else ["float32", "autocast"])
    args.modes = args.modes or ["infer", "train"]
    args.compile = args.compile or ("off" if q else "both")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    fused = common.fused_backends(device, torch.float32)
    providers = args.providers or (["official", "reference"] + fused[:1] + [NO_STA, NO_SUPER])
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    meta = common.metadata(device, argv)
    print(f"device: {meta['device']}; providers: {providers}", file=sys.stderr)

    g = torch.Generator(device="cpu").manual_seed(0)
    n_pool = 3
    pool = [torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g).to(device)
            for _ in range(n_pool)]
    labels = [torch.randint(0, 1000, (args.batch,), generator=g).to(device) for _ in range(n_pool)]

    rows: List[Dict] = []
    for name in args.models:
        torch.manual_seed(0)
        base = MODELS[name](num_classes=1000).to(device)
        print(f"\nSTViT-{name}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
              f"batch {args.batch}, {args.resolution}²", file=sys.stderr)
        for compiled in compiles:
            for mode in args.modes:
                for precision in args.precisions:
                    rows += run_group(base, name, providers, mode, precision, compiled, args,
                                      device, pool, labels)
        del base
    out = args.out or os.path.join(common.RESULTS_DIR, f"{meta['device_kind']}_model.json")
    meta["commands"] = [meta["command"]]
    if args.append and not args.no_save:
        rows, meta["commands"] = common.merge_results(
            out, rows, ("model", "provider", "mode", "precision", "compile", "batch", "resolution"), meta,
            same={})
    targets = speedups(rows, device)
    providers = list(dict.fromkeys([r["provider"] for r in rows] + providers))

    print(f"\nSTViT throughput on {meta['device']} ({common.threads_str(meta['threads'])}), torch {meta['torch']}; "
          f"batch {args.batch}, {args.resolution}²; images/s (median)")
    print(f"{'model':7s} {'mode':6s} {'precision':9s} {'compile':8s}" + "".join(f"{p:>12s}" for p in providers)
          + f"{'fused/ref':>11s}")
    for t, key in zip(targets, dict.fromkeys((r["model"], r["mode"], r["precision"], r["compile"]) for r in rows)):
        cells = []
        for p in providers:
            r = next((r for r in rows if (r["model"], r["mode"], r["precision"], r["compile"]) == key
                      and r["provider"] == p), None)
            v = r["images_per_s"] if r and r.get("status") == "ok" else None
            cells.append((f"{v:.1f}" if v >= 10 else f"{v:.3g}") if v is not None else (r or {}).get("status", "-"))
        ratio = "-" if t["value"] is None else f"{t['value']:.2f}x"
        verdict = "" if t["threshold"] is None else (f"  target >= {t['threshold']:g}x: "
                                                    + ("MET" if t["met"] else "NOT MET"))
        print(f"{key[0]:7s} {key[1]:6s} {key[2]:9s} {'yes' if key[3] else 'no':8s}"
              + "".join(f"{c:>12s}" for c in cells) + f"{ratio:>11s}{verdict}")
    notes = sorted({f"{r['provider']} {r['model']} {r['mode']} {r['precision']}: {r['note']}"
                    for r in rows if r.get("note")})
    for n in notes:
        print(f"  note: {n}")

    payload = dict(kind="model", meta=meta,
                   config=dict(args=vars(args), models=args.models, providers=providers, fused_backends=fused,
                               autocast_dtype="bfloat16", optimizer="AdamW(lr=1e-5)", input_pool=n_pool,
                               timing=(f"triton.testing.do_bench median, rep {args.rep_ms} ms"
                                       if device.type == "cuda" else
                                       "torch.utils.benchmark Timer.timeit, providers interleaved round by "
                                       f"round, >= {args.min_run_time} s and 3 rounds each; median")),
                   results=rows, targets=targets)
    if not args.no_save:
        common.save_results(out, payload, plot=args.plot)
    return payload


if __name__ == "__main__":
    main()
