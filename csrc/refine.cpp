// The refine of the STA module (stvit_kernels.RefineAttention): multi-head self-attention over the
// N = H * W tokens of s [B, C, H, W] with the official parameters (qkv: a 1x1 conv to 3C whose
// output channels are [heads, (q, k, v), head_dim]; proj: a 1x1 conv). Three operators, all
// compositions of ATen ops, so one C++ body serves both devices (except where a kernel takes the
// call, see refine.h: on the CPU those of cpu/sta_cpu.cpp for a small float / double forward or
// backward; on CUDA those of cuda/refine_kernels.cuh, the attention core of the forward (its
// weight products batched BLAS products) and of the backward, one block per (image, head),
// wherever that fits in shared memory):
//
//   refine_attention(s, ...) -> out
//       the path beyond REFINE_FUSED_MAX_TOKENS tokens or with attention dropout: the 1x1 convolutions as matrix products on the token-major
//       view [B, N, C] (q, k, v come out as views with unit stride on head_dim and aligned rows,
//       which the fused kernels of scaled_dot_product_attention take for any N) and SDPA.
//       Registered CompositeImplicitAutograd: autograd, autocast and torch.compile see the ATen
//       ops (one call from Python instead of a dozen).
//   refine_attention_forward(s, ...) -> (out, qkvh, attn, o)
//   refine_attention_backward(grad, s, qkvh, attn, o, ...) -> (ds, dqkv_w, dqkv_b, dproj_w, dproj_b)
//       the path up to REFINE_FUSED_MAX_TOKENS tokens (stvit_kernels/module.py), with or without
//       a gradient: the same function with the attention core written out (scores,
//       softmax, weighted sum, in float32 for half inputs), its intermediates returned for the
//       backward, and the backward by hand (the textbook formulas of linear, softmax and matmul).
//       Registered for CPU and CUDA with no autograd of their own (fake implementations in
//       stvit_kernels/_library.py): the one autograd node of stvit_kernels._library.Refine calls
//       them, where the composite above would put ~20 nodes on autograd's graph. Autocast is off
//       inside, so the attention core stays in the accumulation type; under autocast the caller
//       passes its dtype (`dtype`), and the forward casts s and the parameters to it itself (no
//       autograd node per cast); the backward computes in that dtype (o's).
//
// Saved for the backward: qkvh [3, B * heads, N, d] (q, k, v head-major, accumulation type),
// attn [B * heads, N, N] (the softmax, accumulation type), o [B * N, C] (the attention output
// before proj, input dtype). Outputs `out` and `ds` are [B, C, H, W] views of token-major tensors
// (the strides of channels_last).
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "refine.h"

