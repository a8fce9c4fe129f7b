// Host emulation of the CUDA execution model, for test builds only (CMake
// -DMHR_OPS_CUDA_EMULATION=ON). The kernels' own .cu sources compile with the host C++ compiler
// against this header: one OS thread per CUDA thread, one block at a time, block barriers, warp
// collectives, atomics, per-block shared memory (poisoned with NaN bytes), launch limits as the
// driver enforces them, and the few runtime calls the launchers use. Half and bfloat16 come from
// the toolkit's own cuda_fp16.h / cuda_bf16.h host code.
//
// Kernel code reaches it only through project-wide macros (cuda_primitives.cuh): MHR_LAUNCH instead of
// <<<...>>>, MHR_SHARED / MHR_DYNAMIC_SHARED instead of __shared__ declarations, and the
// tensor-core / async-copy wrappers. Everything else (threadIdx, __syncthreads, __shfl_xor_sync,
// atomicAdd, ...) keeps its CUDA spelling. Errors inside a kernel (divergent barrier, deadlock,
// a warp mask naming an exited lane, too much shared memory) print a message naming the kernel and
// the block, end the launch, and stay sticky as cudaErrorLaunchFailure, as a device fault does.
#pragma once

#if defined(__CUDACC__)
#error "simt.h emulates CUDA on the host; nvcc builds run on the device"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

// Execution-space qualifiers mean nothing on the host. __shared__ must go through MHR_SHARED,
// so a plain declaration fails to compile instead of silently becoming per-thread storage.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ _Pragma("GCC error \"declare shared memory with MHR_SHARED / MHR_DYNAMIC_SHARED\"")

// The CUDA index variables, per OS thread (set by the launcher before the kernel body runs).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace mhr_emu {

enum class BarrierKind : int { kSync = 0, kOr = 1, kAnd = 2, kCount = 3 };
enum class WarpOp : int { kSync = 0, kShfl = 1, kBallot = 2 };

// Where a collective was called from, for error messages and divergence checks.
struct Site {
  const char* file;
  int line;
};

// Block barrier: every live thread of the block, from one call site. Returns the reduction for
// the _or / _and / _count forms (0 for kSync).
int block_barrier(BarrierKind kind, int predicate, Site site);

// Warp collective over the lanes of `mask`, which must include the caller and only live lanes.
// Each lane contributes `value` and `predicate`; on return `values` holds every lane's value
// (indexed by lane) and the result is the ballot of predicates over the mask.
uint32_t warp_collective(WarpOp op, uint32_t mask, uint64_t value, int predicate, Site site, uint64_t* values);

// The caller's lane (0..31) within its warp.
int lane_id();

// Per-block shared memory: the storage of one declaration (keyed by `key`, unique per
// declaration and template instantiation), `bytes` long, poisoned with 0xFF bytes when the block
// first reaches it. The dynamic buffer is the launch's size, aligned to exactly `align`.
void* block_shared(const void* key, size_t bytes, size_t align, const char* name);
void* dynamic_shared(size_t align);

// Launches are synchronous: every block, one at a time, each on a pool of OS threads.
using ThreadBody = void (*)(const void* ctx);
void launch_blocks(const char* kernel_name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                   ThreadBody body, const void* ctx);

// The message of the last emulation error ("" if none), for tests of the emulator itself.
const char* last_error_message();

// The multiprocessor count cudaDeviceGetAttribute reports (an H100's 132 by default). Launchers
// that size their grids by it then pick, for a problem cut to n/132 of its rows, the grid a full
// H100 would run for the whole problem (the traffic model emulates such slices). Returns the
// previous count; n must be >= 1.
int set_multiprocessor_count(int n);

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t,
            A&&... args) {
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  const Ctx ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  launch_blocks(
      name, reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem,
      [](const void* c) {
        const Ctx& x = *static_cast<const Ctx*>(c);
        std::apply(x.kernel, x.args);  // each thread gets its own copy of the parameters
      },
      &ctx);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move 32- or 64-bit values");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Source lane of each shuffle form, or -1 for "keep your own value" (PTX shfl semantics).
enum class ShflMode : int { kIdx, kUp, kDown, kXor };
int shfl_source(ShflMode mode, int lane, int arg, int width, Site site);

// Warp intrinsics, bound to a call site by the macros below.
struct WarpCall {
  Site site;

  template <typename T>
  T shfl(ShflMode mode, uint32_t mask, T v, int arg, int width) const {
    uint64_t values[32];
    warp_collective(WarpOp::kShfl, mask, to_bits(v), 0, site, values);
    const int src = shfl_source(mode, lane_id(), arg, width, site);
    if (src < 0) return v;
    if (!((mask >> src) & 1u)) fail_source(mask, src);
    return from_bits<T>(values[src]);
  }
  template <typename T>
  T idx(uint32_t mask, T v, int src, int width = 32) const {
    return shfl(ShflMode::kIdx, mask, v, src, width);
  }
  template <typename T>
  T up(uint32_t mask, T v, unsigned delta, int width = 32) const {
    return shfl(ShflMode::kUp, mask, v, static_cast<int>(delta), width);
  }
  template <typename T>
  T down(uint32_t mask, T v, unsigned delta, int width = 32) const {
    return shfl(ShflMode::kDown, mask, v, static_cast<int>(delta), width);
  }
  template <typename T>
  T bfly(uint32_t mask, T v, int lane_mask, int width = 32) const {
    return shfl(ShflMode::kXor, mask, v, lane_mask, width);
  }
  unsigned ballot(uint32_t mask, int predicate) const {
    uint64_t values[32];
    return warp_collective(WarpOp::kBallot, mask, 0, predicate != 0, site, values);
  }
  int any(uint32_t mask, int predicate) const { return ballot(mask, predicate) != 0; }
  int all(uint32_t mask, int predicate) const { return ballot(mask, predicate) == mask; }
  void sync(uint32_t mask = 0xffffffffu) const {
    uint64_t values[32];
    warp_collective(WarpOp::kSync, mask, 0, 0, site, values);
  }
  [[noreturn]] void fail_source(uint32_t mask, int src) const;
};

template <typename T>
using AtomicValue = std::enable_if_t<
    (std::is_integral<T>::value || std::is_floating_point<T>::value) && (sizeof(T) == 4 || sizeof(T) == 8), T>;

}  // namespace mhr_emu

