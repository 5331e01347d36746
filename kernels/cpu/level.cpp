// The level path: level by level over feature-major values (vals [n_neurons, B]), chunks of a level's
// neurons shared by the calling thread and the chunk runner's threads; uses every core even at batch 1.
// Per neuron: a dot product at batch 1, masked vectors per edge at small float batches (AVX-512 / AVX2),
// else the compiler-vectorised column loop. The per-ISA functions are this path's row of the variant
// table (LevelVariants, variants.h).
#include "cpu/paths.h"
#include "cpu/variants.h"

namespace iosparse {

namespace {

// Batch-1 dot product sum_e w[e] * vals[idx[e]] on any ISA.
template <typename T>
T dot_gather_generic(const T* w, const int32_t* idx, const T* vals, int64_t n, uint32_t bound, uint32_t& bad) {
  // Eight independent partial sums: one chain would be bound by the add latency, not the loads.
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int q = 0; q < 8; ++q) part[q] += w[e + q] * vals[guarded(idx[e + q], bound, bad)];
  for (; e < n; ++e) part[0] += w[e] * vals[guarded(idx[e], bound, bad)];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// acc[0..nc) = bias + sum_e w[e] * vals[src(e) * B + c0 + c]: the batch columns vectorised by the compiler,
// one variant per ISA (columns_avx2 / columns_generic).
template <typename T>
__attribute__((always_inline)) inline void level_columns_body(const Net& net, int64_t e0, int64_t e1, int64_t B,
                                                             int64_t c0, int64_t nc, const T* __restrict w, T bias,
                                                             const T* __restrict vals, T* __restrict acc,
                                                             uint32_t& bad) {
  const uint32_t bound = uint32_t(net.n_neurons);
  for (int64_t c = 0; c < nc; ++c) acc[c] = bias;
  for (int64_t e = e0; e < e1; ++e) {
    const T wv = w[e];
    const T* src = vals + guarded(net.in_src[e], bound, bad) * B + c0;
    for (int64_t c = 0; c < nc; ++c) acc[c] += wv * src[c];
  }
}
template <typename T>
void level_columns_generic(const Net& net, int64_t e0, int64_t e1, int64_t B, int64_t c0, int64_t nc, const T* w,
                           T bias, const T* vals, T* acc, uint32_t& bad) {
  level_columns_body<T>(net, e0, e1, B, c0, nc, w, bias, vals, acc, bad);
}

#if IOSPARSE_X86
// Batch-1 dot product sum_e w[e] * vals[idx[e]]: AVX-512 gathers, 16 edges per step, two accumulators.
// Prefetch distance in edges (2 KiB of each stream): cold weights (MLP 95 %, 1.9 M edges, caches flushed
// with 512 MiB) 2.13 -> 1.65 ms per call at 1 thread, warm 0.72 -> 0.61 ms; 128..2048 all within 7 %.
constexpr int64_t DOT_PREFETCH = 512;
// Both edge streams (weights, source indices) DOT_PREFETCH edges ahead of edge e: 32 edges, two lines each.
__attribute__((always_inline)) inline void prefetch_edges(const float* w, const int32_t* idx, int64_t e) {
  _mm_prefetch(reinterpret_cast<const char*>(w + e + DOT_PREFETCH), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(w + e + DOT_PREFETCH + 16), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(idx + e + DOT_PREFETCH), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(idx + e + DOT_PREFETCH + 16), _MM_HINT_T0);
}
__attribute__((target("avx512f"))) float dot_gather_avx512(const float* w, const int32_t* idx, const float* vals,
                                                           int64_t n, uint32_t bound, uint32_t& bad) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  const __m512i lim = _mm512_set1_epi32(int32_t(bound));
  __mmask16 ok0 = 0xFFFF, ok1 = 0xFFFF;  // lanes whose index was in range
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    // Both streams come from DRAM when the weights are cold (batch 1 is bandwidth-bound): fetch ahead,
    // across row ends too (the next rows' edges follow in memory).
    prefetch_edges(w, idx, e);
    const __m512i i0 = _mm512_loadu_si512(idx + e), i1 = _mm512_loadu_si512(idx + e + 16);
    const __mmask16 m0 = _mm512_cmplt_epu32_mask(i0, lim), m1 = _mm512_cmplt_epu32_mask(i1, lim);
    ok0 &= m0;
    ok1 &= m1;
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + e), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, i0, vals, 4), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + e + 16), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, i1, vals, 4), a1);
  }
  for (; e + 16 <= n; e += 16) {
    const __m512i i0 = _mm512_loadu_si512(idx + e);
    const __mmask16 m0 = _mm512_cmplt_epu32_mask(i0, lim);
    ok0 &= m0;
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + e), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, i0, vals, 4), a0);
  }
  bad |= uint32_t((ok0 & ok1) != 0xFFFF);
  float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; e < n; ++e) acc += w[e] * vals[guarded(idx[e], bound, bad)];
  return acc;
}

