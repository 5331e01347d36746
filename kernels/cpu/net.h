// Shared declarations of the CPU kernels of iosparse::dag_forward / dag_backward (kernels/cpu/*.cpp).
//
// Source layout (docs/cpu-kernel.md "Source layout"):
//   net.h          this file: the Net view of the op's buffers, the NetIndex / ConfigIndex orders, buffer
//                  validation entry points, scratch buffers and the chunk runner (run_chunked).
//   tile.h         vector tiles of the program / panel / block paths (Vec, register strips, finish_vec,
//                  input transpose and output gather).
//   variants.h/cpp the ISA detection and the one table of per-ISA (and per tile width) kernel variants.
//   paths.h        entry points of the paths, the backward pass and the builders (for op.cpp).
//   validate.cpp   check_buffer, check_pointers, validate_semantics, unpack.
//   runtime.cpp    process-wide state: the chunk pool, the worker choice, fork handling, env switches.
//   ordered_weights.h/cpp  the cache of weights gathered into a path's own order (panel, block).
//   program.cpp, level.cpp, panel.cpp, block.cpp, dense.cpp: the five forward paths.
//   backward.cpp, builders.cpp: the backward pass; the native panel / block builders.
//   op.cpp         dag_forward_cpu / dag_backward_cpu / choose_strategy and the op registration.
//
// Five forward strategies share one op (chosen per call from the batch size, thresholds in `config`):
//   program : executes the compiled plan (torch_iosparse/compile/program.py, docs/program-format.md) per batch
//             tile of BT columns: partial sums in vector registers, M slots of BT values in a
//             thread-private buffer sized for the per-core cache, spills in a per-thread slow buffer.
//             Parallel over batch tiles. Vector width chosen at run time (AVX-512 / AVX2 / SSE2).
//   level   : level by level (feature-major values), chunks of a level's neurons shared by the caller
//             and a private helper pool (ChunkPool: never waits for a descheduled thread); uses every
//             core even at batch 1.
//   panel   : level by level over panels of neurons that share sources (see panel.cpp).
//   block   : level by level, each neuron's edges visited one source block (hardware.block_sources
//             consecutive neurons) at a time so the block's values stay in L1 / L2 (see block.cpp): sparse x
//             dense products with little source sharing (pruned MLPs) at batch >= 16.
//   dense   : layered networks only: per layer a dense matrix is scattered from the edge weights and
//             multiplied with at::addmm (MKL/oneDNN GEMM): wins at low sparsity and large batch.
// The backward pass recomputes pre-activations level by level and walks the transposed DAG.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu/activation.h"

// x86 builds carry the AVX-512 / AVX2 variants (target attributes, intrinsics, __builtin_cpu_supports);
// other architectures (aarch64) build only the generic variants, and detect_isa() returns ISA_GENERIC.
#if defined(__x86_64__) || defined(__i386__)
#define IOSPARSE_X86 1
#include <immintrin.h>
#else
#define IOSPARSE_X86 0
#endif

