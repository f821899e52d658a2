// The four CUDA entry points declared in csrc/stvit.h. Kernels: sta_kernels.cuh; allocation,
// dispatch and launch sequence: sta_launch.cuh (shared with the host emulator of the tests).
#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "stvit.h"
#include "sta_launch.cuh"

namespace stvit {
namespace {

// Launches on the current stream of the inputs' device; opts in to more than 48 KB of dynamic
// shared memory when a plan asks for it (very wide channels).
struct CudaRuntime {
  int device;
  cudaStream_t stream;
  cuda::PlanLimits lim;

  CudaRuntime()
      : device(c10::cuda::current_device()), stream(at::cuda::getCurrentCUDAStream(device)) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
    lim.smem_max = static_cast<size_t>(prop->sharedMemPerBlockOptin);
    const size_t per_sm = static_cast<size_t>(prop->sharedMemPerMultiprocessor);
    lim.smem_block = per_sm >= 4 * 1024 ? per_sm / 4 - 1024 : per_sm;
  }

  cuda::PlanLimits limits() const { return lim; }

  // Lets `kernel` take up to the device's opt-in limit of dynamic shared memory, once per kernel
  // and device (a driver call: not on every launch).
  static void opt_in(const void* kernel, int device, size_t smem_max) {
    static std::mutex m;
    static std::vector<std::pair<const void*, int>> done;
    const std::lock_guard<std::mutex> lock(m);
    const std::pair<const void*, int> key{kernel, device};
    if (std::find(done.begin(), done.end(), key) != done.end()) return;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_max)));
    done.push_back(key);
  }

  template <typename Params>
  void launch(void (*kernel)(Params), int64_t blocks, int threads, size_t smem, const Params& p) {
    if (smem > 48 * 1024) opt_in(reinterpret_cast<const void*>(kernel), device, lim.smem_max);
    kernel<<<static_cast<unsigned int>(blocks), threads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

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

at::Tensor upsample_cuda(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w) {
  const c10::cuda::OptionalCUDAGuard guard(A.device());
  CudaRuntime rt;
  return cuda::upsample_impl(rt, s, A, h, w);
}

Tensor3 affinity_aggregate_cuda(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                                double scale, bool normalise) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CudaRuntime rt;
  return cuda::affinity_aggregate_impl(rt, x, s, h, w, scale, normalise);
}

}  // namespace stvit
