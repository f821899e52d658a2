// Host side of stvit_kernels._C: the `torch.ops.stvit` operators (schemas, input checks, CUDA
// device guard, a contiguous NCHW copy of inputs in any other layout) and the small Python
// module. The kernels behind the primitives are the *_cpu functions of csrc/cpu and the *_cuda
// functions of csrc/cuda (stvit.h); every check happens here, once, before either is called, and
// raises through TORCH_CHECK. `associate` and `associate_backward` are the STA module's
// association stage and its gradient as one call each (a loop over the kernels, in C++);
// `sta_forward` and `sta_backward` the whole module with its refine attention written out
// (refine.cpp), one call each way, and `sta`, the module as users call it: one autograd node in
// C++ over those two (SuperTokenStep), or sta_forward's output alone where no gradient is needed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/version.h>

#ifdef STVIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

#include "cpu/kernels.h"
#include "refine.h"
#include "stvit.h"

namespace stvit {
namespace {

void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "stvit::", op, ": ", name, " must be 4-D, got ", name, ".shape=",
              t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "stvit::", op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              name, ".dtype=", dt);
}

void check_same(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "stvit::", op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "stvit::", op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// H, W of `pixels` ([B, K, H, W]) divisible by the cell size (h, w).
void check_cells(const char* op, const char* name, const at::Tensor& pixels, int64_t h,
                 int64_t w) {
  TORCH_CHECK(h >= 1 && w >= 1, "stvit::", op,
              ": the super-token size must be positive, got (h, w) = (", h, ", ", w, ")");
  TORCH_CHECK(pixels.size(2) % h == 0 && pixels.size(3) % w == 0, "stvit::", op, ": ", name,
              " must have H and W divisible by the super-token size, got ", name, ".shape=",
              pixels.sizes(), " and (h, w) = (", h, ", ", w, ")");
}

// x [B, C, H, W] and s [B, C, H/h, W/w].
void check_pixels_stokens(const char* op, const at::Tensor& x, const at::Tensor& s, int64_t h,
                          int64_t w) {
  check_tensor(op, "x", x);
  check_tensor(op, "s", s);
  check_same(op, "x", x, "s", s);
  check_cells(op, "x", x, h, w);
  TORCH_CHECK(s.size(0) == x.size(0) && s.size(1) == x.size(1) && s.size(2) == x.size(2) / h &&
                  s.size(3) == x.size(3) / w,
              "stvit::", op, ": s must have shape [B, C, H/h, W/w] = [", x.size(0), ", ", x.size(1),
              ", ", x.size(2) / h, ", ", x.size(3) / w, "], got s.shape=", s.sizes(),
              " with x.shape=", x.sizes(), " and (h, w) = (", h, ", ", w, ")");
}

// A [B, 9, H, W] against pixels [B, C, H, W].
void check_pixels_affinity(const char* op, const at::Tensor& x, const at::Tensor& A, int64_t h,
                           int64_t w) {
  check_tensor(op, "x", x);
  check_tensor(op, "A", A);
  check_same(op, "x", x, "A", A);
  check_cells(op, "x", x, h, w);
  TORCH_CHECK(A.size(0) == x.size(0) && A.size(1) == 9 && A.size(2) == x.size(2) &&
                  A.size(3) == x.size(3),
              "stvit::", op, ": A must have shape [B, 9, H, W] = [", x.size(0), ", 9, ", x.size(2),
              ", ", x.size(3), "], got A.shape=", A.sizes(), " with x.shape=", x.sizes());
}

// s [B, C, hh, ww] against A [B, 9, hh*h, ww*w].
void check_stokens_affinity(const char* op, const at::Tensor& s, const at::Tensor& A, int64_t h,
                            int64_t w) {
  check_tensor(op, "s", s);
  check_tensor(op, "A", A);
  check_same(op, "s", s, "A", A);
  check_cells(op, "A", A, h, w);
  TORCH_CHECK(A.size(0) == s.size(0) && A.size(1) == 9 && A.size(2) == s.size(2) * h &&
                  A.size(3) == s.size(3) * w,
              "stvit::", op, ": s [B, C, hh, ww] and A [B, 9, hh*h, ww*w] do not match: s.shape=",
              s.sizes(), ", A.shape=", A.sizes(), ", (h, w) = (", h, ", ", w, ")");
}

// The kernels of one device type behind one interface.
struct CpuKernels {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static at::Tensor affinity(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                             double scale, bool softmax) {
    return affinity_cpu(x, s, h, w, scale, softmax);
  }
  static Tensor2 aggregate(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w) {
    return aggregate_cpu(x, A, h, w);
  }
  // (num in the layout the refine attention's backward reads best, a vector of ones for its bias
  // gradients or undefined: refine_attention_backward's `ones`): here num contiguous, as the CPU
  // kernels write it, and no ones (ATen's row sums)
  static Tensor2 aggregate_for_refine(const at::Tensor& x, const at::Tensor& A, int64_t h,
                                      int64_t w) {
    return {std::get<0>(aggregate_cpu(x, A, h, w)), at::Tensor()};
  }
  static at::Tensor upsample(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w) {
    return upsample_cpu(s, A, h, w);
  }
  // tokens_last (the super tokens token-major where the kernels write them so): not here
  static Tensor3 affinity_aggregate(const at::Tensor& x, const at::Tensor& s, int64_t h,
                                    int64_t w, double scale, bool normalise,
                                    bool /*tokens_last*/ = false) {
    return affinity_aggregate_cpu(x, s, h, w, scale, normalise);
  }
  static at::Tensor pool(const at::Tensor& x, int64_t h, int64_t w) { return pool_cpu(x, h, w); }
  // upsample(g / (den + 1e-12), A): the division as the kernel stages g, which it reads in place
  // (token-major as the refine's backward leaves it: no copy); in out_dtype if given (cast after)
  static at::Tensor upsample_normalised(const at::Tensor& g, const at::Tensor& A,
                                        const at::Tensor& den, int64_t h, int64_t w,
                                        std::optional<at::ScalarType> out_dtype) {
    const at::Tensor y = upsample_cpu(g, A, h, w, den);
    return out_dtype.has_value() ? y.to(*out_dtype) : y;
  }
  // Whether the kernels read pixels of dtype `x` for a computation in `dtype` (the cast folded
  // in): not the CPU kernels.
  static bool reads_cast(at::ScalarType, at::ScalarType) { return false; }
  // affinity_aggregate(x, pool(x)), the pooling in the same pass over x
  static Tensor3 pooled_affinity_aggregate(const at::Tensor& x, int64_t h, int64_t w,
                                           double scale, bool normalise,
                                           std::optional<at::ScalarType>,
                                           bool /*tokens_last*/ = false) {
    return affinity_aggregate_cpu(x, at::Tensor(), h, w, scale, normalise);
  }
};

#ifdef STVIT_WITH_CUDA
struct CudaKernels {
  // Kernels launch on the inputs' device (and its current stream), whatever device is current.
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };
  static at::Tensor affinity(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                             double scale, bool softmax) {
    return affinity_cuda(x, s, h, w, scale, softmax);
  }
  static Tensor2 aggregate(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w) {
    return aggregate_cuda(x, A, h, w);
  }
  // num token-major: the refine's products read it as [B * N, C] without a copy (refine.cpp,
  // tokens_of), and the reduction writes it coalesced; ones written by the reduction in place of
  // den, which the backward does not use
  static Tensor2 aggregate_for_refine(const at::Tensor& x, const at::Tensor& A, int64_t h,
                                      int64_t w) {
    return aggregate_cuda(x, A, h, w, /*tokens_last=*/true, /*den_ones=*/true);
  }
  static at::Tensor upsample(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w) {
    return upsample_cuda(s, A, h, w);
  }
  // tokens_last: num token-major (sta_forward's super tokens, read so by the refine)
  static Tensor3 affinity_aggregate(const at::Tensor& x, const at::Tensor& s, int64_t h,
                                    int64_t w, double scale, bool normalise,
                                    bool tokens_last = false) {
    return affinity_aggregate_cuda(x, s, h, w, scale, normalise, tokens_last);
  }
  static at::Tensor pool(const at::Tensor& x, int64_t h, int64_t w) { return pool_cuda(x, h, w); }
  // upsample(g / (den + 1e-12), A): the division while the kernel stages g, which it reads
  // token-major as the refine's backward leaves it (no copy); out_dtype float32 for 16-bit g:
  // written as float32 by the kernel (autograd's cast of the gradient into x folded in)
  static at::Tensor upsample_normalised(const at::Tensor& g, const at::Tensor& A,
                                        const at::Tensor& den, int64_t h, int64_t w,
                                        std::optional<at::ScalarType> out_dtype) {
    if (out_dtype.has_value() && !pixel_dtype_ok_cuda(*out_dtype, g.scalar_type())) {
      return upsample_cuda(g, A, h, w, den).to(*out_dtype);
    }
    return upsample_cuda(g, A, h, w, den, out_dtype);
  }
  // float32 x read for a float16 / bfloat16 computation (sta_launch.cuh, pixel_dtype_ok)
  static bool reads_cast(at::ScalarType x, at::ScalarType dtype) {
    return x != dtype && pixel_dtype_ok_cuda(x, dtype);
  }
  // dtype: s (and so A, num, den) in it, x read as if cast to it (reads_cast)
  static Tensor3 pooled_affinity_aggregate(const at::Tensor& x, int64_t h, int64_t w,
                                           double scale, bool normalise,
                                           std::optional<at::ScalarType> dtype,
                                           bool tokens_last = false) {
    return affinity_aggregate_cuda(x, pool_cuda(x, h, w, dtype), h, w, scale, normalise,
                                   tokens_last);
  }
};
#endif

