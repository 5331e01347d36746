// Exact I/O simulator of the 2-optimal strategy (shared/cost-model.md): neurons in the given order, each
// neuron's in-edges in ascending source order, furthest-next-use eviction, lazy stores. The pure-Python
// twin is torch_iosparse/iomodel.py::simulate_reference; tests compare the two event by event.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <queue>
#include <tuple>
#include <utility>
#include <vector>

namespace iosparse {
namespace {

enum Op : int32_t { INIT = 0, LOAD = 1, FMA = 2, FINISH = 3, STORE = 4, DROP = 5 };

void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be 1-D and contiguous");
}

// counts = [weights, biases, loads, stores]; events = int32 [k, 4] rows (op, a, b, slot) when record.
std::tuple<at::Tensor, at::Tensor> simulate(const at::Tensor& in_ptr_t, const at::Tensor& in_src_t,
                                            const at::Tensor& order_t, const at::Tensor& is_output_t,
                                            int64_t n_inputs, int64_t memory, bool record) {
  check_index_tensor(in_ptr_t, "in_ptr");
  check_index_tensor(in_src_t, "in_src");
  check_index_tensor(order_t, "order");
  TORCH_CHECK(is_output_t.scalar_type() == at::kBool && is_output_t.is_contiguous(), "is_output must be bool");
  const int64_t n = in_ptr_t.numel() - 1;
  const int64_t m = in_src_t.numel();
  TORCH_CHECK(is_output_t.numel() == n, "is_output must have one entry per neuron");
  TORCH_CHECK(memory == -1 || memory >= 2, "memory must be >= 2 or -1 (unbounded), got ", memory);
  const int64_t* in_ptr = in_ptr_t.data_ptr<int64_t>();
  const int64_t* src = in_src_t.data_ptr<int64_t>();
  const int64_t* order = order_t.data_ptr<int64_t>();
  const bool* is_output = is_output_t.data_ptr<bool>();
  const int64_t n_order = order_t.numel();
  const int64_t M = memory == -1 ? INT64_MAX : memory;

  // uses[use_ptr[u] .. use_ptr[u+1]) = the times (edge-event indices) at which x_u is read, ascending.
  std::vector<int64_t> use_ptr(n + 1, 0);
  for (int64_t e = 0; e < m; ++e) use_ptr[src[e] + 1]++;
  for (int64_t u = 0; u < n; ++u) use_ptr[u + 1] += use_ptr[u];
  std::vector<int64_t> cursor(use_ptr.begin(), use_ptr.end() - 1);
  std::vector<int64_t> uses(m);
  {
    int64_t t = 0;
    for (int64_t i = 0; i < n_order; ++i) {
      const int64_t v = order[i];
      for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) uses[cursor[src[e]]++] = t++;
    }
    TORCH_CHECK(t == m, "order does not cover every computed neuron");
    std::copy(use_ptr.begin(), use_ptr.end() - 1, cursor.begin());
  }

  std::vector<int64_t> slot_of(n, -1);
  std::vector<uint8_t> dirty(n, 0);  // value lives only in fast memory
  using Entry = std::pair<int64_t, int64_t>;  // (next use time, neuron): max-heap = furthest first
  std::priority_queue<Entry> resident;        // lazy: stale entries are skipped when popped
  std::priority_queue<int64_t, std::vector<int64_t>, std::greater<int64_t>> free_slots;
  int64_t fresh = 0;  // slots [fresh, M) have never been used
  int64_t loads = 0, stores = 0, inits = 0, fmas = 0;
  std::vector<int32_t> ev;
  if (record) ev.reserve(4 * (2 * m + 3 * n));
  auto emit = [&](int32_t op, int64_t a, int64_t b, int64_t slot) {
    if (!record) return;
    ev.push_back(op);
    ev.push_back(static_cast<int32_t>(a));
    ev.push_back(static_cast<int32_t>(b));
    ev.push_back(static_cast<int32_t>(slot));
  };
  auto next_use = [&](int64_t u) { return cursor[u] < use_ptr[u + 1] ? uses[cursor[u]] : INT64_MAX; };
  auto release = [&](int64_t u) {
    emit(DROP, u, -1, slot_of[u]);
    free_slots.push(slot_of[u]);
    slot_of[u] = -1;
  };
  auto take_slot = [&]() -> int64_t {
    if (!free_slots.empty()) {
      const int64_t s = free_slots.top();
      free_slots.pop();
      return s;
    }
    if (fresh < M) return fresh++;
    for (;;) {  // evict the resident value whose next use is furthest away
      TORCH_CHECK(!resident.empty(), "internal error: no value to evict");
      const Entry top = resident.top();
      resident.pop();
      const int64_t u = top.second;
      if (slot_of[u] < 0 || next_use(u) != top.first) continue;  // stale entry
      if (dirty[u]) {
        ++stores;
        dirty[u] = 0;
        emit(STORE, u, -1, slot_of[u]);
      }
      const int64_t s = slot_of[u];
      release(u);
      free_slots.pop();  // the slot just freed is the only free one: take it
      return s;
    }
  };

