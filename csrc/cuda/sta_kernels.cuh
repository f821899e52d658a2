// CUDA kernel templates of the four STA primitives (semantics: csrc/stvit.h, DESIGN.md §1).
//
// Work decomposition shared by every pixel-side kernel (the "cell tile"):
//   * one thread block per (batch b, cell row ci, tile T): the tile is NC consecutive cells
//     cj0 = T*NC .. cj0+nct-1 of cell row ci (nct = NC except for a shorter last tile), i.e. a
//     h x (nct*w) pixel rectangle, numbered row-major p = r*TW + col (TW = nct*w);
//   * the block walks the tile in batches of blockDim.x pixels, one thread per pixel (affinity
//     and upsample: one batch unless a single cell has more pixels than the block; aggregating
//     kernels: wider tiles, several batches, see plan_cells);
//   * the super tokens the tile can see are the 3 x (NC+2) cells around it (extended columns
//     e = 0..NC+1 stand for cell columns cj0-1 .. cj0+NC); they are staged in shared memory in
//     chunks of CK channels, zero-filled outside the grid, so neighbour k of a pixel in tile cell
//     tc reads row k/3, extended column tc + k%3 with no branch.
//
// The scatter-to-super-token sums (num, den) never use atomics: a block sums, for each of the
// 3 x (NC+2) super tokens its pixels point at, the contributions of all its pixels (a fixed
// order: source cell column, then pixel row, then pixel column) into a workspace slot; the small
// reduce kernel then adds, for each super token, the <= 3 rows x <= 3 tiles slots that point at
// it, in a fixed order. den rides along as channel C of x with the value 1.
//
// The same source builds with a host emulator (tests without a GPU): it defines
// STVIT_DYNAMIC_SMEM and the CUDA built-ins before including this file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <ATen/OpMathType.h>

#ifndef STVIT_DYNAMIC_SMEM
#define STVIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace stvit {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Small helpers

constexpr int kMaxThreads = 256;      // threads per block, at most
constexpr int kMaxCellsPerTile = 64;  // bounds the 3 x (NC+2) staged super tokens for tiny cells

template <typename T>
__host__ __device__ __forceinline__ T imin(T a, T b) { return a < b ? a : b; }
template <typename T>
__host__ __device__ __forceinline__ T imax(T a, T b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int round_up(int a, int m) { return (a + m - 1) / m * m; }

__device__ __forceinline__ float exp_acc(float v) { return ::expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return ::exp(v); }

// Channels per 16-byte vector of the accumulation type: 4 (float), 2 (double).
template <typename acc_t>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(acc_t));
};

// N consecutive elements loaded/stored as one aligned vector (LDS/STS .64/.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, N>*>(ptr);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& val) {
  *reinterpret_cast<Vec<T, N>*>(ptr) = val;
}

// Copies of 4 or 8 bytes from global to shared memory that do not wait for the data (cp.async on
// sm_80+: no register holds them, so a thread has all of its pixel's channels in flight at once);
// async_wait_all() waits for this thread's copies. The emulator (STVIT_EMULATED_ASYNC) defers
// the copies to that wait, so reading the destination earlier shows as NaN there.
#if defined(STVIT_EMULATED_ASYNC)
template <int BYTES>
__device__ __forceinline__ void async_copy(void* dst, const void* src) {
  STVIT_EMULATED_ASYNC(dst, src, BYTES);
}
__device__ __forceinline__ void async_wait_all() { STVIT_EMULATED_ASYNC_WAIT(); }
#else
template <int BYTES>
__device__ __forceinline__ void async_copy(void* dst, const void* src) {
  static_assert(BYTES == 4 || BYTES == 8, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(BYTES)
               : "memory");
#else
  if constexpr (BYTES == 4) {
    *static_cast<uint32_t*>(dst) = *static_cast<const uint32_t*>(src);
  } else {
    *static_cast<uint64_t*>(dst) = *static_cast<const uint64_t*>(src);
  }
#endif
}
__device__ __forceinline__ void async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
#endif

// The C channels of one pixel of x (stride HW between channels) into the shared row dst of the x
// cache, which holds acc_t (the values of x, widened), with every load in flight before any is
// waited for: cp.async where x is acc_t already (float32 x, float32 pixels of a 16-bit
// computation, float64 x; the thread waits with async_wait_all() before it reads dst), groups of
// 32 register loads widened as they are stored for 16-bit x (cp.async copies whole elements of 4
// bytes or more; dst is complete on return). Float32 pixels of a 16-bit computation (pixel_t, see
// CellParams) are rounded to scalar_t where the row is read (x_value).
//
// The copies go through the channels in an order rotated by lane: the rows of x_sh are XC = 4 x
// odd words apart (so that the vector reads of a row are conflict-free), and 32 lanes storing the
// same channel of 32 rows would hit only 8 banks (4-way conflicts). Lane 8g + j starts at channel
// g: it stores bank 4 j odd + g + c, 32 banks (8-byte elements: 16 lanes per wavefront, the same
// way). One wavefront per 128 bytes stored (csrc/cuda/emu/smem_wavefronts.py), and every group of
// 8 lanes still reads 8 consecutive pixels of one channel (one 32-byte sector in float32).
template <typename acc_t, typename pixel_t>
__device__ __forceinline__ void fetch_pixel(acc_t* __restrict__ dst,
                                            const pixel_t* __restrict__ src, int C, int64_t HW,
                                            int lane) {
  const int rot = (lane >> 3) & 3;
  if constexpr (std::is_same_v<acc_t, pixel_t>) {
    // channels start .. C-1, then 0 .. start-1: a pointer stepped by a plane per copy (an index
    // times HW in 64 bits and the wrap test made 14.75 instructions per copy in the sm_90 SASS)
    const int start = C > 0 ? rot % C : 0;
    const pixel_t* s = src + start * HW;
#pragma unroll 8
    for (int c = start; c < C; ++c, s += HW) async_copy<sizeof(acc_t)>(dst + c, s);
    s = src;
    for (int c = 0; c < start; ++c, s += HW) async_copy<sizeof(acc_t)>(dst + c, s);
  } else {
    constexpr int U = 32;
    for (int c0 = 0; c0 < C; c0 += U) {
      pixel_t v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + ((u + rot) & (U - 1));
        v[u] = c < C ? src[c * HW] : pixel_t(0.0f);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + ((u + rot) & (U - 1));
        if (c < C) dst[c] = static_cast<acc_t>(v[u]);
      }
    }
  }
}

// A value of the x cache (fetch_pixel) as the kernels compute with it: x's value, rounded to
// scalar_t where x is float32 around a 16-bit computation (exact otherwise, and not redone).
template <typename scalar_t, typename pixel_t, typename acc_t>
__device__ __forceinline__ acc_t x_value(acc_t v) {
  if constexpr (std::is_same_v<pixel_t, scalar_t>) {
    return v;
  } else {
    return static_cast<acc_t>(static_cast<scalar_t>(v));
  }
}

