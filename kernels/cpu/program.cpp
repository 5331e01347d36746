// The program path: executes the compiled plan (torch_iosparse/compile/program.py, docs/program-format.md) per
// batch tile of BT columns: partial sums in vector registers, M slots of BT values in a thread-private
// buffer sized for the per-core cache, spills in a per-thread slow buffer. Parallel over batch tiles.
#include "cpu/paths.h"
#include "cpu/tile.h"
#include "cpu/variants.h"

namespace iosparse {

namespace {

// A group of G consecutive positions with identical sources read from identical slots (see
// program.group_positions): every source vector is loaded once and multiplied into G accumulators.
// Position i0's ops run in order (LOADs, eviction STOREs, FMAs for the whole group) up to its FINISH;
// then each member's FINISH and STOREs run in order (the members' FMAs were done in the sweep).
template <typename T, int NV, int VB, int G>
__attribute__((always_inline)) inline void program_group(const Net& net, int64_t i0, const T* __restrict w,
                                                         const T* __restrict b, T* __restrict slots,
                                                         T* __restrict slow) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t BT = NV * int64_t(VB / sizeof(T));
  const int32_t* ops = net.prog_ops;
  V acc[G][NV];
  int64_t wofs[G];
  const int64_t v0 = net.prog_neuron[i0];
  // Guards (check_pointers): slots < M, slow rows < n_slow, every member's edge o[2] + wofs[g] < n_edges.
  const uint64_t mem = uint64_t(net.memory), n_slow = uint64_t(net.n_slow);
  int64_t wlo = 0, whi = 0;
  for (int g = 0; g < G; ++g) {
    const int64_t v = net.prog_neuron[i0 + g];
    const T bv = b[v];
    for (int j = 0; j < NV; ++j) acc[g][j] = V{} + bv;
    wofs[g] = net.in_ptr[v] - net.in_ptr[v0];
    wlo = std::min(wlo, wofs[g]);
    whi = std::max(whi, wofs[g]);
  }
  int64_t k = net.prog_op_ptr[i0];
  const int64_t end0 = net.prog_op_ptr[i0 + 1];
  for (; k < end0; ++k) {
    const int32_t* o = ops + 3 * k;
    const int32_t code = o[0];
    if (__builtin_expect(code == OP_FMA, 1)) {
      if (__builtin_expect(uint64_t(o[1]) >= mem || o[2] + wlo < 0 || o[2] + whi >= net.n_edges, 0)) {
        net.flag_corrupt();
        continue;
      }
      const V* s = reinterpret_cast<const V*>(slots + int64_t(o[1]) * BT);
      const T* we = w + o[2];
      T wv[G];
#pragma GCC unroll 64
      for (int g = 0; g < G; ++g) wv[g] = we[wofs[g]];
#pragma GCC unroll 64
      for (int j = 0; j < NV; ++j) {
        const V sv = s[j];
#pragma GCC unroll 64
        for (int g = 0; g < G; ++g) acc[g][j] += wv[g] * sv;
      }
    } else if (code == OP_LOAD) {
      if (uint64_t(o[1]) >= n_slow || uint64_t(o[2]) >= mem) {
        net.flag_corrupt();
        continue;
      }
      V* dst = reinterpret_cast<V*>(slots + int64_t(o[2]) * BT);
      const V* src = reinterpret_cast<const V*>(slow + int64_t(o[1]) * BT);
      for (int j = 0; j < NV; ++j) dst[j] = src[j];
    } else if (code == OP_STORE) {
      if (uint64_t(o[1]) >= mem || uint64_t(o[2]) >= n_slow) {
        net.flag_corrupt();
        continue;
      }
      V* dst = reinterpret_cast<V*>(slow + int64_t(o[2]) * BT);
      const V* src = reinterpret_cast<const V*>(slots + int64_t(o[1]) * BT);
      for (int j = 0; j < NV; ++j) dst[j] = src[j];
    } else {
      break;  // FINISH of i0: all FMAs of the group are done
    }
  }
  // The members' FINISHes index the sums by a run-time g: copied out first, so that acc itself is only ever
  // indexed by constants and stays in registers through the op loop (else GCC keeps it on the stack: a load
  // and a store per FMA).
  V sums[G][NV];
#pragma GCC unroll 64
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 64
    for (int j = 0; j < NV; ++j) sums[g][j] = acc[g][j];
  for (int g = 0; g < G; ++g) {
    const int64_t i = i0 + g, v = net.prog_neuron[i];
    // Members' ops are [FMA x indegree, FINISH, STORE...] (program.group_positions): skip the FMAs.
    const int64_t first = g == 0 ? k : net.prog_op_ptr[i] + (net.in_ptr[v + 1] - net.in_ptr[v]);
    for (int64_t kk = first, e = net.prog_op_ptr[i + 1]; kk < e; ++kk) {
      const int32_t* o = ops + 3 * kk;
      if ((o[0] == OP_FINISH || o[0] == OP_STORE) &&
          (uint64_t(o[1]) >= mem || (o[0] == OP_STORE && uint64_t(o[2]) >= n_slow))) {
        net.flag_corrupt();
        continue;
      }
      if (o[0] == OP_FINISH) {
        V* dst = reinterpret_cast<V*>(slots + int64_t(o[1]) * BT);
        finish_vec<T, NV, VB>(net, v, sums[g], dst);
      } else if (o[0] == OP_STORE) {
        V* dst = reinterpret_cast<V*>(slow + int64_t(o[2]) * BT);
        const V* src = reinterpret_cast<const V*>(slots + int64_t(o[1]) * BT);
        for (int j = 0; j < NV; ++j) dst[j] = src[j];
      }
      // FMAs of members were done in the sweep; members have no LOAD by construction.
    }
  }
}

template <typename T, int NV, int VB>
__attribute__((always_inline)) inline void program_tile_body(const Net& net, const T* __restrict w,
                                                             const T* __restrict b, T* __restrict slots,
                                                             T* __restrict slow) {
  // A group whose G x NV accumulators would not fit the registers runs as consecutive sub-groups of at most
  // GMAX positions: each member's own ops start with its FMAs over the same slots (validate_program), and
  // the slots hold the same values from the group's first FMA to its last member's FINISH.
  constexpr int GMAX = std::max(1, std::min(4, accumulator_registers(VB) / NV));
  for (int64_t grp = 0; grp < net.n_groups; ++grp) {
    for (int64_t i0 = net.prog_group_ptr[grp], end = net.prog_group_ptr[grp + 1]; i0 < end; i0 += GMAX) {
      switch (std::min<int64_t>(GMAX, end - i0)) {
        case 1: program_group<T, NV, VB, 1>(net, i0, w, b, slots, slow); break;
        case 2: program_group<T, NV, VB, std::min(2, GMAX)>(net, i0, w, b, slots, slow); break;
        case 3: program_group<T, NV, VB, std::min(3, GMAX)>(net, i0, w, b, slots, slow); break;
        default: program_group<T, NV, VB, GMAX>(net, i0, w, b, slots, slow); break;
      }
    }
  }
}

// The per-ISA builds of the tile (variants.h): nv counts 64-byte vectors; AVX2 and the generic build use
// two and four times as many narrower ones.
#if IOSPARSE_X86
template <typename T, int NV>
IOSPARSE_TARGET_AVX512 void program_tile_avx512(const Net& net, const T* w, const T* b, T* slots, T* slow) {
  program_tile_body<T, NV, 64>(net, w, b, slots, slow);
}
template <typename T, int NV>
IOSPARSE_TARGET_AVX2 void program_tile_avx2(const Net& net, const T* w, const T* b, T* slots, T* slow) {
  program_tile_body<T, 2 * NV, 32>(net, w, b, slots, slow);
}
#endif
template <typename T, int NV>
void program_tile_generic(const Net& net, const T* w, const T* b, T* slots, T* slow) {
  program_tile_body<T, 4 * NV, 16>(net, w, b, slots, slow);
}

}  // namespace

