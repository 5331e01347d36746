// The panel path: layer-by-layer SpMM with register blocking across outputs. A panel computes R (1..8)
// neurons of one level together over the union of their sources (ops.prepare / build_panels groups neurons
// that share sources, e.g. the sliding windows of RadiX-Net layers): each source vector of the tile is
// loaded once and multiplied into R accumulator sets, with a zero weight where the source does not feed a
// row. Panels that follow each other share most sources, so those come from L1. Values: vals[n_neurons][BT]
// per tile. This path does not follow the plan's slot schedule (every value of the tile lives in one buffer).
#include "cpu/ordered_weights.h"
#include "cpu/paths.h"
#include "cpu/tile.h"
#include "cpu/variants.h"

namespace iosparse {

namespace {

// Row of neuron v in the tile buffer. Layers like RadiX-Net's read sources 32 or 1024 rows apart: with a
// plain v * BT layout those rows fall into one or two cache sets (power-of-two strides) and evict each
// other. One padding row every 16 rows and another every 1024 spread such strides over the sets.
inline int64_t panel_row(int64_t v) { return v + (v >> 4) + (v >> 10); }
constexpr int64_t PANEL_PREFETCH = 120;

template <typename T, int NV, int VB, int R>
__attribute__((always_inline)) inline void panel_run(const Net& net, int64_t p, const T* __restrict pw,
                                                     const RowParams<T>* __restrict rows, T* __restrict vals) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  const int64_t u0 = net.panel_ptr[p], u1 = net.panel_ptr[p + 1];
  const T* wp = pw + net.panel_edge_ptr[p];
  const int32_t* src = net.panel_src_row;
  // Panels two ahead write scattered rows (permuted layers): fetch those for writing now.
  const int64_t row_end = net.panel_row_ptr[p] + 2 * R;
  for (int r = 0; r < R && row_end + r < net.n_computed; ++r)
    __builtin_prefetch(vals + int64_t(rows[row_end + r].row) * BT, 1);
  const RowParams<T>* rp = rows + net.panel_row_ptr[p];
  // Sources PANEL_PREFETCH columns ahead (into the next panels) are prefetched: most come from L1 (shared
  // with the previous panel), the new ones from L2/L3 at rows the hardware prefetcher cannot guess.
  const int64_t last = net.panel_ptr[net.n_panels] - 1;
  // R rows x NV vectors may not fit the registers (AVX2: 8 rows x 2 vectors already fill them): the tile
  // is done in strips of S vectors, the panel's sources and weights read again per strip (from L1).
  constexpr int S = register_strip(NV, R, VB);
  for (int j0 = 0; j0 < NV; j0 += S) {
    V acc[R][S];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < S; ++j) acc[r][j] = V{} + rp[r].bias;
    const T* wu = wp;
    for (int64_t u = u0; u < u1; ++u, wu += R) {
      if (j0 == 0) __builtin_prefetch(vals + int64_t(src[std::min(u + PANEL_PREFETCH, last)]) * BT);
      const V* s = reinterpret_cast<const V*>(vals + int64_t(src[u]) * BT) + j0;
      for (int j = 0; j < S; ++j) {
        const V sv = s[j];
        for (int r = 0; r < R; ++r) acc[r][j] += wu[r] * sv;
      }
    }
    for (int r = 0; r < R; ++r)
      finish_vec_with<T, S, VB>(int8_t(rp[r].code), rp[r].lo, rp[r].hi, acc[r],
                                reinterpret_cast<V*>(vals + int64_t(rp[r].row) * BT) + j0);
  }
}

