// Bodies of the CPU kernels declared in kernels.h. Compiled once per instruction set: included
// by kernels_default.cpp and kernels_avx2.cpp with
//   STVIT_CPU_ISA    the namespace that holds this copy (distinct symbols per ISA), and
//   STVIT_CPU_TABLE  the KernelSet getter of kernels.h that this copy defines.
// It includes nothing itself: the including file includes every header *before* switching the
// target ISA on, so that no inline function of a header is compiled for a wider ISA than the
// build's baseline (the linker could otherwise keep that copy for every caller). No include guard
// on purpose.
//
// Vectors are GCC/Clang vector extensions of 32 bytes (8 floats or 4 doubles): one AVX2 register,
// two SSE registers in the baseline build.

namespace stvit {
namespace cpu {
namespace STVIT_CPU_ISA {

#define STVIT_INLINE inline __attribute__((always_inline))

typedef float vfloat __attribute__((vector_size(32)));
typedef double vdouble __attribute__((vector_size(32)));
typedef int32_t vint32 __attribute__((vector_size(32)));
typedef uint32_t vuint32 __attribute__((vector_size(32)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef vfloat type;
  static constexpr int N = 8;
};
template <>
struct Vec<double> {
  typedef vdouble type;
  static constexpr int N = 4;
};

template <typename T>
STVIT_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
STVIT_INLINE void vstore(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// d[j] = s[j] converted, for j < n (one row of a cell).
template <typename To, typename From>
STVIT_INLINE void convert_row(To* __restrict d, const From* __restrict s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = static_cast<To>(s[j]);
}

template <typename T>
STVIT_INLINE typename Vec<T>::type vsplat(T a) {
  return typename Vec<T>::type{} + a;
}

// Lane-wise max; a NaN in `a` is kept (and a NaN anywhere in a softmax row makes the row NaN
// through exp anyway).
template <typename V>
STVIT_INLINE V vmax(V a, V b) {
  const auto b_larger = a < b;
  typedef decltype(b_larger) M;
  return (V)(((M)a & ~b_larger) | ((M)b & b_larger));
}

// Sum of the lanes, always in the same order.
template <typename T>
STVIT_INLINE T hsum(typename Vec<T>::type v) {
  T s = v[0];
  for (int l = 1; l < Vec<T>::N; ++l) s += v[l];
  return s;
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define STVIT_HAVE_SHUFFLEVECTOR 1
#endif
#endif

// out[i] = the sum of the lanes of v[i], for N vectors of N lanes: a transpose-and-add tree (the
// same fixed order every time), far cheaper than N separate lane sums.
STVIT_INLINE vfloat transpose_sum(const vfloat* v) {
#ifdef STVIT_HAVE_SHUFFLEVECTOR
  vfloat a[4], b[2];
  for (int i = 0; i < 4; ++i) {  // a[i] = pairs of v[2i], v[2i+1] interleaved
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {  // b[i] = quarter sums of v[4i .. 4i+3]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return __builtin_shufflevector(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
#else
  vfloat out;
  for (int i = 0; i < 8; ++i) out[i] = hsum<float>(v[i]);
  return out;
#endif
}

STVIT_INLINE vdouble transpose_sum(const vdouble* v) {
#ifdef STVIT_HAVE_SHUFFLEVECTOR
  vdouble a[2];
  for (int i = 0; i < 2; ++i) {
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 4, 2, 6) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 5, 3, 7);
  }
  return __builtin_shufflevector(a[0], a[1], 0, 1, 4, 5) +
         __builtin_shufflevector(a[0], a[1], 2, 3, 6, 7);
#else
  vdouble out;
  for (int i = 0; i < 4; ++i) out[i] = hsum<double>(v[i]);
  return out;
#endif
}

// exp(x) for x <= 0, as the softmax needs it after subtracting the row max, 8 lanes at once.
// exp(x) = 2^n * e^r with n = floor(x / ln 2 + 1/2) and r = x - n ln 2 in [-ln2/2, ln2/2]; ln 2 is
// split in two (its 16 leading bits, exact when multiplied by |n| <= 126, and the rest) so that r
// carries no cancellation error; e^r comes from its Taylor series up to r^7 (truncation error
// below 1e-8 relative, under one float ulp) and 2^n from its exponent bits. Results below
// FLT_MIN (x < -126 ln 2) are flushed to 0 (the exact value is < 1.2e-38); NaN propagates.
STVIT_INLINE vfloat exp_nonpositive(vfloat x) {
  constexpr double kLn2 = 0.693147180559945309417232121458176568;
  constexpr float kLog2e = static_cast<float>(1.0 / kLn2);
  constexpr float kLn2Hi = 45426.0f / 65536.0f;
  constexpr float kLn2Lo = static_cast<float>(kLn2 - 45426.0 / 65536.0);
  constexpr float kMinArg = static_cast<float>(-126.0 * kLn2);
  constexpr int kExpBias = 127, kMantissaBits = 23;

  const vint32 underflow = x < kMinArg;
  const vint32 is_nan = x != x;
  x = (vfloat)(((vint32)x & ~underflow) | ((vint32)vsplat(kMinArg) & underflow));
  vfloat t = x * kLog2e + 0.5f;
  t = (vfloat)((vint32)t & ~is_nan);  // keep the int conversion defined; r stays NaN
  vint32 n = __builtin_convertvector(t, vint32);  // rounds toward 0 ...
  n += (__builtin_convertvector(n, vfloat) > t);  // ... so step down where that went up: floor
  const vfloat fn = __builtin_convertvector(n, vfloat);
  const vfloat r = (x - fn * kLn2Hi) - fn * kLn2Lo;
  vfloat p = vsplat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vfloat two_n = (vfloat)((vuint32)(n + kExpBias) << kMantissaBits);
  return (vfloat)((vint32)(p * two_n) & ~underflow);
}

STVIT_INLINE vdouble exp_nonpositive(vdouble x) {
  for (int l = 0; l < Vec<double>::N; ++l) x[l] = std::exp(x[l]);
  return x;
}

// The slots of a cell that lie inside the grid, by the cell's edges: `edges` bit 0 is set for a
// cell of the top grid row (its slots 0-2 point above the grid), bit 1 the bottom row (slots 6-8),
// bit 2 the left column (slots 0, 3, 6), bit 3 the right column (slots 2, 5, 8).
constexpr bool slot_in_grid(int edges, int k) {
  const int i = k / 3, j = k % 3;
  return !((i == 0 && (edges & 1)) || (i == 2 && (edges & 2)) || (j == 0 && (edges & 4)) ||
           (j == 2 && (edges & 8)));
}

template <int kEdges, int K, typename F>
STVIT_INLINE void if_in_grid(F& f) {
  if constexpr (slot_in_grid(kEdges, K)) f(std::integral_constant<int, K>{});
}

template <int kEdges, typename F, int... K>
STVIT_INLINE void for_slots_impl(F& f, std::integer_sequence<int, K...>) {
  (if_in_grid<kEdges, K>(f), ...);
}

// f(std::integral_constant<int, K>{}) for each slot K = 0..8 inside the grid, in order: the
// slots outside it (whose partial sums no super token takes, whose weights the upsampling
// ignores and whose logits are exactly 0) cost nothing. A cell of a 2x2 grid has 4 of 9.
template <int kEdges, typename F>
STVIT_INLINE void for_slots(F&& f) {
  for_slots_impl<kEdges>(f, std::make_integer_sequence<int, 9>{});
}

template <typename F, int... E>
STVIT_INLINE void with_edges_impl(int edges, F& f, std::integer_sequence<int, E...>) {
  (void)((edges == E ? (f(std::integral_constant<int, E>{}), true) : false) || ...);
}

// f(std::integral_constant<int, edges>{}): a cell's loop compiled for its edges (16 variants).
template <typename F>
STVIT_INLINE void with_edges(int edges, F&& f) {
  with_edges_impl(edges, f, std::make_integer_sequence<int, 16>{});
}

// Per-thread stack of scratch memory: Scratch buffers live in scopes, so they are released in
// the reverse order of their requests, and a kernel call takes its tiles off the top of the
// thread's arena instead of the heap (a malloc and free of tens of KiB per call cost ~10 % of a
// small call in glibc, most of it in malloc_consolidate). A request that does not fit goes to the
// heap, and the next call's arena is big enough, up to kMaxBytes: what a thread keeps is bounded
// (1 MiB holds the tiles of STViT's stages at 224², 150 KB), and a call that needs more does
// enough work for a malloc not to count.
class ScratchArena {
 public:
  static constexpr size_t kMaxBytes = size_t(1) << 20;

  static ScratchArena& local() {
    static thread_local ScratchArena arena;
    return arena;
  }

  // 64-byte aligned, `bytes` long (a multiple of 64); null: take it from the heap.
  void* push(size_t bytes) {
    if (top_ + bytes <= size_) {
      void* p = base_ + top_;
      top_ += bytes;
      return p;
    }
    want_ = std::min(kMaxBytes, std::max(want_, top_ + bytes));
    return nullptr;
  }
  void pop(size_t bytes) {
    top_ -= bytes;
    if (top_ == 0 && want_ > size_) grow();
  }
  ~ScratchArena() { ::operator delete(base_, std::align_val_t(64)); }

 private:
  void grow() {
    ::operator delete(base_, std::align_val_t(64));
    base_ = static_cast<char*>(::operator new(want_, std::align_val_t(64)));
    size_ = want_;
  }
  char* base_ = nullptr;
  size_t size_ = 0, top_ = 0, want_ = 0;
};

// A zero-filled, 64-byte aligned buffer of n elements, from the thread's ScratchArena.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : bytes_((sizeof(T) * static_cast<size_t>(n > 0 ? n : 1) + 63) / 64 * 64) {
    p_ = static_cast<T*>(ScratchArena::local().push(bytes_));
    if (p_ == nullptr) p_ = static_cast<T*>(::operator new(bytes_, std::align_val_t(64)));
    else in_arena_ = true;
    std::memset(static_cast<void*>(p_), 0, bytes_);
  }
  ~Scratch() {
    if (in_arena_) ScratchArena::local().pop(bytes_);
    else ::operator delete(p_, std::align_val_t(64));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  size_t bytes_;
  T* p_;
  bool in_arena_ = false;
};

// A band: the row of cells (b, u, 0 .. ww-1). Its pixels are, in every plane, the h image rows
// u*h .. u*h+h-1, one contiguous stretch of h*W elements: bands are read and written as whole rows.
struct Band {
  int64_t b, u, row0;  // row0: offset of the band's first pixel in an image plane
};

// Per-thread tiles of one band and the register-blocked loops over one cell of it. A cell's tile
// holds its pixels contiguously (index r * w + j), zero-padded to a whole number of vectors (npad),
// in the accumulation type: xt is [ww][C][npad], at is [ww][9][npad]. The super tokens the band's
// cells neighbour are in st, [C][3][ww + 2]: grid rows u-1, u, u+1 with a zero column on either
// side and zero rows outside the grid, so that slot k = 3 * i + j of cell v is st[c][i][v + j]
// (0 for an invalid slot) for every cell, edge cells included.
template <typename scalar_t>
struct BandTiles {
  using acc_t = acc_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  static constexpr int N = Vec<acc_t>::N;

  // Cells' tiles are `skew` elements (64 bytes) further apart than their size, so that the tiles
  // of a band do not all start at the same offset modulo 4 KiB (the stores of a band load would
  // then alias each other in the store buffer).
  static constexpr int64_t skew = 64 / sizeof(acc_t);
  // A band is a short contiguous stretch (h*W elements) of each of many planes, too short for the
  // hardware prefetchers: loads of a band prefetch the plane about this far ahead.
  static constexpr int64_t kPrefetchBytes = 16384;

  const Geometry& g;
  const int64_t np, npad, HW, xstride, astride, srow, schan;
  Scratch<acc_t> xt;  // pixel features (x, or an incoming gradient; y for the upsampling)
  Scratch<acc_t> at;  // logits / affinities
  Scratch<acc_t> st;  // neighbour super tokens of the band

  BandTiles(const Geometry& geom, bool need_pixels, bool need_stokens)
      : g(geom),
        np(geom.h * geom.w),
        npad((geom.h * geom.w + N - 1) / N * N),
        HW(geom.H * geom.W),
        xstride(geom.C * npad + skew),
        astride(9 * npad + skew),
        srow(geom.ww + 2),
        schan(3 * (geom.ww + 2)),
        xt(need_pixels ? geom.ww * xstride : 0),
        at(geom.ww * astride),
        st(need_stokens ? geom.C * 3 * (geom.ww + 2) : 0) {}

  Band locate(int64_t idx) const {
    Band band;
    band.b = idx / g.hh;
    band.u = idx - band.b * g.hh;
    band.row0 = band.u * g.h * g.W;
    return band;
  }

  acc_t* pixels(int64_t v) const { return xt.get() + v * xstride; }
  acc_t* affinity(int64_t v) const { return at.get() + v * astride; }

  // The edges of cell (u, v), as slot_in_grid takes them.
  int edges(int64_t u, int64_t v) const {
    return int(u == 0) | int(u == g.hh - 1) << 1 | int(v == 0) << 2 | int(v == g.ww - 1) << 3;
  }

  // Whether slot k of cell (u, v) is inside the grid.
  bool valid(int64_t u, int64_t v, int k) const { return slot_in_grid(edges(u, v), k); }

  int64_t planes_ahead() const {
    const int64_t bytes = g.h * g.W * static_cast<int64_t>(sizeof(scalar_t));
    return bytes >= kPrefetchBytes ? 1 : kPrefetchBytes / bytes;
  }

  // Prefetch plane k of the band.
  STVIT_INLINE void prefetch_plane(const scalar_t* img, int64_t k, const Band& band) const {
    const char* p = reinterpret_cast<const char*>(img + k * HW + band.row0);
    const int64_t bytes = g.h * g.W * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
  }

#if defined(STVIT_STREAM_F32X8)
  // d[0 .. kW) = s[0 .. kW) with streaming stores where d is aligned (the rows of an output plane
  // usually are: torch aligns allocations to 64 bytes).
  template <int kW>
  STVIT_INLINE static void stream_row(float* d, const float* s) {
    constexpr int kVec = kW == 4 ? 4 : 8;
    if ((reinterpret_cast<uintptr_t>(d) & (kVec * sizeof(float) - 1)) != 0) {
      convert_row(d, s, kW);
      return;
    }
    for (int j = 0; j < kW; j += kVec) {
      if constexpr (kVec == 4) {
        STVIT_STREAM_F32X4(d + j, s + j);
      } else {
        STVIT_STREAM_F32X8(d + j, s + j);
      }
    }
  }
#endif

  // f(k) for the planes k < planes of the band in img; with `prefetch`, plane k + planes_ahead()
  // is prefetched as plane k's turn comes (the first ones before).
  template <typename F>
  STVIT_INLINE void each_plane(const scalar_t* img, int64_t planes, const Band& band,
                               bool prefetch, F&& f) const {
    const int64_t ahead = prefetch ? planes_ahead() : 0;
    for (int64_t k = 0; k < planes && k < ahead; ++k) prefetch_plane(img, k, band);
    for (int64_t k = 0; k < planes; ++k) {
      if (ahead > 0 && k + ahead < planes) prefetch_plane(img, k + ahead, band);
      f(k);
    }
  }

  // Moves planes between an image ([planes, H, W], band rows only) and the cells' tiles (cells
  // `stride` apart); `to_tile` says which way. kW is the cell width when known at compile time
  // (the common ones, so that each row segment is a fixed-size copy), 0 otherwise.
  template <bool to_tile, int kW, typename Img, typename Tile>
  void move_impl(Img* img, int64_t planes, const Band& band, Tile* tile, int64_t stride) const {
    const int64_t w = kW > 0 ? kW : g.w;
    // loads prefetch; stores do not (outputs are usually fresh memory, which a prefetch cannot
    // bring in before the first write maps the page)
    each_plane(img, planes, band, /*prefetch=*/to_tile, [&](int64_t k) {
      for (int64_t r = 0; r < g.h; ++r) {
        Img* row = img + k * HW + band.row0 + r * g.W;
        Tile* cell = tile + k * npad + r * w;
        for (int64_t v = 0; v < g.ww; ++v) {
          if constexpr (to_tile) {
            convert_row(cell + v * stride, row + v * w, w);
#if defined(STVIT_STREAM_F32X8)
          } else if constexpr (std::is_same_v<Img, float> &&
                               (kW == 4 || (kW > 0 && kW % 8 == 0))) {
            stream_row<kW>(row + v * w, cell + v * stride);
#endif
          } else {
            convert_row(row + v * w, cell + v * stride, w);
          }
        }
      }
    });
  }

  template <bool to_tile, typename Img, typename Tile>
  void move(Img* img, int64_t planes, const Band& band, Tile* tile, int64_t stride) const {
    switch (g.w) {
      case 4: return move_impl<to_tile, 4>(img, planes, band, tile, stride);
      case 8: return move_impl<to_tile, 8>(img, planes, band, tile, stride);
      default: return move_impl<to_tile, 0>(img, planes, band, tile, stride);
    }
  }

  // tile[v][k][r * w + j] = img[k][band row r][v * w + j] for k < planes.
  void load(const scalar_t* img, int64_t planes, const Band& band, acc_t* tile,
            int64_t stride) const {
    move<true>(img, planes, band, tile, stride);
  }

  void store(scalar_t* img, int64_t planes, const Band& band, const acc_t* tile,
             int64_t stride) const {
    move<false>(img, planes, band, tile, stride);
#if defined(STVIT_STREAM_FENCE)
    STVIT_STREAM_FENCE();  // streaming stores are weakly ordered
#endif
  }

  // The band's affinities (the upsampling and the aggregation read only the slots inside the
  // grid, whatever A holds in the others).
  void load_affinity(const scalar_t* A_img, const Band& band) {
    load(A_img, 9, band, at.get(), astride);
  }

  // st from s_img, one image of super tokens [C, hh, ww] (contiguous).
  void load_stokens(const scalar_t* s_img, const Band& band) {
    load_stokens(s_img, {0, g.cells(), g.ww, 1}, band, nullptr);
  }

  // st from s_img, one image of super tokens laid out as `ss` says (its b stride unused); with
  // den_img (the image's [1, hh, ww], contiguous; else null), s / (den + 1e-12), divided in acc_t.
  void load_stokens(const scalar_t* s_img, const StokenStrides& ss, const Band& band,
                    const scalar_t* den_img) {
    const scalar_t* rows[3];
    const scalar_t* den_rows[3];
    for (int i = 0; i < 3; ++i) {
      const int64_t nu = band.u + i - 1;
      const bool inside = nu >= 0 && nu < g.hh;
      rows[i] = inside ? s_img + nu * ss.u : nullptr;
      den_rows[i] = inside && den_img != nullptr ? den_img + nu * g.ww : nullptr;
    }
    load_stokens(rows, ss.c, ss.v, den_img != nullptr ? den_rows : nullptr);
  }

  // st from the grid rows u-1, u, u+1 of the band: rows[i] is channel 0 of row u+i-1 (null
  // outside the grid), channels `ch_stride` apart and columns `col_stride`; with den_rows (row
  // u+i-1 of den, null with rows[i]), each row divided by den + 1e-12 as it is staged.
  void load_stokens(const scalar_t* const* rows, int64_t ch_stride, int64_t col_stride = 1,
                    const scalar_t* const* den_rows = nullptr) {
    acc_t* dst = st.get();
    for (int64_t ch = 0; ch < g.C; ++ch) {
      for (int i = 0; i < 3; ++i) {
        acc_t* d = dst + ch * schan + i * srow;
        if (rows[i] == nullptr) {
          for (int64_t j = 0; j < srow; ++j) d[j] = acc_t(0);
          continue;
        }
        d[0] = d[srow - 1] = acc_t(0);
        const scalar_t* src = rows[i] + ch * ch_stride;
        if (col_stride == 1) {
          convert_row(d + 1, src, g.ww);
        } else {
          for (int64_t j = 0; j < g.ww; ++j) d[1 + j] = static_cast<acc_t>(src[j * col_stride]);
        }
        if (den_rows == nullptr) continue;
        const scalar_t* den = den_rows[i];
        for (int64_t j = 0; j < g.ww; ++j) d[1 + j] /= static_cast<acc_t>(den[j]) + acc_t(1e-12);
      }
    }
  }

  // a[k][p] = scale * sum_c s_k[c] * x[c][p] for cell v, exactly 0 for an invalid slot.
  void logits(int64_t u, int64_t v, const acc_t* x, acc_t* a, acc_t scale) const {
    with_edges(edges(u, v), [&](auto e) { logits_in<decltype(e)::value>(v, x, a, scale); });
    for (int k = 0; k < 9; ++k) {
      if (!valid(u, v, k)) std::memset(a + k * npad, 0, sizeof(acc_t) * npad);
    }
  }

  // logits for the slots inside the grid of a cell with these edges
  template <int kEdges>
  void logits_in(int64_t v, const acc_t* x, acc_t* a, acc_t scale) const {
    // slot 3 * i + j of channel c: rows[i][c * schan + j]
    const acc_t* rows[3] = {st.get() + v, st.get() + v + srow, st.get() + v + 2 * srow};
    const int64_t C = g.C, cs = schan, n = npad;
    for (int64_t p0 = 0; p0 < n; p0 += N) {
      V acc[9];
      for_slots<kEdges>([&](auto k) { acc[k] = V{}; });
      for (int64_t ch = 0; ch < C; ++ch) {
        const V xv = vload(x + ch * n + p0);
        const int64_t o = ch * cs;
        for_slots<kEdges>([&](auto k) { acc[k] += xv * rows[k / 3][o + k % 3]; });
      }
      for_slots<kEdges>([&](auto k) { vstore(a + k * n + p0, acc[k] * scale); });
    }
  }

  // Softmax over the 9 slots of every pixel, in place (pad lanes included).
  void softmax(acc_t* a) const {
    for (int64_t p0 = 0; p0 < npad; p0 += N) {
      V l[9];
      for (int k = 0; k < 9; ++k) l[k] = vload(a + k * npad + p0);
      V m = l[0];
      for (int k = 1; k < 9; ++k) m = vmax(m, l[k]);
      V sum = V{};
      for (int k = 0; k < 9; ++k) {
        l[k] = exp_nonpositive(l[k] - m);
        sum += l[k];
      }
      const V inv = acc_t(1) / sum;  // one division, 9 products
      for (int k = 0; k < 9; ++k) vstore(a + k * npad + p0, l[k] * inv);
    }
  }

  // Zero the pad lanes, so that they add nothing to the partial sums.
  void clear_pad(acc_t* a) const {
    for (int k = 0; k < 9; ++k) {
      for (int64_t p = np; p < npad; ++p) a[k * npad + p] = acc_t(0);
    }
  }

  // acc[k] = sum over the pixel chunks of a[k][chunk] * x[chunk] (x: one channel of the tile),
  // for the slots inside the grid.
  template <int kEdges>
  STVIT_INLINE void dot9(const acc_t* x, const acc_t* a, V* acc) const {
    for_slots<kEdges>([&](auto k) { acc[k] = V{}; });
    for (int64_t p0 = 0; p0 < npad; p0 += N) {
      const V xv = vload(x + p0);
      for_slots<kEdges>([&](auto k) { acc[k] += vload(a + k * npad + p0) * xv; });
    }
  }

  // pnum[k][c] = sum_p a[k][p] * x[c][p], pden[k] = sum_p a[k][p], for the slots of cell (u, v)
  // inside the grid (the others are left as they are: no super token takes them). Channels go
  // in blocks of N whose per-lane sums are reduced together (transpose_sum).
  void partials(int64_t u, int64_t v, const acc_t* x, const acc_t* a, acc_t* pnum,
                acc_t* pden) const {
    with_edges(edges(u, v), [&](auto e) { partials_in<decltype(e)::value>(x, a, pnum, pden); });
  }

  template <int kEdges>
  void partials_in(const acc_t* x, const acc_t* a, acc_t* pnum, acc_t* pden) const {
    V block[9][N];
    V acc[9];
    int64_t ch0 = 0;
    for (; ch0 + N <= g.C; ch0 += N) {
      for (int i = 0; i < N; ++i) {
        dot9<kEdges>(x + (ch0 + i) * npad, a, acc);
        for_slots<kEdges>([&](auto k) { block[k][i] = acc[k]; });
      }
      for_slots<kEdges>([&](auto k) { vstore(pnum + k * g.C + ch0, transpose_sum(block[k])); });
    }
    for (; ch0 < g.C; ++ch0) {
      dot9<kEdges>(x + ch0 * npad, a, acc);
      for_slots<kEdges>([&](auto k) { pnum[k * g.C + ch0] = hsum<acc_t>(acc[k]); });
    }
    for_slots<kEdges>([&](auto k) {
      V sum = V{};
      for (int64_t p0 = 0; p0 < npad; p0 += N) sum += vload(a + k * npad + p0);
      pden[k] = hsum<acc_t>(sum);
    });
  }

  // y[c][p] = sum_k a[k][p] * s_k[c] over the slots of cell (u, v) inside the grid, in order k =
  // 0..8, handed to `put(c, p0, yv)` one vector of pixels p0 .. p0+N-1 at a time.
  template <typename Put>
  STVIT_INLINE void upsample(int64_t u, int64_t v, const acc_t* a, Put put) const {
    with_edges(edges(u, v), [&](auto e) { upsample_in<decltype(e)::value>(v, a, put); });
  }

  template <int kEdges, typename Put>
  STVIT_INLINE void upsample_in(int64_t v, const acc_t* a, Put& put) const {
    const acc_t* rows[3] = {st.get() + v, st.get() + v + srow, st.get() + v + 2 * srow};
    const int64_t C = g.C, cs = schan, n = npad;  // (the stores through put may alias members)
    for (int64_t p0 = 0; p0 < n; p0 += N) {
      V ak[9];
      for_slots<kEdges>([&](auto k) { ak[k] = vload(a + k * n + p0); });
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t o = ch * cs;
        V yv = V{};
        for_slots<kEdges>([&](auto k) { yv += ak[k] * rows[k / 3][o + k % 3]; });
        put(ch, p0, yv);
      }
    }
  }

  // Whether the upsampling of cells of (compile-time) width kW writes straight to the output: when
  // kW is a multiple or a divisor of N, every vector of a cell's pixels is whole row segments.
  template <int kW>
  static constexpr bool direct_upsample() {
#if defined(STVIT_STREAM_F32X8)
    // float cells of 4 or 8k pixels: the band store streams, which beats writing from registers
    if (std::is_same_v<scalar_t, float> && (kW == 4 || (kW > 0 && kW % 8 == 0))) return false;
#endif
    return kW > 0 && (kW % N == 0 || N % kW == 0);
  }

  // The upsampling of a band, written to y_img (one image [C, H, W]) straight from the registers
  // (direct_upsample) or through the tile xt and a band store.
  template <int kW>
  void upsample_band(const Band& band, scalar_t* y_img) const {
    if constexpr (direct_upsample<kW>()) {
      constexpr int kSeg = kW < N ? kW : N;  // elements per row segment of a vector
      for (int64_t v = 0; v < g.ww; ++v) {
        scalar_t* yv0 = y_img + band.row0 + v * kW;
        upsample(band.u, v, affinity(v), [&](int64_t ch, int64_t p0, V yv) {
          acc_t lanes[N];
          vstore(lanes, yv);
          for (int q = 0; q < N; q += kSeg) {
            const int64_t p = p0 + q;
            if (p >= np) break;
            convert_row(yv0 + ch * HW + (p / kW) * g.W + p % kW, lanes + q, kSeg);
          }
        });
      }
    } else {
      for (int64_t v = 0; v < g.ww; ++v) {
        acc_t* yt = pixels(v);
        upsample(band.u, v, affinity(v),
                 [&](int64_t ch, int64_t p0, V yv) { vstore(yt + ch * npad + p0, yv); });
      }
      store(y_img, g.C, band, xt.get(), xstride);
    }
  }
};

// out[v] = the mean of cell v of one grid row of one plane (src: the row's first image row, W
// apart), for v < ww: its h image rows summed column-wise into cols (W elements), then each group
// of w columns, in that order (pool and the pooled affinity_partials share it: the same values).
template <typename scalar_t>
STVIT_INLINE void pool_row(const Geometry& g, const scalar_t* __restrict src,
                           scalar_t* __restrict out, acc_type<scalar_t>* __restrict cols) {
  using acc_t = acc_type<scalar_t>;
  const int64_t W = g.W, h = g.h, w = g.w, ww = g.ww;
  const acc_t inv = acc_t(1) / static_cast<acc_t>(h * w);
  for (int64_t j = 0; j < W; ++j) cols[j] = static_cast<acc_t>(src[j]);
  for (int64_t r = 1; r < h; ++r) {
    const scalar_t* row = src + r * W;
    for (int64_t j = 0; j < W; ++j) cols[j] += static_cast<acc_t>(row[j]);
  }
  for (int64_t v = 0; v < ww; ++v) {
    acc_t sum = acc_t(0);
    for (int64_t j = 0; j < w; ++j) sum += cols[v * w + j];
    out[v] = static_cast<scalar_t>(sum * inv);
  }
}

template <typename scalar_t>
void pool_bands(const Geometry& g, const scalar_t* x, scalar_t* s, int64_t begin, int64_t end) {
  Scratch<acc_type<scalar_t>> cols(g.W);
  for (int64_t idx = begin; idx < end; ++idx) {  // idx = plane * hh + u
    pool_row(g, x + idx * g.h * g.W, s + idx * g.ww, cols.get());
  }
}

// The cell means of the grid rows a band needs (u-1, u, u+1), pooled from x as the bands go by:
// three rows of [C][ww] means, each kept until a band no longer needs it.
template <typename scalar_t>
class PooledRows {
 public:
  explicit PooledRows(const Geometry& g) : g_(g), rows_(3 * g.C * g.ww), cols_(g.W) {}

  // rows[i] = the means of grid row u+i-1 of image b (null outside the grid), channels ww apart.
  // A row's pooling reads a band of every plane, prefetched as the band loads prefetch (`t`).
  void get(const BandTiles<scalar_t>& t, int64_t b, int64_t u, const scalar_t* x,
           const scalar_t** rows) {
    for (int i = 0; i < 3; ++i) {
      const int64_t r = u + i - 1;
      if (r < 0 || r >= g_.hh) {
        rows[i] = nullptr;
        continue;
      }
      const int slot = static_cast<int>(r % 3);
      scalar_t* out = rows_.get() + slot * g_.C * g_.ww;
      if (tag_b_[slot] != b || tag_r_[slot] != r) {
        const scalar_t* img = x + b * g_.C * t.HW;
        const Band band{b, r, r * g_.h * g_.W};
        t.each_plane(img, g_.C, band, /*prefetch=*/true, [&](int64_t ch) {
          pool_row(g_, img + ch * t.HW + band.row0, out + ch * g_.ww, cols_.get());
        });
        tag_b_[slot] = b;
        tag_r_[slot] = r;
      }
      rows[i] = out;
    }
  }

 private:
  const Geometry& g_;
  Scratch<scalar_t> rows_;
  Scratch<acc_type<scalar_t>> cols_;
  int64_t tag_b_[3] = {-1, -1, -1}, tag_r_[3] = {-1, -1, -1};
};

template <typename scalar_t>
void affinity_bands(const Geometry& g, const scalar_t* x, const scalar_t* s, scalar_t* A,
                    acc_type<scalar_t> scale, bool softmax, int64_t begin, int64_t end) {
  BandTiles<scalar_t> t(g, /*need_pixels=*/true, /*need_stokens=*/true);
  for (int64_t idx = begin; idx < end; ++idx) {
    const Band band = t.locate(idx);
    t.load(x + band.b * g.C * t.HW, g.C, band, t.xt.get(), t.xstride);
    t.load_stokens(s + band.b * g.C * g.cells(), band);
    for (int64_t v = 0; v < g.ww; ++v) {
      t.logits(band.u, v, t.pixels(v), t.affinity(v), scale);
      if (softmax) t.softmax(t.affinity(v));
    }
    t.store(A + band.b * 9 * t.HW, 9, band, t.at.get(), t.astride);
  }
}

template <typename scalar_t>
void partial_bands(const Geometry& g, const scalar_t* x, const scalar_t* A,
                   acc_type<scalar_t>* pnum, acc_type<scalar_t>* pden, int64_t begin,
                   int64_t end) {
  BandTiles<scalar_t> t(g, /*need_pixels=*/true, /*need_stokens=*/false);
  for (int64_t idx = begin; idx < end; ++idx) {
    const Band band = t.locate(idx);
    t.load(x + band.b * g.C * t.HW, g.C, band, t.xt.get(), t.xstride);
    t.load_affinity(A + band.b * 9 * t.HW, band);
    for (int64_t v = 0; v < g.ww; ++v) {
      const int64_t cell = idx * g.ww + v;
      t.partials(band.u, v, t.pixels(v), t.affinity(v), pnum + cell * 9 * g.C, pden + cell * 9);
    }
  }
}

template <typename scalar_t>
void affinity_partial_bands(const Geometry& g, const scalar_t* x, const scalar_t* s,
                            scalar_t* A, acc_type<scalar_t> scale, acc_type<scalar_t>* pnum,
                            acc_type<scalar_t>* pden, int64_t begin, int64_t end) {
  BandTiles<scalar_t> t(g, /*need_pixels=*/true, /*need_stokens=*/true);
  std::optional<PooledRows<scalar_t>> pooled;
  if (s == nullptr) pooled.emplace(g);
  for (int64_t idx = begin; idx < end; ++idx) {
    const Band band = t.locate(idx);
    if (pooled) {  // (row u+1's pooling reads the next band's x: in the caches for its turn)
      const scalar_t* rows[3];
      pooled->get(t, band.b, band.u, x, rows);
      t.load_stokens(rows, g.ww);
    } else {
      t.load_stokens(s + band.b * g.C * g.cells(), band);
    }
    t.load(x + band.b * g.C * t.HW, g.C, band, t.xt.get(), t.xstride);
    for (int64_t v = 0; v < g.ww; ++v) {  // each cell while its tile is in L1
      const int64_t cell = idx * g.ww + v;
      t.logits(band.u, v, t.pixels(v), t.affinity(v), scale);
      t.softmax(t.affinity(v));
      t.clear_pad(t.affinity(v));  // (the store below writes the real pixels only)
      t.partials(band.u, v, t.pixels(v), t.affinity(v), pnum + cell * 9 * g.C, pden + cell * 9);
    }
    t.store(A + band.b * 9 * t.HW, 9, band, t.at.get(), t.astride);
  }
}

// num[b, :, u, v] / den[b, 0, u, v] = the partials that the 3x3 cells around (u, v) hold for it:
// cell (u - di, v - dj), slot k = (di + 1) * 3 + (dj + 1), added in the order k = 0..8. One grid
// row of super tokens (b, u) at a time, so that num is written ww contiguous values per channel.
template <typename scalar_t>
void reduce_stokens(const Geometry& g, const acc_type<scalar_t>* pnum,
                    const acc_type<scalar_t>* pden, scalar_t* num, scalar_t* den, bool normalise,
                    int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cells = g.cells(), C = g.C;
  Scratch<acc_t> rows(g.ww * C);  // [ww][C] sums of the current grid row
  Scratch<acc_t> den_eps(g.ww);   // den + 1e-12 of the row's super tokens (normalise)
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t b = idx / g.hh, u = idx - b * g.hh;
    for (int64_t v = 0; v < g.ww; ++v) {
      acc_t* acc = rows.get() + v * C;
      for (int64_t ch = 0; ch < C; ++ch) acc[ch] = acc_t(0);
      acc_t d = acc_t(0);
      for (int k = 0; k < 9; ++k) {
        const int64_t su = u - (k / 3 - 1), sv = v - (k % 3 - 1);
        if (su < 0 || su >= g.hh || sv < 0 || sv >= g.ww) continue;
        const int64_t src = b * cells + su * g.ww + sv;
        const acc_t* p = pnum + (src * 9 + k) * C;
        for (int64_t ch = 0; ch < C; ++ch) acc[ch] += p[ch];
        d += pden[src * 9 + k];
      }
      den[idx * g.ww + v] = static_cast<scalar_t>(d);
      den_eps.get()[v] = d + acc_t(1e-12);
    }
    for (int64_t ch = 0; ch < C; ++ch) {
      scalar_t* dst = num + (b * C + ch) * cells + u * g.ww;
      if (normalise) {
        for (int64_t v = 0; v < g.ww; ++v)
          dst[v] = static_cast<scalar_t>(rows.get()[v * C + ch] / den_eps.get()[v]);
      } else {
        for (int64_t v = 0; v < g.ww; ++v) dst[v] = static_cast<scalar_t>(rows.get()[v * C + ch]);
      }
    }
  }
}

template <typename scalar_t>
void upsample_bands(const Geometry& g, const scalar_t* s, const StokenStrides& ss,
                    const scalar_t* A, const scalar_t* den, scalar_t* y, int64_t begin,
                    int64_t end) {
  using T = BandTiles<scalar_t>;
  const bool direct = (g.w == 4 && T::template direct_upsample<4>()) ||
                      (g.w == 8 && T::template direct_upsample<8>());
  T t(g, /*need_pixels=*/!direct, /*need_stokens=*/true);
  for (int64_t idx = begin; idx < end; ++idx) {
    const Band band = t.locate(idx);
    t.load_affinity(A + band.b * 9 * t.HW, band);
    t.load_stokens(s + band.b * ss.b, ss, band,
                   den == nullptr ? nullptr : den + band.b * g.cells());
    scalar_t* y_img = y + band.b * g.C * t.HW;
    switch (g.w) {
      case 4: t.template upsample_band<4>(band, y_img); break;
      case 8: t.template upsample_band<8>(band, y_img); break;
      default: t.template upsample_band<0>(band, y_img); break;
    }
  }
}

// ---- The refine attention's forward (csrc/refine.cpp written out), for small problems ----------
// Where the work is a few thousand multiply-adds per matrix product, ATen's matrix products cost
// more in their set-up than in their arithmetic; these loops do the whole forward of an item in
// one pass over L1-resident rows. Every operand row is contiguous along the reduction.

// c[i * ldc + j] = alpha * <a_i, b_j> (+ row_bias[i]) (+ col_bias[j]) for i < m, j < n:
// a_i = a + i * lda and b_j = b + j * ldb, k elements each (C = alpha A B^T + biases). Tiles of
// kMR x kNR outputs, one accumulator vector each (kMR * kNR = the lanes of a vector), their lanes
// summed together (transpose_sum): lane p * kNR + q is output (i0 + p, j0 + q), so a row of the
// tile is kNR adjacent lanes, stored as one piece. An edge tile repeats the last row or column and
// stores only its own outputs.
template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
             int64_t ldb, const T* row_bias, const T* col_bias, T* c, int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::N, kNR = L / 2, kMR = L / kNR;
  const int64_t kv = k / L * L;
  for (int64_t j0 = 0; j0 < n; j0 += kNR) {
    const T* br[kNR];
    T lane_bias[L] = {};
    for (int q = 0; q < kNR; ++q) {
      const int64_t j = std::min<int64_t>(j0 + q, n - 1);
      br[q] = b + j * ldb;
      for (int p = 0; p < kMR; ++p) {
        lane_bias[p * kNR + q] = col_bias != nullptr ? col_bias[j] : T(0);
      }
    }
    const V vcol_bias = vload(lane_bias);
    const bool full_cols = j0 + kNR <= n;
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const T* ar[kMR];
      V vbias = vcol_bias;
      for (int p = 0; p < kMR; ++p) {
        const int64_t i = std::min<int64_t>(i0 + p, m - 1);
        ar[p] = a + i * lda;
        if (row_bias != nullptr)
          for (int q = 0; q < kNR; ++q) vbias[p * kNR + q] += row_bias[i];
      }
      V acc[L] = {};
      for (int64_t kk = 0; kk < kv; kk += L) {
        V av[kMR];
        for (int p = 0; p < kMR; ++p) av[p] = vload(ar[p] + kk);
        for (int q = 0; q < kNR; ++q) {
          const V bv = vload(br[q] + kk);
          for (int p = 0; p < kMR; ++p) acc[p * kNR + q] += av[p] * bv;
        }
      }
      T out[L];
      vstore(out, transpose_sum(acc) * alpha + vbias);
      if (kv == k && full_cols && i0 + kMR <= m) {
        for (int p = 0; p < kMR; ++p) {
          std::memcpy(c + (i0 + p) * ldc + j0, out + p * kNR, kNR * sizeof(T));
        }
        continue;
      }
      for (int p = 0; p < kMR && i0 + p < m; ++p) {
        for (int q = 0; q < kNR && j0 + q < n; ++q) {
          T v = 0;
          for (int64_t kk = kv; kk < k; ++kk) v += ar[p][kk] * br[q][kk];
          c[(i0 + p) * ldc + j0 + q] = out[p * kNR + q] + alpha * v;
        }
      }
    }
  }
}

// c[i * ldc + j] (+)= alpha * sum over l < k of a[i * sai + l * sal] * b[l * ldb + j], for i < m,
// j < n (C = alpha A B, or C += alpha A B with `accumulate`; A of any strides, its elements
// broadcast, the rows of B contiguous): tiles of kMR rows x kNV vectors of C in registers (an edge
// tile repeats the last row and stores only its own), the columns beyond whole vectors one at a
// time.
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t sai, int64_t sal,
             const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::N, kMR = 2, kNV = 4;
  const auto put = [&](T* dst, V v) {
    vstore(dst, accumulate ? vload(dst) + v * alpha : v * alpha);
  };
  for (int64_t i0 = 0; i0 < m; i0 += kMR) {
    const T* ar[kMR];
    for (int p = 0; p < kMR; ++p) ar[p] = a + std::min<int64_t>(i0 + p, m - 1) * sai;
    const int rows = static_cast<int>(std::min<int64_t>(kMR, m - i0));
    const int64_t nvec = n / L * L;  // columns in whole vectors
    int64_t j0 = 0;
    while (j0 < nvec) {
      const int nv = static_cast<int>(std::min<int64_t>(kNV, (nvec - j0) / L));
      V acc[kMR][kNV] = {};
      if (nv == kNV) {
        for (int64_t l = 0; l < k; ++l) {
          const T* bl = b + l * ldb + j0;
          for (int p = 0; p < kMR; ++p) {
            const V al = vsplat(ar[p][l * sal]);
            for (int v = 0; v < kNV; ++v) acc[p][v] += al * vload(bl + v * L);
          }
        }
      } else {
        for (int64_t l = 0; l < k; ++l) {
          const T* bl = b + l * ldb + j0;
          for (int p = 0; p < kMR; ++p) {
            const V al = vsplat(ar[p][l * sal]);
            for (int v = 0; v < nv; ++v) acc[p][v] += al * vload(bl + v * L);
          }
        }
      }
      for (int p = 0; p < rows; ++p)
        for (int v = 0; v < nv; ++v) put(c + (i0 + p) * ldc + j0 + v * L, acc[p][v]);
      j0 += nv * L;
    }
    for (; j0 < n; ++j0) {
      for (int p = 0; p < rows; ++p) {
        T acc = 0;
        for (int64_t l = 0; l < k; ++l) acc += ar[p][l * sal] * b[l * ldb + j0];
        T& dst = c[(i0 + p) * ldc + j0];
        dst = accumulate ? dst + alpha * acc : alpha * acc;
      }
    }
  }
}

