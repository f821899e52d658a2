// CUDA kernels of the refine attention (csrc/refine.cpp) where the super tokens are few: one
// thread block does a whole (image, head) of the attention core in shared memory, where ATen takes
// a chain of launches (scores, softmax, weighted sum, layout copies), each with its own host
// dispatch. The weight products, which sum over C channels for every token of every image, are
// the BLAS's batched products (refine_forward_impl): a kernel that did them as well, one block per
// image, took 84 us at stage 1 and 239 us at stage 2 on an H200 (B=64; 64 blocks for 132 SMs,
// the weights read from global memory inside the product loops), most of the module's forward.
//
//   refine_core_forward_kernel   one block per (b, head): the head's rows of qkv = Wqkv s_b (a
//                                batched product, [B, 3C, N]) plus bqkv, written head-major to
//                                qkvh; the scores, softmax (-> attn) and o = attn v (-> o)
//   refine_core_backward_kernel  one block per (b, head): from go (the gradient of o), q, k, v and
//                                attn, the gradients of q, k, v written token-major in the qkv
//                                channel order, dqkv [B * N, 3C] (the weight products' input);
//                                two products at a time, one per half of its 512 threads
//
// Every product is a block_gemm: 4 x 4 register tiles in the backward, 2 x 4 in the forward, one
// per thread at a time; the 4 columns of a tile are interleaved (j, j + n4, j + 2 n4, j + 3 n4),
// so consecutive threads read consecutive shared-memory words, and shared rows read along the
// tile's columns have an odd stride (no bank conflicts). Accumulation in at::opmath_type (float, double for double).
//
// Shared memory (acc_t elements), forward: QKV 3d x N | P N x odd(N); backward: G, Q, K, V
// N x odd(d) each | P, D N x odd(N) each. refine_*_smem gives the bytes; the caller
// (refine_cuda.cu) takes the kernels only where they fit in a block's opt-in limit.
#pragma once

#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>

#include "sta_kernels.cuh"

