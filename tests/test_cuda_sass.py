"""The sm_90 machine code of the built CUDA kernels, read without a GPU (cuobjdump ships with
Triton): instruction counts of inner loops, where a kernel's speed on an H100 / H200 follows from
them.

The upsampling's channel loop was issue-bound on an H200 (36.6 us at stage 1, float32, for ~14 us
of traffic; benchmarks/results/h200-2026-12-04): about 32 instructions per output, each of its
scalar stores with its own 64-bit address arithmetic and bounds branch. With L pixels per thread
(sta_kernels.cuh, upsample_kernel) the loop has 9 multiply-adds per output and little else."""
from __future__ import annotations

import collections
import functools
import re
import subprocess

import pytest

from stvit_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.built_with_cuda(),
                                reason="needs the extension built with the CUDA kernels")


@functools.lru_cache(maxsize=1)
def _sass() -> dict:
    """{demangled kernel name: [(address, instruction)]} of the extension's sm_90 code."""
    pytest.importorskip("triton")
    from triton import knobs

    from stvit_kernels import _C
    out = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", "-arch", "sm_90", _C.__file__],
                         capture_output=True, text=True, check=True).stdout
    names, kernels = [], {}
    for chunk in re.split(r"\n\s*Function : ", out)[1:]:
        names.append(chunk.split("\n", 1)[0].strip())
        kernels[names[-1]] = [(int(a, 16), op.strip()) for a, op in
                              re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    return {d: kernels[n] for d, n in zip(demangled, names)}


def _kernel(prefix: str):
    hits = [k for k in _sass() if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return _sass()[hits[0]]


def _loops(code):
    """Opcode counts of every loop (a backward branch and its target) of a kernel."""
    index = {a: i for i, (a, _) in enumerate(code)}
    for i, (a, op) in enumerate(code):
        m = re.search(r"\bBRA (?:!?P\d, )?0x([0-9a-f]+)", op)
        if m is None or int(m.group(1), 16) >= a:
            continue
        yield collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0]
                                  for _, o in code[index[int(m.group(1), 16)]:i + 1])


def _innermost_fma_loop(code) -> collections.Counter:
    """Opcode counts of the shortest loop that multiplies."""
    loops = [ops for ops in _loops(code) if ops["FFMA"]]
    assert loops, "no loop with FFMA"
    return min(loops, key=lambda ops: sum(ops.values()))


@pytest.mark.parametrize("normalised", [False, True], ids=["upsample", "normalised"])
@pytest.mark.parametrize("L,most", [(4, 13.5), (2, 18.0), (1, 24.0)])
def test_upsample_channel_loop_is_multiply_adds(L, most, normalised):
    """float32, L pixels a thread: per trip of the channel loop 4 channels x L pixels of output,
    9 x 4 x L multiply-adds, 9 reads of s (LDS.128, each for all L pixels) and 4 stores (one per
    channel, L pixels each); at most `most` instructions per output in all (the loop of one pixel
    a thread was 254 instructions for 8 outputs before 2026-12-07: 31.8 each)."""
    name = f"void stvit::cuda::upsample_kernel<float, {str(normalised).lower()}, float, {L}>"
    ops = _innermost_fma_loop(_kernel(name))
    outputs = 4 * L
    assert ops["FFMA"] == 9 * outputs and ops["LDS"] == 9 and ops["STG"] == 4, ops
    assert sum(ops.values()) / outputs <= most, (sum(ops.values()) / outputs, ops)


@pytest.mark.parametrize("kernel", ["pool_kernel<float, 4, float>", "pool_kernel<float, 1, float>",
                                    "reduce_kernel<float>"])
