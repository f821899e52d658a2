// CPU extension that runs the CUDA kernels of csrc/cuda under the host emulator (emu_shim.h);
// built and driven by run_emu.py. Not part of the package build.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "emu_shim.h"
#include "sta_launch.cuh"
#include "refine_kernels.cuh"

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

EmuRuntime make_rt(int max_threads, int64_t smem_soft, int64_t smem_max, int64_t smem_block, int max_chunk, bool cache_x, int tile_pixels, bool cell_units, int upsample_pixels, int order_mode, int64_t seed) {
  EmuRuntime rt;
  rt.lim.max_threads = max_threads;
  rt.lim.smem_soft = smem_soft;
  rt.lim.smem_max = smem_max;
  rt.lim.smem_block = smem_block;
  rt.lim.max_chunk = max_chunk;
  rt.lim.cache_x = cache_x;
  rt.lim.tile_pixels = tile_pixels;
  rt.lim.cell_units = cell_units;
  rt.lim.upsample_pixels = upsample_pixels;
  rt.order_mode = order_mode;
  rt.seed = seed;
  return rt;
}
}  // namespace

// cfg = (max_threads, smem_soft, smem_max, smem_block, max_chunk, cache_x, tile_pixels, cell_units, upsample_pixels, order_mode, seed)
#define CFG int max_threads, int64_t smem_soft, int64_t smem_max, int64_t smem_block, int max_chunk, bool cache_x, int tile_pixels, bool cell_units, int upsample_pixels, int order_mode, int64_t seed
#define RT auto rt = make_rt(max_threads, smem_soft, smem_max, smem_block, max_chunk, cache_x, tile_pixels, cell_units, upsample_pixels, order_mode, seed)

at::Tensor affinity(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w, double scale, bool softmax, CFG) {
  RT; return stvit::cuda::affinity_impl(rt, x, s, h, w, scale, softmax);
}
// tokens_last, den_ones: num token-major (channels_last strides) and ones for den, as sta_backward
// asks for them
std::tuple<at::Tensor, at::Tensor> aggregate(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w, bool tokens_last, bool den_ones, CFG) {
  RT; return stvit::cuda::aggregate_impl(rt, x, A, h, w, tokens_last, den_ones);
}
at::Tensor upsample(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w, CFG) {
  RT; return stvit::cuda::upsample_impl(rt, s, A, h, w);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_aggregate(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w, double scale, bool normalise, bool tokens_last, CFG) {
  RT; return stvit::cuda::affinity_aggregate_impl(rt, x, s, h, w, scale, normalise, tokens_last);
}
// out_dtype / dtype (optional): the float32 pixels of the folded casts (sta_launch.cuh, pixel_t)
at::Tensor upsample_normalised(const at::Tensor& s, const at::Tensor& A, const at::Tensor& den, int64_t h, int64_t w, std::optional<at::ScalarType> out_dtype, CFG) {
  RT; return stvit::cuda::upsample_impl(rt, s, A, h, w, den, out_dtype);
}
at::Tensor pool(const at::Tensor& x, int64_t h, int64_t w, std::optional<at::ScalarType> dtype, CFG) {
  RT; return stvit::cuda::pool_impl(rt, x, h, w, dtype);
}
// the refine kernels (refine_kernels.cuh): outputs as refine.cpp allocates them
std::vector<at::Tensor> refine_forward(const at::Tensor& s, const at::Tensor& wqkv, const std::optional<at::Tensor>& bqkv, const at::Tensor& wproj, const std::optional<at::Tensor>& bproj, int64_t heads, double scale, bool contiguous_out, CFG) {
  RT;
  const int64_t B = s.size(0), C = s.size(1), N = s.size(2) * s.size(3);
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // qkvh as refine.cpp lays it out: a view of a token-major [B * N, 3C] buffer where that is one
  // (one head, no cast: strides (d, N * 3C, 3C, 1)), else contiguous
  const int64_t d = C / heads;
  at::Tensor qkvh = heads == 1 && s.scalar_type() == acc
      ? at::empty({B * N, 3 * C}, s.options()).as_strided({3, B, N, d}, {d, N * 3 * C, 3 * C, 1})
      : at::empty({3, B * heads, N, d}, s.options().dtype(acc));
  at::Tensor attn = at::empty({B * heads, N, N}, s.options().dtype(acc));
  at::Tensor o = at::empty({B * N, C}, s.options());
  at::Tensor out = contiguous_out ? at::empty(s.sizes(), s.options()) : at::empty({B, N, C}, s.options()).transpose(1, 2).view(s.sizes());
  const at::Tensor* bq = bqkv.has_value() ? &*bqkv : nullptr;
  const at::Tensor* bp = bproj.has_value() ? &*bproj : nullptr;
  stvit::cuda::refine_forward_impl(rt, s, wqkv, bq, wproj, bp, heads, scale, qkvh, attn, o, out);
  return {out, qkvh, attn, o};
}
at::Tensor refine_core_backward(const at::Tensor& go, const at::Tensor& qkvh, const at::Tensor& attn, int64_t B, int64_t N, int64_t heads, double scale, CFG) {
  RT;
  at::Tensor dqkv = at::empty({B * N, 3 * go.size(1)}, go.options());
  stvit::cuda::refine_core_backward_impl(rt, go, qkvh, attn, B, N, heads, scale, dqkv);
  return dqkv;
}
// the plan that limits like a device's (48 KB soft, opt-in up to smem_max, smem_block a block)
// pick, for reports
std::vector<int64_t> plan(int kind, int64_t C, int64_t h, int64_t w, int64_t ww, int acc, int sc, int64_t smem_max, int64_t smem_block) {
  stvit::cuda::PlanLimits L; L.smem_max = smem_max; L.smem_block = smem_block;
  auto p = stvit::cuda::plan_cells(kind, C, h, w, ww, acc, sc, L);
  return {p.BS, p.NC, p.NT, p.CK, p.SK, p.XC, p.CW, p.cache_x, (int64_t)p.smem, p.cell_units};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affinity", &affinity);
  m.def("aggregate", &aggregate);
  m.def("upsample", &upsample);
  m.def("affinity_aggregate", &affinity_aggregate);
  m.def("plan", &plan);
  m.def("pool", &pool);
  m.def("upsample_normalised", &upsample_normalised);
  m.def("refine_forward", &refine_forward);
  m.def("refine_core_backward", &refine_core_backward);
}
