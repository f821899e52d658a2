"""Shared-memory wavefronts of the aggregating cell kernels (sta_kernels.cuh), counted from the
addresses each warp issues: a model for choosing between designs without a GPU, not a measurement.

For every shared-memory instruction of a warp (its active lanes and their byte addresses and
access width), the wavefronts are max(distinct bytes / 128, the largest number of distinct 4-byte
words that fall in one of the 32 banks); one wavefront per cycle and SM. Lanes whose loops have
different trip counts issue their i-th access together (divergent tails counted once per lane
group). Replays the plan that plan_cells picks (passed in, see below) for one tile of the
stage's shape.

    python csrc/cuda/emu/smem_wavefronts.py              # STViT-S stage 1, float32 and bfloat16

Phases counted per batch of pixels: the copy of x into the cache (elements of acc_t: 4 bytes in
float32 and 16-bit types, 8 in float64; the `scalar_t x cache` rows: 2 bytes, as until
2026-12-07), phase 1's reads (its row of x, the 9 staged super tokens per channel vector),
phase 2's reads (x vectors and weights) for column units (one thread per extended column and
channel vector, 3 slot rows) and for cell units (one thread per cell and channel vector, 9 slots),
the latter with the weights as 9 scalar rows of the block (before 2026-12-07) and as a row of 12
per pixel read as vectors (sta_kernels.cuh, a_row).
"""
from __future__ import annotations

import argparse
from collections import defaultdict