def test_grid_stride_loop_has_no_64_bit_division(kernel):
    """The loop over a thread's outputs (it loads and stores) calls no 64-bit division subroutine
    (~70 instructions each) below 2^31 outputs: the only CALL left is float division's rare slow
    path (the pool's mean, the reduce's normalisation). The pool's loop had 3 CALLs before
    2026-12-07, the reduce's 5 before 6b5b12d."""
    code = _kernel(f"void stvit::cuda::{kernel}")
    loops = [ops for ops in _loops(code) if ops["LDG"] and ops["STG"]]
    assert loops, "no loop that loads and stores"
    assert min(ops["CALL"] for ops in loops) <= 1, loops


@pytest.mark.parametrize("kernel", [
    f"cell_kernel<{scalar}, {mode}, true, {pixel}>"
    for scalar in ["float", "c10::Half", "c10::BFloat16"] for mode in [1, 2]
    for pixel in sorted({scalar, "float" if mode == 2 else scalar})])
def test_cell_kernel_uses_no_local_memory(kernel):
    """The aggregating cell kernels that production runs (mode 1 aggregate, 2 fused, with the x
    cache; the fused one also reading float32 pixels for a 16-bit computation) keep everything in
    registers and shared memory: no local load or store (spill or stack array). Before
    2026-12-08 each read a bool[3] of valid slot rows, indexed by a runtime row in the
    aggregation's loops, from the stack: 3 stores and 3 loads a thread. The exception: the fused
    kernels of pure 16-bit x (their x cache filled through 32 registers at a time) spill two
    values since the staging of s keeps a thread's slot (2026-12-08): at most 8 local accesses
    a thread, one of them per batch."""
    code = _kernel(f"void stvit::cuda::{kernel}")
    local = [op for _, op in code if re.search(r"\b(LDL|STL)\b", op)]
    pure_16bit_fused = ", 2, true, c10::" in kernel
    assert len(local) <= (8 if pure_16bit_fused else 0), local


@pytest.mark.parametrize("kernel", ["cell_kernel<float, 2, true, float>",
                                    "cell_kernel<float, 1, true, float>",
                                    "cell_kernel<c10::BFloat16, 2, true, float>"])
def test_x_cache_fill_is_copies(kernel):
    """The x cache's fill (fetch_pixel: a pixel's channels, one cp.async of 4 bytes each, the
    aggregating kernels' main load of x) spends at most 5 instructions per copy in its unrolled
    loop: the copy and a pointer stepped by a plane. It was 14.75 (118 for 8 copies) before
    2026-12-08, each copy's address an index times HW in 64 bits and a wrap test."""
    code = _kernel(f"void stvit::cuda::{kernel}")
    loops = [ops for ops in _loops(code) if ops["LDGSTS"] >= 8]
    assert loops, "no loop with 8 or more LDGSTS"
    ops = min(loops, key=lambda ops: sum(ops.values()))  # the innermost: the unrolled channels
    assert sum(ops.values()) / ops["LDGSTS"] <= 5, ops


@pytest.mark.parametrize("kernel", ["cell_kernel<float, 2, true, float>",
                                    "cell_kernel<float, 0, false, float>",
                                    "upsample_kernel<float, false, float, 4>",
                                    "upsample_kernel<float, true, float, 4>"])
def test_super_token_staging_is_loads_and_stores(kernel):
    """The staging of s into shared memory (stage_stokens, channel-plane-major s: every kernel
    that reads super tokens) spends at most 16 instructions per element in its loop of 8 loads
    and 8 shared stores; the normalised upsampling's, with its IEEE division, at most 28. Before
    2026-12-08 these loops were 453, 418, 411 and 1109 instructions (51-139 per element): two
    divisions, four bounds tests and a 64-bit address per element (the normalised one decoding
    both layouts of s)."""
    loops = [ops for ops in _loops(_kernel(f"void stvit::cuda::{kernel}"))
             if ops["LDG"] == 8 and ops["STS"] == 8]
    assert loops, "no loop of 8 loads and 8 shared stores"
    ops = min(loops, key=lambda ops: sum(ops.values()))
    most = 28 if kernel.startswith("upsample_kernel<float, true") else 16
    assert sum(ops.values()) / 8 <= most, (sum(ops.values()) / 8, ops)
