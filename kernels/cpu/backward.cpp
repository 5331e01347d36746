// The backward pass of iosparse::dag_backward, per batch chunk (the chunks run in parallel, op.cpp).
#include "cpu/paths.h"
#include "cpu/variants.h"

namespace iosparse {
namespace {

// Unaligned vectors of VB bytes: rows of G and A start at u * B values.
template <typename T, int VB>
struct UVec {
  typedef T type __attribute__((vector_size(VB), aligned(sizeof(T))));
};

// grad_w[e] += <dz, a_u>, g_u += w_e dz for v's in-edges. The dot product is a floating-point reduction,
// which the compiler does not vectorise on its own (it would reorder the sum): two vector accumulators
// here, summed at the end.
template <typename T, int VB>
__attribute__((always_inline)) inline void backward_edges_body(const Net& net, int64_t v, int64_t B, const T* w,
                                                              const T* __restrict dz, const T* __restrict A,
                                                              T* __restrict G, T* __restrict gw, uint32_t& bad) {
  using V = typename UVec<T, VB>::type;
  constexpr int64_t L = VB / int64_t(sizeof(T));
  const uint32_t n = uint32_t(net.n_neurons);
  for (int64_t e = net.in_ptr[v]; e < net.in_ptr[v + 1]; ++e) {
    const int64_t u = guarded(net.in_src[e], n, bad);
    const T we = w[e];
    const V wv = V{} + we;
    T* gu = G + u * B;
    const T* au = A + u * B;
    V acc0 = V{}, acc1 = V{};
    int64_t c = 0;
    for (; c + 2 * L <= B; c += 2 * L) {
      const V d0 = *reinterpret_cast<const V*>(dz + c), d1 = *reinterpret_cast<const V*>(dz + c + L);
      acc0 += d0 * *reinterpret_cast<const V*>(au + c);
      acc1 += d1 * *reinterpret_cast<const V*>(au + c + L);
      *reinterpret_cast<V*>(gu + c) += wv * d0;
      *reinterpret_cast<V*>(gu + c + L) += wv * d1;
    }
    for (; c + L <= B; c += L) {
      const V d0 = *reinterpret_cast<const V*>(dz + c);
      acc0 += d0 * *reinterpret_cast<const V*>(au + c);
      *reinterpret_cast<V*>(gu + c) += wv * d0;
    }
    acc0 += acc1;
    T dot = 0;
    for (int64_t l = 0; l < L; ++l) dot += acc0[l];
    for (; c < B; ++c) {
      dot += dz[c] * au[c];
      gu[c] += we * dz[c];
    }
    gw[e] += dot;
  }
}

template <typename T>
void backward_edges_generic(const Net& net, int64_t v, int64_t B, const T* w, const T* dz, const T* A, T* G, T* gw,
                            uint32_t& bad) {
  backward_edges_body<T, 16>(net, v, B, w, dz, A, G, gw, bad);
}
#if IOSPARSE_X86
template <typename T>
IOSPARSE_TARGET_AVX2 void backward_edges_avx2(const Net& net, int64_t v, int64_t B, const T* w, const T* dz,
                                              const T* A, T* G, T* gw, uint32_t& bad) {
  backward_edges_body<T, 32>(net, v, B, w, dz, A, G, gw, bad);
}
template <typename T>
IOSPARSE_TARGET_AVX512 void backward_edges_avx512(const Net& net, int64_t v, int64_t B, const T* w, const T* dz,
                                                  const T* A, T* G, T* gw, uint32_t& bad) {
  backward_edges_body<T, 64>(net, v, B, w, dz, A, G, gw, bad);
}
#endif

}  // namespace

template <typename T>
BackwardVariants<T> backward_variants() {
#if IOSPARSE_X86
  return {{&backward_edges_generic<T>, &backward_edges_avx2<T>, &backward_edges_avx512<T>}};
#else
  return {{&backward_edges_generic<T>, nullptr, nullptr}};
#endif
}
template BackwardVariants<float> backward_variants<float>();
template BackwardVariants<double> backward_variants<double>();

// Per batch chunk (parallel): recompute pre-activations level by level, then walk the neurons in
// reverse level order: dz = g_v * act'(z_v); grad_bias[v] += sum dz; grad_w[e] += <dz, a_u>;
// g_u += w_e dz. Chunks accumulate grad_w / grad_bias privately and are summed at the end.
template <typename T>
void backward_chunk(const Net& net, const T* x, const T* gy, int64_t B, const T* w, const T* b, T* gx, T* gw,
                    T* gb) {
  const int64_t n = net.n_neurons, n_in = net.n_inputs;
  auto vals = aligned_buffer<T>(checked_mul(n, B));
  auto pre = aligned_buffer<T>(checked_mul(n, B));
  auto g = aligned_buffer<T>(checked_mul(n, B));
  T* A = vals.get();
  T* Z = pre.get();
  T* G = g.get();
  level_forward<T>(net, x, B, w, b, A, Z, /*parallel=*/false);
  std::fill(G, G + n * B, T(0));
  for (int64_t c = 0; c < B; ++c)
    for (int64_t j = 0; j < net.n_outputs; ++j) G[net.outputs[j] * B + c] += gy[c * net.n_outputs + j];
  std::vector<T> dz(B);
  const BackwardEdgesFn<T> edges = select_variant(&VariantTable<T>::backward, detect_isa());
  uint32_t bad = 0;
  for (int64_t p = net.n_computed - 1; p >= 0; --p) {
    const int64_t v = net.level_neuron[p];
    const int8_t ac = net.act_code[v];
    const T lo = T(net.act_param[2 * v]), hi = T(net.act_param[2 * v + 1]);
    T sum = 0;
    for (int64_t c = 0; c < B; ++c) {
      dz[c] = G[v * B + c] * act_grad_scalar<T>(ac, Z[v * B + c], lo, hi);
      sum += dz[c];
    }
    gb[v] += sum;
    edges(net, v, B, w, dz.data(), A, G, gw, bad);
  }
  if (bad) net.flag_corrupt();
  for (int64_t c = 0; c < B; ++c)
    for (int64_t i = 0; i < n_in; ++i) gx[c * n_in + i] = G[i * B + c];
}

template void backward_chunk<float>(const Net&, const float*, const float*, int64_t, const float*, const float*,
                                    float*, float*, float*);
template void backward_chunk<double>(const Net&, const double*, const double*, int64_t, const double*,
                                     const double*, double*, double*, double*);

}  // namespace iosparse