namespace iosparse {

// Order of the Tensor[] `net` argument (torch_iosparse/abi.py::NET_KEYS; docs/program-format.md).
enum NetIndex {
  NET_IN_PTR = 0,        // int64 [n+1]
  NET_IN_SRC,            // int32 [m]
  NET_ACT_CODE,          // int8  [n]
  NET_ACT_PARAM,         // float64 [n, 2]  (lo, hi)
  NET_OUTPUTS,           // int64 [n_out]
  NET_LEVEL_PTR,         // int64 [L+1]    into level_neuron
  NET_LEVEL_NEURON,      // int64 [n_computed]  computed neurons grouped by level, ascending
  NET_PROG_NEURON,       // int64 [n_computed]
  NET_PROG_OP_PTR,       // int64 [n_computed+1]
  NET_PROG_OPS,          // int32 [K, 3]
  NET_PROG_OUTPUT_ROWS,  // int64 [n_out]
  NET_DENSE_INDEX,       // int64 [m]   flat index of edge e in its layer's dense matrix (layered only)
  NET_DENSE_EDGE,        // int64 [m]   edges sorted by layer (layered only)
  NET_DENSE_EDGE_PTR,    // int64 [L+1] per layer range in dense_edge (layered only)
  NET_DENSE_OUT_POS,     // int64 [n_out] column of each output in the last layer (layered only)
  NET_PROG_GROUP_PTR,    // int64 [n_groups+1] positions computed together (program.group_positions)
  NET_PANEL_PTR,         // int64 [P+1] panel p reads sources panel_src[panel_ptr[p]:panel_ptr[p+1]]
  NET_PANEL_SRC,         // int32 [U]   source neuron of each panel column
  NET_PANEL_ROW_PTR,     // int64 [P+1] panel p computes neurons panel_target[panel_row_ptr[p]:...] (1..8)
  NET_PANEL_TARGET,      // int64 [n_computed]
  NET_PANEL_EDGE_PTR,    // int64 [P+1] panel p's [U_p][R_p] block of edge ids in panel_edge
  NET_PANEL_EDGE,        // int32 [sum U_p R_p] edge id, or -1 (weight 0) where the source does not feed the row
  NET_BLOCK_CHUNK_SEG,   // int64 [C+1] chunk c runs segments [seg[c], seg[c+1]) (block path)
  NET_BLOCK_CHUNK_ROW,   // int64 [C+1] chunk c computes level_neuron[row[c]:row[c+1]] (inside one level)
  NET_BLOCK_CHUNK_EDGE,  // int64 [C+1] chunk c's edges are block positions [edge[c], edge[c+1])
  NET_BLOCK_SEG,         // int32 [K, 3] (target neuron, first source of its block, edge count)
  NET_BLOCK_LOCAL,       // uint8 [m]   source - block start, per block position
  NET_BLOCK_EDGE,        // int32 [m]   edge id per block position (the weight order)
  NET_COUNT
};

// Order of the int[] `config` argument (torch_iosparse/abi.py::CONFIG_KEYS).
enum ConfigIndex {
  CFG_N_INPUTS = 0, CFG_N_NEURONS, CFG_N_OUTPUTS, CFG_MEMORY, CFG_N_SLOW, CFG_BATCH_TILE, CFG_STRATEGY,
  CFG_LEVEL_MAX_BATCH, CFG_DENSE_MIN_BATCH, CFG_LAYERED, CFG_PANEL_MIN_BATCH, CFG_PANEL_TILE, CFG_BLOCK_MIN_BATCH,
  CFG_BLOCK_BACKWARD_MIN_BATCH, CFG_COUNT
};
enum Strategy {
  STRAT_AUTO = 0, STRAT_PROGRAM = 1, STRAT_LEVEL = 2, STRAT_DENSE = 3, STRAT_PANEL = 4, STRAT_BLOCK = 5
};
constexpr int MAX_PANEL_ROWS = 8;
enum Opcode : int32_t { OP_LOAD = 1, OP_FMA = 2, OP_FINISH = 3, OP_STORE = 4 };

struct Net {
  int64_t n_inputs, n_neurons, n_outputs, n_computed, n_edges, memory, n_slow, batch_tile, strategy;
  int64_t level_max_batch, dense_min_batch, n_levels, n_ops;
  bool layered;
  const int64_t* in_ptr;
  const int32_t* in_src;
  const int8_t* act_code;
  const double* act_param;
  const int64_t* outputs;
  const int64_t* level_ptr;
  const int64_t* level_neuron;
  const int64_t* prog_neuron;
  const int64_t* prog_op_ptr;
  const int32_t* prog_ops;
  const int64_t* prog_output_rows;
  const int64_t* prog_group_ptr;
  int64_t n_groups;
  int64_t panel_min_batch, panel_tile, n_panels, n_panel_edges;
  const int64_t* panel_ptr;
  const int32_t* panel_src;
  const int64_t* panel_row_ptr;
  const int64_t* panel_target;
  const int64_t* panel_edge_ptr;
  const int32_t* panel_edge;
  const int32_t* panel_src_row;  // per call (panel_forward): tile-buffer row of each panel column's source
  int64_t block_min_batch, n_block_chunks, n_block_segs;
  int64_t block_backward_min_batch;  // the backward runs by blocks from this batch (measured per machine)
  const int64_t* block_chunk_seg;
  const int64_t* block_chunk_row;
  const int64_t* block_chunk_edge;
  const int32_t* block_seg;
  const uint8_t* block_local;
  const int32_t* block_edge;
  // Set by a kernel whose guard met an out-of-range index (check_pointers); raised after the call.
  std::atomic<bool>* corrupt;
  void flag_corrupt() const { corrupt->store(true, std::memory_order_relaxed); }
};

// validate.cpp: shape / dtype / size checks of one network buffer (also used by the builders); max_dim 2
// for the buffers of rows ([n, 2] activation bounds, [K, 3] ops and block segments).
void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, int64_t max_dim = 1);
// Every product that sizes a buffer is checked, so a forged size raises instead of wrapping around.
int64_t checked_mul(int64_t a, int64_t b);
[[noreturn]] void corrupt_buffers(const char* what);
// The op's arguments as a Net, after check_pointers (every call) and validate_semantics (once per buffer
// contents); `corrupt` is raised by a kernel whose guards met an out-of-range index.
Net unpack(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::TensorList net_t,
           at::IntArrayRef config, std::atomic<bool>& corrupt);
// Raised after a kernel whose guards met an index out of range (the access was skipped).
void check_not_corrupt(const std::atomic<bool>& corrupt);

// A source index read once per edge, guarded (check_pointers): an index out of [0, bound) is noted in
// `bad` and replaced by 0, so the access stays inside the values.
inline int64_t guarded(int32_t s, uint32_t bound, uint32_t& bad) {
  const bool out = uint32_t(s) >= bound;
  bad |= uint32_t(out);
  return out ? 0 : int64_t(s);
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
// Bytes of count T, rounded up to whole 64-byte lines (checked: a forged size raises, never wraps).
template <typename T>
size_t aligned_bytes(int64_t count) {
  const int64_t bytes = checked_mul(std::max<int64_t>(count, 1), int64_t(sizeof(T)));
  TORCH_CHECK(bytes <= std::numeric_limits<int64_t>::max() - 63, "iosparse: buffer size overflows");
  return size_t((bytes + 63) / 64 * 64);
}
template <typename T>
std::unique_ptr<T, AlignedFree> aligned_buffer(int64_t count) {
  const size_t bytes = aligned_bytes<T>(count);
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "iosparse: out of memory allocating ", bytes, " bytes");
  return std::unique_ptr<T, AlignedFree>(p);
}

