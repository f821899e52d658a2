"""Shared-memory wavefronts of the Triton kernels' matrix products, modelled from the layouts in
their compiled TTGIR (sm_90, no GPU needed): a model for choosing between designs, not a
measurement.

    python benchmarks/triton_smem_model.py                   # STViT-S stages 1 and 2, float32
    python benchmarks/triton_smem_model.py --warps 2 4 8     # the same at other warp counts
    python benchmarks/triton_smem_model.py --sources /tmp/old_triton_kernels.py   # another version

Why. A float32 ``tl.dot`` (``input_precision="ieee"``) runs as FMAs on CUDA cores. Triton puts
each operand in shared memory without swizzling (``swizzled_shared`` with ``vec = perPhase =
maxPhase = 1``) and every thread then reads all K elements of the operand rows (of A) and columns
(of B) that its part of the result needs. Where a lane's rows lie along the other axis than the
one contiguous in shared memory, the lanes of a warp read addresses a row length apart: with rows
of 64 floats they all hit the same banks. On an H200 (Triton 3.6, B=64, stage 1, float32, Nsight
Compute, 2026-12-04) the fused kernel took 310 us, the aggregate 152 us and the upsample 32 us,
against 38, 19 and 25 us in bfloat16 on tensor cores; this model gave those float32 kernels
11488, 8608 and 2240 wavefronts per cell, 14 to 27 us per thousand.

How. The compiled TTGIR (the recorded launches of ``tests/test_triton_ir.py``, compiled there for
sm_90) names, for every ``ttg.local_load`` into a ``#ttg.dot_op`` of a ``#ttg.blocked`` parent,
the shared layout (order, swizzle) and the parent's ``sizePerThread`` / ``threadsPerWarp`` /
``warpsPerCTA`` / ``order``. A thread owns the result rows (operand A) or columns (operand B) that
the parent layout gives it and reads all of K for each: vectors of up to 16 bytes along the axis
contiguous in shared memory (K, or its own consecutive rows). Every ``ttg.local_alloc`` from
registers is a store by the same rules. Each warp instruction costs max(distinct bytes / 128, the
most distinct 4-byte words in one bank) wavefronts (``csrc/cuda/emu/smem_wavefronts.py``). The
instruction counts per thread this gives matched cuobjdump's ``LDS`` counts of those kernels
(Triton 3.6 and 3.8). Not counted: ``ttg.convert_layout`` (also through shared memory) and the
reductions; tensor-core operands (``#ttg.nvidia_mma`` parents, ``ldmatrix``) are out of scope.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_wavefronts = _load("_smem_wavefronts", ROOT / "csrc" / "cuda" / "emu" / "smem_wavefronts.py").wavefronts

_ELEM = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8}
_INT = r"\[([\d, ]+)\]"


def _ints(s: str):
    return [int(v) for v in s.split(",")]


def layouts(ttgir: str) -> dict:
    """The ``#name = #ttg.blocked<...>`` / ``#ttg.swizzled_shared<...>`` aliases of a TTGIR."""
    out = {}
    for m in re.finditer(rf"^(#\w+) = #ttg\.blocked<\{{sizePerThread = {_INT}, threadsPerWarp = "
                         rf"{_INT}, warpsPerCTA = {_INT}, order = {_INT}\}}>", ttgir, re.M):
        out[m.group(1)] = dict(spt=_ints(m.group(2)), tpw=_ints(m.group(3)),
                               wpc=_ints(m.group(4)), order=_ints(m.group(5)))
    for m in re.finditer(rf"^(#\w+) = #ttg\.swizzled_shared<\{{vec = (\d+), perPhase = (\d+), "
                         rf"maxPhase = (\d+), order = {_INT}\}}>", ttgir, re.M):
        out[m.group(1)] = dict(vec=int(m.group(2)), per_phase=int(m.group(3)),
                               max_phase=int(m.group(4)), order=_ints(m.group(5)))
    return out


def _coords(index: int, sizes, order):
    """A lane (or warp) id as coordinates per axis, ``order[0]`` the fastest."""
    c = [0] * len(sizes)
    for d in order:
        c[d] = index % sizes[d]
        index //= sizes[d]
    return c


