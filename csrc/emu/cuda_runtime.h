// Emulated CUDA execution model: the kernels in csrc/kernels/*.cu compiled as host C++ and run on the CPU.
//
// Built only with -DFUSED_RESNET_EMULATED and csrc/emu first on the include path (fused_resnet/_emulated.py
// builds it; CI runs the whole CUDA test matrix through it). The kernel files are the same bytes the GPU
// build compiles; everything CUDA-specific they touch is supplied here, in cuda_fp16.h / cuda_bf16.h
// (element types) and mma.h (the WMMA primitives).
//
// What is modelled faithfully:
// - one host thread per CUDA thread, threadIdx/blockIdx/blockDim/gridDim per thread with CUDA's types
//   (unsigned components: mixed signed/unsigned arithmetic behaves as on the GPU);
// - __syncthreads as a block-wide barrier that also checks every live thread reached the *same*
//   __syncthreads (a divergent barrier is undefined behaviour in CUDA; here it aborts with both sites).
//   A thread that returns stops counting (as on sm_70+: exited threads do not block a barrier);
// - shared memory: the kernels take theirs from block_shared<S>() (csrc/kernels/device.cuh); here each
//   block gets a fresh copy filled with 0xFF bytes (NaN / -1), so a read before any write shows up as
//   NaN instead of a convenient zero or the previous block's data. `__shared__` itself is left undefined:
//   a kernel that declares shared memory any other way does not compile here;
// - launch configuration limits (block size, grid dimensions) -> cudaErrorInvalidConfiguration;
// - float/double arithmetic: IEEE with no contraction (build flag -ffp-contract=off), fma() exact as
//   the device's, __fadd_rn/__fsub_rn/__fmul_rn and their double twins rounded separately.
// What is not modelled (the GPU pass is the final word on these):
// - warp scheduling and warp-synchronous behaviour: the kernels use no warp shuffles or votes, and a
//   code path that relied on lockstep execution would not be caught here;
// - memory ordering beyond barriers and kernel boundaries (no __threadfence semantics), caches, bank
//   conflicts, timing of any kind, and the 48 KiB static shared-memory limit (ptxas enforces that in the
//   real build);
// - blocks run one after another, so a kernel whose blocks communicate through global memory would pass
//   here and could deadlock or race on a GPU.
#pragma once

#ifndef FUSED_RESNET_EMULATED
#error "csrc/emu is the emulated CUDA runtime: build with -DFUSED_RESNET_EMULATED (fused_resnet/_emulated.py)"
#endif

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <source_location>
#include <thread>
#include <vector>

// ---- qualifiers ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))  // as CUDA's own host headers define it

// ---- runtime types -------------------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaStream_t = struct CUstream_st*;

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- device math the kernels call ----------------------------------------------------------------
using std::fma;
using std::isfinite;
using std::sqrt;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
// volatile keeps each operation separately rounded whatever the optimiser does.
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline double __dsub_rn(double a, double b) { volatile double r = a - b; return r; }

