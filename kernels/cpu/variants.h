// The one table of per-ISA kernel variants of the CPU paths, and the one place that selects among them.
//
// Every vectorised path keeps its arithmetic in an always_inline body templated on the vector width
// (program_tile_body, panel_tile_body, block_chunk_body in program.cpp / panel.cpp / block.cpp) and
// compiles it once per ISA through thin wrappers: NAME_avx512 (target IOSPARSE_TARGET_AVX512, 64-byte
// vectors), NAME_avx2 (target IOSPARSE_TARGET_AVX2, 32-byte vectors) and NAME_generic (baseline flags,
// 16-byte vectors: SSE2 on x86-64, NEON on aarch64), each templated on the tile width NV in 64-byte units.
// Each path exports its row of the table (program_variants<T>() ...), filled by IOSPARSE_TILE_VARIANTS,
// which spells the ISA x width grid once; variant_table<T>() (variants.cpp) holds the rows of every path;
// select_variant() picks an entry from detect_isa() and the tile width. The level path's variants are not
// tile widths but batch-width rows (LevelVariants, level.cpp).
//
// Adding a path: write its body and the three wrappers, export NAME_variants<T>() with
// IOSPARSE_TILE_VARIANTS, add a member to VariantTable and fill it in variants.cpp. Adding an ISA: a new
// Isa value (before ISA_COUNT), a target macro, a column in IOSPARSE_TILE_VARIANTS (and the level rows),
// a wrapper per path, and its detection in detect_isa().
#pragma once
#include "cpu/net.h"

namespace iosparse {

// Ordered: a variant may be chosen on any machine whose detected ISA is at least its own.
enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_COUNT };
// The best ISA of this CPU, decided once per process; IOSPARSE_ISA=generic|avx2 forces a narrower one
// (tests use it). Always ISA_GENERIC on non-x86 builds.
Isa detect_isa();
const char* isa_name(Isa isa);

#if IOSPARSE_X86
#define IOSPARSE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma,avx2")))
#define IOSPARSE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

// Bias and activation of each panel row, gathered once per call in panel order (per tile they would be
// scattered reads, one per neuron).
template <typename T>
struct RowParams {
  T bias, lo, hi;
  int32_t code, row;  // activation; tile-buffer row the neuron is written to
};

// One tile of the program path: the whole program over BT columns (slots and slow rows of BT values).
template <typename T>
using ProgramFn = void (*)(const Net& net, const T* w, const T* b, T* slots, T* slow);
// One tile of the panel path: every panel over BT columns of vals.
template <typename T>
using PanelFn = void (*)(const Net& net, const T* pw, const RowParams<T>* rows, T* vals);
// One chunk of the block path over BT columns of vals (pre: where to keep the pre-activations, or nullptr).
template <typename T>
using BlockFn = void (*)(const Net& net, int64_t chunk, const T* pw, const T* b, T* vals, T* pre);
// The block path's backward of one chunk over BT columns of which the first nb hold the batch
// (block_backward.cpp): the chunk's rows' dz = g * act'(z) into G, their bias gradients, then per edge (block
// order) gw_ordered += <dz, a_u>, g_u += w dz.
template <typename T>
using BlockBackwardFn = void (*)(const Net& net, int64_t chunk, int64_t nb, const T* pw, const T* vals, const T* pre,
                                 T* G, T* gw_ordered, T* gb);

// Tile widths of the tiled paths: nv 64-byte vectors per value, nv = 1 << index.
constexpr int TILE_WIDTHS = 4;  // nv = 1, 2, 4, 8
constexpr int tile_index(int nv) { return nv == 8 ? 3 : nv == 4 ? 2 : nv == 2 ? 1 : 0; }

// A tiled path's variants: fn[isa][tile_index(nv)], nullptr where the path is not built for that width
// (or that ISA, on non-x86 builds).
template <typename Fn>
struct TileVariants {
  Fn fn[ISA_COUNT][TILE_WIDTHS];
};

// The level path's per-ISA functions (level.cpp): a batch-1 dot product, masked-vector rows for small
// batches (row[i] computes a neuron for 2 <= B <= row_max_batch[i], ascending; at most LEVEL_ROW_MAX_BATCH),
// and the compiler-vectorised column loop for every other batch.
template <typename T>
using DotFn = T (*)(const T* w, const int32_t* idx, const T* vals, int64_t n, uint32_t bound, uint32_t& bad);
template <typename T>
using BatchRowFn = void (*)(const T* w, const int32_t* idx, const T* vals, int64_t n, int64_t B, T bias, T* acc,
                            uint32_t bound, uint32_t& bad);
template <typename T>
using ColumnsFn = void (*)(const Net& net, int64_t e0, int64_t e1, int64_t B, int64_t c0, int64_t nc, const T* w,
                           T bias, const T* vals, T* acc, uint32_t& bad);