// The same with AVX2 gathers: 8 edges per step, four accumulators (the gather latency is long).
__attribute__((target("avx2,fma"))) float dot_gather_avx2(const float* w, const int32_t* idx, const float* vals,
                                                         int64_t n, uint32_t bound, uint32_t& bad) {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256i lim = _mm256_set1_epi32(int32_t(std::min<uint32_t>(bound, INT32_MAX))), minus1 = _mm256_set1_epi32(-1);
  __m256i ok = _mm256_set1_epi32(-1);  // lanes whose indices were all in range
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    prefetch_edges(w, idx, e);
    for (int q = 0; q < 4; ++q) {
      const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + e + 8 * q));
      const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(lim, i), _mm256_cmpgt_epi32(i, minus1));
      ok = _mm256_and_si256(ok, in);
      const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), vals, i, _mm256_castsi256_ps(in), 4);
      a[q] = _mm256_fmadd_ps(_mm256_loadu_ps(w + e + 8 * q), g, a[q]);
    }
  }
  // The rest (a row of a 99 % sparse layer has ~40 edges: most of it) in 8-edge steps and one masked step,
  // not a scalar chain: every edge one gather lane, the accumulators independent.
  for (; e < n; e += 8) {
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(std::min<int64_t>(8, n - e))),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i i = _mm256_maskload_epi32(idx + e, lanes);
    const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(lim, i), _mm256_cmpgt_epi32(i, minus1));
    ok = _mm256_and_si256(ok, in);
    const __m256 g =
        _mm256_mask_i32gather_ps(_mm256_setzero_ps(), vals, i, _mm256_castsi256_ps(_mm256_and_si256(in, lanes)), 4);
    // One accumulator: a[] indexed by a loop variable would make the compiler keep a[] in memory.
    a[0] = _mm256_fmadd_ps(_mm256_maskload_ps(w + e, lanes), g, a[0]);
  }
  bad |= uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(ok)) != 0xFF);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}


