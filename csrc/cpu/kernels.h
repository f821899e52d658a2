// CPU kernels of the STA primitives: what the host side (sta_cpu.cpp) sees of them.
//
// The kernels work cell by cell: a cell is the h x w block of pixels of one super token, and
// every pixel of a cell has the same 9 neighbouring super tokens (the 3x3 cells around it). A
// thread takes a band of cells (one row of the grid, whose pixels are h whole image rows: a
// contiguous stretch of every plane, read and written sequentially), converts it into per-cell
// tiles (channels outermost, the cell's pixels innermost and contiguous, in the accumulation
// type), loads the super tokens of the band's 3 grid rows once, and runs register-blocked loops
// over each cell's pixels (9 accumulators, one per neighbour slot, per vector of pixels); nothing
// of size (H*W) x (hh*ww) or 9 x |x| is built.
//
// The scatter-to-super-token sums (num, den of the aggregation) are computed as per-cell partial
// sums, one per neighbour slot ([B * hh * ww, 9, C] and [B * hh * ww, 9]), then added up by a
// second small pass that gathers, for each super token, the partials of the 3x3 cells around it
// in a fixed order. Every value is computed by one thread in a fixed order: the results are
// bitwise identical run to run and whatever the number of threads. No atomics.
//
// The kernel bodies (kernels_impl.h) are compiled twice: for the baseline ISA of the build
// (kernels_default.cpp) and, on x86-64, for AVX2 + FMA (kernels_avx2.cpp); the host picks one at
// run time (isa()), so a binary built on one machine runs everywhere and still uses 256-bit FMAs
// where the CPU has them.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/OpMathType.h>

namespace stvit {
namespace cpu {

// Sizes of one call; every tensor is contiguous NCHW (but the upsampling's super tokens, read
// through StokenStrides).
struct Geometry {
  int64_t B, C, H, W;  // pixels x: [B, C, H, W]
  int64_t h, w;        // cell (super-token) size
  int64_t hh, ww;      // super-token grid, H = hh * h, W = ww * w

  int64_t cells() const { return hh * ww; }
};

// Sizes of one refine attention forward (csrc/refine.cpp): N super tokens of C channels per item,
// heads of d = C / heads channels; q, k, v element (j, b * heads + h, n, i) of qkvh at
// j * qkv_strides[0] + (b * heads + h) * qkv_strides[1] + n * qkv_strides[2] + i.
struct RefineGeometry {
  int64_t B, C, N, heads, d;
  int64_t qkv_strides[3];
  bool out_channel_major;  // out [B, C, N] (else token-major [B * N, C])
};

// Strides (elements) of super tokens [B, C, hh, ww] that are read in any layout.
struct StokenStrides {
  int64_t b, c, u, v;
};

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// The kernels of one ISA for one dtype. Each runs over a range [begin, end) of bands (index
// b * hh + u: a row of cells, or for `reduce` the same row of super tokens). Cells and super
// tokens are indexed b * hh * ww + u * ww + v. Pointers are to the first element of the full
// tensors.
template <typename scalar_t>
struct KernelSet {
  using acc_t = acc_type<scalar_t>;

