"""Nsight Compute evidence for the STA kernels (issue 12): achieved DRAM traffic and throughput of
every kernel of one module step (forward + backward) on the ``cuda`` and ``triton`` backends at
the STViT-S stage shapes, B=64, float32 and bfloat16 autocast.

Two halves, one file:

* ``run``: the driver that ncu profiles. Each case warms up, then brackets one forward+backward
  with ``torch.cuda.profiler.start()/stop()`` (ncu ``--profile-from-start off`` sees only that
  call) inside an NVTX range named after the case.
* ``report``: reads ncu's CSV and prints, per case and kernel, the time, DRAM bytes, achieved
  DRAM throughput (as ncu measures it, and as a share of the copy bandwidth ``--copy-gbs``),
  into a JSON beside.

    ncu --profile-from-start off --nvtx --csv \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,\\
dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python benchmarks/ncu_kernels.py run [cuda] [triton] > ncu.csv
    python benchmarks/ncu_kernels.py report ncu.csv --out ncu_kernels.json

(``benchmarks/gpu_check.sh`` steps ``ncu`` and ``ncu_triton`` run both, one backend each; step
``ncu_detail`` runs ``ncu --set detailed`` on the CUDA pixel-side kernels of stage 1 alone, ``run
cuda --cases stage1``: occupancy, warp stall reasons, shared-memory and L1/L2 traffic, the
instruction mix, ncu's own hints, as text.)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import os
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: (name, C, side, stoken, heads): the STViT-S stages 1 and 2, B=64
CASES = (("stage1", 64, 56, 8, 1), ("stage2", 128, 28, 4, 2))
DTYPES = ("float32", "bfloat16")
BACKENDS = ("cuda", "triton")
BATCH = 64


def run(backends=BACKENDS, cases=None, dtypes=DTYPES) -> None:
    """``cases``: names of :data:`CASES` (default: all)."""
    import torch
    from stvit_kernels import SuperTokenAttention

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    chosen = [c for c in CASES if cases is None or c[0] in cases]
    for (name, C, side, stoken, heads), backend in ((c, b) for c in chosen for b in backends):
        m = SuperTokenAttention(C, stoken, n_iter=1, num_heads=heads, backend=backend).cuda()
        x = torch.randn(BATCH, C, side, side, device="cuda", requires_grad=True)
        for dt in dtypes:
            def step():
                # gradients set to None: no accumulation kernels (x.grad's add moved 128 MB at
                # stage 1); the backward on this thread, inside the case's NVTX range (NVTX ranges
                # are per thread, and autograd runs a GPU backward on a thread of its own)
                x.grad = None
                m.zero_grad(set_to_none=True)
                with torch.autograd.set_multithreading_enabled(False):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dt != "float32"):
                        y = m(x)
                    y.float().sum().backward()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(f"{name}-{backend}-{dt}")
            torch.cuda.profiler.start()
            step()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            torch.cuda.nvtx.range_pop()


def _num(v: str) -> float:
    return float(v.replace(",", "")) if v not in ("", "n/a") else float("nan")


#: ncu's metric units (as --csv prints them, e.g. "ns", "byte", "Kbyte", "%") in seconds / bytes
UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "ns": 1e-9, "nsecond": 1e-9,
         "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3, "s": 1, "second": 1, "%": 1}


def _nvtx_range(row: dict) -> str:
    """The NVTX range a launch ran in (``--nvtx``): the column ncu names after the push/pop domain
    (``thread Domain:Push/Pop_Range:...``), whose value reads ``<default domain>:NAME:...``."""
    for k, v in row.items():
        if k and k.startswith("thread Domain") and v:
            m = re.search(r"<default domain>:([^:]+):", v)
            if m:
                return m.group(1)
    return row.get("NVTX", "") or ""


def report(path: str, copy_gbs: float, out: str | None) -> None:
    text = open(path).read()
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit(f"{path}: no ncu CSV rows (see the log)")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    # one row per (kernel launch, metric); units as ncu prints them
    launches = defaultdict(dict)
    for r in rows:
        if not r.get("Metric Name"):
            continue
        unit = r["Metric Unit"]
        if unit not in UNITS:
            raise SystemExit(f"{path}: unknown ncu unit {unit!r} for {r['Metric Name']}")
        key = (r["ID"], r.get("Kernel Name", ""), _nvtx_range(r))
        launches[key][r["Metric Name"]] = _num(r["Metric Value"]) * UNITS[unit]
    result = []
    for (lid, kernel, nvtx), m in sorted(launches.items(), key=lambda kv: int(kv[0][0])):
        t = m.get("gpu__time_duration.sum", float("nan"))
        nbytes = m.get("dram__bytes_read.sum", 0.0) + m.get("dram__bytes_write.sum", 0.0)
        gbs = nbytes / t / 1e9 if t > 0 else float("nan")
        result.append(dict(id=int(lid), case=nvtx, kernel=kernel[:120], us=t * 1e6, dram_mb=nbytes / 1e6,
                           dram_gbs=gbs, share_of_copy=gbs / copy_gbs if copy_gbs else None,
                           dram_pct_of_peak=m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed")))
    for r in result:
        print(f"{r['case'][:28]:28s} {r['us']:8.1f} us {r['dram_mb']:8.2f} MB {r['dram_gbs']:7.0f} GB/s "
              f"{100 * (r['share_of_copy'] or 0):5.1f}% of copy  {r['kernel'][:70]}")
    if out:
        with open(out, "w") as f:
            json.dump(dict(copy_gbs=copy_gbs, launches=result), f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the profiled driver (run it under ncu)")
    r.add_argument("backends", nargs="*", default=list(BACKENDS), choices=BACKENDS)
    r.add_argument("--cases", nargs="+", default=None, choices=[c[0] for c in CASES])
    r.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    r = sub.add_parser("report", help="summarise ncu's CSV")
    r.add_argument("csv")
    r.add_argument("--copy-gbs", type=float, default=4250.0,
                   help="device-to-device copy bandwidth, GB/s (H200, measured: 4250)")
    r.add_argument("--out", default=None)
    a = p.parse_args()
    if a.cmd == "run":
        run(tuple(a.backends), a.cases, tuple(a.dtypes))
    else:
        report(a.csv, a.copy_gbs, a.out)


if __name__ == "__main__":
    main()
