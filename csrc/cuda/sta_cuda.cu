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

Tensor2 aggregate_cuda(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::aggregate_impl(rt, x, A, h, w);
}

at::Tensor upsample_cuda(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w,
                         const at::Tensor& den) {
  const c10::cuda::OptionalCUDAGuard guard(A.device());
  CudaRuntime rt;
  return cuda::upsample_impl(rt, s, A, h, w, den);
}

Tensor3 affinity_aggregate_cuda(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                                double scale, bool normalise) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::affinity_aggregate_impl(rt, x, s, h, w, scale, normalise);
}

at::Tensor pool_cuda(const at::Tensor& x, int64_t h, int64_t w) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::pool_impl(rt, x, h, w);
}

}  // namespace stvit
