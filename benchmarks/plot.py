"""Plots and README tables drawn from the JSON the benchmark scripts write (never from new runs).

    python benchmarks/plot.py benchmarks/results/cpu_ops.json          # -> cpu_ops_time.png, cpu_ops_memory.png
    python benchmarks/plot.py benchmarks/results/cpu_model.json        # -> cpu_model.png
    python benchmarks/plot.py --markdown benchmarks/results/cpu_ops.json benchmarks/results/cpu_model.json

Op results (``bench_ops.py``): ``<stem>_time.png``, median time against the number of tokens
(H*W), log-log, one line per provider, one panel per op and mode (sweep shapes only);
``<stem>_memory.png``, memory against tokens per op: the GPU's peak extra memory of a fwd+bwd
call where it was measured, else the bytes saved for backward (see ``benchmarks/common.py``).
Model results (``bench_model.py``): ``<stem>.png``, images per second per model and setting.
``--markdown`` prints the tables for a README instead (no matplotlib needed): per op and shape the
median wall time of every provider with the ratios (headline: ``official / fused``, the official
algorithm against the best fused backend), and on a GPU a per-call table per provider (wall, host,
CUDA-graph GPU time, kernels; see ``benchmarks/common.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

#: Fixed colours and markers, so a provider looks the same in every figure.
STYLE = {
    "reference": ("#7f7f7f", "o"),
    "reference+compile": ("#bcbd22", "v"),
    "official": ("#ff7f0e", "P"),
    "official+compile": ("#e377c2", "*"),
    "cpu": ("#1f77b4", "s"),
    "cuda": ("#d62728", "s"),
    "triton": ("#2ca02c", "D"),
    "dense-sdpa": ("#9467bd", "^"),
    "dense-naive": ("#8c564b", "x"),
}
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")


def load(path: str) -> Dict:
    with open(path) as f:
        data = json.load(f)
    data.setdefault("kind", "model" if "models" in data.get("config", {}) else "ops")
    return data


def _style(provider: str):
    return STYLE.get(provider, (None, "o"))


def _title(data: Dict, extra: str = "") -> str:
    m = data["meta"]
    threads = f", {common.threads_str(m['threads'])}" if m.get("device_type") == "cpu" else ""
    return f"{m['device']}{threads} — torch {m['torch']} — {m['date'][:10]}{extra}"


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _token_axis(ax, sides: List[int]) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted(set(sides))
    ax.set_xticks([s * s for s in ticks])
    ax.set_xticklabels([f"{s}²" for s in ticks], fontsize=8)
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)


def _header(fig, handles: Dict, title: str) -> None:
    """Title (two lines) and the provider legend above the panels, in a fixed band of inches."""
    h = fig.get_figheight()
    band = 1.0  # inches
    fig.tight_layout(rect=(0, 0, 1, 1 - band / h))
    fig.suptitle(title, fontsize=10, y=1 - 0.05 / h, va="top")
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center",
               ncol=min(7, len(handles)), bbox_to_anchor=(0.5, 1 - 0.5 / h), frameon=False, fontsize=9)


def plot_ops(data: Dict, stem: str) -> List[str]:
    """``<stem>_time.png`` and ``<stem>_memory.png``; returns the paths written."""
    plt = _plt()
    rows = [r for r in data["results"] if r.get("tag") == "sweep" and r.get("status") == "ok"]
    if not rows:
        print(f"{stem}: no sweep results to plot", file=sys.stderr)
        return []
    ops = list(dict.fromkeys(r["op"] for r in rows))
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]
    r0 = rows[0]
    shape = f"B={r0['batch']}, C={r0['dim']}, {r0['stoken']}x{r0['stoken']} super tokens, {r0['heads']} head(s), {r0['dtype']}"
    written = []

    # time vs tokens
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(4.2 * len(modes), 3.2 * len(ops)),
                             squeeze=False)
    handles = {}
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            for prov in dict.fromkeys(r["provider"] for r in sel):
                pts = sorted((r["tokens"], r["ms"]) for r in sel if r["provider"] == prov)
                color, marker = _style(prov)
                (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                               label=prov, linewidth=1.5, markersize=5)
                handles.setdefault(prov, h)
            _token_axis(ax, [r["side"] for r in rows])
            ax.set_title(f"{op} — {mode}", fontsize=10)
            if j == 0:
                ax.set_ylabel("time (ms, median)")
            if i == len(ops) - 1:
                ax.set_xlabel("tokens (H×W)")
            if not sel:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    _header(fig, handles, f"{_title(data)}\n{shape}")
    path = f"{stem}_time.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

    # memory vs tokens
    mem_rows, label = _memory_rows(rows)
    if mem_rows:
        mops = list(dict.fromkeys(r["op"] for r in mem_rows))
        fig, axes = plt.subplots(1, len(mops), figsize=(4.4 * len(mops), 3.6), squeeze=False)
        handles = {}
        for j, op in enumerate(mops):
            ax = axes[0][j]
            sel = [r for r in mem_rows if r["op"] == op]
            nothing = []
            for prov in dict.fromkeys(r["provider"] for r in sel):
                pts = sorted((r["tokens"], r["_mem"]) for r in sel if r["provider"] == prov)
                if all(p[1] == 0 for p in pts):
                    nothing.append(prov)
                color, marker = _style(prov)
                # 0 bytes cannot sit on a log axis: drawn as a gap, named in the panel instead
                (h,) = ax.plot([p[0] for p in pts], [p[1] / (1 << 20) if p[1] > 0 else float("nan")
                                                     for p in pts],
                               marker=marker, color=color, label=prov, linewidth=1.5, markersize=5)
                handles.setdefault(prov, h)
            if nothing:
                ax.text(0.03, 0.97, "0 bytes beyond the inputs: " + ", ".join(nothing),
                        transform=ax.transAxes, va="top", fontsize=8)
            _token_axis(ax, [r["side"] for r in rows])
            ax.set_title(op, fontsize=10)
            ax.set_xlabel("tokens (H×W)")
            if j == 0:
                ax.set_ylabel(f"{label} (MiB)")
        _header(fig, handles, f"{_title(data)}\n{shape}")
        path = f"{stem}_memory.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _memory_rows(rows: List[Dict]):
    """Rows with a memory figure, and its label: GPU peak of fwd+bwd if measured, else saved bytes."""
    peak = [dict(r, _mem=r["peak_bytes"]) for r in rows
            if r["mode"] == "fwd+bwd" and r.get("peak_bytes") is not None]
    if peak:
        return peak, "peak extra memory, fwd+bwd"
    seen, out = set(), []
    for r in rows:
        key = (r["op"], r["provider"], r["side"])
        if r.get("saved_bytes") is not None and key not in seen:
            seen.add(key)
            out.append(dict(r, _mem=r["saved_bytes"]))
    return out, "saved for backward"


def plot_model(data: Dict, stem: str) -> List[str]:
    """``<stem>.png``: images/s, one panel per model, bars per provider for every setting."""
    plt = _plt()
    rows = [r for r in data["results"] if r.get("status") == "ok"]
    if not rows:
        print(f"{stem}: no model results to plot", file=sys.stderr)
        return []
    models = list(dict.fromkeys(r["model"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    settings = list(dict.fromkeys((r["mode"], r["precision"], r["compile"]) for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(max(6.0, 1.3 * len(settings) + 2), 3.3 * len(models)),
                             squeeze=False)
    width = 0.8 / max(1, len(providers))
    handles = {}
    for i, model in enumerate(models):
        ax = axes[i][0]
        for k, prov in enumerate(providers):
            xs, vals = [], []
            for j, st in enumerate(settings):
                hit = [r for r in rows if r["model"] == model and r["provider"] == prov
                       and (r["mode"], r["precision"], r["compile"]) == st]
                if hit:
                    xs.append(j + (k - (len(providers) - 1) / 2) * width)
                    vals.append(hit[0]["images_per_s"])
            color, _ = _style(prov)
            h = ax.bar(xs, vals, width, label=prov, color=color)
            handles.setdefault(prov, h)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels([f"{mode} {p}\n{'compiled' if c else 'eager'}" for mode, p, c in settings],
                           fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title(f"STViT-{model[0].upper()} ({model})", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    b = rows[0]["batch"]
    _header(fig, handles, f"{_title(data)}\nbatch {b}, {rows[0]['resolution']}² input")
    path = f"{stem}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


def plot_file(path: str) -> List[str]:
    """Draw the figures of one results file next to it; returns the paths written (none if
    matplotlib is missing)."""
    try:
        _plt()
    except ImportError:
        print("matplotlib is not installed: no PNGs (pip install matplotlib)", file=sys.stderr)
        return []
    data = load(path)
    stem = os.path.splitext(path)[0]
    written = plot_model(data, stem) if data["kind"] == "model" else plot_ops(data, stem)
    for p in written:
        print(f"wrote {p}", file=sys.stderr)
    return written


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------

def _warning(data: Dict) -> List[str]:
    w = common.busy_warning(data["meta"])
    return [f"> {w}", ""] if w else []


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ratio(a: Optional[Dict], b: Optional[Dict]) -> str:
    return "–" if not a or not b else f"{a['ms'] / b['ms']:.1f}x"


def _per_call_rows(sel: List[Dict]) -> List[Dict]:
    """Rows of a group that carry the GPU per-call breakdown (or say why a part is missing)."""
    keys = ("gpu_ms", "kernels", "gpu_note", "kernels_note", "host_note")
    return [r for r in sel if r.get("status") == "ok" and any(k in r for k in keys)]


def _per_call_table(rows: List[Dict]) -> List[str]:
    """GPU: wall / host / CUDA-graph GPU time and kernels per call, one line per provider and mode."""
    out = [_md_row(["tokens", "mode", "provider", "wall ms", "host ms", "GPU ms (graph)", "host / GPU",
                    "kernels", "peak memory"]),
           _md_row(["---:", ":--", ":--", "---:", "---:", "---:", "---:", "---:", "---:"])]
    notes = []
    for r in rows:
        host, gpu = r.get("host_ms"), r.get("gpu_ms")
        mark = ""
        for k in ("host_note", "gpu_note", "kernels_note"):
            if r.get(k):
                notes.append(r[k])
                mark += f" [{len(notes)}]"
        ms = lambda v: "–" if v is None else common.fmt_ms(v)  # noqa: E731
        out.append(_md_row([
            f"{r['side']}²", r["mode"], r["provider"], ms(r["ms"]), ms(host), ms(gpu) + mark,
            f"{host / gpu:.1f}" if host and gpu else "–",
            "–" if r.get("kernels") is None else f"{r['kernels']:g}",
            "–" if r.get("peak_bytes") is None else common.fmt_bytes(r["peak_bytes"])]))
    out.append("")
    for i, n in enumerate(notes, 1):
        out.append(f"[{i}] {n}  ")
    if notes:
        out.append("")
    return out


def markdown_ops(data: Dict) -> str:
    fused = set(data["config"].get("fused_backends", []))
    rows = data["results"]
    meta = data["meta"]
    out = [f"**STA ops** — {_title(data)}, {rows[0]['dtype'] if rows else ''}. "
           f"Median ms; ratios are times measured in the same run; `official` is the official STViT "
           f"algorithm op for op (`benchmarks/official.py`), the headline baseline.", ""]
    out += _warning(data)
    if meta.get("device_type") == "cpu":
        out += ["On a CPU the host does the work itself: host time per call is the wall time below. "
                "GPU time (CUDA-graph replay) and kernels per call are measured on a GPU only.", ""]
    if data.get("copy_bandwidth"):
        out += [f"Copy bandwidth: {data['copy_bandwidth']['gbps']:.0f} GB/s.", ""]
    for op, tag in dict.fromkeys((r["op"], r["tag"]) for r in rows):
        sel = [r for r in rows if r["op"] == op and r["tag"] == tag]
        provs = list(dict.fromkeys(r["provider"] for r in sel))
        fprovs = [p for p in provs if p in fused]
        r0 = sel[0]
        threads = (f", {common.threads_str(r0['threads'])}"
                   if r0.get("threads") and r0["threads"] != meta.get("threads") else "")
        out.append(f"`{op}` ({tag}: B={r0['batch']}, C={r0['dim']}, {r0['stoken']}x{r0['stoken']} "
                   f"super tokens, {r0['heads']} head(s){threads})")
        out.append("")
        extra = (["official / fused"] if fprovs and "official" in provs else []) + \
                (["reference / fused"] if fprovs and "reference" in provs else []) + \
                (["SDPA / STA"] if "dense-sdpa" in provs else []) + \
                (["fused % of copy BW"] if any("bw_frac" in r for r in sel) else [])
        out.append(_md_row(["tokens", "mode"] + provs + extra))
        out.append(_md_row(["---:", ":--"] + ["---:"] * (len(provs) + len(extra))))
        for side, mode in dict.fromkeys((r["side"], r["mode"]) for r in sel):
            cells = {r["provider"]: r for r in sel if r["side"] == side and r["mode"] == mode}
            ok = {k: v for k, v in cells.items() if v.get("status") == "ok"}
            line = [f"{side}²", mode]
            for p in provs:
                r = cells.get(p)
                line.append(common.fmt_ms(r["ms"]) if r and r.get("status") == "ok"
                            else (r or {}).get("status", "–"))
            bf = min((ok[p] for p in fprovs if p in ok), key=lambda r: r["ms"], default=None)
            bs = bf or ok.get("reference")
            if "official / fused" in extra:
                line.append(_ratio(ok.get("official"), bf))
            if "reference / fused" in extra:
                line.append(_ratio(ok.get("reference"), bf))
            if "SDPA / STA" in extra:
                line.append(_ratio(ok.get("dense-sdpa"), bs))
            if "fused % of copy BW" in extra:
                line.append(f"{100 * bf['bw_frac']:.0f}%" if bf and "bw_frac" in bf else "–")
            out.append(_md_row(line))
        out.append("")
        per_call = _per_call_rows(sel)
        if per_call:
            out.append("Per call (GPU):")
            out.append("")
            out += _per_call_table(per_call)
    if data.get("targets"):
        out += ["Targets (computed from the figures above):", "",
                _md_row(["target", "measured", "threshold", "met"]), _md_row([":--", "---:", "---:", ":-:"])]
        for t in data["targets"]:
            val, thr = common.target_strings(t)
            met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
            out.append(_md_row([t["name"], val, thr, met]))
        out.append("")
    if data.get("baseline"):
        b = data["baseline"]
        out += [f"Baseline of the proxy target: library at commit `{(b.get('commit') or '?')[:12]}`, "
                f"{b.get('date', '?')[:10]}.", ""]
    out.append(f"Command: `{meta['command']}`")
    return "\n".join(out)


def _fmt_rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def markdown_model(data: Dict) -> str:
    rows = [r for r in data["results"]]
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    out = [f"**STViT images/s** — {_title(data)}."
           + (" `official`: every super token attention runs the official algorithm op for op "
              "(`benchmarks/official.py`)." if "official" in provs else ""), ""]
    out += _warning(data)
    bases = [p for p in ("official", "reference") if p in provs]
    fus = [p for p in provs if p not in ("official", "reference", "no-sta", "official-no-super")
           and not p.startswith("reference")]
    ratios = [b for b in bases if fus]
    # with no-sta (the model without STA): the STA's share of the step, and the Amdahl bound;
    # with official-no-super, the same for the official super-token STA alone
    amdahl = "no-sta" in provs and "official" in provs
    super_ = "official-no-super" in provs and "official" in provs
    extra = (["STA share: official / fused", "bound (official / no-sta)"] if amdahl else []) + \
        (["super-token STA share: official", "bound (official / official-no-super)"] if super_ else [])
    out.append(_md_row(["model", "mode", "precision", "torch.compile", "batch"] + provs
                       + [f"fused / {b}" for b in ratios] + extra))
    out.append(_md_row([":--", ":--", ":--", ":--", "---:"]
                       + ["---:"] * (len(provs) + len(ratios) + len(extra))))
    for key in dict.fromkeys((r["model"], r["mode"], r["precision"], r["compile"]) for r in rows):
        sel = {r["provider"]: r for r in rows if (r["model"], r["mode"], r["precision"], r["compile"]) == key}
        line = [key[0], key[1], key[2], "yes" if key[3] else "no", next(iter(sel.values()))["batch"]]
        for p in provs:
            r = sel.get(p)
            line.append(_fmt_rate(r["images_per_s"]) if r and r.get("status") == "ok"
                        else (r or {}).get("status", "–"))
        b = [sel[p] for p in fus if p in sel and sel[p].get("status") == "ok"]
        for base in ratios:
            a = sel.get(base)
            line.append(f"{max(x['images_per_s'] for x in b) / a['images_per_s']:.2f}x"
                        if a and a.get("status") == "ok" and b else "–")
        if amdahl:
            ms = {p: r["ms"] for p, r in sel.items() if r.get("status") == "ok"}
            best = min((ms[p] for p in fus if p in ms), default=None)
            if "no-sta" in ms and "official" in ms and best is not None:
                t0 = ms["no-sta"]
                line += [f"{100 * (1 - t0 / ms['official']):.0f}% / {100 * (1 - t0 / best):.0f}%",
                         f"{ms['official'] / t0:.2f}x"]
            else:
                line += ["–", "–"]
        if super_:
            ms = {p: r["ms"] for p, r in sel.items() if r.get("status") == "ok"}
            if "official-no-super" in ms and "official" in ms:
                t0 = ms["official-no-super"]
                line += [f"{100 * (1 - t0 / ms['official']):.0f}%", f"{ms['official'] / t0:.2f}x"]
            else:
                line += ["–", "–"]
        out.append(_md_row(line))
    out.append("")
    if data.get("targets"):
        out += [_md_row(["target", "measured", "threshold", "met"]), _md_row([":--", "---:", "---:", ":-:"])]
        for t in data["targets"]:
            val, thr = common.target_strings(t)
            out.append(_md_row([t["name"], val, thr, {True: "yes", False: "**no**", None: "–"}[t["met"]]]))
        out.append("")
    out.append(f"Command: `{data['meta']['command']}`")
    return "\n".join(out)


def markdown(path: str) -> str:
    data = load(path)
    return markdown_model(data) if data["kind"] == "model" else markdown_ops(data)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="results JSON written by bench_ops.py / bench_model.py")
    p.add_argument("--markdown", action="store_true", help="print README tables instead of drawing")
    args = p.parse_args(argv)
    for path in args.files:
        if args.markdown:
            print(markdown(path))
            print()
        else:
            plot_file(path)


if __name__ == "__main__":
    main()
