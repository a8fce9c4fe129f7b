// The runtime of the host CUDA emulation (see simt.h): thread pool, blocks, barriers, warp
// collectives, shared memory, launch limits and the CUDA runtime calls the launchers use.
#include "simt.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iterator>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define MHR_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#else
#define MHR_EMU_POISON(p, n) ((void)(p), (void)(n))
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace mhr_emu {
namespace {

using Clock = std::chrono::steady_clock;

// Launch limits of an H100 / H200 (sm_90), as the driver enforces them.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535, 65535};
constexpr int kDefaultSharedBytes = 48 * 1024;
constexpr int kMaxOptInSharedBytes = 227 * 1024;
constexpr int kMultiProcessors = 132;
std::atomic<int> g_multiprocessors{kMultiProcessors};  // what the device attribute reports

struct Cancelled {};  // unwinds the threads of a failed block

// Blocking on a 32-bit atomic with the futex directly: std::atomic::wait first spins with
// sched_yield, which on a machine with far more threads than cores costs more than it saves.
// Memory ordering comes from the atomic loads and stores around these calls.
int spin_yields() {
  static const int n = [] {
    const char* env = std::getenv("MHR_EMU_SPIN");
    return env ? std::atoi(env) : 4;  // a few yields first: cheaper than a futex sleep and wake
  }();
  return n;
}
void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  for (int i = spin_yields(); i > 0; --i) {
    if (word.load(std::memory_order_acquire) != expected) return;
    sched_yield();
  }
  while (word.load(std::memory_order_acquire) == expected)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

double deadlock_seconds() {
  static const double s = [] {
    const char* env = std::getenv("MHR_EMU_DEADLOCK_SECONDS");
    return env ? std::atof(env) : 2.0;
  }();
  return s;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync:
      return "__syncwarp";
    case WarpOp::kShfl:
      return "__shfl*_sync";
    case WarpOp::kBallot:
      return "__ballot/__any/__all_sync";
  }
  return "?";
}

struct Collective {
  WarpOp op;
  uint32_t mask;
  Site site;
  uint32_t arrived = 0, ballot = 0;   // under the warp's mutex
  bool complete = false;              // under the warp's mutex
  std::atomic<uint32_t> state{0};     // 0 pending, 1 complete, 2 cancelled; waiters block on it
  std::atomic<uint32_t> departed{0};  // lanes done reading; the last one frees the record
  uint64_t values[32] = {};
};

struct Warp {
  std::mutex m;
  std::list<Collective> open;
  uint32_t exited = 0;  // lanes that returned, or do not exist in a partial last warp
};

struct SharedAlloc {
  const void* key;
  void* base;  // to free
  void* storage;
};

struct Block {
  const char* kernel;
  uint3 idx;
  int threads;
  int smem_limit;
  size_t dynamic_bytes;

  std::mutex m;  // shared allocations, the error message

  // The block barrier, lock-free: 256 OS threads on a few cores must not queue on a mutex.
  std::atomic<uint64_t> counts{0};      // live threads << 32 | threads arrived at the barrier
  std::atomic<uint32_t> generation{0};  // barrier phases; waiters block on it (futex)
  std::atomic<uint64_t> site_tag{0};    // call site and kind of the current phase, 0 between phases
  std::atomic<const char*> site_file{nullptr};
  std::atomic<int> site_line{0};
  std::atomic<int> votes{0};  // arrivals with a true predicate
  int result = 0;             // written by the completing thread before the phase ends

  // Watchdog bookkeeping, always updated relaxed: an acquire/release here would order the threads
  // of the block for TSan and hide the races it exists to find.
  std::atomic<int> waiting{0};        // threads in an incomplete barrier or warp collective
  std::atomic<uint64_t> progress{0};  // bumped by every arrival, completion and exit
  std::atomic<bool> cancelled{false};
  std::string error;

  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<SharedAlloc> shared;
  size_t shared_bytes = 0;
  void* dynamic_base = nullptr;  // allocated when the kernel first declares it
  void* dynamic = nullptr;
};

thread_local Block* t_block = nullptr;
thread_local int t_thread = 0;  // linear thread index in the block

Block& current_block() {
  if (t_block == nullptr) {
    std::fprintf(stderr, "mhr_emu: a device intrinsic was called outside a kernel launch\n");
    std::abort();
  }
  return *t_block;
}

std::string where(const Block& b) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "kernel %s, block (%u,%u,%u)", b.kernel, b.idx.x, b.idx.y, b.idx.z);
  return buf;
}

