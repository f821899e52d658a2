"""Triton kernels for the four STA primitives (the ``triton`` backend, :mod:`stvit_kernels.backends`).

Shapes (``hh = H / h``, ``ww = W / w``; same contract as :mod:`stvit_kernels.reference`)::

    x, y   [B, C, H, W]     pixel features
    s      [B, C, hh, ww]   super tokens
    A      [B, 9, H, W]     association; neighbour k of pixel (i, j) is the super token of the cell
                            (i // h + k // 3 - 1, j // w + k % 3 - 1), invalid outside the grid

    affinity(x, s, h, w, scale, softmax)  -> A             (softmax=False: the scaled logits)
    aggregate(x, A, h, w)                 -> num [B, C, hh, ww], den [B, 1, hh, ww]
    upsample(s, A, h, w)                  -> y [B, C, H, W]
    affinity_aggregate(x, s, h, w, scale) -> A, num, den   (one program per cell does both)
    pool(x, h, w)                         -> s [B, C, hh, ww] (the cell means: avg_pool2d)
    associate(x, s, h, w, scale, n_iter)  -> stokens, A, den  (the module's association stage)
    associate_backward(g, A, den, h, w)   -> upsample(g / (den + 1e-12), A), one kernel

Design. A program owns one ``h x w`` cell of one image (``pid = b * hh * ww + ci * ww + cj``); the
cell's pixels are flattened to ``p = a * w + b`` and processed in blocks of ``BLOCK_P`` (the next
power of two >= h*w, at least 16, capped at ``_MAX_BLOCK_P``; bigger cells loop or add a grid
axis), channels in chunks of ``BLOCK_C`` (a power of two, at least 16). The cell size ``(h, w)`` is
a compile-time constant, so the pixel index arithmetic is shifts and masks. The 9 neighbour slots
are padded to 16.

* affinity, grid ``(B*hh*ww, pixel blocks)``: logits ``[16, BLOCK_P] = s_nbr [16, C] @ x [C, BLOCK_P]``
  accumulated over channel chunks (``s_nbr`` is the 3x3 neighbourhood of super tokens, zero for an
  invalid neighbour, so its logit is exactly 0), then a stable softmax over the 9 real slots.
* aggregate, grid ``(B*hh*ww, channel chunks)``: per cell the 9 partial sums
  ``[BLOCK_C, 16] = x [BLOCK_C, P] @ A [P, 16]`` (A loaded with invalid slots zeroed) go to a
  workspace ``[B, hh, ww, 9, C]`` (``[B, hh, ww, 9]`` for den); :func:`_reduce_kernel` then adds,
  for each super token ``(u, v)``, the partials of the 9 cells ``(u - di, v - dj)`` around it (a
  ``[super tokens, 16, C]`` tile summed over its middle axis). No atomics: every sum has one order
  fixed by the compiled kernel (see Determinism below).
* affinity_aggregate, grid ``(B*hh*ww,)``: the affinity program above, then, with A still in
  registers, the aggregate partials of the same cell, then the same reduction. When the channels
  fit one chunk (``N_CC == 1``: C <= 128 at the STViT shapes), the x tile of the logits is reused
  for the partials. Reading it a second time (from L2) kept its 64-bit addresses live across the
  softmax: 176 registers per thread at stage 1 in float32 (Triton 3.6, sm_90, 8 warps), one
  program per SM; 44 with the reuse (128 at 4 warps, since 2026-12-07). Otherwise x is read again per chunk. A cell bigger than one pixel block
  loops, accumulating its partials in its own workspace rows (read-modify-write by the owning
  program only, after a barrier).
* associate: the module's association stage, one operator call: the pool below when no super
  tokens are given, then per iteration the fused pass and a reduction that writes
  ``num / (den + 1e-12)`` (divided in the accumulation type, from the unrounded sums, as the C++
  family does) as the next super tokens; 2 launches per iteration, the workspaces allocated once.
* upsample, grid ``(B*hh*ww, pixel blocks, channel chunks)``:
  ``y [BLOCK_C, BLOCK_P] = s_nbr [BLOCK_C, 16] @ A [16, BLOCK_P]`` (A with invalid slots zeroed).
* pool (the module's initial super tokens), grid ``(B * channel blocks * hh, cell blocks)``: a
  ``[channels, cell rows, cells x their columns]`` tile of x, summed over rows then per cell; no
  product, so no tl.dot. (It replaced ATen's ``avg_pool2d``, ~47 % of the copy bandwidth on an
  H200: the CUDA family has a kernel of its own too.)

Orientation of the products. Every tile of x, y and A has the pixels as its last axis (pixels are
the contiguous axis of these tensors in memory, so that is where the loads put consecutive
elements in a thread and across the lanes), and each product is written so that no lane of a warp
reads a shared-memory row of pixels at a stride of the row length. On CUDA cores (float32: FMAs,
no swizzled shared layout) a thread of a ``tl.dot`` reads every K element of its own rows of one
operand and columns of the other: when those rows are the 64-float pixel rows of x, each lane's
row lies in the same banks as the others' (up to 32-way bank conflicts). The products were
written that way until 2026-12-07 (``[P, C] @ [C, 16]``, ``A^T [16, P] @ x [P, C]``,
``A [P, 16] @ s [16, C]``); on an H200 (Triton 3.6, B=64, stage 1, float32) the fused kernel took
310 us, the aggregate 152 us and the upsample 32 us (Nsight Compute), against 38, 19 and 25 us in
bfloat16 on tensor cores. ``benchmarks/triton_smem_model.py`` counts the shared-memory wavefronts
that the compiled kernels' layouts imply (a model, not a measurement; for sm_90 without a GPU):
per cell at stage 1, fused 11488 -> 3264, aggregate 8608 -> 2208, upsample 2240 -> 320 (with the
float32 warp rule of :func:`_plan`).

Row segments of a cell are read and written with vector accesses where the row stride allows
(:func:`_row_vec`, ``ROW_VEC``): at stage 1 in float32, x is 4 ``ld.global.v4`` per thread in the
fused kernel instead of 16 scalar loads.

Precision. Every one of these matrix products is an explicit ``tl.dot(..., input_precision="ieee")``,
for every dtype and size: a cell of fewer than 16 pixels or fewer than 16 channels is padded to 16
with masked rows, which read as 0 and add exactly 0. So float32 is exact float32 on every ``C``
(FMAs on CUDA cores, never TF32; results match the reference to ~1e-6), float16 / bfloat16 run on
tensor cores with float32 accumulation, float64 on float64 tensor cores (DMMA, IEEE double).
There is deliberately no broadcast-multiply-``tl.sum`` fallback: Triton's combine pass
(``CombineBroadcastMulReducePattern``) rewrites ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)``
into a ``tt.dot`` of its own, with TF32 input precision up to Triton 3.6 and no check of K; on an
H200 that made the float32 affinity ~5e-4 wrong for 5..15 channels and 0.6 wrong for 1..4 (K < 8
on TF32 tensor cores). ``tests/test_triton_ir.py`` compiles every kernel for sm_90 without a GPU and
checks its IR for TF32 and for dots the source did not write. Divisions outside the softmax (the
pool's mean, ``num / (den + 1e-12)``) are IEEE (:func:`_div`): Triton's float32 ``/`` is the
approximate ``div.full.f32`` on a GPU, which made ``associate`` differ from ATen's division of the
same sums in the last bit on an H200; the IR test checks the PTX for it. Outputs are in the input dtype;
offsets that scale with ``B*C*H*W`` are int64. No autotuning: block sizes follow from ``(C, h, w)``
(:func:`_plan`), whose limits :func:`plan_overrides` sets for a sweep (``benchmarks/tune_triton.py``).

Layouts and determinism. Inputs are read through their strides (any layout, channels_last included,
without a copy); outputs are contiguous, and their strides, which follow from the sizes, are not
passed (every argument costs Triton's launcher a specialisation at each launch:
``benchmarks/triton_launch_cost.py``). Results are bitwise identical run to run for the same
inputs on the same device and Triton version (no atomics, fixed loop orders). They are not bitwise
identical across input layouts: Triton compiles one kernel per stride specialisation (a stride equal
to 1, strides and pointers divisible by 16), the compiler picks each kernel's register layouts from
the memory access pattern, and the order of the in-register sums (``den``, the softmax
normaliser) follows the layout. A channels_last and a contiguous input give results that agree to
float rounding (a few ulp; e.g. ``den`` 1 ulp apart on an H200).

Interpreter. Under ``TRITON_INTERPRET=1`` (CPU tensors, how CI runs these kernels) bfloat16 matrix
products are computed from float32 copies of the operands, because the interpreter's ``tl.dot``
multiplies the raw bits of bfloat16 operands (Triton 3.8); the result is the same (bfloat16
products are exact in float32). The interpreter also truncates float32 -> bfloat16 casts where a
GPU rounds to nearest, so bfloat16 outputs there are up to 1 ulp off instead of 1/2. The
interpreter runs none of the compiler's passes, hence the IR test.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

#: Largest pixel block of one program. A cell with more pixels loops (aggregate, fused) or gets a
#: grid axis of pixel blocks (affinity, upsample). Tests lower it to exercise those paths.
_MAX_BLOCK_P = 256
#: Elements of a [BLOCK_C, BLOCK_P] tile (a tl.dot operand), and of the reduction's 3-D tile.
_TILE = 4096
#: Elements of the pooling's tile (x read, masked lanes included).
_POOL_TILE = 2048
#: Warps of a matrix-product kernel's program; 0: from the tile's work (:func:`_plan`).
_NUM_WARPS = 0

#: The plan's limits above, by the names :func:`plan_overrides` takes.
_PLAN_LIMITS = {"max_block_p": "_MAX_BLOCK_P", "tile": "_TILE", "pool_tile": "_POOL_TILE",
                "num_warps": "_NUM_WARPS"}


@contextlib.contextmanager
def plan_overrides(**limits: int):
    """Within the block, the plan's limits set to ``limits`` (``max_block_p``, ``tile``,
    ``pool_tile``: powers of two; ``num_warps``: 1, 2, 4, 8 or 0 for the default rule), for every
    launch in this process; restored after. For tuning (``benchmarks/tune_triton.py``): the
    results change by float rounding only (the sums' order follows the tiles)."""
    for name, value in limits.items():
        if name not in _PLAN_LIMITS:
            raise ValueError(f"unknown plan limit {name!r}; one of {sorted(_PLAN_LIMITS)}")
        if name == "num_warps":
            ok = value in (0, 1, 2, 4, 8)
        else:
            ok = isinstance(value, int) and value >= 16 and not value & (value - 1)
        if not ok:
            raise ValueError(f"plan limit {name}={value!r} is not allowed")
    saved = {name: globals()[_PLAN_LIMITS[name]] for name in limits}
    try:
        globals().update({_PLAN_LIMITS[name]: value for name, value in limits.items()})
        yield
    finally:
        globals().update({_PLAN_LIMITS[name]: value for name, value in saved.items()})


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Whether the kernels below run under the interpreter: read once, as Triton does when it
#: decorates them.
_INTERPRETING = _interpreting()


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and workspace is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _on_tensor_device(fn):
    """Run ``fn(t, ...)`` with ``t``'s GPU as the current device: Triton launches on the current
    CUDA device, which need not be the one of the tensors."""
    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        if t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)  # (entering torch.cuda.device costs µs: only when needed)
    return wrapper


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _split(scale: float) -> Tuple[float, float]:
    """``scale = hi + lo`` with both float32-representable: float arguments reach a kernel as
    float32, and float64 logits need the scale to ~1e-16. (Cached: a module calls it with one
    scale, and each ``torch.tensor`` costs a few µs.)"""
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(torch.tensor(scale - hi, dtype=torch.float32))