namespace stvit {
namespace cuda {

// The smallest odd number >= n: a row stride that spreads column reads over every bank.
__host__ __device__ __forceinline__ int odd_stride(int n) { return n | 1; }

template <typename scalar_t>
struct RefineParams {
  using acc_t = at::opmath_type<scalar_t>;
  // forward
  const scalar_t* qkv = nullptr;    // [B, 3C, N]: Wqkv s_b, channel j = (head, q / k / v, dim)
  const scalar_t* bqkv = nullptr;   // [3C] or null
  scalar_t* o = nullptr;            // [B * N, C] the attention output before proj
  // both: q, k, v head-major: element e of token n of (t, b * heads + h) at
  // t * q_st + (b * heads + h) * q_sbh + n * q_sn + e
  acc_t* qkvh = nullptr;
  int64_t q_st = 0, q_sbh = 0, q_sn = 0;
  acc_t* attn = nullptr;            // [B * heads, N, N]
  // backward
  const scalar_t* go = nullptr;     // [B * N, C] the gradient of o
  scalar_t* dqkv = nullptr;         // [B * N, 3C]
  int C = 0, N = 0, heads = 1, d = 0;
  acc_t scale = 0;
};

// The forward's: its products in 2 x 4 tiles (at stage 1 325 and 416 of them, one per thread:
// half the k-loop instructions of a 4 x 4 tile for each of a thread's k steps) and its softmax
// with several threads per row (block_softmax).
constexpr int kRefineForwardThreads = 512;
// The backward's: two halves of 256 threads, each with a product of its own where two are
// independent (dv beside dattn, dq beside dk). At the STViT stages a product has at most 208 4 x 4
// tiles: one tile, K steps, per thread; one after the other, the four made a chain of 211 steps at
// stage 1 (N = 49, d = 64), side by side 113.
constexpr int kRefineBackwardThreads = 512;

// Shared-memory bytes of the two kernels (acc_bytes: sizeof(acc_t)).
inline size_t refine_forward_smem(int64_t d, int64_t N, int acc_bytes) {
  return static_cast<size_t>(3 * d * N + N * odd_stride(static_cast<int>(N)) +
                             kRefineForwardThreads) *
         acc_bytes;
}
inline size_t refine_backward_smem(int64_t d, int64_t N, int acc_bytes) {
  return static_cast<size_t>(4 * N * odd_stride(static_cast<int>(d)) +
                             2 * N * odd_stride(static_cast<int>(N))) *
         acc_bytes;
}

// The M x Nc product R[i, j] = sum_k a(i, k) * b(k, j), handed to store(i, j, value) for every
// (i, j), by RM x 4 register tiles over threads tid = 0 .. nthr - 1 (the block's, or a part of it
// while the other part does another product). A tile takes RM consecutive rows i0 .. i0+RM-1 and
// the interleaved columns jt, jt + n4, jt + 2 n4, jt + 3 n4 (n4 = ceil(Nc / 4)), so consecutive
// threads (consecutive jt) read consecutive columns of b. Out-of-range rows and columns read a
// clamped index and are not stored. Ends without a barrier.
template <typename acc_t, int RM = 4, class LoadA, class LoadB, class Store>
__device__ __forceinline__ void block_gemm(int M, int Nc, int K, const LoadA& a, const LoadB& b,
                                           const Store& store, int tid, int nthr) {
  constexpr int RN = 4;
  const int mt = (M + RM - 1) / RM, n4 = (Nc + RN - 1) / RN;
  for (int t = tid; t < mt * n4; t += nthr) {
    const int i0 = (t / n4) * RM, jt = t % n4;
    int ii[RM], jj[RN];
#pragma unroll
    for (int r = 0; r < RM; ++r) ii[r] = imin(i0 + r, M - 1);
#pragma unroll
    for (int q = 0; q < RN; ++q) jj[q] = imin(jt + q * n4, Nc - 1);
    acc_t acc[RM][RN];
#pragma unroll
    for (int r = 0; r < RM; ++r) {
#pragma unroll
      for (int q = 0; q < RN; ++q) acc[r][q] = acc_t(0);
    }
#pragma unroll 4
    for (int k = 0; k < K; ++k) {  // unrolled: the loads of 4 steps in flight before their FMAs
      acc_t av[RM], bv[RN];
#pragma unroll
      for (int r = 0; r < RM; ++r) av[r] = a(ii[r], k);
#pragma unroll
      for (int q = 0; q < RN; ++q) bv[q] = b(k, jj[q]);
#pragma unroll
      for (int r = 0; r < RM; ++r) {
#pragma unroll
        for (int q = 0; q < RN; ++q) acc[r][q] += av[r] * bv[q];
      }
    }
#pragma unroll
    for (int r = 0; r < RM; ++r) {
#pragma unroll
      for (int q = 0; q < RN; ++q) {
        if (i0 + r < M && jt + q * n4 < Nc) store(i0 + r, jt + q * n4, acc[r][q]);
      }
    }
  }
}

// Row-wise softmax of the N x N scores in P (row stride ld), in place; the probabilities also go
// to attn (row stride N). `per` = blockDim.x / N threads per row (at least 1; rows in passes of
// blockDim.x / per), thread `part` of a row taking its columns part, part + per, ...: its max and
// its sum of exponentials into red[] (blockDim.x acc_t of shared memory), the row's from the per
// partials in a fixed order (deterministic). Every thread reaches every barrier. Until 2026-12-07
// one thread per row: at stage 1 (N = 49) 49 threads of 256 each walked 3 x 49 values.
template <typename acc_t>
__device__ __forceinline__ void block_softmax(acc_t* P, int ld, int N, acc_t* __restrict__ attn,
                                              acc_t* red) {
  const int T = blockDim.x;
  const int per = imax(1, T / N), rows = T / per;
  const int part = static_cast<int>(threadIdx.x) % per;
  for (int r0 = 0; r0 < N; r0 += rows) {
    const int i = r0 + static_cast<int>(threadIdx.x) / per;
    const bool mine = static_cast<int>(threadIdx.x) < rows * per && i < N;
    acc_t* row = P + (mine ? i : 0) * ld;
    acc_t* rp = red + (static_cast<int>(threadIdx.x) - part);  // the row's per partials
    acc_t m = -INFINITY;
    if (mine) {
      for (int j = part; j < N; j += per) m = row[j] > m ? row[j] : m;
      red[threadIdx.x] = m;
    }
    __syncthreads();
    if (mine) {
      m = rp[0];
      for (int q = 1; q < per; ++q) m = rp[q] > m ? rp[q] : m;
    }
    __syncthreads();  // red is rewritten below
    if (mine) {
      acc_t sum = acc_t(0);
      for (int j = part; j < N; j += per) {
        row[j] = exp_acc(row[j] - m);
        sum += row[j];
      }
      red[threadIdx.x] = sum;
    }
    __syncthreads();
    if (mine) {
      acc_t sum = acc_t(0);
      for (int q = 0; q < per; ++q) sum += rp[q];
      const acc_t inv = acc_t(1) / sum;
      for (int j = part; j < N; j += per) {
        row[j] *= inv;
        attn[i * N + j] = row[j];
      }
    }
    __syncthreads();  // red is rewritten by the next pass
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRefineForwardThreads) refine_core_forward_kernel(
    const RefineParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  STVIT_DYNAMIC_SMEM(smem);
  const int C = p.C, N = p.N, d = p.d, ldp = odd_stride(N);
  acc_t* QKV = reinterpret_cast<acc_t*>(smem);  // [3d, N]: the head's q, k, v rows
  acc_t* P = QKV + 3 * d * N;                   // [N, ldp]
  acc_t* red = P + N * ldp;                     // [blockDim.x] the softmax's partials
  const int64_t bh = blockIdx.x, b = bh / p.heads;
  const int h = static_cast<int>(bh % p.heads);

  // the head's 3d rows of qkv (contiguous: channel j = (h, t, e)) plus the bias, to QKV and qkvh
  const scalar_t* src = p.qkv + (b * 3 * C + static_cast<int64_t>(h) * 3 * d) * N;
  const scalar_t* bias = p.bqkv == nullptr ? nullptr : p.bqkv + h * 3 * d;
  for (int i = threadIdx.x; i < 3 * d * N; i += blockDim.x) {
    const int j = i / N, n = i - j * N, t = j / d, e = j - t * d;
    acc_t v = static_cast<acc_t>(src[i]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[j]);
    QKV[i] = v;
    p.qkvh[t * p.q_st + bh * p.q_sbh + n * p.q_sn + e] = v;
  }
  __syncthreads();

  const acc_t* Q = QKV;  // [d, N]
  const acc_t* Kt = Q + d * N;
  const acc_t* V = Kt + d * N;
  block_gemm<acc_t, 2>(
      N, N, d, [&](int i, int e) { return Q[e * N + i]; },
      [&](int e, int j) { return Kt[e * N + j]; },
      [&](int i, int j, acc_t v) { P[i * ldp + j] = v * p.scale; }, threadIdx.x, blockDim.x);
  __syncthreads();
  block_softmax(P, ldp, N, p.attn + bh * N * N, red);
  // o[n, h d + e] = sum_j attn[n, j] v[e, j], in the input dtype (proj reads it so)
  block_gemm<acc_t, 2>(
      d, N, N, [&](int e, int j) { return V[e * N + j]; },
      [&](int j, int n) { return P[n * ldp + j]; },
      [&](int e, int n, acc_t v) { p.o[(b * N + n) * C + h * d + e] = static_cast<scalar_t>(v); },
      threadIdx.x, blockDim.x);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRefineBackwardThreads) refine_core_backward_kernel(
    const RefineParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  STVIT_DYNAMIC_SMEM(smem);
  const int C = p.C, N = p.N, d = p.d, C3 = 3 * C;
  const int ld = odd_stride(d), ldp = odd_stride(N);
  acc_t* G = reinterpret_cast<acc_t*>(smem);  // [N, ld] each
  acc_t* Q = G + N * ld;
  acc_t* K = Q + N * ld;
  acc_t* V = K + N * ld;
  acc_t* P = V + N * ld;  // [N, ldp] attn
  acc_t* D = P + N * ldp;  // [N, ldp] the scores' gradient
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.heads;
  const int h = static_cast<int>(bh % p.heads);

  const scalar_t* go_b = p.go + b * N * C + h * d;
  const acc_t* q_bh = p.qkvh + bh * p.q_sbh;
  const acc_t* a_bh = p.attn + bh * N * N;
  for (int i = threadIdx.x; i < N * d; i += blockDim.x) {
    const int n = i / d, e = i - n * d;
    G[n * ld + e] = static_cast<acc_t>(go_b[n * C + e]);
    Q[n * ld + e] = q_bh[n * p.q_sn + e];
    K[n * ld + e] = q_bh[p.q_st + n * p.q_sn + e];
    V[n * ld + e] = q_bh[2 * p.q_st + n * p.q_sn + e];
  }
  for (int i = threadIdx.x; i < N * N; i += blockDim.x) {
    const int r = i / N;
    P[r * ldp + i - r * N] = a_bh[i];
  }
  __syncthreads();

  // row n of dqkv for this head: channels h 3d + (0: q, 1: k, 2: v) d + e
  scalar_t* dq_b = p.dqkv + b * N * C3 + h * 3 * d;
  // two products at a time, one per half of the block
  const int half = blockDim.x / 2;
  const bool first = static_cast<int>(threadIdx.x) < half;
  const int tid = first ? threadIdx.x : threadIdx.x - half;
  if (first) {  // dv[j, e] = sum_i attn[i, j] go[i, e]
    block_gemm<acc_t>(
        N, d, N, [&](int j, int i) { return P[i * ldp + j]; },
        [&](int i, int e) { return G[i * ld + e]; },
        [&](int j, int e, acc_t v) { dq_b[j * C3 + 2 * d + e] = static_cast<scalar_t>(v); }, tid,
        half);
  } else {  // dattn[i, j] = sum_e go[i, e] v[j, e]
    block_gemm<acc_t>(
        N, N, d, [&](int i, int e) { return G[i * ld + e]; },
        [&](int e, int j) { return V[j * ld + e]; },
        [&](int i, int j, acc_t v) { D[i * ldp + j] = v; }, tid, half);
  }
  __syncthreads();
  // the softmax backward, one thread per row: dscores = attn * (dattn - <dattn, attn>_row)
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    acc_t dot = acc_t(0);
#pragma unroll 4
    for (int j = 0; j < N; ++j) dot += D[i * ldp + j] * P[i * ldp + j];
#pragma unroll 4
    for (int j = 0; j < N; ++j) D[i * ldp + j] = P[i * ldp + j] * (D[i * ldp + j] - dot);
  }
  __syncthreads();
  if (first) {  // dq[i, e] = scale sum_j dscores[i, j] k[j, e]
    block_gemm<acc_t>(
        N, d, N, [&](int i, int j) { return D[i * ldp + j]; },
        [&](int j, int e) { return K[j * ld + e]; },
        [&](int i, int e, acc_t v) { dq_b[i * C3 + e] = static_cast<scalar_t>(v * p.scale); },
        tid, half);
  } else {  // dk[j, e] = scale sum_i dscores[i, j] q[i, e]
    block_gemm<acc_t>(
        N, d, N, [&](int j, int i) { return D[i * ldp + j]; },
        [&](int i, int e) { return Q[i * ld + e]; },
        [&](int j, int e, acc_t v) { dq_b[j * C3 + d + e] = static_cast<scalar_t>(v * p.scale); },
        tid, half);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side, against the runtime policy RT of sta_launch.cuh (the CUDA runtime or the emulator).
// The caller allocates every output and checks shapes, dtypes and the shared-memory budget.

template <typename scalar_t>
RefineParams<scalar_t> refine_params(int64_t C, int64_t N, int64_t heads, double scale,
                                     const at::Tensor& qkvh) {
  RefineParams<scalar_t> p;
  p.C = static_cast<int>(C);
  p.N = static_cast<int>(N);
  p.heads = static_cast<int>(heads);
  p.d = static_cast<int>(C / heads);
  p.scale = static_cast<typename RefineParams<scalar_t>::acc_t>(scale);
  p.qkvh = qkvh.data_ptr<typename RefineParams<scalar_t>::acc_t>();
  p.q_st = qkvh.stride(0);
  p.q_sbh = qkvh.stride(1);
  p.q_sn = qkvh.stride(2);
  return p;
}

template <typename T>
const T* data_or_null(const at::Tensor* t) {
  return t != nullptr && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

// s [B, C, H, W] contiguous, weights [3C, C(, 1, 1)] / [C, C(, 1, 1)] contiguous, biases
// contiguous or null; fills qkvh [3, B * heads, N, d] (accumulation type, rows contiguous),
// attn [B * heads, N, N] and o [B * N, C] (contiguous), out [B, C, H, W] (contiguous or the
// token-major strides of channels_last). Three launches: qkv = Wqkv s_b for every image (one
// batched product, the weight's batch stride 0), the attention core (one block per (image,
// head)), out = Wproj o_b^T + bproj (one batched product, or one addmm into a token-major out).
template <class RT>
void refine_forward_impl(RT& rt, const at::Tensor& s, const at::Tensor& wqkv,
                         const at::Tensor* bqkv, const at::Tensor& wproj, const at::Tensor* bproj,
                         int64_t heads, double scale, const at::Tensor& qkvh,
                         const at::Tensor& attn, const at::Tensor& o, const at::Tensor& out) {
  const int64_t B = s.size(0), C = s.size(1), N = s.size(2) * s.size(3);
  const at::Tensor qkv =
      at::bmm(wqkv.reshape({1, 3 * C, C}).expand({B, 3 * C, C}), s.reshape({B, C, N}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "stvit_refine_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RefineParams<scalar_t> p = refine_params<scalar_t>(C, N, heads, scale, qkvh);
    p.qkv = qkv.const_data_ptr<scalar_t>();
    p.bqkv = data_or_null<scalar_t>(bqkv);
    p.attn = attn.data_ptr<acc_t>();
    p.o = o.data_ptr<scalar_t>();
    rt.launch(refine_core_forward_kernel<scalar_t>, B * heads, kRefineForwardThreads,
              refine_forward_smem(C / heads, N, sizeof(acc_t)), p);
  });
  const at::Tensor w = wproj.reshape({C, C});
  const bool has_bias = bproj != nullptr && bproj->defined();
  if (out.is_contiguous()) {  // out [B, C, N] = Wproj o_b^T (+ bproj over the tokens)
    at::Tensor out3 = out.view({B, C, N});
    const at::Tensor wb = w.unsqueeze(0).expand({B, C, C});
    const at::Tensor ot = o.view({B, N, C}).transpose(1, 2);
    if (has_bias) {
      at::baddbmm_out(out3, bproj->view({1, C, 1}).expand({B, C, N}), wb, ot);
    } else {
      at::bmm_out(out3, wb, ot);
    }
  } else {  // token-major: out [B * N, C] = o Wproj^T + bproj
    at::Tensor out2 = out.view({B, C, N}).transpose(1, 2).view({B * N, C});
    if (has_bias) {
      at::addmm_out(out2, *bproj, o, w.t());
    } else {
      at::mm_out(out2, o, w.t());
    }
  }
}

// go [B * N, C] (the input dtype, contiguous), qkvh and attn as refine_forward_impl wrote them;
// fills dqkv [B * N, 3C] (contiguous, the input dtype).
template <class RT>
void refine_core_backward_impl(RT& rt, const at::Tensor& go, const at::Tensor& qkvh,
                               const at::Tensor& attn, int64_t B, int64_t N, int64_t heads,
                               double scale, const at::Tensor& dqkv) {
  const int64_t C = go.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "stvit_refine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RefineParams<scalar_t> p = refine_params<scalar_t>(C, N, heads, scale, qkvh);
    p.go = go.const_data_ptr<scalar_t>();
    p.attn = attn.data_ptr<acc_t>();
    p.dqkv = dqkv.data_ptr<scalar_t>();
    rt.launch(refine_core_backward_kernel<scalar_t>, B * heads, kRefineBackwardThreads,
              refine_backward_smem(C / heads, N, sizeof(acc_t)), p);
  });
}

}  // namespace cuda
}  // namespace stvit
