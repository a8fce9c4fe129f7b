// Counted global-memory traffic of emulated kernel launches (the traffic model of bench/NOTES.md).
// Kernels reach global memory through ld_global / st_global (common.h), atomic_add_global
// (cuda_primitives.cuh) and the cp.async wrappers (mma.cuh), which report each access here before
// performing it; the mma wrappers report their tensor-core flops. Included by simt.h, and by
// common.h in emulation builds (shared host/device code counts its accesses too).
//
// Counting is off by default: count_global then costs one relaxed atomic load. Turn it on with
// set_traffic_counting(true) or MHR_EMU_COUNT_TRAFFIC=1 in the environment; every launch that
// starts while it is on leaves one LaunchTraffic record (cudaMemset leaves one too, as a fully
// coalesced write). Accesses outside a counted launch (host code, a launch that began with
// counting off) are ignored.
//
// Warp requests. The device coalesces the accesses that the lanes of a warp issue with one
// instruction. The emulation runs lanes as independent threads, so it identifies a request as
// (block, warp, k, kind): the k-th counted access of each lane of the warp. Lanes of a convergent
// warp issue their k-th counted access together, so this is exact for convergent code; where lanes
// diverge (a lane skips an access the others make, or loops a different number of times), later
// accesses pair up differently and the per-request figures are an approximation. Byte and
// distinct-sector counts do not depend on this pairing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mhr_emu {

enum class GlobalAccess : int { kLoad = 0, kStore = 1, kAtomic = 2 };

// One global access of `bytes` bytes at `address` by the calling CUDA thread (bytes may be 0: a
// zero-filling cp.async that reads nothing, still one access of the lane).
void count_global(const void* address, size_t bytes, GlobalAccess kind);

// Tensor-core flops of one mma (2*M*N*K), reported once per warp by the mma wrappers.
void count_tensor_core_flops(uint64_t flops);
// Every tensor-core flop the emulation has run in this process, counting on or off.
uint64_t total_tensor_core_flops();

constexpr uint64_t kSectorBytes = 32;

// One launch's counts. Arrays are indexed by GlobalAccess (load, store, atomic).
struct LaunchTraffic {
  std::string kernel;  // the MHR_LAUNCH spelling, or "cudaMemset"
  unsigned grid[3] = {0, 0, 0};
  unsigned block[3] = {0, 0, 0};
  uint64_t bytes[3] = {0, 0, 0};            // bytes requested by the threads
  uint64_t accesses[3] = {0, 0, 0};         // thread-level accesses
  uint64_t sectors[3] = {0, 0, 0};          // distinct 32-byte sectors touched, per kind
  uint64_t read_sectors = 0;                // distinct sectors loaded or atomically updated
  uint64_t written_sectors = 0;             // distinct sectors stored or atomically updated
  uint64_t union_sectors = 0;               // distinct sectors touched in any way
  uint64_t requests[3] = {0, 0, 0};         // warp requests (see above)
  uint64_t request_sectors[3] = {0, 0, 0};  // sum over requests of the request's distinct sectors
  uint64_t tensor_core_flops = 0;

  // Sum of sectors over requests / (requested bytes / 128): 4 for a coalesced warp access of 2 or
  // 4 bytes a lane, 32 when every lane hits its own sector. 0 when nothing was requested.
  double sectors_per_request() const;
  double sectors_per_request(GlobalAccess kind) const;
  // What DRAM moves with a perfect L2: each sector read once if loaded or atomically updated,
  // written back once if stored or atomically updated.
  uint64_t dram_bytes() const { return kSectorBytes * (read_sectors + written_sectors); }
};

void set_traffic_counting(bool on);
bool traffic_counting();
// The records of the launches since the last reset, in launch order.
std::vector<LaunchTraffic> launch_records();
void reset_launch_records();

}  // namespace mhr_emu
