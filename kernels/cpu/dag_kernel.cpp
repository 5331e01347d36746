// CPU kernels of the differentiable op iosparse::dag_forward / dag_backward (torch_iosparse/ops.py).
//
// Five forward strategies share one op (chosen per call from the batch size, thresholds in `config`):
//   program : executes the compiled plan (torch_iosparse/program.py, docs/program-format.md) per batch
//             tile of BT columns: partial sums in vector registers, M slots of BT values in a
//             thread-private buffer sized for the per-core cache, spills in a per-thread slow buffer.
//             Parallel over batch tiles. Vector width chosen at run time (AVX-512 / AVX2 / SSE2).
//   level   : level by level (feature-major values), chunks of a level's neurons shared by the caller
//             and a private helper pool (ChunkPool: never waits for a descheduled thread); uses every
//             core even at batch 1.
//   panel   : level by level over panels of neurons that share sources (see "panel").
//   block   : level by level, each neuron's edges visited one source block (BLOCK_SOURCES consecutive
//             neurons) at a time so the block's values stay in L1 (see "block"): sparse x dense products
//             with little source sharing (pruned MLPs) at batch >= 16.
//   dense   : layered networks only: per layer a dense matrix is scattered from the edge weights and
//             multiplied with at::addmm (MKL/oneDNN GEMM): wins at low sparsity and large batch.
// The backward pass recomputes pre-activations level by level and walks the transposed DAG.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <limits>
#include <memory>
#include <new>
#include <atomic>
#include <exception>
#include <condition_variable>
#include <mutex>
#include <thread>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <pthread.h>
#include <vector>

#include "cpu/activation.h"

namespace iosparse {
namespace {

// Order of the Tensor[] `net` argument (torch_iosparse/ops.py::NET_KEYS; docs/program-format.md).
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

// Order of the int[] `config` argument (torch_iosparse/ops.py::CONFIG_KEYS).
enum ConfigIndex {
  CFG_N_INPUTS = 0, CFG_N_NEURONS, CFG_N_OUTPUTS, CFG_MEMORY, CFG_N_SLOW, CFG_BATCH_TILE, CFG_STRATEGY,
  CFG_LEVEL_MAX_BATCH, CFG_DENSE_MIN_BATCH, CFG_LAYERED, CFG_PANEL_MIN_BATCH, CFG_PANEL_TILE, CFG_BLOCK_MIN_BATCH,
  CFG_COUNT
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

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "iosparse: network buffer '", name, "' must be on the CPU like the "
                    "input, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "iosparse: network buffer '", name, "' must be ", dtype, ", got ",
                    t.scalar_type(), " (was it built by torch_iosparse.ops.prepare?)");
  TORCH_CHECK_VALUE(t.dim() == 1 || (t.dim() == 2 && std::strcmp(name, "prog_ops") == 0) ||
                        (t.dim() == 2 && std::strcmp(name, "act_param") == 0) ||
                        (t.dim() == 2 && std::strcmp(name, "block_seg") == 0),
                    "iosparse: network buffer '", name, "' has shape ", t.sizes(), " (was it built by "
                    "torch_iosparse.ops.prepare?)");
  TORCH_CHECK_VALUE(t.is_contiguous(), "iosparse: network buffer '", name, "' must be contiguous");
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, "iosparse: network buffer '", name, "' has ", t.numel(),
                    " elements, expected ", numel, " (buffers and config of different networks?)");
}

// Every product that sizes a buffer is checked, so a forged size raises instead of wrapping around.
int64_t checked_mul(int64_t a, int64_t b) {
  int64_t r = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), "iosparse: buffer size overflows (", a,
              " x ", b, ")");
  return r;
}

// A source index read once per edge, guarded (check_pointers): an index out of [0, bound) is noted in
// `bad` and replaced by 0, so the access stays inside the values.
inline int64_t guarded(int32_t s, uint32_t bound, uint32_t& bad) {
  const bool out = uint32_t(s) >= bound;
  bad |= uint32_t(out);
  return out ? 0 : int64_t(s);
}

[[noreturn]] void corrupt_buffers(const char* what) {
  TORCH_CHECK_VALUE(false, "iosparse: network buffers are corrupt or belong to another network (", what, ")");
  __builtin_unreachable();
}

// Network buffers are checked at two depths.
// * check_pointers (every call, O(neurons + panels + chunks)): every pointer array the kernels walk is in
//   range and ascending, so a kernel's loops stay inside the buffers whatever they hold. The indices read
//   once per edge or op (in_src, prog_ops, panel and block cells) are range-checked where the kernels read
//   them (Net::corrupt is raised, the access skipped), so buffers changed behind PyTorch's back (through
//   `.data`, numpy, raw pointers) can give an error but never an out-of-bounds access.
// * validate_semantics (once per buffer contents): the buffers describe one network and every path
//   computes it exactly: each neuron on one level after its sources, the program reads only values it
//   has loaded or computed and leaves every output in its row, grouped positions share their sources,
//   panels and blocks cover every edge once. Memoised per thread by the buffers' storages (held weakly,
//   so a freed storage never matches a new one at the same address) and version counters.
void check_pointers(const Net& n, at::TensorList net_t) {
  const int64_t m = n.n_edges;
  if (n.in_ptr[0] != 0 || n.in_ptr[n.n_neurons] != m) corrupt_buffers("in_ptr ends");
  for (int64_t v = 0; v < n.n_neurons; ++v)
    if (n.in_ptr[v + 1] < n.in_ptr[v]) corrupt_buffers("in_ptr not ascending");
  for (int64_t j = 0; j < n.n_outputs; ++j) {
    if (n.outputs[j] < n.n_inputs || n.outputs[j] >= n.n_neurons) corrupt_buffers("outputs out of range");
    if (n.prog_output_rows[j] < 0 || n.prog_output_rows[j] >= n.n_slow) corrupt_buffers("output rows out of range");
  }
  if (n.n_levels < 0 || n.level_ptr[0] != 0 || n.level_ptr[n.n_levels] != n.n_computed) corrupt_buffers("level_ptr ends");
  for (int64_t l = 0; l < n.n_levels; ++l)
    if (n.level_ptr[l + 1] < n.level_ptr[l]) corrupt_buffers("level_ptr not ascending");
  if (n.prog_op_ptr[0] != 0 || n.prog_op_ptr[n.n_computed] != n.n_ops) corrupt_buffers("prog_op_ptr ends");
  for (int64_t i = 0; i < n.n_computed; ++i) {
    if (n.level_neuron[i] < n.n_inputs || n.level_neuron[i] >= n.n_neurons) corrupt_buffers("level_neuron out of range");
    if (n.prog_neuron[i] < n.n_inputs || n.prog_neuron[i] >= n.n_neurons) corrupt_buffers("prog_neuron out of range");
    if (n.prog_op_ptr[i + 1] < n.prog_op_ptr[i]) corrupt_buffers("prog_op_ptr not ascending");
  }
  if (n.n_groups < 1 || n.prog_group_ptr[0] != 0 || n.prog_group_ptr[n.n_groups] != n.n_computed)
    corrupt_buffers("prog_group_ptr does not cover the program");
  for (int64_t g = 0; g < n.n_groups; ++g) {
    const int64_t size = n.prog_group_ptr[g + 1] - n.prog_group_ptr[g];
    if (size < 1 || size > 4) corrupt_buffers("bad group in prog_group_ptr");
  }
  if (n.n_panels > 0) {
    const int64_t P = n.n_panels;
    if (n.panel_ptr[0] != 0 || n.panel_row_ptr[0] != 0 || n.panel_edge_ptr[0] != 0 ||
        n.panel_ptr[P] != net_t[NET_PANEL_SRC].numel() || n.panel_row_ptr[P] != n.n_computed ||
        n.panel_edge_ptr[P] != n.n_panel_edges || net_t[NET_PANEL_TARGET].numel() != n.n_computed)
      corrupt_buffers("panel pointers");
    for (int64_t p = 0; p < P; ++p) {
      const int64_t U = n.panel_ptr[p + 1] - n.panel_ptr[p], R = n.panel_row_ptr[p + 1] - n.panel_row_ptr[p];
      if (U < 0 || R < 1 || R > MAX_PANEL_ROWS || n.panel_edge_ptr[p + 1] - n.panel_edge_ptr[p] != U * R)
        corrupt_buffers("panel sizes");
    }
  }
  if (n.n_block_chunks > 0) {
    const int64_t C = n.n_block_chunks;
    if (n.block_chunk_seg[0] != 0 || n.block_chunk_row[0] != 0 || n.block_chunk_edge[0] != 0 ||
        n.block_chunk_seg[C] != n.n_block_segs || n.block_chunk_row[C] != n.n_computed ||
        n.block_chunk_edge[C] != m)
      corrupt_buffers("block chunk pointers");
    for (int64_t c = 0; c < C; ++c)
      if (n.block_chunk_row[c + 1] < n.block_chunk_row[c] || n.block_chunk_seg[c + 1] < n.block_chunk_seg[c] ||
          n.block_chunk_edge[c + 1] < n.block_chunk_edge[c])
        corrupt_buffers("block chunk pointers not ascending");
  }
  if (n.layered) {
    // The dense path needs its four buffers; the panel path's ping-pong rows need the layering itself
    // (checked in validate_semantics).
    if (m == 0 || net_t[NET_DENSE_INDEX].numel() != m || net_t[NET_DENSE_EDGE].numel() != m ||
        net_t[NET_DENSE_OUT_POS].numel() != n.n_outputs)
      corrupt_buffers("layered flag set without the dense buffers");
    const int64_t* dp = net_t[NET_DENSE_EDGE_PTR].data_ptr<int64_t>();
    if (dp[0] != 0 || dp[n.n_levels] != m) corrupt_buffers("dense_edge_ptr ends");
    for (int64_t l = 0; l < n.n_levels; ++l)
      if (dp[l + 1] < dp[l]) corrupt_buffers("dense_edge_ptr not ascending");
  }
}

// The program run as the kernel runs it (program_group: a group's first position's ops up to its FINISH,
// the members' FMAs done alongside, then each member's FINISH and STOREs), on neuron ids instead of values:
// every FMA must read its edge's source, every LOAD a row that holds a value, and every output must end in
// its row. Also checks each position's FMAs are its own in-edges in CSR order (the kernel indexes the
// members' weights by offset from the first position's).
void validate_program(const Net& n) {
  std::vector<int64_t> slot(size_t(n.memory), -1), row(size_t(n.n_slow), -1);
  for (int64_t i = 0; i < n.n_inputs; ++i) row[i] = i;
  auto op_ok = [&](const int32_t* o) {
    switch (o[0]) {
      case OP_LOAD: return o[1] >= 0 && o[1] < n.n_slow && o[2] >= 0 && o[2] < n.memory;
      case OP_FMA: return o[1] >= 0 && o[1] < n.memory && o[2] >= 0 && o[2] < n.n_edges;
      case OP_FINISH: return o[1] >= 0 && o[1] < n.memory;
      case OP_STORE: return o[1] >= 0 && o[1] < n.memory && o[2] >= 0 && o[2] < n.n_slow;
      default: return false;
    }
  };
  for (int64_t k = 0; k < n.n_ops; ++k)
    if (!op_ok(n.prog_ops + 3 * k)) corrupt_buffers("prog_ops");
  auto store = [&](const int32_t* o) {
    if (slot[o[1]] < 0) corrupt_buffers("program stores an empty slot");
    row[o[2]] = slot[o[1]];
  };
  for (int64_t grp = 0; grp < n.n_groups; ++grp) {
    const int64_t i0 = n.prog_group_ptr[grp], G = n.prog_group_ptr[grp + 1] - i0;
    const int64_t v0 = n.prog_neuron[i0], deg = n.in_ptr[v0 + 1] - n.in_ptr[v0];
    for (int64_t g = 1; g < G; ++g) {
      const int64_t v = n.prog_neuron[i0 + g];
      if (n.in_ptr[v + 1] - n.in_ptr[v] != deg) corrupt_buffers("grouped positions differ in in-degree");
      for (int64_t t = 0; t < deg; ++t)
        if (n.in_src[n.in_ptr[v] + t] != n.in_src[n.in_ptr[v0] + t]) corrupt_buffers("grouped positions differ in sources");
      for (int64_t k = n.prog_op_ptr[i0 + g], t = 0; t < deg; ++k, ++t)
        if (k >= n.prog_op_ptr[i0 + g + 1] || n.prog_ops[3 * k] != OP_FMA) corrupt_buffers("grouped position ops");
    }
    int64_t k = n.prog_op_ptr[i0], fmas = 0;
    std::vector<int32_t> fma_slot;  // slot of each of i0's FMAs (members read the same, maybe later)
    bool finished = false;
    for (const int64_t end = n.prog_op_ptr[i0 + 1]; k < end && !finished; ++k) {
      const int32_t* o = n.prog_ops + 3 * k;
      if (o[0] == OP_FMA) {
        if (o[2] != n.in_ptr[v0] + fmas++ || slot[o[1]] != n.in_src[o[2]]) corrupt_buffers("program FMA reads a wrong value");
        fma_slot.push_back(o[1]);
      } else if (o[0] == OP_LOAD) {
        if (row[o[1]] < 0) corrupt_buffers("program loads a row never written");
        slot[o[2]] = row[o[1]];
      } else if (o[0] == OP_STORE) {
        store(o);
      } else {
        finished = true;
        --k;  // the FINISH runs below, as in the kernel
      }
    }
    if (!finished || fmas != deg) corrupt_buffers("program position without all its FMAs and a FINISH");
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = i0 + g, v = n.prog_neuron[i];
      // A member may also run as the first of a sub-group (program_tile_body): its own FMAs then read these
      // slots at its own time, so they must name i0's slots and still hold its sources here.
      for (int64_t t = 0; g > 0 && t < deg; ++t)
        if (n.prog_ops[3 * (n.prog_op_ptr[i] + t) + 1] != fma_slot[t] || slot[fma_slot[t]] != n.in_src[n.in_ptr[v] + t])
          corrupt_buffers("grouped position's sources not in its slots");
      for (int64_t kk = g == 0 ? k : n.prog_op_ptr[i] + deg, e = n.prog_op_ptr[i + 1]; kk < e; ++kk) {
        const int32_t* o = n.prog_ops + 3 * kk;
        if (o[0] == OP_FINISH) slot[o[1]] = v;
        else if (o[0] == OP_STORE) store(o);
      }
    }
  }
  for (int64_t j = 0; j < n.n_outputs; ++j)
    if (row[n.prog_output_rows[j]] != n.outputs[j]) corrupt_buffers("an output row does not hold its output");
}

