// The four STA primitives on the CPU (declared in stvit.h): output allocation, dtype dispatch,
// threading (at::parallel_for over bands: rows of cells, or rows of super tokens for the
// aggregation's second pass) and the choice of the kernels' instruction set. The kernels are
// in kernels_impl.h.
// Inputs arrive checked (shapes, dtypes, contiguity) by the host wrappers of ops.cpp.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include "cpu/kernels.h"
#include "refine.h"
#include "stvit.h"

namespace stvit {
namespace cpu {
namespace {

enum Isa : int { kIsaDefault = 0, kIsaAvx2 = 1 };

bool cpu_has_avx2() {
#ifdef STVIT_CPU_HAVE_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

int isa_from_environment() {
  const int best = cpu_has_avx2() ? kIsaAvx2 : kIsaDefault;
  const char* env = std::getenv("STVIT_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return best;
  if (std::string(env) == "default") return kIsaDefault;
  if (std::string(env) == "avx2" && best == kIsaAvx2) return kIsaAvx2;
  TORCH_WARN("stvit_kernels: ignoring STVIT_CPU_ISA=", env, " (expected auto, default",
             best == kIsaAvx2 ? " or avx2" : "; this CPU or build has no AVX2 + FMA", ")");
  return best;
}

std::atomic<int>& active_isa() {
  static std::atomic<int> value{isa_from_environment()};
  return value;
}

template <typename scalar_t>
const KernelSet<scalar_t>& kernels() {
#ifdef STVIT_CPU_HAVE_AVX2
  if (active_isa().load(std::memory_order_relaxed) == kIsaAvx2) return kernels_avx2<scalar_t>();
#endif
  return kernels_default<scalar_t>();
}

}  // namespace

namespace {
std::atomic<bool> poison_flag{false};
}  // namespace

void set_poison(bool on) { poison_flag.store(on); }
bool poison() { return poison_flag.load(std::memory_order_relaxed); }

std::string isa() { return active_isa().load() == kIsaAvx2 ? "avx2" : "default"; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    active_isa().store(cpu_has_avx2() ? kIsaAvx2 : kIsaDefault);
  } else if (name == "default") {
    active_isa().store(kIsaDefault);
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "stvit_kernels: the avx2 CPU kernels need an x86-64 CPU with "
                "AVX2 and FMA (and a GCC/Clang build); this one has not");
    active_isa().store(kIsaAvx2);
  } else {
    TORCH_CHECK(false, "stvit_kernels: unknown CPU ISA '", name,
                "' (expected auto, default, avx2)");
  }
}

}  // namespace cpu

namespace {

// at::empty, or NaN-filled when the poison testing aid is on.
at::Tensor new_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (cpu::poison()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

cpu::Geometry geometry(const at::Tensor& pixels, int64_t C, int64_t h, int64_t w) {
  cpu::Geometry g;
  g.B = pixels.size(0);
  g.C = C;
  g.H = pixels.size(2);
  g.W = pixels.size(3);
  g.h = h;
  g.w = w;
  g.hh = g.H / h;
  g.ww = g.W / w;
  return g;
}

// Items (bands or super tokens) per task: at least kGrainWork multiply-adds (the grain of ATen's
// own element-wise loops, at::internal::GRAIN_SIZE), so that small problems stay on one thread.
constexpr int64_t kGrainWork = 32768;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_item));
}

// The workspace of the aggregation partials: at least `elems` elements of the accumulation type
// of `like`. Kept by the calling thread between calls (up to kMaxCachedWorkspace bytes): freshly
// mapped memory costs a page fault per 4 KiB page, as much as the work itself here. Safe because
// one thread runs one op at a time, and the op's worker threads are done with it when it returns.
constexpr int64_t kMaxCachedWorkspace = int64_t(64) << 20;

