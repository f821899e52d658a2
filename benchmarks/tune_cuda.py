"""The plan limits of the CUDA STA kernels swept at the STViT-S stage shapes (issue 12: tiles chosen
for the shape, or autotuned with a cache; this measures which choice the defaults should be).

The plan (``csrc/cuda/sta_kernels.cuh``, ``plan_cells``) has six runtime limits, which
``stvit_kernels._C._set_cuda_plan`` overrides for the whole process:

* ``max_threads``: threads per block (32..256);
* ``tile_pixels``: the pixels a tile of an aggregating kernel aims at (wider tiles: less
  partial-sum workspace, fewer blocks);
* ``smem_block``: the shared memory an aggregating block may take before it opts in for more,
  given here as blocks per SM (``shared memory per SM / k - 1 KB``; the default is 4);
* ``cache_x``: an aggregating block keeps its batch of x on chip (1) or re-reads it (0);
* ``cell_units``: an aggregating block sums by cell units where they fit (1: one thread per
  (cell, channel vector) of the tile, its sums in registers; where the tile has fewer pixels than
  units, as at stage 2, a block of threads for the units in two blocks' share of an SM) or by
  column units (0: the blocks sized for the pixels alone), the A/B of that path at the default
  limits;
* ``upsample_pixels``: the most pixels per thread of the upsampling (1, 2 or 4; fewer where the
  cell width, the row length or the alignment of A and y does not allow them): more pixels a
  thread, fewer instructions per output (sm_90 SASS of the float32 loop: 21.8, 16.6 and 12.3 per
  output for 1, 2 and 4) but fewer threads (stage 2: 32 threads a block at 4).

The ops swept (``tuning.py`` runs the sweep, checks and ranks): the fused affinity + aggregation of
the forward (``cell_kernel<kFused>`` + its reduction), the aggregation of the backward
(``cell_kernel<kAggregate>`` + reduction), the upsampling, the pool; stage 1 and stage 2, float32
and bfloat16.

    python benchmarks/tune_cuda.py --out benchmarks/results/<gpu>-<date>/tune_cuda.json
    python benchmarks/tune_cuda.py --device cpu --smoke       # the script itself, no GPU (tests)

On the CPU the knobs change nothing (the CPU kernels have no plan); ``--smoke`` exists so that
the script is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import tuning  # noqa: E402
from stvit_kernels import _C  # noqa: E402

OPS = ("affinity_aggregate", "aggregate", "upsample", "pool")
#: the knobs each op's plan reads (pool launches a fixed block size)
KNOBS = {"affinity_aggregate": ("max_threads", "tile_pixels", "blocks_per_sm", "cache_x",
                                "cell_units"),
         "aggregate": ("max_threads", "tile_pixels", "blocks_per_sm", "cache_x", "cell_units"),
         "upsample": ("max_threads", "upsample_pixels"), "pool": ()}
GRID = dict(max_threads=(64, 128, 256), tile_pixels=(256, 512, 1024, 2048),
            blocks_per_sm=(2, 3, 4, 6), cache_x=(1,), cell_units=(-1,), upsample_pixels=(1, 2, 4))
DEFAULT = dict(max_threads=0, tile_pixels=0, blocks_per_sm=0, cache_x=-1, cell_units=-1,
               upsample_pixels=0)


def configs(op: str, smoke: bool) -> List[Dict[str, int]]:
    """The default first, then the grid over the op's knobs (the others at their default), and for
    the aggregating ops the default with x re-read and the default with column units (the A/B of
    the cell units, sta_kernels.cuh Plan::cell_units)."""
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
    if "cell_units" in knobs:
        out.append(dict(DEFAULT, cell_units=0))
    return out


def smem_per_sm(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_multiprocessor", 228 * 1024))


def _set(cfg: Dict[str, int], device: torch.device) -> None:
    smem_block = 0
    if cfg["blocks_per_sm"] > 0:
        smem_block = smem_per_sm(device) // cfg["blocks_per_sm"] - 1024
    _C._set_cuda_plan(cfg["max_threads"], cfg["tile_pixels"], smem_block, cfg["cache_x"],
                      cfg["cell_units"], cfg["upsample_pixels"])


@contextlib.contextmanager
def apply(cfg: Dict[str, int], device: torch.device):
    """The configuration's overrides for the CUDA kernels within the block (nothing to set for the
    CPU ones, which a build without CUDA has alone)."""
    if device.type != "cuda":
        yield
        return
    _set(cfg, device)
    try:
        yield
    finally:
        _set(DEFAULT, device)


TUNER = tuning.Tuner(OPS, tuning.op_calls(""), configs, apply)
table = tuning.table


def run(device: torch.device, dtypes, smoke: bool, copy_gbs, stages=()) -> Dict:
    return tuning.sweep(TUNER, device, dtypes, smoke, copy_gbs, stages)


def _check(device: torch.device) -> None:
    if device.type == "cuda" and not _C.built_with_cuda():
        raise SystemExit("stvit_kernels._C was built without the CUDA kernels")


if __name__ == "__main__":
    tuning.main(TUNER, __doc__, _check)