// 2 <= B <= 16 (float): one masked 16-lane vector per edge (the source's B values are contiguous in the
// feature-major layout), four accumulators so the FMA latency is hidden. Writes acc[0..B) = bias + sum.
__attribute__((target("avx512f"))) void small_batch_row_avx512(const float* w, const int32_t* idx, const float* vals,
                                                               int64_t n, int64_t B, float bias, float* acc,
                                                               uint32_t bound, uint32_t& bad) {
  const __mmask16 m = __mmask16((1u << B) - 1u);
  __m512 a0 = _mm512_set1_ps(bias), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 4 <= n; e += 4) {
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[e]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e], bound, bad) * B), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(w[e + 1]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e + 1], bound, bad) * B), a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(w[e + 2]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e + 2], bound, bad) * B), a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(w[e + 3]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e + 3], bound, bad) * B), a3);
  }
  for (; e < n; ++e)
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[e]), _mm512_maskz_loadu_ps(m, vals + guarded(idx[e], bound, bad) * B), a0);
  _mm512_mask_storeu_ps(acc, m, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// 16 < B <= 16*NV (float): NV masked vectors per edge (NV independent FMA chains), two edges per step.
template <int NV>
__attribute__((target("avx512f"))) void wide_batch_row_avx512(const float* w, const int32_t* idx, const float* vals,
                                                              int64_t n, int64_t B, float bias, float* acc,
                                                              uint32_t bound, uint32_t& bad) {
  __mmask16 m[NV];
  for (int k = 0; k < NV; ++k) {
    const int64_t left = std::min<int64_t>(16, std::max<int64_t>(0, B - 16 * k));
    m[k] = __mmask16((1u << left) - 1u);
  }
  __m512 a[NV], c[NV];
  for (int k = 0; k < NV; ++k) a[k] = _mm512_set1_ps(bias), c[k] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 2 <= n; e += 2) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const float* s1 = vals + guarded(idx[e + 1], bound, bad) * B;
    const __m512 w0 = _mm512_set1_ps(w[e]), w1 = _mm512_set1_ps(w[e + 1]);
    for (int k = 0; k < NV; ++k) {
      a[k] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[k], s0 + 16 * k), a[k]);
      c[k] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m[k], s1 + 16 * k), c[k]);
    }
  }
  for (; e < n; ++e) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const __m512 w0 = _mm512_set1_ps(w[e]);
    for (int k = 0; k < NV; ++k) a[k] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[k], s0 + 16 * k), a[k]);
  }
  for (int k = 0; k < NV; ++k) _mm512_mask_storeu_ps(acc + 16 * k, m[k], _mm512_add_ps(a[k], c[k]));
}

template <typename T>
__attribute__((target("avx2,fma"))) void level_columns_avx2(const Net& net, int64_t e0, int64_t e1, int64_t B, int64_t c0,
                                                            int64_t nc, const T* w, T bias, const T* vals, T* acc,
                                                            uint32_t& bad) {
  level_columns_body<T>(net, e0, e1, B, c0, nc, w, bias, vals, acc, bad);
}

// 2 <= B <= 8 * NV (float, AVX2): NV masked 8-lane vectors per edge, two edges per step in separate
// accumulators (the compiler's loop over a run-time column count is slower than the generic build here).
template <int NV>
__attribute__((target("avx2,fma"))) void small_batch_row_avx2(const float* w, const int32_t* idx, const float* vals,
                                                             int64_t n, int64_t B, float bias, float* acc,
                                                             uint32_t bound, uint32_t& bad) {
  __m256i m[NV];
  for (int k = 0; k < NV; ++k) {
    const int left = int(std::min<int64_t>(8, std::max<int64_t>(0, B - 8 * k)));
    m[k] = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  __m256 a[NV], c[NV];
  for (int k = 0; k < NV; ++k) a[k] = _mm256_set1_ps(bias), c[k] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 2 <= n; e += 2) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const float* s1 = vals + guarded(idx[e + 1], bound, bad) * B;
    const __m256 w0 = _mm256_set1_ps(w[e]), w1 = _mm256_set1_ps(w[e + 1]);
    for (int k = 0; k < NV; ++k) {
      a[k] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(s0 + 8 * k, m[k]), a[k]);
      c[k] = _mm256_fmadd_ps(w1, _mm256_maskload_ps(s1 + 8 * k, m[k]), c[k]);
    }
  }
  for (; e < n; ++e) {
    const float* s0 = vals + guarded(idx[e], bound, bad) * B;
    const __m256 w0 = _mm256_set1_ps(w[e]);
    for (int k = 0; k < NV; ++k) a[k] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(s0 + 8 * k, m[k]), a[k]);
  }
  for (int k = 0; k < NV; ++k) _mm256_maskstore_ps(acc + 8 * k, m[k], _mm256_add_ps(a[k], c[k]));
}
#endif  // IOSPARSE_X86