std::string site_str(Site s) { return std::string(s.file ? s.file : "?") + ":" + std::to_string(s.line); }

// Ends the block: records the first message, wakes every waiter (they unwind with Cancelled).
// `who` names the thread that found the problem. Called with no lock held.
void cancel(Block& b, const std::string& what, const std::string& who) {
  {
    std::lock_guard<std::mutex> lk(b.m);
    if (b.error.empty()) b.error = where(b) + who + ": " + what;
  }
  b.cancelled.store(true);
  b.generation.fetch_add(1);
  futex_wake_all(b.generation);
  for (auto& w : b.warps) {
    std::lock_guard<std::mutex> lk(w->m);
    for (Collective& c : w->open) {
      uint32_t pending = 0;
      if (c.state.compare_exchange_strong(pending, 2)) futex_wake_all(c.state);
    }
  }
}

std::string this_thread() { return ", thread " + std::to_string(t_thread); }

[[noreturn]] void fail(Block& b, const std::string& what) {
  cancel(b, what, this_thread());
  throw Cancelled{};
}

int live_of(uint64_t counts) { return static_cast<int>(counts >> 32); }
int arrived_of(uint64_t counts) { return static_cast<int>(counts & 0xffffffffu); }

// Ends the current barrier phase; called by exactly one thread, the one whose arrival (or exit)
// made every live thread arrived.
void complete_barrier(Block& b, BarrierKind kind, int arrived) {
  const int votes = b.votes.load();
  b.result = kind == BarrierKind::kCount ? votes
             : kind == BarrierKind::kOr  ? votes > 0
             : kind == BarrierKind::kAnd ? votes == arrived
                                         : 0;
  b.votes.store(0);
  b.site_tag.store(0);
  b.waiting.fetch_sub(arrived, std::memory_order_relaxed);
  b.counts.fetch_sub(static_cast<uint64_t>(arrived));
  b.progress.fetch_add(1, std::memory_order_relaxed);
  b.generation.fetch_add(1, std::memory_order_release);
  futex_wake_all(b.generation);
}

void thread_exit(Block& b, int thread) {
  Warp& w = *b.warps[thread / 32];
  const uint32_t bit = 1u << (thread % 32);
  std::string problem;
  {
    std::lock_guard<std::mutex> lk(w.m);
    w.exited |= bit;
    for (const Collective& c : w.open)
      if (!c.complete && (c.mask & bit) && !(c.arrived & bit))
        problem = "lane " + std::to_string(thread % 32) + " exited while lanes of mask 0x" +
                  [&] {
                    char h[16];
                    std::snprintf(h, sizeof h, "%08x", c.mask);
                    return std::string(h);
                  }() +
                  " wait for it in " + op_name(c.op) + " at " + site_str(c.site);
  }
  if (!problem.empty() && !b.cancelled.load()) cancel(b, problem, ", thread " + std::to_string(thread));
  b.progress.fetch_add(1, std::memory_order_relaxed);
  const uint64_t c = b.counts.fetch_sub(uint64_t{1} << 32, std::memory_order_acq_rel) - (uint64_t{1} << 32);
  if (arrived_of(c) > 0 && arrived_of(c) == live_of(c))
    complete_barrier(b, static_cast<BarrierKind>(b.site_tag.load() & 3), arrived_of(c));
}

std::string hex(uint32_t v) {
  char h[16];
  std::snprintf(h, sizeof h, "0x%08x", v);
  return h;
}

// A pool of OS threads, reused across blocks and launches; run(n, f) calls f(0..n-1) on n of
// them and waits for all.
class Pool {
 public:
  void run(int n, const std::function<void(int)>& f) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      std::thread([this, w] { loop(*w); }).detach();  // lives as long as the process
    }
    body_ = &f;
    remaining_.store(n);
    const uint32_t round = done_.load();
    for (int i = 0; i < n; ++i) {
      workers_[i]->index = i;
      workers_[i]->go.fetch_add(1, std::memory_order_release);
      futex_wake_all(workers_[i]->go);
    }
    futex_wait(done_, round);
  }

 private:
  struct Worker {
    std::atomic<uint32_t> go{0};  // bumped once per job
    int index = 0;
  };
  void loop(Worker& w) {
    for (uint32_t seen = 0;; ++seen) {
      futex_wait(w.go, seen);
      (*body_)(w.index);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        done_.fetch_add(1, std::memory_order_release);
        futex_wake_all(done_);
      }
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(int)>* body_ = nullptr;
  std::atomic<int> remaining_{0};
  std::atomic<uint32_t> done_{0};  // bumped when a run's last job ends
};