namespace fused_resnet_emu {

// Threads meeting at a barrier record the call site they are at (written before arriving, read in the
// completion step); every live one must be at the same site, else the emulation aborts naming two.
inline void check_one_site(const std::vector<std::source_location>& site, const std::vector<char>& live,
                           const char* what) noexcept {
  const std::source_location* first = nullptr;
  for (size_t t = 0; t < site.size(); ++t) {
    if (!live[t]) continue;
    if (first == nullptr) { first = &site[t]; continue; }
    if (site[t].line() != first->line() || std::strcmp(site[t].file_name(), first->file_name()) != 0) {
      std::fprintf(stderr, "fused_resnet emulation: %s: %s:%u and %s:%u\n", what, first->file_name(), first->line(),
                   site[t].file_name(), site[t].line());
      std::abort();
    }
  }
}

// A warp's rendezvous for the warp-collective primitives (ldmatrix, mma.sync): every lane posts its
// operands to its input slot and arrives; the last lane to arrive computes every lane's result (the
// `compute` the lanes posted) into the output slots; each lane then reads its own. Slots alternate
// between two sets, so one meeting per collective suffices: a lane cannot post into a set before every
// lane has left the meeting that last used it. The meeting also checks convergence (.aligned: every live
// lane at the same call site).
struct Warp {
  using Compute = void (*)(Warp&, int set);
  explicit Warp(int lanes) : barrier(lanes, Completion{this}), site(static_cast<size_t>(lanes)), live(static_cast<size_t>(lanes), 1) {}
  struct Completion {
    Warp* w;
    void operator()() noexcept {
      check_one_site(w->site, w->live, "warp-collective primitive not converged");
      for (size_t t = 0; t < w->live.size(); ++t)
        if (w->live[t]) {
          w->compute_of[t](*w, w->set);
          break;
        }
      w->set ^= 1;
    }
  };
  std::barrier<Completion> barrier;
  std::vector<std::source_location> site;
  std::vector<char> live;
  Compute compute_of[32] = {};  // per lane: the collective it is at (one value once converged)
  int set = 0;  // the slot set of the current meeting; flipped by the completion step
  alignas(16) unsigned char in[2][32][64];   // per set and lane: operands (up to 64 bytes)
  alignas(16) unsigned char out[2][32][64];  // per set and lane: results
};

// A block: its __syncthreads barrier (with the divergence check), its warps and its shared memory.
struct Block {
  explicit Block(int threads)
      : barrier(threads, Completion{this}), site(static_cast<size_t>(threads)), live(static_cast<size_t>(threads), 1) {
    for (int w = 0; w * 32 < threads; ++w) warps.emplace_back(new Warp(std::min(32, threads - 32 * w)));
  }
  std::vector<std::unique_ptr<Warp>> warps;
  struct Completion {
    Block* b;
    void operator()() noexcept { check_one_site(b->site, b->live, "divergent __syncthreads in one block"); }
  };
  std::barrier<Completion> barrier;
  std::vector<std::source_location> site;  // written before arriving, read in the completion step
  std::vector<char> live;
  struct Region {
    const void* key;
    void* ptr;
    size_t align;
  };
  std::mutex regions_mutex;
  std::vector<Region> regions;  // the block's shared memory, one region per type asked for
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  ~Block() {
    for (Region& r : regions) ::operator delete(r.ptr, std::align_val_t(r.align));
  }
  void* shared(const void* key, size_t bytes, size_t align) {
    std::lock_guard<std::mutex> lock(regions_mutex);
    for (Region& r : regions)
      if (r.key == key) return r.ptr;
    align = std::max<size_t>(align, 128);
    void* p = ::operator new(bytes, std::align_val_t(align));
    std::memset(p, 0xFF, bytes);
    regions.push_back(Region{key, p, align});
    return p;
  }
};

inline thread_local Block* current_block = nullptr;
inline thread_local int current_thread = 0;

// A barrier site to skip (file suffix:line), for proving that the race detector sees a missing barrier:
// FUSED_RESNET_EMU_DROP_BARRIER=gemm_tile.cuh:123. Every thread skips it, so the barrier stays uniform.
inline bool dropped(const std::source_location& loc) {
  static const char* spec = std::getenv("FUSED_RESNET_EMU_DROP_BARRIER");
  if (spec == nullptr || *spec == '\0') return false;
  const char* colon = std::strrchr(spec, ':');
  if (colon == nullptr || std::atoi(colon + 1) != static_cast<int>(loc.line())) return false;
  const size_t n = static_cast<size_t>(colon - spec), len = std::strlen(loc.file_name());
  return len >= n && std::strncmp(loc.file_name() + len - n, spec, n) == 0;
}

template <class S>
S& block_shared() {
  static const char key = 0;  // one per type S
  return *static_cast<S*>(current_block->shared(&key, sizeof(S), alignof(S)));
}

// The calling thread's warp and lane.
inline Warp& current_warp() { return *current_block->warps[static_cast<size_t>(current_thread / 32)]; }
inline int current_lane() { return current_thread % 32; }
inline thread_local int lane_set = 0;  // this lane's view of its warp's slot set (the lanes move in step)

// One warp-collective operation: post `bytes` of operands, meet, and get this lane's `out_bytes` result
// as computed by `compute` for every lane.
inline void warp_collective(Warp::Compute compute, const void* operands, size_t bytes, void* result,
                            size_t out_bytes, const std::source_location& loc) {
  Warp& w = current_warp();
  const int lane = current_lane(), set = lane_set;
  std::memcpy(w.in[set][lane], operands, bytes);
  w.site[static_cast<size_t>(lane)] = loc;
  w.compute_of[lane] = compute;
  w.barrier.arrive_and_wait();
  std::memcpy(result, w.out[set][lane], out_bytes);
  lane_set = set ^ 1;
}

// benchmarks/host_overhead.py times the host path alone: with this set, a launch whose configuration is
// valid returns without running (as a GPU launch returns once queued). Tests never set it.
inline std::atomic<bool>& skip_launches() {
  static std::atomic<bool> skip{false};
  return skip;
}

// One launch at a time: the per-thread block state is one copy.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

template <class Kernel>
cudaError_t launch(Kernel&& kernel, dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (skip_launches().load(std::memory_order_relaxed)) return cudaSuccess;
  std::lock_guard<std::mutex> lock(launch_mutex());
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block state(static_cast<int>(threads));
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = uint3{bx, by, bz};
            blockDim = block;
            gridDim = grid;
            current_block = &state;
            current_thread = static_cast<int>(t);
            lane_set = 0;
            kernel();
            Warp& warp = *state.warps[t / 32];
            warp.live[t % 32] = 0;
            warp.barrier.arrive_and_drop();
            state.live[t] = 0;  // ordered before the completion step by arrive_and_drop
            state.barrier.arrive_and_drop();
          });
        for (auto& th : pool) th.join();
      }
  return cudaSuccess;
}

}  // namespace fused_resnet_emu

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  using namespace fused_resnet_emu;
  if (dropped(loc)) return;
  current_block->site[static_cast<size_t>(current_thread)] = loc;
  current_block->barrier.arrive_and_wait();
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
