// The runtime policy (sta_launch.cuh) of the real CUDA launches, shared by sta_cuda.cu and
// refine_cuda.cu: the current device and stream, the device's shared-memory limits, launches.
#pragma once

#include <algorithm>
#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "sta_kernels.cuh"

namespace stvit {
namespace cuda {

// Process-wide overrides of the plan limits (a benchmark aid: benchmarks/tune_cuda.py sweeps
// them, stvit::set_cuda_plan_overrides sets them): 0 keeps the device's default (cache_x and
// cell_units: -1).
struct PlanOverrides {
  std::atomic<int> max_threads{0}, tile_pixels{0}, smem_block{0}, cache_x{-1}, cell_units{-1},
      upsample_pixels{0};
};
inline PlanOverrides plan_overrides;

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
    const PlanOverrides& o = plan_overrides;
    if (const int v = o.max_threads.load(std::memory_order_relaxed); v > 0) lim.max_threads = v;
    if (const int v = o.tile_pixels.load(std::memory_order_relaxed); v > 0) lim.tile_pixels = v;
    if (const int v = o.smem_block.load(std::memory_order_relaxed); v > 0) lim.smem_block = v;
    if (const int v = o.cache_x.load(std::memory_order_relaxed); v >= 0) lim.cache_x = v != 0;
    if (const int v = o.cell_units.load(std::memory_order_relaxed); v >= 0) lim.cell_units = v != 0;
    if (const int v = o.upsample_pixels.load(std::memory_order_relaxed); v > 0) {
      lim.upsample_pixels = v;
    }
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


}  // namespace cuda
}  // namespace stvit
