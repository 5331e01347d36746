// The block path: level by level like the level path, but each neuron's edges are visited one source
// block at a time (see block_chunk_body): sparse x dense products with little source sharing (pruned MLPs)
// at batch >= 16.
#include "cpu/ordered_weights.h"
#include "cpu/paths.h"
#include "cpu/tile.h"
#include "cpu/variants.h"

namespace iosparse {

namespace {


// Level by level like the level path, but each neuron's edges are visited one source block at a time: a
// block is up to 256 consecutive neurons (hardware.block_sources) whose values for a tile of BT columns stay in
// L1/L2 while every row of the chunk that reads the block accumulates its edges from it. build_blocks lays
// out, per chunk of a level's rows, the segments (row, block start, edge count) block-major, and per edge
// the source's one-byte offset in its block. Without the blocking a pruned 4096-wide MLP layer at B = 64
// reads each edge's 256-byte source vector from anywhere in 1 MiB of values (measured 6.0 ms per
// 10 %-dense layer against 3.4-3.8 ms blocked, docs/cpu-kernel.md "Block path"); the inner loop is then
// close to the FMA rate of a core (one 64-column edge = four 16-lane FMAs).
// Weights stream in block order (a cached copy, OrderedWeights). vals[n_neurons][BT] per column tile;
// the chunks of a level run in parallel; rows start at their bias and are finished (activation) once all
// their segments are done. `pre` (training, block_backward.cpp): where the rows' pre-activations are kept
// (same layout as vals), or nullptr.
template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void block_chunk_body(const Net& net, int64_t c, const T* __restrict pw,
                                                            const T* __restrict b, T* __restrict vals,
                                                            T* __restrict pre) {
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
    if (!block_segment_ok(net, seg, k_end - k)) {
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
    if (pre) std::copy(vals + v * BT, vals + (v + 1) * BT, pre + v * BT);
    finish_vec<T, NV, VB>(net, v, y, y);
  }
}
// The per-ISA builds of a chunk (variants.h).
#if IOSPARSE_X86
template <typename T, int NV>
IOSPARSE_TARGET_AVX512 void block_chunk_avx512(const Net& net, int64_t c, const T* pw, const T* b, T* vals, T* pre) {
  block_chunk_body<T, NV, 64>(net, c, pw, b, vals, pre);
}
template <typename T, int NV>
IOSPARSE_TARGET_AVX2 void block_chunk_avx2(const Net& net, int64_t c, const T* pw, const T* b, T* vals, T* pre) {
  block_chunk_body<T, 2 * NV, 32>(net, c, pw, b, vals, pre);
}
#endif
template <typename T, int NV>
void block_chunk_generic(const Net& net, int64_t c, const T* pw, const T* b, T* vals, T* pre) {
  block_chunk_body<T, 4 * NV, 16>(net, c, pw, b, vals, pre);
}

}  // namespace

template <typename T>
TileVariants<BlockFn<T>> block_variants() {
  return IOSPARSE_TILE_VARIANTS(block_chunk, T, IOSPARSE_TILES_TO_4);
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
  // is 64 KiB, see hardware.block_sources).
  const int64_t lanes = int64_t(64 / sizeof(T));
  const int nv = B > 2 * lanes ? 4 : B > lanes ? 2 : 1;
  const BlockFn<T> fn = select_variant(&VariantTable<T>::block, detect_isa(), nv);
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
      for (int64_t k = 0; k < C; ++k) fn(net, k, pw, b, vals, nullptr);
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
        fn(net, c - pre, pw, b, vals, nullptr);
      }
    });
    gather_out<T>(vals, net.outputs, n_out, nb, BT, y + b0 * n_out, same_row);
  }
  ow.remember(net, weight_t, block_edge_t);
}

template TileVariants<BlockFn<float>> block_variants<float>();
template TileVariants<BlockFn<double>> block_variants<double>();
template void block_forward<float>(const Net&, const float*, int64_t, const float*, const float*, float*,
                                   const at::Tensor&, const at::Tensor&);
template void block_forward<double>(const Net&, const double*, int64_t, const double*, const double*, double*,
                                    const at::Tensor&, const at::Tensor&);

}  // namespace iosparse