template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void panel_tile_body(const Net& net, const T* __restrict pw,
                                                           const RowParams<T>* __restrict rows, T* __restrict vals) {
  for (int64_t p = 0; p < net.n_panels; ++p) {
    switch (net.panel_row_ptr[p + 1] - net.panel_row_ptr[p]) {
      case 1: panel_run<T, NV, VB, 1>(net, p, pw, rows, vals); break;
      case 2: panel_run<T, NV, VB, 2>(net, p, pw, rows, vals); break;
      case 3: panel_run<T, NV, VB, 3>(net, p, pw, rows, vals); break;
      case 4: panel_run<T, NV, VB, 4>(net, p, pw, rows, vals); break;
      case 5: panel_run<T, NV, VB, 5>(net, p, pw, rows, vals); break;
      case 6: panel_run<T, NV, VB, 6>(net, p, pw, rows, vals); break;
      case 7: panel_run<T, NV, VB, 7>(net, p, pw, rows, vals); break;
      default: panel_run<T, NV, VB, 8>(net, p, pw, rows, vals); break;
    }
  }
}
// The per-ISA builds of the tile (variants.h).
#if IOSPARSE_X86
template <typename T, int NV>
IOSPARSE_TARGET_AVX512 void panel_tile_avx512(const Net& net, const T* pw, const RowParams<T>* rows, T* vals) {
  panel_tile_body<T, NV, 64>(net, pw, rows, vals);
}
template <typename T, int NV>
IOSPARSE_TARGET_AVX2 void panel_tile_avx2(const Net& net, const T* pw, const RowParams<T>* rows, T* vals) {
  panel_tile_body<T, 2 * NV, 32>(net, pw, rows, vals);
}
#endif
template <typename T, int NV>
void panel_tile_generic(const Net& net, const T* pw, const RowParams<T>* rows, T* vals) {
  panel_tile_body<T, 4 * NV, 16>(net, pw, rows, vals);
}

}  // namespace

template <typename T>
TileVariants<PanelFn<T>> panel_variants() {
  return IOSPARSE_TILE_VARIANTS(panel_tile, T, IOSPARSE_TILES_TO_4);
}

