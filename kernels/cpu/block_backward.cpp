// The backward pass through the block layout (block.cpp): the training counterpart of the block path, used by
// iosparse::dag_backward (op.cpp) wherever the forward's block buffers exist.
//
// Per batch tile of BT columns: the forward is recomputed by the block path's own chunks, keeping every
// value (vals) and pre-activation (pre) of the tile; then the chunks run in reverse level order. A chunk
// first turns its rows' gradients g_v into dz_v = g_v * act'(z_v) (bias gradient: the sum of dz_v), then
// walks its segments in block order: per edge u -> v, the weight gradient <dz_v, a_u> (a sampled product,
// SDDMM) and the input gradient g_u += w dz_v. Both touch only the segment's source block, so a level's
// sources stay in L1 / L2 the way they do in the forward. The weight gradients accumulate in block order
// (beside the block-ordered weights) and are scattered to edge order once at the end.
// The tiles run in parallel, one job per thread, each with private gradient accumulators.
#include "cpu/ordered_weights.h"
#include "cpu/paths.h"
#include "cpu/tile.h"
#include "cpu/variants.h"

namespace iosparse {

namespace {

// The sum of a vector's lanes as a tree of half-width additions (a serial sum would be a chain of
// dependent scalar additions per edge).
template <typename T, int VB>
__attribute__((always_inline)) inline T horizontal_sum(const typename Vec<T, VB>::type& v) {
  if constexpr (VB == 2 * int(sizeof(T))) {
    return v[0] + v[1];
  } else {
    using H = typename Vec<T, VB / 2>::type;
    H lo, hi;
    std::memcpy(&lo, &v, VB / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + VB / 2, VB / 2);
    return horizontal_sum<T, VB / 2>(lo + hi);
  }
}

template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void block_backward_chunk_body(const Net& net, int64_t c, int64_t nb,
                                                                     const T* __restrict pw,
                                                                     const T* __restrict vals,
                                                                     const T* __restrict pre, T* __restrict G,
                                                                     T* __restrict gw_ordered, T* __restrict gb) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  const V zero = V{}, one = V{} + T(1);
  const int64_t r0 = net.block_chunk_row[c], r1 = net.block_chunk_row[c + 1];
  for (int64_t q = r0; q < r1; ++q) {
    const int64_t v = net.level_neuron[q];
    V* g = reinterpret_cast<V*>(G + v * BT);
    const V* z = reinterpret_cast<const V*>(pre + v * BT);
    const int8_t ac = net.act_code[v];
    const T lo = T(net.act_param[2 * v]), hi = T(net.act_param[2 * v + 1]);
    // g * act'(z) as a product, not a select: a NaN gradient stays NaN where act' is 0 (as in the reference).
    if (ac == ACT_RELU) {
      for (int j = 0; j < NV; ++j) g[j] *= z[j] > zero ? one : zero;
    } else if (ac == ACT_HARDTANH) {
      const V lov = V{} + lo, hiv = V{} + hi;
      for (int j = 0; j < NV; ++j) g[j] *= (z[j] > lov) & (z[j] < hiv) ? one : zero;
    } else if (ac != ACT_IDENTITY) {
      T* gs = G + v * BT;
      const T* zs = pre + v * BT;
      for (int64_t i = 0; i < BT; ++i) gs[i] *= act_grad_scalar<T>(ac, zs[i], lo, hi);
    }
    // Columns past the batch: zero, so they add nothing to the weight and bias gradients.
    for (int64_t i = nb; i < BT; ++i) G[v * BT + i] = T(0);
    V s = g[0];
    for (int j = 1; j < NV; ++j) s += g[j];
    gb[v] += horizontal_sum<T, VB>(s);
  }
  const uint8_t* __restrict local = net.block_local;
  int64_t k = net.block_chunk_edge[c];
  const int64_t k_end = net.block_chunk_edge[c + 1];
  for (int64_t sg = net.block_chunk_seg[c]; sg < net.block_chunk_seg[c + 1]; ++sg) {
    const int32_t* seg = net.block_seg + 3 * sg;
    if (!block_segment_ok(net, seg, k_end - k)) {
      net.flag_corrupt();
      return;
    }
    V dz[NV];
    for (int j = 0; j < NV; ++j) dz[j] = reinterpret_cast<const V*>(G + int64_t(seg[0]) * BT)[j];
    const T* ab = vals + int64_t(seg[1]) * BT;
    T* gblock = G + int64_t(seg[1]) * BT;
    const int64_t end = k + seg[2];
    for (int64_t kk = k; kk < end; ++kk) {
      const int64_t off = int64_t(local[kk]) * BT;
      const V* a = reinterpret_cast<const V*>(ab + off);
      V* gu = reinterpret_cast<V*>(gblock + off);
      const T wk = pw[kk];
      V acc0 = dz[0] * a[0], acc1 = V{};
      for (int j = 1; j < NV; ++j) {
        if (j & 1) acc1 += dz[j] * a[j];
        else acc0 += dz[j] * a[j];
      }
      for (int j = 0; j < NV; ++j) gu[j] += wk * dz[j];
      gw_ordered[kk] += horizontal_sum<T, VB>(acc0 + acc1);
    }
    k = end;
  }
}

// The per-ISA builds of a chunk (variants.h).
#if IOSPARSE_X86
template <typename T, int NV>
IOSPARSE_TARGET_AVX512 void block_backward_chunk_avx512(const Net& net, int64_t c, int64_t nb, const T* pw,
                                                        const T* vals, const T* pre, T* G, T* gw_ordered, T* gb) {
  block_backward_chunk_body<T, NV, 64>(net, c, nb, pw, vals, pre, G, gw_ordered, gb);
}
template <typename T, int NV>
IOSPARSE_TARGET_AVX2 void block_backward_chunk_avx2(const Net& net, int64_t c, int64_t nb, const T* pw,
                                                    const T* vals, const T* pre, T* G, T* gw_ordered, T* gb) {
  block_backward_chunk_body<T, 2 * NV, 32>(net, c, nb, pw, vals, pre, G, gw_ordered, gb);
}
#endif
template <typename T, int NV>
void block_backward_chunk_generic(const Net& net, int64_t c, int64_t nb, const T* pw, const T* vals, const T* pre,
                                  T* G, T* gw_ordered, T* gb) {
  block_backward_chunk_body<T, 4 * NV, 16>(net, c, nb, pw, vals, pre, G, gw_ordered, gb);
}

}  // namespace

