// Simulated annealing over topological orders with exact, incremental cost evaluation.
//
// The cost is that of the 2-optimal strategy as kernels/sim/simulator.cpp replays it (neurons in order,
// in-edges by ascending source, furthest-next-use eviction, lazy stores). The state of that simulator
// between two neurons is fully described by the set of resident values and their dirty flags: slot
// numbers do not influence the count, and the next-use key of a resident value is a function of the
// order alone. Hence if a modified order (which differs from the baseline only inside a window [a, b])
// reaches, at some step T > b, the same resident set and dirty flags as the baseline run at T, every
// later step is identical and the cost difference is exactly the difference accumulated up to T.
//
// The annealer keeps, for the current (baseline) order: the I/O cost of each step, a 64-bit Zobrist hash
// of the state before each step, and full state checkpoints every K steps. A move (relocate one neuron
// inside its legal window; K=1 swaps adjacent neurons as a special case) is evaluated by restoring the
// checkpoint at or before the first eviction decision the move may change (first_affected), replaying
// the modified order and stopping at the first step past the window whose state hash equals the
// baseline's. The evaluation captures the new baseline data of the steps it replayed; an accepted move
// commits them (no second replay). The final cost is re-checked by the caller with the exact simulator
// (iomodel.count_io); `full_cost()` here is a from-scratch replay for tests.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace iosparse {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

// A list of int32 with the first kInline entries stored in the object itself: the per-step and
// per-position record lists are short and sit at random places, so a separate heap block per list cost
// a second cache miss on every access.
class SmallList {
 public:
  static constexpr int32_t kInline = 5;
  SmallList() = default;
  SmallList(const SmallList&) = delete;
  SmallList& operator=(const SmallList&) = delete;
  SmallList(SmallList&& o) noexcept { *this = std::move(o); }
  SmallList& operator=(SmallList&& o) noexcept {
    std::swap(size_, o.size_);
    std::swap(cap_, o.cap_);
    std::swap(heap_, o.heap_);
    std::swap_ranges(inl_, inl_ + kInline, o.inl_);  // both objects stay valid
    return *this;
  }
  ~SmallList() { delete[] heap_; }
  int32_t* data() { return cap_ > kInline ? heap_ : inl_; }
  const int32_t* data() const { return cap_ > kInline ? heap_ : inl_; }
  int32_t* begin() { return data(); }
  int32_t* end() { return data() + size_; }
  const int32_t* begin() const { return data(); }
  const int32_t* end() const { return data() + size_; }
  size_t size() const { return static_cast<size_t>(size_); }
  bool empty() const { return size_ == 0; }
  int32_t& operator[](size_t k) { return data()[k]; }
  int32_t operator[](size_t k) const { return data()[k]; }
  int32_t back() const { return data()[size_ - 1]; }
  void pop_back() { --size_; }
  void clear() { size_ = 0; }
  void push_back(int32_t x) {
    if (size_ == cap_) grow();
    data()[size_++] = x;
  }

 private:
  void grow() {
    const int32_t cap = cap_ * 2;
    int32_t* h = new int32_t[cap];
    std::copy(data(), data() + size_, h);
    delete[] heap_;
    heap_ = h;
    cap_ = cap;
  }
  int32_t size_ = 0, cap_ = kInline;
  int32_t* heap_ = nullptr;
  int32_t inl_[kInline] = {};
};

struct SplitMix64 {  // small, fast, platform-independent: same seed => same moves everywhere
  uint64_t s;
  explicit SplitMix64(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
};

std::vector<int64_t> to_vec(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1, name,
              " must be a 1-D int64 CPU tensor");
  auto c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

struct Annealer : torch::CustomClassHolder {
  int64_t n = 0, n_in = 0, nc = 0, M = 0, K = 1;
  std::vector<int64_t> in_ptr, out_ptr;
  std::vector<int32_t> in_src, cons;  // cons: per source, consumers sorted by current position
  std::vector<int32_t> cidx;          // per in-edge (u -> v): index of v in u's consumer list
  // parallel to cons: that reader's position and the in-edge index of the read, side by side so that a
  // read finds the next reader's position without touching pos[] (kept in step by apply_move)
  struct Slot {
    int32_t pos, edge;
  };
  std::vector<Slot> cslot;
  std::vector<int32_t> edst;          // per in-edge: its reader
  std::vector<int32_t> pred_edge;     // per source u of the moved neuron x: the in-edge u -> x
  std::vector<uint8_t> is_out;
  std::vector<int32_t> order, pos, best_order_;
  // baseline data of the current order
  std::vector<uint64_t> hash;       // [nc + 1]: state hash before step t
  std::vector<int32_t> step_cost;   // [nc]: loads + stores during step t
  // checkpoint k = state before step k*K, one entry per resident value u: (e << 1 | dirty), e the in-edge
  // u -> w of u's next reader w then (u = in_src[e]); restore() checks that w is still the next reader
  // (cheap) instead of searching u's consumer list, and searches only when a later move changed it.
  std::vector<int32_t> ck_vals, ck_size;
  int64_t cur_cost = 0, best_cost_ = 0;
  SplitMix64 rng{0};