template <typename K>
at::Tensor affinity(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w, double scale,
                    bool softmax) {
  check_pixels_stokens("affinity", x, s, h, w);
  typename K::Guard guard(x);
  return K::affinity(x.contiguous(), s.contiguous(), h, w, scale, softmax);
}

template <typename K>
Tensor2 aggregate(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w) {
  check_pixels_affinity("aggregate", x, A, h, w);
  typename K::Guard guard(x);
  return K::aggregate(x.contiguous(), A.contiguous(), h, w);
}

template <typename K>
at::Tensor upsample(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w) {
  check_stokens_affinity("upsample", s, A, h, w);
  typename K::Guard guard(s);
  return K::upsample(s, A.contiguous(), h, w);  // s in any layout (both kernels take it)
}

template <typename K>
Tensor3 affinity_aggregate(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                           double scale) {
  check_pixels_stokens("affinity_aggregate", x, s, h, w);
  typename K::Guard guard(x);
  return K::affinity_aggregate(x.contiguous(), s.contiguous(), h, w, scale, /*normalise=*/false);
}

// The association stage of STA (DESIGN.md §1 steps 2, 4-7) in one call: super tokens `s`, or
// the average-pooled x when `s` is None; `n_iter` fused affinity + aggregation passes, each
// normalised in its reduction. Returns (the final super tokens num / (den + 1e-12), the final
// association A, den).
// `dtype` (sta_forward under autocast, s None): the computation in it, x cast to it (cast_input),
// or, where the kernels read float32 x for it (K::reads_cast), x read as it is and each value
// rounded to dtype as the kernels load it (the same results, one pass over x fewer).
// `tokens_last` (sta_forward): the final super tokens token-major where the kernels write them so
// (K::affinity_aggregate), the layout in which the refine attention reads them without a copy.
template <typename K>
Tensor3 associate_impl(const at::Tensor& x, const std::optional<at::Tensor>& s, int64_t h,
                       int64_t w, double scale, int64_t n_iter,
                       std::optional<at::ScalarType> dtype = std::nullopt,
                       bool tokens_last = false) {
  TORCH_CHECK(n_iter >= 1, "stvit::associate: n_iter must be >= 1, got ", n_iter);
  if (s.has_value()) {
    check_pixels_stokens("associate", x, *s, h, w);
  } else {
    check_tensor("associate", "x", x);
    check_cells("associate", "x", x, h, w);
  }
  typename K::Guard guard(x);
  const bool fold = !s.has_value() && dtype.has_value() && K::reads_cast(x.scalar_type(), *dtype);
  const at::Tensor xc = (fold ? x : cast_input(x, dtype)).contiguous();
  // without s: the first iteration starts from the cell means (pooled in the same pass, CPU)
  Tensor3 r = s.has_value()
                  ? K::affinity_aggregate(xc, s->contiguous(), h, w, scale, /*normalise=*/true,
                                          tokens_last && n_iter == 1)
                  : K::pooled_affinity_aggregate(xc, h, w, scale, /*normalise=*/true,
                                                 fold ? dtype : std::nullopt,
                                                 tokens_last && n_iter == 1);
  for (int64_t i = 1; i < n_iter; ++i) {
    r = K::affinity_aggregate(xc, std::get<1>(r), h, w, scale, /*normalise=*/true,
                              tokens_last && i == n_iter - 1);
  }
  auto [A, stokens, den] = r;
  return {stokens, A, den};
}