// Per-thread scratch that survives calls: fresh multi-MiB allocations would page-fault on every call. A
// failed allocation leaves the previous buffer (and its size) in place. Five slots per thread and element
// type, defined once in runtime.cpp (instantiated there for float, double, int32_t and RowParams).
template <typename T>
T* scratch(int slot, int64_t count);

// Debug aid for the tests: IOSPARSE_POISON=1 fills every output and scratch buffer with NaN before a
// kernel runs, so an element that is read before it is written (or never written) shows up as NaN.
bool poison_enabled();
template <typename T>
void poison(T* p, int64_t n) {
  std::fill(p, p + n, std::numeric_limits<T>::quiet_NaN());
}

// An integer from the environment (>= 0), or `fallback` when unset or malformed.
int64_t env_int(const char* name, int64_t fallback);

// ------------------------------------------------------------------------------------------ chunks
// A spin-wait hint: `pause` on x86, `yield` on aarch64, a scheduler yield elsewhere.
inline void cpu_relax() {
#if IOSPARSE_X86
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#else
  std::this_thread::yield();
#endif
}

// Waits until counter >= need: pause first (the wait is usually a few microseconds), then yield the core.
inline void spin_until(const std::atomic<int64_t>& counter, int64_t need) {
  for (int spin = 0; counter.load(std::memory_order_acquire) < need; ++spin) {
    if (spin < 4096) cpu_relax(); else std::this_thread::yield();
  }
}

// runtime.cpp: runs fn(ctx, c) for c in [0, n_chunks) on the calling thread and the private chunk pool's
// helpers (ChunkPool, see there); chunk c starts once wait_for[c] chunks are done.
using ChunkFn = void (*)(const void* ctx, int64_t chunk);
void chunk_pool_run(ChunkFn fn, const void* ctx, int64_t n_chunks, const int64_t* wait_for, int64_t helpers);

// Runs f(c) for c in [0, n_chunks) on the calling thread and the pool's helpers (chunk c starts once
// wait_for[c] chunks are done); serially inside a parallel region or with one thread.
// The pool's claim word holds chunk counts below 2^20; a larger job runs serially (never reached by the
// default layouts, which hold thousands of multiply-adds per chunk).
template <typename F>
void run_chunked_pool(int64_t n_chunks, const int64_t* wait_for, const F& f) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads <= 1 || n_chunks <= 1 || n_chunks >= (int64_t(1) << 20)) {
    for (int64_t c = 0; c < n_chunks; ++c) f(c);
    return;
  }
  chunk_pool_run([](const void* ctx, int64_t c) { (*static_cast<const F*>(ctx))(c); }, &f, n_chunks, wait_for,
                 threads - 1);
}

// The same inside one at::parallel_for region: torch's OpenMP threads claim the chunks in order. They spin
// for a while after every torch op, so in a model (or a benchmark) where torch ops run between our calls
// they start at once, while a private helper would first have to win the core from a spinning OpenMP
// thread (measured: the level and program paths ran on one thread then, 0.82x of torch CSR on the MLP
// 90 % at B = 64). The cost: a thread that is descheduled before it enters the region holds up the end
// of the call (the region's barrier), which the pool avoids.
template <typename F>
void run_chunked_omp(int64_t n_chunks, const int64_t* wait_for, const F& f) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), n_chunks);
  if (threads <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) f(c);
    return;
  }
  std::atomic<int64_t> next{0}, done{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_acq_rel);
      if (c >= n_chunks) return;
      spin_until(done, wait_for[c]);
      f(c);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  });
}

// runtime.cpp. Set in a fork() child: GNU OpenMP is not fork-safe (a child forked while another thread of
// the parent was inside a parallel region hangs in its first region: DataLoader workers fork), so children
// use the pool, which resets itself after a fork.
extern std::atomic<bool> in_forked_child;

// Which threads run the chunks of every path: IOSPARSE_WORKERS=omp (torch's OpenMP threads, the default)
// or pool (the private chunk pool; always in a forked child).
bool workers_are_omp();

// An exception in a chunk (an allocation failure) must neither end a helper thread (std::terminate) nor
// leave later chunks spinning on a chunk that never finished: it is kept, the remaining chunks are skipped,
// and the first one is rethrown on the calling thread.
template <typename F>
void run_chunked(int64_t n_chunks, const int64_t* wait_for, const F& f) {
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  auto safe = [&](int64_t c) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      f(c);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed.store(true);
    }
  };
  if (workers_are_omp()) run_chunked_omp(n_chunks, wait_for, safe);
  else run_chunked_pool(n_chunks, wait_for, safe);
  if (error) std::rethrow_exception(error);
}

}  // namespace iosparse
