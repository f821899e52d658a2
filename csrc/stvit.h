// stvit_kernels._C: the four STA kernel primitives, declared once for every device.
//
// Shapes (hh = H / h, ww = W / w; all tensors contiguous NCHW, one dtype, one device; the
// host code in ops.cpp checks this before calling any of these):
//   x, y, g : [B, C, H, W]      pixel features
//   s       : [B, C, hh, ww]    super tokens
//   A       : [B, 9, H, W]      association; neighbour k of pixel (i, j) is the super token of
//                               cell (i / h + k / 3 - 1, j / w + k % 3 - 1), invalid outside the grid
//
// affinity(x, s, h, w, scale, softmax) -> A
//     logit[k] = scale * <x[:, i, j], s[:, nbr_k]> for a valid k, exactly 0 for an invalid one;
//     softmax over the 9 slots when `softmax`, else the logits themselves.
// aggregate(x, A, h, w) -> (num [B, C, hh, ww], den [B, 1, hh, ww])
//     num[:, u, v] = sum over pixels p and valid k with nbr_k(p) == (u, v) of A[k, p] * x[:, p];
//     den the same sum of A[k, p].
// upsample(s, A, h, w) -> y [B, C, H, W]
//     y[:, p] = sum over valid k of A[k, p] * s[:, nbr_k(p)].
// affinity_aggregate(x, s, h, w, scale, normalise) -> (A, num, den)
//     affinity (with softmax) then aggregate, in one pass over x; with `normalise` the second
//     output is num / (den + 1e-12), divided in the accumulation type: the updated super tokens.
// pool(x, h, w) -> s [B, C, hh, ww]
//     the mean of each h x w cell (the module's initial super tokens, avg_pool2d).
//
// Kernels accumulate in float32 (float64 for double inputs), never materialise a dense
// token x super-token map nor a 9x copy of x, compute the scatter-to-super-token sums as
// gathers or per-cell partial sums plus a reduction (deterministic, no atomics), and index
// with int64 wherever an offset scales with B * C * H * W.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace stvit {

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor affinity_cpu(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                        double scale, bool softmax);
Tensor2 aggregate_cpu(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w);
// s in any layout (read in place: e.g. token-major, as the refine's backward leaves a gradient);
// with den [B, 1, hh, ww] defined (contiguous), the upsampling of s / (den + 1e-12)
// (associate_backward), the division in the accumulation type as the kernel reads s
at::Tensor upsample_cpu(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w,
                        const at::Tensor& den = at::Tensor());
// s undefined: the super tokens are pool_cpu(x, h, w), computed in the same pass over x.
Tensor3 affinity_aggregate_cpu(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                               double scale, bool normalise);
at::Tensor pool_cpu(const at::Tensor& x, int64_t h, int64_t w);

#ifdef STVIT_WITH_CUDA
at::Tensor affinity_cuda(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                         double scale, bool softmax);
// tokens_last: num token-major (a [B, hh, ww, C] tensor viewed as [B, C, hh, ww]), the layout the
// refine attention's backward reads without a copy; den_ones: ones in place of den, the vector
// that sums the rows of the refine's gradients (both for sta_backward)
Tensor2 aggregate_cuda(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w,
                       bool tokens_last = false, bool den_ones = false);
// s in any layout (copied to contiguous unless it is, or, with den, token-major: channels_last
// strides); with den [B, 1, hh, ww] defined, the upsampling of s / (den + 1e-12)
// (associate_backward), the division in the accumulation type, and y in `out_dtype` if given
// (float32 for 16-bit s: each value rounded to s's dtype, then widened; autograd's cast of the
// gradient into a float32 x folded in)
at::Tensor upsample_cuda(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w,
                         const at::Tensor& den = at::Tensor(),
                         std::optional<at::ScalarType> out_dtype = std::nullopt);
// x may be float32 where s is float16 / bfloat16 (each value of x rounded to s's dtype as it is
// read: autocast's cast of x folded in); A, num, den in s's dtype; num token-major with
// `tokens_last` (as aggregate_cuda's)
Tensor3 affinity_aggregate_cuda(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                                double scale, bool normalise, bool tokens_last = false);
// s in `dtype` if given (float16 / bfloat16 for float32 x, the same folding)
at::Tensor pool_cuda(const at::Tensor& x, int64_t h, int64_t w,
                     std::optional<at::ScalarType> dtype = std::nullopt);
// Whether the kernels above take pixel-side tensors (x read, y written) of dtype `pixel` for a
// computation in `dtype`: the same dtype, or float32 around float16 / bfloat16.
bool pixel_dtype_ok_cuda(at::ScalarType pixel, at::ScalarType dtype);

// Benchmark aid (benchmarks/tune_cuda.py): the plan limits of the CUDA STA kernels
// (cuda/sta_kernels.cuh, PlanLimits) for every later call of this process: threads per block
// (32..256, a multiple of 32), the pixels a tile of an aggregating kernel aims at, the shared
// memory an aggregating block may take before it opts in for more (bytes: the blocks per SM), and
// whether it keeps x on chip (1) or re-reads it (0), and whether it takes cell units where they
// fit (1) or column units always (0; PlanLimits::cell_units), and the most pixels per thread of
// the upsample (1, 2 or 4). 0 (cache_x, cell_units: -1) restores the device's default. Returns
// the previous overrides in the same order.
using PlanValues = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
PlanValues set_cuda_plan_overrides(int64_t max_threads, int64_t tile_pixels, int64_t smem_block,
                                   int64_t cache_x, int64_t cell_units, int64_t upsample_pixels);
#endif

}  // namespace stvit
