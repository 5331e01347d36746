// Native builders of the panel and block buffers (iosparse::build_panels / build_blocks, called by
// torch_iosparse/compile/prepare.py at prepare time).
#include "cpu/paths.h"

namespace iosparse {

namespace {

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

}  // namespace

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

}  // namespace iosparse