// out[i] (+)= sum over j < n of a[i * lda + j], for i < m.
template <typename T>
void row_sums(int64_t m, int64_t n, const T* a, int64_t lda, bool accumulate, T* out) {
  for (int64_t i = 0; i < m; ++i) {
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += a[i * lda + j];
    out[i] = accumulate ? out[i] + sum : sum;
  }
}

// out[j] (+)= sum over i < m of a[i * lda + j], for j < n.
template <typename T>
void col_sums(int64_t m, int64_t n, const T* a, int64_t lda, bool accumulate, T* out) {
  if (!accumulate) std::fill(out, out + n, T(0));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) out[j] += a[i * lda + j];
}

// r[j] = exp(r[j] - max r) / sum of those, for j < n.
template <typename T>
void softmax_row(T* r, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::N;
  T mx = r[0];
  for (int64_t j = 1; j < n; ++j) mx = std::max(mx, r[j]);
  T sum = 0;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V e = exp_nonpositive(vload(r + j) - mx);
    vstore(r + j, e);
    sum += hsum<T>(e);
  }
  for (; j < n; ++j) sum += (r[j] = std::exp(r[j] - mx));
  const T inv = T(1) / sum;
  for (j = 0; j < n; ++j) r[j] *= inv;
}

// t[j * m + i] = a[i * n + j] for i < m, j < n (an item's super tokens [C, N] -> [N, C]).
template <typename T>
STVIT_INLINE void transpose(int64_t m, int64_t n, const T* a, T* t) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) t[j * m + i] = a[i * n + j];
}

