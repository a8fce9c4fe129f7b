// Tensor-core (mma.sync), ldmatrix and cp.async wrappers: inline PTX on the device (sm_80+), the
// PTX ISA semantics on the host under the SIMT emulation (MHR_OPS_CUDA_EMULATION, simt.h).
//
// Fragments are the per-lane registers of the PTX ISA ("Matrix Fragments for mma.m16n8k16 /
// mma.m16n8k8"). With g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group), and a b16
// register holding two elements, low half first:
//   m16n8k16 bf16/f16   A 16x16 row-major  uint32 a[4]: element i (0..7) = reg i/2, half i%2
//                         at (m, k) = (g + 8*((i/2)%2), 2t + i%2 + 8*(i/4))
//                       B 16x8 "col"       uint32 b[2]: element i (0..3) at (k, n) = (2t + i%2 + 8*(i/2), g)
//   m16n8k8 tf32        A 16x8             uint32 a[4]: a[i] at (m, k) = (g + 8*(i%2), t + 4*(i/2))
//                       B 8x8              uint32 b[2]: b[i] at (k, n) = (t + 4*i, g)
//   C/D (both shapes)   16x8 fp32          float c[4]:  c[i] at (m, n) = (g + 8*(i/2), 2t + i%2)
// The *_coord functions below are these maps; the emulation uses them too, and
// tests/cpp/test_mma_layout_cute.cpp checks them against CuTe's MMA_Traits for the SM80 atoms.
// "row.col" means A is read along K within a row and B along K within a column (B^T row-major):
// an (N, K) row-major B tile gives each lane two consecutive K elements, as ldmatrix without .trans
// delivers them.
//
// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: lanes 8j..8j+7 give the 16-byte row addresses of
// matrix j (j < N; the other lanes' addresses are ignored). Lane l receives in r[j] the elements
// (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j, or with .trans (rows 2(l%4), 2(l%4)+1, col l/4).
// cp.async.{ca,cg}.shared.global: `bytes` (ca: 4, 8 or 16; cg: 16 only, as in PTX) from global to
// shared, both aligned to `bytes`; the _zfill forms read src_bytes <= bytes and zero the rest (for
// tile edges). commit_group closes the thread's open group; wait_group<N> waits until at most N of
// the thread's groups are pending. As on the device, a copy is visible to other threads only after
// the issuing thread's wait and a barrier.
//
// Host (emulation) semantics, and what is approximated:
// - mma: every lane contributes its A and B registers through the emulation's warp collective
//   (three 64-bit all-gathers, all 32 lanes, as .aligned requires; an exited lane is an error),
//   rebuilds the tiles with the layouts above and computes its own D fragment. Products are exact
//   in fp32 (bf16/f16/tf32 significands are at most 11 bits; only bf16 products that underflow fp32
//   are not); they are summed onto c in fp32, in k order, rounding to nearest at each step. The
//   hardware's internal order and rounding of that sum differ (and are not documented), so results
//   may differ from a GPU's in the last bits of the accumulator: compare with a tolerance.
// - tf32 operands: the low 13 bits of each 32-bit register are ignored (truncation toward zero), as
//   tensor cores do with raw fp32 bit patterns; the PTX ISA leaves non-tf32 inputs unspecified.
//   Round explicitly with float_to_tf32 (cvt.rna.tf32.f32: to nearest, ties away from zero) first
//   and this choice does not matter. bf16 -> tf32 is exact.
// - ldmatrix: the row addresses are all-gathered; each lane then reads its own elements from them,
//   so ASan and TSan see the reads. Misaligned row addresses fail the launch. That the addresses
//   lie in shared memory is not checked.
// - cp.async: deferred. The copy is recorded at issue and performed by the issuing thread when a
//   wait_group / wait_all retires its group, so a read before the wait sees the destination's old
//   contents (for shared memory, the emulation's NaN poison) and TSan sees a read racing the wait
//   of another thread that skipped the barrier. Copies still pending when a block ends are dropped
//   (the kernel never waited for them). The source is read at the wait, not at issue: the device
//   may read it any time in between, so a kernel must not write it in that window anyway. Each
//   copy counts as a global load of src_bytes at issue (mhr_emu::count_global, traffic.h).
// - Each mma reports its 2*M*N*K flops once per warp (mhr_emu::count_tensor_core_flops): to the
//   running launch's traffic record, and to mhr_ops::emulated_tensor_core_flops().
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "mma.cuh: mma.sync m16n8k16 / ldmatrix / cp.async need sm_80 or newer"
#endif

