// The written-out refine attention of csrc/refine.cpp, for the STA module step of ops.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace stvit {

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (out [B, C, H, W], qkvh, attn, o): see refine.cpp.
Tensor4 refine_attention_forward(const at::Tensor& s, const at::Tensor& qkv_weight,
                                 const std::optional<at::Tensor>& qkv_bias,
                                 const at::Tensor& proj_weight,
                                 const std::optional<at::Tensor>& proj_bias, int64_t heads,
                                 double scale);

// (ds, dqkv_weight, dqkv_bias, dproj_weight, dproj_bias) from the gradient of `out`.
Tensor5 refine_attention_backward(const at::Tensor& grad, const at::Tensor& s,
                                  const at::Tensor& qkvh, const at::Tensor& attn,
                                  const at::Tensor& o, const at::Tensor& qkv_weight,
                                  const at::Tensor& proj_weight, int64_t heads, double scale);

}  // namespace stvit