at::Tensor partials_workspace(int64_t elems, const at::Tensor& like) {
  const at::ScalarType acc = at::toOpMathType(like.scalar_type());
  const auto options = like.options().dtype(acc);
  const int64_t bytes = elems * static_cast<int64_t>(c10::elementSize(acc));
  if (bytes > kMaxCachedWorkspace) return new_tensor({elems}, options);
  thread_local at::Tensor cache[2];  // float, double
  at::Tensor& ws = cache[acc == at::kDouble ? 1 : 0];
  if (!ws.defined() || ws.numel() < elems) ws = at::empty({elems}, options);
  // the whole cached buffer (at least `elems`; callers use its first elements through the data
  // pointer): a narrowed view would cost as much as a small op
  if (cpu::poison()) ws.narrow(0, 0, elems).fill_(std::numeric_limits<double>::quiet_NaN());
  return ws;
}

// Per-cell partials -> (num, den), or (num / (den + 1e-12), den) with `normalise`; shared by
// aggregate and affinity_aggregate. `bands_pass` fills pnum [B * hh * ww, 9, C] and
// pden [B * hh * ww, 9] for a range of bands.
template <typename scalar_t, typename BandsPass>
Tensor2 reduce_partials(const cpu::Geometry& g, const at::Tensor& like, BandsPass bands_pass,
                        bool normalise = false) {
  using acc_t = cpu::acc_type<scalar_t>;
  const int64_t pnum_elems = g.B * g.cells() * 9 * g.C;
  at::Tensor workspace = partials_workspace(pnum_elems + g.B * g.cells() * 9, like);
  at::Tensor num = new_tensor({g.B, g.C, g.hh, g.ww}, like.options());
  at::Tensor den = new_tensor({g.B, 1, g.hh, g.ww}, like.options());
  acc_t* pn = workspace.mutable_data_ptr<acc_t>();
  acc_t* pd = pn + pnum_elems;
  at::parallel_for(0, g.B * g.hh, grain(9 * g.C * g.h * g.W),
                   [&](int64_t begin, int64_t end) { bands_pass(pn, pd, begin, end); });
  const auto& k = cpu::kernels<scalar_t>();
  scalar_t* np = num.mutable_data_ptr<scalar_t>();
  scalar_t* dp = den.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, g.B * g.hh, grain(9 * g.C * g.ww), [&](int64_t begin, int64_t end) {
    k.reduce(g, pn, pd, np, dp, normalise, begin, end);
  });
  return {num, den};
}

}  // namespace

at::Tensor affinity_cpu(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                        double scale, bool softmax) {
  const cpu::Geometry g = geometry(x, x.size(1), h, w);
  at::Tensor A = new_tensor({g.B, 9, g.H, g.W}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "affinity_cpu", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* Ap = A.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.B * g.hh, grain(9 * g.C * g.h * g.W),
                     [&](int64_t begin, int64_t end) {
                       k.affinity(g, xp, sp, Ap, static_cast<acc_t>(scale), softmax, begin, end);
                     });
  });
  return A;
}

Tensor2 aggregate_cpu(const at::Tensor& x, const at::Tensor& A, int64_t h, int64_t w) {
  const cpu::Geometry g = geometry(x, x.size(1), h, w);
  Tensor2 out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "aggregate_cpu", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    out = reduce_partials<scalar_t>(g, x, [&](acc_t* pn, acc_t* pd, int64_t begin, int64_t end) {
      k.partials(g, xp, Ap, pn, pd, begin, end);
    });
  });
  return out;
}

at::Tensor upsample_cpu(const at::Tensor& s, const at::Tensor& A, int64_t h, int64_t w,
                        const at::Tensor& den) {
  const cpu::Geometry g = geometry(A, s.size(1), h, w);
  at::Tensor y = new_tensor({g.B, g.C, g.H, g.W}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "upsample_cpu", [&] {
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    TORCH_INTERNAL_ASSERT(!den.defined() || den.is_contiguous(),
                          "upsample_cpu: den must be contiguous");
    const scalar_t* dp = den.defined() ? den.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const cpu::StokenStrides ss{s.stride(0), s.stride(1), s.stride(2), s.stride(3)};
    at::parallel_for(0, g.B * g.hh, grain(9 * g.C * g.h * g.W), [&](int64_t begin, int64_t end) {
      k.upsample(g, sp, ss, Ap, dp, yp, begin, end);
    });
  });
  return y;
}