#if defined(MHR_OPS_CUDA_EMULATION)
#include <cstring>
#include <source_location>
#include <stdexcept>
#include <string>

#include "simt.h"
// The caller's line, for the emulation's error messages (a defaulted trailing parameter).
#define MHR_MMA_WHERE , std::source_location where = std::source_location::current()
#define MHR_MMA_SITE (::mhr_emu::Site{where.file_name(), static_cast<int>(where.line())})
#else
#define MHR_MMA_WHERE
#endif

namespace mhr_ops {

// (row, col) of one fragment element in its tile: (m, k) for A, (k, n) for B, (m, n) for C/D.
struct FragCoord {
  int row;
  int col;
};

// m16n8k16 bf16/f16: A element i in 0..7 of `lane` (register i/2, half i%2) -> (m, k).
MHR_HD constexpr FragCoord mma_m16n8k16_a_coord(int lane, int i) {
  return {lane / 4 + 8 * ((i / 2) % 2), 2 * (lane % 4) + i % 2 + 8 * (i / 4)};
}
// m16n8k16 bf16/f16: B element i in 0..3 (register i/2, half i%2) -> (k, n).
MHR_HD constexpr FragCoord mma_m16n8k16_b_coord(int lane, int i) {
  return {2 * (lane % 4) + i % 2 + 8 * (i / 2), lane / 4};
}
// m16n8k8 tf32: A register i in 0..3 -> (m, k).
MHR_HD constexpr FragCoord mma_m16n8k8_tf32_a_coord(int lane, int i) {
  return {lane / 4 + 8 * (i % 2), lane % 4 + 4 * (i / 2)};
}
// m16n8k8 tf32: B register i in 0..1 -> (k, n).
MHR_HD constexpr FragCoord mma_m16n8k8_tf32_b_coord(int lane, int i) { return {lane % 4 + 4 * i, lane / 4}; }
// C and D of both shapes: element i in 0..3 -> (m, n).
MHR_HD constexpr FragCoord mma_m16n8_c_coord(int lane, int i) {
  return {lane / 4 + 8 * (i / 2), 2 * (lane % 4) + i % 2};
}
// ldmatrix m8n8 b16: element i in 0..1 of a lane's register for one matrix -> (row, col) in it.
MHR_HD constexpr FragCoord ldmatrix_coord(int lane, int i, bool trans) {
  return trans ? FragCoord{2 * (lane % 4) + i, lane / 4} : FragCoord{lane / 4, 2 * (lane % 4) + i};
}

#if defined(MHR_OPS_CUDA_EMULATION)
namespace mma_emu {

enum class MmaKind { kBF16, kF16, kTF32 };

[[noreturn]] inline void fail(const std::string& what, mhr_emu::Site site) {
  // Ends the block with this message (the launcher turns exceptions into a launch failure).
  throw std::runtime_error(what + " at " + site.file + ":" + std::to_string(site.line));
}

// Every lane's registers: out[lane][j] = regs[j] of that lane. n is even.
template <int n>
void all_gather(const uint32_t (&regs)[n], uint32_t (&out)[32][n], mhr_emu::Site site) {
  static_assert(n % 2 == 0, "registers travel in pairs");
  uint64_t values[32];
  for (int p = 0; p < n / 2; ++p) {
    const uint64_t mine = regs[2 * p] | (uint64_t{regs[2 * p + 1]} << 32);
    mhr_emu::warp_collective(mhr_emu::WarpOp::kShfl, 0xffffffffu, mine, 0, site, values);
    for (int l = 0; l < 32; ++l) {
      out[l][2 * p] = static_cast<uint32_t>(values[l]);
      out[l][2 * p + 1] = static_cast<uint32_t>(values[l] >> 32);
    }
  }
}

inline float b16_to_float(uint16_t bits, MmaKind kind) {
  if (kind == MmaKind::kBF16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline float tf32_to_float(uint32_t bits) { return mhr_emu::from_bits<float>(bits & 0xffffe000u); }

template <MmaKind kind>
void mma_m16n8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], mhr_emu::Site site) {
  constexpr int K = kind == MmaKind::kTF32 ? 8 : 16;
  uint32_t all_a[32][4], all_b[32][2];
  all_gather(a, all_a, site);
  all_gather(b, all_b, site);
  float A[16][K], B[K][8];  // A (m, k), B (k, n)
  for (int l = 0; l < 32; ++l) {
    if constexpr (kind == MmaKind::kTF32) {
      for (int i = 0; i < 4; ++i) {
        const FragCoord p = mma_m16n8k8_tf32_a_coord(l, i);
        A[p.row][p.col] = tf32_to_float(all_a[l][i]);
      }
      for (int i = 0; i < 2; ++i) {
        const FragCoord p = mma_m16n8k8_tf32_b_coord(l, i);
        B[p.row][p.col] = tf32_to_float(all_b[l][i]);
      }
    } else {
      for (int i = 0; i < 8; ++i) {
        const FragCoord p = mma_m16n8k16_a_coord(l, i);
        A[p.row][p.col] = b16_to_float(static_cast<uint16_t>(all_a[l][i / 2] >> (16 * (i % 2))), kind);
      }
      for (int i = 0; i < 4; ++i) {
        const FragCoord p = mma_m16n8k16_b_coord(l, i);
        B[p.row][p.col] = b16_to_float(static_cast<uint16_t>(all_b[l][i / 2] >> (16 * (i % 2))), kind);
      }
    }
  }
  const int lane = mhr_emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    const FragCoord p = mma_m16n8_c_coord(lane, i);
    float acc = c[i];
    for (int k = 0; k < K; ++k) acc += A[p.row][k] * B[k][p.col];  // the product is exact in fp32
    d[i] = acc;
  }
  if (lane == 0) mhr_emu::count_tensor_core_flops(2ull * 16 * 8 * K);
}

template <int n, bool trans>
void ldmatrix(uint32_t (&r)[n], const void* row_addr, mhr_emu::Site site) {
  static_assert(n == 1 || n == 2 || n == 4, "ldmatrix loads 1, 2 or 4 matrices");
  uint64_t rows[32];
  mhr_emu::warp_collective(mhr_emu::WarpOp::kShfl, 0xffffffffu, reinterpret_cast<uintptr_t>(row_addr), 0, site, rows);
  for (int l = 0; l < 8 * n; ++l)
    if (rows[l] % 16 != 0)
      fail("ldmatrix: lane " + std::to_string(l) + " gives a row address not aligned to 16 bytes", site);
  const int lane = mhr_emu::lane_id();
  for (int j = 0; j < n; ++j) {
    uint32_t reg = 0;
    for (int i = 0; i < 2; ++i) {
      const FragCoord p = ldmatrix_coord(lane, i, trans);
      uint16_t v;
      std::memcpy(&v, reinterpret_cast<const char*>(rows[8 * j + p.row]) + 2 * p.col, 2);
      reg |= uint32_t{v} << (16 * i);
    }
    r[j] = reg;
  }
}

// The issuing thread's cp.async copies not yet performed, by commit group; reset per block.
struct AsyncCopies {
  struct Copy {
    void* dst;
    const void* src;
    int bytes, src_bytes;
    int group;  // the commit group it belongs to (committed_ at issue time)
  };
  static constexpr int kMaxPending = 512;
  Copy pending[kMaxPending];
  int count = 0;
  int committed = 0;  // groups committed so far; an uncommitted copy has group == committed
  uint64_t block = 0;

