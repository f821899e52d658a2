// Host glue of the CUDA STA primitives: output allocation, dtype dispatch, planning and launches.
//
// Written once against a small runtime policy `RT` so that the exact same code drives the real
// kernels (sta_cuda.cu: CudaRuntime, launches with <<<>>> on the current stream) and a host
// emulator used to test the kernels on machines without a GPU. RT provides:
//   PlanLimits limits();
//   void launch(kernel, int64_t blocks, int threads, size_t smem, params);
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include "sta_kernels.cuh"

namespace stvit {
namespace cuda {

inline void check_grid(const char* op, const at::Tensor& t, const char* name, int64_t h,
                       int64_t w) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 4-D tensor, got shape ", t.sizes());
  TORCH_CHECK(h >= 1 && w >= 1 && t.size(2) % h == 0 && t.size(3) % w == 0, op, ": ", name,
              ".shape=", t.sizes(), " is not divisible by stoken_size=(", h, ", ", w, ")");
  // pixel indices inside a tile (at most one cell row: h * W pixels) are 32-bit
  TORCH_CHECK(t.size(1) < (int64_t(1) << 30) && t.size(2) < (int64_t(1) << 30) &&
                  t.size(3) < (int64_t(1) << 30) && h * t.size(3) < (int64_t(1) << 31),
              op, ": ", name, ".shape=", t.sizes(), " is too large");
}

inline void check_pair(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b,
                       const char* bn) {
  TORCH_CHECK(b.dim() == 4 && b.is_contiguous(), op, ": ", bn,
              " must be a contiguous 4-D tensor, got shape ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.device() == b.device(), op, ": ", an, " (",
              a.scalar_type(), ", ", a.device(), ") and ", bn, " (", b.scalar_type(), ", ",
              b.device(), ") must have the same dtype and device");
}

// Whether the kernels take pixel-side tensors of dtype `pixel` for a computation in `dtype`
// (pixel_t of CellParams): the same dtype, or float32 pixels around a 16-bit computation.
inline bool pixel_dtype_ok(at::ScalarType pixel, at::ScalarType dtype) {
  return pixel == dtype ||
         (pixel == at::kFloat && (dtype == at::kHalf || dtype == at::kBFloat16));
}

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<pixel_t>{}) with pixel_t = float where `pixel` differs from scalar_t (a 16-bit type,
// see pixel_dtype_ok), else scalar_t: the kernels are instantiated for float pixels only there.
template <typename scalar_t, class F>
void with_pixel_type(at::ScalarType pixel, F&& f) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (pixel != c10::CppTypeToScalarType<scalar_t>::value) return f(TypeTag<float>{});
  }
  f(TypeTag<scalar_t>{});
}

inline int64_t grid_blocks(const char* op, int64_t B, int hh, const Plan& pl) {
  const int64_t blocks = B * hh * pl.NT;
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), op, ": too many blocks (", blocks, ")");
  return blocks;
}

// The grid of a params struct: pixels H x W, cells h x w, hh x ww cells.
template <class P>
void set_grid(P& p, int64_t H, int64_t W, int64_t h, int64_t w) {
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.h = static_cast<int>(h);
  p.w = static_cast<int>(w);
  p.hh = static_cast<int>(H / h);
  p.ww = static_cast<int>(W / w);
}

template <typename scalar_t, typename pixel_t = scalar_t>
CellParams<scalar_t, pixel_t> cell_params(const Plan& pl, int64_t C, int64_t H, int64_t W,
                                          int64_t h, int64_t w) {
  CellParams<scalar_t, pixel_t> p;
  p.C = static_cast<int>(C);
  set_grid(p, H, W, h, w);
  p.NC = pl.NC;
  p.NT = pl.NT;
  p.CK = pl.CK;
  p.SK = pl.SK;
  p.XC = pl.XC;
  p.CW = pl.CW;
  p.a_off = pl.a_off;
  p.x_off = pl.x_off;
  p.cell_units = pl.cell_units;
  return p;
}