def _row_vec(*row_strides: int) -> int:
    """The largest power of two, at most 8, that divides every row stride (a tensor's stride of
    dim 2): a fact the compiler is told (``tl.multiple_of``), so that it can load and store a
    cell's row segments with 64- and 128-bit accesses. Triton specialises an integer argument only
    for divisibility by 16, which a row of 56 (stage 1) or 28 (stage 2) tokens is not; the
    pointers, batch and channel strides carry their own specialisation, and where those are not
    aligned the accesses stay scalar."""
    g = 0
    for st in row_strides:
        g = math.gcd(g, st)
    return min(8, g & -g) if g else 8  # g & -g: the largest power of two dividing g


# Host arithmetic in plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
# functions, whose calls from host code cost microseconds each (Triton 3.8, on this project's CPU
# machine), about 17 of them per module forward.

def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Plan(NamedTuple):
    BLOCK_P: int     # pixels per block (power of two, >= 16: a tl.dot dimension)
    N_PB: int        # pixel blocks per cell
    BLOCK_C: int     # channels per chunk (power of two, >= 16: a tl.dot dimension)
    N_CC: int        # channel chunks (a compile-time loop count: Triton 3.6's interpreter cannot
                     # loop over a range bounded by a kernel argument with numpy >= 2.4)
    DOT_UPCAST: bool  # interpreter + bfloat16: feed tl.dot float32 copies
    num_warps: int