template <typename K>
Tensor3 associate(const at::Tensor& x, const std::optional<at::Tensor>& s, int64_t h, int64_t w,
                  double scale, int64_t n_iter) {
  return associate_impl<K>(x, s, h, w, scale, n_iter);
}

// The gradient of associate into x: upsample(g / (den + 1e-12), A) (A and den are constants), in
// `out_dtype` if given (x's: the kernels write it where they can, K::upsample_normalised).
template <typename K>
at::Tensor associate_backward_impl(const at::Tensor& g, const at::Tensor& A,
                                   const at::Tensor& den, int64_t h, int64_t w,
                                   std::optional<at::ScalarType> out_dtype = std::nullopt) {
  TORCH_CHECK(g.dim() == 4 && den.dim() == 4 && den.size(1) == 1 && g.size(0) == den.size(0) &&
                  g.sizes().slice(2) == den.sizes().slice(2),
              "stvit::associate_backward: g [B, C, hh, ww] and den [B, 1, hh, ww] do not match: "
              "g.shape=", g.sizes(), ", den.shape=", den.sizes());
  check_same("associate_backward", "g", g, "den", den);
  check_stokens_affinity("associate_backward", g, A, h, w);
  typename K::Guard guard(A);
  return K::upsample_normalised(g, A.contiguous(), den.contiguous(), h, w, out_dtype);
}

