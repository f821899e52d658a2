// The CPU kernels compiled for x86-64 CPUs with AVX2 and FMA, chosen at run time (see kernels.h).
// Every header is included before the target switch (see kernels_impl.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "kernels.h"

#if defined(STVIT_CPU_HAVE_AVX2)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define STVIT_CPU_ISA isa_avx2
// Stores that bypass the caches (outputs written once, read by a later op): 8 floats to 32-byte
// aligned memory, 4 floats to 16-byte aligned memory; the fence orders them before the kernel
// returns.
#define STVIT_STREAM_F32X8(dst, src) _mm256_stream_ps((dst), _mm256_loadu_ps(src))
#define STVIT_STREAM_F32X4(dst, src) _mm_stream_ps((dst), _mm_loadu_ps(src))
#define STVIT_STREAM_FENCE() _mm_sfence()
#define STVIT_CPU_TABLE kernels_avx2
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // STVIT_CPU_HAVE_AVX2