  static AsyncCopies& mine() {
    thread_local AsyncCopies q;
    const uint64_t b = mhr_emu::block_serial();
    if (q.block != b) {  // a new block: what an earlier one left pending died with it
      q.count = 0;
      q.committed = 0;
      q.block = b;
    }
    return q;
  }
  // Performs every copy of a group < `first_kept`, in issue order, and forgets them.
  void retire_before(int first_kept) {
    int kept = 0;
    for (int i = 0; i < count; ++i) {
      const Copy& x = pending[i];
      if (x.group < first_kept) {
        if (x.src_bytes > 0) std::memcpy(x.dst, x.src, x.src_bytes);
        if (x.bytes > x.src_bytes) std::memset(static_cast<char*>(x.dst) + x.src_bytes, 0, x.bytes - x.src_bytes);
      } else {
        pending[kept++] = x;
      }
    }
    count = kept;
  }
};

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes, mhr_emu::Site site) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("cp.async: a " + std::to_string(bytes) + "-byte copy needs addresses aligned to " + std::to_string(bytes),
         site);
  if (src_bytes < 0 || src_bytes > bytes)
    fail("cp.async: src_bytes " + std::to_string(src_bytes) + " is outside 0.." + std::to_string(bytes), site);
  mhr_emu::count_global(src, static_cast<size_t>(src_bytes), mhr_emu::GlobalAccess::kLoad);
  AsyncCopies& q = AsyncCopies::mine();
  if (q.count == AsyncCopies::kMaxPending)
    fail("cp.async: more than " + std::to_string(AsyncCopies::kMaxPending) + " copies pending in one thread", site);
  q.pending[q.count++] = {dst, src, bytes, src_bytes, q.committed};
}

}  // namespace mma_emu