  // A [B, 9, H, W]: scale * <x, s_k> (0 for an invalid k), softmax over k when `softmax`.
  void (*affinity)(const Geometry& g, const scalar_t* x, const scalar_t* s, scalar_t* A,
                   acc_t scale, bool softmax, int64_t begin, int64_t end);
  // Per-cell partials of the aggregation: pnum [B * hh * ww, 9, C] holds
  // sum over the cell's pixels p of A[k, p] * x[:, p], pden [B * hh * ww, 9] the sum of A[k, p];
  // the values for slots k that point outside the grid are never read.
  void (*partials)(const Geometry& g, const scalar_t* x, const scalar_t* A, acc_t* pnum,
                   acc_t* pden, int64_t begin, int64_t end);
  // affinity (softmax) written to A, then its partials, from one load of x per band. s null:
  // the super tokens are the cell means of x (pool's), computed in the same pass: each band's
  // means as its rows of x are read for the band above it, so x is read from memory once.
  void (*affinity_partials)(const Geometry& g, const scalar_t* x, const scalar_t* s, scalar_t* A,
                            acc_t scale, acc_t* pnum, acc_t* pden, int64_t begin, int64_t end);
  // s [B, C, hh, ww]: the mean of each cell of x, for items [begin, end) of (b * C + c) * hh + u
  // (one grid row of one plane).
  void (*pool)(const Geometry& g, const scalar_t* x, scalar_t* s, int64_t begin, int64_t end);
  // num [B, C, hh, ww], den [B, 1, hh, ww] from the partials of the 3x3 cells around each
  // super token; with `normalise`, num / (den + 1e-12) (divided in acc_t) goes into num.
  void (*reduce)(const Geometry& g, const acc_t* pnum, const acc_t* pden, scalar_t* num,
                 scalar_t* den, bool normalise, int64_t begin, int64_t end);
  // y [B, C, H, W] = sum over valid k of A[k] * s[:, nbr_k] (s laid out as ss says: e.g. token-
  // major, as the refine's backward leaves a gradient); with den [B, 1, hh, ww] (else null), of
  // s / (den + 1e-12) instead, divided in acc_t as the super tokens are read.
  void (*upsample)(const Geometry& g, const scalar_t* s, const StokenStrides& ss,
                   const scalar_t* A, const scalar_t* den, scalar_t* y, int64_t begin,
                   int64_t end);
  // The refine attention's forward for items [begin, end) of b (s [B, C, N]; biases may be null):
  // q, k, v = the [heads, (q, k, v), d] channels of s's tokens @ wqkv^T + bqkv, into qkvh;
  // attn [B * heads, N, N] = softmax(scale q k^T); o [B * N, C] = attn v (token-major, the heads
  // side by side); out = o @ wproj^T + bproj, [B * N, C] or [B, C, N] (g.out_channel_major).
  // Null for the half types (their refine is ATen's, in float).
  void (*refine)(const RefineGeometry& g, const scalar_t* s, const scalar_t* wqkv,
                 const scalar_t* bqkv, const scalar_t* wproj, const scalar_t* bproj, acc_t scale,
                 acc_t* qkvh, acc_t* attn, scalar_t* o, scalar_t* out, int64_t begin, int64_t end);
  // Its backward, all items in one thread (the parameters' gradients are sums over them): from
  // grad [B, C, N] (out's gradient, channel-major) and refine's s, qkvh, attn, o, the gradients
  // ds [B * N, C] (token-major), dwqkv [3C, C], dbqkv [3C], dwproj [C, C], dbproj [C]. Null for
  // the half types.
  void (*refine_backward)(const RefineGeometry& g, const scalar_t* grad, const scalar_t* s,
                          const acc_t* qkvh, const acc_t* attn, const scalar_t* o,
                          const scalar_t* wqkv, const scalar_t* wproj, acc_t scale, scalar_t* ds,
                          scalar_t* dwqkv, scalar_t* dbqkv, scalar_t* dwproj, scalar_t* dbproj);
};

// Baseline build (kernels_default.cpp) and AVX2 + FMA (kernels_avx2.cpp, x86-64 only).
template <typename scalar_t>
const KernelSet<scalar_t>& kernels_default();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STVIT_CPU_HAVE_AVX2 1
template <typename scalar_t>
const KernelSet<scalar_t>& kernels_avx2();
#endif

// The instruction set the kernels use: "avx2" (x86-64 CPUs with AVX2 and FMA) or "default".
// STVIT_CPU_ISA=default in the environment, or set_isa("default"), forces the baseline build;
// set_isa("auto") returns to the best the CPU supports. Asking for "avx2" on a CPU without it
// raises.
std::string isa();
void set_isa(const std::string& name);

// Testing aid: when on, every output and workspace the CPU kernels allocate is filled with NaN
// first, so that an element a kernel forgets to write (or a workspace value it reads without
// having written it) shows up as NaN in the results. Off by default.
void set_poison(bool on);
bool poison();

}  // namespace cpu
}  // namespace stvit