Tensor3 affinity_aggregate_cpu(const at::Tensor& x, const at::Tensor& s, int64_t h, int64_t w,
                               double scale, bool normalise) {
  const cpu::Geometry g = geometry(x, x.size(1), h, w);
  at::Tensor A = new_tensor({g.B, 9, g.H, g.W}, x.options());
  Tensor2 nd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "affinity_aggregate_cpu", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;  // null: pooled
    scalar_t* Ap = A.mutable_data_ptr<scalar_t>();
    nd = reduce_partials<scalar_t>(g, x, [&](acc_t* pn, acc_t* pd, int64_t begin, int64_t end) {
      k.affinity_partials(g, xp, sp, Ap, static_cast<acc_t>(scale), pn, pd, begin, end);
    }, normalise);
  });
  return {A, std::get<0>(nd), std::get<1>(nd)};
}

at::Tensor pool_cpu(const at::Tensor& x, int64_t h, int64_t w) {
  const cpu::Geometry g = geometry(x, x.size(1), h, w);
  at::Tensor s = new_tensor({g.B, g.C, g.hh, g.ww}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pool_cpu", [&] {
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* sp = s.mutable_data_ptr<scalar_t>();
    // one grid row of one plane at a time (kernels_impl.h pool_row)
    at::parallel_for(0, g.B * g.C * g.hh, grain(h * g.W), [&](int64_t begin, int64_t end) {
      k.pool(g, xp, sp, begin, end);
    });
  });
  return s;
}

// ---- The refine attention's forward and backward (refine.h) ----------------------------------

namespace {
// Multiply-adds of one refine forward: the qkv and proj products (4 C^2 per token) and the two of
// the attention (2 N C per token).
int64_t refine_work(int64_t B, int64_t C, int64_t N) { return B * N * C * (4 * C + 2 * N); }

// Where the kernels beat ATen's matrix products (their set-up, ~4 us per product, against MKL's
// arithmetic), forward and backward alike: measured on an AVX-512 Xeon at one thread (C = 32..128,
// N = 4..49, B = 1..4), they take 0.2-0.8x ATen's time up to 2^18, 0.7-1.4x from 2^18 to 2^20
// and 1.0-2.1x beyond (MKL's AVX-512 products against the kernels' AVX2).
std::atomic<int64_t> refine_limit{int64_t(1) << 18};

bool plain_cpu(const at::Tensor& t, at::ScalarType dt) {
  return t.is_cpu() && t.scalar_type() == dt && t.is_contiguous();
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}
}  // namespace

int64_t refine_cpu_limit() { return refine_limit.load(std::memory_order_relaxed); }
int64_t set_refine_cpu_limit(int64_t limit) { return refine_limit.exchange(limit); }

bool refine_cpu_takes(const at::Tensor& s, const at::Tensor& qkv_weight,
                      const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                      const std::optional<at::Tensor>& proj_bias) {
  const at::ScalarType dt = s.scalar_type();
  if (!refine_kernels_enabled() || (dt != at::kFloat && dt != at::kDouble)) return false;
  const auto bias_ok = [&](const std::optional<at::Tensor>& b) {
    return !b.has_value() || !b->defined() || plain_cpu(*b, dt);
  };
  return s.numel() > 0 && plain_cpu(s, dt) && plain_cpu(qkv_weight, dt) &&
         plain_cpu(proj_weight, dt) && bias_ok(qkv_bias) && bias_ok(proj_bias) &&
         refine_work(s.size(0), s.size(1), s.size(2) * s.size(3)) <= refine_cpu_limit();
}