template <typename K>
at::Tensor associate_backward(const at::Tensor& g, const at::Tensor& A, const at::Tensor& den,
                              int64_t h, int64_t w) {
  return associate_backward_impl<K>(g, A, den, h, w);
}

template <typename K>
at::Tensor pool(const at::Tensor& x, int64_t h, int64_t w) {
  check_tensor("pool", "x", x);
  check_cells("pool", "x", x, h, w);
  typename K::Guard guard(x);
  return K::pool(x.contiguous(), h, w);
}

using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>;

// The STA module (stvit_kernels.SuperTokenAttention with its attention refine, padding aside) in
// one call: associate (initial pooling, n_iter passes), the refine attention written out, and the
// upsampling. Returns (y, then what sta_backward needs: A, den, the super tokens s that entered
// the refine (token-major on CUDA: a [B, hh, ww, C] tensor viewed as [B, C, hh, ww], which the
// refine's products read without a copy, forward and backward), and the refine's qkvh, attn, o).
// `dtype` (the module under autocast): x and the parameters cast to it first (cast_input,
// refine.h), inside this call rather than as autograd nodes of their own.
template <typename K>
Tensor7 sta_forward(const at::Tensor& x, const at::Tensor& qkv_weight,
                    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                    const std::optional<at::Tensor>& proj_bias, int64_t h, int64_t w, double scale,
                    int64_t n_iter, int64_t heads, double attn_scale,
                    std::optional<at::ScalarType> dtype) {
  typename K::Guard guard(x);
  auto [s, A, den] =
      associate_impl<K>(x, std::nullopt, h, w, scale, n_iter, dtype, /*tokens_last=*/true);
  auto [r, qkvh, attn, o] =
      refine_attention_forward(s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, attn_scale,
                               /*contiguous_out=*/true, dtype);
  at::Tensor y = upsample<K>(r, A, h, w);
  return {y, A, den, s, qkvh, attn, o};
}