void validate_semantics(const Net& n, at::TensorList net_t) {
  for (int64_t e = 0; e < n.n_edges; ++e)
    if (n.in_src[e] < 0 || n.in_src[e] >= n.n_neurons) corrupt_buffers("in_src out of range");
  for (int64_t v = 0; v < n.n_neurons; ++v)
    if (n.act_code[v] < 0 || n.act_code[v] >= ACT_COUNT) corrupt_buffers("unknown activation code");
  // Levels: every computed neuron once, after all of its sources.
  std::vector<int64_t> level(size_t(n.n_neurons), -1);
  std::fill(level.begin(), level.begin() + n.n_inputs, 0);
  for (int64_t l = 0; l < n.n_levels; ++l)
    for (int64_t q = n.level_ptr[l]; q < n.level_ptr[l + 1]; ++q) {
      const int64_t v = n.level_neuron[q];
      if (level[v] >= 0) corrupt_buffers("a neuron is listed twice in level_neuron");
      level[v] = l + 1;
    }
  for (int64_t v = n.n_inputs; v < n.n_neurons; ++v)
    for (int64_t e = n.in_ptr[v]; e < n.in_ptr[v + 1]; ++e)
      if (level[n.in_src[e]] >= level[v]) corrupt_buffers("a neuron's level is not after its sources'");
  validate_program(n);
  if (n.layered) {
    // The dense path and the panel path's ping-pong buffers rely on it: every edge joins consecutive
    // levels and every output is on the last level.
    for (int64_t v = n.n_inputs; v < n.n_neurons; ++v)
      for (int64_t e = n.in_ptr[v]; e < n.in_ptr[v + 1]; ++e)
        if (level[n.in_src[e]] + 1 != level[v]) corrupt_buffers("layered flag set but an edge skips a level");
    for (int64_t j = 0; j < n.n_outputs; ++j)
      if (level[n.outputs[j]] != n.n_levels) corrupt_buffers("layered flag set but an output is not on the last level");
    // Each edge once, at the cell of its layer's dense matrix given by the positions inside the levels.
    const int64_t* di = net_t[NET_DENSE_INDEX].data_ptr<int64_t>();
    const int64_t* de = net_t[NET_DENSE_EDGE].data_ptr<int64_t>();
    const int64_t* dp = net_t[NET_DENSE_EDGE_PTR].data_ptr<int64_t>();
    const int64_t* dop = net_t[NET_DENSE_OUT_POS].data_ptr<int64_t>();
    std::vector<int64_t> pos(size_t(n.n_neurons), 0), dst(size_t(n.n_edges), 0);
    for (int64_t i = 0; i < n.n_inputs; ++i) pos[i] = i;
    for (int64_t l = 0; l < n.n_levels; ++l)
      for (int64_t q = n.level_ptr[l]; q < n.level_ptr[l + 1]; ++q) pos[n.level_neuron[q]] = q - n.level_ptr[l];
    for (int64_t v = n.n_inputs; v < n.n_neurons; ++v)
      for (int64_t e = n.in_ptr[v]; e < n.in_ptr[v + 1]; ++e) dst[e] = v;
    std::vector<uint8_t> seen(size_t(n.n_edges), 0);
    int64_t cols = n.n_inputs;
    for (int64_t l = 0; l < n.n_levels; ++l) {
      for (int64_t q = dp[l]; q < dp[l + 1]; ++q) {
        const int64_t e = de[q];
        if (e < 0 || e >= n.n_edges || seen[e] || level[dst[e]] != l + 1 ||
            di[q] != pos[dst[e]] * cols + pos[n.in_src[e]])
          corrupt_buffers("dense_index / dense_edge");
        seen[e] = 1;
      }
      cols = n.level_ptr[l + 1] - n.level_ptr[l];
    }
    for (int64_t j = 0; j < n.n_outputs; ++j)
      if (dop[j] != pos[n.outputs[j]]) corrupt_buffers("dense_out_pos");
  }
  if (n.n_panels > 0) {
    // Panels must cover every computed neuron once and every edge once, read only sources computed by
    // an earlier panel (or inputs), and each edge cell must join its column's source to its row's target.
    const int64_t P = n.n_panels;
    std::vector<uint8_t> done(size_t(n.n_neurons), 0);
    std::fill(done.begin(), done.begin() + n.n_inputs, uint8_t(1));
    std::vector<uint8_t> edge_seen(size_t(n.n_edges), 0);
    int64_t edges_used = 0;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t u0 = n.panel_ptr[p], u1 = n.panel_ptr[p + 1], r0 = n.panel_row_ptr[p], r1 = n.panel_row_ptr[p + 1];
      const int64_t R = r1 - r0;
      for (int64_t u = u0; u < u1; ++u) {
        const int32_t s = n.panel_src[u];
        if (s < 0 || s >= n.n_neurons || !done[s]) corrupt_buffers("panel_src");
      }
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = n.panel_target[r];
        if (t < n.n_inputs || t >= n.n_neurons || done[t]) corrupt_buffers("panel_target");
      }
      for (int64_t u = u0; u < u1; ++u)
        for (int64_t r = 0; r < R; ++r) {
          const int32_t e = n.panel_edge[n.panel_edge_ptr[p] + (u - u0) * R + r];
          if (e == -1) continue;
          const int64_t t = n.panel_target[r0 + r];
          if (e < 0 || e >= n.n_edges || edge_seen[e] || n.in_src[e] != n.panel_src[u] || e < n.in_ptr[t] ||
              e >= n.in_ptr[t + 1])
            corrupt_buffers("panel_edge");
          edge_seen[e] = 1;
          ++edges_used;
        }
      for (int64_t r = r0; r < r1; ++r) done[n.panel_target[r]] = 1;
    }
    if (edges_used != n.n_edges) corrupt_buffers("panel_edge does not cover every edge");
  }
  if (n.n_block_chunks > 0) {
    // Chunks cover level_neuron in order, each inside one level; every segment's target is a row of its
    // chunk; every edge appears once, under its target, with block start + local index == its source.
    const int64_t C = n.n_block_chunks;
    std::vector<int64_t> pos_of(size_t(n.n_neurons), -1), level_of_pos(size_t(n.n_computed), 0);
    for (int64_t l = 0; l < n.n_levels; ++l)
      for (int64_t q = n.level_ptr[l]; q < n.level_ptr[l + 1]; ++q) level_of_pos[q] = l;
    for (int64_t q = 0; q < n.n_computed; ++q) pos_of[n.level_neuron[q]] = q;
    std::vector<uint8_t> edge_seen(size_t(n.n_edges), 0);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t r0 = n.block_chunk_row[c], r1 = n.block_chunk_row[c + 1];
      if (r1 > r0 && level_of_pos[r0] != level_of_pos[r1 - 1]) corrupt_buffers("block chunk spans two levels");
      int64_t k = n.block_chunk_edge[c];
      for (int64_t sg = n.block_chunk_seg[c]; sg < n.block_chunk_seg[c + 1]; ++sg) {
        const int32_t* seg = n.block_seg + 3 * sg;
        const int64_t t = seg[0], base = seg[1], cnt = seg[2];
        if (t < n.n_inputs || t >= n.n_neurons || pos_of[t] < r0 || pos_of[t] >= r1) corrupt_buffers("block_seg target");
        if (base < 0 || cnt < 0 || k + cnt > n.block_chunk_edge[c + 1]) corrupt_buffers("block_seg");
        for (int64_t i = 0; i < cnt; ++i, ++k) {
          const int32_t e = n.block_edge[k];
          if (e < 0 || e >= n.n_edges || edge_seen[e] || e < n.in_ptr[t] || e >= n.in_ptr[t + 1] ||
              base + n.block_local[k] != n.in_src[e])
            corrupt_buffers("block_edge");
          edge_seen[e] = 1;
        }
      }
      if (k != n.block_chunk_edge[c + 1]) corrupt_buffers("block segments do not fill their chunk");
    }
  }
}

// The memo of validate_semantics: per buffer its storage (held weakly), offset, size and version (inference
// tensors have no version: their storage stands for them, and the kernels' guards cover in-place writes).
struct BufferStamp {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::intrusive_ptr<c10::StorageImpl>()};
  const void* impl = nullptr;
  int64_t offset = 0, numel = 0, version = 0;
};
void validate_once(const Net& n, at::TensorList net_t) {
  thread_local std::vector<BufferStamp> last;
  thread_local std::vector<int64_t> last_config;
  const std::vector<int64_t> config = {n.memory, n.n_slow, n.n_neurons, n.n_inputs, n.n_edges, n.n_outputs, n.layered};
  auto stamp = [](const at::Tensor& t) {
    BufferStamp s;
    s.storage = t.storage().getWeakStorageImpl();
    s.impl = t.storage().unsafeGetStorageImpl();
    s.offset = t.storage_offset();
    s.numel = t.numel();
    s.version = t.is_inference() ? -1 : int64_t(t._version());
    return s;
  };
  bool same = config == last_config && last.size() == net_t.size();
  for (size_t i = 0; same && i < net_t.size(); ++i) {
    const at::Tensor& t = net_t[i];
    const BufferStamp& s = last[i];
    same = !s.storage.expired() && s.impl == t.storage().unsafeGetStorageImpl() && s.offset == t.storage_offset() &&
           s.numel == t.numel() && s.version == (t.is_inference() ? -1 : int64_t(t._version()));
  }
  if (same) return;
  last.clear();
  last_config.clear();
  validate_semantics(n, net_t);
  for (const auto& t : net_t) last.push_back(stamp(t));
  last_config = config;
}

Net unpack(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::TensorList net_t,
           at::IntArrayRef config, std::atomic<bool>& corrupt) {
  TORCH_CHECK_VALUE(config.size() == CFG_COUNT, "iosparse: config must have ", int(CFG_COUNT), " entries, got ",
                    config.size());
  TORCH_CHECK_VALUE(net_t.size() == NET_COUNT, "iosparse: net must have ", int(NET_COUNT), " tensors, got ",
                    net_t.size());
  Net n{};
  n.corrupt = &corrupt;
  n.n_inputs = config[CFG_N_INPUTS];
  n.n_neurons = config[CFG_N_NEURONS];
  n.n_outputs = config[CFG_N_OUTPUTS];
  n.memory = config[CFG_MEMORY];
  n.n_slow = config[CFG_N_SLOW];
  n.batch_tile = config[CFG_BATCH_TILE];
  n.strategy = config[CFG_STRATEGY];
  n.level_max_batch = config[CFG_LEVEL_MAX_BATCH];
  n.dense_min_batch = config[CFG_DENSE_MIN_BATCH];
  n.layered = config[CFG_LAYERED] != 0;
  n.n_computed = n.n_neurons - n.n_inputs;
  TORCH_CHECK_VALUE(n.n_inputs >= 1 && n.n_computed >= 1 && n.n_outputs >= 1 && n.n_neurons < (int64_t(1) << 31),
                    "iosparse: bad network sizes in config");
  // A schedule never needs more slots than neurons + the partial sum, nor more slow rows than neurons
  // (program.compile_plan caps M so): anything larger is a forged config, and would size huge buffers.
  TORCH_CHECK_VALUE(n.memory >= 1 && n.memory <= n.n_neurons + 1 && n.n_slow >= n.n_inputs && n.n_slow <= n.n_neurons,
                    "iosparse: bad memory / n_slow in config (memory ", n.memory, ", n_slow ", n.n_slow, ", ",
                    n.n_neurons, " neurons)");
  TORCH_CHECK_VALUE(n.batch_tile >= 1, "iosparse: bad batch_tile in config");
  TORCH_CHECK_TYPE(x.is_floating_point(), "iosparse: input must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "iosparse: the CPU kernel supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == n.n_inputs, "iosparse: input must have shape [batch, ",
                    n.n_inputs, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "iosparse: CPU kernel got an input on ", x.device());
  const int64_t m = net_t[NET_IN_SRC].numel();
  n.n_edges = m;
  TORCH_CHECK_VALUE(m < (int64_t(1) << 31), "iosparse: too many edges");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
                   "iosparse: weight (", weight.scalar_type(), ") and bias (", bias.scalar_type(),
                   ") must have the input's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.numel() == m, "iosparse: weight must be 1-D with one entry per "
                    "edge (", m, "), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.numel() == n.n_neurons, "iosparse: bias must be 1-D with one entry "
                    "per neuron (", n.n_neurons, "), got shape ", bias.sizes());
  TORCH_CHECK_VALUE(weight.device().is_cpu() && bias.device().is_cpu(), "iosparse: weight and bias must be on "
                    "the CPU like the input");
  check_buffer(net_t[NET_IN_PTR], "in_ptr", at::kLong, n.n_neurons + 1);
  check_buffer(net_t[NET_IN_SRC], "in_src", at::kInt, m);
  check_buffer(net_t[NET_ACT_CODE], "act_code", at::kChar, n.n_neurons);
  check_buffer(net_t[NET_ACT_PARAM], "act_param", at::kDouble, 2 * n.n_neurons);
  check_buffer(net_t[NET_OUTPUTS], "outputs", at::kLong, n.n_outputs);
  check_buffer(net_t[NET_LEVEL_PTR], "level_ptr", at::kLong, -1);
  TORCH_CHECK_VALUE(net_t[NET_LEVEL_PTR].numel() >= 2, "iosparse: network buffer 'level_ptr' needs at least 2 "
                    "elements (one level)");
  check_buffer(net_t[NET_LEVEL_NEURON], "level_neuron", at::kLong, n.n_computed);
  check_buffer(net_t[NET_PROG_NEURON], "prog_neuron", at::kLong, n.n_computed);
  check_buffer(net_t[NET_PROG_OP_PTR], "prog_op_ptr", at::kLong, n.n_computed + 1);
  check_buffer(net_t[NET_PROG_OPS], "prog_ops", at::kInt, -1);
  TORCH_CHECK_VALUE(net_t[NET_PROG_OPS].numel() % 3 == 0, "iosparse: network buffer 'prog_ops' must hold "
                    "(opcode, a, b) rows");
  check_buffer(net_t[NET_PROG_OUTPUT_ROWS], "prog_output_rows", at::kLong, n.n_outputs);
  check_buffer(net_t[NET_PROG_GROUP_PTR], "prog_group_ptr", at::kLong, -1);
  TORCH_CHECK_VALUE(net_t[NET_PROG_GROUP_PTR].numel() >= 2, "iosparse: network buffer 'prog_group_ptr' needs at "
                    "least 2 elements");
  n.n_levels = net_t[NET_LEVEL_PTR].numel() - 1;
  check_buffer(net_t[NET_DENSE_INDEX], "dense_index", at::kLong, net_t[NET_DENSE_INDEX].numel() ? m : 0);
  check_buffer(net_t[NET_DENSE_EDGE], "dense_edge", at::kLong, net_t[NET_DENSE_INDEX].numel());
  check_buffer(net_t[NET_DENSE_EDGE_PTR], "dense_edge_ptr", at::kLong, n.n_levels + 1);
  check_buffer(net_t[NET_DENSE_OUT_POS], "dense_out_pos", at::kLong,
               net_t[NET_DENSE_INDEX].numel() ? n.n_outputs : net_t[NET_DENSE_OUT_POS].numel());
  n.n_groups = net_t[NET_PROG_GROUP_PTR].numel() - 1;
  n.prog_group_ptr = net_t[NET_PROG_GROUP_PTR].data_ptr<int64_t>();
  n.panel_min_batch = config[CFG_PANEL_MIN_BATCH];
  n.panel_tile = config[CFG_PANEL_TILE];
  check_buffer(net_t[NET_PANEL_PTR], "panel_ptr", at::kLong, -1);
  check_buffer(net_t[NET_PANEL_SRC], "panel_src", at::kInt, -1);
  check_buffer(net_t[NET_PANEL_ROW_PTR], "panel_row_ptr", at::kLong, net_t[NET_PANEL_PTR].numel());
  check_buffer(net_t[NET_PANEL_TARGET], "panel_target", at::kLong, -1);
  check_buffer(net_t[NET_PANEL_EDGE_PTR], "panel_edge_ptr", at::kLong, net_t[NET_PANEL_PTR].numel());
  check_buffer(net_t[NET_PANEL_EDGE], "panel_edge", at::kInt, -1);
  n.n_panels = std::max<int64_t>(0, net_t[NET_PANEL_PTR].numel() - 1);
  n.n_panel_edges = net_t[NET_PANEL_EDGE].numel();
  n.panel_ptr = net_t[NET_PANEL_PTR].data_ptr<int64_t>();
  n.panel_src = net_t[NET_PANEL_SRC].data_ptr<int32_t>();
  n.panel_row_ptr = net_t[NET_PANEL_ROW_PTR].data_ptr<int64_t>();
  n.panel_target = net_t[NET_PANEL_TARGET].data_ptr<int64_t>();
  n.panel_edge_ptr = net_t[NET_PANEL_EDGE_PTR].data_ptr<int64_t>();
  n.panel_edge = net_t[NET_PANEL_EDGE].data_ptr<int32_t>();
  n.block_min_batch = config[CFG_BLOCK_MIN_BATCH];
  check_buffer(net_t[NET_BLOCK_CHUNK_SEG], "block_chunk_seg", at::kLong, -1);
  const int64_t n_chunk_ptr = net_t[NET_BLOCK_CHUNK_SEG].numel();
  check_buffer(net_t[NET_BLOCK_CHUNK_ROW], "block_chunk_row", at::kLong, n_chunk_ptr);
  check_buffer(net_t[NET_BLOCK_CHUNK_EDGE], "block_chunk_edge", at::kLong, n_chunk_ptr);
  check_buffer(net_t[NET_BLOCK_SEG], "block_seg", at::kInt, -1);
  n.n_block_chunks = std::max<int64_t>(0, n_chunk_ptr - 1);
  check_buffer(net_t[NET_BLOCK_LOCAL], "block_local", at::kByte, n.n_block_chunks ? m : -1);
  check_buffer(net_t[NET_BLOCK_EDGE], "block_edge", at::kInt, n.n_block_chunks ? m : -1);
  TORCH_CHECK_VALUE(net_t[NET_BLOCK_SEG].numel() % 3 == 0,
                    "iosparse: network buffers are corrupt or belong to another network (block_seg size)");
  n.n_block_segs = net_t[NET_BLOCK_SEG].numel() / 3;
  n.block_chunk_seg = net_t[NET_BLOCK_CHUNK_SEG].data_ptr<int64_t>();
  n.block_chunk_row = net_t[NET_BLOCK_CHUNK_ROW].data_ptr<int64_t>();
  n.block_chunk_edge = net_t[NET_BLOCK_CHUNK_EDGE].data_ptr<int64_t>();
  n.block_seg = net_t[NET_BLOCK_SEG].data_ptr<int32_t>();
  n.block_local = net_t[NET_BLOCK_LOCAL].data_ptr<uint8_t>();
  n.block_edge = net_t[NET_BLOCK_EDGE].data_ptr<int32_t>();
  n.n_ops = net_t[NET_PROG_OPS].numel() / 3;
  n.in_ptr = net_t[NET_IN_PTR].data_ptr<int64_t>();
  n.in_src = net_t[NET_IN_SRC].data_ptr<int32_t>();
  n.act_code = net_t[NET_ACT_CODE].data_ptr<int8_t>();
  n.act_param = net_t[NET_ACT_PARAM].data_ptr<double>();
  n.outputs = net_t[NET_OUTPUTS].data_ptr<int64_t>();
  n.level_ptr = net_t[NET_LEVEL_PTR].data_ptr<int64_t>();
  n.level_neuron = net_t[NET_LEVEL_NEURON].data_ptr<int64_t>();
  n.prog_neuron = net_t[NET_PROG_NEURON].data_ptr<int64_t>();
  n.prog_op_ptr = net_t[NET_PROG_OP_PTR].data_ptr<int64_t>();
  n.prog_ops = net_t[NET_PROG_OPS].data_ptr<int32_t>();
  n.prog_output_rows = net_t[NET_PROG_OUTPUT_ROWS].data_ptr<int64_t>();
  check_pointers(n, net_t);
  validate_once(n, net_t);
  return n;
}

