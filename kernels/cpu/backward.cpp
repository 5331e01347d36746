// The backward pass of iosparse::dag_backward, per batch chunk (the chunks run in parallel, op.cpp).
#include "cpu/paths.h"

namespace iosparse {

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
    uint32_t bad = 0;
    for (int64_t e = net.in_ptr[v]; e < net.in_ptr[v + 1]; ++e) {
      const int64_t u = guarded(net.in_src[e], uint32_t(n), bad);
      const T we = w[e];
      T* gu = G + u * B;
      const T* au = A + u * B;
      T dot = 0;
      for (int64_t c = 0; c < B; ++c) {
        dot += dz[c] * au[c];
        gu[c] += we * dz[c];
      }
      gw[e] += dot;
    }
    if (bad) net.flag_corrupt();
  }
  for (int64_t c = 0; c < B; ++c)
    for (int64_t i = 0; i < n_in; ++i) gx[c * n_in + i] = G[i * B + c];
}

template void backward_chunk<float>(const Net&, const float*, const float*, int64_t, const float*, const float*,
                                    float*, float*, float*);
template void backward_chunk<double>(const Net&, const double*, const double*, int64_t, const double*,
                                     const double*, double*, double*, double*);

}  // namespace iosparse