template <typename scalar_t>
Plan plan_for(int kind, int64_t C, int64_t h, int64_t w, int64_t ww, const PlanLimits& L,
              int px = 1) {
  using acc_t = at::opmath_type<scalar_t>;
  return plan_cells(kind, static_cast<int>(C), static_cast<int>(h), static_cast<int>(w),
                    static_cast<int>(ww), static_cast<int>(sizeof(acc_t)),
                    static_cast<int>(sizeof(scalar_t)), L, px);
}

// The partial-sum workspace [B, hh, NT, 3, NC+2, CW] in the accumulation type.
template <typename scalar_t>
at::Tensor workspace(const at::Tensor& like, int64_t B, int64_t hh, const Plan& pl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = B * hh * pl.NT * 3 * (pl.NC + 2) * pl.CW;
  return at::empty({n}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// num [B, C, hh, ww] of an aggregation: contiguous, or token-major (a [B, hh, ww, C] tensor
// viewed as [B, C, hh, ww]: the strides of channels_last) with `tokens_last`, the layout in which
// the refine attention's products read it without a copy (csrc/refine.cpp, tokens_of).
inline at::Tensor new_stokens(const at::Tensor& like, int64_t B, int64_t C, int64_t hh, int64_t ww,
                              bool tokens_last) {
  if (!tokens_last) return at::empty({B, C, hh, ww}, like.options());
  return at::empty({B, hh, ww, C}, like.options()).permute({0, 3, 1, 2});
}

// Adds the workspace slots into num [B, C, hh, ww] (contiguous or token-major: new_stokens) and
// den [B, 1, hh, ww]; with `normalise`, num / (den + 1e-12) goes into `num` instead; with
// `den_ones`, ones go into den (ReduceParams::den_ones).
template <typename scalar_t, class RT>
void launch_reduce(RT& rt, const at::Tensor& ws, at::Tensor& num, at::Tensor& den, int64_t B,
                   int64_t C, int64_t hh, int64_t ww, const Plan& pl, bool normalise = false,
                   bool den_ones = false) {
  using acc_t = at::opmath_type<scalar_t>;
  ReduceParams<scalar_t> r;
  r.ws = ws.data_ptr<acc_t>();
  r.num = C > 0 ? num.data_ptr<scalar_t>() : nullptr;
  r.num_sc = num.stride(1);
  r.num_sn = num.stride(3);
  r.den = den.data_ptr<scalar_t>();
  r.B = B;
  r.C = static_cast<int>(C);
  r.hh = static_cast<int>(hh);
  r.ww = static_cast<int>(ww);
  r.NC = pl.NC;
  r.NT = pl.NT;
  r.CW = pl.CW;
  r.normalise = normalise;
  r.den_ones = den_ones;
  const int64_t total = B * hh * ww * (C + 1);
  const int threads = kMaxThreads;
  const int64_t blocks = imin<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  rt.launch(reduce_kernel<scalar_t>, blocks, threads, 0, r);
}

template <class RT>
at::Tensor affinity_impl(RT& rt, const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                         double scale, bool softmax) {
  constexpr const char* op = "stvit::affinity (CUDA)";
  check_grid(op, x, "x", h, w);
  check_pair(op, x, "x", s, "s");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t hh = H / h, ww = W / w;
  TORCH_CHECK(s.size(0) == B && s.size(1) == C && s.size(2) == hh && s.size(3) == ww, op,
              ": s.shape=", s.sizes(), " does not match x.shape=", x.sizes());
  at::Tensor A = at::empty({B, 9, H, W}, x.options());
  if (A.numel() == 0) return A;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stvit_affinity_cuda", [&] {
    const Plan pl = plan_for<scalar_t>(kPlanStokens, C, h, w, ww, rt.limits());
    CellParams<scalar_t> p = cell_params<scalar_t>(pl, C, H, W, h, w);
    p.x = x.data_ptr<scalar_t>();
    p.s = s.data_ptr<scalar_t>();
    p.A_out = A.data_ptr<scalar_t>();
    p.scale = static_cast<typename CellParams<scalar_t>::acc_t>(scale);
    p.softmax = softmax;
    rt.launch(cell_kernel<scalar_t, kAffinity, false>, grid_blocks(op, B, hh, pl), pl.BS,
              pl.smem, p);
  });
  return A;
}

