// Validation of the op's buffers (net.h): check_buffer, check_pointers (every call), validate_semantics
// (once per buffer contents, memoised per thread) and unpack, which builds the Net view of a call.
#include "cpu/net.h"

namespace iosparse {

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, int64_t max_dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "iosparse: network buffer '", name, "' must be on the CPU like the "
                    "input, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "iosparse: network buffer '", name, "' must be ", dtype, ", got ",
                    t.scalar_type(), " (was it built by torch_iosparse.ops.prepare?)");
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.dim() <= max_dim, "iosparse: network buffer '", name, "' has shape ", t.sizes(), " (was it built by "
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

[[noreturn]] void corrupt_buffers(const char* what) {
  TORCH_CHECK_VALUE(false, "iosparse: network buffers are corrupt or belong to another network (", what, ")");
  __builtin_unreachable();
}

namespace {

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

}  // namespace

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
  check_buffer(net_t[NET_ACT_PARAM], "act_param", at::kDouble, 2 * n.n_neurons, 2);
  check_buffer(net_t[NET_OUTPUTS], "outputs", at::kLong, n.n_outputs);
  check_buffer(net_t[NET_LEVEL_PTR], "level_ptr", at::kLong, -1);
  TORCH_CHECK_VALUE(net_t[NET_LEVEL_PTR].numel() >= 2, "iosparse: network buffer 'level_ptr' needs at least 2 "
                    "elements (one level)");
  check_buffer(net_t[NET_LEVEL_NEURON], "level_neuron", at::kLong, n.n_computed);
  check_buffer(net_t[NET_PROG_NEURON], "prog_neuron", at::kLong, n.n_computed);
  check_buffer(net_t[NET_PROG_OP_PTR], "prog_op_ptr", at::kLong, n.n_computed + 1);
  check_buffer(net_t[NET_PROG_OPS], "prog_ops", at::kInt, -1, 2);
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
  n.block_backward_min_batch = config[CFG_BLOCK_BACKWARD_MIN_BATCH];
  check_buffer(net_t[NET_BLOCK_CHUNK_SEG], "block_chunk_seg", at::kLong, -1);
  const int64_t n_chunk_ptr = net_t[NET_BLOCK_CHUNK_SEG].numel();
  check_buffer(net_t[NET_BLOCK_CHUNK_ROW], "block_chunk_row", at::kLong, n_chunk_ptr);
  check_buffer(net_t[NET_BLOCK_CHUNK_EDGE], "block_chunk_edge", at::kLong, n_chunk_ptr);
  check_buffer(net_t[NET_BLOCK_SEG], "block_seg", at::kInt, -1, 2);
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

}  // namespace iosparse