// Declares a deadlock once every live thread of the running block has waited, with no progress,
// for MHR_EMU_DEADLOCK_SECONDS (default 2).
class Watchdog {
 public:
  void watch(Block* b) {
    std::lock_guard<std::mutex> lk(m_);
    block_ = b;
    if (!started_) {
      started_ = true;
      std::thread([this] { loop(); }).detach();
    }
  }

 private:
  void loop() {
    Block* last = nullptr;
    uint64_t seen = 0;
    auto since = Clock::now();
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::lock_guard<std::mutex> lk(m_);
      Block* b = block_;
      // A block whose threads have all exited cannot deadlock: under heavy load the launcher may
      // take seconds to move on to the next block, which is not a hang.
      if (b == nullptr || b->cancelled.load() || live_of(b->counts.load()) == 0) {
        since = Clock::now();
        continue;
      }
      const uint64_t progress = b->progress.load(std::memory_order_relaxed);
      if (b != last || progress != seen || b->waiting.load(std::memory_order_relaxed) < live_of(b->counts.load())) {
        last = b;
        seen = progress;
        since = Clock::now();
        continue;
      }
      if (std::chrono::duration<double>(Clock::now() - since).count() < deadlock_seconds()) continue;
      const uint64_t c = b->counts.load();
      const std::string at = arrived_of(c) ? std::to_string(arrived_of(c)) + " wait at the barrier at " +
                                                 site_str(Site{b->site_file.load(), b->site_line.load()})
                                           : std::string("none waits at a block barrier");
      cancel(*b,
             "deadlock: all " + std::to_string(live_of(c)) + " live threads have waited " +
                 std::to_string(deadlock_seconds()) + " s without progress; " + at + ", the others in warp collectives",
             "");
    }
  }

  std::mutex m_;
  Block* block_ = nullptr;
  bool started_ = false;
};

// Process-wide state: one launch at a time, CUDA's last-error rules, opted-in shared memory.
struct Runtime {
  std::mutex launch_m;
  std::mutex error_m;
  cudaError_t last_error = cudaSuccess;
  bool sticky = false;  // a fault inside a kernel, as a device fault, fails every later call
  std::string message;
  std::map<const void*, int> max_dynamic_shared;
  Pool pool;
  Watchdog watchdog;
};

Runtime& runtime() {
  static Runtime* r = new Runtime;  // never destroyed: kernels may run from static destructors
  return *r;
}

cudaError_t record_error(cudaError_t err, const std::string& msg, bool sticky) {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lk(rt.error_m);
  std::fprintf(stderr, "mhr_emu: %s\n", msg.c_str());
  if (rt.sticky) return rt.last_error;
  rt.last_error = err;
  rt.message = msg;
  rt.sticky = sticky;
  return err;
}

cudaError_t sticky_error() {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lk(rt.error_m);
  return rt.sticky ? rt.last_error : cudaSuccess;
}

// Storage aligned to exactly `align` (and not to 2 * align), ending at the allocation's end:
// ASan sees overflows, UBSan sees a use at a larger alignment than the declaration promises.
// Returns the pointer to free(); *storage is the usable start.
void* exact_storage(size_t bytes, size_t align, void** storage) {
  const size_t big = std::max<size_t>(2 * align, 16);
  void* base = nullptr;
  if (posix_memalign(&base, big, align + bytes) != 0) std::abort();
  MHR_EMU_POISON(base, align);
  *storage = static_cast<char*>(base) + align;
  std::memset(*storage, 0xFF, bytes);  // NaN bytes: reads of uninitialised floats show up as NaN
  return base;
}

// ---------------------------------------------------------------------------------------------
// Traffic counting (traffic.h). Each CUDA thread of a counted launch appends its accesses to its
// own buffer (no sharing while the block runs); the launcher merges a block's buffers after the
// block ends, when the pool's join has ordered every worker's writes before its reads.

struct Access {
  uint64_t address;
  uint32_t bytes;
  uint32_t kind;  // GlobalAccess
};

struct ThreadTraffic {
  std::vector<Access> accesses;  // in issue order: index k is the lane's k-th counted access
  uint64_t tensor_core_flops = 0;
};