template <class RT>
std::tuple<at::Tensor, at::Tensor> aggregate_impl(RT& rt, const at::Tensor& x, const at::Tensor& A,
                                                  int64_t h, int64_t w, bool tokens_last = false,
                                                  bool den_ones = false) {
  constexpr const char* op = "stvit::aggregate (CUDA)";
  check_grid(op, x, "x", h, w);
  check_pair(op, x, "x", A, "A");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t hh = H / h, ww = W / w;
  TORCH_CHECK(A.size(0) == B && A.size(1) == 9 && A.size(2) == H && A.size(3) == W, op,
              ": A.shape=", A.sizes(), " does not match x.shape=", x.sizes());
  at::Tensor num = new_stokens(x, B, C, hh, ww, tokens_last);
  at::Tensor den = at::empty({B, 1, hh, ww}, x.options());
  if (den.numel() == 0) return {num, den};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stvit_aggregate_cuda", [&] {
    const Plan pl = plan_for<scalar_t>(kPlanAggregate, C, h, w, ww, rt.limits());
    CellParams<scalar_t> p = cell_params<scalar_t>(pl, C, H, W, h, w);
    at::Tensor ws = workspace<scalar_t>(x, B, hh, pl);
    p.x = C > 0 ? x.data_ptr<scalar_t>() : nullptr;
    p.A_in = A.data_ptr<scalar_t>();
    p.ws = ws.data_ptr<at::opmath_type<scalar_t>>();
    const int64_t blocks = grid_blocks(op, B, hh, pl);
    if (pl.cache_x) {
      rt.launch(cell_kernel<scalar_t, kAggregate, true>, blocks, pl.BS, pl.smem, p);
    } else {
      rt.launch(cell_kernel<scalar_t, kAggregate, false>, blocks, pl.BS, pl.smem, p);
    }
    launch_reduce<scalar_t>(rt, ws, num, den, B, C, hh, ww, pl, /*normalise=*/false, den_ones);
  });
  return {num, den};
}

// The widest vector of L pixels along a cell row, L <= `most` a power of two, that divides w and
// W and keeps the data of every tensor in `ts` aligned to L of its elements (a vector of L
// elements of each at any pixel p with p % L == 0).
inline int pixel_vector(int most, int64_t W, int64_t w, std::initializer_list<at::Tensor> ts) {
  int L = 1;
  while (L * 2 <= most) L *= 2;
  auto fits = [&](int n) {
    if (w % n != 0 || W % n != 0) return false;
    for (const at::Tensor& t : ts) {
      if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (n * t.element_size()) != 0) {
        return false;
      }
    }
    return true;
  };
  while (L > 1 && !fits(L)) L /= 2;
  return L;
}

// f(std::integral_constant<int, L>{}) for L = `want` among Lmax, Lmax / 2, ..., 1: the kernel
// instantiation for a vector width chosen at run time (pixel_vector).
template <int Lmax, class F>
void with_vector(int want, F&& f) {
  if constexpr (Lmax > 1) {
    if (want < Lmax) return with_vector<Lmax / 2>(want, std::forward<F>(f));
  }
  f(std::integral_constant<int, Lmax>{});
}