// Raised after a kernel whose guards met an index out of range (the access was skipped).
void check_not_corrupt(const std::atomic<bool>& corrupt) {
  TORCH_CHECK_VALUE(!corrupt.load(), "iosparse: network buffers changed behind PyTorch's back (written without a "
                    "version-counter bump, e.g. through .data or numpy) and now hold out-of-range indices; "
                    "rebuild them with torch_iosparse.ops.prepare");
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
// failed allocation leaves the previous buffer (and its size) in place.
template <typename T>
T* scratch(int slot, int64_t count) {
  struct Buf {
    std::unique_ptr<unsigned char, AlignedFree> p;
    size_t bytes = 0;
  };
  thread_local Buf bufs[5];
  Buf& b = bufs[slot];
  const size_t need = aligned_bytes<T>(count);
  if (b.bytes < need) {
    unsigned char* fresh = static_cast<unsigned char*>(std::aligned_alloc(64, need));
    TORCH_CHECK(fresh != nullptr, "iosparse: out of memory allocating ", need, " bytes");
    b.p.reset(fresh);
    b.bytes = need;
  }
  return reinterpret_cast<T*>(b.p.get());
}

// ------------------------------------------------------------------------------------------ program
// One batch tile: NV vectors of VB bytes per value (BT = NV * VB / sizeof(T) columns). Each ISA's variant
// uses its native width (AVX-512: 64, AVX2: 32, SSE2: 16 bytes): GCC lowers a wider generic vector into
// a sequence of native ones but keeps it in memory across statements, which costs loads and stores in the
// inner loops. Callers count a tile in 64-byte units (nv); each *_avx2 / *_generic wrapper scales it.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
};
// Register tiles: accumulators per inner loop stay within the ISA's vector registers (AVX-512: 32 of
// which 28, AVX2: 16 of which 11; SSE2 has no FMA and needs a temporary per product: 8), the rest holding
// source vectors and broadcast weights, so no accumulator spills to the stack (checked in the
// disassembly, docs/cpu-kernel.md "Register tiles").
constexpr int accumulator_registers(int VB) { return VB == 64 ? 28 : VB == 32 ? 11 : 8; }
// The widest strip of a tile's NV vectors (a power of two dividing NV) whose R rows of accumulators fit.
constexpr int register_strip(int NV, int R, int VB) {
  int s = NV;
  while (s > 1 && s * R > accumulator_registers(VB)) s /= 2;
  return s;
}

// dst = act(acc). The cheap kinds stay in vector registers (the comparisons keep NaN, like PyTorch);
// the transcendental ones go through the scalar formulas.
template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void finish_vec_with(int8_t ac, T lo_s, T hi_s,
                                                           const typename Vec<T, VB>::type* acc,
                                                           typename Vec<T, VB>::type* dst) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  if (ac == ACT_RELU) {
    const V zero = V{};
    for (int j = 0; j < NV; ++j) dst[j] = acc[j] < zero ? zero : acc[j];
  } else if (ac == ACT_HARDTANH) {
    const V lo = V{} + lo_s, hi = V{} + hi_s;
    for (int j = 0; j < NV; ++j) {
      const V a = acc[j] < lo ? lo : acc[j];
      dst[j] = a > hi ? hi : a;
    }
  } else {
    for (int j = 0; j < NV; ++j) dst[j] = acc[j];
    if (ac != ACT_IDENTITY) act_inplace<T>(ac, reinterpret_cast<T*>(dst), BT, lo_s, hi_s);
  }
}
template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void finish_vec(const Net& net, int64_t v,
                                                      const typename Vec<T, VB>::type* acc,
                                                      typename Vec<T, VB>::type* dst) {
  finish_vec_with<T, NV, VB>(net.act_code[v], T(net.act_param[2 * v]), T(net.act_param[2 * v + 1]), acc, dst);
}

// A group of G consecutive positions with identical sources read from identical slots (see
// program.group_positions): every source vector is loaded once and multiplied into G accumulators.
// Position i0's ops run in order (LOADs, eviction STOREs, FMAs for the whole group) up to its FINISH;
// then each member's FINISH and STOREs run in order (the members' FMAs were done in the sweep).
template <typename T, int NV, int VB, int G>
__attribute__((always_inline)) inline void program_group(const Net& net, int64_t i0, const T* __restrict w,
                                                         const T* __restrict b, T* __restrict slots,
                                                         T* __restrict slow) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  const int32_t* ops = net.prog_ops;
  V acc[G][NV];
  int64_t wofs[G];
  const int64_t v0 = net.prog_neuron[i0];
  // Guards (check_pointers): slots < M, slow rows < n_slow, every member's edge o[2] + wofs[g] < n_edges.
  const uint64_t mem = uint64_t(net.memory), n_slow = uint64_t(net.n_slow);
  int64_t wlo = 0, whi = 0;
  for (int g = 0; g < G; ++g) {
    const int64_t v = net.prog_neuron[i0 + g];
    const T bv = b[v];
    for (int j = 0; j < NV; ++j) acc[g][j] = V{} + bv;
    wofs[g] = net.in_ptr[v] - net.in_ptr[v0];
    wlo = std::min(wlo, wofs[g]);
    whi = std::max(whi, wofs[g]);
  }
  int64_t k = net.prog_op_ptr[i0];
  const int64_t end0 = net.prog_op_ptr[i0 + 1];
  for (; k < end0; ++k) {
    const int32_t* o = ops + 3 * k;
    const int32_t code = o[0];
    if (__builtin_expect(code == OP_FMA, 1)) {
      if (__builtin_expect(uint64_t(o[1]) >= mem || o[2] + wlo < 0 || o[2] + whi >= net.n_edges, 0)) {
        net.flag_corrupt();
        continue;
      }
      const V* s = reinterpret_cast<const V*>(slots + int64_t(o[1]) * BT);
      const T* we = w + o[2];
      T wv[G];
#pragma GCC unroll 64
      for (int g = 0; g < G; ++g) wv[g] = we[wofs[g]];
#pragma GCC unroll 64
      for (int j = 0; j < NV; ++j) {
        const V sv = s[j];
#pragma GCC unroll 64
        for (int g = 0; g < G; ++g) acc[g][j] += wv[g] * sv;
      }
    } else if (code == OP_LOAD) {
      if (uint64_t(o[1]) >= n_slow || uint64_t(o[2]) >= mem) {
        net.flag_corrupt();
        continue;
      }
      V* dst = reinterpret_cast<V*>(slots + int64_t(o[2]) * BT);
      const V* src = reinterpret_cast<const V*>(slow + int64_t(o[1]) * BT);
      for (int j = 0; j < NV; ++j) dst[j] = src[j];
    } else if (code == OP_STORE) {
      if (uint64_t(o[1]) >= mem || uint64_t(o[2]) >= n_slow) {
        net.flag_corrupt();
        continue;
      }
      V* dst = reinterpret_cast<V*>(slow + int64_t(o[2]) * BT);
      const V* src = reinterpret_cast<const V*>(slots + int64_t(o[1]) * BT);
      for (int j = 0; j < NV; ++j) dst[j] = src[j];
    } else {
      break;  // FINISH of i0: all FMAs of the group are done
    }
  }
  // The members' FINISHes index the sums by a run-time g: copied out first, so that acc itself is only ever
  // indexed by constants and stays in registers through the op loop (else GCC keeps it on the stack: a load
  // and a store per FMA).
  V sums[G][NV];
#pragma GCC unroll 64
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 64
    for (int j = 0; j < NV; ++j) sums[g][j] = acc[g][j];
  for (int g = 0; g < G; ++g) {
    const int64_t i = i0 + g, v = net.prog_neuron[i];
    // Members' ops are [FMA x indegree, FINISH, STORE...] (program.group_positions): skip the FMAs.
    const int64_t first = g == 0 ? k : net.prog_op_ptr[i] + (net.in_ptr[v + 1] - net.in_ptr[v]);
    for (int64_t kk = first, e = net.prog_op_ptr[i + 1]; kk < e; ++kk) {
      const int32_t* o = ops + 3 * kk;
      if ((o[0] == OP_FINISH || o[0] == OP_STORE) &&
          (uint64_t(o[1]) >= mem || (o[0] == OP_STORE && uint64_t(o[2]) >= n_slow))) {
        net.flag_corrupt();
        continue;
      }
      if (o[0] == OP_FINISH) {
        V* dst = reinterpret_cast<V*>(slots + int64_t(o[1]) * BT);
        finish_vec<T, NV, VB>(net, v, sums[g], dst);
      } else if (o[0] == OP_STORE) {
        V* dst = reinterpret_cast<V*>(slow + int64_t(o[2]) * BT);
        const V* src = reinterpret_cast<const V*>(slots + int64_t(o[1]) * BT);
        for (int j = 0; j < NV; ++j) dst[j] = src[j];
      }
      // FMAs of members were done in the sweep; members have no LOAD by construction.
    }
  }
}

template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void program_tile_body(const Net& net, const T* __restrict w,
                                                             const T* __restrict b, T* __restrict slots,
                                                             T* __restrict slow) {
  // A group whose G x NV accumulators would not fit the registers runs as consecutive sub-groups of at most
  // GMAX positions: each member's own ops start with its FMAs over the same slots (validate_program), and
  // the slots hold the same values from the group's first FMA to its last member's FINISH.
  constexpr int GMAX = std::max(1, std::min(4, accumulator_registers(VB) / NV));
  for (int64_t grp = 0; grp < net.n_groups; ++grp) {
    for (int64_t i0 = net.prog_group_ptr[grp], end = net.prog_group_ptr[grp + 1]; i0 < end; i0 += GMAX) {
      switch (std::min<int64_t>(GMAX, end - i0)) {
        case 1: program_group<T, NV, VB, 1>(net, i0, w, b, slots, slow); break;
        case 2: program_group<T, NV, VB, std::min(2, GMAX)>(net, i0, w, b, slots, slow); break;
        case 3: program_group<T, NV, VB, std::min(3, GMAX)>(net, i0, w, b, slots, slow); break;
        default: program_group<T, NV, VB, GMAX>(net, i0, w, b, slots, slow); break;
      }
    }
  }
}

template <typename T, int NV>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma,avx2"))) void program_tile_avx512(
    const Net& net, const T* w, const T* b, T* slots, T* slow) {
  program_tile_body<T, NV, 64>(net, w, b, slots, slow);
}
template <typename T, int NV>
__attribute__((target("avx2,fma"))) void program_tile_avx2(const Net& net, const T* w, const T* b, T* slots,
                                                           T* slow) {
  program_tile_body<T, 2 * NV, 32>(net, w, b, slots, slow);
}
template <typename T, int NV>
void program_tile_generic(const Net& net, const T* w, const T* b, T* slots, T* slow) {
  program_tile_body<T, 4 * NV, 16>(net, w, b, slots, slow);
}

enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
Isa detect_isa() {
  static const Isa isa = [] {
    const char* force = std::getenv("IOSPARSE_ISA");  // "generic" / "avx2": test the fallbacks
    __builtin_cpu_init();
    Isa best = ISA_GENERIC;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = ISA_AVX2;
    if (best == ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      best = ISA_AVX512;
    if (force && std::strcmp(force, "generic") == 0) best = ISA_GENERIC;
    if (force && std::strcmp(force, "avx2") == 0 && best >= ISA_AVX2) best = ISA_AVX2;
    return best;
  }();
  return isa;
}

template <typename T>
using TileFn = void (*)(const Net&, const T*, const T*, T*, T*);

template <typename T, int NV>
TileFn<T> pick_tile_fn() {
  switch (detect_isa()) {
    case ISA_AVX512: return &program_tile_avx512<T, NV>;
    case ISA_AVX2: return &program_tile_avx2<T, NV>;
    default: return &program_tile_generic<T, NV>;
  }
}

// Debug aid for the tests: IOSPARSE_POISON=1 fills every output and scratch buffer with NaN before a
// kernel runs, so an element that is read before it is written (or never written) shows up as NaN.
bool poison_enabled() {
  const char* p = std::getenv("IOSPARSE_POISON");
  return p && p[0] == '1';
}
template <typename T>
void poison(T* p, int64_t n) {
  std::fill(p, p + n, std::numeric_limits<T>::quiet_NaN());
}

// Tile row row_of(i) = feature i of the tile's nb batch rows (x row-major [nb, n_in]), zero padded to BT,
// for the features [first, last) (default: all). Blocks of 64 features: each batch row is read in
// contiguous runs, the block's tile rows stay in L1.
template <typename T, typename RowOf>
void transpose_in(const T* x, int64_t n_in, int64_t nb, int64_t BT, T* tile, RowOf row_of, int64_t first = 0,
                  int64_t last = -1) {
  constexpr int64_t FB = 64;
  if (last < 0) last = n_in;
  for (int64_t i0 = first; i0 < last; i0 += FB) {
    const int64_t i1 = std::min(last, i0 + FB);
    for (int64_t c = 0; c < nb; ++c) {
      const T* xr = x + c * n_in;
      for (int64_t i = i0; i < i1; ++i) tile[row_of(i) * BT + c] = xr[i];
    }
    for (int64_t i = i0; i < i1; ++i) std::fill(tile + row_of(i) * BT + nb, tile + (row_of(i) + 1) * BT, T(0));
  }
}
// y[c, j] = tile[row_of(rows[j]), c] for the tile's nb batch rows; blocks of 64 outputs, so y is written
// in contiguous runs (a fresh output is page-faulted in order) and the block's tile rows stay in L1.
template <typename T, typename RowOf>
void gather_out(const T* tile, const int64_t* rows, int64_t n_out, int64_t nb, int64_t BT, T* y, RowOf row_of) {
  constexpr int64_t OB = 64;
  for (int64_t j0 = 0; j0 < n_out; j0 += OB) {
    const int64_t j1 = std::min(n_out, j0 + OB);
    for (int64_t c = 0; c < nb; ++c) {
      T* yr = y + c * n_out;
      for (int64_t j = j0; j < j1; ++j) yr[j] = tile[row_of(rows[j]) * BT + c];
    }
  }
}
inline int64_t same_row(int64_t v) { return v; }

// Waits until counter >= need: pause first (the wait is usually a few microseconds), then yield the core.
inline void spin_until(const std::atomic<int64_t>& counter, int64_t need) {
  for (int spin = 0; counter.load(std::memory_order_acquire) < need; ++spin) {
    if (spin < 4096) _mm_pause(); else std::this_thread::yield();
  }
}

// Level-path parallelism that never waits for a descheduled thread.
// at::parallel_for (OpenMP) forks and joins once per level: on a busy machine every join waits for the
// slowest thread to be scheduled again (measured: 14-40x slower than one thread at batch 1). Instead the
// calling thread posts one job for the whole network and works through its chunks itself; helper threads
// (a small private pool) claim chunks too if they wake up in time. A chunk of level l starts only when all
// chunks of earlier levels are done, and the caller returns as soon as every chunk is done, so a helper
// that is never scheduled costs nothing, and one that is descheduled holds back at most one chunk.
// The claim word packs (generation, next chunk, chunk count) so a late helper cannot claim a chunk of a
// finished job (compare-and-swap on the whole word).
class ChunkPool {
 public:
  using Fn = void (*)(const void* ctx, int64_t chunk);
  static ChunkPool& get() { return *instance(); }
  // Runs fn(ctx, c) for c in [0, n_chunks); chunk c may start once done >= first_of_level[c].
  void run(Fn fn, const void* ctx, int64_t n_chunks, const int64_t* wait_for, int64_t helpers) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);  // one job at a time (concurrent callers queue)
    ensure_helpers(helpers);
    fn_ = fn;
    ctx_ = ctx;
    wait_for_ = wait_for;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (gen_counter_ = (gen_counter_ + 1) & 0xFFFFFF);
    word_.store(pack(gen, 0, uint64_t(n_chunks)), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      posted_ = gen;
    }
    sleep_cv_.notify_all();
    while (work_once()) {
    }
    // Chunks claimed by helpers may still be running: wait for them (each holds at most one).
    spin_until(done_, n_chunks);
  }

 private:
  // Leaked on purpose: detached helpers outlive exit handlers. A fork() child has none of the helpers and
  // may inherit a mutex locked by a parent thread that is gone there: it starts from a fresh pool.
  static ChunkPool*& instance() {
    static ChunkPool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { instance() = new ChunkPool(); });
      return new ChunkPool();
    }();
    return pool;
  }
  static uint64_t pack(uint64_t gen, uint64_t next, uint64_t total) { return (gen << 40) | (next << 20) | total; }
  // Claims and runs one chunk; false when none is left.
  bool work_once() {
    uint64_t w = word_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = (w >> 20) & 0xFFFFF, total = w & 0xFFFFF;
      if (next >= total) return false;
      if (word_.compare_exchange_weak(w, w + (uint64_t(1) << 20), std::memory_order_acq_rel)) {
        // Claimed: the caller waits for this chunk, so the job fields below are this job's.
        const int64_t need = wait_for_[next];
        spin_until(done_, need);
        fn_(ctx_, int64_t(next));
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
  }
  void ensure_helpers(int64_t helpers) {
    while (int64_t(n_helpers_) < helpers) {
      std::thread([this] { helper_loop(); }).detach();
      ++n_helpers_;
    }
  }
  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(sleep_mutex_);
        sleep_cv_.wait(lk, [&] { return posted_ != seen; });
        seen = posted_;
      }
      while (work_once()) {
      }
    }
  }
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> done_{0};
  uint64_t gen_counter_ = 0, posted_ = 0;
  size_t n_helpers_ = 0;
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
  const int64_t* wait_for_ = nullptr;
};

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
  ChunkPool::get().run([](const void* ctx, int64_t c) { (*static_cast<const F*>(ctx))(c); }, &f, n_chunks,
                       wait_for, threads - 1);
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

// Set in a fork() child: GNU OpenMP is not fork-safe (a child forked while another thread of the parent
// was inside a parallel region hangs in its first region: DataLoader workers fork), so children use the pool,
// which resets itself after a fork.
std::atomic<bool> in_forked_child{false};

// Which threads run the chunks of every path: IOSPARSE_WORKERS=omp (torch's OpenMP threads, the default)
// or pool (the private chunk pool; always in a forked child).
bool workers_are_omp() {
  static const bool omp = [] {
    const char* s = std::getenv("IOSPARSE_WORKERS");
    return !(s && std::strcmp(s, "pool") == 0);
  }();
  return omp && !in_forked_child.load(std::memory_order_relaxed);
}

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

template <typename T>
void program_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y) {
  // NV vectors of 64 bytes per tile: the batch_tile in columns rounded to a supported width.
  const int64_t want = std::max<int64_t>(1, net.batch_tile * int64_t(sizeof(T)) / 64);
  int nv = want >= 8 ? 8 : want >= 4 ? 4 : want >= 2 ? 2 : 1;
  // Small batches: narrower tiles so that every thread gets one (batch 64 on 2 cores: 2 tiles of 32).
  const int64_t threads = at::get_num_threads();
  while (nv > 1 && (nv / 2) * int64_t(64 / sizeof(T)) >= B) nv /= 2;  // no tile wider than the batch
  while (nv > 1 && (B + nv * int64_t(64 / sizeof(T)) - 1) / (nv * int64_t(64 / sizeof(T))) < threads) nv /= 2;
  TileFn<T> fn = nv == 8 ? pick_tile_fn<T, 8>() : nv == 4 ? pick_tile_fn<T, 4>()
               : nv == 2 ? pick_tile_fn<T, 2>() : pick_tile_fn<T, 1>();
  const int64_t BT = nv * int64_t(64 / sizeof(T));
  const int64_t n_tiles = (B + BT - 1) / BT;
  const int64_t n_in = net.n_inputs, n_out = net.n_outputs;
  // Tiles go to the calling thread and the chunk pool (not an OpenMP region: on a busy machine a join
  // waits for a descheduled thread; here the caller takes every tile no helper has claimed).
  const std::vector<int64_t> wait_for(n_tiles, 0);
  run_chunked(n_tiles, wait_for.data(), [&](int64_t t) {
    T* slots = scratch<T>(0, checked_mul(net.memory, BT));
    T* sl = scratch<T>(1, checked_mul(net.n_slow, BT));
    if (poison_enabled()) {
      poison(slots, net.memory * BT);
      poison(sl, net.n_slow * BT);
    }
    const int64_t b0 = t * BT, nb = std::min(BT, B - b0);
    // Transposed input tile: slow row i = feature i of the tile's columns (zero padded).
    transpose_in<T>(x + b0 * n_in, n_in, nb, BT, sl, same_row);
    fn(net, w, b, slots, sl);
    gather_out<T>(sl, net.prog_output_rows, n_out, nb, BT, y + b0 * n_out, same_row);
  });
}

// ------------------------------------------------------------------------------------------ panel
// Layer-by-layer SpMM with register blocking across outputs. A panel computes R (1..8) neurons of one
// level together over the union of their sources (ops.prepare / build_panels groups neurons that share
// sources, e.g. the sliding windows of RadiX-Net layers): each source vector of the tile is loaded once
// and multiplied into R accumulator sets, with a zero weight where the source does not feed a row. Panels
// that follow each other share most sources, so those come from L1. Values: vals[n_neurons][BT] per tile.
// This path does not follow the plan's slot schedule (every value of the tile lives in one buffer).
// Row of neuron v in the tile buffer. Layers like RadiX-Net's read sources 32 or 1024 rows apart: with a
// plain v * BT layout those rows fall into one or two cache sets (power-of-two strides) and evict each
// other. One padding row every 16 rows and another every 1024 spread such strides over the sets.
inline int64_t panel_row(int64_t v) { return v + (v >> 4) + (v >> 10); }
constexpr int64_t PANEL_PREFETCH = 120;

// Bias and activation of each panel row, gathered once per call in panel order (per tile they would be
// scattered reads, one per neuron).
template <typename T>
struct RowParams {
  T bias, lo, hi;
  int32_t code, row;  // activation; tile-buffer row the neuron is written to
};

template <typename T, int NV, int VB, int R>
__attribute__((always_inline)) inline void panel_run(const Net& net, int64_t p, const T* __restrict pw,
                                                     const RowParams<T>* __restrict rows, T* __restrict vals) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  const int64_t u0 = net.panel_ptr[p], u1 = net.panel_ptr[p + 1];
  const T* wp = pw + net.panel_edge_ptr[p];
  const int32_t* src = net.panel_src_row;
  // Panels two ahead write scattered rows (permuted layers): fetch those for writing now.
  const int64_t row_end = net.panel_row_ptr[p] + 2 * R;
  for (int r = 0; r < R && row_end + r < net.n_computed; ++r)
    __builtin_prefetch(vals + int64_t(rows[row_end + r].row) * BT, 1);
  const RowParams<T>* rp = rows + net.panel_row_ptr[p];
  // Sources PANEL_PREFETCH columns ahead (into the next panels) are prefetched: most come from L1 (shared
  // with the previous panel), the new ones from L2/L3 at rows the hardware prefetcher cannot guess.
  const int64_t last = net.panel_ptr[net.n_panels] - 1;
  // R rows x NV vectors may not fit the registers (AVX2: 8 rows x 2 vectors already fill them): the tile
  // is done in strips of S vectors, the panel's sources and weights read again per strip (from L1).
  constexpr int S = register_strip(NV, R, VB);
  for (int j0 = 0; j0 < NV; j0 += S) {
    V acc[R][S];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < S; ++j) acc[r][j] = V{} + rp[r].bias;
    const T* wu = wp;
    for (int64_t u = u0; u < u1; ++u, wu += R) {
      if (j0 == 0) __builtin_prefetch(vals + int64_t(src[std::min(u + PANEL_PREFETCH, last)]) * BT);
      const V* s = reinterpret_cast<const V*>(vals + int64_t(src[u]) * BT) + j0;
      for (int j = 0; j < S; ++j) {
        const V sv = s[j];
        for (int r = 0; r < R; ++r) acc[r][j] += wu[r] * sv;
      }
    }
    for (int r = 0; r < R; ++r)
      finish_vec_with<T, S, VB>(int8_t(rp[r].code), rp[r].lo, rp[r].hi, acc[r],
                                reinterpret_cast<V*>(vals + int64_t(rp[r].row) * BT) + j0);
  }
}

template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void panel_tile_body(const Net& net, const T* __restrict pw,
                                                           const RowParams<T>* __restrict rows, T* __restrict vals) {
  for (int64_t p = 0; p < net.n_panels; ++p) {
    switch (net.panel_row_ptr[p + 1] - net.panel_row_ptr[p]) {
      case 1: panel_run<T, NV, VB, 1>(net, p, pw, rows, vals); break;
      case 2: panel_run<T, NV, VB, 2>(net, p, pw, rows, vals); break;
      case 3: panel_run<T, NV, VB, 3>(net, p, pw, rows, vals); break;
      case 4: panel_run<T, NV, VB, 4>(net, p, pw, rows, vals); break;
      case 5: panel_run<T, NV, VB, 5>(net, p, pw, rows, vals); break;
      case 6: panel_run<T, NV, VB, 6>(net, p, pw, rows, vals); break;
      case 7: panel_run<T, NV, VB, 7>(net, p, pw, rows, vals); break;
      default: panel_run<T, NV, VB, 8>(net, p, pw, rows, vals); break;
    }
  }
}
template <typename T, int NV>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma,avx2"))) void panel_tile_avx512(
    const Net& net, const T* pw, const RowParams<T>* rows, T* vals) {
  panel_tile_body<T, NV, 64>(net, pw, rows, vals);
}
template <typename T, int NV>
__attribute__((target("avx2,fma"))) void panel_tile_avx2(const Net& net, const T* pw, const RowParams<T>* rows, T* vals) {
  panel_tile_body<T, 2 * NV, 32>(net, pw, rows, vals);
}
template <typename T, int NV>
void panel_tile_generic(const Net& net, const T* pw, const RowParams<T>* rows, T* vals) {
  panel_tile_body<T, 4 * NV, 16>(net, pw, rows, vals);
}
template <typename T>
using PanelFn = void (*)(const Net&, const T*, const RowParams<T>*, T*);
template <typename T, int NV>
PanelFn<T> pick_panel_fn() {
  switch (detect_isa()) {
    case ISA_AVX512: return &panel_tile_avx512<T, NV>;
    case ISA_AVX2: return &panel_tile_avx2<T, NV>;
    default: return &panel_tile_generic<T, NV>;
  }
}

// Weights in a path's own order (panel cells, block positions) cached across calls: the gather is a full
// pass over the edges (~15 % of a radix N=65536 B=256 panel call, more at small batch). An entry is valid
// for one weight tensor at one value of its version counter, which every in-place update through PyTorch
// bumps (optimizer steps, add_, copy_ under no_grad, load_state_dict); the entry holds a reference to the
// weight and to the order tensor, so their memory cannot be freed and reused by another tensor at the same
// address while the entry lives.
// Writes that bypass the version counter (through `.data`, numpy views, raw pointers) are NOT seen:
// IOSPARSE_PANEL_WEIGHT_CACHE=0 (read per call) or iosparse::clear_panel_weight_cache() handle those.
// Inference tensors have no version counter and are never cached.
struct OrderedWeightEntry {
  at::Tensor weight, order, pw;
  int64_t version = 0;
  uint64_t stamp = 0;
};
constexpr size_t ORDERED_CACHE_ENTRIES = 4;
std::mutex ordered_cache_mutex;
std::vector<OrderedWeightEntry> ordered_cache;
uint64_t ordered_cache_clock = 0;

// A fork() child runs its chunks on the pool (in_forked_child, see run_chunked) and starts with a fresh,
// empty weight cache: another parent thread may have held the cache's mutex, or been changing the list,
// at the fork (the old objects are leaked in the child on purpose).
const int fork_hook = pthread_atfork(nullptr, nullptr, [] {
  in_forked_child.store(true);
  new (&ordered_cache_mutex) std::mutex();
  new (&ordered_cache) std::vector<OrderedWeightEntry>();
});

bool weight_cache_enabled() {
  const char* s = std::getenv("IOSPARSE_PANEL_WEIGHT_CACHE");
  return !(s && s[0] == '0');
}

bool same_tensor_memory(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && b.defined() && a.storage().unsafeGetStorageImpl() == b.storage().unsafeGetStorageImpl() &&
         a.storage_offset() == b.storage_offset() && a.numel() == b.numel() && a.scalar_type() == b.scalar_type();
}

// pw[k] = w[order[k]], 0 where order[k] == -1 (a panel cell whose source does not feed its row). Guarded:
// an order entry outside [-1, n_w) also gives 0 and is noted in `bad`.
template <typename T>
inline T ordered_weight(const int32_t* order, const T* w, int64_t n_w, int64_t k, bool& bad) {
  const int32_t e = order[k];
  if (e >= 0 && e < n_w) return w[e];
  bad |= e != -1;
  return T(0);
}

