// The written-out refine attention of csrc/refine.cpp, for the STA module step of ops.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace stvit {

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (out [B, C, H, W], qkvh, attn, o): see refine.cpp. The operator's out is token-major; with
// `contiguous_out` it is contiguous instead (for the upsampling of sta_forward).
Tensor4 refine_attention_forward(const at::Tensor& s, const at::Tensor& qkv_weight,
                                 const std::optional<at::Tensor>& qkv_bias,
                                 const at::Tensor& proj_weight,
                                 const std::optional<at::Tensor>& proj_bias, int64_t heads,
                                 double scale, bool contiguous_out);

// (ds, dqkv_weight, dqkv_bias, dproj_weight, dproj_bias) from the gradient of `out`.
Tensor5 refine_attention_backward(const at::Tensor& grad, const at::Tensor& s,
                                  const at::Tensor& qkvh, const at::Tensor& attn,
                                  const at::Tensor& o, const at::Tensor& qkv_weight,
                                  const at::Tensor& proj_weight, int64_t heads, double scale);

// The CPU kernel of refine_attention_forward (cpu/sta_cpu.cpp), for float and double where the
// call is small: up to refine_cpu_limit() multiply-adds, where ATen's matrix products cost more in
// their set-up than in their arithmetic. refine_cpu_takes says whether it applies (CPU tensors of
// s's dtype, contiguous, the work within the limit); refine_forward_cpu fills the four outputs of
// refine_attention_forward (qkvh's rows contiguous, any strides above them; the others contiguous,
// out token-major [B, N, C] or, when it is 4-D, contiguous [B, C, H, W]).
bool refine_cpu_takes(const at::Tensor& s, const at::Tensor& qkv_weight,
                      const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                      const std::optional<at::Tensor>& proj_bias);
void refine_forward_cpu(const at::Tensor& s, const at::Tensor& qkv_weight,
                        const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                        const std::optional<at::Tensor>& proj_bias, int64_t heads, double scale,
                        const at::Tensor& qkvh, const at::Tensor& attn, const at::Tensor& o,
                        const at::Tensor& out);
// Its backward on the CPU kernel (one thread), where the forward's kernel would take the call and
// grad, attn and o are contiguous (qkvh's rows): (ds token-major [B, N, C], dqkv_weight,
// dqkv_bias, dproj_weight, dproj_bias), ds still to be viewed as [B, C, H, W].
bool refine_backward_cpu_takes(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& qkvh,
                               const at::Tensor& attn, const at::Tensor& o,
                               const at::Tensor& qkv_weight, const at::Tensor& proj_weight);
Tensor5 refine_backward_cpu(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& qkvh,
                            const at::Tensor& attn, const at::Tensor& o,
                            const at::Tensor& qkv_weight, const at::Tensor& proj_weight,
                            int64_t heads, double scale);
// The limit (multiply-adds per call) and its setter (testing and benchmark aid; returns the
// previous limit; 0: never the kernel).
int64_t refine_cpu_limit();
int64_t set_refine_cpu_limit(int64_t limit);

}  // namespace stvit
