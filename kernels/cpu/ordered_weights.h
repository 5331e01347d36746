// The cache of weights gathered into a path's own order (panel cells, block positions), shared by the
// panel and block paths (panel.cpp, block.cpp). Its state lives in ordered_weights.cpp, once.
#pragma once
#include "cpu/net.h"

namespace iosparse {

// Weights in a path's own order (panel cells, block positions) cached across calls: the gather is a full
// pass over the edges (~15 % of a radix N=65536 B=256 panel call, more at small batch). An entry is valid
// for one weight tensor at one value of its version counter, which every in-place update through PyTorch
// bumps (optimizer steps, add_, copy_ under no_grad, load_state_dict); the entry holds a reference to the
// weight and to the order tensor, so their memory cannot be freed and reused by another tensor at the same
// address while the entry lives.
// Writes that bypass the version counter (through `.data`, numpy views, raw pointers) are NOT seen:
// IOSPARSE_PANEL_WEIGHT_CACHE=0 (read per call) or iosparse::clear_panel_weight_cache() handle those.
// Inference tensors have no version counter and are never cached.
//
// The ordered weights of one call: from the cache (hit), or a buffer the caller fills with fill_slice (in
// parallel chunks) and then hands to remember(). Defined in ordered_weights.cpp for float and double.
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

  OrderedWeights(const at::Tensor& weight_t, const at::Tensor& order_t, int scratch_slot);
  int64_t slices() const { return hit ? 0 : (E + SLICE - 1) / SLICE; }
  void fill_slice(const Net& net, const T* w, int64_t c);
  // After a miss, once the buffer is filled: keep it for the next call (evicting the least recent entry).
  void remember(const Net& net, const at::Tensor& weight_t, const at::Tensor& order_t);
};

// Registered as iosparse::clear_panel_weight_cache / panel_weight_cache_size (op.cpp).
void clear_panel_weight_cache();
int64_t panel_weight_cache_size();
// In a fork() child (runtime.cpp's fork hook): a fresh, empty cache; the parent's objects are leaked.
void reset_ordered_weight_cache_in_child();

}  // namespace iosparse