// vals: [n_neurons, B] feature-major. Optionally keeps the pre-activations in `pre` (same layout). `fns`:
// this ISA's row of the level variants.
template <typename T>
inline void level_neuron_row(const Net& net, const LevelFns<T>& fns, int64_t v, int64_t B, const T* w, const T* b,
                             T* vals, T* pre) {
  constexpr int64_t CB = 64;
  const int64_t e0 = net.in_ptr[v], e1 = net.in_ptr[v + 1];
  const int8_t ac = net.act_code[v];
  const T lo = T(net.act_param[2 * v]), hi = T(net.act_param[2 * v + 1]);
  T* out = vals + v * B;
  const uint32_t bound = uint32_t(net.n_neurons);
  uint32_t bad = 0;
  struct Report {  // on every return: a guarded index out of range raises after the call
    const Net& net;
    const uint32_t& bad;
    ~Report() {
      if (bad) net.flag_corrupt();
    }
  } report{net, bad};
  if (B == 1) {
    const T acc = b[v] + fns.dot(w + e0, net.in_src + e0, vals, e1 - e0, bound, bad);
    if (pre) pre[v] = acc;
    out[0] = act_scalar<T>(ac, acc, lo, hi);
    return;
  }
  // Small batches (float, AVX-512 / AVX2): the first row kernel wide enough for B.
  for (int i = 0; i < fns.n_rows; ++i) {
    if (B > fns.row_max_batch[i]) continue;
    T acc[LEVEL_ROW_MAX_BATCH];
    fns.row[i](w + e0, net.in_src + e0, vals, e1 - e0, B, b[v], acc, bound, bad);
    if (pre) std::memcpy(pre + v * B, acc, B * sizeof(T));
    act_inplace<T>(ac, acc, B, lo, hi);
    std::memcpy(out, acc, B * sizeof(T));
    return;
  }
  for (int64_t c0 = 0; c0 < B; c0 += CB) {
    const int64_t nc = std::min(CB, B - c0);
    T acc[CB];
    fns.columns(net, e0, e1, B, c0, nc, w, b[v], vals, acc, bad);
    if (pre) std::memcpy(pre + v * B + c0, acc, nc * sizeof(T));
    act_inplace<T>(ac, acc, nc, lo, hi);
    std::memcpy(out + c0, acc, nc * sizeof(T));
  }
}

// Work (multiply-adds) per chunk of the level path, and the least work per forward worth waking helpers
// for (below it one thread is faster than any hand-off). Tunable: IOSPARSE_LEVEL_CHUNK / IOSPARSE_LEVEL_SERIAL.
int64_t level_chunk_work() {
  static const int64_t v = std::max<int64_t>(1, env_int("IOSPARSE_LEVEL_CHUNK", 32768));
  return v;
}
int64_t level_serial_work() {
  static const int64_t v = env_int("IOSPARSE_LEVEL_SERIAL", 65536);
  return v;
}

}  // namespace

// The level path's row of the variant table. Batch 1: AVX-512 / AVX2 gathers (float); small float batches:
// AVX-512 one masked 16-lane vector per edge (B <= 16), two or four (B <= 32, 64); AVX2 one or two masked
// 8-lane vectors (B <= 8, 16); the column loop otherwise (its AVX2 build also on AVX-512 machines).
template <typename T>
LevelVariants<T> level_variants() {
  LevelVariants<T> t{};
  for (int isa = 0; isa < ISA_COUNT; ++isa)
    t.fn[isa] = LevelFns<T>{&dot_gather_generic<T>, 0, {}, {}, &level_columns_generic<T>};
#if IOSPARSE_X86
  t.fn[ISA_AVX2].columns = t.fn[ISA_AVX512].columns = &level_columns_avx2<T>;
  if constexpr (std::is_same<T, float>::value) {
    t.fn[ISA_AVX2].dot = &dot_gather_avx2;
    t.fn[ISA_AVX2].n_rows = 2;
    t.fn[ISA_AVX2].row_max_batch[0] = 8, t.fn[ISA_AVX2].row[0] = &small_batch_row_avx2<1>;
    t.fn[ISA_AVX2].row_max_batch[1] = 16, t.fn[ISA_AVX2].row[1] = &small_batch_row_avx2<2>;
    t.fn[ISA_AVX512].dot = &dot_gather_avx512;
    t.fn[ISA_AVX512].n_rows = 3;
    t.fn[ISA_AVX512].row_max_batch[0] = 16, t.fn[ISA_AVX512].row[0] = &small_batch_row_avx512;
    t.fn[ISA_AVX512].row_max_batch[1] = 32, t.fn[ISA_AVX512].row[1] = &wide_batch_row_avx512<2>;
    t.fn[ISA_AVX512].row_max_batch[2] = 64, t.fn[ISA_AVX512].row[2] = &wide_batch_row_avx512<4>;
  }
#endif
  for (int isa = 0; isa < ISA_COUNT; ++isa)
    for (int i = 0; i < t.fn[isa].n_rows; ++i)
      TORCH_CHECK(t.fn[isa].row_max_batch[i] <= LEVEL_ROW_MAX_BATCH, "iosparse: level row wider than its buffer");
  return t;
}