def _owned(size: int, spt: int, tpw: int, wpc: int, lane: int, warp: int):
    """The indices along one axis that a thread holds in a blocked layout (wrapping where the
    layout covers more than the tensor: replicated)."""
    cover = spt * tpw * wpc
    return [(r * cover + warp * spt * tpw + lane * spt + i) % size
            for r in range(max(1, -(-size // cover))) for i in range(spt)]


def _word(shape, shared, idx) -> int:
    """Word offset of a 2-D index in a swizzled shared layout."""
    o0, o1 = shared["order"]
    col, row = idx[o0], idx[o1]
    if shared["max_phase"] > 1:
        vec = shared["vec"]
        phase = (row // shared["per_phase"]) % shared["max_phase"]
        col = ((col // vec) ^ phase) * vec + col % vec
    return row * shape[o0] + col


def _program_cost(blocked, elem: int, accesses):
    """(wavefronts, conflict-free wavefronts, instructions per thread) of a program in the
    ``blocked`` layout whose thread at lane / warp coordinates (lc, wc) issues ``accesses(lc, wc)``
    = [(word offset, elements), ...], the i-th of every lane of a warp as one instruction."""
    n_warps = 1
    for v in blocked["wpc"]:
        n_warps *= v
    wf = ideal = n_instr = 0
    for w in range(n_warps):
        wc = _coords(w, blocked["wpc"], blocked["order"])
        lanes = [accesses(_coords(lane, blocked["tpw"], blocked["order"]), wc)
                 for lane in range(32)]
        n_instr = len(lanes[0])
        for i in range(n_instr):
            width = lanes[0][i][1] * elem
            addrs = sorted({lane[i][0] * elem for lane in lanes})
            wf += _wavefronts(addrs, width)
            ideal += max(1, -(-len(addrs) * width // 128))
    return wf, ideal, n_instr


def _held(shape, blocked, axis: int, lc, wc):
    """The indices along ``axis`` that the thread at (lc, wc) holds in a blocked layout."""
    return _owned(shape[axis], blocked["spt"][axis], blocked["tpw"][axis], blocked["wpc"][axis],
                  lc[axis], wc[axis])


def _at(shape, shared, axis_a: int, a: int, b: int) -> int:
    """Word offset of the 2-D index with ``a`` on ``axis_a`` and ``b`` on the other axis."""
    idx = [0, 0]
    idx[axis_a], idx[1 - axis_a] = a, b
    return _word(shape, shared, idx)


def operand_load(shape, shared, op_idx: int, parent, elem: int):
    """(wavefronts, conflict-free wavefronts, instructions per thread) of one FMA dot operand's
    ``local_load`` over the whole program."""
    own = 0 if op_idx == 0 else 1       # the operand axis a thread owns: M of A, N of B
    k_ax = 1 - own

    def accesses(lc, wc):
        rows = _held(shape, parent, own, lc, wc)
        if shared["order"][0] == k_ax:  # vectors along K, for each owned row
            vec = min(16 // elem, shape[k_ax])
            return [(_at(shape, shared, own, r, k), vec)
                    for r in rows for k in range(0, shape[k_ax], vec)]
        vec = min(16 // elem, parent["spt"][own])  # vectors along the owned rows, for each k
        return [(_at(shape, shared, own, rows[g], k), vec)
                for g in range(0, len(rows), vec) for k in range(shape[k_ax])]

    return _program_cost(parent, elem, accesses)


def register_store(shape, shared, blocked, elem: int):
    """(wavefronts, conflict-free wavefronts) of a ``local_alloc`` from a blocked tensor."""
    contiguous = shared["order"][0]
    vec = min(16 // elem, blocked["spt"][contiguous]) if blocked["order"][0] == contiguous else 1

    def accesses(lc, wc):
        inner = _held(shape, blocked, contiguous, lc, wc)
        return [(_at(shape, shared, contiguous, inner[g], r), vec)
                for r in _held(shape, blocked, 1 - contiguous, lc, wc)
                for g in range(0, len(inner), vec)]

    return _program_cost(blocked, elem, accesses)[:2]


_LOAD = re.compile(r"ttg\.local_load %\S+ : !ttg\.memdesc<(\d+)x(\d+)x(\w+), (#\w+)[^>]*> -> "
                   r"tensor<\d+x\d+x\w+, #ttg\.dot_op<\{opIdx = (\d), parent = (#\w+)\}>>")
_ALLOC = re.compile(r"ttg\.local_alloc %\S+ : \(tensor<(\d+)x(\d+)x(\w+), (#\w+)>\) -> "
                    r"!ttg\.memdesc<\d+x\d+x\w+, (#\w+)")


def analyse(ttgir: str):
    """Per shared-memory access of a kernel's products: dicts of ``what``, ``shape``,
    ``wavefronts``, ``ideal`` (the same bytes without bank conflicts) and, for loads,
    ``per_thread`` (instructions). Loads into tensor-core operands are skipped."""
    lay = layouts(ttgir)
    out = []
    for m in _LOAD.finditer(ttgir):
        shape, elem = [int(m.group(1)), int(m.group(2))], _ELEM[m.group(3)]
        parent = lay.get(m.group(6))
        if parent is None or "spt" not in parent or m.group(4) not in lay:
            continue
        wf, ideal, n = operand_load(shape, lay[m.group(4)], int(m.group(5)), parent, elem)
        out.append(dict(what=f"load operand {'AB'[int(m.group(5))]}", shape=shape,
                        wavefronts=wf, ideal=ideal, per_thread=n))
    for m in _ALLOC.finditer(ttgir):
        shape, elem = [int(m.group(1)), int(m.group(2))], _ELEM[m.group(3)]
        src, dst = lay.get(m.group(4)), lay.get(m.group(5))
        if src is None or dst is None or "spt" not in src or "vec" not in dst:
            continue
        wf, ideal = register_store(shape, dst, src, elem)
        out.append(dict(what="store", shape=shape, wavefronts=wf, ideal=ideal))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warps", type=int, nargs="*", default=[0],
                    help="num_warps of the products' kernels (0: the plan's rule)")
    ap.add_argument("--sources", type=Path, default=None,
                    help="another stvit_kernels/triton_kernels.py to model (e.g. an old version)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("-v", "--verbose", action="store_true", help="every access of every kernel")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    ir = _load("_test_triton_ir", ROOT / "tests" / "test_triton_ir.py")
    if args.sources:
        ir.KERNELS = args.sources.resolve()
    tk = ir._load_kernels()
    compile_ = ir._Compiler()
    import triton
    print(f"triton {triton.__version__}, sm_{ir.ARCH}, {args.dtype}; wavefronts per program "
          f"(one cell), conflict-free in brackets")
    for C, h, w in ((64, 8, 8), (128, 4, 4)):
        case = ir._case(args.dtype, C, h, w, grid=(7, 7))
        for warps in args.warps:
            with tk.plan_overrides(num_warps=warps):  # (the plan's cache keys on the limits)
                launches = ir._record_launches(tk, case)
            seen = set()
            for fn, kwargs in launches:
                if fn.__name__ in seen or fn.__name__ in ("_reduce_kernel", "_pool_kernel"):
                    continue
                seen.add(fn.__name__)
                rep = compile_(fn, kwargs)
                rows = analyse(rep["ttgir"])
                wf = sum(r["wavefronts"] for r in rows)
                ideal = sum(r["ideal"] for r in rows)
                print(f"  C={C:3d} {h}x{w} {fn.__name__:28s} {rep['num_warps']} warps "
                      f"{rep['regs']:3d} regs, stack {rep['stack']:4d} B: {wf:6d} ({ideal})")
                if args.verbose:
                    for r in rows:
                        extra = f", {r['per_thread']} per thread" if "per_thread" in r else ""
                        print(f"      {r['what']} {r['shape']}: {r['wavefronts']} ({r['ideal']}){extra}")


if __name__ == "__main__":
    main()