template <typename T>
void panel_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y, const at::Tensor& weight_t,
                   const at::Tensor& panel_edge_t) {
  TORCH_CHECK_VALUE(net.n_panels > 0, "iosparse: the panel strategy needs panels (ops.prepare builds them)");
  // Weights in panel order, zeros where a source does not feed a row: from the cache when this weight
  // tensor at this version was gathered before, else one pass over the edges (filled by the job below and
  // then put into the cache).
  OrderedWeights<T> ow(weight_t, panel_edge_t, 3);
  const T* pw = ow.pw;
  // Tile-buffer row of every neuron. Layered nets (every edge joins consecutive levels, outputs on the
  // last; checked in validate_indices) need two levels at a time: even and odd levels share two
  // ping-pong halves, so a tile's working set stays 2 x width rows instead of the whole network (at radix
  // N=65536 L=4: 17 MiB instead of 45 MiB per thread). Other DAGs keep one row per neuron.
  int32_t* row_of = scratch<int32_t>(0, net.n_neurons);
  int64_t tile_rows;
  if (net.layered) {
    int64_t width = net.n_inputs;
    for (int64_t l = 0; l < net.n_levels; ++l) width = std::max(width, net.level_ptr[l + 1] - net.level_ptr[l]);
    const int64_t half = panel_row(width - 1) + 1 + 8;  // +8 rows: the halves start in different cache sets
    for (int64_t i = 0; i < net.n_inputs; ++i) row_of[i] = int32_t(panel_row(i));
    for (int64_t l = 0; l < net.n_levels; ++l)
      for (int64_t q = net.level_ptr[l]; q < net.level_ptr[l + 1]; ++q)
        row_of[net.level_neuron[q]] = int32_t(((l + 1) & 1) * half + panel_row(q - net.level_ptr[l]));
    tile_rows = 2 * half;
  } else {
    for (int64_t v = 0; v < net.n_neurons; ++v) row_of[v] = int32_t(panel_row(v));
    tile_rows = panel_row(net.n_neurons - 1) + 1;
  }
  TORCH_CHECK(tile_rows < (int64_t(1) << 31), "iosparse: panel path: network too large");
  // Per call: the tile row of every panel column's source and the row parameters in panel order, filled
  // by slices of the job below (serial, they were ~4 ms of a 75 ms call at N=65536 on 2 threads).
  const int64_t n_src = net.panel_ptr[net.n_panels];
  int32_t* src_row = scratch<int32_t>(1, n_src);
  Net pnet = net;
  pnet.panel_src_row = src_row;
  RowParams<T>* rows = scratch<RowParams<T>>(4, net.n_computed);  // not slot 0: row_of lives there
  auto row_fn = [row_of](int64_t v) { return int64_t(row_of[v]); };
  // One or two 64-byte vectors per value: R <= 8 rows x NV vectors of accumulators stay in registers.
  const int64_t lanes = int64_t(64 / sizeof(T));
  int nv = net.panel_tile >= 4 * lanes ? 4 : net.panel_tile >= 2 * lanes ? 2 : 1;
  const int64_t threads = at::get_num_threads();
  while (nv > 1 && (nv / 2) * lanes >= B) nv /= 2;
  while (nv > 1 && (B + nv * lanes - 1) / (nv * lanes) < threads) nv /= 2;
  const PanelFn<T> fn = select_variant(&VariantTable<T>::panel, detect_isa(), nv);
  const int64_t BT = nv * lanes;
  const int64_t n_tiles = (B + BT - 1) / BT;
  const int64_t n_in = net.n_inputs, n_out = net.n_outputs;
  // One job (see program_forward): first the weight slices (after a cache miss) and the slices of the
  // per-call tables, then the tiles, which start once every slice is done.
  constexpr int64_t SETUP_CHUNK = 1 << 18;
  const int64_t n_pw = ow.slices();
  const int64_t n_src_slices = (n_src + SETUP_CHUNK - 1) / SETUP_CHUNK;
  const int64_t pre = n_pw + n_src_slices + (net.n_computed + SETUP_CHUNK - 1) / SETUP_CHUNK;
  std::vector<int64_t> wait_for(pre + n_tiles, 0);
  std::fill(wait_for.begin() + pre, wait_for.end(), pre);
  run_chunked(pre + n_tiles, wait_for.data(), [&](int64_t c) {
    if (c < n_pw) {
      ow.fill_slice(net, w, c);
      return;
    }
    if (c < n_pw + n_src_slices) {
      const int64_t u0 = (c - n_pw) * SETUP_CHUNK, u1 = std::min(n_src, u0 + SETUP_CHUNK);
      uint32_t bad = 0;
      for (int64_t u = u0; u < u1; ++u) src_row[u] = row_of[guarded(net.panel_src[u], uint32_t(net.n_neurons), bad)];
      if (bad) net.flag_corrupt();
      return;
    }
    if (c < pre) {
      const int64_t r0 = (c - n_pw - n_src_slices) * SETUP_CHUNK, r1 = std::min(net.n_computed, r0 + SETUP_CHUNK);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t v = net.panel_target[r];
        if (v < net.n_inputs || v >= net.n_neurons) {  // guarded: an input row is never a panel's target
          net.flag_corrupt();
          v = net.n_inputs;
        }
        rows[r] = RowParams<T>{b[v], T(net.act_param[2 * v]), T(net.act_param[2 * v + 1]),
                               int32_t(net.act_code[v]), row_of[v]};
      }
      return;
    }
    T* vals = scratch<T>(2, checked_mul(tile_rows, BT));
    if (poison_enabled()) poison(vals, tile_rows * BT);
    const int64_t t = c - pre, b0 = t * BT, nb = std::min(BT, B - b0);
    transpose_in<T>(x + b0 * n_in, n_in, nb, BT, vals, row_fn);
    fn(pnet, pw, rows, vals);
    gather_out<T>(vals, net.outputs, n_out, nb, BT, y + b0 * n_out, row_fn);
  });
  ow.remember(net, weight_t, panel_edge_t);
}

template TileVariants<PanelFn<float>> panel_variants<float>();
template TileVariants<PanelFn<double>> panel_variants<double>();
template void panel_forward<float>(const Net&, const float*, int64_t, const float*, const float*, float*,
                                   const at::Tensor&, const at::Tensor&);
template void panel_forward<double>(const Net&, const double*, int64_t, const double*, const double*, double*,
                                    const at::Tensor&, const at::Tensor&);

}  // namespace iosparse