  for (int64_t i = 0; i < n_order; ++i) {
    const int64_t v = order[i];
    const int64_t sv = take_slot();
    slot_of[v] = sv;
    ++inits;
    emit(INIT, v, -1, sv);
    for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) {
      const int64_t u = src[e];
      if (slot_of[u] < 0) {
        TORCH_CHECK(u < n_inputs || !dirty[u], "internal error: dirty value not resident");
        slot_of[u] = take_slot();
        ++loads;
        emit(LOAD, u, -1, slot_of[u]);
      }
      ++fmas;
      emit(FMA, u, v, slot_of[u]);
      ++cursor[u];
      if (cursor[u] == use_ptr[u + 1]) {  // last use: the value dies
        if (dirty[u] && is_output[u]) {
          ++stores;
          emit(STORE, u, -1, slot_of[u]);
        }
        dirty[u] = 0;
        release(u);
      } else {
        resident.push({uses[cursor[u]], u});
      }
    }
    emit(FINISH, v, -1, sv);
    if (cursor[v] == use_ptr[v + 1]) {  // nobody reads v
      if (is_output[v]) {
        ++stores;
        emit(STORE, v, -1, sv);
      }
      release(v);
    } else {
      dirty[v] = 1;
      resident.push({uses[cursor[v]], v});
    }
  }
  auto counts = at::empty({4}, at::kLong);
  auto* c = counts.data_ptr<int64_t>();
  c[0] = fmas;
  c[1] = inits;
  c[2] = loads;
  c[3] = stores;
  const int64_t k = static_cast<int64_t>(ev.size() / 4);
  auto events = at::empty({k, 4}, at::kInt);
  if (k) std::memcpy(events.data_ptr<int32_t>(), ev.data(), ev.size() * sizeof(int32_t));
  return {counts, events};
}

// Stable topological sort: Kahn's algorithm that always emits the smallest ready neuron. Returns the
// computed neurons only; throws when a cycle leaves neurons unemitted.
at::Tensor topo_sort(const at::Tensor& in_ptr_t, const at::Tensor& out_ptr_t, const at::Tensor& out_dst_t,
                     int64_t n_inputs) {
  check_index_tensor(in_ptr_t, "in_ptr");
  check_index_tensor(out_ptr_t, "out_ptr");
  check_index_tensor(out_dst_t, "out_dst");
  const int64_t n = in_ptr_t.numel() - 1;
  const int64_t* in_ptr = in_ptr_t.data_ptr<int64_t>();
  const int64_t* out_ptr = out_ptr_t.data_ptr<int64_t>();
  const int64_t* out_dst = out_dst_t.data_ptr<int64_t>();
  std::vector<int64_t> indeg(n);
  for (int64_t v = 0; v < n; ++v) indeg[v] = in_ptr[v + 1] - in_ptr[v];
  std::priority_queue<int64_t, std::vector<int64_t>, std::greater<int64_t>> ready;
  for (int64_t v = 0; v < n_inputs; ++v) {  // inputs first: they are in slow memory from the start
    for (int64_t e = out_ptr[v]; e < out_ptr[v + 1]; ++e)
      if (--indeg[out_dst[e]] == 0) ready.push(out_dst[e]);
  }
  for (int64_t v = n_inputs; v < n; ++v)
    if (in_ptr[v + 1] == in_ptr[v]) ready.push(v);
  auto out = at::empty({n - n_inputs}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  int64_t k = 0;
  while (!ready.empty()) {
    const int64_t v = ready.top();
    ready.pop();
    o[k++] = v;
    for (int64_t e = out_ptr[v]; e < out_ptr[v + 1]; ++e)
      if (--indeg[out_dst[e]] == 0) ready.push(out_dst[e]);
  }
  TORCH_CHECK_VALUE(k == n - n_inputs, "the graph has a cycle: ", n - n_inputs - k,
                    " neurons lie on or after one");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iosparse, m) {
  m.def("simulate(Tensor in_ptr, Tensor in_src, Tensor order, Tensor is_output, int n_inputs, int memory, "
        "bool record) -> (Tensor, Tensor)");
  m.def("topo_sort(Tensor in_ptr, Tensor out_ptr, Tensor out_dst, int n_inputs) -> Tensor");
}

TORCH_LIBRARY_IMPL(iosparse, CPU, m) {
  m.impl("simulate", &simulate);
  m.impl("topo_sort", &topo_sort);
}

}  // namespace iosparse