// Tensor-core flops of every mma the emulation has run (2*M*N*K each, once per warp).
inline unsigned long long emulated_tensor_core_flops() { return mhr_emu::total_tensor_core_flops(); }
#endif  // MHR_OPS_CUDA_EMULATION

#if defined(__CUDACC__)
#define MHR_MMA_FN __device__ __forceinline__
#else
#define MHR_MMA_FN inline
#endif

// The host pass of a CUDA compile sees the wrappers' bodies empty (they are device-only PTX).
#if defined(__CUDACC__) && !defined(__CUDA_ARCH__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#define MHR_MMA_HOST_PASS
#endif

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned: D = A * B + C, fp32 accumulate. All 32 lanes of the warp, converged.

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
MHR_MMA_FN void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                  const float (&c)[4] MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::mma_m16n8<mma_emu::MmaKind::kBF16>(d, a, b, c, MHR_MMA_SITE);
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
MHR_MMA_FN void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4] MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::mma_m16n8<mma_emu::MmaKind::kF16>(d, a, b, c, MHR_MMA_SITE);
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (a and b hold tf32 bit patterns)
MHR_MMA_FN void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4] MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::mma_m16n8<mma_emu::MmaKind::kTF32>(d, a, b, c, MHR_MMA_SITE);
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// cvt.rna.tf32.f32: fp32 -> tf32 bit pattern, to nearest with ties away from zero.
MHR_MMA_FN uint32_t float_to_tf32(float x) {
#if defined(MHR_OPS_CUDA_EMULATION)
  const uint32_t bits = mhr_emu::from_bits<uint32_t>(mhr_emu::to_bits(x));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;  // NaN: the canonical NaN
  if ((bits & 0x7fffffffu) == 0x7f800000u) return bits;        // inf
  return (bits + 0x1000u) & 0xffffe000u;                       // adding half an ulp to the magnitude rounds ties away
#elif defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return 0;
#endif
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16. `row` is this lane's row address in shared
// memory (16-byte aligned); see the top of the file for which lanes' rows are used.

#if defined(MHR_OPS_CUDA_EMULATION)
#define MHR_LDMATRIX(n, trans) mma_emu::ldmatrix<n, trans>(r, row, MHR_MMA_SITE)
#elif defined(__CUDA_ARCH__)
#define MHR_SMEM_ADDR(p) static_cast<uint32_t>(__cvta_generic_to_shared(p))
#endif

MHR_MMA_FN void ldmatrix_x1(uint32_t (&r)[1], const void* row MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  MHR_LDMATRIX(1, false);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(MHR_SMEM_ADDR(row)));
#endif
}
MHR_MMA_FN void ldmatrix_x2(uint32_t (&r)[2], const void* row MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  MHR_LDMATRIX(2, false);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(MHR_SMEM_ADDR(row)));
#endif
}
MHR_MMA_FN void ldmatrix_x4(uint32_t (&r)[4], const void* row MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  MHR_LDMATRIX(4, false);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(MHR_SMEM_ADDR(row)));
#endif
}
MHR_MMA_FN void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  MHR_LDMATRIX(1, true);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(MHR_SMEM_ADDR(row)));
#endif
}
MHR_MMA_FN void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  MHR_LDMATRIX(2, true);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(MHR_SMEM_ADDR(row)));
#endif
}
MHR_MMA_FN void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  MHR_LDMATRIX(4, true);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(MHR_SMEM_ADDR(row)));
#endif
}