// ------------------------------------------------------------------------------------------------
// Parameters (one struct for every pixel-side kernel; unused pointers are null)
//
// pixel_t: the element type of the pixel-side tensor, x read or y written; scalar_t, or float32
// where scalar_t is 16-bit and autocast's cast of x (or of the gradient into x) is done in the
// kernel: each x value is rounded to scalar_t as it is read, each y value rounded to scalar_t,
// then widened, as it is written (the results are those of the cast done apart).
template <typename scalar_t, typename pixel_t = scalar_t>
struct CellParams {
  using acc_t = at::opmath_type<scalar_t>;
  const pixel_t* x = nullptr;      // [B, C, H, W]   affinity, aggregate, fused
  const scalar_t* s = nullptr;     // [B, C, hh, ww] affinity, fused, upsample
  const scalar_t* A_in = nullptr;  // [B, 9, H, W]   aggregate, upsample
  scalar_t* A_out = nullptr;       // [B, 9, H, W]   affinity, fused
  pixel_t* y = nullptr;            // [B, C, H, W]   upsample
  acc_t* ws = nullptr;             // [B, hh, NT, 3, NC+2, CW] partial sums: aggregate, fused
  acc_t scale = 0;
  bool softmax = true;
  // aggregating kernels: one unit (cell, channel vector) per thread for the whole tile, its sums in
  // registers, combined into the slots at the end (Plan::cell_units); else column units per batch
  bool cell_units = false;
  int C = 0, H = 0, W = 0, h = 1, w = 1, hh = 0, ww = 0;
  // tile plan (see Plan)
  int NC = 1, NT = 1, CK = 0, SK = 0, XC = 0, CW = 0;
  int a_off = 0, x_off = 0;  // byte offsets of the A and x regions in dynamic shared memory
};

// The normalised upsampling's (associate_backward, see stage_stokens): s / (den + 1e-12), den
// [B, 1, hh, ww], s with the channel and super-token strides (hh * ww, 1) (contiguous) or (1, C)
// (token-major). A struct of its own: a field more in CellParams changes ptxas's register
// allocation of every cell kernel (tried: spills appear in five of them).
template <typename scalar_t, typename pixel_t = scalar_t>
struct NormalisedParams : CellParams<scalar_t, pixel_t> {
  const scalar_t* den = nullptr;
  int64_t s_sc = 0, s_sn = 1;
};

template <typename scalar_t, bool NORMALISED, typename pixel_t = scalar_t>
using UpsampleParams = std::conditional_t<NORMALISED, NormalisedParams<scalar_t, pixel_t>,
                                          CellParams<scalar_t, pixel_t>>;

// A value of x (pixel_t) as the kernels compute with it: rounded to scalar_t first.
template <typename scalar_t, typename pixel_t>
__device__ __forceinline__ scalar_t as_scalar(pixel_t v) {
  return static_cast<scalar_t>(v);
}

// Where a block sits: batch b, cell row ci, tile T (cells cj0 .. cj0+nct-1), tile width TW and
// pixel count TP.
struct TileInfo {
  int64_t b;
  int ci, T, cj0, nct, TW, TP;
};

template <typename P>
__device__ __forceinline__ TileInfo tile_of(const P& p) {
  TileInfo t;
  int64_t bid = blockIdx.x;
  t.T = static_cast<int>(bid % p.NT);
  bid /= p.NT;
  t.ci = static_cast<int>(bid % p.hh);
  t.b = bid / p.hh;
  t.cj0 = t.T * p.NC;
  t.nct = imin(p.NC, p.ww - t.cj0);
  t.TW = t.nct * p.w;
  t.TP = p.h * t.TW;
  return t;
}

// Stage channels [c0, c0 + CK) of the 3 x (NC+2) super tokens around the tile into
// s_sh[(row * (NC+2) + e) * SK + cc], zero outside the grid and for channels >= C.
// Consecutive threads take consecutive extended columns: runs of contiguous reads of s. A thread
// issues kStageLoads loads before it stores any: one trip to memory instead of one per element.
// NORMALISED (associate_backward's upsampling): s has the strides (p.s_sc, p.s_sn) (consecutive
// threads take consecutive channels where s is token-major) and each value is divided by
// den + 1e-12 in acc_t; a template flag, so that the other kernels keep their registers.
constexpr int kStageLoads = 8;