bool counting_from_env() {
  const char* env = std::getenv("MHR_EMU_COUNT_TRAFFIC");
  return env != nullptr && *env != '\0' && std::strcmp(env, "0") != 0;
}
std::atomic<bool> g_counting{counting_from_env()};
std::atomic<uint64_t> g_total_tensor_core_flops{0};
thread_local ThreadTraffic* t_traffic = nullptr;  // set only while a counted launch runs the thread

// Distinct sector numbers: appended freely, sorted and deduplicated whenever the list doubles.
class SectorSet {
 public:
  void add(uint64_t sector) {
    v_.push_back(sector);
    if (v_.size() >= limit_) compact();
  }
  const std::vector<uint64_t>& sorted() {
    compact();
    return v_;
  }

 private:
  void compact() {
    std::sort(v_.begin(), v_.end());
    v_.erase(std::unique(v_.begin(), v_.end()), v_.end());
    limit_ = std::max<size_t>(size_t{1} << 20, 2 * v_.size());
  }
  std::vector<uint64_t> v_;
  size_t limit_ = size_t{1} << 20;
};

// Size of the union of two sorted, duplicate-free lists.
uint64_t union_size(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  uint64_t n = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const uint64_t x = a[i], y = b[j];
    i += x <= y;
    j += y <= x;
    ++n;
  }
  return n + (a.size() - i) + (b.size() - j);
}

class LaunchCounter {
 public:
  LaunchCounter(const char* kernel, dim3 grid, dim3 block) {
    rec_.kernel = kernel;
    rec_.grid[0] = grid.x, rec_.grid[1] = grid.y, rec_.grid[2] = grid.z;
    rec_.block[0] = block.x, rec_.block[1] = block.y, rec_.block[2] = block.z;
  }

  // Merges one finished block's per-thread buffers (and empties them for the next block).
  void add_block(std::vector<ThreadTraffic>& threads) {
    const int n = static_cast<int>(threads.size());
    for (int w0 = 0; w0 < n; w0 += 32) {
      const int w1 = std::min(n, w0 + 32);
      size_t longest = 0;
      for (int t = w0; t < w1; ++t) longest = std::max(longest, threads[t].accesses.size());
      for (size_t k = 0; k < longest; ++k) {  // request k of this warp: each lane's k-th access
        bool issued[3] = {false, false, false};
        for (std::vector<uint64_t>& s : scratch_) s.clear();
        for (int t = w0; t < w1; ++t) {
          const std::vector<Access>& acc = threads[t].accesses;
          if (k >= acc.size()) continue;
          const Access& a = acc[k];
          issued[a.kind] = true;
          rec_.bytes[a.kind] += a.bytes;
          ++rec_.accesses[a.kind];
          if (a.bytes == 0) continue;
          for (uint64_t s = a.address / kSectorBytes; s <= (a.address + a.bytes - 1) / kSectorBytes; ++s)
            scratch_[a.kind].push_back(s);
        }
        for (int kind = 0; kind < 3; ++kind) {
          if (!issued[kind]) continue;
          std::vector<uint64_t>& s = scratch_[kind];
          std::sort(s.begin(), s.end());
          s.erase(std::unique(s.begin(), s.end()), s.end());
          ++rec_.requests[kind];
          rec_.request_sectors[kind] += s.size();
          for (uint64_t x : s) sets_[kind].add(x);
        }
      }
    }
    for (ThreadTraffic& t : threads) {
      rec_.tensor_core_flops += t.tensor_core_flops;
      t.tensor_core_flops = 0;
      t.accesses.clear();  // keeps the capacity for the next block
    }
  }

  LaunchTraffic finish() {
    const std::vector<uint64_t>& loads = sets_[0].sorted();
    const std::vector<uint64_t>& stores = sets_[1].sorted();
    const std::vector<uint64_t>& atomics = sets_[2].sorted();
    rec_.sectors[0] = loads.size();
    rec_.sectors[1] = stores.size();
    rec_.sectors[2] = atomics.size();
    rec_.read_sectors = union_size(loads, atomics);
    rec_.written_sectors = union_size(stores, atomics);
    std::vector<uint64_t> loads_stores;
    loads_stores.reserve(loads.size() + stores.size());
    std::set_union(loads.begin(), loads.end(), stores.begin(), stores.end(), std::back_inserter(loads_stores));
    rec_.union_sectors = union_size(loads_stores, atomics);
    return rec_;
  }