// A hit also compares 64 cells (spread over the order, shifted every call) with the weights they come
// from: whole-tensor writes that bypass the version counter (`p.data.add_(...)` in hand-written SGD) are
// then caught; a write to a few single elements through `.data` may still be missed.
template <typename T>
bool ordered_weights_spot_check(const int32_t* order, int64_t E, const T* w, int64_t n_w, const T* pw, uint64_t salt) {
  if (E == 0) return true;
  constexpr int64_t SAMPLES = 64;
  const int64_t step = std::max<int64_t>(1, E / SAMPLES), shift = int64_t((salt * 2654435761u) % uint64_t(step));
  for (int64_t i = 0; i < SAMPLES; ++i) {
    const int64_t k = (i * step + shift) % E;
    bool bad = false;
    const T want = ordered_weight(order, w, n_w, k, bad);
    if (bad) return false;
    if (std::memcmp(&want, pw + k, sizeof(T)) != 0) return false;
  }
  return true;
}

void clear_panel_weight_cache() {
  std::lock_guard<std::mutex> lock(ordered_cache_mutex);
  ordered_cache.clear();
}

int64_t panel_weight_cache_size() {
  std::lock_guard<std::mutex> lock(ordered_cache_mutex);
  return int64_t(ordered_cache.size());
}

// The ordered weights of one call: from the cache (hit), or a buffer the caller fills with
// ordered_weight() (in parallel chunks) and then hands to remember().
template <typename T>
struct OrderedWeights {
  at::Tensor pw_t;  // the cached buffer (undefined when the cache is off or the weight is an inference tensor)
  T* pw = nullptr;
  bool hit = false;
  int64_t version = 0;

  const int32_t* order;
  int64_t E;
  // After a miss the caller's job fills the buffer in slices() slices of SLICE cells (fill_slice), in parallel.
  static constexpr int64_t SLICE = 1 << 18;

  OrderedWeights(const at::Tensor& weight_t, const at::Tensor& order_t, int scratch_slot)
      : order(order_t.data_ptr<int32_t>()), E(order_t.numel()) {
    const bool cacheable = weight_cache_enabled() && !weight_t.is_inference();
    if (cacheable) {
      version = int64_t(weight_t._version());
      std::lock_guard<std::mutex> lock(ordered_cache_mutex);
      for (size_t i = 0; i < ordered_cache.size(); ++i) {
        OrderedWeightEntry& e = ordered_cache[i];
        if (!same_tensor_memory(e.order, order_t)) continue;
        if (same_tensor_memory(e.weight, weight_t) && e.version == version &&
            ordered_weights_spot_check(order, E, weight_t.data_ptr<T>(), weight_t.numel(), e.pw.data_ptr<T>(),
                                       ordered_cache_clock)) {
          e.stamp = ++ordered_cache_clock;
          pw_t = e.pw;
          hit = true;
          break;
        }
        // Same network, other weights or a newer version (training): refill that buffer, taken out of the
        // cache meanwhile, unless another call is still reading it.
        if (e.pw.use_count() == 1 && e.pw.scalar_type() == weight_t.scalar_type()) pw_t = std::move(e.pw);
        ordered_cache.erase(ordered_cache.begin() + i);
        break;
      }
      if (!pw_t.defined()) pw_t = at::empty({std::max<int64_t>(E, 1)}, weight_t.options());
    }
    pw = cacheable ? pw_t.data_ptr<T>() : scratch<T>(scratch_slot, E);
  }
  int64_t slices() const { return hit ? 0 : (E + SLICE - 1) / SLICE; }
  void fill_slice(const Net& net, const T* w, int64_t c) {
    bool bad = false;
    for (int64_t k = c * SLICE, e = std::min(E, (c + 1) * SLICE); k < e; ++k)
      pw[k] = ordered_weight(order, w, net.n_edges, k, bad);
    if (bad) net.flag_corrupt();
  }
  // After a miss, once the buffer is filled: keep it for the next call (evicting the least recent entry).
  void remember(const Net& net, const at::Tensor& weight_t, const at::Tensor& order_t) {
    if (hit || !pw_t.defined() || net.corrupt->load()) return;
    std::lock_guard<std::mutex> lock(ordered_cache_mutex);
    if (ordered_cache.size() >= ORDERED_CACHE_ENTRIES) {
      auto oldest = std::min_element(ordered_cache.begin(), ordered_cache.end(),
                                     [](const OrderedWeightEntry& a, const OrderedWeightEntry& c) { return a.stamp < c.stamp; });
      ordered_cache.erase(oldest);
    }
    ordered_cache.push_back(OrderedWeightEntry{weight_t, order_t, pw_t, version, ++ordered_cache_clock});
  }
};

template <typename T>
void panel_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y, const at::Tensor& weight_t,
                   const at::Tensor& panel_edge_t) {
  TORCH_CHECK_VALUE(net.n_panels > 0, "iosparse: the panel strategy needs panels (ops.prepare builds them)");
  // Weights in panel order, zeros where a source does not feed a row: from the cache when this weight
  // tensor at this version was gathered before, else one pass over the edges (filled by the job below and
  // then put into the cache).
  OrderedWeights<T> ow(weight_t, panel_edge_t, 3);
  const T* pw = ow.pw;
  // Tile-buffer row of every neuron. Layered nets (every edge joins consecutive levels, outputs on the
  // last; checked in validate_indices) need two levels at a time: even and odd levels share two
  // ping-pong halves, so a tile's working set stays 2 x width rows instead of the whole network (at radix
  // N=65536 L=4: 17 MiB instead of 45 MiB per thread). Other DAGs keep one row per neuron.
  int32_t* row_of = scratch<int32_t>(0, net.n_neurons);
  int64_t tile_rows;
  if (net.layered) {
    int64_t width = net.n_inputs;
    for (int64_t l = 0; l < net.n_levels; ++l) width = std::max(width, net.level_ptr[l + 1] - net.level_ptr[l]);
    const int64_t half = panel_row(width - 1) + 1 + 8;  // +8 rows: the halves start in different cache sets
    for (int64_t i = 0; i < net.n_inputs; ++i) row_of[i] = int32_t(panel_row(i));
    for (int64_t l = 0; l < net.n_levels; ++l)
      for (int64_t q = net.level_ptr[l]; q < net.level_ptr[l + 1]; ++q)
        row_of[net.level_neuron[q]] = int32_t(((l + 1) & 1) * half + panel_row(q - net.level_ptr[l]));
    tile_rows = 2 * half;
  } else {
    for (int64_t v = 0; v < net.n_neurons; ++v) row_of[v] = int32_t(panel_row(v));
    tile_rows = panel_row(net.n_neurons - 1) + 1;
  }
  TORCH_CHECK(tile_rows < (int64_t(1) << 31), "iosparse: panel path: network too large");
  // Per call: the tile row of every panel column's source and the row parameters in panel order, filled
  // by slices of the job below (serial, they were ~4 ms of a 75 ms call at N=65536 on 2 threads).
  const int64_t n_src = net.panel_ptr[net.n_panels];
  int32_t* src_row = scratch<int32_t>(1, n_src);
  Net pnet = net;
  pnet.panel_src_row = src_row;
  RowParams<T>* rows = scratch<RowParams<T>>(4, net.n_computed);  // not slot 0: row_of lives there
  auto row_fn = [row_of](int64_t v) { return int64_t(row_of[v]); };
  // One or two 64-byte vectors per value: R <= 8 rows x NV vectors of accumulators stay in registers.
  const int64_t lanes = int64_t(64 / sizeof(T));
  int nv = net.panel_tile >= 4 * lanes ? 4 : net.panel_tile >= 2 * lanes ? 2 : 1;
  const int64_t threads = at::get_num_threads();
  while (nv > 1 && (nv / 2) * lanes >= B) nv /= 2;
  while (nv > 1 && (B + nv * lanes - 1) / (nv * lanes) < threads) nv /= 2;
  PanelFn<T> fn = nv == 4 ? pick_panel_fn<T, 4>() : nv == 2 ? pick_panel_fn<T, 2>() : pick_panel_fn<T, 1>();
  const int64_t BT = nv * lanes;
  const int64_t n_tiles = (B + BT - 1) / BT;
  const int64_t n_in = net.n_inputs, n_out = net.n_outputs;
  // One job (see program_forward): first the weight slices (after a cache miss) and the slices of the
  // per-call tables, then the tiles, which start once every slice is done.
  constexpr int64_t SETUP_CHUNK = 1 << 18;
  const int64_t n_pw = ow.slices();
  const int64_t n_src_slices = (n_src + SETUP_CHUNK - 1) / SETUP_CHUNK;
  const int64_t pre = n_pw + n_src_slices + (net.n_computed + SETUP_CHUNK - 1) / SETUP_CHUNK;
  std::vector<int64_t> wait_for(pre + n_tiles, 0);
  std::fill(wait_for.begin() + pre, wait_for.end(), pre);
  run_chunked(pre + n_tiles, wait_for.data(), [&](int64_t c) {
    if (c < n_pw) {
      ow.fill_slice(net, w, c);
      return;
    }
    if (c < n_pw + n_src_slices) {
      const int64_t u0 = (c - n_pw) * SETUP_CHUNK, u1 = std::min(n_src, u0 + SETUP_CHUNK);
      uint32_t bad = 0;
      for (int64_t u = u0; u < u1; ++u) src_row[u] = row_of[guarded(net.panel_src[u], uint32_t(net.n_neurons), bad)];
      if (bad) net.flag_corrupt();
      return;
    }
    if (c < pre) {
      const int64_t r0 = (c - n_pw - n_src_slices) * SETUP_CHUNK, r1 = std::min(net.n_computed, r0 + SETUP_CHUNK);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t v = net.panel_target[r];
        if (v < net.n_inputs || v >= net.n_neurons) {  // guarded: an input row is never a panel's target
          net.flag_corrupt();
          v = net.n_inputs;
        }
        rows[r] = RowParams<T>{b[v], T(net.act_param[2 * v]), T(net.act_param[2 * v + 1]),
                               int32_t(net.act_code[v]), row_of[v]};
      }
      return;
    }
    T* vals = scratch<T>(2, checked_mul(tile_rows, BT));
    if (poison_enabled()) poison(vals, tile_rows * BT);
    const int64_t t = c - pre, b0 = t * BT, nb = std::min(BT, B - b0);
    transpose_in<T>(x + b0 * n_in, n_in, nb, BT, vals, row_fn);
    fn(pnet, pw, rows, vals);
    gather_out<T>(vals, net.outputs, n_out, nb, BT, y + b0 * n_out, row_fn);
  });
  ow.remember(net, weight_t, panel_edge_t);
}

// ------------------------------------------------------------------------------------------ block
// Rows of the block path's values buffer past the last neuron: a block may start at any neuron and its
// one-byte offsets reach 255 rows further (only forged buffers read them; the block builder never does).
constexpr int64_t BLOCK_PAD_ROWS = 256;

// Level by level like the level path, but each neuron's edges are visited one source block at a time: a
// block is up to 256 consecutive neurons (ops.BLOCK_SOURCES) whose values for a tile of BT columns stay in
// L1/L2 while every row of the chunk that reads the block accumulates its edges from it. build_blocks lays
// out, per chunk of a level's rows, the segments (row, block start, edge count) block-major, and per edge
// the source's one-byte offset in its block. Without the blocking a pruned 4096-wide MLP layer at B = 64
// reads each edge's 256-byte source vector from anywhere in 1 MiB of values (measured 6.0 ms per
// 10 %-dense layer against 3.4-3.8 ms blocked, docs/cpu-kernel.md "Block path"); the inner loop is then
// close to the FMA rate of a core (one 64-column edge = four 16-lane FMAs).
// Weights stream in block order (a cached copy, OrderedWeights). vals[n_neurons][BT] per column tile;
// the chunks of a level run in parallel; rows start at their bias and are finished (activation) once all
// their segments are done.
template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void block_chunk_body(const Net& net, int64_t c, const T* __restrict pw,
                                                            const T* __restrict b, T* __restrict vals) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  const int64_t r0 = net.block_chunk_row[c], r1 = net.block_chunk_row[c + 1];
  for (int64_t q = r0; q < r1; ++q) {
    const int64_t v = net.level_neuron[q];
    V* y = reinterpret_cast<V*>(vals + v * BT);
    const V bv = V{} + b[v];
    for (int j = 0; j < NV; ++j) y[j] = bv;
  }
  const uint8_t* __restrict local = net.block_local;
  int64_t k = net.block_chunk_edge[c];
  const int64_t k_end = net.block_chunk_edge[c + 1];
  for (int64_t sg = net.block_chunk_seg[c]; sg < net.block_chunk_seg[c + 1]; ++sg) {
    const int32_t* seg = net.block_seg + 3 * sg;
    // Guarded (check_pointers): the target is a neuron, the block starts at one (vals has BLOCK_PAD_ROWS
    // rows past the last neuron for the one-byte offsets) and the edges stay inside the chunk.
    if (uint64_t(seg[0]) >= uint64_t(net.n_neurons) || uint64_t(seg[1]) >= uint64_t(net.n_neurons) || seg[2] < 0 ||
        seg[2] > k_end - k) {
      net.flag_corrupt();
      return;
    }
    V* y = reinterpret_cast<V*>(vals + int64_t(seg[0]) * BT);
    const T* xb = vals + int64_t(seg[1]) * BT;
    const int64_t end = k + seg[2];
    constexpr int S = register_strip(NV, 1, VB);  // SSE2 at 64 columns: two strips of 8 vectors
    for (int j0 = 0; j0 < NV; j0 += S) {
      V acc[S];
      for (int j = 0; j < S; ++j) acc[j] = y[j0 + j];
      for (int64_t kk = k; kk < end; ++kk) {
        const V* s = reinterpret_cast<const V*>(xb + int64_t(local[kk]) * BT) + j0;
        const T wv = pw[kk];
        for (int j = 0; j < S; ++j) acc[j] += wv * s[j];
      }
      for (int j = 0; j < S; ++j) y[j0 + j] = acc[j];
    }
    k = end;
  }
  for (int64_t q = r0; q < r1; ++q) {
    const int64_t v = net.level_neuron[q];
    V* y = reinterpret_cast<V*>(vals + v * BT);
    finish_vec<T, NV, VB>(net, v, y, y);
  }
}
template <typename T, int NV>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma,avx2"))) void block_chunk_avx512(
    const Net& net, int64_t c, const T* pw, const T* b, T* vals) {
  block_chunk_body<T, NV, 64>(net, c, pw, b, vals);
}
template <typename T, int NV>
__attribute__((target("avx2,fma"))) void block_chunk_avx2(const Net& net, int64_t c, const T* pw, const T* b, T* vals) {
  block_chunk_body<T, 2 * NV, 32>(net, c, pw, b, vals);
}
template <typename T, int NV>
void block_chunk_generic(const Net& net, int64_t c, const T* pw, const T* b, T* vals) {
  block_chunk_body<T, 4 * NV, 16>(net, c, pw, b, vals);
}
template <typename T>
using BlockFn = void (*)(const Net&, int64_t, const T*, const T*, T*);
template <typename T, int NV>
BlockFn<T> pick_block_fn() {
  switch (detect_isa()) {
    case ISA_AVX512: return &block_chunk_avx512<T, NV>;
    case ISA_AVX2: return &block_chunk_avx2<T, NV>;
    default: return &block_chunk_generic<T, NV>;
  }
}

