// The CUDA entry points of the refine kernels (refine_kernels.cuh), declared in csrc/refine.h:
// when they apply (dtypes, layouts, the shared-memory budget of the device) and their launches.
#include <optional>

#include <c10/cuda/CUDAGuard.h>

#include "cuda_runtime.cuh"
#include "refine.h"
#include "refine_kernels.cuh"

namespace stvit {
namespace {

bool half_or_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
}

bool plain_cuda(const at::Tensor& t, const at::Tensor& like) {
  return t.is_cuda() && t.device() == like.device() && t.scalar_type() == like.scalar_type() &&
         t.is_contiguous();
}

int acc_bytes(at::ScalarType dt) { return dt == at::kDouble ? 8 : 4; }

// The device's opt-in limit of dynamic shared memory per block.
size_t smem_optin(const at::Tensor& t) {
  return static_cast<size_t>(at::cuda::getDeviceProperties(t.device().index())->sharedMemPerBlockOptin);
}

const at::Tensor* bias_ptr(const std::optional<at::Tensor>& b) {
  return b.has_value() && b->defined() ? &*b : nullptr;
}

}  // namespace

bool refine_cuda_takes(const at::Tensor& s, const at::Tensor& qkv_weight,
                       const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                       const std::optional<at::Tensor>& proj_bias, int64_t heads) {
  // s contiguous or token-major (sta_forward's): [B, C, N] either way a view the batched
  // product reads as it is
  if (!refine_kernels_enabled() || !s.is_cuda() || !half_or_float(s.scalar_type()) ||
      s.numel() == 0 ||
      !(s.is_contiguous() || s.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      s.size(0) > 0x7fffffffLL) {
    return false;
  }
  const auto bias_ok = [&](const std::optional<at::Tensor>& b) {
    return !b.has_value() || !b->defined() || plain_cuda(*b, s);
  };
  // the attention core's block holds one head's q, k, v and scores: d = C / heads channels
  const int64_t C = s.size(1), N = s.size(2) * s.size(3);
  return plain_cuda(qkv_weight, s) && plain_cuda(proj_weight, s) && bias_ok(qkv_bias) &&
         bias_ok(proj_bias) &&
         cuda::refine_forward_smem(C / heads, N, acc_bytes(s.scalar_type())) <= smem_optin(s);
}

void refine_forward_cuda(const at::Tensor& s, const at::Tensor& qkv_weight,
                         const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                         const std::optional<at::Tensor>& proj_bias, int64_t heads, double scale,
                         const at::Tensor& qkvh, const at::Tensor& attn, const at::Tensor& o,
                         const at::Tensor& out) {
  TORCH_CHECK(qkvh.stride(3) == 1, "stvit::refine_forward_cuda: q, k, v rows must be contiguous");
  const c10::cuda::OptionalCUDAGuard guard(s.device());
  cuda::CudaRuntime rt;
  cuda::refine_forward_impl(rt, s, qkv_weight, bias_ptr(qkv_bias), proj_weight,
                            bias_ptr(proj_bias), heads, scale, qkvh, attn, o, out);
}

bool refine_core_cuda_takes(const at::Tensor& go, const at::Tensor& qkvh, const at::Tensor& attn,
                            int64_t B, int64_t N, int64_t heads) {
  if (!refine_kernels_enabled() || !go.is_cuda() || !half_or_float(go.scalar_type()) ||
      go.numel() == 0 || !go.is_contiguous() || B * heads > 0x7fffffffLL) {
    return false;
  }
  const at::ScalarType acc = go.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return qkvh.device() == go.device() && qkvh.scalar_type() == acc && qkvh.stride(3) == 1 &&
         attn.device() == go.device() && attn.scalar_type() == acc && attn.is_contiguous() &&
         cuda::refine_backward_smem(go.size(1) / heads, N, acc_bytes(go.scalar_type())) <=
             smem_optin(go);
}

void refine_core_backward_cuda(const at::Tensor& go, const at::Tensor& qkvh,
                               const at::Tensor& attn, int64_t B, int64_t N, int64_t heads,
                               double scale, const at::Tensor& dqkv) {
  const c10::cuda::OptionalCUDAGuard guard(go.device());
  cuda::CudaRuntime rt;
  cuda::refine_core_backward_impl(rt, go, qkvh, attn, B, N, heads, scale, dqkv);
}

}  // namespace stvit