  // simulation scratch
  std::vector<uint8_t> res;        // 0 absent, 1 clean, 2 dirty
  std::vector<int32_t> rlist, ridx;  // resident list with positions (O(1) insert / erase)
  std::vector<int32_t> rent;         // parallel to rlist: checkpoint entry (next-reader edge << 1 | dirty)
  // indexed max-heap of the resident values (not the partial sum) by next-use key: at most M entries
  std::vector<int64_t> hk;
  std::vector<int32_t> hv, hpos;
  int64_t hsize = 0;
  std::vector<uint8_t> pred_mark;  // sources of the moved neuron
  int64_t cnt = 0;                 // occupied slots (resident values + accumulator)
  uint64_t h = 0;
  int64_t io = 0;
  // the move being evaluated: neuron mx goes from position mi to mj; window [wa, wb]
  bool mv = false;
  int32_t mx = -1;
  int64_t mi = 0, mj = 0, wa = 0, wb = -1;
  int64_t replayed_steps = 0, back_steps = 0;
  // caps on the replay of one proposal (kNone = exact always); a capped proposal is rejected unseen
  int64_t max_back = kNone, max_forward = kNone, skipped_back = 0, unresolved = 0;
  // Eviction decisions depend on the future: one made at step s whose victim is next read at position p
  // may change when the window around p is reordered. Both views of those records are kept.
  bool recording = false;
  // What the last evaluation replayed (steps last_c .. stop_ - 1, under the move), kept so that an
  // accepted move commits it instead of replaying it again: state hash before and I/O of each step,
  // checkpoints (offset into sc_ck, size), eviction records, and the final hash when it ran to the end.
  bool capturing = false;
  std::vector<uint64_t> sc_hash;
  std::vector<int32_t> sc_cost, sc_ck, sc_ck_size;
  uint64_t sc_final_h = 0;
  int64_t cur_t = 0;
  // One record per eviction decision of the current order: step, victim value and the position of its
  // next read, runner-up value and an upper bound on the position of its next read (exact when recorded).
  // ip / ir: the record's index in evicted_at[p] / by_runner[r] (O(1) removal).
  struct Rec {
    int32_t s, uv, p, ur, r, ip, ir;
  };
  std::vector<Rec> recs;
  std::vector<Rec> sc_recs;  // eviction records of the last evaluation (see capturing)
  std::vector<int32_t> free_recs;
  std::vector<SmallList> evict_targets;  // per step: its records
  std::vector<SmallList> by_runner;      // per position r: records whose runner-up bound is r
  std::vector<SmallList> evicted_at;     // per position p: records whose victim is next read at p
  int64_t last_c = 0;