void refine_forward_cpu(const at::Tensor& s, const at::Tensor& qkv_weight,
                        const std::optional<at::Tensor>& qkv_bias, const at::Tensor& proj_weight,
                        const std::optional<at::Tensor>& proj_bias, int64_t heads, double scale,
                        const at::Tensor& qkvh, const at::Tensor& attn, const at::Tensor& o,
                        const at::Tensor& out) {
  const int64_t B = s.size(0), C = s.size(1), N = s.size(2) * s.size(3);
  if (cpu::poison()) {
    for (const at::Tensor* t : {&qkvh, &attn, &o, &out}) {
      t->fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }
  TORCH_CHECK(qkvh.stride(3) == 1, "stvit::refine_forward_cpu: q, k, v rows must be contiguous");
  const cpu::RefineGeometry g{B, C, N, heads, C / heads,
                              {qkvh.stride(0), qkvh.stride(1), qkvh.stride(2)},
                              /*out_channel_major=*/out.is_contiguous()};
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "refine_forward_cpu", [&] {
    const auto& k = cpu::kernels<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* wq = qkv_weight.const_data_ptr<scalar_t>();
    const scalar_t* bq = data_or_null<scalar_t>(qkv_bias);
    const scalar_t* wp = proj_weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = data_or_null<scalar_t>(proj_bias);
    scalar_t* qp = qkvh.mutable_data_ptr<scalar_t>();
    scalar_t* ap = attn.mutable_data_ptr<scalar_t>();
    scalar_t* op = o.mutable_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(refine_work(1, C, N)), [&](int64_t begin, int64_t end) {
      k.refine(g, sp, wq, bq, wp, bp, static_cast<scalar_t>(scale), qp, ap, op, yp, begin, end);
    });
  });
}

bool refine_backward_cpu_takes(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& qkvh,
                               const at::Tensor& attn, const at::Tensor& o,
                               const at::Tensor& qkv_weight, const at::Tensor& proj_weight) {
  const at::ScalarType dt = s.scalar_type();
  return refine_cpu_takes(s, qkv_weight, std::nullopt, proj_weight, std::nullopt) &&
         plain_cpu(grad, dt) && plain_cpu(attn, dt) && plain_cpu(o, dt) && qkvh.is_cpu() &&
         qkvh.scalar_type() == dt && qkvh.stride(3) == 1;
}

Tensor5 refine_backward_cpu(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& qkvh,
                            const at::Tensor& attn, const at::Tensor& o,
                            const at::Tensor& qkv_weight, const at::Tensor& proj_weight,
                            int64_t heads, double scale) {
  const int64_t B = s.size(0), C = s.size(1), N = s.size(2) * s.size(3);
  const cpu::RefineGeometry g{B, C, N, heads, C / heads,
                              {qkvh.stride(0), qkvh.stride(1), qkvh.stride(2)}, false};
  const auto options = s.options();
  const at::Tensor ds = new_tensor({B, N, C}, options);
  const at::Tensor dwqkv = new_tensor(qkv_weight.sizes(), options);
  const at::Tensor dbqkv = new_tensor({3 * C}, options);
  const at::Tensor dwproj = new_tensor(proj_weight.sizes(), options);
  const at::Tensor dbproj = new_tensor({C}, options);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "refine_backward_cpu", [&] {
    cpu::kernels<scalar_t>().refine_backward(
        g, grad.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
        qkvh.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
        o.const_data_ptr<scalar_t>(), qkv_weight.const_data_ptr<scalar_t>(),
        proj_weight.const_data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
        ds.mutable_data_ptr<scalar_t>(), dwqkv.mutable_data_ptr<scalar_t>(),
        dbqkv.mutable_data_ptr<scalar_t>(), dwproj.mutable_data_ptr<scalar_t>(),
        dbproj.mutable_data_ptr<scalar_t>());
  });
  return {ds, dwqkv, dbqkv, dwproj, dbproj};
}

}  // namespace stvit
