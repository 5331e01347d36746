// Cache-aware list scheduling: a locality-aware topological order for the 2-optimal strategy.
//
// Among the ready neurons (all sources computed) pick the one with the most sources currently held in a
// simulated fast memory of `memory` slots (LRU, since the future is not known while building the order);
// ties go to the neuron that comes first in a base order (e.g. layer order). The order is only a
// heuristic: torch_iosparse/planning/heuristics.py always measures it with the exact simulator and keeps the best candidate.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <list>
#include <queue>
#include <tuple>
#include <vector>

namespace iosparse {
namespace {

at::Tensor greedy_cache_order(const at::Tensor& in_ptr_t, const at::Tensor& in_src_t, const at::Tensor& out_ptr_t,
                              const at::Tensor& out_dst_t, int64_t n_inputs, int64_t memory,
                              const at::Tensor& rank_t) {
  for (const auto* t : {&in_ptr_t, &in_src_t, &out_ptr_t, &out_dst_t, &rank_t})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() && t->device().is_cpu(),
                "greedy_cache_order takes contiguous 1-D int64 CPU tensors");
  TORCH_CHECK(memory >= 2, "memory must be >= 2, got ", memory);
  const int64_t n = in_ptr_t.numel() - 1;
  TORCH_CHECK(rank_t.numel() == n, "rank must have one entry per neuron");
  const int64_t* in_ptr = in_ptr_t.data_ptr<int64_t>();
  const int64_t* in_src = in_src_t.data_ptr<int64_t>();
  const int64_t* out_ptr = out_ptr_t.data_ptr<int64_t>();
  const int64_t* out_dst = out_dst_t.data_ptr<int64_t>();
  const int64_t* rank = rank_t.data_ptr<int64_t>();
  const int64_t capacity = memory - 1;  // one slot holds the partial sum being computed

  std::vector<int64_t> missing(n), score(n, 0), uses_left(n);
  std::vector<uint8_t> done(n, 0);
  for (int64_t v = 0; v < n; ++v) {
    missing[v] = 0;
    for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) missing[v] += in_src[e] >= n_inputs;
    uses_left[v] = out_ptr[v + 1] - out_ptr[v];
  }
  // ready heap: (score, -rank, v), lazily invalidated when the score changes
  using Item = std::tuple<int64_t, int64_t, int64_t>;
  std::priority_queue<Item> ready;
  for (int64_t v = n_inputs; v < n; ++v)
    if (missing[v] == 0) ready.emplace(0, -rank[v], v);

  std::list<int64_t> lru;  // front = most recent
  std::vector<std::list<int64_t>::iterator> where(n);
  std::vector<uint8_t> cached(n, 0);
  auto bump = [&](int64_t u, int64_t by) {
    for (int64_t e = out_ptr[u]; e < out_ptr[u + 1]; ++e) {
      const int64_t w = out_dst[e];
      if (done[w]) continue;
      score[w] += by;
      if (missing[w] == 0) ready.emplace(score[w], -rank[w], w);
    }
  };
  auto evict = [&](int64_t u) {
    lru.erase(where[u]);
    cached[u] = 0;
    bump(u, -1);
  };
  auto touch = [&](int64_t u) {  // u was just used or produced: most recent; keep it only if still needed
    if (cached[u]) lru.erase(where[u]);
    if (uses_left[u] == 0) {
      if (cached[u]) {
        cached[u] = 0;
        bump(u, -1);
      }
      return;
    }
    lru.push_front(u);
    where[u] = lru.begin();
    if (!cached[u]) {
      cached[u] = 1;
      bump(u, +1);
    }
    while (static_cast<int64_t>(lru.size()) > capacity) evict(lru.back());
  };

  auto out = at::empty({n - n_inputs}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  int64_t k = 0;
  while (!ready.empty()) {
    const auto [s, negrank, v] = ready.top();
    ready.pop();
    if (done[v] || s != score[v]) continue;  // stale entry
    done[v] = 1;
    o[k++] = v;
    for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) {
      --uses_left[in_src[e]];
      touch(in_src[e]);
    }
    for (int64_t e = out_ptr[v]; e < out_ptr[v + 1]; ++e) {
      const int64_t w = out_dst[e];
      if (--missing[w] == 0) ready.emplace(score[w], -rank[w], w);
    }
    touch(v);
  }
  TORCH_CHECK_VALUE(k == n - n_inputs, "the graph has a cycle");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iosparse, m) {
  m.def("greedy_cache_order(Tensor in_ptr, Tensor in_src, Tensor out_ptr, Tensor out_dst, int n_inputs, "
        "int memory, Tensor rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(iosparse, CPU, m) { m.impl("greedy_cache_order", &greedy_cache_order); }

}  // namespace iosparse