constexpr int LEVEL_ROWS = 3;
constexpr int64_t LEVEL_ROW_MAX_BATCH = 64;
template <typename T>
struct LevelFns {
  DotFn<T> dot;
  int n_rows;
  int64_t row_max_batch[LEVEL_ROWS];
  BatchRowFn<T> row[LEVEL_ROWS];
  ColumnsFn<T> columns;
};
template <typename T>
struct LevelVariants {
  LevelFns<T> fn[ISA_COUNT];
};

// The backward pass's per-ISA function (backward.cpp): for one neuron v with dz [B] (= g_v * act'(z_v)), over
// its in-edges e from u: grad_w[e] += <dz, a_u> and g_u += w_e dz, in vectors of the ISA's width.
template <typename T>
using BackwardEdgesFn = void (*)(const Net& net, int64_t v, int64_t B, const T* w, const T* dz, const T* A, T* G,
                                 T* gw, uint32_t& bad);
template <typename T>
struct BackwardVariants {
  BackwardEdgesFn<T> fn[ISA_COUNT];
};

// The rows of the table, one per path (defined in the path's file, instantiated for float and double).
template <typename T>
TileVariants<ProgramFn<T>> program_variants();
template <typename T>
TileVariants<PanelFn<T>> panel_variants();
template <typename T>
TileVariants<BlockFn<T>> block_variants();
template <typename T>
TileVariants<BlockBackwardFn<T>> block_backward_variants();
template <typename T>
LevelVariants<T> level_variants();
template <typename T>
BackwardVariants<T> backward_variants();

// The table: every path's variants for element type T (variants.cpp; built once per process).
template <typename T>
struct VariantTable {
  TileVariants<ProgramFn<T>> program;
  TileVariants<PanelFn<T>> panel;
  TileVariants<BlockFn<T>> block;
  TileVariants<BlockBackwardFn<T>> block_backward;
  LevelVariants<T> level;
  BackwardVariants<T> backward;
};
template <typename T>
const VariantTable<T>& variant_table();

// The one selection: path = a member of VariantTable (&VariantTable<T>::panel), the ISA (detect_isa()) and
// the tile width nv in 64-byte vectors (1, 2, 4, 8). Raises when the path is not built for them.
template <typename T, typename Fn>
Fn select_variant(TileVariants<Fn> VariantTable<T>::*path, Isa isa, int nv) {
  TORCH_CHECK(isa >= 0 && isa < ISA_COUNT && (nv == 1 || nv == 2 || nv == 4 || nv == 8),
              "iosparse: no kernel variant for ISA ", int(isa), ", tile width ", nv);
  const Fn fn = (variant_table<T>().*path).fn[isa][tile_index(nv)];
  TORCH_CHECK(fn != nullptr, "iosparse: no kernel variant for ISA ", isa_name(isa), ", tile width ", nv);
  return fn;
}
template <typename T>
const LevelFns<T>& select_variant(LevelVariants<T> VariantTable<T>::*path, Isa isa) {
  TORCH_CHECK(isa >= 0 && isa < ISA_COUNT, "iosparse: no kernel variant for ISA ", int(isa));
  return (variant_table<T>().*path).fn[isa];
}
template <typename T>
BackwardEdgesFn<T> select_variant(BackwardVariants<T> VariantTable<T>::*path, Isa isa) {
  TORCH_CHECK(isa >= 0 && isa < ISA_COUNT, "iosparse: no kernel variant for ISA ", int(isa));
  const BackwardEdgesFn<T> fn = (variant_table<T>().*path).fn[isa];
  TORCH_CHECK(fn != nullptr, "iosparse: no backward variant for ISA ", isa_name(isa));
  return fn;
}

// A path's row of the table from its wrapper family NAME_generic / NAME_avx2 / NAME_avx512<T, NV>, NV the
// tile width in 64-byte units; WIDTHS is IOSPARSE_TILES_TO_4 (nv = 1, 2, 4) or IOSPARSE_TILES_TO_8.
#define IOSPARSE_TILES_TO_4(F, T) {&F<T, 1>, &F<T, 2>, &F<T, 4>, nullptr}
#define IOSPARSE_TILES_TO_8(F, T) {&F<T, 1>, &F<T, 2>, &F<T, 4>, &F<T, 8>}
#if IOSPARSE_X86
#define IOSPARSE_TILE_VARIANTS(NAME, T, WIDTHS) \
  {{WIDTHS(NAME##_generic, T), WIDTHS(NAME##_avx2, T), WIDTHS(NAME##_avx512, T)}}
#else
#define IOSPARSE_TILE_VARIANTS(NAME, T, WIDTHS) {{WIDTHS(NAME##_generic, T), {}, {}}}
#endif

}  // namespace iosparse