 private:
  LaunchTraffic rec_;
  SectorSet sets_[3];
  std::vector<uint64_t> scratch_[3];
};

struct Records {
  std::mutex m;
  std::vector<LaunchTraffic> v;
};
Records& records() {
  static Records* r = new Records;  // never destroyed, as the runtime
  return *r;
}
void add_record(LaunchTraffic rec) {
  Records& r = records();
  std::lock_guard<std::mutex> lk(r.m);
  r.v.push_back(std::move(rec));
}

// cudaMemset as a fully coalesced write of [ptr, ptr + count).
void count_memset(const void* ptr, size_t count) {
  if (!g_counting.load(std::memory_order_relaxed) || count == 0) return;
  LaunchTraffic rec;
  rec.kernel = "cudaMemset";
  const uint64_t first = reinterpret_cast<uintptr_t>(ptr) / kSectorBytes;
  const uint64_t last = (reinterpret_cast<uintptr_t>(ptr) + count - 1) / kSectorBytes;
  const int k = static_cast<int>(GlobalAccess::kStore);
  rec.bytes[k] = count;
  rec.accesses[k] = rec.requests[k] = (count + 127) / 128;
  rec.sectors[k] = rec.request_sectors[k] = rec.written_sectors = rec.union_sectors = last - first + 1;
  add_record(std::move(rec));
}

}  // namespace

int lane_id() { return t_thread % 32; }

const char* last_error_message() {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lk(rt.error_m);
  return rt.message.c_str();
}

int block_barrier(BarrierKind kind, int predicate, Site site) {
  Block& b = current_block();
  if (b.cancelled.load()) throw Cancelled{};
  // The phase's call site and kind: the first arrival sets them, every other must match.
  uint64_t tag = 1469598103934665603ull;  // FNV-1a of file and line, no allocation
  for (const char* f = site.file; *f; ++f) tag = (tag ^ static_cast<unsigned char>(*f)) * 1099511628211ull;
  tag = ((tag ^ static_cast<uint64_t>(site.line)) * 1099511628211ull) << 2 | static_cast<uint64_t>(kind);
  uint64_t expected = 0;
  if (b.site_tag.compare_exchange_strong(expected, tag)) {
    b.site_file.store(site.file);
    b.site_line.store(site.line);
  } else if (expected != tag) {
    fail(b, "divergent barrier: this thread reached the barrier at " + site_str(site) +
                " while other threads wait at " + site_str(Site{b.site_file.load(), b.site_line.load()}));
  }
  if (predicate) b.votes.fetch_add(1, std::memory_order_relaxed);
  const uint32_t gen = b.generation.load(std::memory_order_acquire);
  b.waiting.fetch_add(1, std::memory_order_relaxed);
  b.progress.fetch_add(1, std::memory_order_relaxed);
  const uint64_t c = b.counts.fetch_add(1, std::memory_order_acq_rel) + 1;
  if (arrived_of(c) == live_of(c)) {
    complete_barrier(b, kind, arrived_of(c));
    return b.result;
  }
  futex_wait(b.generation, gen);
  if (b.cancelled.load()) throw Cancelled{};
  return b.result;  // the next phase cannot complete (and overwrite it) before this thread arrives
}

