// Exact I/O simulator of the 2-optimal strategy (docs/theory.md): neurons in the
// given order, each neuron's in-edges in ascending source order, furthest-next-use eviction, lazy stores,
// smallest free slot. The pure-Python twin is torch_iosparse/cost/iomodel.py::simulate_reference; tests compare
// the two event by event. Also: a stable topological sort and a stable bucket sort used to build CSRs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <queue>
#include <tuple>
#include <utility>
#include <vector>

namespace iosparse {
namespace {

enum Op : int32_t { INIT = 0, LOAD = 1, FMA = 2, FINISH = 3, STORE = 4, DROP = 5 };
constexpr int64_t NEVER = std::numeric_limits<int64_t>::max();

void check_index_tensor(const at::Tensor& t, const char* name, bool allow_int32 = false) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kLong || (allow_int32 && t.scalar_type() == at::kInt), name,
              allow_int32 ? " must be int32 or int64" : " must be int64", ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be 1-D and contiguous");
}

// Max-heap of resident values keyed by their next read time, with a position index so a key can be
// raised in place (a value's next read only moves later) and any value removed: no stale entries, size
// <= M.
class ResidentHeap {
 public:
  explicit ResidentHeap(int64_t n) : pos_(n, -1), key_(n, 0) {}
  bool contains(int64_t u) const { return pos_[u] >= 0; }
  bool empty() const { return heap_.empty(); }
  void insert(int64_t u, int64_t key) {
    key_[u] = key;
    pos_[u] = static_cast<int64_t>(heap_.size());
    heap_.push_back(u);
    sift_up(pos_[u]);
  }
  void raise(int64_t u, int64_t key) {  // key only grows: the value moves towards the root
    key_[u] = key;
    sift_up(pos_[u]);
  }
  void remove(int64_t u) {
    const int64_t i = pos_[u];
    const int64_t last = heap_.back();
    heap_.pop_back();
    pos_[u] = -1;
    if (last == u) return;
    heap_[i] = last;
    pos_[last] = i;
    sift_down(sift_up(i));
  }
  int64_t top() const { return heap_[0]; }

 private:
  int64_t sift_up(int64_t i) {
    const int64_t u = heap_[i];
    while (i > 0) {
      const int64_t p = (i - 1) / 2;
      if (key_[heap_[p]] >= key_[u]) break;
      heap_[i] = heap_[p];
      pos_[heap_[i]] = i;
      i = p;
    }
    heap_[i] = u;
    pos_[u] = i;
    return i;
  }
  void sift_down(int64_t i) {
    const int64_t size = static_cast<int64_t>(heap_.size());
    const int64_t u = heap_[i];
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= size) break;
      if (c + 1 < size && key_[heap_[c + 1]] > key_[heap_[c]]) ++c;
      if (key_[heap_[c]] <= key_[u]) break;
      heap_[i] = heap_[c];
      pos_[heap_[i]] = i;
      i = c;
    }
    heap_[i] = u;
    pos_[u] = i;
  }
  std::vector<int64_t> heap_;
  std::vector<int64_t> pos_;
  std::vector<int64_t> key_;
};

