"""The plan limits of the Triton STA kernels swept at the STViT-S stage shapes (issue 12: Triton
within 1.3x of CUDA, tiles chosen for the shape; this measures which choice the defaults should
be). The Triton twin of ``tune_cuda.py``; ``tuning.py`` runs the sweep, checks and ranks.

The plan (``stvit_kernels/triton_kernels.py``, ``_plan``) has four limits, which
``triton_kernels.plan_overrides`` sets for the launches within a block:

* ``num_warps``: warps per program of the matrix-product kernels (0: the default rule, from the
  tile's work);
* ``tile``: the elements of a ``[BLOCK_P, BLOCK_C]`` tile (so the channel chunk ``BLOCK_C``), and of
  the reduction's tile;
* ``max_block_p``: the largest pixel block (a cell with more pixels loops or gets a grid axis);
* ``pool_tile``: the elements of the pooling's tile.

The ops: the fused affinity + aggregation of the forward (``_affinity_aggregate_kernel`` + its
reduction), the aggregation of the backward (``_aggregate_kernel`` + reduction), the upsampling,
the pool; stage 1 and stage 2, float32 and bfloat16. A configuration whose plan is the same as an
earlier one's at that shape (e.g. a wider tile where the channels already fit) is not run again.
Every configuration compiles its kernels once (Triton's cache), so the first sweep on a machine
spends most of its time compiling: ``--stages stage1`` halves it.

    python benchmarks/tune_triton.py --out benchmarks/results/<gpu>-<date>/tune_triton.json
    TRITON_INTERPRET=1 python benchmarks/tune_triton.py --device cpu --smoke   # no GPU (tests)
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import tuning  # noqa: E402
from stvit_kernels import triton_kernels as tk  # noqa: E402

OPS = ("affinity_aggregate", "aggregate", "upsample", "pool")
DEFAULT = dict(num_warps=0, tile=tk._TILE, max_block_p=tk._MAX_BLOCK_P, pool_tile=tk._POOL_TILE)
#: the knobs each op's plan reads, and their values
GRID = {"affinity_aggregate": dict(num_warps=(0, 2, 4, 8), tile=(2048, 4096, 8192),
                                   max_block_p=(32, DEFAULT["max_block_p"])),
        "aggregate": dict(num_warps=(0, 2, 4, 8), tile=(2048, 4096, 8192)),
        "upsample": dict(num_warps=(0, 2, 4, 8), tile=(2048, 4096, 8192)),
        "pool": dict(pool_tile=(512, 1024, 2048, 4096))}


def configs(op: str, smoke: bool) -> List[Dict[str, int]]:
    """The default first, then the op's grid (the other knobs at their default)."""
    out = [dict(DEFAULT)]
    if smoke:
        return out + [dict(DEFAULT, pool_tile=512) if op == "pool"
                      else dict(DEFAULT, num_warps=2, tile=1024)]
    knobs = GRID[op]
    for values in itertools.product(*knobs.values()):
        cfg = dict(DEFAULT, **dict(zip(knobs, values)))
        if cfg not in out:
            out.append(cfg)
    return out


def apply(cfg: Dict[str, int], device: torch.device):
    return tk.plan_overrides(**cfg)


def plan_key(op: str, cfg: Dict[str, int], x: torch.Tensor, stoken: int):
    """What a configuration launches at this shape: configurations with one key run the same
    kernels (the pool's and the reduction's tiles follow their own limits)."""
    with tk.plan_overrides(**cfg):
        plan = tk._plan(x.dtype, x.shape[1], stoken, stoken)
    if op == "pool":
        return cfg["pool_tile"]
    # the reduction (after the fused pass and the aggregation) sizes its tile from `tile` too
    return plan, cfg["tile"] if op in ("affinity_aggregate", "aggregate") else None


TUNER = tuning.Tuner(OPS, tuning.op_calls("triton_"), configs, apply, plan_key)


def run(device: torch.device, dtypes, smoke: bool, copy_gbs, stages=()) -> Dict:
    return tuning.sweep(TUNER, device, dtypes, smoke, copy_gbs, stages)


if __name__ == "__main__":
    tuning.main(TUNER, __doc__)