uint32_t warp_collective(WarpOp op, uint32_t mask, uint64_t value, int predicate, Site site, uint64_t* values) {
  Block& b = current_block();
  const int lane = t_thread % 32;
  const uint32_t bit = 1u << lane;
  Warp& w = *b.warps[t_thread / 32];
  std::unique_lock<std::mutex> lk(w.m);
  if (b.cancelled.load()) throw Cancelled{};
  auto bad = [&](const std::string& what) {
    lk.unlock();
    fail(b, what + " (" + op_name(op) + " at " + site_str(site) + ", warp " + std::to_string(t_thread / 32) +
                ", lane " + std::to_string(lane) + ")");
  };
  if (!(mask & bit)) bad("the mask " + hex(mask) + " does not name the calling lane");
  if (mask & w.exited) bad("the mask " + hex(mask) + " names exited or absent lanes " + hex(mask & w.exited));
  Collective* c = nullptr;
  for (Collective& o : w.open) {
    if (o.complete) continue;
    if (o.mask == mask && !(o.arrived & bit)) {
      if (o.op != op)
        bad("lanes of mask " + hex(mask) + " meet in different warp operations (" + op_name(o.op) + " at " +
            site_str(o.site) + ")");
      c = &o;
      break;
    }
    // Lanes of this mask waiting in a collective with another mask are not an error by
    // themselves (that one may complete first); a cycle is a deadlock, which the watchdog reports.
  }
  if (c == nullptr) {
    c = &w.open.emplace_back();
    c->op = op;
    c->mask = mask;
    c->site = site;
  }
  c->values[lane] = value;
  if (predicate) c->ballot |= bit;
  c->arrived |= bit;
  b.progress.fetch_add(1, std::memory_order_relaxed);
  if (c->arrived == mask) {
    c->complete = true;
    b.waiting.fetch_sub(__builtin_popcount(mask) - 1, std::memory_order_relaxed);
    uint32_t pending = 0;
    if (c->state.compare_exchange_strong(pending, 1, std::memory_order_release)) futex_wake_all(c->state);
  } else {
    b.waiting.fetch_add(1, std::memory_order_relaxed);
    lk.unlock();  // wait outside the mutex: 31 woken lanes must not queue on it
    futex_wait(c->state, 0);
    if (c->state.load() != 1) throw Cancelled{};
  }
  // Complete: values and ballot no longer change.
  std::memcpy(values, c->values, sizeof(c->values));
  const uint32_t ballot = c->ballot;
  if ((c->departed.fetch_or(bit, std::memory_order_acq_rel) | bit) == mask) {
    if (!lk.owns_lock()) lk.lock();
    for (auto it = w.open.begin(); it != w.open.end(); ++it)
      if (&*it == c) {
        w.open.erase(it);
        break;
      }
  }
  return ballot;
}

int shfl_source(ShflMode mode, int lane, int arg, int width, Site site) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    Block& b = current_block();
    fail(b, "shuffle width " + std::to_string(width) + " is not a power of two up to 32 (" + site_str(site) + ")");
  }
  const int base = lane & ~(width - 1), pos = lane & (width - 1);
  switch (mode) {
    case ShflMode::kIdx:
      return base + (arg & (width - 1));
    case ShflMode::kUp:
      return pos - arg >= 0 ? lane - arg : -1;
    case ShflMode::kDown:
      return pos + arg < width ? lane + arg : -1;
    case ShflMode::kXor: {
      const int src = lane ^ arg;
      return (src >= base && src < base + width) ? src : -1;
    }
  }
  return -1;
}

void WarpCall::fail_source(uint32_t mask, int src) const {
  Block& b = current_block();
  fail(b,
       "shuffle reads lane " + std::to_string(src) + ", outside the mask " + hex(mask) + " (" + site_str(site) + ")");
}

void* block_shared(const void* key, size_t bytes, size_t align, const char* name) {
  Block& b = current_block();
  std::unique_lock<std::mutex> lk(b.m);
  if (b.cancelled.load()) throw Cancelled{};
  for (const SharedAlloc& a : b.shared)
    if (a.key == key) return a.storage;
  const size_t total = b.shared_bytes + bytes + b.dynamic_bytes;
  if (total > static_cast<size_t>(b.smem_limit)) {
    lk.unlock();
    fail(b, std::string("shared memory of ") + std::to_string(total) + " bytes (static, with `" + name +
                "`, plus dynamic) exceeds the limit of " + std::to_string(b.smem_limit) +
                " bytes (48 KiB unless the kernel opted in with cudaFuncSetAttribute)");
  }
  SharedAlloc a{key, nullptr, nullptr};
  a.base = exact_storage(bytes, align, &a.storage);
  b.shared.push_back(a);
  b.shared_bytes += bytes;
  return a.storage;
}

void* dynamic_shared(size_t align) {
  Block& b = current_block();
  std::lock_guard<std::mutex> lk(b.m);
  if (b.cancelled.load()) throw Cancelled{};
  // Every declaration names the same buffer; the first one's alignment is the one it gets.
  if (b.dynamic_base == nullptr) b.dynamic_base = exact_storage(b.dynamic_bytes, align, &b.dynamic);
  return b.dynamic;
}