template <typename src_t>
std::tuple<at::Tensor, at::Tensor> simulate_impl(const int64_t* in_ptr, const src_t* src, int64_t n, int64_t m,
                                                 const int64_t* order, int64_t n_order, const bool* is_output,
                                                 int64_t n_inputs, int64_t memory, bool record) {
  const int64_t M = memory == -1 ? NEVER : memory;
  const bool bounded = memory != -1;

  // Validate the order enough that a bad one can never read out of bounds (iomodel.normalize_order
  // gives the friendly messages; this guards direct callers of the op).
  std::vector<uint8_t> done(n, 0);  // computed so far (inputs count as done)
  std::fill(done.begin(), done.begin() + n_inputs, 1);
  {
    std::vector<uint8_t> listed(n, 0);
    int64_t covered = 0;
    for (int64_t i = 0; i < n_order; ++i) {
      const int64_t v = order[i];
      TORCH_CHECK(v >= n_inputs && v < n, "order entry ", v, " is not a computed neuron");
      TORCH_CHECK(!listed[v], "order lists neuron ", v, " twice");
      listed[v] = 1;
      covered += in_ptr[v + 1] - in_ptr[v];
    }
    TORCH_CHECK(n_order == n - n_inputs && covered == m, "order does not cover every computed neuron");
  }

  // The schedule reads edges in a fixed sequence (time t = 0..m-1). One backward pass gives, for each
  // read, the time of the next read of the same value (NEVER if it is the last), and each value's first
  // read time.
  std::vector<int64_t> next_read(m);
  std::vector<int64_t> first_read(n, NEVER);
  {
    int64_t t = m;
    for (int64_t i = n_order - 1; i >= 0; --i) {
      const int64_t v = order[i];
      for (int64_t e = in_ptr[v + 1] - 1; e >= in_ptr[v]; --e) {
        const int64_t u = src[e];
        --t;
        next_read[t] = first_read[u];
        first_read[u] = t;
      }
    }
  }

  std::vector<int64_t> slot_of(n, -1);
  std::vector<uint8_t> dirty(n, 0);  // the value lives only in fast memory
  ResidentHeap resident(bounded ? n : 0);  // every resident value except the partial sum being built
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
  auto release = [&](int64_t u) {  // drop u; its slot becomes free
    emit(DROP, u, -1, slot_of[u]);
    free_slots.push(slot_of[u]);
    slot_of[u] = -1;
  };
  auto take_slot = [&]() -> int64_t {
    if (!free_slots.empty()) {  // free slots are all < fresh: this is the smallest free index
      const int64_t s = free_slots.top();
      free_slots.pop();
      return s;
    }
    if (fresh < M) return fresh++;
    // Full: evict the resident value whose next read is furthest away, storing it if dirty.
    TORCH_CHECK(!resident.empty(), "internal error: no value to evict");
    const int64_t u = resident.top();
    resident.remove(u);
    if (dirty[u]) {
      ++stores;
      dirty[u] = 0;
      emit(STORE, u, -1, slot_of[u]);
    }
    const int64_t s = slot_of[u];
    emit(DROP, u, -1, s);
    slot_of[u] = -1;
    return s;  // the freed slot is the only free one
  };

  int64_t t = 0;
  for (int64_t i = 0; i < n_order; ++i) {
    const int64_t v = order[i];
    const int64_t sv = take_slot();
    slot_of[v] = sv;
    ++inits;
    emit(INIT, v, -1, sv);
    for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e, ++t) {
      const int64_t u = src[e];
      bool loaded = false;
      if (slot_of[u] < 0) {
        TORCH_CHECK(done[u], "order is not topological: neuron ", u, " is read by ", v, " before it is computed");
        slot_of[u] = take_slot();
        ++loads;
        loaded = true;
        emit(LOAD, u, -1, slot_of[u]);
      }
      ++fmas;
      emit(FMA, u, v, slot_of[u]);
      const int64_t nt = next_read[t];
      if (nt == NEVER) {  // last read: the value dies (outputs reach slow memory first)
        if (bounded && !loaded) resident.remove(u);
        if (dirty[u] && is_output[u]) {
          ++stores;
          emit(STORE, u, -1, slot_of[u]);
        }
        dirty[u] = 0;
        release(u);
      } else if (bounded) {
        if (loaded) resident.insert(u, nt);
        else resident.raise(u, nt);
      }
    }
    done[v] = 1;
    emit(FINISH, v, -1, sv);
    if (first_read[v] == NEVER) {  // nobody reads v
      if (is_output[v]) {
        ++stores;
        emit(STORE, v, -1, sv);
      }
      release(v);
    } else {
      dirty[v] = 1;
      if (bounded) resident.insert(v, first_read[v]);
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

// counts = [weights, biases, loads, stores]; events = int32 [k, 4] rows (op, a, b, slot) when record.
std::tuple<at::Tensor, at::Tensor> simulate(const at::Tensor& in_ptr_t, const at::Tensor& in_src_t,
                                            const at::Tensor& order_t, const at::Tensor& is_output_t,
                                            int64_t n_inputs, int64_t memory, bool record) {
  check_index_tensor(in_ptr_t, "in_ptr");
  check_index_tensor(in_src_t, "in_src", /*allow_int32=*/true);
  check_index_tensor(order_t, "order");
  TORCH_CHECK(is_output_t.scalar_type() == at::kBool && is_output_t.is_contiguous() && is_output_t.device().is_cpu(),
              "is_output must be a contiguous CPU bool tensor");
  const int64_t n = in_ptr_t.numel() - 1;
  const int64_t m = in_src_t.numel();
  TORCH_CHECK(n >= 0 && is_output_t.numel() == n, "is_output must have one entry per neuron");
  TORCH_CHECK(n_inputs >= 0 && n_inputs <= n, "n_inputs out of range");
  TORCH_CHECK(memory == -1 || memory >= 2, "memory must be >= 2 or -1 (unbounded), got ", memory);
  const int64_t* in_ptr = in_ptr_t.data_ptr<int64_t>();
  TORCH_CHECK(in_ptr[0] == 0 && in_ptr[n] == m, "in_ptr does not describe in_src");
  const int64_t* order = order_t.data_ptr<int64_t>();
  const bool* is_output = is_output_t.data_ptr<bool>();
  if (in_src_t.scalar_type() == at::kInt)
    return simulate_impl<int32_t>(in_ptr, in_src_t.data_ptr<int32_t>(), n, m, order, order_t.numel(), is_output,
                                  n_inputs, memory, record);
  return simulate_impl<int64_t>(in_ptr, in_src_t.data_ptr<int64_t>(), n, m, order, order_t.numel(), is_output,
                                n_inputs, memory, record);
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

// Depth of every neuron (0 for inputs, 1 + the largest depth of its sources otherwise; a computed neuron
// without in-edges has depth 1) by Kahn's algorithm in O(n + m). Throws when a cycle leaves neurons.
at::Tensor levels(const at::Tensor& in_ptr_t, const at::Tensor& out_ptr_t, const at::Tensor& out_dst_t,
                  int64_t n_inputs) {
  check_index_tensor(in_ptr_t, "in_ptr");
  check_index_tensor(out_ptr_t, "out_ptr");
  check_index_tensor(out_dst_t, "out_dst");
  const int64_t n = in_ptr_t.numel() - 1;
  TORCH_CHECK(out_ptr_t.numel() == n + 1, "in_ptr and out_ptr describe different neuron counts");
  const int64_t* in_ptr = in_ptr_t.data_ptr<int64_t>();
  const int64_t* out_ptr = out_ptr_t.data_ptr<int64_t>();
  const int64_t* out_dst = out_dst_t.data_ptr<int64_t>();
  auto depth_t = at::empty({n}, at::kLong);
  int64_t* depth = depth_t.data_ptr<int64_t>();
  std::vector<int64_t> indeg(n), queue;
  queue.reserve(n);
  for (int64_t v = 0; v < n; ++v) {
    indeg[v] = in_ptr[v + 1] - in_ptr[v];
    depth[v] = v < n_inputs ? 0 : 1;
    if (indeg[v] == 0) queue.push_back(v);
  }
  for (size_t head = 0; head < queue.size(); ++head) {
    const int64_t u = queue[head];
    for (int64_t e = out_ptr[u]; e < out_ptr[u + 1]; ++e) {
      const int64_t v = out_dst[e];
      if (depth[u] + 1 > depth[v]) depth[v] = depth[u] + 1;
      if (--indeg[v] == 0) queue.push_back(v);
    }
  }
  if (static_cast<int64_t>(queue.size()) != n) {
    int64_t v = 0;
    while (indeg[v] == 0) ++v;
    TORCH_CHECK_VALUE(false, "the graph has a cycle: ", n - static_cast<int64_t>(queue.size()),
                      " neurons lie on or after one (e.g. neuron ", v, ")");
  }
  return depth_t;
}

// One stable counting-sort pass: perm_out lists perm_in re-ordered by key[perm_in[i]].
template <typename key_t>
void counting_pass(const key_t* key, int64_t n_buckets, const std::vector<int64_t>& perm_in,
                   std::vector<int64_t>& perm_out, bool identity_in) {
  const int64_t m = static_cast<int64_t>(perm_out.size());
  std::vector<int64_t> start(n_buckets + 1, 0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t k = key[i];
    TORCH_CHECK(k >= 0 && k < n_buckets, "sort key ", k, " out of range [0, ", n_buckets, ")");
    start[k + 1]++;
  }
  for (int64_t b = 0; b < n_buckets; ++b) start[b + 1] += start[b];
  for (int64_t i = 0; i < m; ++i) {
    const int64_t e = identity_in ? i : perm_in[i];
    perm_out[start[key[e]]++] = e;
  }
}

template <typename key_t>
at::Tensor bucket_sort_impl(const key_t* primary, const key_t* secondary, int64_t m, int64_t n_buckets) {
  std::vector<int64_t> a(m), b;
  if (secondary == nullptr) {
    counting_pass(primary, n_buckets, b, a, /*identity_in=*/true);
  } else {  // LSD radix: by the secondary key, then stably by the primary key
    b.resize(m);
    counting_pass(secondary, n_buckets, b, a, true);
    counting_pass(primary, n_buckets, a, b, false);
    a.swap(b);
  }
  auto out = at::empty({m}, at::kLong);
  if (m) std::memcpy(out.data_ptr<int64_t>(), a.data(), m * sizeof(int64_t));
  return out;
}

// The stable permutation that sorts items by (primary, secondary) keys in [0, n_buckets): O(m + n_buckets).
at::Tensor bucket_sort(const at::Tensor& primary, const c10::optional<at::Tensor>& secondary, int64_t n_buckets) {
  check_index_tensor(primary, "primary", true);
  TORCH_CHECK(n_buckets >= 0, "n_buckets must be >= 0");
  const int64_t m = primary.numel();
  if (secondary.has_value()) {
    check_index_tensor(*secondary, "secondary", true);
    TORCH_CHECK(secondary->numel() == m && secondary->scalar_type() == primary.scalar_type(),
                "primary and secondary must have the same length and dtype");
  }
  if (primary.scalar_type() == at::kInt)
    return bucket_sort_impl<int32_t>(primary.data_ptr<int32_t>(),
                                     secondary.has_value() ? secondary->data_ptr<int32_t>() : nullptr, m, n_buckets);
  return bucket_sort_impl<int64_t>(primary.data_ptr<int64_t>(),
                                   secondary.has_value() ? secondary->data_ptr<int64_t>() : nullptr, m, n_buckets);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iosparse, m) {
  m.def("simulate(Tensor in_ptr, Tensor in_src, Tensor order, Tensor is_output, int n_inputs, int memory, "
        "bool record) -> (Tensor, Tensor)");
  m.def("topo_sort(Tensor in_ptr, Tensor out_ptr, Tensor out_dst, int n_inputs) -> Tensor");
  m.def("bucket_sort(Tensor primary, Tensor? secondary, int n_buckets) -> Tensor");
  m.def("levels(Tensor in_ptr, Tensor out_ptr, Tensor out_dst, int n_inputs) -> Tensor");
}

TORCH_LIBRARY_IMPL(iosparse, CPU, m) {
  m.impl("simulate", &simulate);
  m.impl("topo_sort", &topo_sort);
  m.impl("bucket_sort", &bucket_sort);
  m.impl("levels", &levels);
}

}  // namespace iosparse