// ---------------------------------------------------------------------------------------------
// cp.async (per thread, no warp convergence needed).

// cp.async.ca.shared.global: kBytes (4, 8 or 16) from global src to shared dst, cached in L1.
template <int kBytes>
MHR_MMA_FN void cp_async_ca(void* dst, const void* src MHR_MMA_WHERE) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::cp_async(dst, src, kBytes, kBytes, MHR_MMA_SITE);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(MHR_SMEM_ADDR(dst)), "l"(src), "n"(kBytes));
#endif
}
// The same, reading only src_bytes (0..kBytes) and zero-filling the rest of dst.
template <int kBytes>
MHR_MMA_FN void cp_async_ca_zfill(void* dst, const void* src, int src_bytes MHR_MMA_WHERE) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::cp_async(dst, src, kBytes, src_bytes, MHR_MMA_SITE);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(MHR_SMEM_ADDR(dst)), "l"(src), "n"(kBytes),
               "r"(src_bytes));
#endif
}
// cp.async.cg.shared.global: 16 bytes (the only size PTX allows for .cg), bypassing L1.
MHR_MMA_FN void cp_async_cg(void* dst, const void* src MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::cp_async(dst, src, 16, 16, MHR_MMA_SITE);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(MHR_SMEM_ADDR(dst)), "l"(src));
#endif
}
MHR_MMA_FN void cp_async_cg_zfill(void* dst, const void* src, int src_bytes MHR_MMA_WHERE) {
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::cp_async(dst, src, 16, src_bytes, MHR_MMA_SITE);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(MHR_SMEM_ADDR(dst)), "l"(src), "r"(src_bytes));
#endif
}

// cp.async.commit_group: the thread's copies issued since the last commit form one group.
MHR_MMA_FN void cp_async_commit_group() {
#if defined(MHR_OPS_CUDA_EMULATION)
  ++mma_emu::AsyncCopies::mine().committed;
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// cp.async.wait_group N: waits until at most kPending of the thread's committed groups are
// incomplete (copies never committed are not waited for, as in PTX).
template <int kPending>
MHR_MMA_FN void cp_async_wait_group() {
  static_assert(kPending >= 0 && kPending < 8, "wait_group takes a small immediate");
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::AsyncCopies& q = mma_emu::AsyncCopies::mine();
  q.retire_before(q.committed - kPending);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// cp.async.wait_all: commits the open group and waits for every copy of the thread.
MHR_MMA_FN void cp_async_wait_all() {
#if defined(MHR_OPS_CUDA_EMULATION)
  mma_emu::AsyncCopies& q = mma_emu::AsyncCopies::mine();
  q.retire_before(++q.committed);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

#if defined(MHR_MMA_HOST_PASS)
#pragma GCC diagnostic pop
#undef MHR_MMA_HOST_PASS
#endif

}  // namespace mhr_ops

#undef MHR_MMA_FN
#undef MHR_MMA_WHERE
#undef MHR_LDMATRIX
#undef MHR_SMEM_ADDR
#if defined(MHR_OPS_CUDA_EMULATION)
#undef MHR_MMA_SITE
#endif
