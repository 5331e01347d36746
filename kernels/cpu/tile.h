// Vector tiles shared by the program, panel and block paths (program.cpp, panel.cpp, block.cpp): a tile
// holds BT batch columns of a value as NV vectors of VB bytes; register strips keep the accumulators of
// an inner loop within the ISA's vector registers; finish_vec applies a neuron's activation to a tile.
#pragma once
#include "cpu/net.h"

namespace iosparse {

// One batch tile: NV vectors of VB bytes per value (BT = NV * VB / sizeof(T) columns). Each ISA's variant
// uses its native width (AVX-512: 64, AVX2: 32, SSE2: 16 bytes): GCC lowers a wider generic vector into
// a sequence of native ones but keeps it in memory across statements, which costs loads and stores in the
// inner loops. Callers count a tile in 64-byte units (nv); each *_avx2 / *_generic wrapper scales it.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
};
// Register tiles: accumulators per inner loop stay within the ISA's vector registers (AVX-512: 32 of
// which 28, AVX2: 16 of which 11; SSE2 has no FMA and needs a temporary per product: 8), the rest holding
// source vectors and broadcast weights, so no accumulator spills to the stack (checked in the
// disassembly, docs/cpu-kernel.md "Register tiles").
constexpr int accumulator_registers(int VB) { return VB == 64 ? 28 : VB == 32 ? 11 : 8; }
// The widest strip of a tile's NV vectors (a power of two dividing NV) whose R rows of accumulators fit.
constexpr int register_strip(int NV, int R, int VB) {
  int s = NV;
  while (s > 1 && s * R > accumulator_registers(VB)) s /= 2;
  return s;
}

// dst = act(acc). The cheap kinds stay in vector registers (the comparisons keep NaN, like PyTorch);
// the transcendental ones go through the scalar formulas.
template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void finish_vec_with(int8_t ac, T lo_s, T hi_s,
                                                           const typename Vec<T, VB>::type* acc,
                                                           typename Vec<T, VB>::type* dst) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  if (ac == ACT_RELU) {
    const V zero = V{};
    for (int j = 0; j < NV; ++j) dst[j] = acc[j] < zero ? zero : acc[j];
  } else if (ac == ACT_HARDTANH) {
    const V lo = V{} + lo_s, hi = V{} + hi_s;
    for (int j = 0; j < NV; ++j) {
      const V a = acc[j] < lo ? lo : acc[j];
      dst[j] = a > hi ? hi : a;
    }
  } else {
    for (int j = 0; j < NV; ++j) dst[j] = acc[j];
    if (ac != ACT_IDENTITY) act_inplace<T>(ac, reinterpret_cast<T*>(dst), BT, lo_s, hi_s);
  }
}
template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void finish_vec(const Net& net, int64_t v,
                                                      const typename Vec<T, VB>::type* acc,
                                                      typename Vec<T, VB>::type* dst) {
  finish_vec_with<T, NV, VB>(net.act_code[v], T(net.act_param[2 * v]), T(net.act_param[2 * v + 1]), acc, dst);
}

// Tile row row_of(i) = feature i of the tile's nb batch rows (x row-major [nb, n_in]), zero padded to BT,
// for the features [first, last) (default: all). Blocks of 64 features: each batch row is read in
// contiguous runs, the block's tile rows stay in L1.
template <typename T, typename RowOf>
void transpose_in(const T* x, int64_t n_in, int64_t nb, int64_t BT, T* tile, RowOf row_of, int64_t first = 0,
                  int64_t last = -1) {
  constexpr int64_t FB = 64;
  if (last < 0) last = n_in;
  for (int64_t i0 = first; i0 < last; i0 += FB) {
    const int64_t i1 = std::min(last, i0 + FB);
    for (int64_t c = 0; c < nb; ++c) {
      const T* xr = x + c * n_in;
      for (int64_t i = i0; i < i1; ++i) tile[row_of(i) * BT + c] = xr[i];
    }
    for (int64_t i = i0; i < i1; ++i) std::fill(tile + row_of(i) * BT + nb, tile + (row_of(i) + 1) * BT, T(0));
  }
}
// y[c, j] = tile[row_of(rows[j]), c] for the tile's nb batch rows; blocks of 64 outputs, so y is written
// in contiguous runs (a fresh output is page-faulted in order) and the block's tile rows stay in L1.
template <typename T, typename RowOf>
void gather_out(const T* tile, const int64_t* rows, int64_t n_out, int64_t nb, int64_t BT, T* y, RowOf row_of) {
  constexpr int64_t OB = 64;
  for (int64_t j0 = 0; j0 < n_out; j0 += OB) {
    const int64_t j1 = std::min(n_out, j0 + OB);
    for (int64_t c = 0; c < nb; ++c) {
      T* yr = y + c * n_out;
      for (int64_t j = j0; j < j1; ++j) yr[j] = tile[row_of(rows[j]) * BT + c];
    }
  }
}
inline int64_t same_row(int64_t v) { return v; }

}  // namespace iosparse