// Any layout of s (read in place when contiguous; with `den`, also when token-major, the strides
// of channels_last that the refine's backward leaves: a [B, hh * ww, C] tensor viewed as
// [B, C, hh, ww]; else a contiguous copy first); with `den` [B, 1, hh, ww] (contiguous),
// upsample(s / (den + 1e-12), A), the division done while staging s (associate_backward). y in
// `out_dtype` (default s's; float32 for 16-bit s: each value rounded to s's dtype, then widened).
template <class RT>
at::Tensor upsample_impl(RT& rt, const at::Tensor& s_in, const at::Tensor& A, int64_t h,
                         int64_t w, const at::Tensor& den = at::Tensor(),
                         std::optional<at::ScalarType> out_dtype = std::nullopt) {
  constexpr const char* op = "stvit::upsample (CUDA)";
  check_grid(op, A, "A", h, w);
  const int64_t B = A.size(0), H = A.size(2), W = A.size(3);
  const int64_t C = s_in.size(1), hh = H / h, ww = W / w;
  TORCH_CHECK(s_in.dim() == 4 && A.size(1) == 9 && s_in.size(0) == B && s_in.size(2) == hh &&
                  s_in.size(3) == ww, op, ": s.shape=", s_in.sizes(), " does not match A.shape=",
              A.sizes());
  const bool token_major = den.defined() && !s_in.is_contiguous() && s_in.stride(1) == 1 &&
                           s_in.stride(3) == C && s_in.stride(2) == ww * C &&
                           s_in.stride(0) == hh * ww * C;
  const at::Tensor s = token_major ? s_in : s_in.contiguous();
  TORCH_CHECK(s.scalar_type() == A.scalar_type() && s.device() == A.device(), op, ": s (",
              s.scalar_type(), ", ", s.device(), ") and A (", A.scalar_type(), ", ", A.device(),
              ") must have the same dtype and device");
  if (den.defined()) {
    check_pair(op, A, "A", den, "den");
    TORCH_CHECK(den.size(0) == B && den.size(1) == 1 && den.size(2) == hh && den.size(3) == ww,
                op, ": den.shape=", den.sizes(), " does not match s.shape=", s.sizes());
  }
  const at::ScalarType y_dtype = out_dtype.value_or(s.scalar_type());
  TORCH_CHECK(pixel_dtype_ok(y_dtype, s.scalar_type()), op, ": cannot write y in ", y_dtype,
              " from s in ", s.scalar_type());
  at::Tensor y = at::empty({B, C, H, W}, s.options().dtype(y_dtype).memory_format(
                                             at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "stvit_upsample_cuda", [&] {
    with_pixel_type<scalar_t>(y_dtype, [&](auto tag) {
      using pixel_t = typename decltype(tag)::type;
      // pixels per thread: vectors of A and y of at most 16 bytes, at most 4 pixels (registers)
      constexpr int wide = 16 / static_cast<int>(std::max(sizeof(scalar_t), sizeof(pixel_t)));
      constexpr int most = std::min(4, wide);
      const PlanLimits lim = rt.limits();
      const int L = pixel_vector(imin(most, lim.upsample_pixels), W, w, {A, y});
      const Plan pl = plan_for<scalar_t>(kPlanStokens, C, h, w, ww, lim, L);
      CellParams<scalar_t, pixel_t> p = cell_params<scalar_t, pixel_t>(pl, C, H, W, h, w);
      p.s = s.data_ptr<scalar_t>();
      p.A_in = A.data_ptr<scalar_t>();
      p.y = y.data_ptr<pixel_t>();
      const int64_t blocks = grid_blocks(op, B, hh, pl);
      if (den.defined()) {
        NormalisedParams<scalar_t, pixel_t> q;
        static_cast<CellParams<scalar_t, pixel_t>&>(q) = p;
        q.den = den.data_ptr<scalar_t>();
        q.s_sc = token_major ? 1 : hh * ww;
        q.s_sn = token_major ? C : 1;
        with_vector<most>(L, [&](auto l) {
          rt.launch(upsample_kernel<scalar_t, true, pixel_t, decltype(l)::value>, blocks, pl.BS,
                    pl.smem, q);
        });
      } else if constexpr (std::is_same_v<pixel_t, scalar_t>) {
        with_vector<most>(L, [&](auto l) {
          rt.launch(upsample_kernel<scalar_t, false, pixel_t, decltype(l)::value>, blocks, pl.BS,
                    pl.smem, p);
        });
      } else {
        TORCH_CHECK(false, op, ": a float32 y is for the normalised upsampling only");
      }
    });
  });
  return y;
}

// s in `dtype` (default x's; a 16-bit dtype for float32 x: each value of x rounded to it as it is
// read, the cast of x folded in).
template <class RT>
at::Tensor pool_impl(RT& rt, const at::Tensor& x, int64_t h, int64_t w,
                     std::optional<at::ScalarType> dtype = std::nullopt) {
  constexpr const char* op = "stvit::pool (CUDA)";
  check_grid(op, x, "x", h, w);
  const at::ScalarType s_dtype = dtype.value_or(x.scalar_type());
  TORCH_CHECK(pixel_dtype_ok(x.scalar_type(), s_dtype), op, ": cannot pool x in ",
              x.scalar_type(), " into ", s_dtype);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor s = at::empty({B, C, H / h, W / w}, x.options().dtype(s_dtype));
  if (s.numel() == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_dtype, "stvit_pool_cuda", [&] {
    with_pixel_type<scalar_t>(x.scalar_type(), [&](auto tag) {
      using pixel_t = typename decltype(tag)::type;
      PoolParams<scalar_t, pixel_t> p;
      p.x = x.const_data_ptr<pixel_t>();
      p.s = s.data_ptr<scalar_t>();
      p.total = s.numel();
      set_grid(p, H, W, h, w);
      const int64_t blocks =
          imin<int64_t>((p.total + kMaxThreads - 1) / kMaxThreads, int64_t(1) << 20);
      constexpr int most = 16 / sizeof(pixel_t);
      with_vector<most>(pixel_vector(most, W, w, {x}), [&](auto l) {
        rt.launch(pool_kernel<scalar_t, decltype(l)::value, pixel_t>, blocks, kMaxThreads, 0, p);
      });
    });
  });
  return s;
}

// (A, num, den); with `normalise`, (A, num / (den + 1e-12), den): the updated super tokens. x in
// s's dtype, or float32 for 16-bit s (each value of x rounded to s's dtype as it is read: the cast
// of x folded in); A, num and den in s's dtype; num token-major with `tokens_last` (new_stokens).
template <class RT>
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_aggregate_impl(
    RT& rt, const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w, double scale,
    bool normalise = false, bool tokens_last = false) {
  constexpr const char* op = "stvit::affinity_aggregate (CUDA)";
  check_grid(op, x, "x", h, w);
  TORCH_CHECK(s.dim() == 4 && s.is_contiguous(), op, ": s must be a contiguous 4-D tensor, got "
              "shape ", s.sizes());
  TORCH_CHECK(pixel_dtype_ok(x.scalar_type(), s.scalar_type()) && x.device() == s.device(), op,
              ": x (", x.scalar_type(), ", ", x.device(), ") and s (", s.scalar_type(), ", ",
              s.device(), ") must have the same dtype (or float32 x for 16-bit s) and device");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t hh = H / h, ww = W / w;
  TORCH_CHECK(s.size(0) == B && s.size(1) == C && s.size(2) == hh && s.size(3) == ww, op,
              ": s.shape=", s.sizes(), " does not match x.shape=", x.sizes());
  at::Tensor A = at::empty({B, 9, H, W}, s.options());
  at::Tensor num = new_stokens(s, B, C, hh, ww, tokens_last);
  at::Tensor den = at::empty({B, 1, hh, ww}, s.options());
  if (A.numel() == 0) return {A, num, den};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "stvit_affinity_aggregate_cuda", [&] {
    with_pixel_type<scalar_t>(x.scalar_type(), [&](auto tag) {
      using pixel_t = typename decltype(tag)::type;
      const Plan pl = plan_for<scalar_t>(kPlanFused, C, h, w, ww, rt.limits());
      CellParams<scalar_t, pixel_t> p = cell_params<scalar_t, pixel_t>(pl, C, H, W, h, w);
      at::Tensor ws = workspace<scalar_t>(s, B, hh, pl);
      p.x = C > 0 ? x.data_ptr<pixel_t>() : nullptr;
      p.s = C > 0 ? s.data_ptr<scalar_t>() : nullptr;
      p.A_out = A.data_ptr<scalar_t>();
      p.ws = ws.data_ptr<at::opmath_type<scalar_t>>();
      p.scale = static_cast<at::opmath_type<scalar_t>>(scale);
      p.softmax = true;
      const int64_t blocks = grid_blocks(op, B, hh, pl);
      if (pl.cache_x) {
        rt.launch(cell_kernel<scalar_t, kFused, true, pixel_t>, blocks, pl.BS, pl.smem, p);
      } else {
        rt.launch(cell_kernel<scalar_t, kFused, false, pixel_t>, blocks, pl.BS, pl.smem, p);
      }
      launch_reduce<scalar_t>(rt, ws, num, den, B, C, hh, ww, pl, normalise);
    });
  });
  return {A, num, den};
}

}  // namespace cuda
}  // namespace stvit