template <typename T>
void block_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y, const at::Tensor& weight_t,
                   const at::Tensor& block_edge_t) {
  TORCH_CHECK_VALUE(net.n_block_chunks > 0,
                    "iosparse: the block strategy needs source blocks (ops.prepare builds them)");
  const int64_t C = net.n_block_chunks;
  OrderedWeights<T> ow(weight_t, block_edge_t, 3);
  const T* pw = ow.pw;
  // The widest tile of up to four 64-byte vectors the batch fills (64 floats per source: a 256-source block
  // is 64 KiB, see ops.BLOCK_SOURCES).
  const int64_t lanes = int64_t(64 / sizeof(T));
  const int nv = B > 2 * lanes ? 4 : B > lanes ? 2 : 1;
  BlockFn<T> fn = nv == 4 ? pick_block_fn<T, 4>() : nv == 2 ? pick_block_fn<T, 2>() : pick_block_fn<T, 1>();
  const int64_t BT = nv * lanes, n_tiles = (B + BT - 1) / BT;
  // After a cache miss the (first) job also fills the block-ordered weights, slices first.
  const int64_t n_pw = ow.slices();
  const int64_t n_in = net.n_inputs, n_out = net.n_outputs;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (n_tiles >= threads) {
    // Enough tiles for every thread: one job of [weight slices] [whole tiles], each tile on one thread
    // with its own values buffer, its levels in order (no waits between the chunks of a level). Measured
    // at 2 threads against running the tiles one after another, each over both threads: MLP 90 % B=256
    // 15.6 -> 14.7 ms, B=1024 57.7 -> 53.5 ms; the demo's 256-512-512-10 MLP B=1024 1.23 -> 0.73 ms.
    std::vector<int64_t> wait_for(n_pw + n_tiles, n_pw);
    std::fill(wait_for.begin(), wait_for.begin() + n_pw, 0);
    run_chunked(n_pw + n_tiles, wait_for.data(), [&](int64_t c) {
      if (c < n_pw) {
        ow.fill_slice(net, w, c);
        return;
      }
      T* vals = scratch<T>(2, checked_mul(net.n_neurons + BLOCK_PAD_ROWS, BT));
      if (poison_enabled()) poison(vals, (net.n_neurons + BLOCK_PAD_ROWS) * BT);
      const int64_t b0 = (c - n_pw) * BT, nb = std::min(BT, B - b0);
      transpose_in<T>(x + b0 * n_in, n_in, nb, BT, vals, same_row);
      for (int64_t k = 0; k < C; ++k) fn(net, k, pw, b, vals);
      gather_out<T>(vals, net.outputs, n_out, nb, BT, y + b0 * n_out, same_row);
    });
    ow.remember(net, weight_t, block_edge_t);
    return;
  }
  // Chunk c may start once every chunk of the earlier levels is done (chunks are in level order).
  std::vector<int64_t> first_of_level(C, 0);
  for (int64_t c = 0, level = 0, first = 0; c < C; ++c) {
    const int64_t r0 = net.block_chunk_row[c];
    if (r0 < net.block_chunk_row[c + 1] && r0 >= net.level_ptr[level + 1]) {
      while (r0 >= net.level_ptr[level + 1]) ++level;
      first = c;
    }
    first_of_level[c] = first;
  }
  // Fewer tiles than threads (B = 64 is one tile): the tiles one after another, each one job of
  // [weight slices (first tile, after a miss)] [input transpose slices] [level chunks] over all threads.
  T* vals = scratch<T>(2, checked_mul(net.n_neurons + BLOCK_PAD_ROWS, BT));
  constexpr int64_t TRANSPOSE_FEATURES = 1024;
  const int64_t n_tr = (n_in + TRANSPOSE_FEATURES - 1) / TRANSPOSE_FEATURES;
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t b0 = t * BT, nb = std::min(BT, B - b0), fill = t == 0 ? n_pw : 0, pre = fill + n_tr;
    if (poison_enabled()) poison(vals, (net.n_neurons + BLOCK_PAD_ROWS) * BT);
    std::vector<int64_t> wait_for(pre + C, 0);
    for (int64_t c = 0; c < C; ++c) wait_for[pre + c] = pre + first_of_level[c];
    run_chunked(pre + C, wait_for.data(), [&](int64_t c) {
      if (c < fill) {
        ow.fill_slice(net, w, c);
      } else if (c < pre) {
        const int64_t i0 = (c - fill) * TRANSPOSE_FEATURES;
        transpose_in<T>(x + b0 * n_in, n_in, nb, BT, vals, same_row, i0, std::min(n_in, i0 + TRANSPOSE_FEATURES));
      } else {
        fn(net, c - pre, pw, b, vals);
      }
    });
    gather_out<T>(vals, net.outputs, n_out, nb, BT, y + b0 * n_out, same_row);
  }
  ow.remember(net, weight_t, block_edge_t);
}

// ------------------------------------------------------------------------------------------ level
// Batch-1 dot product sum_e w[e] * vals[idx[e]]: AVX-512 gathers, 16 edges per step, two accumulators.
// Prefetch distance in edges (2 KiB of each stream): cold weights (MLP 95 %, 1.9 M edges, caches flushed
// with 512 MiB) 2.13 -> 1.65 ms per call at 1 thread, warm 0.72 -> 0.61 ms; 128..2048 all within 7 %.
constexpr int64_t DOT_PREFETCH = 512;
__attribute__((target("avx512f"))) float dot_gather_avx512(const float* w, const int32_t* idx, const float* vals,
                                                           int64_t n, uint32_t bound, uint32_t& bad) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  const __m512i lim = _mm512_set1_epi32(int32_t(bound));
  __mmask16 ok0 = 0xFFFF, ok1 = 0xFFFF;  // lanes whose index was in range
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    // Both streams come from DRAM when the weights are cold (batch 1 is bandwidth-bound): fetch ahead,
    // across row ends too (the next rows' edges follow in memory).
    _mm_prefetch(reinterpret_cast<const char*>(w + e + DOT_PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + e + DOT_PREFETCH + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(idx + e + DOT_PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(idx + e + DOT_PREFETCH + 16), _MM_HINT_T0);
    const __m512i i0 = _mm512_loadu_si512(idx + e), i1 = _mm512_loadu_si512(idx + e + 16);
    const __mmask16 m0 = _mm512_cmplt_epu32_mask(i0, lim), m1 = _mm512_cmplt_epu32_mask(i1, lim);
    ok0 &= m0;
    ok1 &= m1;
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + e), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, i0, vals, 4), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + e + 16), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, i1, vals, 4), a1);
  }
  for (; e + 16 <= n; e += 16) {
    const __m512i i0 = _mm512_loadu_si512(idx + e);
    const __mmask16 m0 = _mm512_cmplt_epu32_mask(i0, lim);
    ok0 &= m0;
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + e), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, i0, vals, 4), a0);
  }
  bad |= uint32_t((ok0 & ok1) != 0xFFFF);
  float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; e < n; ++e) acc += w[e] * vals[guarded(idx[e], bound, bad)];
  return acc;
}

// The same with AVX2 gathers: 8 edges per step, four accumulators (the gather latency is long).
__attribute__((target("avx2,fma"))) float dot_gather_avx2(const float* w, const int32_t* idx, const float* vals,
                                                         int64_t n, uint32_t bound, uint32_t& bad) {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256i lim = _mm256_set1_epi32(int32_t(std::min<uint32_t>(bound, INT32_MAX))), minus1 = _mm256_set1_epi32(-1);
  __m256i ok = _mm256_set1_epi32(-1);  // lanes whose indices were all in range
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + e + DOT_PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + e + DOT_PREFETCH + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(idx + e + DOT_PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(idx + e + DOT_PREFETCH + 16), _MM_HINT_T0);
    for (int q = 0; q < 4; ++q) {
      const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + e + 8 * q));
      const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(lim, i), _mm256_cmpgt_epi32(i, minus1));
      ok = _mm256_and_si256(ok, in);
      const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), vals, i, _mm256_castsi256_ps(in), 4);
      a[q] = _mm256_fmadd_ps(_mm256_loadu_ps(w + e + 8 * q), g, a[q]);
    }
  }
  bad |= uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(ok)) != 0xFF);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float acc = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
  for (; e < n; ++e) acc += w[e] * vals[guarded(idx[e], bound, bad)];
  return acc;
}

template <typename T>
inline T dot_gather(const T* w, const int32_t* idx, const T* vals, int64_t n, uint32_t bound, uint32_t& bad) {
  if constexpr (std::is_same<T, float>::value) {
    if (detect_isa() == ISA_AVX512) return dot_gather_avx512(w, idx, vals, n, bound, bad);
    if (detect_isa() == ISA_AVX2) return dot_gather_avx2(w, idx, vals, n, bound, bad);
  }
  // Eight independent partial sums: one chain would be bound by the add latency, not the loads.
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int q = 0; q < 8; ++q) part[q] += w[e + q] * vals[guarded(idx[e + q], bound, bad)];
  for (; e < n; ++e) part[0] += w[e] * vals[guarded(idx[e], bound, bad)];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// 2 <= B <= 16 (float): one masked 16-lane vector per edge (the source's B values are contiguous in the
// feature-major layout), four accumulators so the FMA latency is hidden. Writes acc[0..B) = bias + sum.
__attribute__((target("avx512f"))) void small_batch_row_avx512(const float* w, const int32_t* idx, const float* vals,
                                                               int64_t n, int64_t B, float bias, float* acc,
                                                               uint32_t bound, uint32_t& bad) {
  const __mmask16 m = __mmask16((1u << B) - 1u);
  __m512 a0 = _mm512_set1_ps(bias), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 4 <= n; e += 4) {
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[e]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e], bound, bad) * B), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(w[e + 1]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e + 1], bound, bad) * B), a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(w[e + 2]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e + 2], bound, bad) * B), a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(w[e + 3]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e + 3], bound, bad) * B), a3);
  }
  for (; e < n; ++e)
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[e]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e], bound, bad) * B), a0);
  _mm512_mask_storeu_ps(acc, m, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// 16 < B <= 16*NV (float): NV masked vectors per edge (NV independent FMA chains), two edges per step.
template <int NV>
__attribute__((target("avx512f"))) void wide_batch_row_avx512(const float* w, const int32_t* idx, const float* vals,
                                                              int64_t n, int64_t B, float bias, float* acc,
                                                              uint32_t bound, uint32_t& bad) {
  __mmask16 m[NV];
  for (int k = 0; k < NV; ++k) {
    const int64_t left = std::min<int64_t>(16, std::max<int64_t>(0, B - 16 * k));
    m[k] = __mmask16((1u << left) - 1u);
  }
  __m512 a[NV], c[NV];
  for (int k = 0; k < NV; ++k) a[k] = _mm512_set1_ps(bias), c[k] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 2 <= n; e += 2) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const float* s1 = vals + guarded(idx[e + 1], bound, bad) * B;
    const __m512 w0 = _mm512_set1_ps(w[e]), w1 = _mm512_set1_ps(w[e + 1]);
    for (int k = 0; k < NV; ++k) {
      a[k] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[k], s0 + 16 * k), a[k]);
      c[k] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m[k], s1 + 16 * k), c[k]);
    }
  }
  for (; e < n; ++e) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const __m512 w0 = _mm512_set1_ps(w[e]);
    for (int k = 0; k < NV; ++k) a[k] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[k], s0 + 16 * k), a[k]);
  }
  for (int k = 0; k < NV; ++k) _mm512_mask_storeu_ps(acc + 16 * k, m[k], _mm512_add_ps(a[k], c[k]));
}

// acc[0..nc) = bias + sum_e w[e] * vals[src(e) * B + c0 + c]: the batch columns vectorised by the compiler,
// one variant per ISA (columns_avx2 / columns_generic).
template <typename T>
__attribute__((always_inline)) inline void level_columns_body(const Net& net, int64_t e0, int64_t e1, int64_t B,
                                                             int64_t c0, int64_t nc, const T* __restrict w, T bias,
                                                             const T* __restrict vals, T* __restrict acc,
                                                             uint32_t& bad) {
  const uint32_t bound = uint32_t(net.n_neurons);
  for (int64_t c = 0; c < nc; ++c) acc[c] = bias;
  for (int64_t e = e0; e < e1; ++e) {
    const T wv = w[e];
    const T* src = vals + guarded(net.in_src[e], bound, bad) * B + c0;
    for (int64_t c = 0; c < nc; ++c) acc[c] += wv * src[c];
  }
}
template <typename T>
__attribute__((target("avx2,fma"))) void level_columns_avx2(const Net& net, int64_t e0, int64_t e1, int64_t B, int64_t c0,
                                                            int64_t nc, const T* w, T bias, const T* vals, T* acc,
                                                            uint32_t& bad) {
  level_columns_body<T>(net, e0, e1, B, c0, nc, w, bias, vals, acc, bad);
}
template <typename T>
void level_columns_generic(const Net& net, int64_t e0, int64_t e1, int64_t B, int64_t c0, int64_t nc, const T* w,
                           T bias, const T* vals, T* acc, uint32_t& bad) {
  level_columns_body<T>(net, e0, e1, B, c0, nc, w, bias, vals, acc, bad);
}

// 2 <= B <= 8 * NV (float, AVX2): NV masked 8-lane vectors per edge, two edges per step in separate
// accumulators (the compiler's loop over a run-time column count is slower than the generic build here).
template <int NV>
__attribute__((target("avx2,fma"))) void small_batch_row_avx2(const float* w, const int32_t* idx, const float* vals,
                                                             int64_t n, int64_t B, float bias, float* acc,
                                                             uint32_t bound, uint32_t& bad) {
  __m256i m[NV];
  for (int k = 0; k < NV; ++k) {
    const int left = int(std::min<int64_t>(8, std::max<int64_t>(0, B - 8 * k)));
    m[k] = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  __m256 a[NV], c[NV];
  for (int k = 0; k < NV; ++k) a[k] = _mm256_set1_ps(bias), c[k] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 2 <= n; e += 2) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const float* s1 = vals + guarded(idx[e + 1], bound, bad) * B;
    const __m256 w0 = _mm256_set1_ps(w[e]), w1 = _mm256_set1_ps(w[e + 1]);
    for (int k = 0; k < NV; ++k) {
      a[k] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(s0 + 8 * k, m[k]), a[k]);
      c[k] = _mm256_fmadd_ps(w1, _mm256_maskload_ps(s1 + 8 * k, m[k]), c[k]);
    }
  }
  for (; e < n; ++e) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const __m256 w0 = _mm256_set1_ps(w[e]);
    for (int k = 0; k < NV; ++k) a[k] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(s0 + 8 * k, m[k]), a[k]);
  }
  for (int k = 0; k < NV; ++k) _mm256_maskstore_ps(acc + 8 * k, m[k], _mm256_add_ps(a[k], c[k]));
}