namespace stvit {

namespace {
// initially on, unless the environment says STVIT_REFINE_KERNELS=0 (an A/B of whole processes)
bool enabled_by_env() {
  const char* v = std::getenv("STVIT_REFINE_KERNELS");
  return v == nullptr || std::string(v) != "0";
}
std::atomic<bool> kernels_enabled{enabled_by_env()};
}  // namespace

bool refine_kernels_enabled() { return kernels_enabled.load(std::memory_order_relaxed); }
bool set_refine_kernels_enabled(bool enabled) { return kernels_enabled.exchange(enabled); }

namespace {

struct RefineShape {
  int64_t B, C, H, W, N, heads, d;
};

RefineShape refine_shape(const char* op, const at::Tensor& s, int64_t heads) {
  TORCH_CHECK(s.dim() == 4, "stvit::", op, ": s must be 4-D, got s.shape=", s.sizes());
  const int64_t C = s.size(1);
  TORCH_CHECK(heads >= 1 && C % heads == 0, "stvit::", op, ": ", C,
              " channels do not split into ", heads, " heads");
  return {s.size(0), C, s.size(2), s.size(3), s.size(2) * s.size(3), heads, C / heads};
}

// Inside the raw forward and backward: no autograd recording (they are the autograd node's own
// computations) and no autocast (the caller cast the inputs; the attention core stays in the
// accumulation type).
struct RawGuard {
  c10::impl::ExcludeDispatchKeyGuard no_autograd{c10::autograd_dispatch_keyset_with_ADInplaceOrView};
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// [B, C, H, W] -> its token-major view [B, N, C] (a transpose: no copy)
at::Tensor tokens_of(const at::Tensor& t, const RefineShape& g) {
  return t.reshape({g.B, g.C, g.N}).transpose(1, 2);
}

// [B, N, C] token-major -> a [B, C, H, W] view of it
at::Tensor map_of(const at::Tensor& t, const RefineShape& g) {
  return t.transpose(1, 2).view({g.B, g.C, g.H, g.W});
}

at::ScalarType acc_of(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor refine_attention(const at::Tensor& s, const at::Tensor& qkv_weight,
                            const std::optional<at::Tensor>& qkv_bias,
                            const at::Tensor& proj_weight,
                            const std::optional<at::Tensor>& proj_bias, int64_t heads,
                            double scale, double dropout_p) {
  const RefineShape g = refine_shape("refine_attention", s, heads);
  const at::Tensor qkv = at::linear(tokens_of(s, g), qkv_weight.reshape({3 * g.C, g.C}), qkv_bias);
  const auto q_k_v = qkv.view({g.B, g.N, heads, 3, g.d}).permute({3, 0, 2, 1, 4}).unbind(0);
  const at::Tensor out = at::scaled_dot_product_attention(q_k_v[0], q_k_v[1], q_k_v[2], {},
                                                          dropout_p, false, scale);
  const at::Tensor proj = at::linear(out.transpose(1, 2).reshape({g.B, g.N, g.C}),
                                     proj_weight.reshape({g.C, g.C}), proj_bias);
  return map_of(proj, g);
}

// `t` (any strides) as a tensor of `shape` in `dtype`: a view of it where its strides allow one
// and no cast is needed (a single head in float32 / float64: q, k, v and the attention output are
// then views of the matrix products' results), else one copy.
at::Tensor relayout(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t.reshape(shape);
  return at::empty(t.sizes(), t.options().dtype(dtype)).copy_(t).view(shape);
}

// The layout relayout(t, shape, dtype) gives, without t's values: the same view of t where that is
// a view, else a fresh contiguous tensor (for a kernel to fill).
at::Tensor relayout_like(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) {
    if (const auto strides = at::detail::computeStride(t.sizes(), t.strides(), shape)) {
      return t.as_strided(shape, *strides);
    }
  }
  return at::empty(shape, t.options().dtype(dtype));
}

// [B, N, heads, d] token-major -> [B * heads, N, d] head-major in `dtype`
at::Tensor head_major(const at::Tensor& t, const RefineShape& g, at::ScalarType dtype) {
  return relayout(t.view({g.B, g.N, g.heads, g.d}).transpose(1, 2), {g.B * g.heads, g.N, g.d},
                  dtype);
}

// [B * heads, N, d] head-major -> token-major [B * N, C] in `dtype`
at::Tensor token_major(const at::Tensor& t, const RefineShape& g, at::ScalarType dtype) {
  return relayout(t.view({g.B, g.heads, g.N, g.d}).transpose(1, 2), {g.B * g.N, g.C}, dtype);
}

// x [M, K] @ weight [N, K]^T (+ bias): at::linear's 2-D case, without its dispatch layers
at::Tensor linear2d(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

// The sums over the rows of t [M, n] (a bias gradient): t^T ones with a vector of at least M ones
// if given, else ATen's reduction.
at::Tensor row_sums(const at::Tensor& t, const at::Tensor& ones) {
  if (!ones.defined()) return t.sum(0);
  return at::mv(t.t(), ones.reshape({-1}).narrow(0, 0, t.size(0)).to(t.scalar_type()));
}

// A fresh [B * heads, N, N or d] result of alpha * a @ b (baddbmm ignores `self` when beta = 0).
at::Tensor scaled_bmm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  return at::baddbmm(at::empty({a.size(0), a.size(1), b.size(2)}, a.options()), a, b, 0.0, alpha);
}

// the dtypes autocast casts (it leaves float64 alone)
bool autocast_eligible(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

}  // namespace

at::Tensor cast_input(const at::Tensor& t, std::optional<at::ScalarType> dtype) {
  if (!dtype.has_value() || t.scalar_type() == *dtype || !autocast_eligible(t.scalar_type())) {
    return t;
  }
  return t.to(*dtype);
}

std::optional<at::Tensor> cast_input(const std::optional<at::Tensor>& t,
                                     std::optional<at::ScalarType> dtype) {
  if (!t.has_value() || !t->defined()) return t;
  return cast_input(*t, dtype);
}

// Returns (out [B, C, H, W], qkvh [3, B * heads, N, d] (q, k, v head-major, accumulation type),
// attn [B * heads, N, N] (accumulation type), o [B * N, C] (input dtype)); out is a view of a
// token-major tensor, or with `contiguous_out` contiguous (the layout the upsampling reads).
Tensor4 refine_attention_forward(const at::Tensor& s_in, const at::Tensor& qkv_weight_in,
                                 const std::optional<at::Tensor>& qkv_bias_in,
                                 const at::Tensor& proj_weight_in,
                                 const std::optional<at::Tensor>& proj_bias_in, int64_t heads,
                                 double scale, bool contiguous_out,
                                 std::optional<at::ScalarType> dtype) {
  RawGuard raw;
  const at::Tensor s = cast_input(s_in, dtype), qkv_weight = cast_input(qkv_weight_in, dtype),
                   proj_weight = cast_input(proj_weight_in, dtype);
  const std::optional<at::Tensor> qkv_bias = cast_input(qkv_bias_in, dtype),
                                  proj_bias = cast_input(proj_bias_in, dtype);
  const RefineShape g = refine_shape("refine_attention_forward", s, heads);
  const at::ScalarType dt = s.scalar_type(), acc = acc_of(dt);
  const bool on_cpu = refine_cpu_takes(s, qkv_weight, qkv_bias, proj_weight, proj_bias);
#ifdef STVIT_WITH_CUDA
  const bool on_cuda = !on_cpu && refine_cuda_takes(s, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                                          heads);
#else
  constexpr bool on_cuda = false;
#endif
  if (on_cpu || on_cuda) {
    // a kernel (cpu/sta_cpu.cpp, cuda/refine_kernels.cuh), into the layouts of the ATen path below
    const at::Tensor qkv = at::empty({g.B * g.N, 3 * g.C}, s.options());
    const at::Tensor qkvh = relayout_like(
        qkv.view({g.B, g.N, g.heads, 3, g.d}).permute({3, 0, 2, 1, 4}),
        {3, g.B * g.heads, g.N, g.d}, acc);
    const at::Tensor attn = at::empty({g.B * g.heads, g.N, g.N}, s.options().dtype(acc));
    const at::Tensor o = at::empty({g.B * g.N, g.C}, s.options());
    // out contiguous [B, C, H, W], or token-major [B, N, C] viewed as [B, C, H, W]
    const at::Tensor out = contiguous_out ? at::empty(s.sizes(), s.options())
                                          : map_of(at::empty({g.B, g.N, g.C}, s.options()), g);
    if (on_cpu) {
      refine_forward_cpu(s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, scale, qkvh,
                         attn, o, out);
    }
#ifdef STVIT_WITH_CUDA
    if (on_cuda) {
      refine_forward_cuda(s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, scale, qkvh,
                          attn, o, out);
    }
#endif
    return {out, qkvh, attn, o};
  }
  const at::Tensor qkv = linear2d(tokens_of(s, g).reshape({g.B * g.N, g.C}),
                                  qkv_weight.reshape({3 * g.C, g.C}), qkv_bias);
  // [B, N, heads, 3, d] -> [3, B * heads, N, d]: one copy, or a view (one head, no cast)
  const at::Tensor qkvh = relayout(qkv.view({g.B, g.N, g.heads, 3, g.d}).permute({3, 0, 2, 1, 4}),
                                   {3, g.B * g.heads, g.N, g.d}, acc);
  const at::Tensor q = qkvh[0], k = qkvh[1], v = qkvh[2];
  const at::Tensor attn = at::_softmax(scaled_bmm(q, k.transpose(1, 2), scale), -1, false);
  const at::Tensor o = token_major(at::bmm(attn, v), g, dt);
  const at::Tensor out =
      map_of(linear2d(o, proj_weight.reshape({g.C, g.C}), proj_bias).view({g.B, g.N, g.C}), g);
  return {contiguous_out ? out.contiguous() : out, qkvh, attn, o};
}

namespace {
// The operator: out token-major (the layout of its fake implementation).
Tensor4 refine_attention_forward_op(const at::Tensor& s, const at::Tensor& qkv_weight,
                                    const std::optional<at::Tensor>& qkv_bias,
                                    const at::Tensor& proj_weight,
                                    const std::optional<at::Tensor>& proj_bias, int64_t heads,
                                    double scale, std::optional<at::ScalarType> dtype) {
  return refine_attention_forward(s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, scale,
                                  /*contiguous_out=*/false, dtype);
}
}  // namespace

namespace {
// The attention core's backward, o = softmax(scale * q k^T) v: from go_tokens [B * N, C] (the
// gradient of o, token-major), dqkv [B * N, 3C] (token-major, the qkv channel order, dtype dt);
// the CUDA kernel where it takes the call.
at::Tensor attention_core_backward(const at::Tensor& go_tokens, const at::Tensor& qkvh,
                                   const at::Tensor& attn, const RefineShape& g, double scale,
                                   at::ScalarType dt, at::ScalarType acc) {
  const int64_t BN = g.B * g.N;
#ifdef STVIT_WITH_CUDA
  if (refine_core_cuda_takes(go_tokens, qkvh, attn, g.B, g.N, g.heads)) {
    const at::Tensor dqkv = at::empty({BN, 3 * g.C}, go_tokens.options());
    refine_core_backward_cuda(go_tokens, qkvh, attn, g.B, g.N, g.heads, scale, dqkv);
    return dqkv;
  }
#endif
  const at::Tensor go = head_major(go_tokens, g, acc);
  // the gradients of q, k, v land head-major in one buffer, in qkvh's layout
  const at::Tensor q = qkvh[0], k = qkvh[1], v = qkvh[2];
  const at::Tensor dqkvh = at::empty_like(qkvh);
  at::Tensor dq = dqkvh[0], dk = dqkvh[1], dv = dqkvh[2];
  at::bmm_out(dv, attn.transpose(1, 2), go);
  const at::Tensor dscores = at::_softmax_backward_data(at::bmm(go, v.transpose(1, 2)), attn, -1, acc);
  at::baddbmm_out(dq, dq, dscores, k, 0.0, scale);
  at::baddbmm_out(dk, dk, dscores.transpose(1, 2), q, 0.0, scale);
  // back to the qkv channel order [heads, (q, k, v), head_dim], token-major: [B * N, 3C]
  return relayout(dqkvh.view({3, g.B, g.heads, g.N, g.d}).permute({1, 3, 2, 0, 4}),
                  {BN, 3 * g.C}, dt);
}
}  // namespace

// Gradients of refine_attention_forward's `out` into s and the four parameters (the bias
// gradients are returned whether or not the module has biases: two small sums).
Tensor5 refine_attention_backward(const at::Tensor& grad, const at::Tensor& s_in,
                                  const at::Tensor& qkvh, const at::Tensor& attn,
                                  const at::Tensor& o, const at::Tensor& qkv_weight_in,
                                  const at::Tensor& proj_weight_in, int64_t heads, double scale,
                                  const at::Tensor& ones) {
  RawGuard raw;
  const RefineShape g = refine_shape("refine_attention_backward", s_in, heads);
  // the dtype the forward computed in (o's), s and the weights cast to it as the forward did
  const at::ScalarType dt = o.scalar_type(), acc = acc_of(dt);
  const at::Tensor s = cast_input(s_in, dt), qkv_weight = cast_input(qkv_weight_in, dt),
                   proj_weight = cast_input(proj_weight_in, dt);
  const int64_t BN = g.B * g.N;
  if (refine_backward_cpu_takes(grad, s, qkvh, attn, o, qkv_weight, proj_weight)) {
    auto [ds, dqkv_w, dqkv_b, dproj_w, dproj_b] =
        refine_backward_cpu(grad, s, qkvh, attn, o, qkv_weight, proj_weight, heads, scale);
    return {map_of(ds, g), dqkv_w, dqkv_b, dproj_w, dproj_b};
  }
  // proj: out = o @ Wp^T + bp
  const at::Tensor gout = tokens_of(grad.to(dt), g).reshape({BN, g.C});
  const at::Tensor dproj_w = at::mm(gout.t(), o);
  const at::Tensor dproj_b = row_sums(gout, ones);
  const at::Tensor dqkv = attention_core_backward(
      at::mm(gout, proj_weight.reshape({g.C, g.C})), qkvh, attn, g, scale, dt, acc);
  // qkv: qkv = tokens @ Wqkv^T + bqkv
  const at::Tensor dqkv_w = at::mm(dqkv.t(), tokens_of(s, g).reshape({BN, g.C}));
  const at::Tensor dqkv_b = row_sums(dqkv, ones);
  const at::Tensor ds = at::mm(dqkv, qkv_weight.reshape({3 * g.C, g.C})).view({g.B, g.N, g.C});
  return {map_of(ds, g), dqkv_w.view(qkv_weight.sizes()), dqkv_b,
          dproj_w.view(proj_weight.sizes()), dproj_b};
}

namespace {
// The operator, without `ones` (the schema has no such argument).
Tensor5 refine_attention_backward_op(const at::Tensor& grad, const at::Tensor& s,
                                     const at::Tensor& qkvh, const at::Tensor& attn,
                                     const at::Tensor& o, const at::Tensor& qkv_weight,
                                     const at::Tensor& proj_weight, int64_t heads, double scale) {
  return refine_attention_backward(grad, s, qkvh, attn, o, qkv_weight, proj_weight, heads, scale);
}
}  // namespace

}  // namespace stvit

TORCH_LIBRARY_FRAGMENT(stvit, m) {
  m.def("refine_attention(Tensor s, Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight, "
        "Tensor? proj_bias, int heads, float scale, float dropout_p) -> Tensor");
  m.def("refine_attention_forward(Tensor s, Tensor qkv_weight, Tensor? qkv_bias, "
        "Tensor proj_weight, Tensor? proj_bias, int heads, float scale, ScalarType? dtype=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("refine_attention_backward(Tensor grad, Tensor s, Tensor qkvh, Tensor attn, Tensor o, "
        "Tensor qkv_weight, Tensor proj_weight, int heads, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stvit, CompositeImplicitAutograd, m) {
  m.impl("refine_attention", &stvit::refine_attention);
}

// The same body for every device (the fake implementations, for meta tensors and torch.compile,
// are in stvit_kernels/_library.py, like the other operators').
TORCH_LIBRARY_IMPL(stvit, CPU, m) {
  m.impl("refine_attention_forward", &stvit::refine_attention_forward_op);
  m.impl("refine_attention_backward", &stvit::refine_attention_backward_op);
}

#ifdef STVIT_WITH_CUDA
TORCH_LIBRARY_IMPL(stvit, CUDA, m) {
  m.impl("refine_attention_forward", &stvit::refine_attention_forward_op);
  m.impl("refine_attention_backward", &stvit::refine_attention_backward_op);
}
#endif