// parallel=false: one thread (used inside the backward pass, which is parallel over batch chunks).
template <typename T>
void level_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* vals, T* pre, bool parallel) {
  const LevelFns<T>& fns = select_variant(&VariantTable<T>::level, detect_isa());
  const int64_t n_in = net.n_inputs;
  for (int64_t c = 0; c < B; ++c)
    for (int64_t i = 0; i < n_in; ++i) vals[i * B + c] = x[c * n_in + i];
  const int64_t threads = parallel && !at::in_parallel_region() ? at::get_num_threads() : 1;
  if (threads <= 1 || net.n_edges * B < level_serial_work()) {
    for (int64_t p = 0; p < net.n_computed; ++p) level_neuron_row<T>(net, fns, net.level_neuron[p], B, w, b, vals, pre);
    return;
  }
  // Chunks of about level_chunk_work() multiply-adds (by in-degree), never spanning two levels;
  // wait_for[c] = first chunk of c's level (all earlier chunks must be done before c starts).
  const int64_t target = level_chunk_work();
  std::vector<int64_t> chunk_pos{0}, wait_for;
  for (int64_t l = 0; l < net.n_levels; ++l) {
    const int64_t p0 = net.level_ptr[l], p1 = net.level_ptr[l + 1];
    if (p1 == p0) continue;
    const int64_t first = int64_t(wait_for.size());
    int64_t work = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t v = net.level_neuron[p];
      work += (net.in_ptr[v + 1] - net.in_ptr[v] + 1) * B;
      if (work >= target || p + 1 == p1) {
        chunk_pos.push_back(p + 1);
        wait_for.push_back(first);
        work = 0;
      }
    }
  }
  run_chunked(int64_t(wait_for.size()), wait_for.data(), [&](int64_t c) {
    for (int64_t p = chunk_pos[c]; p < chunk_pos[c + 1]; ++p)
      level_neuron_row<T>(net, fns, net.level_neuron[p], B, w, b, vals, pre);
  });
}

// The level path for a whole batch into y [B, n_outputs]: every multiply-add is an edge of the network.
template <typename T>
void level_forward_out(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y) {
  auto vals = aligned_buffer<T>(checked_mul(net.n_neurons, B));
  if (poison_enabled()) poison(vals.get(), net.n_neurons * B);
  level_forward<T>(net, x, B, w, b, vals.get(), nullptr);
  for (int64_t c = 0; c < B; ++c)
    for (int64_t j = 0; j < net.n_outputs; ++j) y[c * net.n_outputs + j] = vals.get()[net.outputs[j] * B + c];
}

template LevelVariants<float> level_variants<float>();
template LevelVariants<double> level_variants<double>();
template void level_forward<float>(const Net&, const float*, int64_t, const float*, const float*, float*, float*,
                                   bool);
template void level_forward<double>(const Net&, const double*, int64_t, const double*, const double*, double*,
                                    double*, bool);
template void level_forward_out<float>(const Net&, const float*, int64_t, const float*, const float*, float*);
template void level_forward_out<double>(const Net&, const double*, int64_t, const double*, const double*, double*);

}  // namespace iosparse
