// CPU extension that runs the CUDA kernels of csrc/cuda under the host emulator (emu_shim.h);
// built and driven by run_emu.py. Not part of the package build.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "emu_shim.h"
#include "sta_launch.cuh"

namespace {
struct EmuRuntime {
  stvit::cuda::PlanLimits lim;
  int order_mode = 0;
  uint64_t seed = 0;
  long launches = 0, blocks_run = 0, barriers = 0;
  std::vector<std::string> log;

  stvit::cuda::PlanLimits limits() const { return lim; }

  template <typename Params>
  void launch(void (*kernel)(Params), int64_t blocks, int threads, size_t smem, const Params& p) {
    TORCH_CHECK(threads >= 1 && threads <= 1024, "bad block size ", threads);
    TORCH_CHECK(blocks >= 1 && blocks <= 0x7fffffffLL, "bad grid ", blocks);
    TORCH_CHECK(smem <= std::max(lim.smem_soft, lim.smem_max), "too much shared memory ", smem);
    emu::g_blockDim.x = threads;
    emu::g_gridDim.x = static_cast<unsigned>(blocks);
    log.push_back("blocks=" + std::to_string(blocks) + " threads=" + std::to_string(threads) +
                  " smem=" + std::to_string(smem));
    for (int64_t b = 0; b < blocks; ++b) {
      emu::run_block(kernel, b, threads, smem, p, order_mode, seed + launches, &barriers);
    }
    ++launches;
    blocks_run += blocks;
  }
};

EmuRuntime make_rt(int max_threads, int64_t smem_soft, int64_t smem_max, int64_t smem_block, int max_chunk, bool cache_x, int tile_pixels, int order_mode, int64_t seed) {
  EmuRuntime rt;
  rt.lim.max_threads = max_threads;
  rt.lim.smem_soft = smem_soft;
  rt.lim.smem_max = smem_max;
  rt.lim.smem_block = smem_block;
  rt.lim.max_chunk = max_chunk;
  rt.lim.cache_x = cache_x;
  rt.lim.tile_pixels = tile_pixels;
  rt.order_mode = order_mode;
  rt.seed = seed;
  return rt;
}
}  // namespace

// cfg = (max_threads, smem_soft, smem_max, smem_block, max_chunk, cache_x, tile_pixels, order_mode, seed)
#define CFG int max_threads, int64_t smem_soft, int64_t smem_max, int64_t smem_block, int max_chunk, bool cache_x, int tile_pixels, int order_mode, int64_t seed
#define RT auto rt = make_rt(max_threads, smem_soft, smem_max, smem_block, max_chunk, cache_x, tile_pixels, order_mode, seed)

at::Tensor affinity(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w, double scale, bool softmax, CFG) {
  RT; return stvit::cuda::affinity_impl(rt, x, s, h, w, scale, softmax);
}
std::tuple<at::Tensor, at::Tensor> aggregate(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w, CFG) {
  RT; return stvit::cuda::aggregate_impl(rt, x, A, h, w);
}
at::Tensor upsample(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w, CFG) {
  RT; return stvit::cuda::upsample_impl(rt, s, A, h, w);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_aggregate(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w, double scale, bool normalise, CFG) {
  RT; return stvit::cuda::affinity_aggregate_impl(rt, x, s, h, w, scale, normalise);
}
// the plan that limits like a device's (48 KB soft, opt-in up to smem_max, smem_block a block)
// pick, for reports
std::vector<int64_t> plan(int kind, int64_t C, int64_t h, int64_t w, int64_t ww, int acc, int sc, int64_t smem_max, int64_t smem_block) {
  stvit::cuda::PlanLimits L; L.smem_max = smem_max; L.smem_block = smem_block;
  auto p = stvit::cuda::plan_cells(kind, C, h, w, ww, acc, sc, L);
  return {p.BS, p.NC, p.NT, p.CK, p.SK, p.XC, p.CW, p.cache_x, (int64_t)p.smem};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affinity", &affinity);
  m.def("aggregate", &aggregate);
  m.def("upsample", &upsample);
  m.def("affinity_aggregate", &affinity_aggregate);
  m.def("plan", &plan);
}
