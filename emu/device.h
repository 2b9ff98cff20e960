// device.h — CUDA's keywords, built-in variables, types and intrinsics given a CPU meaning, so
// that kernels/*.cu compile unchanged with the host C++ compiler (build.rs includes this header
// before each .cu in a generated wrapper). The execution model lives in emu/runtime.cpp: every
// CUDA thread is a fiber, a block runs on one OS thread, blocks spread over a pool of OS threads.
//
// What each CUDA construct becomes
//   __global__ / __device__ / __host__ / __forceinline__ / __launch_bounds__  nothing (or inline)
//   __shared__          thread_local: a block runs on one OS thread and its fibers never move, so
//                       one OS thread's copy is one block's shared memory. At block scope
//                       thread_local implies static, as __shared__ does.
//   extern __shared__   the wrapper defines the module's array (thread_local, 228 KiB) first.
//   threadIdx, …        fields of the current fiber's context (vqx_emu_ctx).
//   __syncthreads()     a barrier over the block's fibers, keyed by source line: threads at
//                       different barriers, or one exiting while others wait, is an error.
//   warp collectives    (__shfl*_sync, __syncwarp, __ballot_sync, the mma twins) a barrier over
//                       the lanes of the mask, the last lane computing every lane's result.
//   atomics             GCC __atomic builtins (blocks run in parallel on OS threads).
//   inline PTX          not compiled: kernels call the twins below under `#ifdef VQX_EMU`.
#pragma once
#define VQX_EMU 1

#include <stdint.h>
#include <string.h>

#include <atomic>
#include <cmath>
#include <math.h>

#include "vqx_emu.h"

// ---- keywords -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __constant__ const

// ---- vector types -----------------------------------------------------------------------------
// Aligned like CUDA's, so that a misaligned reinterpret_cast load is undefined here too (UBSan
// reports it) as it is a fault on the GPU.
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

// ---- built-in variables -----------------------------------------------------------------------
namespace vqx_emu {
struct ThreadCtx {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
}  // namespace vqx_emu
// The running fiber's context; set by the scheduler before every switch into a fiber.
extern thread_local const vqx_emu::ThreadCtx* vqx_emu_ctx;
#define threadIdx (vqx_emu_ctx->thread_idx)
#define blockIdx (vqx_emu_ctx->block_idx)
#define blockDim (vqx_emu_ctx->block_dim)
#define gridDim (vqx_emu_ctx->grid_dim)
#define warpSize 32

// ---- barriers and warp collectives (emu/runtime.cpp) -----------------------------------------
namespace vqx_emu {
enum Collective : int {
    SHFL_IDX = 0,
    SHFL_XOR,
    SHFL_UP,
    SHFL_DOWN,
    SYNCWARP,
    BALLOT,
    MMA_M16N8K8_TF32,
    MMA_M16N8K16_BF16,
};
// Words a lane passes into / gets out of one collective.
constexpr int COLLECTIVE_IN = 12;
constexpr int COLLECTIVE_OUT = 4;

void syncthreads(const char* file, int line);
void warp_collective(Collective op, unsigned mask, const char* file, int line,
                     const uint32_t (&in)[COLLECTIVE_IN], uint32_t (&out)[COLLECTIVE_OUT]);

template <typename T>
inline T shuffle(Collective op, unsigned mask, T v, int arg, int width, const char* file,
                 int line) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    uint32_t in[COLLECTIVE_IN] = {(uint32_t)bits, (uint32_t)(bits >> 32), (uint32_t)arg,
                                  (uint32_t)width};
    uint32_t out[COLLECTIVE_OUT];
    warp_collective(op, mask, file, line, in, out);
    bits = (uint64_t)out[0] | ((uint64_t)out[1] << 32);
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
}
}  // namespace vqx_emu