// vals: [n_neurons, B] feature-major. Optionally keeps the pre-activations in `pre` (same layout).
template <typename T>
inline void level_neuron_row(const Net& net, int64_t v, int64_t B, const T* w, const T* b, T* vals, T* pre) {
  constexpr int64_t CB = 64;
  const int64_t e0 = net.in_ptr[v], e1 = net.in_ptr[v + 1];
  const int8_t ac = net.act_code[v];
  const T lo = T(net.act_param[2 * v]), hi = T(net.act_param[2 * v + 1]);
  T* out = vals + v * B;
  const uint32_t bound = uint32_t(net.n_neurons);
  uint32_t bad = 0;
  struct Report {  // on every return: a guarded index out of range raises after the call
    const Net& net;
    const uint32_t& bad;
    ~Report() {
      if (bad) net.flag_corrupt();
    }
  } report{net, bad};
  if (B == 1) {
    const T acc = b[v] + dot_gather<T>(w + e0, net.in_src + e0, vals, e1 - e0, bound, bad);
    if (pre) pre[v] = acc;
    out[0] = act_scalar<T>(ac, acc, lo, hi);
    return;
  }
  if constexpr (std::is_same<T, float>::value) {
    if (B <= 16 && detect_isa() == ISA_AVX512) {
      float acc[16];
      small_batch_row_avx512(w + e0, net.in_src + e0, vals, e1 - e0, B, b[v], acc, bound, bad);
      if (pre) std::memcpy(pre + v * B, acc, B * sizeof(T));
      act_inplace<T>(ac, acc, B, lo, hi);
      std::memcpy(out, acc, B * sizeof(T));
      return;
    }
    if (B <= 64 && detect_isa() == ISA_AVX512) {
      float acc[64];
      if (B <= 32) wide_batch_row_avx512<2>(w + e0, net.in_src + e0, vals, e1 - e0, B, b[v], acc, bound, bad);
      else wide_batch_row_avx512<4>(w + e0, net.in_src + e0, vals, e1 - e0, B, b[v], acc, bound, bad);
      if (pre) std::memcpy(pre + v * B, acc, B * sizeof(T));
      act_inplace<T>(ac, acc, B, lo, hi);
      std::memcpy(out, acc, B * sizeof(T));
      return;
    }
    if (B <= 16 && detect_isa() == ISA_AVX2) {
      float acc[16];
      if (B <= 8) small_batch_row_avx2<1>(w + e0, net.in_src + e0, vals, e1 - e0, B, b[v], acc, bound, bad);
      else small_batch_row_avx2<2>(w + e0, net.in_src + e0, vals, e1 - e0, B, b[v], acc, bound, bad);
      if (pre) std::memcpy(pre + v * B, acc, B * sizeof(T));
      act_inplace<T>(ac, acc, B, lo, hi);
      std::memcpy(out, acc, B * sizeof(T));
      return;
    }
  }
  auto columns = detect_isa() >= ISA_AVX2 ? &level_columns_avx2<T> : &level_columns_generic<T>;
  for (int64_t c0 = 0; c0 < B; c0 += CB) {
    const int64_t nc = std::min(CB, B - c0);
    T acc[CB];
    columns(net, e0, e1, B, c0, nc, w, b[v], vals, acc, bad);
    if (pre) std::memcpy(pre + v * B + c0, acc, nc * sizeof(T));
    act_inplace<T>(ac, acc, nc, lo, hi);
    std::memcpy(out + c0, acc, nc * sizeof(T));
  }
}

// Work (multiply-adds) per chunk of the level path, and the least work per forward worth waking helpers
// for (below it one thread is faster than any hand-off). Tunable: IOSPARSE_LEVEL_CHUNK / IOSPARSE_LEVEL_SERIAL.
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long r = std::strtoll(v, &end, 10);
  return (end && *end == 0 && r >= 0) ? int64_t(r) : fallback;
}
int64_t level_chunk_work() {
  static const int64_t v = std::max<int64_t>(1, env_int("IOSPARSE_LEVEL_CHUNK", 32768));
  return v;
}
int64_t level_serial_work() {
  static const int64_t v = env_int("IOSPARSE_LEVEL_SERIAL", 65536);
  return v;
}

// parallel=false: one thread (used inside the backward pass, which is parallel over batch chunks).
template <typename T>
void level_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* vals, T* pre,
                   bool parallel = true) {
  const int64_t n_in = net.n_inputs;
  for (int64_t c = 0; c < B; ++c)
    for (int64_t i = 0; i < n_in; ++i) vals[i * B + c] = x[c * n_in + i];
  const int64_t threads = parallel && !at::in_parallel_region() ? at::get_num_threads() : 1;
  if (threads <= 1 || net.n_edges * B < level_serial_work()) {
    for (int64_t p = 0; p < net.n_computed; ++p) level_neuron_row<T>(net, net.level_neuron[p], B, w, b, vals, pre);
    return;
  }
  // Chunks of about level_chunk_work() multiply-adds (by in-degree), never spanning two levels;
  // wait_for[c] = first chunk of c's level (all earlier chunks must be done before c starts).
  const int64_t target = level_chunk_work();
  std::vector<int64_t> chunk_pos{0}, wait_for;
  for (int64_t l = 0; l < net.n_levels; ++l) {
    const int64_t p0 = net.level_ptr[l], p1 = net.level_ptr[l + 1];
    if (p1 == p0) continue;
    const int64_t first = int64_t(wait_for.size());
    int64_t work = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t v = net.level_neuron[p];
      work += (net.in_ptr[v + 1] - net.in_ptr[v] + 1) * B;
      if (work >= target || p + 1 == p1) {
        chunk_pos.push_back(p + 1);
        wait_for.push_back(first);
        work = 0;
      }
    }
  }
  run_chunked(int64_t(wait_for.size()), wait_for.data(), [&](int64_t c) {
    for (int64_t p = chunk_pos[c]; p < chunk_pos[c + 1]; ++p)
      level_neuron_row<T>(net, net.level_neuron[p], B, w, b, vals, pre);
  });
}

// ------------------------------------------------------------------------------------------ dense
at::Tensor dense_forward(const Net& net, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         at::TensorList net_t) {
  const at::Tensor& dense_index = net_t[NET_DENSE_INDEX];
  const at::Tensor& dense_edge = net_t[NET_DENSE_EDGE];
  const int64_t* dptr = net_t[NET_DENSE_EDGE_PTR].data_ptr<int64_t>();
  const at::Tensor level_neuron = net_t[NET_LEVEL_NEURON];
  at::Tensor h = x;
  int64_t cols = net.n_inputs;
  for (int64_t l = 0; l < net.n_levels; ++l) {
    const int64_t p0 = net.level_ptr[l], p1 = net.level_ptr[l + 1], rows = p1 - p0;
    at::Tensor W = at::zeros({rows * cols}, x.options());
    at::Tensor idx = dense_index.slice(0, dptr[l], dptr[l + 1]);
    at::Tensor wl = weight.index_select(0, dense_edge.slice(0, dptr[l], dptr[l + 1]));
    W.index_put_({idx}, wl);
    at::Tensor neurons = level_neuron.slice(0, p0, p1);
    at::Tensor bl = bias.index_select(0, neurons);
    h = at::addmm(bl, h, W.view({rows, cols}).t());
    // Activation: one loop per neuron kind; uniform layers take the contiguous fast path.
    const int64_t* nv = neurons.data_ptr<int64_t>();
    bool uniform = true;
    for (int64_t r = 1; r < rows && uniform; ++r)
      uniform = net.act_code[nv[r]] == net.act_code[nv[0]] &&
                net.act_param[2 * nv[r]] == net.act_param[2 * nv[0]] &&
                net.act_param[2 * nv[r] + 1] == net.act_param[2 * nv[0] + 1];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_dense_act", [&] {
      scalar_t* hp = h.data_ptr<scalar_t>();
      const int64_t Bn = h.size(0);
      if (uniform) {
        const int64_t v0 = nv[0];
        const int64_t total = Bn * rows;
        at::parallel_for(0, total, 1 << 14, [&](int64_t s, int64_t e) {
          act_inplace<scalar_t>(net.act_code[v0], hp + s, e - s, scalar_t(net.act_param[2 * v0]),
                                scalar_t(net.act_param[2 * v0 + 1]));
        });
      } else {
        for (int64_t bi = 0; bi < Bn; ++bi)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t v = nv[r];
            hp[bi * rows + r] = act_scalar<scalar_t>(net.act_code[v], hp[bi * rows + r],
                                                     scalar_t(net.act_param[2 * v]), scalar_t(net.act_param[2 * v + 1]));
          }
      }
    });
    cols = rows;
  }
  return h.index_select(1, net_t[NET_DENSE_OUT_POS]);
}

int64_t choose_strategy(const Net& net, int64_t B) {
  if (net.strategy != STRAT_AUTO) {
    TORCH_CHECK_VALUE(net.strategy >= STRAT_PROGRAM && net.strategy <= STRAT_BLOCK, "iosparse: unknown strategy ",
                      net.strategy);
    TORCH_CHECK_VALUE(net.strategy != STRAT_DENSE || net.layered,
                      "iosparse: the dense strategy needs a layered network (edges only between consecutive levels)");
    return net.strategy;
  }
  if (net.layered && B >= net.dense_min_batch) return STRAT_DENSE;
  if (B <= net.level_max_batch) return STRAT_LEVEL;
  if (net.n_panels > 0 && B >= net.panel_min_batch) return STRAT_PANEL;
  if (net.n_block_chunks > 0 && B >= net.block_min_batch) return STRAT_BLOCK;
  return STRAT_PROGRAM;
}

// A fresh multi-MiB output is page-faulted in 4 KiB pages on its first write (radix N=65536 B=256: 64 MiB,
// ~25 ms of a ~150 ms call, the allocator returns freshly mapped memory every call). Asking for
// transparent huge pages on its 2 MiB-aligned interior (madvise needs a page-aligned start; the
// allocator's pointer is only 64-byte aligned) cuts that first touch to ~10 ms where THP is in "madvise"
// mode. A hint only: failures are ignored.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE = uintptr_t(1) << 21;
  if (bytes < 2 * HUGE) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(HUGE - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// The level path for a whole batch into y [B, n_outputs]: every multiply-add is an edge of the network.
template <typename T>
void level_forward_out(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y) {
  auto vals = aligned_buffer<T>(checked_mul(net.n_neurons, B));
  if (poison_enabled()) poison(vals.get(), net.n_neurons * B);
  level_forward<T>(net, x, B, w, b, vals.get(), nullptr);
  for (int64_t c = 0; c < B; ++c)
    for (int64_t j = 0; j < net.n_outputs; ++j) y[c * net.n_outputs + j] = vals.get()[net.outputs[j] * B + c];
}

// The panel and dense paths also multiply zero-weight cells (a source that does not feed a row), which is
// exact for finite values but turns an Inf or NaN source into a NaN where the network has no edge
// (0 * inf = NaN). Such a NaN reaches every output downstream (NaN passes every activation and sum), so the
// batch rows whose outputs hold a NaN are recomputed by the level path, which multiplies edges only.
at::Tensor exact_where_nan(const Net& net, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           at::Tensor y) {
  const at::Tensor rows = y.isnan().any(1).nonzero().flatten();
  if (rows.numel() == 0) return y;
  const at::Tensor xs = x.index_select(0, rows).contiguous();
  at::Tensor ys = at::empty({rows.numel(), net.n_outputs}, y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_exact_where_nan", [&] {
    level_forward_out<scalar_t>(net, xs.data_ptr<scalar_t>(), rows.numel(), weight.data_ptr<scalar_t>(),
                                bias.data_ptr<scalar_t>(), ys.data_ptr<scalar_t>());
  });
  return y.index_copy_(0, rows, ys);
}

at::Tensor dag_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                           at::TensorList net_t, at::IntArrayRef config) {
  std::atomic<bool> corrupt{false};
  Net net = unpack(x_in, weight_in, bias_in, net_t, config, corrupt);
  const int64_t B = x_in.size(0);
  at::Tensor y = at::empty({B, net.n_outputs}, x_in.options());
  if (B == 0) return y;
  at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t strategy = choose_strategy(net, B);
  if (strategy == STRAT_DENSE) {
    y = exact_where_nan(net, x, weight, bias, dense_forward(net, x, weight, bias, net_t).contiguous());
    check_not_corrupt(corrupt);
    return y;
  }
  advise_huge_pages(y.data_ptr(), size_t(y.nbytes()));
  if (poison_enabled()) AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "poison", [&] { poison(y.data_ptr<scalar_t>(), y.numel()); });
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_dag_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (strategy == STRAT_PROGRAM) {
      program_forward<scalar_t>(net, xp, B, wp, bp, yp);
    } else if (strategy == STRAT_PANEL) {
      panel_forward<scalar_t>(net, xp, B, wp, bp, yp, weight, net_t[NET_PANEL_EDGE]);
    } else if (strategy == STRAT_BLOCK) {
      block_forward<scalar_t>(net, xp, B, wp, bp, yp, weight, net_t[NET_BLOCK_EDGE]);
    } else {
      level_forward_out<scalar_t>(net, xp, B, wp, bp, yp);
    }
  });
  check_not_corrupt(corrupt);
  if (strategy == STRAT_PANEL) y = exact_where_nan(net, x, weight, bias, y);
  check_not_corrupt(corrupt);
  return y;
}

// ------------------------------------------------------------------------------------------ backward
// Per batch chunk (parallel): recompute pre-activations level by level, then walk the neurons in
// reverse level order: dz = g_v * act'(z_v); grad_bias[v] += sum dz; grad_w[e] += <dz, a_u>;
// g_u += w_e dz. Chunks accumulate grad_w / grad_bias privately and are summed at the end.
template <typename T>
void backward_chunk(const Net& net, const T* x, const T* gy, int64_t B, const T* w, const T* b, T* gx, T* gw,
                    T* gb) {
  const int64_t n = net.n_neurons, n_in = net.n_inputs;
  auto vals = aligned_buffer<T>(checked_mul(n, B));
  auto pre = aligned_buffer<T>(checked_mul(n, B));
  auto g = aligned_buffer<T>(checked_mul(n, B));
  T* A = vals.get();
  T* Z = pre.get();
  T* G = g.get();
  level_forward<T>(net, x, B, w, b, A, Z, /*parallel=*/false);
  std::fill(G, G + n * B, T(0));
  for (int64_t c = 0; c < B; ++c)
    for (int64_t j = 0; j < net.n_outputs; ++j) G[net.outputs[j] * B + c] += gy[c * net.n_outputs + j];
  std::vector<T> dz(B);
  for (int64_t p = net.n_computed - 1; p >= 0; --p) {
    const int64_t v = net.level_neuron[p];
    const int8_t ac = net.act_code[v];
    const T lo = T(net.act_param[2 * v]), hi = T(net.act_param[2 * v + 1]);
    T sum = 0;
    for (int64_t c = 0; c < B; ++c) {
      dz[c] = G[v * B + c] * act_grad_scalar<T>(ac, Z[v * B + c], lo, hi);
      sum += dz[c];
    }
    gb[v] += sum;
    uint32_t bad = 0;
    for (int64_t e = net.in_ptr[v]; e < net.in_ptr[v + 1]; ++e) {
      const int64_t u = guarded(net.in_src[e], uint32_t(n), bad);
      const T we = w[e];
      T* gu = G + u * B;
      const T* au = A + u * B;
      T dot = 0;
      for (int64_t c = 0; c < B; ++c) {
        dot += dz[c] * au[c];
        gu[c] += we * dz[c];
      }
      gw[e] += dot;
    }
    if (bad) net.flag_corrupt();
  }
  for (int64_t c = 0; c < B; ++c)
    for (int64_t i = 0; i < n_in; ++i) gx[c * n_in + i] = G[i * B + c];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dag_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                                const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                                at::TensorList net_t, at::IntArrayRef config) {
  std::atomic<bool> corrupt{false};
  Net net = unpack(x_in, weight_in, bias_in, net_t, config, corrupt);
  const int64_t B = x_in.size(0);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 2 && grad_y_in.size(0) == B && grad_y_in.size(1) == net.n_outputs,
                    "iosparse: grad_output must have shape [", B, ", ", net.n_outputs, "], got ", grad_y_in.sizes());
  TORCH_CHECK_TYPE(grad_y_in.scalar_type() == x_in.scalar_type(), "iosparse: grad_output dtype ",
                   grad_y_in.scalar_type(), " differs from the input's ", x_in.scalar_type());
  at::Tensor x = x_in.contiguous(), gy = grad_y_in.contiguous();
  at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::zeros_like(weight);
  at::Tensor gb = at::zeros_like(bias);
  if (B == 0) return {gx, gw, gb};
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, B / 8));
  const int64_t per = (B + chunks - 1) / chunks;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_dag_backward", [&] {
    std::vector<at::Tensor> gw_part(chunks), gb_part(chunks);
    for (int64_t k = 0; k < chunks; ++k) {
      gw_part[k] = k == 0 ? gw : at::zeros_like(weight);
      gb_part[k] = k == 0 ? gb : at::zeros_like(bias);
    }
    at::parallel_for(0, chunks, 1, [&](int64_t s, int64_t e) {
      for (int64_t k = s; k < e; ++k) {
        const int64_t c0 = k * per, nb = std::max<int64_t>(0, std::min(per, B - c0));
        if (nb == 0) continue;
        backward_chunk<scalar_t>(net, x.data_ptr<scalar_t>() + c0 * net.n_inputs,
                                 gy.data_ptr<scalar_t>() + c0 * net.n_outputs, nb, weight.data_ptr<scalar_t>(),
                                 bias.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>() + c0 * net.n_inputs,
                                 gw_part[k].data_ptr<scalar_t>(), gb_part[k].data_ptr<scalar_t>());
      }
    });
    for (int64_t k = 1; k < chunks; ++k) {
      gw.add_(gw_part[k]);
      gb.add_(gb_part[k]);
    }
  });
  check_not_corrupt(corrupt);
  // Inputs are not neurons with a bias: their bias gradient is zero by definition.
  gb.slice(0, 0, net.n_inputs).zero_();
  return {gx, gw, gb};
}

