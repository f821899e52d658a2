"""Triton's own launcher, host time per launch of each of the library's kernels, on a machine
without a GPU (issue 11): what ``JITFunction.run`` spends binding the arguments, specialising them
(pointer alignment, integers divisible by 16 or equal to 1), building the cache key and finding
the compiled kernel, before the driver's launch, which is left out. A stand-in driver answers
device 0, stream 0 and an sm_90 target; a stand-in compiled kernel, stored under Triton's own
cache key, launches nothing. The launches are those of one module forward and backward at a stage
shape (recorded from the host functions of ``stvit_kernels.triton_kernels``, kernels stubbed).

On a GPU, ``host_profile.py`` measures the real launcher (driver included) in place.

    python benchmarks/triton_launch_cost.py [--out results/cpu_triton_launch_cost.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("run without TRITON_INTERPRET: the interpreter has a launcher of its own")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class _Driver:
    """Triton's driver interface, as far as ``JITFunction.run`` asks it."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class _Kernel:
    """A compiled kernel that launches nothing."""
    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


def record_launches(batch: int, dim: int, side: int, stoken: int):
    """(kernel, grid, kwargs) of the Triton path's launches for one module forward (pool, fused
    pass, normalising reduction, upsampling) and backward (aggregation of the output gradient and
    its reduction, the association's normalised upsampling)."""
    from stvit_kernels import triton_kernels as tk

    launches = []
    kernels = common.stub_triton_launches(record=launches)
    try:
        x = torch.randn(batch, dim, side, side)
        s, A, den = tk.associate(x, None, stoken, stoken, dim ** -0.5, 1)
        tk.upsample(s, A, stoken, stoken)
        tk.aggregate(x, A, stoken, stoken)
        tk.associate_backward(s, A, den, stoken, stoken)
    finally:
        for name, k in kernels.items():
            setattr(tk, name, k)
    return launches


def per_launch_us(kernel, grid, kwargs, n=2000) -> float:
    """µs per launch through Triton's launcher (:func:`common.per_call_us`: thread CPU time)."""
    # on a cache miss Triton would compile: store the stand-in under Triton's own key instead
    kernel._do_compile = lambda key, *args: kernel.device_caches[0][0].setdefault(key, _Kernel())
    launch = kernel[grid]
    return common.per_call_us([lambda: launch(**kwargs)], n=n, rounds=7)[0]


#: The STViT-S stage-1 shape (B=64, C=64, 56² tokens, 8x8 super tokens).
SHAPE = dict(batch=64, dim=64, side=56, stoken=8)


def measure(n: int = 2000, **shape):
    from triton.runtime.driver import driver

    torch.set_num_threads(1)
    launches = record_launches(**dict(SHAPE, **shape))
    previous = driver._active  # None until a driver was first asked for (none can be, here)
    driver.set_active(_Driver())
    try:
        rows = [dict(kernel=k.__name__, args=len(kw), us=per_launch_us(k, grid, kw, n=n))
                for k, grid, kw in launches]
    finally:
        driver.set_active(previous)
    for i, r in enumerate(rows):
        r["step"] = "fwd" if i < 4 else "bwd"
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--launches", type=int, default=2000, help="launches per timed block")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    rows = measure(n=args.launches)
    for r in rows:
        print(f"{r['step']:4s} {r['kernel']:28s} {r['args']:3d} arguments {r['us']:7.2f} µs per launch")
    fwd = sum(r["us"] for r in rows if r["step"] == "fwd")
    print(f"per module call: forward {fwd:.1f} µs, forward + backward {sum(r['us'] for r in rows):.1f} µs")
    if args.out:
        meta = common.metadata(torch.device("cpu"), sys.argv[1:] if argv is None else argv)
        meta.update(threads=1, clock="time.thread_time", shape=SHAPE,
                    note="Triton's launcher without the driver's launch (stand-in driver and kernel)")
        with open(args.out, "w") as f:
            json.dump(dict(kind="triton_launch_cost", meta=meta, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