template <bool NORMALISED, typename scalar_t, typename acc_t, class P>
__device__ __forceinline__ void stage_stokens(acc_t* __restrict__ s_sh,
                                              const scalar_t* __restrict__ s_b, int c0,
                                              const P& p, const TileInfo& t) {
  const int NCE = p.NC + 2;
  const int n = 3 * NCE * p.CK;
  const int BS = blockDim.x;
  const int64_t plane = static_cast<int64_t>(p.hh) * p.ww;
  bool token_major = false;
  const scalar_t* den_b = nullptr;
  if constexpr (NORMALISED) {
    token_major = p.s_sc == 1 && p.C > 1;
    den_b = p.den + t.b * plane;
  }
  // Channel-plane-major s (not token-major), a block of at least 3 x (NC+2) threads: thread q
  // keeps slot j = q % S (its bounds test, token and den computed once) and takes its channels
  // q / S, + per, ...: a load, a store and a pointer step per element, kStageLoads loads in
  // flight. (The index of the generic loop below, two divisions, bounds tests and a 64-bit
  // address per element, made ~50 instructions per element in the sm_90 SASS.)
  const int S = 3 * NCE;
  const int per = BS / S;
  if (!token_major && per > 0) {
    const int q = threadIdx.x;
    if (q >= per * S) return;
    const int j = q % S;
    const int row = j / NCE;
    const int uu = t.ci + row - 1;
    const int v = t.cj0 - 1 + (j - row * NCE);
    const bool in_grid = uu >= 0 && uu < p.hh && v >= 0 && v < p.ww;
    const int64_t token = in_grid ? static_cast<int64_t>(uu) * p.ww + v : 0;
    acc_t div = acc_t(1);  // a division, as the generic loop and the CPU kernels do
    if constexpr (NORMALISED) div = static_cast<acc_t>(den_b[token]) + acc_t(1e-12);
    acc_t* d = s_sh + j * p.SK;
    const int c_end = in_grid ? imin(p.CK, p.C - c0) : 0;  // channels cc < c_end are read
    for (int cc0 = q / S; cc0 < p.CK; cc0 += kStageLoads * per) {
      acc_t val[kStageLoads];
      const scalar_t* src = s_b + static_cast<int64_t>(c0 + cc0) * plane + token;
#pragma unroll
      for (int u = 0; u < kStageLoads; ++u, src += per * plane) {
        val[u] = cc0 + u * per < c_end ? static_cast<acc_t>(src[0]) : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kStageLoads; ++u) {
        if constexpr (NORMALISED) val[u] = val[u] / div;
        if (cc0 + u * per < p.CK) d[cc0 + u * per] = val[u];
      }
    }
    return;
  }
  for (int base = threadIdx.x; base < n; base += kStageLoads * BS) {
    acc_t val[kStageLoads];
    acc_t div[NORMALISED ? kStageLoads : 1];
    int dst[kStageLoads];
#pragma unroll
    for (int u = 0; u < kStageLoads; ++u) {
      const int idx = base + u * BS;
      int e, row, cc;
      if (token_major) {
        cc = idx % p.CK;
        const int rest = idx / p.CK;
        e = rest % NCE;
        row = rest / NCE;
      } else {
        e = idx % NCE;
        const int rest = idx / NCE;
        row = rest % 3;
        cc = rest / 3;
      }
      const int uu = t.ci + row - 1;
      const int v = t.cj0 - 1 + e;
      const int c = c0 + cc;
      val[u] = acc_t(0);
      if constexpr (NORMALISED) div[u] = acc_t(1);
      dst[u] = (row * NCE + e) * p.SK + cc;
      if (idx < n && uu >= 0 && uu < p.hh && v >= 0 && v < p.ww && c < p.C) {
        const int64_t token = static_cast<int64_t>(uu) * p.ww + v;
        if constexpr (NORMALISED) {
          val[u] = static_cast<acc_t>(s_b[c * p.s_sc + token * p.s_sn]);
          div[u] = static_cast<acc_t>(den_b[token]) + acc_t(1e-12);
        } else {
          val[u] = static_cast<acc_t>(s_b[c * plane + token]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kStageLoads; ++u) {
      if constexpr (NORMALISED) val[u] = val[u] / div[u];
      if (base + u * BS < n) s_sh[dst[u]] = val[u];
    }
  }
}

// Is neighbour k of a pixel in cell (ci, cj) inside the grid?
__device__ __forceinline__ bool neighbour_valid(int k, int ci, int cj, int hh, int ww) {
  const int u = ci + k / 3 - 1;
  const int v = cj + k % 3 - 1;
  return u >= 0 && u < hh && v >= 0 && v < ww;
}

enum CellMode : int {
  kAffinity = 0,   // x, s -> A (softmax or logits)
  kAggregate = 1,  // x, A -> workspace partial sums
  kFused = 2,      // x, s -> A and workspace partial sums, one pass over x
};

// Channels c .. c+V-1 of a pixel of the batch, in acc_t, for the partial sums: from its row qq of
// the x cache, or (no cache) from x at xp (channel C is the constant 1 of den, above it 0).
template <bool CACHE_X, typename scalar_t, int V, typename acc_t, typename pixel_t>
__device__ __forceinline__ void x_vector(acc_t (&xv)[V], const acc_t* __restrict__ x_sh, int XC,
                                         int qq, const pixel_t* __restrict__ xp, int c, int C,
                                         int64_t HW) {
  if constexpr (CACHE_X) {
    const Vec<acc_t, V> xs = load_vec<acc_t, V>(x_sh + qq * XC + c);
#pragma unroll
    for (int v = 0; v < V; ++v) xv[v] = x_value<scalar_t, pixel_t>(xs.v[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int cv = c + v;
      xv[v] = cv < C ? static_cast<acc_t>(as_scalar<scalar_t>(xp[cv * HW]))
                     : acc_t(cv == C ? 1 : 0);
    }
  }
}

// The weights of the batch's pixels in shared memory (A_sh): pixel q's 9 (then 3 zeros) in a row of
// kARow elements at a_row(q), rows skewed by 4 elements every 8 pixels, so that the lanes of a warp
// reading the rows of two cells 8 pixels apart (cell units) hit different banks; written and read
// as vectors of AVec elements (3 x 16 bytes in float32, 3 x 8 in 16-bit types, 6 x 16 in float64),
// conflict-free for 8 consecutive rows. Rows of 9 scalars BS apart before 2026-12-07: 9 loads per
// pixel where a row is now 3 (csrc/cuda/emu/smem_wavefronts.py).
constexpr int kARow = 12;
__host__ __device__ __forceinline__ int a_row(int q) { return q * kARow + (q >> 3) * 4; }
// elements of A_sh that a block of bs threads uses
__host__ __device__ __forceinline__ int a_rows_size(int bs) { return a_row(bs - 1) + kARow; }
template <typename scalar_t>
struct AVec {
  static constexpr int value = 16 / static_cast<int>(sizeof(scalar_t)) < 4
                                   ? 16 / static_cast<int>(sizeof(scalar_t)) : 4;
};

template <typename scalar_t>
__device__ __forceinline__ void store_a_row(scalar_t* __restrict__ dst, const scalar_t (&a)[kARow]) {
  constexpr int AV = AVec<scalar_t>::value;
#pragma unroll
  for (int j = 0; j < kARow; j += AV) {
    Vec<scalar_t, AV> v;
#pragma unroll
    for (int i = 0; i < AV; ++i) v.v[i] = a[j + i];
    store_vec(dst + j, v);
  }
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_a_row(acc_t (&a)[9], const scalar_t* __restrict__ src) {
  constexpr int AV = AVec<scalar_t>::value;
#pragma unroll
  for (int j = 0; j < kARow; j += AV) {
    const Vec<scalar_t, AV> v = load_vec<scalar_t, AV>(src + j);
#pragma unroll
    for (int i = 0; i < AV; ++i) {
      if (j + i < 9) a[j + i] = static_cast<acc_t>(v.v[i]);
    }
  }
}

// f(qq, pix) for each pixel of tile cell tc among the batch's pixels pb .. pb + nb - 1 (tile
// order), row by row, left to right: qq its index in the batch, pix its offset in an H x W plane.
template <class P, class F>
__device__ __forceinline__ void batch_cell_pixels(const P& p, const TileInfo& t, int pb, int nb,
                                                  int tc, F&& f) {
  const int r_last = (pb + nb - 1) / t.TW;
  for (int r = pb / t.TW; r <= r_last; ++r) {
    const int row0 = r * t.TW + tc * p.w;  // tile index of the cell row's first pixel
    const int lo = imax(pb, row0);
    const int hi = imin(pb + nb, row0 + p.w);
    const int64_t pix_row = static_cast<int64_t>(t.ci * p.h + r) * p.W + t.cj0 * p.w - r * t.TW;
    for (int pj = lo; pj < hi; ++pj) f(pj - pb, pix_row + pj);
  }
}

// Cell units per tile cell (Plan::cell_units) for a tile of NC cells and a block of BS threads:
// one per channel vector of a slot (CW / V; den rides as channel C in the last one) where
// NC * CW / V units fit in the block; else, where C is a multiple of V, at least 9 V, and
// NC * C / V units fit, one per vector below C (C / V), den's vector left out: the cell's first 9
// units sum den, one neighbour each (a load and an add more per pixel for them). 0: no cell
// units. E.g. C = 64 with 8 x 8 cells (STViT stage 1) and 16 cells a tile (112^2 tokens and
// more), fp32: 16 x 17 units do not fit in 256 threads, 16 x 16 do.
__host__ __device__ __forceinline__ int units_per_cell(int C, int CW, int V, int NC, int BS) {
  if (NC * (CW / V) <= BS) return CW / V;
  if (C % V == 0 && C >= 9 * V && NC * (C / V) <= BS) return C / V;
  return 0;
}

// ------------------------------------------------------------------------------------------------
// The pixel-side kernel of affinity, aggregate and the fused affinity + aggregate.
//
// Shared memory (dynamic): [ s_sh: 3 x (NC+2) x SK acc_t | A_sh: blockDim rows (a_row) scalar_t |
//                            x_sh: blockDim x XC acc_t ]
// s_sh only when computing logits, A_sh and x_sh only when aggregating (x_sh only with CACHE_X:
// the batch's x is kept on chip between the logits and the partial sums, so x is read from
// device memory once; without it the partial sums re-read x, mostly from L2).
template <typename scalar_t, int MODE, bool CACHE_X, typename pixel_t = scalar_t>
__global__ void __launch_bounds__(kMaxThreads) cell_kernel(const CellParams<scalar_t, pixel_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = VecWidth<acc_t>::value;
  constexpr bool kLogits = MODE != kAggregate;
  constexpr bool kAgg = MODE != kAffinity;

  STVIT_DYNAMIC_SMEM(smem);
  acc_t* s_sh = reinterpret_cast<acc_t*>(smem);
  scalar_t* A_sh = reinterpret_cast<scalar_t*>(smem + p.a_off);
  acc_t* x_sh = reinterpret_cast<acc_t*>(smem + p.x_off);

  const TileInfo t = tile_of(p);
  const int BS = blockDim.x;
  const int q = threadIdx.x;
  const int NCE = p.NC + 2;
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;
  const pixel_t* x_b = p.x + t.b * p.C * HW;

  // aggregating kernels: the tile's slots (extended columns sc_lo .. sc_hi are in the grid, slot
  // row sr where row_ok(sr)) and, with p.cell_units, this thread's unit for the whole tile: cell
  // u_tc, channels u_c .. u_c + V - 1, its sums into the 9 slots of that cell's neighbours in
  // registers (cacc[k]: neighbour k = 3 * slot row + column offset)
  const int NVC = p.CW / V;  // channel vectors per slot
  const int sc_lo = t.cj0 == 0 ? 1 : 0;
  const int sc_hi = imin(t.nct + 1, p.ww - t.cj0);
  acc_t* ws_tile = nullptr;
  // bit sr: slot row sr in the grid (a mask, not a bool[3]: indexed by a runtime sr, an array
  // went to local memory, 3 stores and a load per use)
  unsigned row_mask = 0;
#pragma unroll
  for (int sr = 0; sr < 3; ++sr) {
    row_mask |= unsigned(t.ci + sr - 1 >= 0 && t.ci + sr - 1 < p.hh) << sr;
  }
  const auto row_ok = [row_mask](int sr) { return (row_mask >> sr) & 1u; };
  if constexpr (kAgg) {
    ws_tile = p.ws + ((t.b * p.hh + t.ci) * p.NT + t.T) * static_cast<int64_t>(3 * NCE * p.CW);
  }
  // a cell's units (units_per_cell): one per channel vector of the slot (den as channel C of the
  // last one), or one per vector below C, unit j < 9 of the cell then summing den's neighbour j
  const int NVU = kAgg && p.cell_units ? units_per_cell(p.C, p.CW, V, p.NC, BS) : 0;
  const bool own_unit = q < t.nct * NVU;
  // (divided by 1 where a mode has no units: nvcc warned of q / 0 in its dead branch)
  const int u_tc = own_unit ? q / (kAgg ? NVU : 1) : 0;
  const int u_c = own_unit ? (q - u_tc * NVU) * V : 0;
  // den's sums without their vector (den_sh): 9 x NC acc_t just below x_off (the A region's tail,
  // see plan_cells), each carried there between batches by its unit, a register during phase 2
  // only (one live across phase 1 beside the 9 x V sums spilled: ptxas, sm_90)
  const auto den_sh = [&] { return reinterpret_cast<acc_t*>(smem + p.x_off) - round_up(9 * p.NC, V); };
  // the neighbour whose den this unit sums, or -1 (recomputed where used, for the same reason)
  const auto den_neighbour = [&] { return NVU != NVC && u_c < 9 * V ? u_c / V : -1; };
  acc_t cacc[kAgg ? 9 : 1][V];
#pragma unroll
  for (int k = 0; k < (kAgg ? 9 : 1); ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) cacc[k][v] = acc_t(0);
  }

  for (int pb = 0; pb < t.TP; pb += BS) {
    // ---- this thread's pixel
    const int pi = pb + q;
    const bool active = pi < t.TP;
    int tc = 0;        // its cell within the tile
    int64_t pix = 0;   // its offset in an H x W plane
    if (active) {
      const int r = pi / t.TW;
      const int col = pi - r * t.TW;
      tc = col / p.w;
      pix = static_cast<int64_t>(t.ci * p.h + r) * p.W + t.cj0 * p.w + col;
    }

    // ---- the batch's x on chip (aggregating kernels with the x cache): all of the pixel's
    // channels in flight at once, overlapping the loads of s or A below; channel C of the row is
    // the constant 1 (-> den), channels C+1 .. CW-1 are 0 (phase 1 reads channels below
    // round_up(C, V), phase 2 below CW; nothing reads the row from CW to XC)
    if constexpr (kAgg && CACHE_X) {
      if (active) {
        acc_t* row = x_sh + q * p.XC;
        fetch_pixel(row, x_b + pix, p.C, HW, q);
        if (p.C % V == 0) {  // one aligned vector store (conflict-free, as the reads)
          Vec<acc_t, V> tail;
#pragma unroll
          for (int v = 0; v < V; ++v) tail.v[v] = acc_t(v == 0 ? 1 : 0);
          store_vec(row + p.C, tail);
        } else {
          for (int c = p.C; c < p.CW; ++c) row[c] = acc_t(c == p.C ? 1 : 0);
        }
      }
    }

    // ---- phase 1: the association of the batch's pixels (computed, or read)
    if constexpr (kLogits) {
      const scalar_t* s_b = p.s + t.b * p.C * static_cast<int64_t>(p.hh) * p.ww;
      acc_t lg[9];
#pragma unroll
      for (int k = 0; k < 9; ++k) lg[k] = acc_t(0);
      // the staged chunk survives between batches when one chunk holds every channel
      const bool restage = (p.C > p.CK) || (pb == 0);
      for (int c0 = 0; c0 < p.C; c0 += p.CK) {
        if (restage) {
          __syncthreads();  // everyone is done with the previous chunk
          stage_stokens<false>(s_sh, s_b, c0, p, t);
          __syncthreads();
        }
        if (active) {
          const int nv = imin(p.CK, p.C - c0);
          const pixel_t* xp = x_b + c0 * HW + pix;
          if constexpr (kAgg && CACHE_X) async_wait_all();  // this thread's own row of x_sh
          // one step at a time (its 10 vector loads are independent): unrolled by 2, the 18
          // super-token vectors in flight beside the cell units' 9 x V sums spilled (ptxas, sm_90:
          // 84 bytes stored, 152 loaded in the float32 fused kernel, against 12 and 12)
#pragma unroll 1
          for (int cc = 0; cc < nv; cc += V) {
            acc_t xr[V];
            if constexpr (kAgg && CACHE_X) {
              // channels >= C of the row are 1 or 0, against super-token channels that are 0
              x_vector<true, scalar_t>(xr, x_sh, p.XC, q, xp, c0 + cc, p.C, HW);
            } else {
#pragma unroll
              for (int v = 0; v < V; ++v) {
                xr[v] = (cc + v < nv) ? static_cast<acc_t>(as_scalar<scalar_t>(xp[(cc + v) * HW]))
                                      : acc_t(0);
              }
            }
#pragma unroll
            for (int k = 0; k < 9; ++k) {
              const Vec<acc_t, V> sv =
                  load_vec<acc_t, V>(s_sh + ((k / 3) * NCE + tc + k % 3) * p.SK + cc);
#pragma unroll
              for (int v = 0; v < V; ++v) lg[k] += xr[v] * sv.v[v];
            }
          }
        }
      }
      if (active) {
        const int cj = t.cj0 + tc;
        acc_t a[9];
#pragma unroll
        for (int k = 0; k < 9; ++k) {
          // an invalid neighbour has logit exactly 0 (and still takes part in the softmax)
          a[k] = neighbour_valid(k, t.ci, cj, p.hh, p.ww) ? lg[k] * p.scale : acc_t(0);
        }
        if (p.softmax) {
          acc_t m = a[0];
#pragma unroll
          for (int k = 1; k < 9; ++k) m = a[k] > m ? a[k] : m;
          acc_t z = acc_t(0);
#pragma unroll
          for (int k = 0; k < 9; ++k) {
            a[k] = exp_acc(a[k] - m);
            z += a[k];
          }
          const acc_t inv = acc_t(1) / z;
#pragma unroll
          for (int k = 0; k < 9; ++k) a[k] *= inv;
        }
        scalar_t* Ap = p.A_out + t.b * 9 * HW + pix;
        scalar_t row[kARow];  // aggregate with A as stored (rounded), like affinity then aggregate
#pragma unroll
        for (int k = 0; k < kARow; ++k) {
          row[k] = static_cast<scalar_t>(k < 9 ? a[k] : acc_t(0));
          if (k < 9) Ap[k * HW] = row[k];
        }
        if constexpr (kAgg) store_a_row(A_sh + a_row(q), row);
      }
    } else {
      if (active) {
        const scalar_t* Ap = p.A_in + t.b * 9 * HW + pix;
        scalar_t row[kARow];
#pragma unroll
        for (int k = 0; k < kARow; ++k) row[k] = k < 9 ? Ap[k * HW] : scalar_t(0.0f);
        store_a_row(A_sh + a_row(q), row);
      }
    }

    // ---- phase 2: partial sums of the batch's pixels (see p.cell_units)
    if constexpr (kAgg) {
      if constexpr (CACHE_X) async_wait_all();
      __syncthreads();  // A_sh (and x_sh) of the batch are complete

      const int nb = imin(BS, t.TP - pb);
      if (p.cell_units) {
        // this thread's unit: the pixels of cell u_tc in the batch, row by row, each channel
        // vector read once for the 9 slots (9 x V multiply-adds per vector)
        if (own_unit) {
          const int den_k = den_neighbour();
          acc_t den_sum = den_k >= 0 && pb > 0 ? den_sh()[u_tc * 9 + den_k] : acc_t(0);
          batch_cell_pixels(p, t, pb, nb, u_tc, [&](int qq, int64_t pix) {
            acc_t xv[V];
            x_vector<CACHE_X, scalar_t>(xv, x_sh, p.XC, qq, x_b + pix, u_c, p.C, HW);
            acc_t a[9];
            load_a_row(a, A_sh + a_row(qq));
#pragma unroll
            for (int k = 0; k < 9; ++k) {
#pragma unroll
              for (int v = 0; v < V; ++v) cacc[k][v] += a[k] * xv[v];
            }
            if (den_k >= 0) den_sum += static_cast<acc_t>(A_sh[a_row(qq) + den_k]);
          });
          if (den_k >= 0) den_sh()[u_tc * 9 + den_k] = den_sum;
        }
      } else {
        // column units (extended column sc, channel vector c .. c+V-1), all 3 slot rows, for
        // the batch; the sums of earlier batches (large cells, wide tiles) carried in the slots
        const int nunits = (sc_hi - sc_lo + 1) * NVC;
        for (int unit = q; unit < nunits; unit += BS) {
          const int sc = sc_lo + unit / NVC;
          const int c = (unit % NVC) * V;
          acc_t acc[3][V];
#pragma unroll
          for (int sr = 0; sr < 3; ++sr) {
#pragma unroll
            for (int v = 0; v < V; ++v) acc[sr][v] = acc_t(0);
            if (pb > 0 && row_ok(sr)) {
              const Vec<acc_t, V> old = load_vec<acc_t, V>(ws_tile + (sr * NCE + sc) * p.CW + c);
#pragma unroll
              for (int v = 0; v < V; ++v) acc[sr][v] = old.v[v];
            }
          }
          // the source cells pointing at column sc: tile cell tc with neighbour column kc = k % 3,
          // tc + kc == sc; slot row sr takes neighbour k = sr * 3 + kc
          for (int kc = 0; kc < 3; ++kc) {
            const int tc_src = sc - kc;
            if (tc_src < 0 || tc_src >= t.nct) continue;
            batch_cell_pixels(p, t, pb, nb, tc_src, [&](int qq, int64_t pix) {
              acc_t xv[V];
              x_vector<CACHE_X, scalar_t>(xv, x_sh, p.XC, qq, x_b + pix, c, p.C, HW);
              const scalar_t* ar = A_sh + a_row(qq);
              const acc_t a0 = static_cast<acc_t>(ar[kc]);
              const acc_t a1 = static_cast<acc_t>(ar[3 + kc]);
              const acc_t a2 = static_cast<acc_t>(ar[6 + kc]);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                acc[0][v] += a0 * xv[v];
                acc[1][v] += a1 * xv[v];
                acc[2][v] += a2 * xv[v];
              }
            });
          }
#pragma unroll
          for (int sr = 0; sr < 3; ++sr) {
            if (!row_ok(sr)) continue;
            Vec<acc_t, V> out;
#pragma unroll
            for (int v = 0; v < V; ++v) out.v[v] = acc[sr][v];
            store_vec(ws_tile + (sr * NCE + sc) * p.CW + c, out);
          }
        }
      }
      __syncthreads();  // the next batch overwrites A_sh and x_sh
    }
  }

  // ---- cell units: slot (sr, e) of the tile is the sum, over kc = 0, 1, 2, of slot sr * 3 + kc
  // of unit cell e - kc; through shared memory (the x cache's region: the last batch is done)
  if constexpr (kAgg) {
    if (p.cell_units) {
      acc_t* red = reinterpret_cast<acc_t*>(smem + p.x_off);
      if (own_unit) {
#pragma unroll
        for (int k = 0; k < 9; ++k) {
          Vec<acc_t, V> out;
#pragma unroll
          for (int v = 0; v < V; ++v) out.v[v] = cacc[k][v];
          store_vec(red + (u_tc * 9 + k) * p.CW + u_c, out);
        }
        if (const int k = den_neighbour(); k >= 0) {  // den's vector: channels C .. CW - 1
          Vec<acc_t, V> out;
#pragma unroll
          for (int v = 0; v < V; ++v) out.v[v] = v == 0 ? den_sh()[u_tc * 9 + k] : acc_t(0);
          store_vec(red + (u_tc * 9 + k) * p.CW + p.C, out);
        }
      }
      __syncthreads();
      const int per_row = (sc_hi - sc_lo + 1) * NVC;
      for (int i = q; i < 3 * per_row; i += BS) {
        const int sr = i / per_row;
        if (!row_ok(sr)) continue;
        const int rest = i - sr * per_row;
        const int e = sc_lo + rest / NVC;
        const int c = (rest % NVC) * V;
        Vec<acc_t, V> sum;
#pragma unroll
        for (int v = 0; v < V; ++v) sum.v[v] = acc_t(0);
        for (int kc = 0; kc < 3; ++kc) {
          const int tc = e - kc;
          if (tc < 0 || tc >= t.nct) continue;
          const Vec<acc_t, V> part = load_vec<acc_t, V>(red + (tc * 9 + sr * 3 + kc) * p.CW + c);
#pragma unroll
          for (int v = 0; v < V; ++v) sum.v[v] += part.v[v];
        }
        store_vec(ws_tile + (sr * NCE + e) * p.CW + c, sum);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// y[:, p] = sum over valid k of A[k, p] * s[:, nbr_k(p)] (NORMALISED: of s / (den + 1e-12), s with
// the strides p.s_sc, p.s_sn; see stage_stokens): one thread per L consecutive pixels of a cell
// row (L divides w and W, and A and y are aligned to L elements: upsample_impl), their 9 x L
// weights in registers (invalid ones zeroed), the super tokens from shared memory, V channels at
// a time: each vector read of s serves L pixels, and y is written L pixels per store through a
// pointer stepped by a channel plane. Until 2026-12-07 one pixel a thread: about 32 sm_90
// instructions per output (9 multiply-adds; each scalar store with its own 64-bit address
// arithmetic and bounds branch), 36.6 us at stage 1 on an H200 (float32) against ~14 us of
// traffic.
template <typename scalar_t, bool NORMALISED, typename pixel_t = scalar_t, int L = 1>
__global__ void __launch_bounds__(kMaxThreads) upsample_kernel(
    const UpsampleParams<scalar_t, NORMALISED, pixel_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = VecWidth<acc_t>::value;

  STVIT_DYNAMIC_SMEM(smem);
  acc_t* s_sh = reinterpret_cast<acc_t*>(smem);

  const TileInfo t = tile_of(p);
  const int BS = blockDim.x;
  const int NCE = p.NC + 2;
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;
  const scalar_t* s_b = p.s + t.b * p.C * static_cast<int64_t>(p.hh) * p.ww;
  pixel_t* y_b = p.y + t.b * p.C * HW;
  const int TWG = t.TW / L;  // groups of L pixels per tile row
  const int TG = p.h * TWG;

  for (int gb = 0; gb < TG; gb += BS) {
    const int gi = gb + threadIdx.x;
    const bool active = gi < TG;
    int tc = 0;
    int64_t pix = 0;
    acc_t a[9][L];
#pragma unroll
    for (int k = 0; k < 9; ++k) {
#pragma unroll
      for (int l = 0; l < L; ++l) a[k][l] = acc_t(0);
    }
    if (active) {
      const int r = gi / TWG;
      const int col = (gi - r * TWG) * L;
      tc = col / p.w;
      pix = static_cast<int64_t>(t.ci * p.h + r) * p.W + t.cj0 * p.w + col;
      const scalar_t* Ap = p.A_in + t.b * 9 * HW + pix;
      const int cj = t.cj0 + tc;
#pragma unroll
      for (int k = 0; k < 9; ++k) {
        if (neighbour_valid(k, t.ci, cj, p.hh, p.ww)) {
          const Vec<scalar_t, L> av = load_vec<scalar_t, L>(Ap + k * HW);
#pragma unroll
          for (int l = 0; l < L; ++l) a[k][l] = static_cast<acc_t>(av.v[l]);
        }
      }
    }
    const bool restage = (p.C > p.CK) || (gb == 0);
    for (int c0 = 0; c0 < p.C; c0 += p.CK) {
      if (restage) {
        __syncthreads();
        stage_stokens<NORMALISED>(s_sh, s_b, c0, p, t);
        __syncthreads();
      }
      if (active) {
        const int nv = imin(p.CK, p.C - c0);
        pixel_t* yp = y_b + c0 * HW + pix;
        const acc_t* s_tc = s_sh + tc * p.SK;
        for (int cc = 0; cc < nv; cc += V) {
          acc_t out[V][L];
#pragma unroll
          for (int v = 0; v < V; ++v) {
#pragma unroll
            for (int l = 0; l < L; ++l) out[v][l] = acc_t(0);
          }
#pragma unroll
          for (int k = 0; k < 9; ++k) {
            const Vec<acc_t, V> sv = load_vec<acc_t, V>(s_tc + ((k / 3) * NCE + k % 3) * p.SK + cc);
#pragma unroll
            for (int v = 0; v < V; ++v) {
#pragma unroll
              for (int l = 0; l < L; ++l) out[v][l] += a[k][l] * sv.v[v];
            }
          }
          const int nc = imin(V, nv - cc);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if (v < nc) {
              Vec<pixel_t, L> o;
#pragma unroll
              for (int l = 0; l < L; ++l) {
                o.v[l] = static_cast<pixel_t>(static_cast<scalar_t>(out[v][l]));
              }
              store_vec(yp, o);
            }
            yp += HW;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// body(idx) for the outputs idx < total, a grid-stride loop over the threads of the grid, with idx
// (and so the index math of the body, which takes its type) a uint32_t where the outputs are fewer
// than 2^31 (the usual case: 32-bit divisions are a few instructions each, 64-bit ones a
// subroutine of ~70 on sm_90; in 64 bits the index math was most of reduce's code, and pool's loop
// called the subroutine twice per output, for 4 vector loads and 16 adds at STViT stage 2), else
// an int64_t.
template <typename Body>
__device__ __forceinline__ void for_each_output(int64_t total, const Body& body) {
  const auto loop = [&](auto n) {
    using I = decltype(n);
    const I stride = static_cast<I>(gridDim.x) * blockDim.x;
    for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += stride) {
      body(idx);
    }
  };
  if (total < (int64_t(1) << 31)) {
    loop(static_cast<uint32_t>(total));
  } else {
    loop(total);
  }
}

// num[b, c, u, v] (c < C) and den[b, 0, u, v] (c == C): the sum of the workspace slots that point
// at super token (u, v), in a fixed order: source cell row u+1, u, u-1; within a row, the tile to
// the left (when v is its tile's first column), v's own tile, the tile to the right (when v is
// its tile's last column). One thread per output, consecutive threads along c (coalesced reads,
// and coalesced writes where num is token-major).
template <typename scalar_t>
struct ReduceParams {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* ws = nullptr;
  scalar_t* num = nullptr;
  scalar_t* den = nullptr;
  // num's strides (elements) of a channel and of a token of the hh x ww grid: (hh * ww, 1)
  // contiguous, (1, C) token-major (channels_last, the layout the refine's products read)
  int64_t num_sc = 0, num_sn = 1;
  int64_t B = 0;
  int C = 0, hh = 0, ww = 0, NC = 1, NT = 1, CW = 0;
  // write num / (den + 1e-12) (the updated super tokens, divided in acc_t) instead of num
  bool normalise = false;
  // write 1 instead of den (sta_backward: den of the gradient's aggregation has no use there, and
  // a vector of B * hh * ww ones gives the refine's bias gradients as matrix-vector products)
  bool den_ones = false;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) reduce_kernel(const ReduceParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int NCE = p.NC + 2;
  const int64_t tile_sz = static_cast<int64_t>(3) * NCE * p.CW;
  const int64_t total = p.B * p.hh * p.ww * (static_cast<int64_t>(p.C) + 1);
  // output idx: (b, u, v, c), c fastest
  for_each_output(total, [&](auto idx) {
    using I = decltype(idx);
    const I C1 = static_cast<I>(p.C) + 1, ww = static_cast<I>(p.ww), hh = static_cast<I>(p.hh);
    I cell = idx / C1;
    const int c = static_cast<int>(idx - cell * C1);
    I rest = cell / ww;
    const int v = static_cast<int>(cell - rest * ww);
    const int64_t b = static_cast<int64_t>(rest / hh);
    const int u = static_cast<int>(rest - static_cast<I>(b) * hh);
    const int T0 = v / p.NC;
    const int cv = v - T0 * p.NC;
    // the slots of column `col` (a channel, or C for den) that point at super token (u, v)
    const auto slot_sum = [&](int col) {
      acc_t sum = acc_t(0);
#pragma unroll
      for (int sr = 0; sr < 3; ++sr) {
        const int ci = u + 1 - sr;  // source cell row: its slot row sr points at row ci + sr - 1 = u
        if (ci < 0 || ci >= p.hh) continue;
        const acc_t* row = p.ws + (b * p.hh + ci) * p.NT * tile_sz + col;
        if (cv == 0 && T0 > 0) sum += row[(T0 - 1) * tile_sz + (sr * NCE + p.NC + 1) * p.CW];
        sum += row[T0 * tile_sz + (sr * NCE + cv + 1) * p.CW];
        if (cv == p.NC - 1 && T0 + 1 < p.NT) sum += row[(T0 + 1) * tile_sz + (sr * NCE) * p.CW];
      }
      return sum;
    };
    acc_t sum = slot_sum(c);
    if (c < p.C) {
      if (p.normalise) sum = sum / (slot_sum(p.C) + acc_t(1e-12));
      p.num[b * p.C * p.hh * p.ww + c * p.num_sc + (static_cast<int64_t>(u) * p.ww + v) * p.num_sn] =
          static_cast<scalar_t>(sum);
    } else {
      p.den[(b * p.hh + u) * p.ww + v] = p.den_ones ? scalar_t(1) : static_cast<scalar_t>(sum);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// s[b, c, u, v] = the mean of cell (u, v) of x[b, c] (pool: the module's initial super tokens, as
// avg_pool2d): one thread per output; its h rows of w consecutive values are read as vectors of L
// elements (the launch picks the widest L of at most 16 bytes that divides w and W and the
// pointer's alignment), kStageLoads (8) loads in flight at a time; summed row by row, left to
// right, in acc_t.
// Consecutive threads take consecutive cells of a row: every vector load of a warp reads whole
// 32-byte sectors, or halves of sectors that its next load reads from L1.
template <typename scalar_t, typename pixel_t = scalar_t>
struct PoolParams {
  const pixel_t* x = nullptr;   // [B, C, H, W] (pixel_t: as in CellParams)
  scalar_t* s = nullptr;        // [B, C, hh, ww]
  int64_t total = 0;            // B * C * hh * ww
  int H = 0, W = 0, h = 1, w = 1, hh = 0, ww = 0;
};

template <typename scalar_t, int L, typename pixel_t = scalar_t>
__global__ void __launch_bounds__(kMaxThreads) pool_kernel(const PoolParams<scalar_t, pixel_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int nv = p.w / L;  // vectors per row of a cell
  const int n = p.h * nv;  // vectors per cell
  const acc_t count = static_cast<acc_t>(p.h * p.w);
  // output idx: (b * C + c, u, v), v fastest
  for_each_output(p.total, [&](auto idx) {
    using I = decltype(idx);
    const I ww = static_cast<I>(p.ww), hh = static_cast<I>(p.hh);
    const I rest = idx / ww;
    const int v = static_cast<int>(idx - rest * ww);
    const I bc = rest / hh;
    const int u = static_cast<int>(rest - bc * hh);
    const pixel_t* cell = p.x +
                          (static_cast<int64_t>(bc) * p.H + static_cast<int64_t>(u) * p.h) * p.W +
                          static_cast<int64_t>(v) * p.w;
    acc_t sum = acc_t(0);
    int r = 0, k = 0;  // the next vector: the k-th of row r
    for (int i0 = 0; i0 < n; i0 += kStageLoads) {
      // kStageLoads loads issued before any is summed
      Vec<pixel_t, L> val[kStageLoads];
#pragma unroll
      for (int j = 0; j < kStageLoads; ++j) {
        if (i0 + j < n) {
          val[j] = load_vec<pixel_t, L>(cell + r * p.W + k * L);
          if (++k == nv) {
            k = 0;
            ++r;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kStageLoads; ++j) {
        if (i0 + j < n) {
#pragma unroll
          for (int l = 0; l < L; ++l) sum += static_cast<acc_t>(as_scalar<scalar_t>(val[j].v[l]));
        }
      }
    }
    p.s[idx] = static_cast<scalar_t>(sum / count);
  });
}

// ------------------------------------------------------------------------------------------------
// Host-side planning: tile width, block size, channel chunk and shared-memory layout.

struct PlanLimits {
  int max_threads = kMaxThreads;
  size_t smem_soft = 48 * 1024;  // what a block gets without opting in
  size_t smem_max = 48 * 1024;   // the device's opt-in limit (sharedMemPerBlockOptin)
  // what an aggregating block may take so that 4 of them share an SM (sharedMemPerMultiprocessor
  // / 4 less the 1 KB the driver keeps per block: 55 KB on sm_90, 40 KB on sm_80); when it is
  // above smem_soft, the x cache and every channel of the staged super tokens fit in one block
  // for C = 64 at 8x8 cells and C = 128 at 4x4 cells (the STViT stages 1 and 2)
  size_t smem_block = 48 * 1024;
  int max_chunk = 1 << 30;       // cap on CK (tests force small chunks with it)
  bool cache_x = true;           // keep x on chip when it fits (tests turn it off)
  int tile_pixels = 1024;        // pixels per tile aimed at when aggregating (see plan_cells)
  bool cell_units = true;        // cell units where they fit (tests and benchmarks turn it off)
  int upsample_pixels = 4;       // the most pixels per thread of the upsample (1, 2 or 4)
};

struct Plan {
  int BS = 32, NC = 1, NT = 1, CK = 0, SK = 0, XC = 0, CW = 0;
  bool cache_x = false;
  // aggregating: a block has a thread per (cell, channel vector) of its tile (NC * CW / V <= BS):
  // each keeps its 9 slots' sums in registers over the tile's batches, and the block adds them up
  // into the 3 x (NC+2) slots at the end, through 9 * NC * CW acc_t of shared memory at x_off
  // (the x cache's region, or more). Per pixel and channel vector: 1 read of x from shared memory
  // for 9 x V multiply-adds, against 3 reads (one per column unit) for 3 x V each without them
  bool cell_units = false;
  int a_off = 0, x_off = 0;
  size_t smem = 0;
};

enum PlanKind : int { kPlanStokens = 0, kPlanAggregate = 1, kPlanFused = 2 };

constexpr size_t kStokenSmem = 16 * 1024;  // shared memory aimed at for the staged super tokens

inline size_t align16(size_t n) { return (n + 15) & ~static_cast<size_t>(15); }

// kind: kPlanStokens (affinity, upsample: staged super tokens only), kPlanAggregate (A and x
// tiles), kPlanFused (all three). acc_size / scalar_size: sizeof the accumulation / storage type.
// px: pixels per thread (the upsample's L; 1 for every other kernel).
//
// Affinity and upsample: a tile is at most the pixels of one block of threads. Aggregating
// kernels: a tile aims at L.tile_pixels pixels whatever the block size (several batches per tile,
// partial sums carried in the workspace, which stays in L2 between batches), because the workspace
// traffic per cell falls with the tile width: 3 * (NC + 2) / NC slots of C+1 values per cell, 9
// for NC = 1, 3 for a full row of cells. The block size is the largest that keeps the batch's x on chip.
inline Plan plan_cells(int kind, int C, int h, int w, int ww, int acc_size, int scalar_size,
                       const PlanLimits& L, int px = 1) {
  const int V = 16 / acc_size;
  const int P = h * w;
  const bool need_s = kind != kPlanAggregate;
  const bool need_a = kind != kPlanStokens;

  auto attempt_units = [&](int cand, bool cache, size_t limit, bool units, Plan& pl) -> bool {
    pl = Plan();
    const int target = need_a ? imax(cand, L.tile_pixels) : cand * px;
    pl.NC = P >= target ? 1 : imin(ww, imin(target / P, kMaxCellsPerTile));
    pl.NT = (ww + pl.NC - 1) / pl.NC;
    pl.CW = round_up(C + 1, V);
    pl.XC = (pl.CW / V) % 2 ? pl.CW : pl.CW + V;  // XC / V odd: conflict-free vector reads of x rows
    pl.cache_x = cache;
    // a thread per pixel of the tile, or, with cell units, per unit where they are more (small
    // cells, many channels: STViT stage 2's 7 x 33 units for 112 pixels) and the block holds them
    const int pixels = (pl.NC * P + px - 1) / px;
    const bool want_units = units && need_a && L.cell_units;
    const int nunits = want_units ? pl.NC * units_per_cell(C, pl.CW, V, pl.NC, cand) : 0;
    pl.BS = imin(cand, round_up(imax(nunits, pixels), 32));
    const int per_cell = want_units ? units_per_cell(C, pl.CW, V, pl.NC, pl.BS) : 0;
    pl.cell_units = per_cell > 0;
    // A_sh and the x cache hold a row per pixel of a batch: min(BS, the tile's pixels)
    const size_t rows = imin(pl.BS, pl.NC * P);
    // A_sh, then (cell units without den's vector) den's 9 x NC sums (the kernel's den_sh)
    const bool den_apart = pl.cell_units && per_cell != pl.CW / V;
    const size_t a_bytes =
        need_a ? align16(static_cast<size_t>(a_rows_size(static_cast<int>(rows))) * scalar_size) +
                     (den_apart ? static_cast<size_t>(round_up(9 * pl.NC, V)) * acc_size : 0)
               : 0;
    const size_t cache_bytes = cache ? align16(rows * pl.XC * acc_size) : 0;
    const size_t red_bytes =
        pl.cell_units ? align16(static_cast<size_t>(9) * pl.NC * pl.CW * acc_size) : 0;
    const size_t x_bytes = imax(cache_bytes, red_bytes);  // the x cache, then the units' sums
    size_t s_bytes = 0;
    if (need_s) {
      const size_t used = a_bytes + x_bytes;
      if (used >= limit) return false;
      const size_t budget = imin(kStokenSmem, limit - used);
      const size_t per_channel = static_cast<size_t>(3) * (pl.NC + 2) * acc_size;
      const int fit = static_cast<int>(budget / per_channel) - V;  // SK = CK + V
      int ck = fit / (2 * V) * (2 * V);
      ck = imin(ck, round_up(imax(C, 1), 2 * V));
      ck = imin(ck, imax(L.max_chunk / (2 * V) * (2 * V), 2 * V));
      pl.CK = imax(ck, 2 * V);
      pl.SK = pl.CK + V;  // SK / V odd: conflict-free when a warp spans several cells
      s_bytes = align16(per_channel * pl.SK);
    } else {
      pl.CK = 2 * V;
      pl.SK = 3 * V;
    }
    pl.a_off = static_cast<int>(s_bytes);
    pl.x_off = static_cast<int>(s_bytes + a_bytes);
    pl.smem = s_bytes + a_bytes + x_bytes;
    return pl.smem <= limit;
  };
  // with cell units where they fit, else without them (the same block and tile)
  auto attempt = [&](int cand, bool cache, size_t limit, Plan& pl) -> bool {
    return attempt_units(cand, cache, limit, true, pl) ||
           attempt_units(cand, cache, limit, false, pl);
  };

  Plan pl;
  const int top = imin(kMaxThreads, L.max_threads);
  if (!need_a) {
    attempt(top, false, imax(L.smem_soft, L.smem_max), pl);
    return pl;
  }
  // keep x on chip: the largest block that fits in smem_block (opting in above 48 KB), else opt
  // in with a small one
  const size_t block_limit = imax(L.smem_soft, imin(L.smem_block, L.smem_max));
  for (int cand = top; L.cache_x && cand >= 32; cand /= 2) {
    if (!attempt(cand, true, block_limit, pl)) continue;
    // where the largest such block is too small for cell units, a block of at least twice its
    // threads with them, in what two blocks of an SM may take (smem_block is a quarter of an
    // SM's less 1 KB): as many warps per SM, fewer batches per tile, no column units' rounds
    // (STViT stage 2, C = 128, 4x4 cells, 7 a tile: 64 threads of column units against 256 of
    // 7 x 33 cell units; stage 1 at 128^2 tokens: 128 against 256 of 16 x 16)
    const size_t pair_limit = imin(2 * (L.smem_block + 1024) - 1024, L.smem_max);
    Plan wide;
    for (int wc = top; !pl.cell_units && wc >= 2 * pl.BS; wc /= 2) {
      if (attempt_units(wc, true, pair_limit, true, wide) && wide.cell_units) return wide;
    }
    return pl;
  }
  for (int cand = imin(top, 128); L.cache_x && cand >= 32; cand /= 2) {
    if (attempt(cand, true, L.smem_max, pl)) return pl;
  }
  // very wide channels: the partial sums re-read x
  attempt(top, false, imax(L.smem_soft, L.smem_max), pl);
  return pl;
}

}  // namespace cuda
}  // namespace stvit
