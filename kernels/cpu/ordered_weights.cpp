// The cache of path-ordered weights (ordered_weights.h): its state, once per process, and its lookups.
#include "cpu/ordered_weights.h"

#include <new>

namespace iosparse {

namespace {

struct OrderedWeightEntry {
  at::Tensor weight, order, pw;
  int64_t version = 0;
  uint64_t stamp = 0;
};
constexpr size_t ORDERED_CACHE_ENTRIES = 4;
std::mutex ordered_cache_mutex;
std::vector<OrderedWeightEntry> ordered_cache;
uint64_t ordered_cache_clock = 0;

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

}  // namespace

void reset_ordered_weight_cache_in_child() {
  new (&ordered_cache_mutex) std::mutex();
  new (&ordered_cache) std::vector<OrderedWeightEntry>();
}

void clear_panel_weight_cache() {
  std::lock_guard<std::mutex> lock(ordered_cache_mutex);
  ordered_cache.clear();
}

int64_t panel_weight_cache_size() {
  std::lock_guard<std::mutex> lock(ordered_cache_mutex);
  return int64_t(ordered_cache.size());
}

template <typename T>
OrderedWeights<T>::OrderedWeights(const at::Tensor& weight_t, const at::Tensor& order_t, int scratch_slot)
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

template <typename T>
void OrderedWeights<T>::fill_slice(const Net& net, const T* w, int64_t c) {
  bool bad = false;
  for (int64_t k = c * SLICE, e = std::min(E, (c + 1) * SLICE); k < e; ++k)
    pw[k] = ordered_weight(order, w, net.n_edges, k, bad);
  if (bad) net.flag_corrupt();
}

template <typename T>
void OrderedWeights<T>::remember(const Net& net, const at::Tensor& weight_t, const at::Tensor& order_t) {
  if (hit || !pw_t.defined() || net.corrupt->load()) return;
  std::lock_guard<std::mutex> lock(ordered_cache_mutex);
  if (ordered_cache.size() >= ORDERED_CACHE_ENTRIES) {
    auto oldest = std::min_element(ordered_cache.begin(), ordered_cache.end(),
                                   [](const OrderedWeightEntry& a, const OrderedWeightEntry& c) { return a.stamp < c.stamp; });
    ordered_cache.erase(oldest);
  }
  ordered_cache.push_back(OrderedWeightEntry{weight_t, order_t, pw_t, version, ++ordered_cache_clock});
}

template struct OrderedWeights<float>;
template struct OrderedWeights<double>;

}  // namespace iosparse
