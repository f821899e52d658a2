// Host emulation of the few CUDA built-ins the STA kernels use. Each block runs its threads as
// std::threads under a cooperative scheduler: exactly one thread runs at a time; between two
// barriers the threads run one after the other in a random (or reversed) order, so a missing
// __syncthreads shows up as a wrong result instead of a rare race.
#pragma once
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };

namespace emu {

struct Block {
  int n = 0;
  std::mutex m;
  std::vector<std::unique_ptr<std::condition_variable>> cvs;
  std::vector<int> order;
  size_t pos = 0;
  std::vector<int> state;  // 0 runnable this epoch, 1 waiting at barrier, 2 finished
  int turn = -1;
  int order_mode = 0;      // 0 random, 1 reversed, 2 in order
  std::mt19937_64 rng;
  std::vector<unsigned char> smem;
  std::string error;
  long barriers = 0;

  void new_epoch() {  // called with m held, when every thread of the epoch has run
    std::vector<int> waiting;
    int done = 0;
    for (int i = 0; i < n; ++i) {
      if (state[i] == 1) waiting.push_back(i);
      else if (state[i] == 2) ++done;
    }
    if (!waiting.empty() && done > 0 && error.empty()) error = "barrier divergence: some threads exited while others wait";
    if (waiting.empty()) { turn = -1; return; }
    ++barriers;
    for (int i : waiting) state[i] = 0;
    order = waiting;
    if (order_mode == 0) std::shuffle(order.begin(), order.end(), rng);
    else if (order_mode == 1) std::reverse(order.begin(), order.end());
    pos = 0;
    turn = order[0];
    cvs[turn]->notify_one();
  }
  void advance() {  // with m held: pass the baton
    ++pos;
    if (pos < order.size()) { turn = order[pos]; cvs[turn]->notify_one(); }
    else new_epoch();
  }
};

inline thread_local dim3 t_threadIdx;
inline thread_local dim3 t_blockIdx;
inline thread_local Block* t_block = nullptr;
inline dim3 g_blockDim;
inline dim3 g_gridDim;

inline unsigned char* smem() { return t_block->smem.data(); }

// cp.async: a thread's copies stay pending until its async_wait_all(); a barrier does not
// complete them (as on the GPU), so reading the destination before the wait reads the poison.
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
};
inline thread_local std::vector<PendingCopy> t_pending;
inline void async_copy(void* dst, const void* src, int bytes) { t_pending.push_back({dst, src, bytes}); }
inline void async_wait() {
  for (const PendingCopy& c : t_pending) std::memcpy(c.dst, c.src, c.bytes);
  t_pending.clear();
}

inline void syncthreads() {
  Block* b = t_block;
  const int tid = t_threadIdx.x;
  std::unique_lock<std::mutex> lk(b->m);
  b->state[tid] = 1;
  b->advance();
  b->cvs[tid]->wait(lk, [&] { return b->turn == tid; });
}

template <typename Params>
void run_block(void (*kernel)(Params), int64_t bid, int threads, size_t smem_bytes, const Params& p,
               int order_mode, uint64_t seed, long* barrier_count) {
  Block b;
  b.n = threads;
  b.order_mode = order_mode;
  b.rng.seed(seed * 1000003ULL + bid);
  b.smem.assign(smem_bytes + 16, 0xFF);  // NaN-poisoned: reading unwritten shared memory shows
  for (int i = 0; i < threads; ++i) b.cvs.emplace_back(new std::condition_variable);
  b.state.assign(threads, 0);
  b.order.resize(threads);
  std::iota(b.order.begin(), b.order.end(), 0);
  if (order_mode == 0) std::shuffle(b.order.begin(), b.order.end(), b.rng);
  else if (order_mode == 1) std::reverse(b.order.begin(), b.order.end());
  b.turn = b.order[0];
  std::vector<std::thread> ts;
  ts.reserve(threads);
  for (int i = 0; i < threads; ++i) {
    ts.emplace_back([&, i] {
      t_threadIdx.x = i;
      t_blockIdx.x = static_cast<unsigned>(bid);
      t_block = &b;
      {
        std::unique_lock<std::mutex> lk(b.m);
        b.cvs[i]->wait(lk, [&] { return b.turn == i; });
      }
      kernel(p);
      std::unique_lock<std::mutex> lk(b.m);
      if (!t_pending.empty() && b.error.empty()) b.error = "cp.async copies never waited for";
      t_pending.clear();
      b.state[i] = 2;
      b.advance();
    });
  }
  for (auto& t : ts) t.join();
  if (!b.error.empty()) throw std::runtime_error(b.error);
  *barrier_count += b.barriers;
}

}  // namespace emu

#define threadIdx emu::t_threadIdx
#define blockIdx emu::t_blockIdx
#define blockDim emu::g_blockDim
#define gridDim emu::g_gridDim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define STVIT_DYNAMIC_SMEM(name) unsigned char* name = emu::smem()
#define STVIT_EMULATED_ASYNC(dst, src, bytes) emu::async_copy(dst, src, bytes)
#define STVIT_EMULATED_ASYNC_WAIT() emu::async_wait()
inline void __syncthreads() { emu::syncthreads(); }