// KernelSet::refine for items [begin, end) of b (T: float or double, its own accumulation type).
template <typename T>
void refine_items(const RefineGeometry& g, const T* s, const T* wqkv, const T* bqkv,
                  const T* wproj, const T* bproj, T scale, T* qkvh, T* attn, T* o, T* out,
                  int64_t begin, int64_t end) {
  const int64_t N = g.N, C = g.C, d = g.d;
  const int64_t sj = g.qkv_strides[0], sbh = g.qkv_strides[1], sn = g.qkv_strides[2];
  Scratch<T> tokens(N * C);  // the item's super tokens, token-major [N, C]
  T* tok = tokens.get();
  for (int64_t b = begin; b < end; ++b) {
    transpose(C, N, s + b * C * N, tok);
    T* ob = o + b * N * C;
    for (int64_t h = 0; h < g.heads; ++h) {
      T* q = qkvh + (b * g.heads + h) * sbh;
      for (int64_t j = 0; j < 3; ++j) {  // qkv output channels [heads, (q, k, v), d]
        const int64_t row = (h * 3 + j) * d;
        gemm_nt<T>(N, d, C, T(1), tok, C, wqkv + row * C, C, nullptr,
                   bqkv != nullptr ? bqkv + row : nullptr, q + j * sj, sn);
      }
      T* a = attn + (b * g.heads + h) * N * N;
      gemm_nt<T>(N, N, d, scale, q, sn, q + sj, sn, nullptr, nullptr, a, N);
      for (int64_t t = 0; t < N; ++t) softmax_row(a + t * N, N);
      gemm_nn<T>(N, d, N, T(1), a, N, 1, q + 2 * sj, sn, false, ob + h * d, C);
    }
    if (g.out_channel_major) {  // out[b] [C, N] = wproj o^T + bproj
      gemm_nt<T>(C, N, C, T(1), wproj, C, ob, C, bproj, nullptr, out + b * C * N, N);
    } else {
      gemm_nt<T>(N, C, C, T(1), ob, C, wproj, C, nullptr, bproj, out + b * N * C, C);
    }
  }
}