// sta_forward's y alone (stvit::sta's CPU / CUDA kernel, for a call that needs no gradient): one
// output to hand back to Python instead of seven.
template <typename K>
at::Tensor sta_inference(const at::Tensor& x, const at::Tensor& qkv_weight,
                         const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                         const std::optional<at::Tensor>& proj_bias, int64_t h, int64_t w,
                         double scale, int64_t n_iter, int64_t heads, double attn_scale,
                         std::optional<at::ScalarType> dtype) {
  return std::get<0>(sta_forward<K>(x, qkv_weight, qkv_bias, proj_weight, proj_bias, h, w, scale,
                                    n_iter, heads, attn_scale, dtype));
}

// The gradient of sta_forward's y into x and the refine's four parameters, the module's
// semantics (A and den constants): upsampling -> (ds: aggregate(g, A).num), the refine by hand,
// the association (associate_backward). In the dtype sta_forward computed in (grad's: autograd
// casts the gradients back to the inputs' dtypes); the weights may be in another (uncast). The
// gradient into x in `x_dtype` if given (x's before sta_forward's cast: written in it by the
// CUDA kernel where it can, else cast).
template <typename K>
Tensor5 sta_backward(const at::Tensor& grad, const at::Tensor& A, const at::Tensor& den,
                     const at::Tensor& s, const at::Tensor& qkvh, const at::Tensor& attn,
                     const at::Tensor& o, const at::Tensor& qkv_weight,
                     const at::Tensor& proj_weight, int64_t h, int64_t w, int64_t heads,
                     double attn_scale, std::optional<at::ScalarType> x_dtype) {
  typename K::Guard guard(grad);
  check_pixels_affinity("sta_backward", grad, A, h, w);
  const auto [gr, ones] = K::aggregate_for_refine(grad.contiguous(), A.contiguous(), h, w);
  auto [gs, dqkv_w, dqkv_b, dproj_w, dproj_b] = refine_attention_backward(
      gr, s, qkvh, attn, o, qkv_weight, proj_weight, heads, attn_scale, ones);
  return {associate_backward_impl<K>(gs, A, den, h, w, x_dtype), dqkv_w, dqkv_b, dproj_w,
          dproj_b};
}

// The dispatcher's handle of operator `name`, whose schema's C++ signature is Fn (the callers keep
// it in a static: the lookup is once per process).
template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

// The STA module as one autograd node (stvit::sta's Autograd kernel): sta_forward where a gradient
// is needed, sta_backward for it. Written against the dispatcher, so the same node serves the CPU
// and CUDA kernels and the fake ones that torch.compile traces (a training graph then holds
// sta_forward and sta_backward). A C++ node rather than a Python autograd.Function: no Python
// frame, context object or GIL on either pass (CPU proxy, B=1, 16x16 tokens, one thread: forward
// + backward 279 -> 248 us).
class SuperTokenStep : public torch::autograd::Function<SuperTokenStep> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
                            const at::Tensor& proj_weight,
                            const std::optional<at::Tensor>& proj_bias, int64_t h, int64_t w,
                            double scale, int64_t n_iter, int64_t heads, double attn_scale,
                            std::optional<at::ScalarType> dtype) {
    static const auto op = op_handle<decltype(sta_forward<CpuKernels>)>("stvit::sta_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, A, den, s, qkvh, attn, o] = op.call(x, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                                 h, w, scale, n_iter, heads, attn_scale, dtype);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({A, den, s, qkvh, attn, o, qkv_weight, proj_weight});
    auto& d = ctx->saved_data;
    d["h"] = h;
    d["w"] = w;
    d["heads"] = heads;
    d["attn_scale"] = attn_scale;
    // under autocast, the gradient into x in x's dtype (written so by the CUDA kernel)
    d["x_dtype"] = dtype ? std::optional<at::ScalarType>(x.scalar_type()) : std::nullopt;
    d["biases"] = static_cast<int64_t>(qkv_bias.has_value()) | (proj_bias.has_value() << 1);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = op_handle<decltype(sta_backward<CpuKernels>)>("stvit::sta_backward");
    torch::autograd::variable_list out(12);
    if (!grads[0].defined()) return out;
    const auto v = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    auto [dx, dqkv_w, dqkv_b, dproj_w, dproj_b] =
        op.call(grads[0], v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], d.at("h").toInt(),
                d.at("w").toInt(), d.at("heads").toInt(), d.at("attn_scale").toDouble(),
                d.at("x_dtype").toOptional<at::ScalarType>());
    const int64_t biases = d.at("biases").toInt();
    out[0] = std::move(dx);
    out[1] = std::move(dqkv_w);
    if (biases & 1) out[2] = std::move(dqkv_b);
    out[3] = std::move(dproj_w);
    if (biases & 2) out[4] = std::move(dproj_b);
    return out;
  }
};