def wavefronts(accesses, width):
    """accesses: byte addresses of one warp instruction (one per active lane); width in bytes."""
    if not accesses:
        return 0
    words = set()
    for a in accesses:
        for off in range(0, max(width, 4), 4):
            words.add((a + off) // 4)
    per_bank = defaultdict(set)
    for w in words:
        per_bank[w % 32].add(w)
    distinct_bytes = len({a + o for a in accesses for o in range(width)})
    return max(-(-distinct_bytes // 128), max(len(v) for v in per_bank.values()))


def lockstep(per_lane):
    """per_lane: lane -> list of instructions [(address, width), ...]; yields the warp's i-th."""
    n = max((len(v) for v in per_lane.values()), default=0)
    for i in range(n):
        yield [v[i] for v in per_lane.values() if i < len(v)]


def fetch_rotation(q):
    """The channel lane q of a warp starts its copies of x at (sta_kernels.cuh, fetch_pixel)."""
    return (q >> 3) & 3


def count(C, h, w, ww, NC, BS, XC, SK, CW, scalar, xsize, acc, rotate):
    """scalar: bytes of an element of A; xsize: of the x cache's; acc: of the staged s's."""
    V = 16 // acc
    NCE = NC + 2
    TW = NC * w
    TP = h * TW
    NVC = CW // V
    s_off = 0
    a_off = s_off + 3 * NCE * SK * acc
    a_off = (a_off + 15) // 16 * 16
    x_off = a_off + 9 * BS * scalar  # A_sh holds scalar_t
    x_off = (x_off + 15) // 16 * 16
    res = defaultdict(int)
    batches = 0
    for pb in range(0, TP, BS):
        batches += 1
        nb = min(BS, TP - pb)
        for warp in range(0, BS, 32):
            lanes = [q for q in range(warp, warp + 32) if q < nb]
            # -- the copy of x into the cache: lane q, step i writes channel (i + rot) % C of row q
            for i in range(C):
                acc_list = []
                for q in lanes:
                    rot = fetch_rotation(q) if rotate else 0
                    c = (i + rot) % C
                    acc_list.append(x_off + (q * XC + c) * xsize)
                res["fetch"] += wavefronts(acc_list, xsize)
            # -- phase 1: the row's channel vector, then the 9 super tokens
            for cc in range(0, C, V):
                res["phase1 x"] += wavefronts([x_off + (q * XC + cc) * xsize for q in lanes],
                                              V * xsize)
                for k in range(9):
                    addrs = []
                    for q in lanes:
                        tc = ((pb + q) % TW) // w
                        addrs.append(s_off + (((k // 3) * NCE + tc + k % 3) * SK + cc) * acc)
                    res["phase1 s"] += wavefronts(addrs, V * acc)
        # pixels of tile cell tc in this batch, in the kernels' order (rows, then columns)
        def cell_pixels(tc):
            out = []
            for r in range(pb // TW, (pb + nb - 1) // TW + 1):
                row0 = r * TW + tc * w
                out += [pj - pb for pj in range(max(pb, row0), min(pb + nb, row0 + w))]
            return out
        # -- phase 2, column units (the extended columns in the grid; the first tile of a row)
        units = [(sc, c) for sc in range(1, min(NC + 1, ww) + 1) for c in range(NVC)]
        for base in range(0, len(units), BS):
            for warp in range(base, min(base + BS, len(units)), 32):
                per_lane = {}
                for u in range(warp, min(warp + 32, len(units))):
                    sc, cv = units[u]
                    ins = []
                    for kc in range(3):
                        tc = sc - kc
                        if 0 <= tc < NC:
                            for qq in cell_pixels(tc):
                                ins.append([(x_off + (qq * XC + cv * V) * xsize, V * xsize)] +
                                           [(a_off + (k * BS + qq) * scalar, scalar)
                                            for k in (kc, 3 + kc, 6 + kc)])
                    per_lane[u] = ins
                for group in lockstep(per_lane):
                    for j in range(4):
                        res["phase2 columns"] += wavefronts([g[j][0] for g in group], group[0][j][1])
        # -- phase 2, cell units, the weights as 9 scalars (A_sh[k * BS + qq]) or as vectors of a
        # pixel row of 12 (a_row(qq): rows skewed by 4 elements every 8 pixels)
        AV = min(4, 16 // scalar)
        def a_row(qq):
            return qq * 12 + (qq >> 3) * 4
        a_end = a_off + (BS * 12 + (BS // 8 + 1) * 4) * scalar
        x_off_rows = (a_end + 15) // 16 * 16
        units = [(tc, c) for tc in range(NC) for c in range(NVC)]
        for warp in range(0, len(units), 32):
            per_lane = {}
            for u in range(warp, min(warp + 32, len(units))):
                tc, cv = units[u]
                per_lane[u] = [[(x_off_rows + (qq * XC + cv * V) * xsize, V * xsize)] +
                               [(a_off + (a_row(qq) + j * AV) * scalar, AV * scalar)
                                for j in range(12 // AV)]
                               for qq in cell_pixels(tc)]
            for group in lockstep(per_lane):
                for j in range(len(group[0])):
                    res["phase2 cells, A rows"] += wavefronts([g[j][0] for g in group],
                                                              group[0][j][1])
        for warp in range(0, len(units), 32):
            per_lane = {}
            for u in range(warp, min(warp + 32, len(units))):
                tc, cv = units[u]
                per_lane[u] = [[(x_off + (qq * XC + cv * V) * xsize, V * xsize)] +
                               [(a_off + (k * BS + qq) * scalar, scalar) for k in range(9)]
                               for qq in cell_pixels(tc)]
            for group in lockstep(per_lane):
                for j in range(10):
                    res["phase2 cells"] += wavefronts([g[j][0] for g in group], group[0][j][1])
    return {k: v / batches for k, v in res.items()}, batches


STAGES = {  # name: C, h, w, ww, NC, BS, XC, SK, CW, bytes of A, x cache, acc (plan_cells, sm_90)
    # (rows of the x cache XC = 76 / 70 elements before 2026-12-07, now the slot's CW where CW / V
    # is odd: 68 / 66)
    "stage1 float32": (64, 8, 8, 7, 7, 128, 68, 68, 68, 4, 4, 4),
    # until 2026-12-07 the 16-bit x cache held scalar_t: 256-thread blocks, 2-byte rows
    "stage1 bfloat16, scalar_t x cache": (64, 8, 8, 7, 7, 256, 76, 68, 68, 2, 2, 4),
    "stage1 bfloat16": (64, 8, 8, 7, 7, 128, 68, 68, 68, 2, 4, 4),
    "stage1 float64": (64, 8, 8, 7, 7, 64, 66, 66, 66, 8, 8, 8),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args()
    for name, (C, h, w, ww, NC, BS, XC, SK, CW, sc, xs, ac) in STAGES.items():
        for rotate in (False, True):
            res, nb = count(C, h, w, ww, NC, BS, XC, SK, CW, sc, xs, ac, rotate)
            print(f"{name}, {'rotated' if rotate else 'in-order'} copies of x, per batch of "
                  f"{BS} pixels ({nb} batches per tile), wavefronts per block:")
            for k in sorted(res):
                print(f"  {k:16s} {res[k]:8.0f}")
            old = res["fetch"] + res["phase1 x"] + res["phase1 s"] + res["phase2 columns"]
            new = res["fetch"] + res["phase1 x"] + res["phase1 s"] + res["phase2 cells"]
            print(f"  fused, column units {old:8.0f}   cell units {new:8.0f}")
            agg_old = res["fetch"] + res["phase2 columns"]
            agg_new = res["fetch"] + res["phase2 cells"]
            print(f"  aggregate, column units {agg_old:8.0f}   cell units {agg_new:8.0f}")
            rows = res["fetch"] + res["phase1 x"] + res["phase1 s"] + res["phase2 cells, A rows"]
            print(f"  with A rows: fused {rows:8.0f}   aggregate "
                  f"{res['fetch'] + res['phase2 cells, A rows']:8.0f}")


if __name__ == "__main__":
    main()