// KernelSet::refine_backward: the gradients of refine_items' out (grad [B, C, N]) in one thread,
// item by item (the parameters' gradients are sums over the items, in item order). Per item:
// proj (dWp += grad o, dbp += sums of grad, go = grad^T Wp), the attention core head by head
// (dv = attn^T go, dS = attn (dP - rowsum(dP attn)) with dP = go v^T, dq = scale dS k,
// dk = scale dS^T q; into dqkv [N, 3C], the qkv channel order), then qkv (dWqkv += dqkv^T tokens,
// dbqkv += sums of dqkv, ds = dqkv Wqkv, token-major).
template <typename T>
void refine_backward_items(const RefineGeometry& g, const T* grad, const T* s, const T* qkvh,
                           const T* attn, const T* o, const T* wqkv, const T* wproj, T scale,
                           T* ds, T* dwqkv, T* dbqkv, T* dwproj, T* dbproj) {
  const int64_t N = g.N, C = g.C, d = g.d, C3 = 3 * C;
  const int64_t sj = g.qkv_strides[0], sbh = g.qkv_strides[1], sn = g.qkv_strides[2];
  Scratch<T> tokens(N * C), go_rows(N * C), dp_rows(N * N), dqkv_rows(N * C3);
  T *tok = tokens.get(), *go = go_rows.get(), *dp = dp_rows.get(), *dqkv = dqkv_rows.get();
  for (int64_t b = 0; b < g.B; ++b) {
    const bool more = b > 0;  // accumulate the parameters' gradients
    const T* gb = grad + b * C * N;  // [C, N]: the proj output's gradient, channel-major
    gemm_nn<T>(C, C, N, T(1), gb, N, 1, o + b * N * C, C, more, dwproj, C);
    row_sums(C, N, gb, N, more, dbproj);
    gemm_nn<T>(N, C, C, T(1), gb, 1, N, wproj, C, false, go, C);
    for (int64_t h = 0; h < g.heads; ++h) {
      const T* q = qkvh + (b * g.heads + h) * sbh;
      const T* a = attn + (b * g.heads + h) * N * N;
      T* dq = dqkv + h * 3 * d;
      gemm_nn<T>(N, d, N, T(1), a, 1, N, go + h * d, C, false, dq + 2 * d, C3);
      gemm_nt<T>(N, N, d, T(1), go + h * d, C, q + 2 * sj, sn, nullptr, nullptr, dp, N);
      for (int64_t i = 0; i < N; ++i) {  // softmax backward, row by row
        T dot = 0;
        for (int64_t j = 0; j < N; ++j) dot += dp[i * N + j] * a[i * N + j];
        for (int64_t j = 0; j < N; ++j) dp[i * N + j] = a[i * N + j] * (dp[i * N + j] - dot);
      }
      gemm_nn<T>(N, d, N, scale, dp, N, 1, q + sj, sn, false, dq, C3);
      gemm_nn<T>(N, d, N, scale, dp, 1, N, q, sn, false, dq + d, C3);
    }
    transpose(C, N, s + b * C * N, tok);
    gemm_nn<T>(C3, C, N, T(1), dqkv, 1, C3, tok, C, more, dwqkv, C);
    col_sums(N, C3, dqkv, C3, more, dbqkv);
    gemm_nn<T>(N, C, C3, T(1), dqkv, C3, 1, wqkv, C, false, ds + b * N * C, C);
  }
}