// stvit::sta on the Autograd key: the node above where a gradient is needed, else stvit::sta's
// CPU / CUDA kernel (sta_inference).
at::Tensor sta_autograd(const at::Tensor& x, const at::Tensor& qkv_weight,
                        const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                        const std::optional<at::Tensor>& proj_bias, int64_t h, int64_t w,
                        double scale, int64_t n_iter, int64_t heads, double attn_scale,
                        std::optional<at::ScalarType> dtype) {
  const auto grad = [](const std::optional<at::Tensor>& t) { return t && t->requires_grad(); };
  if (at::GradMode::is_enabled() && (x.requires_grad() || qkv_weight.requires_grad() ||
                                     proj_weight.requires_grad() || grad(qkv_bias) ||
                                     grad(proj_bias))) {
    return SuperTokenStep::apply(x, qkv_weight, qkv_bias, proj_weight, proj_bias, h, w, scale,
                                 n_iter, heads, attn_scale, dtype);
  }
  static const auto op = op_handle<decltype(sta_inference<CpuKernels>)>("stvit::sta");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, qkv_weight, qkv_bias, proj_weight, proj_bias, h, w, scale, n_iter, heads,
                 attn_scale, dtype);
}

}  // namespace stvit

TORCH_LIBRARY(stvit, m) {
  m.def("affinity(Tensor x, Tensor s, int h, int w, float scale, bool softmax) -> Tensor");
  m.def("aggregate(Tensor x, Tensor A, int h, int w) -> (Tensor, Tensor)");
  m.def("upsample(Tensor s, Tensor A, int h, int w) -> Tensor");
  m.def("affinity_aggregate(Tensor x, Tensor s, int h, int w, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("pool(Tensor x, int h, int w) -> Tensor");
  m.def("associate(Tensor x, Tensor? s, int h, int w, float scale, int n_iter) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("associate_backward(Tensor g, Tensor A, Tensor den, int h, int w) -> Tensor");
  m.def("sta_forward(Tensor x, Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight, "
        "Tensor? proj_bias, int h, int w, float scale, int n_iter, int heads, float attn_scale, "
        "ScalarType? dtype=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sta_backward(Tensor grad, Tensor A, Tensor den, Tensor s, Tensor qkvh, Tensor attn, "
        "Tensor o, Tensor qkv_weight, Tensor proj_weight, int h, int w, int heads, "
        "float attn_scale, ScalarType? x_dtype=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sta(Tensor x, Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight, Tensor? proj_bias, "
        "int h, int w, float scale, int n_iter, int heads, float attn_scale, "
        "ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(stvit, Autograd, m) {
  m.impl("sta", &stvit::sta_autograd);
}

TORCH_LIBRARY_IMPL(stvit, CPU, m) {
  using K = stvit::CpuKernels;
  m.impl("affinity", &stvit::affinity<K>);
  m.impl("aggregate", &stvit::aggregate<K>);
  m.impl("upsample", &stvit::upsample<K>);
  m.impl("affinity_aggregate", &stvit::affinity_aggregate<K>);
  m.impl("pool", &stvit::pool<K>);
  m.impl("associate", &stvit::associate<K>);
  m.impl("associate_backward", &stvit::associate_backward<K>);
  m.impl("sta_forward", &stvit::sta_forward<K>);
  m.impl("sta", &stvit::sta_inference<K>);
  m.impl("sta_backward", &stvit::sta_backward<K>);
}

#ifdef STVIT_WITH_CUDA
TORCH_LIBRARY_IMPL(stvit, CUDA, m) {
  using K = stvit::CudaKernels;
  m.impl("affinity", &stvit::affinity<K>);
  m.impl("aggregate", &stvit::aggregate<K>);
  m.impl("upsample", &stvit::upsample<K>);
  m.impl("affinity_aggregate", &stvit::affinity_aggregate<K>);
  m.impl("pool", &stvit::pool<K>);
  m.impl("associate", &stvit::associate<K>);
  m.impl("associate_backward", &stvit::associate_backward<K>);
  m.impl("sta_forward", &stvit::sta_forward<K>);
  m.impl("sta", &stvit::sta_inference<K>);
  m.impl("sta_backward", &stvit::sta_backward<K>);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stvit_kernels._C: registers the torch.ops.stvit operators (CPU, and CUDA if built)";
  m.def("built_with_cuda", [] {
#ifdef STVIT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True if the CUDA kernels were compiled in.");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version the extension was compiled against.");
  m.def("cpu_isa", &stvit::cpu::isa,
        "Instruction set of the CPU kernels in use: 'avx2' or 'default'.");
  m.def("set_cpu_isa", &stvit::cpu::set_isa, pybind11::arg("name"),
        "Use the 'avx2' or 'default' CPU kernels, or 'auto' (the best this CPU runs); "
        "the environment variable STVIT_CPU_ISA sets the initial choice.");
  m.def("_set_refine_cpu_limit", &stvit::set_refine_cpu_limit, pybind11::arg("limit"),
        "Testing and benchmark aid: the most multiply-adds of a refine attention forward that the "
        "CPU kernel takes (beyond: ATen's matrix products; 0: never the kernel); returns the "
        "previous limit.");
  m.def("_set_refine_kernels_enabled", &stvit::set_refine_kernels_enabled,
        pybind11::arg("enabled"),
        "Benchmark and testing aid: whether the refine attention's kernels (CPU and CUDA) may "
        "take a call; off, every call takes ATen's operators. Returns the previous value.");
  m.def("_set_cuda_plan",
        [](int64_t max_threads, int64_t tile_pixels, int64_t smem_block, int64_t cache_x,
           int64_t cell_units, int64_t upsample_pixels) {
#ifdef STVIT_WITH_CUDA
          return stvit::set_cuda_plan_overrides(max_threads, tile_pixels, smem_block, cache_x,
                                                cell_units, upsample_pixels);
#else
          TORCH_CHECK(false, "stvit_kernels._C was built without the CUDA kernels");
          return std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>{};
#endif
        },
        pybind11::arg("max_threads") = 0, pybind11::arg("tile_pixels") = 0,
        pybind11::arg("smem_block") = 0, pybind11::arg("cache_x") = -1,
        pybind11::arg("cell_units") = -1, pybind11::arg("upsample_pixels") = 0,
        "Benchmark aid (benchmarks/tune_cuda.py): the plan limits of the CUDA STA kernels for "
        "every later call: threads per block (32..256, a multiple of 32), pixels per tile of the "
        "aggregating kernels, shared memory per aggregating block in bytes (the blocks per SM), "
        "x kept on chip (1) or re-read (0), the partial sums by cell units where they fit (1) or "
        "by column units (0), the most pixels per thread of the upsample (1, 2 or 4); 0 (cache_x, "
        "cell_units: -1) is the device's default. Returns the previous values.");
  m.def("_set_poison", &stvit::cpu::set_poison, pybind11::arg("on"),
        "Testing aid: fill every output and workspace of the CPU kernels with NaN before they "
        "run.");
}