// The typed overload cuda_runtime.h declares only for nvcc.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#define MHR_EMU_SITE (::mhr_emu::Site{__FILE__, __LINE__})
#define __syncthreads() ::mhr_emu::block_barrier(::mhr_emu::BarrierKind::kSync, 0, MHR_EMU_SITE)
#define __syncthreads_or(p) ::mhr_emu::block_barrier(::mhr_emu::BarrierKind::kOr, (p), MHR_EMU_SITE)
#define __syncthreads_and(p) ::mhr_emu::block_barrier(::mhr_emu::BarrierKind::kAnd, (p), MHR_EMU_SITE)
#define __syncthreads_count(p) ::mhr_emu::block_barrier(::mhr_emu::BarrierKind::kCount, (p), MHR_EMU_SITE)
#define __syncwarp ::mhr_emu::WarpCall{MHR_EMU_SITE}.sync
#define __shfl_sync ::mhr_emu::WarpCall{MHR_EMU_SITE}.idx
#define __shfl_up_sync ::mhr_emu::WarpCall{MHR_EMU_SITE}.up
#define __shfl_down_sync ::mhr_emu::WarpCall{MHR_EMU_SITE}.down
#define __shfl_xor_sync ::mhr_emu::WarpCall{MHR_EMU_SITE}.bfly
#define __ballot_sync ::mhr_emu::WarpCall{MHR_EMU_SITE}.ballot
#define __any_sync ::mhr_emu::WarpCall{MHR_EMU_SITE}.any
#define __all_sync ::mhr_emu::WarpCall{MHR_EMU_SITE}.all

// Atomics: relaxed, as on the device (TSan sees them as atomics, not as races).
template <typename T>
inline mhr_emu::AtomicValue<T> atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
template <typename T>
inline mhr_emu::AtomicValue<T> atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value, std::memory_order_relaxed);
  return compare;  // the old value either way
}
template <typename T>
inline mhr_emu::AtomicValue<T> atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value, std::memory_order_relaxed);
}
template <typename T>
inline mhr_emu::AtomicValue<T> atomicMax(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load(std::memory_order_relaxed);
  while (old < value && !a.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}
template <typename T>
inline mhr_emu::AtomicValue<T> atomicMin(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load(std::memory_order_relaxed);
  while (value < old && !a.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Bit reinterpretations and integer intrinsics the kernels use.
inline float __int_as_float(int v) { return mhr_emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(static_cast<uint32_t>(mhr_emu::to_bits(v))); }
inline double __longlong_as_double(long long v) { return mhr_emu::from_bits<double>(static_cast<uint64_t>(v)); }
inline long long __double_as_longlong(double v) { return static_cast<long long>(mhr_emu::to_bits(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
// CUDA's min / max overloads for device code.
#define MHR_EMU_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
MHR_EMU_MINMAX(int)
MHR_EMU_MINMAX(unsigned)
MHR_EMU_MINMAX(long)
MHR_EMU_MINMAX(unsigned long)
MHR_EMU_MINMAX(long long)
MHR_EMU_MINMAX(unsigned long long)
#undef MHR_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Shared memory: per-block storage on the host, the real qualifier on the device.
#define MHR_EMU_SHARED(type, name, dims)                  \
  using name##_shared_t = type dims;                      \
  static const char name##_shared_key = 0;                \
  name##_shared_t& name = *static_cast<name##_shared_t*>( \
      ::mhr_emu::block_shared(&name##_shared_key, sizeof(name##_shared_t), alignof(name##_shared_t), #name))
#define MHR_EMU_DYNAMIC_SHARED(type, name, align) type* name = static_cast<type*>(::mhr_emu::dynamic_shared(align))

// ---------------------------------------------------------------------------------------------
// Counted global-memory traffic and tensor-core flops per launch (count_global, LaunchTraffic,
// set_traffic_counting, launch_records): see traffic.h.
#include "traffic.h"

// ---------------------------------------------------------------------------------------------
// For csrc/kernels/mma.cuh (cp.async model): a number unique to the running block, so per-thread
// state left by an earlier block (pending async copies) can be recognised and dropped.
namespace mhr_emu {
uint64_t block_serial();
}  // namespace mhr_emu