// The refine kernels (forward, backward) only where the accumulation type is the input type
// (float, double); null for the half types.
template <typename scalar_t>
constexpr auto refine_entries() {
  using F = decltype(KernelSet<scalar_t>::refine);
  using G = decltype(KernelSet<scalar_t>::refine_backward);
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return std::pair<F, G>(&refine_items<scalar_t>, &refine_backward_items<scalar_t>);
  } else {
    return std::pair<F, G>(nullptr, nullptr);
  }
}

#undef STVIT_INLINE
#undef STVIT_HAVE_SHUFFLEVECTOR

}  // namespace STVIT_CPU_ISA

template <typename scalar_t>
const KernelSet<scalar_t>& STVIT_CPU_TABLE() {
  static const KernelSet<scalar_t> table{
      &STVIT_CPU_ISA::affinity_bands<scalar_t>, &STVIT_CPU_ISA::partial_bands<scalar_t>,
      &STVIT_CPU_ISA::affinity_partial_bands<scalar_t>, &STVIT_CPU_ISA::pool_bands<scalar_t>,
      &STVIT_CPU_ISA::reduce_stokens<scalar_t>, &STVIT_CPU_ISA::upsample_bands<scalar_t>,
      STVIT_CPU_ISA::refine_entries<scalar_t>().first,
      STVIT_CPU_ISA::refine_entries<scalar_t>().second};
  return table;
}

template const KernelSet<float>& STVIT_CPU_TABLE<float>();
template const KernelSet<double>& STVIT_CPU_TABLE<double>();
template const KernelSet<c10::Half>& STVIT_CPU_TABLE<c10::Half>();
template const KernelSet<c10::BFloat16>& STVIT_CPU_TABLE<c10::BFloat16>();

}  // namespace cpu
}  // namespace stvit
