// The CUDA entry points declared in csrc/stvit.h. Kernels: sta_kernels.cuh; allocation,
// dispatch and launch sequence: sta_launch.cuh (shared with the host emulator of the tests).
#include <c10/cuda/CUDAGuard.h>

#include "cuda_runtime.cuh"
#include "stvit.h"
#include "sta_launch.cuh"

namespace stvit {

using cuda::CudaRuntime;

at::Tensor affinity_cuda(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                         double scale, bool softmax) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::affinity_impl(rt, x, s, h, w, scale, softmax);
}

Tensor2 aggregate_cuda(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w,
                       bool tokens_last, bool den_ones) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::aggregate_impl(rt, x, A, h, w, tokens_last, den_ones);
}

at::Tensor upsample_cuda(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w,
                         const at::Tensor& den, std::optional<at::ScalarType> out_dtype) {
  const c10::cuda::OptionalCUDAGuard guard(A.device());
  CudaRuntime rt;
  return cuda::upsample_impl(rt, s, A, h, w, den, out_dtype);
}

Tensor3 affinity_aggregate_cuda(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                                double scale, bool normalise, bool tokens_last) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::affinity_aggregate_impl(rt, x, s, h, w, scale, normalise, tokens_last);
}

at::Tensor pool_cuda(const at::Tensor& x, int64_t h, int64_t w,
                     std::optional<at::ScalarType> dtype) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::pool_impl(rt, x, h, w, dtype);
}

bool pixel_dtype_ok_cuda(at::ScalarType pixel, at::ScalarType dtype) {
  return cuda::pixel_dtype_ok(pixel, dtype);
}

PlanValues set_cuda_plan_overrides(int64_t max_threads, int64_t tile_pixels, int64_t smem_block,
                                   int64_t cache_x, int64_t cell_units, int64_t upsample_pixels) {
  TORCH_CHECK(max_threads == 0 || (max_threads >= 32 && max_threads <= cuda::kMaxThreads &&
                                   max_threads % 32 == 0),
              "max_threads must be 0 (default) or a multiple of 32 in [32, ", cuda::kMaxThreads,
              "], got ", max_threads);
  TORCH_CHECK(tile_pixels >= 0 && tile_pixels <= (1 << 20), "tile_pixels must be in [0, 2^20], got ",
              tile_pixels);
  TORCH_CHECK(smem_block >= 0 && smem_block <= (1 << 20), "smem_block must be in [0, 2^20], got ",
              smem_block);
  TORCH_CHECK(cache_x >= -1 && cache_x <= 1, "cache_x must be -1 (default), 0 or 1, got ", cache_x);
  TORCH_CHECK(cell_units >= -1 && cell_units <= 1, "cell_units must be -1 (default), 0 or 1, got ",
              cell_units);
  TORCH_CHECK(upsample_pixels == 0 || upsample_pixels == 1 || upsample_pixels == 2 ||
                  upsample_pixels == 4,
              "upsample_pixels must be 0 (default), 1, 2 or 4, got ", upsample_pixels);
  cuda::PlanOverrides& o = cuda::plan_overrides;
  return {o.max_threads.exchange(static_cast<int>(max_threads)),
          o.tile_pixels.exchange(static_cast<int>(tile_pixels)),
          o.smem_block.exchange(static_cast<int>(smem_block)),
          o.cache_x.exchange(static_cast<int>(cache_x)),
          o.cell_units.exchange(static_cast<int>(cell_units)),
          o.upsample_pixels.exchange(static_cast<int>(upsample_pixels))};
}

}  // namespace stvit