// ------------------------------------------------------------------------------------------ builders
// The structure buffers a native builder reads, checked once (pointers consistent, every index in range,
// each computed neuron on exactly one level); `who` names the builder in the errors.
struct CheckedStructure {
  const int64_t* in_ptr;
  const int32_t* in_src;
  const int64_t* level_ptr;
  const int64_t* level_neuron;
  int64_t m, L, nc;
  std::vector<int64_t> level_of;  // level of each neuron (-1: input)
};
CheckedStructure checked_structure(const at::Tensor& in_ptr_t, const at::Tensor& in_src_t,
                                   const at::Tensor& level_ptr_t, const at::Tensor& level_neuron_t,
                                   int64_t n_neurons, const char* who) {
  check_buffer(in_ptr_t, "in_ptr", at::kLong, n_neurons + 1);
  check_buffer(in_src_t, "in_src", at::kInt, -1);
  check_buffer(level_ptr_t, "level_ptr", at::kLong, -1);
  check_buffer(level_neuron_t, "level_neuron", at::kLong, -1);
  CheckedStructure s{in_ptr_t.data_ptr<int64_t>(), in_src_t.data_ptr<int32_t>(), level_ptr_t.data_ptr<int64_t>(),
                     level_neuron_t.data_ptr<int64_t>(), in_src_t.numel(), level_ptr_t.numel() - 1,
                     level_neuron_t.numel(), std::vector<int64_t>(size_t(n_neurons), -1)};
  TORCH_CHECK_VALUE(s.in_ptr[0] == 0 && s.in_ptr[n_neurons] == s.m && s.L >= 0 && s.level_ptr[0] == 0 &&
                    s.level_ptr[s.L] == s.nc, "iosparse: ", who, ": inconsistent structure buffers");
  TORCH_CHECK(s.m < (int64_t(1) << 31), "iosparse: ", who, ": too many edges");
  for (int64_t v = 0; v < n_neurons; ++v)
    TORCH_CHECK_VALUE(s.in_ptr[v + 1] >= s.in_ptr[v], "iosparse: ", who, ": in_ptr not ascending");
  for (int64_t e = 0; e < s.m; ++e)
    TORCH_CHECK_VALUE(s.in_src[e] >= 0 && s.in_src[e] < n_neurons, "iosparse: ", who, ": in_src out of range");
  for (int64_t l = 0; l < s.L; ++l) {
    TORCH_CHECK_VALUE(s.level_ptr[l + 1] >= s.level_ptr[l], "iosparse: ", who, ": level_ptr not ascending");
    for (int64_t p = s.level_ptr[l]; p < s.level_ptr[l + 1]; ++p) {
      const int64_t v = s.level_neuron[p];
      TORCH_CHECK_VALUE(v >= 0 && v < n_neurons && s.level_of[v] < 0, "iosparse: ", who, ": bad level_neuron");
      s.level_of[v] = l;
    }
  }
  return s;
}

// Panels: groups each level's neurons into panels of up to max_rows rows that share sources (see panel_run).
// Greedy, per level: a panel starts at a seed neuron and grows by the unvisited neuron of the same level
// sharing the most sources with the last row added, while useful multiply-adds / (rows x union of
// sources) stays >= min_efficiency; the neuron that did not fit seeds the next panel, so consecutive
// panels slide along chains of overlapping source sets. Neighbours are found through the sources' out-
// edges, at most scan_limit sources per row and scan_limit out-edges per source (bounded work on
// dense-ish levels). Returns (panel_ptr, panel_src, panel_row_ptr, panel_target, panel_edge_ptr,
// panel_edge) as described at NetIndex.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_panels_cpu(
    const at::Tensor& in_ptr_t, const at::Tensor& in_src_t, const at::Tensor& level_ptr_t,
    const at::Tensor& level_neuron_t, int64_t n_neurons, int64_t max_rows, double min_efficiency,
    int64_t scan_limit) {
  TORCH_CHECK_VALUE(max_rows >= 1 && max_rows <= MAX_PANEL_ROWS, "iosparse: max_rows must be in 1..",
                    int(MAX_PANEL_ROWS), ", got ", max_rows);
  TORCH_CHECK_VALUE(scan_limit >= 1, "iosparse: scan_limit must be >= 1");
  const CheckedStructure st =
      checked_structure(in_ptr_t, in_src_t, level_ptr_t, level_neuron_t, n_neurons, "build_panels");
  const int64_t* in_ptr = st.in_ptr;
  const int32_t* in_src = st.in_src;
  const int64_t* level_ptr = st.level_ptr;
  const int64_t* level_neuron = st.level_neuron;
  const int64_t m = st.m, L = st.L;
  const std::vector<int64_t>& level_of = st.level_of;
  // Out-edges (target of each edge, grouped by source).
  std::vector<int64_t> out_ptr(n_neurons + 1, 0);
  for (int64_t e = 0; e < m; ++e) ++out_ptr[in_src[e] + 1];
  for (int64_t u = 0; u < n_neurons; ++u) out_ptr[u + 1] += out_ptr[u];
  std::vector<int64_t> out_dst(m), fill(out_ptr.begin(), out_ptr.end() - 1);
  for (int64_t v = 0; v < n_neurons; ++v)
    for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) out_dst[fill[in_src[e]]++] = v;

  std::vector<uint8_t> visited(n_neurons, 0);
  std::vector<int32_t> count(n_neurons, 0);
  std::vector<int64_t> stamp(n_neurons, -1), local(n_neurons, 0), touched;
  std::vector<int64_t> panel_ptr{0}, row_ptr{0}, edge_ptr{0}, targets;
  std::vector<int32_t> psrc, pedge;
  int64_t panel_id = 0;
  auto best_neighbour = [&](int64_t last, int64_t level) -> int64_t {
    touched.clear();
    const int64_t e_end = std::min(in_ptr[last + 1], in_ptr[last] + scan_limit);
    for (int64_t e = in_ptr[last]; e < e_end; ++e) {
      const int64_t u = in_src[e];
      const int64_t o_end = std::min(out_ptr[u + 1], out_ptr[u] + scan_limit);
      for (int64_t o = out_ptr[u]; o < o_end; ++o) {
        const int64_t t = out_dst[o];
        if (visited[t] || level_of[t] != level) continue;
        if (count[t]++ == 0) touched.push_back(t);
      }
    }
    int64_t best = -1;
    int32_t best_count = 0;
    for (int64_t t : touched) {
      if (count[t] > best_count || (count[t] == best_count && t < best)) best = t, best_count = count[t];
      count[t] = 0;
    }
    return best;
  };
  for (int64_t l = 0; l < L; ++l) {
    int64_t cursor = level_ptr[l], seed = -1;
    for (;;) {
      if (seed < 0) {
        while (cursor < level_ptr[l + 1] && visited[level_neuron[cursor]]) ++cursor;
        if (cursor == level_ptr[l + 1]) break;
        seed = level_neuron[cursor];
      }
      // Grow one panel from the seed.
      std::vector<int64_t> rows{seed};
      visited[seed] = 1;
      const int64_t u_begin = int64_t(psrc.size());
      auto add_sources = [&](int64_t v) {
        for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) {
          const int64_t u = in_src[e];
          if (stamp[u] != panel_id) {
            stamp[u] = panel_id;
            local[u] = int64_t(psrc.size()) - u_begin;
            psrc.push_back(int32_t(u));
          }
        }
      };
      add_sources(seed);
      int64_t useful = in_ptr[seed + 1] - in_ptr[seed], next = -1;
      for (;;) {
        const int64_t cand = best_neighbour(rows.back(), l);
        if (cand < 0) break;
        if (int64_t(rows.size()) == max_rows) { next = cand; break; }
        int64_t fresh = 0;
        for (int64_t e = in_ptr[cand]; e < in_ptr[cand + 1]; ++e) fresh += stamp[in_src[e]] != panel_id;
        const int64_t U = int64_t(psrc.size()) - u_begin + fresh;
        const int64_t use = useful + in_ptr[cand + 1] - in_ptr[cand];
        if (double(use) < min_efficiency * double(U) * double(rows.size() + 1)) { next = cand; break; }
        rows.push_back(cand);
        visited[cand] = 1;
        useful = use;
        add_sources(cand);
      }
      // Edge block [U][R]; a repeated (source, row) pair (multi-edge) gets an extra column of its own.
      const int64_t R = int64_t(rows.size());
      std::vector<int32_t> block(size_t(psrc.size() - u_begin) * R, -1);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t e = in_ptr[rows[r]]; e < in_ptr[rows[r] + 1]; ++e) {
          size_t cell = size_t(local[in_src[e]]) * R + r;
          if (block[cell] != -1) {
            psrc.push_back(in_src[e]);
            block.resize(block.size() + R, -1);
            cell = block.size() - R + r;
          }
          block[cell] = int32_t(e);
        }
      pedge.insert(pedge.end(), block.begin(), block.end());
      targets.insert(targets.end(), rows.begin(), rows.end());
      panel_ptr.push_back(int64_t(psrc.size()));
      row_ptr.push_back(int64_t(targets.size()));
      edge_ptr.push_back(int64_t(pedge.size()));
      ++panel_id;
      seed = next;
    }
  }
  TORCH_CHECK(int64_t(pedge.size()) < (int64_t(1) << 31), "iosparse: build_panels: too many panel cells");
  auto i64 = [](const std::vector<int64_t>& v) {
    return at::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, at::kLong).clone();
  };
  auto i32 = [](const std::vector<int32_t>& v) {
    return at::from_blob(const_cast<int32_t*>(v.data()), {int64_t(v.size())}, at::kInt).clone();
  };
  return {i64(panel_ptr), i32(psrc), i64(row_ptr), i64(targets), i64(edge_ptr), i32(pedge)};
}


// Source blocks of the block path: per level, chunks of consecutive rows (level_neuron order) holding about
// chunk_edges edges (fewer on small levels, see below); inside a chunk the edges sorted by (source block, row, source), one segment per
// (row, block). Returns (chunk_seg, chunk_row, chunk_edge, seg [K*3], local, edge) as described at NetIndex.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_blocks_cpu(
    const at::Tensor& in_ptr_t, const at::Tensor& in_src_t, const at::Tensor& level_ptr_t,
    const at::Tensor& level_neuron_t, int64_t n_neurons, int64_t block_sources, int64_t chunk_edges) {
  TORCH_CHECK_VALUE(block_sources >= 1 && block_sources <= 256, "iosparse: block_sources must be in 1..256, got ",
                    block_sources);
  TORCH_CHECK_VALUE(chunk_edges >= 1, "iosparse: chunk_edges must be >= 1, got ", chunk_edges);
  const CheckedStructure st =
      checked_structure(in_ptr_t, in_src_t, level_ptr_t, level_neuron_t, n_neurons, "build_blocks");
  const int64_t* in_ptr = st.in_ptr;
  const int32_t* in_src = st.in_src;
  const int64_t* level_ptr = st.level_ptr;
  const int64_t* level_neuron = st.level_neuron;
  const int64_t m = st.m, L = st.L;
  std::vector<int64_t> chunk_seg{0}, chunk_row{0}, chunk_edge{0};
  std::vector<int32_t> seg, edge;
  std::vector<uint8_t> local;
  seg.reserve(size_t(m / 4 + 16));
  edge.reserve(size_t(m));
  local.reserve(size_t(m));
  struct Item {
    int32_t block, row, src, e;
  };
  std::vector<Item> items;
  for (int64_t l = 0; l < L; ++l) {
    // At least ~8 chunks per level (down to 2048 edges each), so small levels still feed every thread.
    int64_t level_edges = 0;
    for (int64_t p = level_ptr[l]; p < level_ptr[l + 1]; ++p)
      level_edges += in_ptr[level_neuron[p] + 1] - in_ptr[level_neuron[p]];
    const int64_t target = std::min(chunk_edges, std::max<int64_t>(2048, (level_edges + 7) / 8));
    for (int64_t p = level_ptr[l]; p < level_ptr[l + 1];) {
      int64_t q = p, work = 0;
      while (q < level_ptr[l + 1] && (q == p || work < target)) {
        const int64_t v = level_neuron[q++];
        work += in_ptr[v + 1] - in_ptr[v];
      }
      items.clear();
      for (int64_t r = p; r < q; ++r) {
        const int64_t v = level_neuron[r];
        for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e)
          items.push_back(Item{int32_t(in_src[e] / block_sources), int32_t(r), in_src[e], int32_t(e)});
      }
      std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
        return a.block != b.block ? a.block < b.block : a.row != b.row ? a.row < b.row
                                                      : a.src != b.src ? a.src < b.src : a.e < b.e;
      });
      for (size_t i = 0; i < items.size();) {
        size_t j = i;
        while (j < items.size() && items[j].block == items[i].block && items[j].row == items[i].row) ++j;
        const int64_t base = int64_t(items[i].block) * block_sources;
        seg.push_back(int32_t(level_neuron[items[i].row]));
        seg.push_back(int32_t(base));
        seg.push_back(int32_t(j - i));
        for (size_t k = i; k < j; ++k) {
          local.push_back(uint8_t(items[k].src - base));
          edge.push_back(items[k].e);
        }
        i = j;
      }
      chunk_seg.push_back(int64_t(seg.size() / 3));
      chunk_row.push_back(q);
      chunk_edge.push_back(int64_t(edge.size()));
      p = q;
    }
  }
  auto i64 = [](const std::vector<int64_t>& v) {
    return at::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, at::kLong).clone();
  };
  auto i32 = [](const std::vector<int32_t>& v) {
    return at::from_blob(const_cast<int32_t*>(v.data()), {int64_t(v.size())}, at::kInt).clone();
  };
  at::Tensor local_t = at::from_blob(local.data(), {int64_t(local.size())}, at::kByte).clone();
  return {i64(chunk_seg), i64(chunk_row), i64(chunk_edge), i32(seg), local_t, i32(edge)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iosparse, m) {
  // Device-independent helpers of the panel path's weight cache (dag_forward, "panel").
  m.def("clear_panel_weight_cache() -> ()", &clear_panel_weight_cache);
  m.def("panel_weight_cache_size() -> int", &panel_weight_cache_size);
  m.def("dag_forward(Tensor x, Tensor weight, Tensor bias, Tensor[] net, int[] config) -> Tensor");
  m.def("dag_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor[] net, int[] config) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("build_panels(Tensor in_ptr, Tensor in_src, Tensor level_ptr, Tensor level_neuron, int n_neurons, "
        "int max_rows, float min_efficiency, int scan_limit) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("build_blocks(Tensor in_ptr, Tensor in_src, Tensor level_ptr, Tensor level_neuron, int n_neurons, "
        "int block_sources, int chunk_edges) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(iosparse, CPU, m) {
  m.impl("dag_forward", &dag_forward_cpu);
  m.impl("dag_backward", &dag_backward_cpu);
  m.impl("build_panels", &build_panels_cpu);
  m.impl("build_blocks", &build_blocks_cpu);
}

}  // namespace iosparse