#define __syncthreads() vqx_emu::syncthreads(__FILE__, __LINE__)

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return vqx_emu::shuffle(vqx_emu::SHFL_IDX, mask, v, src, width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return vqx_emu::shuffle(vqx_emu::SHFL_XOR, mask, v, lane_mask, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return vqx_emu::shuffle(vqx_emu::SHFL_UP, mask, v, (int)delta, width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return vqx_emu::shuffle(vqx_emu::SHFL_DOWN, mask, v, (int)delta, width, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    const uint32_t in[vqx_emu::COLLECTIVE_IN] = {};
    uint32_t out[vqx_emu::COLLECTIVE_OUT];
    vqx_emu::warp_collective(vqx_emu::SYNCWARP, mask, file, line, in, out);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    const uint32_t in[vqx_emu::COLLECTIVE_IN] = {pred != 0 ? 1u : 0u};
    uint32_t out[vqx_emu::COLLECTIVE_OUT];
    vqx_emu::warp_collective(vqx_emu::BALLOT, mask, file, line, in, out);
    return out[0];
}

// ---- atomics (relaxed, like CUDA's atomicAdd) -------------------------------------------------
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
    return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline double atomicAdd(double* p, double v) {
    return std::atomic_ref<double>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED,
                                                   __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED,
                                                   __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned int atomicMin(unsigned int* p, unsigned int v) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED,
                                                   __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED,
                                                   __ATOMIC_RELAXED)) {
    }
    return old;
}
inline unsigned int atomicCAS(unsigned int* p, unsigned int expected, unsigned int desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}

// ---- math and bit casts -----------------------------------------------------------------------
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; memcpy(&v, &f, 4); return v; }
inline double __longlong_as_double(long long v) { double f; memcpy(&f, &v, 8); return f; }
inline long long __double_as_longlong(double f) { long long v; memcpy(&v, &f, 8); return v; }
// fmaf, fminf, fmaxf, sqrtf … are the C library's: the same IEEE single-precision results.
// The round-to-nearest intrinsics kernels use where contraction into an fma must not happen
// (nvcc contracts a*b+c by default; this build compiles with -ffp-contract=off): plain IEEE ops.
// __fadd_rn … __fsqrt_rn for float (p = f) and __dadd_rn … __dsqrt_rn for double (p = d).
#define VQX_EMU_RN_OPS(T, p)                                          \
    inline T __##p##add_rn(T a, T b) { return a + b; }                \
    inline T __##p##sub_rn(T a, T b) { return a - b; }                \
    inline T __##p##mul_rn(T a, T b) { return a * b; }                \
    inline T __##p##div_rn(T a, T b) { return a / b; }                \
    inline T __##p##sqrt_rn(T a) { return std::sqrt(a); }
VQX_EMU_RN_OPS(float, f)
VQX_EMU_RN_OPS(double, d)
#undef VQX_EMU_RN_OPS
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

// ---- host twins of the inline PTX in kernels/nearest_tc.cu ------------------------------------
namespace vqx_emu {
// cvt.rna.tf32.f32: round to nearest, ties away from zero, 10 explicit mantissa bits (the f32
// with its low 13 bits cleared); sm_8x does not flush denormals; NaN and ±inf pass through;
// values that round past FLT_MAX become ±inf.
inline unsigned int cvt_rna_tf32(float v) {
    unsigned int b = __float_as_uint(v);
    if ((b & 0x7f800000u) == 0x7f800000u) return b;
    return (b + 0x1000u) & 0xffffe000u;
}
// cvt.rn.bf16.f32: round to nearest, ties to even, to the upper 16 bits; NaN stays NaN.
inline unsigned int bf16_rn(float v) {
    unsigned int b = __float_as_uint(v);
    if ((b & 0x7f800000u) == 0x7f800000u) return (b >> 16) | ((b & 0x7fffffu) ? 0x40u : 0u);
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}
// cvt.rn.bf16x2.f32 d, a, b: d[31:16] = bf16(a), d[15:0] = bf16(b).
inline unsigned int cvt_rn_bf16x2(float a, float b) { return (bf16_rn(a) << 16) | bf16_rn(b); }

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (and m16n8k16 .bf16), D = A·B + C, with
// the fragment layouts of the PTX ISA. A warp collective over all 32 lanes.
inline void mma_collective(Collective op, float (&c)[4], const unsigned int (&a)[4],
                           unsigned int b0, unsigned int b1, const char* file, int line) {
    uint32_t in[COLLECTIVE_IN] = {a[0], a[1], a[2], a[3], b0, b1,
                                  __float_as_uint(c[0]), __float_as_uint(c[1]),
                                  __float_as_uint(c[2]), __float_as_uint(c[3])};
    uint32_t out[COLLECTIVE_OUT];
    warp_collective(op, 0xffffffffu, file, line, in, out);
    for (int i = 0; i < 4; ++i) c[i] = __uint_as_float(out[i]);
}
inline void mma_m16n8k8_tf32(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                             unsigned int b1, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    mma_collective(MMA_M16N8K8_TF32, c, a, b0, b1, file, line);
}
inline void mma_m16n8k16_bf16(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                              unsigned int b1, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    mma_collective(MMA_M16N8K16_BF16, c, a, b0, b1, file, line);
}
}  // namespace vqx_emu

// ---- kernel entry points for the generated module wrappers -----------------------------------
#include <utility>
namespace vqx_emu {
template <typename F, F f>
struct Entry;
// A kernel's parameter count and sizes, and a driver-API style call: params[i] points at the
// value of parameter i.
template <typename... A, void (*f)(A...)>
struct Entry<void (*)(A...), f> {
    static constexpr size_t arity = sizeof...(A);
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
    template <size_t... I>
    static void call(void** p, std::index_sequence<I...>) {
        f(*static_cast<A*>(p[I])...);
    }
    static void invoke(void** p) { call(p, std::index_sequence_for<A...>{}); }
};
}  // namespace vqx_emu
#define VQX_EMU_KERNEL(fn, module, dyn)                                                    \
    vqx_emu_kernel {                                                                      \
        #fn, module, vqx_emu::Entry<decltype(&fn), &fn>::arity,                           \
            vqx_emu::Entry<decltype(&fn), &fn>::sizes, &vqx_emu::Entry<decltype(&fn), &fn>::invoke, \
            dyn                                                                           \
    }