void launch_blocks(const char* kernel_name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                   ThreadBody body, const void* ctx) {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> launch_lock(rt.launch_m);
  if (sticky_error() != cudaSuccess) return;
  const unsigned g[3] = {grid.x, grid.y, grid.z}, t[3] = {block.x, block.y, block.z};
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  for (int i = 0; i < 3; ++i)
    if (g[i] == 0 || g[i] > kMaxGridDim[i] || t[i] == 0 || t[i] > kMaxBlockDim[i] || threads > kMaxThreadsPerBlock) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "kernel %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)",
                    kernel_name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
      record_error(cudaErrorInvalidConfiguration, buf, false);
      return;
    }
  int smem_limit = kDefaultSharedBytes;
  {
    auto it = rt.max_dynamic_shared.find(kernel);
    if (it != rt.max_dynamic_shared.end()) smem_limit = std::max(smem_limit, it->second);
  }
  if (dynamic_smem > static_cast<size_t>(smem_limit)) {
    record_error(cudaErrorInvalidValue,
                 std::string("kernel ") + kernel_name + ": " + std::to_string(dynamic_smem) +
                     " bytes of dynamic shared memory exceed the limit of " + std::to_string(smem_limit),
                 false);
    return;
  }
  const int n = static_cast<int>(threads);
  const int warps = (n + 31) / 32;
  const bool counting = g_counting.load(std::memory_order_relaxed);
  std::unique_ptr<LaunchCounter> counter;
  std::vector<ThreadTraffic> traffic;  // one buffer per thread of the block, reused across blocks
  if (counting) {
    counter = std::make_unique<LaunchCounter>(kernel_name, grid, block);
    traffic.resize(n);
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.kernel = kernel_name;
        b.idx = uint3{bx, by, bz};
        b.threads = n;
        b.counts.store(static_cast<uint64_t>(n) << 32);
        b.smem_limit = smem_limit;
        b.dynamic_bytes = dynamic_smem;
        for (int w = 0; w < warps; ++w) {
          b.warps.push_back(std::make_unique<Warp>());
          const int lanes = std::min(32, n - 32 * w);
          if (lanes < 32) b.warps.back()->exited = ~((1u << lanes) - 1u);
        }
        rt.watchdog.watch(&b);
        rt.pool.run(n, [&](int i) {
          t_block = &b;
          t_thread = i;
          threadIdx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
          blockIdx = b.idx;
          blockDim = block;
          gridDim = grid;
          t_traffic = counting ? &traffic[i] : nullptr;
          try {
            body(ctx);
          } catch (const Cancelled&) {
          } catch (const std::exception& e) {
            cancel(b, std::string("exception: ") + e.what(), this_thread());
          }
          t_traffic = nullptr;
          thread_exit(b, i);
          t_block = nullptr;
        });
        rt.watchdog.watch(nullptr);
        for (const SharedAlloc& a : b.shared) std::free(a.base);
        std::free(b.dynamic_base);
        if (b.cancelled.load()) {
          record_error(cudaErrorLaunchFailure, b.error, true);
          return;  // a failed launch leaves no traffic record
        }
        if (counter) counter->add_block(traffic);
      }
  if (counter) add_record(counter->finish());
}

// ---------------------------------------------------------------------------------------------
// For mma.cuh: the block's serial number, kept as a zero-size-accounted entry of its shared
// allocations (freed with them, not counted against the shared-memory limit).
uint64_t block_serial() {
  static std::atomic<uint64_t> next{1};
  static const char key = 0;
  Block& b = current_block();
  std::lock_guard<std::mutex> lk(b.m);
  for (const SharedAlloc& a : b.shared)
    if (a.key == &key) return *static_cast<const uint64_t*>(a.storage);
  SharedAlloc a{&key, nullptr, nullptr};
  a.base = exact_storage(sizeof(uint64_t), alignof(uint64_t), &a.storage);
  *static_cast<uint64_t*>(a.storage) = next.fetch_add(1, std::memory_order_relaxed);
  b.shared.push_back(a);
  return *static_cast<const uint64_t*>(a.storage);
}

}  // namespace mhr_emu