template <typename T>
TileVariants<BlockBackwardFn<T>> block_backward_variants() {
  return IOSPARSE_TILE_VARIANTS(block_backward_chunk, T, IOSPARSE_TILES_TO_4);
}

template <typename T>
void block_backward(const Net& net, const T* x, const T* gy, int64_t B, const T* w, const T* b, T* gx, T* gw, T* gb,
                    const at::Tensor& weight_t, const at::Tensor& block_edge_t) {
  TORCH_CHECK_VALUE(net.n_block_chunks > 0, "iosparse: the block backward needs source blocks (ops.prepare builds them)");
  const int64_t C = net.n_block_chunks, n = net.n_neurons, n_in = net.n_inputs, n_out = net.n_outputs;
  OrderedWeights<T> ow(weight_t, block_edge_t, 3);
  const int64_t n_pw = ow.slices();
  at::parallel_for(0, n_pw, 1, [&](int64_t s, int64_t e) {
    for (int64_t c = s; c < e; ++c) ow.fill_slice(net, w, c);
  });
  const T* pw = ow.pw;
  // The widest tile (1, 2 or 4 64-byte vectors per value) that still gives every thread a tile.
  const int64_t lanes = int64_t(64 / sizeof(T));
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  int nv = 4;
  while (nv > 1 && (B + nv * lanes - 1) / (nv * lanes) < threads) nv /= 2;
  // IOSPARSE_BACKWARD_TILE=1|2|4 caps the tile (in 64-byte vectors per value): measurements and tests.
  static const int64_t cap = env_int("IOSPARSE_BACKWARD_TILE", 4);
  while (nv > 1 && nv > cap) nv /= 2;
  const int64_t BT = nv * lanes, n_tiles = (B + BT - 1) / BT;
  const int64_t jobs = std::max<int64_t>(1, std::min(threads, n_tiles));
  const Isa isa = detect_isa();
  const BlockFn<T> forward_chunk = select_variant(&VariantTable<T>::block, isa, nv);
  const BlockBackwardFn<T> backward_chunk = select_variant(&VariantTable<T>::block_backward, isa, nv);
  const int64_t E = ow.E, rows = checked_mul(n + BLOCK_PAD_ROWS, BT);
  std::vector<std::unique_ptr<T, AlignedFree>> gw_part(jobs), gb_part(jobs);
  at::parallel_for(0, jobs, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      gw_part[j] = aligned_buffer<T>(E);
      gb_part[j] = aligned_buffer<T>(n);
      T* gwo = gw_part[j].get();
      T* gbp = gb_part[j].get();
      std::fill(gwo, gwo + E, T(0));
      std::fill(gbp, gbp + n, T(0));
      auto vals_buf = aligned_buffer<T>(rows), pre_buf = aligned_buffer<T>(rows), g_buf = aligned_buffer<T>(rows);
      T* vals = vals_buf.get();
      T* pre = pre_buf.get();
      T* G = g_buf.get();
      if (poison_enabled()) {
        poison(vals, rows);
        poison(pre, rows);
      }
      for (int64_t t = j; t < n_tiles; t += jobs) {
        const int64_t b0 = t * BT, nb = std::min(BT, B - b0);
        transpose_in<T>(x + b0 * n_in, n_in, nb, BT, vals, same_row);
        for (int64_t k = 0; k < C; ++k) forward_chunk(net, k, pw, b, vals, pre);
        // Values of the padding columns (zero inputs) are finite only for finite weights: zeroed, so that
        // 0 * inf never reaches a weight gradient.
        if (nb < BT)
          for (int64_t v = 0; v < n; ++v) std::fill(vals + v * BT + nb, vals + (v + 1) * BT, T(0));
        std::fill(G, G + rows, T(0));
        for (int64_t c = 0; c < nb; ++c)
          for (int64_t o = 0; o < n_out; ++o) G[net.outputs[o] * BT + c] += gy[(b0 + c) * n_out + o];
        for (int64_t k = C - 1; k >= 0; --k) backward_chunk(net, k, nb, pw, vals, pre, G, gwo, gbp);
        for (int64_t c = 0; c < nb; ++c)
          for (int64_t i = 0; i < n_in; ++i) gx[(b0 + c) * n_in + i] = G[i * BT + c];
      }
    }
  });
  ow.remember(net, weight_t, block_edge_t);
  for (int64_t v = 0; v < n; ++v)
    for (int64_t j = 0; j < jobs; ++j) gb[v] += gb_part[j].get()[v];
  // The weight gradients back to edge order (the block order is a permutation of the edges).
  std::atomic<bool> bad{false};
  at::parallel_for(0, E, OrderedWeights<T>::SLICE, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t e = ow.order[k];
      if (uint64_t(e) >= uint64_t(net.n_edges)) {
        bad.store(true, std::memory_order_relaxed);
        continue;
      }
      T s = 0;
      for (int64_t j = 0; j < jobs; ++j) s += gw_part[j].get()[k];
      gw[e] += s;
    }
  });
  if (bad.load()) net.flag_corrupt();
}

template TileVariants<BlockBackwardFn<float>> block_backward_variants<float>();
template TileVariants<BlockBackwardFn<double>> block_backward_variants<double>();
template void block_backward<float>(const Net&, const float*, const float*, int64_t, const float*, const float*,
                                    float*, float*, float*, const at::Tensor&, const at::Tensor&);
template void block_backward<double>(const Net&, const double*, const double*, int64_t, const double*,
                                     const double*, double*, double*, double*, const at::Tensor&, const at::Tensor&);

}  // namespace iosparse