  Annealer(at::Tensor in_ptr_t, at::Tensor in_src_t, at::Tensor is_output_t, int64_t n_inputs,
           int64_t memory, at::Tensor order_t, int64_t seed, int64_t checkpoint_budget) {
    in_ptr = to_vec(in_ptr_t, "in_ptr");
    auto src64 = to_vec(in_src_t, "in_src");
    auto ord64 = to_vec(order_t, "order");
    TORCH_CHECK(is_output_t.scalar_type() == at::kBool, "is_output must be bool");
    n = static_cast<int64_t>(in_ptr.size()) - 1;
    n_in = n_inputs;
    nc = n - n_in;
    TORCH_CHECK(memory >= 2, "memory must be >= 2 slots, got ", memory);
    TORCH_CHECK(static_cast<int64_t>(ord64.size()) == nc, "order must list the ", nc, " computed neurons");
    TORCH_CHECK(n < (int64_t(1) << 30), "too many neurons for the annealer");
    M = std::min<int64_t>(memory, n + 1);
    auto io_t = is_output_t.contiguous();
    is_out.assign(io_t.data_ptr<bool>(), io_t.data_ptr<bool>() + n);
    in_src.assign(src64.begin(), src64.end());
    order.assign(ord64.begin(), ord64.end());
    pos.assign(n, -1);
    for (int64_t t = 0; t < nc; ++t) {
      TORCH_CHECK(order[t] >= n_in && order[t] < n && pos[order[t]] < 0, "order is not a permutation of the "
                  "computed neurons");
      pos[order[t]] = static_cast<int32_t>(t);
    }
    for (int64_t v = n_in; v < n; ++v)
      for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e)
        TORCH_CHECK(in_src[e] < n_in || pos[in_src[e]] < pos[v], "order is not topological");
    out_ptr.assign(n + 1, 0);
    for (auto u : in_src) out_ptr[u + 1]++;
    for (int64_t u = 0; u < n; ++u) out_ptr[u + 1] += out_ptr[u];
    TORCH_CHECK(static_cast<int64_t>(in_src.size()) < (int64_t(1) << 30), "too many edges for the annealer");
    cons.assign(in_src.size(), 0);
    cidx.assign(in_src.size(), 0);
    cslot.assign(in_src.size(), Slot{0, 0});
    edst.assign(in_src.size(), 0);
    pred_edge.assign(n, -1);
    for (int64_t v = n_in; v < n; ++v)
      for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) edst[e] = static_cast<int32_t>(v);
    {
      std::vector<int64_t> cur(out_ptr.begin(), out_ptr.end() - 1);
      for (int64_t t = 0; t < nc; ++t) {  // consumers appended in order of position: already sorted
        const int32_t v = order[t];
        for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) {
          const int32_t u = in_src[e];
          cidx[e] = static_cast<int32_t>(cur[u] - out_ptr[u]);
          cslot[cur[u]] = Slot{static_cast<int32_t>(t), static_cast<int32_t>(e)};
          cons[cur[u]++] = v;
        }
      }
    }
    rng = SplitMix64(static_cast<uint64_t>(seed) * 0x2545F4914F6CDD1DULL + 12345);
    // checkpoint every K steps so that the checkpoints take at most checkpoint_budget entries
    K = std::max<int64_t>(1, (nc * M + checkpoint_budget - 1) / std::max<int64_t>(1, checkpoint_budget));
    hash.assign(nc + 1, 0);
    evict_targets = std::vector<SmallList>(nc);
    evicted_at = std::vector<SmallList>(nc);
    by_runner = std::vector<SmallList>(nc);
    step_cost.assign(nc, 0);
    ck_size.assign(nc / K + 1, 0);
    ck_vals.assign((nc / K + 1) * M, 0);
    res.assign(n, 0);
    hpos.assign(n, -1);
    hk.assign(M + 1, 0);
    hv.assign(M + 1, 0);
    ridx.assign(n, -1);
    pred_mark.assign(n, 0);
    span_of.assign(n, -1);
    rlist.reserve(M + 1);
    rent.reserve(M + 1);
    cur_cost = rebuild();
    best_cost_ = cur_cost;
    best_order_ = order;
  }

  // ---------------------------------------------------------------- positions under the move
  // Position under the move of a neuron other than the moved one, from its current position p.
  inline int64_t shifted(int64_t p) const {
    if (!mv || p < wa || p > wb) return p;
    return mi < mj ? p - 1 : p + 1;
  }
  inline int64_t tpos(int32_t w) const {
    const int64_t p = pos[w];
    if (!mv || p < wa || p > wb) return p;
    if (w == mx) return mj;
    return mi < mj ? p - 1 : p + 1;
  }
  inline int32_t torder(int64_t t) const {
    if (!mv || t < wa || t > wb) return order[t];
    if (t == mj) return mx;
    return mi < mj ? order[t + 1] : order[t - 1];
  }
  // Doubled position that keeps every consumer list sorted under the move: x keeps its old place.
  inline int64_t sort_key2(int32_t w) const {
    if (mv && w == mx) return mi < mj ? 2 * mi - 1 : 2 * mi + 1;
    return 2 * tpos(w);
  }
  // Next-use key of value u among reads at positions >= t: tpos(consumer) * n + u, or kNone.
  // ne: the in-edge of that next read (-1 if none).
  int64_t next_use(int32_t u, int64_t t, int32_t& ne) const {
    const int32_t* lo = cons.data() + out_ptr[u];
    const int32_t* hi = cons.data() + out_ptr[u + 1];
    const int64_t t2 = 2 * t;
    const int32_t* it = std::lower_bound(lo, hi, t2, [&](int32_t w, int64_t key) { return sort_key2(w) < key; });
    int64_t best = kNone;
    ne = -1;
    while (it != hi) {
      if (mv && *it == mx) {
        ++it;
        continue;
      }
      best = tpos(*it);
      ne = cslot[it - cons.data()].edge;
      break;
    }
    if (mv && pred_mark[u] && mj >= t && mj < best) {
      best = mj;
      ne = pred_edge[u];
    }
    return best == kNone ? kNone : best * n + u;
  }
  int64_t next_use(int32_t u, int64_t t) const {
    int32_t ne;
    return next_use(u, t, ne);
  }

  // Next-use key of u among readers after step t, starting the scan at index k of u's consumer list,
  // when every listed reader from k on is read after t (true after the current reader's own entry
  // unless the current reader is the moved neuron, and from k = 0 for a just-computed value).
  inline int64_t next_from(int32_t u, int64_t k, int64_t t, int32_t& ne) const {
    const int64_t base = out_ptr[u], len = out_ptr[u + 1] - base;
    const Slot* sl = cslot.data() + base;
    while (k < len && mv && sl[k].pos == mi) ++k;  // the moved neuron's own entry (it sits at mi)
    int64_t best = kNone;
    ne = -1;
    if (k < len) {
      best = shifted(sl[k].pos);
      ne = sl[k].edge;
    }
    if (mv && pred_mark[u] && mj > t && mj < best) {
      best = mj;
      ne = pred_edge[u];
    }
    return best == kNone ? kNone : best * n + u;
  }

  // ---------------------------------------------------------------- simulation
  // Zobrist key of (value, state): a 64-bit mix of a distinct input per pair (no table: a table lookup
  // per resident-set change was a cache miss).
  static inline uint64_t zobrist(int32_t u, uint8_t state) {
    uint64_t z = ((static_cast<uint64_t>(u) << 1) | (state - 1)) * 0x9E3779B97F4A7C15ULL + 0xC0FFEEULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  inline void add_res(int32_t u, uint8_t state) {
    res[u] = state;
    ridx[u] = static_cast<int32_t>(rlist.size());
    rlist.push_back(u);
    rent.push_back(0);  // set with the value's key
    h ^= zobrist(u, state);
  }
  inline void heap_place(int64_t i, int64_t key, int32_t u) {
    hk[i] = key;
    hv[i] = u;
    hpos[u] = static_cast<int32_t>(i);
  }
  inline void sift_up(int64_t i) {
    const int64_t key = hk[i];
    const int32_t u = hv[i];
    while (i > 0) {
      const int64_t parent = (i - 1) >> 1;
      if (hk[parent] >= key) break;
      heap_place(i, hk[parent], hv[parent]);
      i = parent;
    }
    heap_place(i, key, u);
  }
  inline void sift_down(int64_t i) {
    const int64_t key = hk[i];
    const int32_t u = hv[i];
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= hsize) break;
      if (c + 1 < hsize && hk[c + 1] > hk[c]) ++c;
      if (hk[c] <= key) break;
      heap_place(i, hk[c], hv[c]);
      i = c;
    }
    heap_place(i, key, u);
  }
  inline void heap_remove(int32_t u) {
    const int64_t i = hpos[u];
    hpos[u] = -1;
    const int64_t last = --hsize;
    if (i == last) return;
    const int32_t w = hv[last];
    heap_place(i, hk[last], w);
    sift_up(i);
    sift_down(hpos[w]);
  }
  inline void del_res(int32_t u) {
    if (hpos[u] >= 0) heap_remove(u);
    h ^= zobrist(u, res[u]);
    res[u] = 0;
    const int32_t last = rlist.back();
    rlist[ridx[u]] = last;
    rent[ridx[u]] = rent.back();
    ridx[last] = ridx[u];
    rlist.pop_back();
    rent.pop_back();
    ridx[u] = -1;
  }
  inline void push_key(int32_t u, int64_t key) {  // keys only grow while a value is resident
    if (hpos[u] < 0) {
      heap_place(hsize++, key, u);
      sift_up(hsize - 1);
    } else {
      const int64_t i = hpos[u];
      const int64_t old = hk[i];
      hk[i] = key;
      if (key > old) sift_up(i); else sift_down(i);
    }
  }
  void add_rec(const Rec& rec) {
    int32_t id;
    if (!free_recs.empty()) {
      id = free_recs.back();
      free_recs.pop_back();
      recs[id] = rec;
    } else {
      id = static_cast<int32_t>(recs.size());
      recs.push_back(rec);
    }
    evict_targets[rec.s].push_back(id);
    at_push(id);
    if (rec.r >= 0) runner_push(id);
  }
  void at_push(int32_t id) {
    auto& v = evicted_at[recs[id].p];
    recs[id].ip = static_cast<int32_t>(v.size());
    v.push_back(id);
  }
  void runner_push(int32_t id) {
    auto& v = by_runner[recs[id].r];
    recs[id].ir = static_cast<int32_t>(v.size());
    v.push_back(id);
  }
  void at_erase(int32_t id) {
    auto& v = evicted_at[recs[id].p];
    const int32_t k = recs[id].ip, last = v.back();
    v[k] = last;
    recs[last].ip = k;
    v.pop_back();
  }
  void runner_erase(int32_t id) {
    auto& v = by_runner[recs[id].r];
    const int32_t k = recs[id].ir, last = v.back();
    v[k] = last;
    recs[last].ir = k;
    v.pop_back();
  }
  inline void take_slot() {
    if (cnt < M) {
      ++cnt;
      return;
    }
    {  // evict the resident value read furthest in the future
      TORCH_CHECK(hsize > 0, "internal error: nothing to evict");
      const int32_t u = hv[0];
      const int64_t top_key = hk[0];
      if (res[u] == 2) ++io;  // dirty: store before dropping
      if (recording || capturing) {
        Rec rec{static_cast<int32_t>(cur_t), u, static_cast<int32_t>(top_key / n), -1, -1, -1, -1};
        if (hsize > 1) {  // runner-up: the larger child of the root
          const int64_t c = (hsize > 2 && hk[2] > hk[1]) ? 2 : 1;
          rec.ur = hv[c];
          rec.r = static_cast<int32_t>(hk[c] / n);
        }
        if (recording) add_rec(rec); else sc_recs.push_back(rec);
      }
      del_res(u);
      return;
    }
  }
  void clear_state() {
    for (int32_t u : rlist) {
      res[u] = 0;
      ridx[u] = -1;
    }
    rlist.clear();
    rent.clear();
    for (int64_t i = 0; i < hsize; ++i) hpos[hv[i]] = -1;
    hsize = 0;
    cnt = 0;
    h = 0;
  }
  // State before step c (c a multiple of K) from its checkpoint, with keys under the current move.
  void restore(int64_t c) {
    clear_state();
    const int64_t k = c / K;
    const int32_t* vals = ck_vals.data() + k * M;
    const int32_t sz = ck_size[k];
    rlist.resize(sz);
    rent.resize(sz);
    for (int32_t q = 0; q < sz; ++q) {  // independent iterations: their cache misses overlap
      const int32_t e = vals[q] >> 1, dirty = vals[q] & 1;
      const int32_t u = in_src[e];
      res[u] = static_cast<uint8_t>(1 + dirty);  // add_res without the hash: it is hash[c] (set below)
      ridx[u] = q;
      rlist[q] = u;
      // The stored reader edst[e] is at or after c (moves since the capture stayed on one side of c);
      // it is still u's next reader unless another reader of u now sits between c and it.
      const int64_t kk = cidx[e];
      int64_t key;
      const Slot* sl = cslot.data() + out_ptr[u];
      if (!(mv && pred_mark[u]) && (kk == 0 || sl[kk - 1].pos < c)) {
        key = shifted(sl[kk].pos) * n + u;  // the reader is not the moved neuron (u is not its source)
        rent[q] = vals[q];
      } else {
        int32_t ne;
        key = next_use(u, c, ne);
        rent[q] = (ne << 1) | dirty;
      }
      heap_place(q, key, u);
    }
    hsize = sz;  // heapify bottom-up (O(M)); the top two keys do not depend on the layout
    for (int64_t i = hsize / 2 - 1; i >= 0; --i) sift_down(i);
    cnt = sz;
    h = hash[c];
  }

  void save_checkpoint(int64_t t) {
    const int64_t k = t / K;
    int32_t* vals = ck_vals.data() + k * M;
    ck_size[k] = static_cast<int32_t>(rlist.size());
    std::copy(rent.begin(), rent.end(), vals);
  }
  // One step: compute neuron torder(t).
  void forget_evictions(int64_t t) {
    for (int32_t id : evict_targets[t]) {
      at_erase(id);
      if (recs[id].r >= 0) runner_erase(id);
      free_recs.push_back(id);
    }
    evict_targets[t].clear();
  }
  // The first step whose eviction decision may differ under the move x: mi -> mj (set_move). The move
  // keeps the relative order of every neuron but x, so the next-use keys of values that x does not read
  // keep their relative order; only sources of x can change rank. A decision at step s < wa (victim v
  // with key p, best other key r) can therefore change only if
  //  * x moves later (mi < mj): a source u of x, resident at s with next reader x (key mi), rises above
  //    v's new key. That needs p in [mi, mj] (else v's key stays above mj; p = mi: v is such a source
  //    too, and another may rise further), r >= mi (u competes), and s >= the step of u's previous
  //    read (or computation): u's key is mi
  //    only from then on; an input first read by x is not resident before mi at all;
  //  * x moves earlier (mj < mi): only sources of x get smaller keys (min(old, mj)), so v must be a
  //    source of x with p in [mj, mi] (its key drops to mj) and r >= mj (a competitor then exceeds it).
  // Records store r as an upper bound after repairs, which keeps the test conservative.
  struct SrcSpan {
    int64_t from, next2;
    int32_t u;
  };
  std::vector<SrcSpan> src_span;
  std::vector<int32_t> span_of;  // per value: its index in src_span, or -1
  // Can a source of x with key mi at the decision of step s (victim's key p) rise to the victim's new
  // key? It must have key mi then (from <= s), its next other reader must be at or after p (p > mi), and
  // it must be resident: read at s itself, or in the checkpoint before s (when every step has one).
  bool source_can_rise(int64_t s, int64_t p) const {
    auto fits = [&](const SrcSpan& sp) { return sp.from <= s && (p == mi || sp.next2 >= p); };
    if (K != 1) {
      for (const auto& sp : src_span)
        if (fits(sp)) return true;
      return false;
    }
    for (const auto& sp : src_span)
      if (sp.from == s && fits(sp)) return true;
    const int32_t* vals = ck_vals.data() + s * M;
    for (int32_t q = 0; q < ck_size[s]; ++q) {
      const int32_t k = span_of[in_src[vals[q] >> 1]];
      if (k >= 0 && fits(src_span[k])) return true;
    }
    return false;
  }
  int64_t first_affected() {
    int64_t s = wa;
    if (mi < mj) {
      // the sources u of x that can hold key mi before wa: step from which they do, position of their
      // next reader after x
      src_span.clear();
      int64_t since = kNone;
      for (int64_t e = in_ptr[mx]; e < in_ptr[mx + 1]; ++e) {
        const int32_t u = in_src[e];
        const int64_t k = cidx[e], base = out_ptr[u], len = out_ptr[u + 1] - base;
        int64_t from;
        if (k > 0) from = pos[cons[base + k - 1]];
        else if (u >= n_in) from = pos[u];
        else continue;  // an input first read by x is not resident before mi
        since = std::min(since, from);
        span_of[u] = static_cast<int32_t>(src_span.size());
        src_span.push_back({from, k + 1 < len ? static_cast<int64_t>(pos[cons[base + k + 1]]) : kNone, u});
      }
      if (since < wa) {
        for (int64_t p = mi; p <= mj; ++p)
          for (int32_t id : evicted_at[p]) {
            const Rec& rc = recs[id];
            if (rc.r >= mi && rc.s >= since && rc.s < s && source_can_rise(rc.s, p)) s = rc.s;
          }
      }
      for (const auto& sp : src_span) span_of[sp.u] = -1;
    } else {
      for (int64_t p = mj; p <= mi; ++p)
        for (int32_t id : evicted_at[p]) {
          const Rec& rc = recs[id];
          if (rc.r >= mj && pred_mark[rc.uv]) s = std::min<int64_t>(s, rc.s);
        }
    }
    return s;
  }
  // After an accepted move (window [wa, wb], replayed from last_c), fix the records of the earlier,
  // unchanged decisions that point into the window: a victim's key is recomputed in the new order
  // (same victim, exact); a runner-up key becomes wb, an upper bound of the new best competitor
  // (competitors in the window stay in it), which keeps first_affected conservative.
  std::vector<int32_t> fix_p, fix_r;
  void collect_stale_records() {
    fix_p.clear();
    fix_r.clear();
    for (int64_t q = wa; q <= wb; ++q) {
      auto& v = evicted_at[q];
      for (size_t k = 0; k < v.size();) {
        if (recs[v[k]].s < last_c) {
          fix_p.push_back(v[k]);
          at_erase(v[k]);
        } else {
          ++k;
        }
      }
      auto& w = by_runner[q];
      for (size_t k = 0; k < w.size();) {
        if (recs[w[k]].s < last_c) {
          fix_r.push_back(w[k]);
          runner_erase(w[k]);
        } else {
          ++k;
        }
      }
    }
  }
  void reinsert_stale_records(int64_t new_r) {  // after apply_move: positions are the new ones
    for (int32_t id : fix_p) {
      Rec& rc = recs[id];
      rc.p = static_cast<int32_t>(next_use(rc.uv, rc.s + 1) / n);
      at_push(id);
    }
    for (int32_t id : fix_r) {
      recs[id].r = static_cast<int32_t>(new_r);
      runner_push(id);
    }
  }
  inline void step(int64_t t) {
    cur_t = t;
    const int32_t v = torder(t);
    take_slot();  // partial sum of v
    for (int64_t e = in_ptr[v]; e < in_ptr[v + 1]; ++e) {
      const int32_t u = in_src[e];
      if (!res[u]) {
        take_slot();
        ++io;  // load
        add_res(u, 1);
      }
      int32_t ne;
      const int64_t nu = (mv && v == mx) ? next_use(u, t + 1, ne) : next_from(u, cidx[e] + 1, t, ne);
      if (nu == kNone) {  // last read: store an unstored output, then drop
        if (res[u] == 2 && is_out[u]) ++io;
        del_res(u);
        --cnt;
      } else {
        push_key(u, nu);
        rent[ridx[u]] = (ne << 1) | (res[u] == 2 ? 1 : 0);
      }
    }
    int32_t ne;
    const int64_t nu = next_from(v, 0, t, ne);  // every reader of v comes after it
    if (nu == kNone) {
      if (is_out[v]) ++io;
      --cnt;
    } else {
      add_res(v, 2);
      push_key(v, nu);
      rent.back() = (ne << 1) | 1;
    }
  }
  // Full replay of the current order, rewriting all baseline data. Returns the activation I/O.
  int64_t rebuild() {
    mv = false;
    clear_state();
    for (auto& v : evict_targets) v.clear();
    for (auto& v : evicted_at) v.clear();
    for (auto& v : by_runner) v.clear();
    recs.clear();
    free_recs.clear();
    recording = true;
    int64_t total = 0;
    for (int64_t t = 0; t < nc; ++t) {
      hash[t] = h;
      if (t % K == 0) save_checkpoint(t);
      io = 0;
      step(t);
      step_cost[t] = static_cast<int32_t>(io);
      total += io;
    }
    hash[nc] = h;
    if (nc % K == 0) save_checkpoint(nc);
    recording = false;
    clear_state();
    return total;
  }
  // Cost difference of the move mx: mi -> mj (set up by the caller); kNone when a cap rejects it. The
  // replayed steps' new baseline data are captured for commit_move().
  int64_t evaluate(bool early_stop = true) {
    // Before c every decision is the same under the move, so the checkpointed state is valid.
    const int64_t c = (first_affected() / K) * K;
    last_c = c;
    if (wa - c > max_back) {
      ++skipped_back;
      return kNone;  // too expensive to evaluate: the caller rejects the move unseen
    }
    back_steps += wa - c;
    restore(c);
    capturing = true;
    sc_hash.clear();
    sc_cost.clear();
    sc_ck.clear();
    sc_ck_size.clear();
    sc_recs.clear();
    int64_t trial = 0, base = 0, t = c;
    for (; t < nc; ++t) {
      if (early_stop && t > wb && h == hash[t]) {
        break;  // same state as the baseline at the same step: the rest is identical
      } else if (early_stop && t - wb > max_forward) {
        ++unresolved;  // no convergence within the horizon: reject (the delta is unknown)
        capturing = false;
        clear_state();
        return kNone;
      }
      sc_hash.push_back(h);
      if (t % K == 0) capture_checkpoint();
      io = 0;
      step(t);
      sc_cost.push_back(static_cast<int32_t>(io));
      trial += io;
      base += step_cost[t];
    }
    if (t == nc && nc % K == 0) capture_checkpoint();
    sc_final_h = h;
    replayed_steps += t - c;
    stop_ = t;
    capturing = false;
    clear_state();
    return trial - base;
  }
  void capture_checkpoint() {
    const size_t off = sc_ck.size(), sz = rlist.size();
    sc_ck_size.push_back(static_cast<int32_t>(sz));
    sc_ck.resize(off + sz);
    int32_t* d = sc_ck.data() + off;
    std::copy(rent.begin(), rent.end(), d);
  }
  // Write what the last evaluation captured into the baseline data (before apply_move).
  void commit_move() {
    const int64_t c = last_c, stop = stop_;
    size_t ck = 0, off = 0, q = 0;
    for (int64_t t = c; t < stop; ++t) {
      hash[t] = sc_hash[t - c];
      step_cost[t] = sc_cost[t - c];
      if (t % K == 0) {
        const int64_t k = t / K;
        ck_size[k] = sc_ck_size[ck];
        std::copy(sc_ck.begin() + off, sc_ck.begin() + off + sc_ck_size[ck], ck_vals.begin() + k * M);
        off += sc_ck_size[ck++];
      }
      // Most replayed steps make the same eviction decisions as before: keep those records as they are
      // (re-indexing them would touch per-position lists at far-away, uncached positions).
      size_t q1 = q;
      while (q1 < sc_recs.size() && sc_recs[q1].s == t) ++q1;
      const auto& old = evict_targets[t];
      bool same = old.size() == q1 - q;
      for (size_t k = 0; same && k < old.size(); ++k) {
        const Rec& a = recs[old[k]];
        const Rec& b = sc_recs[q + k];
        same = a.uv == b.uv && a.p == b.p && a.ur == b.ur && a.r == b.r;
      }
      if (!same) {
        forget_evictions(t);
        for (size_t k = q; k < q1; ++k) add_rec(sc_recs[k]);
      }
      q = q1;
    }
    if (stop == nc) {
      hash[nc] = sc_final_h;
      if (nc % K == 0) {
        ck_size[nc / K] = sc_ck_size[ck];
        std::copy(sc_ck.begin() + off, sc_ck.begin() + off + sc_ck_size[ck], ck_vals.begin() + (nc / K) * M);
      }
    }
  }
  int64_t stop_ = 0;

  void set_move(int32_t x, int64_t i, int64_t j) {
    mv = true;
    mx = x;
    mi = i;
    mj = j;
    wa = std::min(i, j);
    wb = std::max(i, j);
    for (int64_t e = in_ptr[x]; e < in_ptr[x + 1]; ++e) {
      pred_mark[in_src[e]] = 1;
      pred_edge[in_src[e]] = static_cast<int32_t>(e);
    }
  }
  void clear_move() {
    for (int64_t e = in_ptr[mx]; e < in_ptr[mx + 1]; ++e) pred_mark[in_src[e]] = 0;
    mv = false;
  }
  void apply_move() {  // order, positions and consumer lists of the moved neuron's sources
    const int32_t x = mx;
    const int64_t i = mi, j = mj;
    clear_move();
    if (i < j) {
      for (int64_t t = i; t < j; ++t) order[t] = order[t + 1];
    } else {
      for (int64_t t = i; t > j; --t) order[t] = order[t - 1];
    }
    order[j] = x;
    for (int64_t t = std::min(i, j); t <= std::max(i, j); ++t) pos[order[t]] = static_cast<int32_t>(t);
    for (int64_t e = in_ptr[x]; e < in_ptr[x + 1]; ++e) {
      int32_t* lo = cons.data() + out_ptr[in_src[e]];
      int32_t* hi = cons.data() + out_ptr[in_src[e] + 1];
      int32_t* at = std::find(lo, hi, x);
      std::copy(at + 1, hi, at);  // remove, then insert by position
      int32_t* ins = std::lower_bound(lo, hi - 1, pos[x], [&](int32_t w, int64_t p) { return pos[w] < p; });
      std::copy_backward(ins, hi - 1, hi);
      *ins = x;
      // entries between the old and the new place of x moved by one: refresh their cursors
      const int32_t u = in_src[e];
      const int64_t k0 = std::min(at, ins) - lo, k1 = std::max(at, ins) - lo;
      for (int64_t k = k0; k <= k1; ++k) {
        const int32_t w = lo[k];
        const int32_t* s0 = in_src.data() + in_ptr[w];
        const int32_t* s1 = in_src.data() + in_ptr[w + 1];
        const int64_t ew = std::lower_bound(s0, s1, u) - in_src.data();
        cidx[ew] = static_cast<int32_t>(k);
        cslot[out_ptr[u] + k].edge = static_cast<int32_t>(ew);
      }
    }
    for (int64_t t = std::min(i, j); t <= std::max(i, j); ++t) {  // every read by a neuron that moved
      const int32_t y = order[t];
      for (int64_t e = in_ptr[y]; e < in_ptr[y + 1]; ++e) cslot[out_ptr[in_src[e]] + cidx[e]].pos = static_cast<int32_t>(t);
    }
  }

  // Legal positions of the neuron at position i: after its last computed source, before its first reader.
  void window(int64_t i, int64_t& lo, int64_t& hi) const {
    const int32_t x = order[i];
    lo = 0;
    hi = nc - 1;
    for (int64_t e = in_ptr[x]; e < in_ptr[x + 1]; ++e)
      if (in_src[e] >= n_in) lo = std::max<int64_t>(lo, pos[in_src[e]] + 1);
    for (int64_t e = out_ptr[x]; e < out_ptr[x + 1]; ++e) hi = std::min<int64_t>(hi, pos[cons[e]] - 1);
  }

  // n_moves proposals at a temperature going geometrically from t_start to t_end. back_cap /
  // forward_cap (-1 = none) bound the replay of one proposal; proposals over a cap are rejected without
  // a cost (they never change the order). Returns int64 [evaluated, accepted, improving,
  // no_legal_move, current cost, best cost, replayed steps, skipped (back cap), unresolved (forward cap),
  // replayed steps before the window].
  at::Tensor run(int64_t n_moves, double t_start, double t_end, int64_t max_shift, int64_t back_cap,
                 int64_t forward_cap) {
    TORCH_CHECK(n_moves >= 0 && max_shift >= 1, "n_moves >= 0 and max_shift >= 1 required");
    int64_t evaluated = 0, accepted = 0, improving = 0, stuck = 0;
    replayed_steps = back_steps = 0;
    skipped_back = unresolved = 0;
    max_back = back_cap < 0 ? kNone : back_cap;
    max_forward = forward_cap < 0 ? kNone : forward_cap;
    const double ratio = (t_start > 0 && t_end > 0 && n_moves > 1) ? std::pow(t_end / t_start, 1.0 / (n_moves - 1)) : 1.0;
    double temp = t_start;
    for (int64_t it = 0; it < n_moves && nc > 1; ++it, temp *= ratio) {
      const int64_t i = rng.below(nc);
      int64_t lo, hi;
      window(i, lo, hi);
      lo = std::max(lo, i - max_shift);
      hi = std::min(hi, i + max_shift);
      if (hi <= lo) {
        ++stuck;
        continue;
      }
      int64_t j = lo + rng.below(hi - lo);  // uniform over [lo, hi] without i
      if (j >= i) ++j;
      set_move(order[i], i, j);
      const int64_t delta = evaluate();
      if (delta == kNone) {
        clear_move();
        continue;
      }
      ++evaluated;
      bool take = delta <= 0;
      if (!take && temp > 0) take = rng.uniform() < std::exp(-static_cast<double>(delta) / temp);
      if (take) {
        commit_move();
        const int64_t old_wb = wb;
        collect_stale_records();
        apply_move();
        reinsert_stale_records(old_wb);
        cur_cost += delta;
        ++accepted;
        if (delta < 0) ++improving;
      } else {
        clear_move();
      }
    }
    if (cur_cost < best_cost_) {
      best_cost_ = cur_cost;
      best_order_ = order;
    }
    max_back = max_forward = kNone;
    auto out = at::empty({10}, at::kLong);
    auto* o = out.data_ptr<int64_t>();
    o[0] = evaluated;
    o[1] = accepted;
    o[2] = improving;
    o[3] = stuck;
    o[4] = cur_cost;
    o[5] = best_cost_;
    o[6] = replayed_steps;
    o[7] = skipped_back;
    o[8] = unresolved;
    o[9] = back_steps;
    return out;
  }
  // Cost deltas of random legal moves, without applying them (to calibrate the temperature).
  at::Tensor sample_deltas(int64_t count, int64_t max_shift) {
    std::vector<int64_t> d;
    for (int64_t tries = 0; tries < 20 * count && static_cast<int64_t>(d.size()) < count && nc > 1; ++tries) {
      const int64_t i = rng.below(nc);
      int64_t lo, hi;
      window(i, lo, hi);
      lo = std::max(lo, i - max_shift);
      hi = std::min(hi, i + max_shift);
      if (hi <= lo) continue;
      int64_t j = lo + rng.below(hi - lo);
      if (j >= i) ++j;
      set_move(order[i], i, j);
      const int64_t delta = evaluate();
      if (delta != kNone) d.push_back(delta);
      clear_move();
    }
    auto out = at::empty({static_cast<int64_t>(d.size())}, at::kLong);
    std::copy(d.begin(), d.end(), out.data_ptr<int64_t>());
    return out;
  }
  // Exact cost change of moving the neuron at position i to position j (must be legal); not applied.
  int64_t delta_of(int64_t i, int64_t j, bool early_stop) {
    TORCH_CHECK(i >= 0 && i < nc && j >= 0 && j < nc && i != j, "positions out of range");
    int64_t lo, hi;
    window(i, lo, hi);
    TORCH_CHECK(j >= lo && j <= hi, "moving position ", i, " to ", j, " breaks the topological order");
    set_move(order[i], i, j);
    const int64_t d = evaluate(early_stop);
    clear_move();
    return d;
  }
  at::Tensor get_order() const { return vec_tensor(order); }
  at::Tensor best_order() const { return vec_tensor(best_order_); }
  int64_t cost() const { return cur_cost; }
  int64_t best_cost() const { return best_cost_; }
  int64_t checkpoint_interval() const { return K; }
  // From-scratch replay of the current order (also resynchronises the baseline data): for tests.
  int64_t full_cost() { return rebuild(); }

  static at::Tensor vec_tensor(const std::vector<int32_t>& v) {
    auto out = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
    auto* o = out.data_ptr<int64_t>();
    for (size_t k = 0; k < v.size(); ++k) o[k] = v[k];
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(iosparse, m) {
  m.class_<Annealer>("Annealer")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, at::Tensor, int64_t, int64_t>())
      .def("run", &Annealer::run)
      .def("sample_deltas", &Annealer::sample_deltas)
      .def("delta_of", &Annealer::delta_of)
      .def("order", &Annealer::get_order)
      .def("best_order", &Annealer::best_order)
      .def("cost", &Annealer::cost)
      .def("best_cost", &Annealer::best_cost)
      .def("checkpoint_interval", &Annealer::checkpoint_interval)
      .def("full_cost", &Annealer::full_cost);
}

}  // namespace iosparse