// ---------------------------------------------------------------------------------------------
// The CUDA runtime calls the launchers and the tests use. Memory is host memory (malloc'd at the
// exact size, so ASan sees every out-of-bounds access); streams run synchronously.
extern "C" {

cudaError_t cudaMalloc(void** ptr, size_t size) {  // 256-byte aligned, as the device's allocations
  if (posix_memalign(ptr, 256, size ? size : 1) != 0) *ptr = nullptr;
  return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind) {
  if (count) std::memmove(dst, src, count);
  return mhr_emu::sticky_error();
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, count, kind);
}
cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  if (count) std::memset(ptr, value, count);
  mhr_emu::count_memset(ptr, count);
  return mhr_emu::sticky_error();
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) { return cudaMemset(ptr, value, count); }
cudaError_t cudaGetLastError(void) {
  mhr_emu::Runtime& rt = mhr_emu::runtime();
  std::lock_guard<std::mutex> lk(rt.error_m);
  const cudaError_t err = rt.last_error;
  if (!rt.sticky) rt.last_error = cudaSuccess;
  return err;
}
cudaError_t cudaPeekAtLastError(void) {
  mhr_emu::Runtime& rt = mhr_emu::runtime();
  std::lock_guard<std::mutex> lk(rt.error_m);
  return rt.last_error;
}
const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    default:
      return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulated; see the mhr_emu message)";
    default:
      return "unknown error (emulated)";
  }
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaDeviceSynchronize(void) { return mhr_emu::sticky_error(); }
cudaError_t cudaDeviceReset(void) {  // clears a kernel fault, as destroying the context does
  mhr_emu::Runtime& rt = mhr_emu::runtime();
  std::lock_guard<std::mutex> lk(rt.error_m);
  rt.last_error = cudaSuccess;
  rt.sticky = false;
  rt.message.clear();
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return mhr_emu::sticky_error(); }
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {  // as an H100 SXM answers
    case cudaDevAttrMultiProcessorCount:
      *value = mhr_emu::g_multiprocessors.load(std::memory_order_relaxed);
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = 32;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = mhr_emu::kDefaultSharedBytes;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = mhr_emu::kMaxOptInSharedBytes;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = 228 * 1024;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor:
      *value = 2048;
      return cudaSuccess;
    case cudaDevAttrMaxRegistersPerBlock:
      *value = 65536;
      return cudaSuccess;
    case cudaDevAttrMaxGridDimX:
      *value = 2147483647;
      return cudaSuccess;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ:
      *value = 65535;
      return cudaSuccess;
    case cudaDevAttrL2CacheSize:
      *value = 50 * 1024 * 1024;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}
cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > mhr_emu::kMaxOptInSharedBytes) return cudaErrorInvalidValue;
  mhr_emu::Runtime& rt = mhr_emu::runtime();
  std::lock_guard<std::mutex> lk(rt.launch_m);
  rt.max_dynamic_shared[func] = value;
  return cudaSuccess;
}

}  // extern "C"

namespace mhr_emu {

void count_global(const void* address, size_t bytes, GlobalAccess kind) {
  if (!g_counting.load(std::memory_order_relaxed)) return;  // the whole cost when counting is off
  ThreadTraffic* t = t_traffic;
  if (t == nullptr) return;  // host code, or a launch that started with counting off
  t->accesses.push_back(
      Access{reinterpret_cast<uintptr_t>(address), static_cast<uint32_t>(bytes), static_cast<uint32_t>(kind)});
}

void count_tensor_core_flops(uint64_t flops) {
  g_total_tensor_core_flops.fetch_add(flops, std::memory_order_relaxed);
  if (ThreadTraffic* t = t_traffic) t->tensor_core_flops += flops;
}

uint64_t total_tensor_core_flops() { return g_total_tensor_core_flops.load(std::memory_order_relaxed); }

double LaunchTraffic::sectors_per_request(GlobalAccess kind) const {
  const int k = static_cast<int>(kind);
  return bytes[k] ? static_cast<double>(request_sectors[k]) * 128.0 / static_cast<double>(bytes[k]) : 0.0;
}

double LaunchTraffic::sectors_per_request() const {
  const uint64_t total_bytes = bytes[0] + bytes[1] + bytes[2];
  const uint64_t total_sectors = request_sectors[0] + request_sectors[1] + request_sectors[2];
  return total_bytes ? static_cast<double>(total_sectors) * 128.0 / static_cast<double>(total_bytes) : 0.0;
}

int set_multiprocessor_count(int n) {
  if (n < 1) {
    std::fprintf(stderr, "mhr_emu: set_multiprocessor_count(%d): expected >= 1\n", n);
    std::abort();
  }
  return g_multiprocessors.exchange(n, std::memory_order_relaxed);
}

void set_traffic_counting(bool on) { g_counting.store(on, std::memory_order_relaxed); }
bool traffic_counting() { return g_counting.load(std::memory_order_relaxed); }

std::vector<LaunchTraffic> launch_records() {
  Records& r = records();
  std::lock_guard<std::mutex> lk(r.m);
  return r.v;
}

void reset_launch_records() {
  Records& r = records();
  std::lock_guard<std::mutex> lk(r.m);
  r.v.clear();
}

}  // namespace mhr_emu
