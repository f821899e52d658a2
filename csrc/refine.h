// The written-out refine attention of csrc/refine.cpp, for the STA module step of ops.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace stvit {

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Autocast's cast of an operator's input made inside the operator (one C++ call, no autograd
// node): `t` in `dtype`; `t` itself without a dtype, when it has that one already, or when it is
// not a float32 / float16 / bfloat16 tensor (autocast leaves float64 alone). An absent optional
// stays absent.
at::Tensor cast_input(const at::Tensor& t, std::optional<at::ScalarType> dtype);
std::optional<at::Tensor> cast_input(const std::optional<at::Tensor>& t,
                                     std::optional<at::ScalarType> dtype);

// (out [B, C, H, W], qkvh, attn, o): see refine.cpp. The operator's out is token-major; with
// `contiguous_out` it is contiguous instead (for the upsampling of sta_forward). `dtype`: s and the
// parameters cast to it first (cast_input: the module under autocast).
Tensor4 refine_attention_forward(const at::Tensor& s, const at::Tensor& qkv_weight,
                                 const std::optional<at::Tensor>& qkv_bias,
                                 const at::Tensor& proj_weight,
                                 const std::optional<at::Tensor>& proj_bias, int64_t heads,
                                 double scale, bool contiguous_out,
                                 std::optional<at::ScalarType> dtype = std::nullopt);

// (ds, dqkv_weight, dqkv_bias, dproj_weight, dproj_bias) from the gradient of `out`, in the dtype
// the forward computed in (o's): s and the weights may be the forward's inputs before its cast,
// cast again here (autograd casts the gradients back to the inputs' dtypes). `ones`, if defined,
// is a vector of at least B * N ones in o's dtype on its device: the bias gradients are then
// matrix-vector products with it (sta_backward: the ones come from the aggregation's reduction,
// which writes them in place of den), where ATen's reduction over the rows of a tall matrix is
// slow on CUDA (an H200 at stage 1, B=64: 11.6 us for [3136, 64] and 16.2 us for [3136, 192],
// float32).
Tensor5 refine_attention_backward(const at::Tensor& grad, const at::Tensor& s,
                                  const at::Tensor& qkvh, const at::Tensor& attn,
                                  const at::Tensor& o, const at::Tensor& qkv_weight,
                                  const at::Tensor& proj_weight, int64_t heads, double scale,
                                  const at::Tensor& ones = at::Tensor());

// The CPU kernel of refine_attention_forward (cpu/sta_cpu.cpp), for float and double where the
// call is small: up to refine_cpu_limit() multiply-adds, where ATen's matrix products cost more in
// their set-up than in their arithmetic. refine_cpu_takes says whether it applies (CPU tensors of
// s's dtype, contiguous, the work within the limit); refine_forward_cpu fills the four outputs of
// refine_attention_forward (qkvh's rows contiguous, any strides above them; attn and o contiguous;
// out [B, C, H, W] contiguous, or a view of a token-major [B, N, C]).
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
#ifdef STVIT_WITH_CUDA
// The CUDA kernels of the same two steps (cuda/refine_kernels.cuh, cuda/refine_cuda.cu), for
// every floating dtype, where one (image, head) block's working set fits in the device's shared
// memory (the STViT stages with super tokens: 49 tokens of 64 channels per head, ...):
//   refine_forward_cuda fills refine_attention_forward's four outputs, as refine_forward_cpu (its
//   weight products batched BLAS products, the attention core one kernel);
//   refine_core_backward_cuda the attention core of the backward: from go [B * N, C] (the
//   gradient of o) and the forward's qkvh and attn, dqkv [B * N, 3C] (token-major, the qkv
//   channel order, go's dtype), where the ATen path takes two matrix products per input of the
//   core, the softmax backward and two layout copies.
bool refine_cuda_takes(const at::Tensor& s, const at::Tensor& qkv_weight,
                       const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                       const std::optional<at::Tensor>& proj_bias, int64_t heads);
void refine_forward_cuda(const at::Tensor& s, const at::Tensor& qkv_weight,
                         const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                         const std::optional<at::Tensor>& proj_bias, int64_t heads, double scale,
                         const at::Tensor& qkvh, const at::Tensor& attn, const at::Tensor& o,
                         const at::Tensor& out);
bool refine_core_cuda_takes(const at::Tensor& go, const at::Tensor& qkvh, const at::Tensor& attn,
                            int64_t B, int64_t N, int64_t heads);
void refine_core_backward_cuda(const at::Tensor& go, const at::Tensor& qkvh,
                               const at::Tensor& attn, int64_t B, int64_t N, int64_t heads,
                               double scale, const at::Tensor& dqkv);
#endif

// Whether the refine kernels (CPU and CUDA) may take a call at all, and its setter (returns the
// previous value): off, every call takes the ATen path (a benchmark and testing aid). Initially
// on, unless the environment variable STVIT_REFINE_KERNELS is 0.
bool refine_kernels_enabled();
bool set_refine_kernels_enabled(bool enabled);

// The limit (multiply-adds per call) and its setter (testing and benchmark aid; returns the
// previous limit; 0: never the kernel).
int64_t refine_cpu_limit();
int64_t set_refine_cpu_limit(int64_t limit);

}  // namespace stvit