template <typename T>
TileVariants<ProgramFn<T>> program_variants() {
  return IOSPARSE_TILE_VARIANTS(program_tile, T, IOSPARSE_TILES_TO_8);
}

template <typename T>
void program_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y) {
  // NV vectors of 64 bytes per tile: the batch_tile in columns rounded to a supported width.
  const int64_t want = std::max<int64_t>(1, net.batch_tile * int64_t(sizeof(T)) / 64);
  int nv = want >= 8 ? 8 : want >= 4 ? 4 : want >= 2 ? 2 : 1;
  // Small batches: narrower tiles so that every thread gets one (batch 64 on 2 cores: 2 tiles of 32).
  const int64_t threads = at::get_num_threads();
  while (nv > 1 && (nv / 2) * int64_t(64 / sizeof(T)) >= B) nv /= 2;  // no tile wider than the batch
  while (nv > 1 && (B + nv * int64_t(64 / sizeof(T)) - 1) / (nv * int64_t(64 / sizeof(T))) < threads) nv /= 2;
  const ProgramFn<T> fn = select_variant(&VariantTable<T>::program, detect_isa(), nv);
  const int64_t BT = nv * int64_t(64 / sizeof(T));
  const int64_t n_tiles = (B + BT - 1) / BT;
  const int64_t n_in = net.n_inputs, n_out = net.n_outputs;
  // Tiles go to the calling thread and the chunk pool (not an OpenMP region: on a busy machine a join
  // waits for a descheduled thread; here the caller takes every tile no helper has claimed).
  const std::vector<int64_t> wait_for(n_tiles, 0);
  run_chunked(n_tiles, wait_for.data(), [&](int64_t t) {
    T* slots = scratch<T>(0, checked_mul(net.memory, BT));
    T* sl = scratch<T>(1, checked_mul(net.n_slow, BT));
    if (poison_enabled()) {
      poison(slots, net.memory * BT);
      poison(sl, net.n_slow * BT);
    }
    const int64_t b0 = t * BT, nb = std::min(BT, B - b0);
    // Transposed input tile: slow row i = feature i of the tile's columns (zero padded).
    transpose_in<T>(x + b0 * n_in, n_in, nb, BT, sl, same_row);
    fn(net, w, b, slots, sl);
    gather_out<T>(sl, net.prog_output_rows, n_out, nb, BT, y + b0 * n_out, same_row);
  });
}

template TileVariants<ProgramFn<float>> program_variants<float>();
template TileVariants<ProgramFn<double>> program_variants<double>();
template void program_forward<float>(const Net&, const float*, int64_t, const float*, const float*, float*);
template void program_forward<double>(const Net&, const double*, int64_t, const double*, const double*, double*);

}  // namespace iosparse