def _plan(dtype: torch.dtype, C: int, h: int, w: int) -> _Plan:
    """Block sizes for a cell of ``h x w`` pixels and ``C`` channels (every kernel but the
    reduction multiplies ``[16, C]`` with a ``[C, P]`` tile, ``[C, P]`` with ``[P, 16]``, or
    ``[C, 16]`` with ``[16, P]``). Every dimension of a tl.dot is >= 16: fewer pixels or channels
    are padded with masked (zero) rows, which add exactly 0. Cached per shape and limits
    (``_MAX_BLOCK_P``, ``_TILE``, ``_NUM_WARPS``: tests lower them, tuning sweeps them)."""
    return _plan_for(dtype, C, h, w, _MAX_BLOCK_P, _TILE, _NUM_WARPS)


@functools.lru_cache(maxsize=256)
def _plan_for(dtype: torch.dtype, C: int, h: int, w: int, max_block_p: int, tile: int,
              warps: int) -> _Plan:
    P = h * w
    block_p = max(16, min(_pow2(P), max_block_p))
    n_pb = _cdiv(P, block_p)
    block_c = max(16, min(_pow2(C), tile // block_p, 128))
    work = block_p * (block_c + 16)
    if dtype == torch.float64:
        work *= 2  # float64 runs on slow DMMA
    # (float32 FMA products: fewer warps, each thread owning more of the product, read fewer
    # operand elements from shared memory; stage 1's fused kernel at 8 warps: 4800 modelled
    # wavefronts per cell, at 4: 3264; benchmarks/triton_smem_model.py)
    num_warps = warps or (8 if work >= 8192 else 4 if work >= 2048 else 2)
    upcast = dtype == torch.bfloat16 and _INTERPRETING
    return _Plan(block_p, n_pb, block_c, _cdiv(C, block_c), upcast, num_warps)


# ------------------------------------------------------------------------------------------------
# Building blocks, inlined into the kernels. (Few and coarse on purpose: under TRITON_INTERPRET
# every call of a nested @triton.jit function costs milliseconds.)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _cell_of(pid, hh, ww):
    """Program id ``b * hh * ww + ci * ww + cj`` -> ``b`` (int64: it multiplies batch strides),
    ``ci``, ``cj``, and the cell's 9 neighbour slots padded to 16: slot ``o_k``, neighbour cell
    ``(o_u, o_v)`` (int64) and validity ``m_k`` (False for invalid and padding slots)."""
    n_cells = hh * ww
    b = pid // n_cells
    ci = (pid % n_cells) // ww
    cj = pid % ww
    o_k = tl.arange(0, 16)
    o_u = ci + o_k // 3 - 1
    o_v = cj + o_k % 3 - 1
    m_k = (o_k < 9) & (o_u >= 0) & (o_u < hh) & (o_v >= 0) & (o_v < ww)
    return b.to(tl.int64), ci, cj, o_k, o_u.to(tl.int64), o_v.to(tl.int64), m_k


@triton.jit
def _dense_offset(b, o_c, C, H, W):
    """The offset of plane ``(b, o_c)`` of a contiguous ``[B, C, H, W]`` tensor (the outputs, whose
    strides are not passed): int64, as ``b`` is."""
    return (b * C + o_c) * H * W


@triton.jit
def _cell_pixels(ci, cj, pb, CELL_H: tl.constexpr, CELL_W: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pixel block ``pb`` of cell (ci, cj), pixels flattened row-major inside the cell: image rows
    and columns (int64) and the in-cell mask."""
    o_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < CELL_H * CELL_W
    o_i = (ci * CELL_H + o_p // CELL_W).to(tl.int64)
    o_j = (cj * CELL_W + o_p % CELL_W).to(tl.int64)
    return o_i, o_j, m_p


@triton.jit
def _cell_logits(p_xb, p_sb,
                 C, o_xpix, m_p, o_snbr, o_k, m_k,
                 sxc, ssc,
                 scale_hi, scale_lo,
                 SOFTMAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                 N_CC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``[16, BLOCK_P]`` in the accumulation dtype: the scaled logits of one pixel block against
    the cell's neighbours (exactly 0 for an invalid slot), or with ``SOFTMAX`` their softmax over
    the slots 0..8 (slots 9..15 come out 0); and the last channel chunk of x it read
    (``[BLOCK_C, BLOCK_P]``: all of x's channels when ``N_CC == 1``).

    ``p_xb + o_xpix`` are the pixels' channel-0 addresses, ``p_sb + o_snbr`` the neighbours'."""
    ACC = tl.float64 if p_xb.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([16, BLOCK_P], dtype=ACC)
    b_x = tl.zeros([BLOCK_C, BLOCK_P], dtype=p_xb.dtype.element_ty)  # C == 0: no chunk
    for cc in tl.static_range(N_CC):  # unrolled: the last chunk stays visible after the loop
        o_c = cc * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        o_c64 = o_c.to(tl.int64)
        b_x = tl.load(p_xb + o_xpix[None, :] + o_c64[:, None] * sxc,
                      mask=m_p[None, :] & m_c[:, None], other=0.)          # [BLOCK_C, BLOCK_P]
        b_s = tl.load(p_sb + o_c64[None, :] * ssc + o_snbr[:, None],
                      mask=m_c[None, :] & m_k[:, None], other=0.)          # [16, BLOCK_C]
        if DOT_UPCAST:
            b_x = b_x.to(tl.float32)
            b_s = b_s.to(tl.float32)
        acc += tl.dot(b_s, b_x, input_precision="ieee")
    logits = tl.where(m_k[:, None], acc * scale_hi + acc * scale_lo, 0.)
    if SOFTMAX:
        z = tl.where((o_k < 9)[:, None], logits, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=0)[None, :])
        logits = e / tl.sum(e, axis=0)[None, :]
    return logits, b_x


#: The interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even): round by hand there.
_BF16_RTNE_BY_HAND = tl.constexpr(_INTERPRETING)


@triton.jit
def _div(a, b):
    """``a / b`` rounded to nearest (IEEE), as ATen and the C++ kernels divide. Triton's ``/`` on
    float32 compiles to the approximate ``div.full.f32`` on a GPU (up to 2 ulp off; the
    interpreter divides exactly, so only a GPU shows it); float64 division is IEEE already."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    return a / b


@triton.jit
def _rounded(v, p_out):
    """``v`` (an accumulator tile) in the element type of ``p_out``, rounded to nearest even."""
    OUT: tl.constexpr = p_out.dtype.element_ty
    if _BF16_RTNE_BY_HAND and OUT == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(OUT)
    return v.to(OUT)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _affinity_kernel(
    # pointers
    p_x, p_s, p_a,
    # sizes
    C, hh, ww,
    # strides (A is contiguous: its strides follow from the sizes)
    sxb, sxc, sxh, sxw,
    ssb, ssc, ssh, ssw,
    # scalars
    scale_hi, scale_lo,
    # meta
    CELL_H: tl.constexpr, CELL_W: tl.constexpr, ROW_VEC: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, N_CC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Grid (B*hh*ww, pixel blocks): A (or the logits) of one pixel block of one cell."""
    b, ci, cj, o_k, o_u, o_v, m_k = _cell_of(tl.program_id(0), hh, ww)
    o_i, o_j, m_p = _cell_pixels(ci, cj, tl.program_id(1), CELL_H, CELL_W, BLOCK_P)
    o_xpix = tl.multiple_of(o_i * sxh, ROW_VEC) + o_j * sxw
    o_apix = tl.multiple_of(o_i * (ww * CELL_W), ROW_VEC) + o_j
    b_a, _ = _cell_logits(p_x + b * sxb, p_s + b * ssb,
                          C, o_xpix, m_p, o_u * ssh + o_v * ssw, o_k, m_k,
                          sxc, ssc, scale_hi, scale_lo,
                          SOFTMAX, BLOCK_P, BLOCK_C, N_CC, DOT_UPCAST)
    p_out = p_a + _dense_offset(b, o_k, 9, hh * CELL_H, ww * CELL_W)[:, None] + o_apix[None, :]
    tl.store(p_out, _rounded(b_a, p_a), mask=m_p[None, :] & (o_k < 9)[:, None])


@triton.jit
def _aggregate_kernel(
    # pointers
    p_x, p_a, p_wnum, p_wden,
    # sizes
    C, hh, ww,
    # strides
    sxb, sxc, sxh, sxw,
    sab, sak, sah, saw,
    # meta
    CELL_H: tl.constexpr, CELL_W: tl.constexpr, ROW_VEC: tl.constexpr, N_PB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Grid (B*hh*ww, channel chunks): the cell's 9 partial sums ``A^T x`` of one channel chunk,
    and (chunk 0) of ``A``, to the workspace rows ``pid * 9 + k``."""
    pid = tl.program_id(0)
    pc = tl.program_id(1)
    b, ci, cj, o_k, o_u, o_v, m_k = _cell_of(pid, hh, ww)
    o_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_c64 = o_c.to(tl.int64)
    ACC = p_wnum.dtype.element_ty

    acc = tl.zeros([BLOCK_C, 16], dtype=ACC)
    acc_den = tl.zeros([16], dtype=ACC)
    for pb in range(N_PB):
        o_i, o_j, m_p = _cell_pixels(ci, cj, pb, CELL_H, CELL_W, BLOCK_P)
        o_xpix = tl.multiple_of(o_i * sxh, ROW_VEC) + o_j * sxw
        o_apix = tl.multiple_of(o_i * sah, ROW_VEC) + o_j * saw
        b_a = tl.load(p_a + b * sab + o_k.to(tl.int64)[None, :] * sak + o_apix[:, None],
                      mask=m_p[:, None] & m_k[None, :], other=0.)          # [BLOCK_P, 16]
        b_x = tl.load(p_x + b * sxb + o_xpix[None, :] + o_c64[:, None] * sxc,
                      mask=m_p[None, :] & m_c[:, None], other=0.)          # [BLOCK_C, BLOCK_P]
        acc_den += tl.sum(b_a.to(ACC), axis=0)
        if DOT_UPCAST:
            b_a = b_a.to(tl.float32)
            b_x = b_x.to(tl.float32)
        acc += tl.dot(b_x, b_a, input_precision="ieee")

    o_row = pid.to(tl.int64) * 9 + o_k.to(tl.int64)
    tl.store(p_wnum + o_row[None, :] * C + o_c64[:, None], acc,
             mask=(o_k < 9)[None, :] & m_c[:, None])
    tl.store(p_wden + o_row, acc_den, mask=(o_k < 9) & (pc == 0))


@triton.jit
def _affinity_aggregate_kernel(
    # pointers
    p_x, p_s, p_a, p_wnum, p_wden,
    # sizes
    C, hh, ww,
    # strides (A is contiguous: its strides follow from the sizes)
    sxb, sxc, sxh, sxw,
    ssb, ssc, ssh, ssw,
    # scalars
    scale_hi, scale_lo,
    # meta
    CELL_H: tl.constexpr, CELL_W: tl.constexpr, ROW_VEC: tl.constexpr, N_PB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, N_CC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Grid (B*hh*ww,): A of the cell (stored), then, with A still in registers, the partial sums
    ``A^T x`` and of ``A`` to the workspace rows ``pid * 9 + k``."""
    pid = tl.program_id(0)
    b, ci, cj, o_k, o_u, o_v, m_k = _cell_of(pid, hh, ww)
    p_xb = p_x + b * sxb
    ACC = p_wnum.dtype.element_ty
    o_row = pid.to(tl.int64) * 9 + o_k.to(tl.int64)
    m_row = o_k < 9

    for pb in range(N_PB):
        o_i, o_j, m_p = _cell_pixels(ci, cj, pb, CELL_H, CELL_W, BLOCK_P)
        o_xpix = tl.multiple_of(o_i * sxh, ROW_VEC) + o_j * sxw
        b_a, b_x_all = _cell_logits(p_xb, p_s + b * ssb,
                                    C, o_xpix, m_p, o_u * ssh + o_v * ssw, o_k, m_k,
                                    sxc, ssc, scale_hi, scale_lo,
                                    True, BLOCK_P, BLOCK_C, N_CC, DOT_UPCAST)
        # A as stored (input dtype); pixels past the cell must not add to the sums
        b_a = _rounded(tl.where(m_p[None, :], b_a, 0.), p_a)                # [16, BLOCK_P]
        o_apix = tl.multiple_of(o_i * (ww * CELL_W), ROW_VEC) + o_j
        p_out = p_a + _dense_offset(b, o_k, 9, hh * CELL_H, ww * CELL_W)[:, None] + o_apix[None, :]
        tl.store(p_out, b_a, mask=m_p[None, :] & m_row[:, None])

        den = tl.sum(b_a.to(ACC), axis=1)
        if N_PB > 1:
            den += tl.load(p_wden + o_row, mask=m_row & (pb > 0), other=0.)
        tl.store(p_wden + o_row, den, mask=m_row)
        if DOT_UPCAST:
            b_a = b_a.to(tl.float32)
        b_pa = tl.trans(b_a)                                                # [BLOCK_P, 16]
        for cc in range(N_CC):
            o_c = cc * BLOCK_C + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            o_c64 = o_c.to(tl.int64)
            if N_CC == 1:
                b_x = b_x_all  # one channel chunk: x is still in registers
            else:
                b_x = tl.load(p_xb + o_xpix[None, :] + o_c64[:, None] * sxc,
                              mask=m_p[None, :] & m_c[:, None], other=0.)  # [BLOCK_C, BLOCK_P]
            if DOT_UPCAST:
                b_x = b_x.to(tl.float32)
            part = tl.dot(b_x, b_pa, input_precision="ieee")  # [BLOCK_C, 16]
            p_ws = p_wnum + o_row[None, :] * C + o_c64[:, None]
            m_ws = m_row[None, :] & m_c[:, None]
            if N_PB > 1:
                part += tl.load(p_ws, mask=m_ws & (pb > 0), other=0.)
            tl.store(p_ws, part, mask=m_ws)
        if N_PB > 1:
            # the next pixel block reads these workspace rows back, maybe in other threads
            tl.debug_barrier()


@triton.jit
def _reduce_kernel(
    # pointers
    p_wnum, p_wden, p_num, p_den,
    # sizes
    C, hh, ww,
    # (num and den are contiguous: their strides follow from the sizes)
    # meta
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, NORMALISE: tl.constexpr,
):
    """Grid (B * super-token blocks, channel chunks): ``num[:, u, v]`` = the sum over k of slot k
    of cell ``(u - di, v - dj)`` (cells inside the grid only); ``den`` alike (chunk 0). The 9
    terms are one ``[BLOCK_N, 16, BLOCK_C]`` tile summed over its middle axis: a fixed order.
    NORMALISE: ``num / (den + 1e-12)`` (the updated super tokens) instead of ``num``, divided in
    the accumulation type before the rounding; every chunk then sums ``den`` (in the same order)."""
    pid = tl.program_id(0)
    pc = tl.program_id(1)
    n_cells = hh * ww
    n_blocks = tl.cdiv(n_cells, BLOCK_N)
    b = (pid // n_blocks).to(tl.int64)
    o_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_u = o_n // ww
    o_v = o_n % ww
    o_k = tl.arange(0, 16)
    o_su = o_u[:, None] - (o_k // 3 - 1)[None, :]                            # [BLOCK_N, 16]
    o_sv = o_v[:, None] - (o_k % 3 - 1)[None, :]
    m_src = ((o_n < n_cells)[:, None] & (o_k < 9)[None, :]
             & (o_su >= 0) & (o_su < hh) & (o_sv >= 0) & (o_sv < ww))
    o_row = ((b * hh + o_su) * ww + o_sv) * 9 + o_k[None, :]                 # workspace rows
    o_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_c64 = o_c.to(tl.int64)

    b_num = tl.sum(tl.load(p_wnum + o_row[:, :, None] * C + o_c64[None, None, :],
                           mask=m_src[:, :, None] & m_c[None, None, :], other=0.), axis=1)
    b_den = tl.sum(tl.load(p_wden + o_row, mask=m_src & ((pc == 0) | NORMALISE), other=0.), axis=1)
    if NORMALISE:
        b_num = _div(b_num, (b_den + 1e-12)[:, None])

    m_n = o_n < n_cells  # o_n = o_u * ww + o_v: the offset within a channel plane
    tl.store(p_num + _dense_offset(b, o_c64, C, hh, ww)[None, :] + o_n[:, None],
             _rounded(b_num, p_num), mask=m_n[:, None] & m_c[None, :])
    tl.store(p_den + b * n_cells + o_n, _rounded(b_den, p_den), mask=m_n & (pc == 0))


@triton.jit
def _upsample_kernel(
    # pointers (p_den: a [B, 1, hh, ww] tensor with HAS_DEN, else unused)
    p_s, p_a, p_y, p_den,
    # sizes
    C, hh, ww,
    # strides
    ssb, ssc, ssh, ssw,
    sab, sak, sah, saw,
    sdb, sdh, sdw,  # (y is contiguous: its strides follow from the sizes)
    # meta
    CELL_H: tl.constexpr, CELL_W: tl.constexpr, ROW_VEC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, DOT_UPCAST: tl.constexpr,
    HAS_DEN: tl.constexpr,
):
    """Grid (B*hh*ww, pixel blocks, channel chunks): ``y [BLOCK_C, BLOCK_P] = s_nbr [BLOCK_C, 16]
    @ A [16, BLOCK_P]``, A loaded with its invalid slots zeroed (they are skipped). HAS_DEN
    (associate_backward): s_nbr / (den + 1e-12), divided in the accumulation type and rounded to
    s's dtype, as ``normalise`` then the upsampling."""
    b, ci, cj, o_k, o_u, o_v, m_k = _cell_of(tl.program_id(0), hh, ww)
    o_i, o_j, m_p = _cell_pixels(ci, cj, tl.program_id(1), CELL_H, CELL_W, BLOCK_P)
    o_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_c64 = o_c.to(tl.int64)

    o_apix = tl.multiple_of(o_i * sah, ROW_VEC) + o_j * saw
    o_ypix = tl.multiple_of(o_i * (ww * CELL_W), ROW_VEC) + o_j
    b_a = tl.load(p_a + b * sab + o_k.to(tl.int64)[:, None] * sak + o_apix[None, :],
                  mask=m_p[None, :] & m_k[:, None], other=0.)              # [16, BLOCK_P]
    b_s = tl.load(p_s + b * ssb + (o_u * ssh + o_v * ssw)[None, :] + o_c64[:, None] * ssc,
                  mask=m_k[None, :] & m_c[:, None], other=0.)              # [BLOCK_C, 16]
    if HAS_DEN:
        ACC: tl.constexpr = tl.float64 if p_s.dtype.element_ty == tl.float64 else tl.float32
        b_den = tl.load(p_den + b * sdb + o_u * sdh + o_v * sdw, mask=m_k, other=0.).to(ACC)
        b_s = _rounded(_div(b_s.to(ACC), (b_den + 1e-12)[None, :]), p_s)
    if DOT_UPCAST:
        b_a = b_a.to(tl.float32)
        b_s = b_s.to(tl.float32)
    b_y = tl.dot(b_s, b_a, input_precision="ieee")                         # [BLOCK_C, BLOCK_P]

    p_out = p_y + _dense_offset(b, o_c64, C, hh * CELL_H, ww * CELL_W)[:, None] + o_ypix[None, :]
    tl.store(p_out, _rounded(b_y, p_y), mask=m_p[None, :] & m_c[:, None])


@triton.jit
def _pool_kernel(
    p_x, p_s,
    C, hh, ww,
    sxb, sxc, sxh, sxw,
    CELL_H: tl.constexpr, CELL_W: tl.constexpr, ROW_VEC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, CELL_WP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid (B * channel blocks * hh, cell blocks): the means of BLOCK_V consecutive cells of one
    cell row, BLOCK_C channels, from one ``[BLOCK_C, BLOCK_H, BLOCK_V * CELL_WP]`` tile of x
    (channels x the cells' rows x their columns, each cell padded to CELL_WP = the next power of
    two >= w; with w a power of two a tile row is contiguous in x and loads as vectors), summed in
    the accumulation type over the rows, then over each cell's columns."""
    pid = tl.program_id(0)  # (b * n_cb + cb) * hh + u
    u = pid % hh
    n_cb = tl.cdiv(C, BLOCK_C)
    cb = (pid // hh) % n_cb
    b = pid // (hh * n_cb)
    o_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    o_i = tl.arange(0, BLOCK_H)
    o_q = tl.arange(0, BLOCK_V * CELL_WP)
    o_v = tl.program_id(1) * BLOCK_V + o_q // CELL_WP
    o_j = o_q % CELL_WP
    m = ((o_c < C)[:, None, None] & (o_i < CELL_H)[None, :, None]
         & ((o_j < CELL_W) & (o_v < ww))[None, None, :])
    o_row = tl.multiple_of((u * CELL_H + o_i) * sxh, ROW_VEC)
    p_in = (p_x + b.to(tl.int64) * sxb + (o_c.to(tl.int64) * sxc)[:, None, None]
            + o_row[None, :, None] + ((o_v * CELL_W + o_j) * sxw)[None, None, :])
    ACC: tl.constexpr = tl.float64 if p_x.dtype.element_ty == tl.float64 else tl.float32
    tot = tl.sum(tl.load(p_in, mask=m, other=0.).to(ACC), axis=1)   # [BLOCK_C, BLOCK_V * CELL_WP]
    tot = tl.sum(tl.reshape(tot, (BLOCK_C, BLOCK_V, CELL_WP)), axis=2)  # [BLOCK_C, BLOCK_V]
    o_out = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    p_out = p_s + ((b * C + o_c).to(tl.int64) * hh + u)[:, None] * ww + o_out[None, :]
    tl.store(p_out, _rounded(_div(tot, CELL_H * CELL_W + 0.), p_s),
             mask=(o_c < C)[:, None] & (o_out < ww)[None, :])


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def _workspaces(x: torch.Tensor, hh: int, ww: int):
    """The per-cell partial sums of an aggregation: ``[B, hh, ww, 9, C]`` and ``[B, hh, ww, 9]``
    in the accumulation dtype."""
    B, C = x.shape[0], x.shape[1]
    acc = _acc_dtype(x.dtype)
    return _empty((B, hh, ww, 9, C), acc, x.device), _empty((B, hh, ww, 9), acc, x.device)


def _reduce(wnum: torch.Tensor, wden: torch.Tensor, dtype: torch.dtype, normalise: bool = False):
    """Workspaces ``[B, hh, ww, 9, C]`` and ``[B, hh, ww, 9]`` -> ``num [B, C, hh, ww]`` (with
    ``normalise``: ``num / (den + 1e-12)``), ``den [B, 1, hh, ww]``."""
    B, hh, ww, _, C = wnum.shape
    num = _empty((B, C, hh, ww), dtype, wnum.device)
    den = _empty((B, 1, hh, ww), dtype, wnum.device)
    block_c = max(2, min(_pow2(C), 64))
    block_n = max(2, min(_TILE // (16 * block_c), 64, _pow2(hh * ww)))
    n_chunks = max(1, _cdiv(C, block_c))  # chunk 0 also writes den, even when C == 0

    _reduce_kernel[(B * _cdiv(hh * ww, block_n), n_chunks)](
        p_wnum=wnum, p_wden=wden, p_num=num, p_den=den,
        C=C, hh=hh, ww=ww,
        BLOCK_N=block_n, BLOCK_C=block_c, NORMALISE=normalise,
        num_warps=4 if block_n * block_c >= 128 else 2,
    )
    return num, den


@_on_tensor_device
def affinity(x: torch.Tensor, s: torch.Tensor, h: int, w: int, scale: float,
             softmax: bool = True) -> torch.Tensor:
    """``A [B, 9, H, W]``: softmax over the 9 neighbours of the scaled logits (``softmax=False``:
    the scaled logits, 0 for an invalid neighbour)."""
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    A = _empty((B, 9, H, W), x.dtype, x.device)
    if A.numel() == 0:
        return A
    plan = _plan(x.dtype, C, h, w)
    scale_hi, scale_lo = _split(scale)

    st_x, st_s = x.stride(), s.stride()
    _affinity_kernel[(B * hh * ww, plan.N_PB)](
        p_x=x, p_s=s, p_a=A,
        C=C, hh=hh, ww=ww,
        sxb=st_x[0], sxc=st_x[1], sxh=st_x[2], sxw=st_x[3],
        ssb=st_s[0], ssc=st_s[1], ssh=st_s[2], ssw=st_s[3],
        scale_hi=scale_hi, scale_lo=scale_lo,
        CELL_H=h, CELL_W=w, ROW_VEC=_row_vec(st_x[2], W), SOFTMAX=bool(softmax),
        BLOCK_P=plan.BLOCK_P, BLOCK_C=plan.BLOCK_C, N_CC=plan.N_CC,
        DOT_UPCAST=plan.DOT_UPCAST, num_warps=plan.num_warps,
    )
    return A


@_on_tensor_device
def aggregate(x: torch.Tensor, A: torch.Tensor, h: int, w: int):
    """``num [B, C, hh, ww]``, ``den [B, 1, hh, ww]``: per-cell partial sums, then a fixed-order
    reduction over the 9 cells around each super token."""
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    if B == 0:
        return (_empty((0, C, hh, ww), x.dtype, x.device), _empty((0, 1, hh, ww), x.dtype, x.device))
    wnum, wden = _workspaces(x, hh, ww)
    plan = _plan(x.dtype, C, h, w)
    n_chunks = max(1, _cdiv(C, plan.BLOCK_C))
    st_x, st_A = x.stride(), A.stride()
    _aggregate_kernel[(B * hh * ww, n_chunks)](
        p_x=x, p_a=A, p_wnum=wnum, p_wden=wden,
        C=C, hh=hh, ww=ww,
        sxb=st_x[0], sxc=st_x[1], sxh=st_x[2], sxw=st_x[3],
        sab=st_A[0], sak=st_A[1], sah=st_A[2], saw=st_A[3],
        CELL_H=h, CELL_W=w, ROW_VEC=_row_vec(st_x[2], st_A[2]), N_PB=plan.N_PB,
        BLOCK_P=plan.BLOCK_P, BLOCK_C=plan.BLOCK_C,
        DOT_UPCAST=plan.DOT_UPCAST, num_warps=plan.num_warps,
    )
    return _reduce(wnum, wden, x.dtype)


@_on_tensor_device
def upsample(s: torch.Tensor, A: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``y [B, C, H, W]``, ``y[:, p] = sum over valid k of A[k, p] * s[:, nbr_k(p)]``."""
    return _upsample(s, A, None, h, w)


@_on_tensor_device
def associate_backward(g: torch.Tensor, A: torch.Tensor, den: torch.Tensor, h: int,
                       w: int) -> torch.Tensor:
    """``upsample(g / (den + 1e-12), A)`` (the gradient of the association into x), the division
    done as the super tokens are loaded: one kernel."""
    return _upsample(g, A, den, h, w)


def _upsample(s, A, den, h, w):
    B, C, hh, ww = s.shape
    H, W = A.shape[2], A.shape[3]
    y = _empty((B, C, H, W), s.dtype, s.device)
    if y.numel() == 0:
        return y
    plan = _plan(s.dtype, C, h, w)
    d = den if den is not None else s  # unused without HAS_DEN
    st_s, st_A, st_d = s.stride(), A.stride(), d.stride()
    _upsample_kernel[(B * hh * ww, plan.N_PB, _cdiv(C, plan.BLOCK_C))](
        p_s=s, p_a=A, p_y=y, p_den=d,
        C=C, hh=hh, ww=ww,
        ssb=st_s[0], ssc=st_s[1], ssh=st_s[2], ssw=st_s[3],
        sab=st_A[0], sak=st_A[1], sah=st_A[2], saw=st_A[3],
        sdb=st_d[0], sdh=st_d[2], sdw=st_d[3],
        CELL_H=h, CELL_W=w, ROW_VEC=_row_vec(st_A[2], W),
        BLOCK_P=plan.BLOCK_P, BLOCK_C=plan.BLOCK_C, DOT_UPCAST=plan.DOT_UPCAST,
        HAS_DEN=den is not None, num_warps=plan.num_warps,
    )
    return y


def _pool(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    s = _empty((B, C, hh, ww), x.dtype, x.device)
    if s.numel() == 0:
        return s
    block_h, cell_wp = _pow2(h), _pow2(w)
    block_v = max(1, min(_pow2(ww), _POOL_TILE // (block_h * cell_wp)))
    block_c = max(1, min(_pow2(C), _POOL_TILE // (block_h * cell_wp * block_v)))
    st_x = x.stride()
    _pool_kernel[(B * _cdiv(C, block_c) * hh, _cdiv(ww, block_v))](
        p_x=x, p_s=s, C=C, hh=hh, ww=ww,
        sxb=st_x[0], sxc=st_x[1], sxh=st_x[2], sxw=st_x[3],
        CELL_H=h, CELL_W=w, ROW_VEC=_row_vec(st_x[2]), BLOCK_C=block_c, BLOCK_H=block_h,
        CELL_WP=cell_wp, BLOCK_V=block_v, num_warps=4,
    )
    return s


@_on_tensor_device
def pool(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``s [B, C, hh, ww]``, the mean of every ``h x w`` cell (``avg_pool2d``; the module's initial
    super tokens). A program takes a tile of about ``_POOL_TILE`` elements of one cell row: up to
    a row of cells, then as many channels as fill it (16 elements per thread at 4 warps)."""
    return _pool(x, h, w)


def _fused_pass(x: torch.Tensor, s: torch.Tensor, A: torch.Tensor, wnum: torch.Tensor,
                wden: torch.Tensor, h: int, w: int, scale: float) -> None:
    """One launch of :func:`_affinity_aggregate_kernel`: ``A`` of ``(x, s)`` into ``A``, the cells'
    partial sums into the workspaces (:func:`_workspaces`)."""
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    plan = _plan(x.dtype, C, h, w)
    scale_hi, scale_lo = _split(scale)
    st_x, st_s = x.stride(), s.stride()
    _affinity_aggregate_kernel[(B * hh * ww,)](
        p_x=x, p_s=s, p_a=A, p_wnum=wnum, p_wden=wden,
        C=C, hh=hh, ww=ww,
        sxb=st_x[0], sxc=st_x[1], sxh=st_x[2], sxw=st_x[3],
        ssb=st_s[0], ssc=st_s[1], ssh=st_s[2], ssw=st_s[3],
        scale_hi=scale_hi, scale_lo=scale_lo,
        CELL_H=h, CELL_W=w, ROW_VEC=_row_vec(st_x[2], W), N_PB=plan.N_PB,
        BLOCK_P=plan.BLOCK_P, BLOCK_C=plan.BLOCK_C, N_CC=plan.N_CC,
        DOT_UPCAST=plan.DOT_UPCAST, num_warps=plan.num_warps,
    )


@_on_tensor_device
def affinity_aggregate(x: torch.Tensor, s: torch.Tensor, h: int, w: int, scale: float):
    """``(A, num, den)`` = ``affinity(x, s)`` then ``aggregate(x, A)``, one program per cell for
    both (``num``/``den`` are computed from ``A`` as stored, i.e. rounded to the input dtype)."""
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    A = _empty((B, 9, H, W), x.dtype, x.device)
    if B == 0:
        return (A, _empty((0, C, hh, ww), x.dtype, x.device), _empty((0, 1, hh, ww), x.dtype, x.device))
    wnum, wden = _workspaces(x, hh, ww)
    _fused_pass(x, s, A, wnum, wden, h, w, scale)
    num, den = _reduce(wnum, wden, x.dtype)
    return A, num, den


@_on_tensor_device
def associate(x: torch.Tensor, s, h: int, w: int, scale: float, n_iter: int):
    """``(stokens, A, den)``, the STA module's association stage (the C++ ``stvit::associate``):
    ``s`` None starts from the cell means of ``x``; then ``n_iter`` fused passes, each one launch of
    the fused kernel and one of the reduction, which writes ``num / (den + 1e-12)`` (divided in the
    accumulation type) as the next super tokens; ``A`` and ``den`` of the last pass. One operator
    call, one pair of workspaces."""
    if n_iter < 1:
        raise ValueError(f"stvit::triton_associate: n_iter must be >= 1, got {n_iter}")
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    A = _empty((B, 9, H, W), x.dtype, x.device)
    if B == 0:
        return (_empty((0, C, hh, ww), x.dtype, x.device), A,
                _empty((0, 1, hh, ww), x.dtype, x.device))
    if s is None:
        s = _pool(x, h, w)
    wnum, wden = _workspaces(x, hh, ww)
    den = None
    for _ in range(n_iter):
        _fused_pass(x, s, A, wnum, wden, h, w, scale)
        s, den = _reduce(wnum, wden, x.dtype, normalise=True)
    return s, A, den
