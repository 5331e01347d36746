// The dense path (layered networks only): per layer a dense matrix is scattered from the edge weights and
// multiplied with at::addmm (MKL/oneDNN GEMM): wins at low sparsity and large batch.
#include "cpu/paths.h"

namespace iosparse {

at::Tensor dense_forward(const Net& net, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         at::TensorList net_t) {
  const at::Tensor& dense_index = net_t[NET_DENSE_INDEX];
  const at::Tensor& dense_edge = net_t[NET_DENSE_EDGE];
  const int64_t* dptr = net_t[NET_DENSE_EDGE_PTR].data_ptr<int64_t>();
  const at::Tensor level_neuron = net_t[NET_LEVEL_NEURON];
  at::Tensor h = x;
  int64_t cols = net.n_inputs;
  for (int64_t l = 0; l < net.n_levels; ++l) {
    const int64_t p0 = net.level_ptr[l], p1 = net.level_ptr[l + 1], rows = p1 - p0;
    at::Tensor W = at::zeros({rows * cols}, x.options());
    at::Tensor idx = dense_index.slice(0, dptr[l], dptr[l + 1]);
    at::Tensor wl = weight.index_select(0, dense_edge.slice(0, dptr[l], dptr[l + 1]));
    W.index_put_({idx}, wl);
    at::Tensor neurons = level_neuron.slice(0, p0, p1);
    at::Tensor bl = bias.index_select(0, neurons);
    h = at::addmm(bl, h, W.view({rows, cols}).t());
    // Activation: one loop per neuron kind; uniform layers take the contiguous fast path.
    const int64_t* nv = neurons.data_ptr<int64_t>();
    bool uniform = true;
    for (int64_t r = 1; r < rows && uniform; ++r)
      uniform = net.act_code[nv[r]] == net.act_code[nv[0]] &&
                net.act_param[2 * nv[r]] == net.act_param[2 * nv[0]] &&
                net.act_param[2 * nv[r] + 1] == net.act_param[2 * nv[0] + 1];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_dense_act", [&] {
      scalar_t* hp = h.data_ptr<scalar_t>();
      const int64_t Bn = h.size(0);
      if (uniform) {
        const int64_t v0 = nv[0];
        const int64_t total = Bn * rows;
        at::parallel_for(0, total, 1 << 14, [&](int64_t s, int64_t e) {
          act_inplace<scalar_t>(net.act_code[v0], hp + s, e - s, scalar_t(net.act_param[2 * v0]),
                                scalar_t(net.act_param[2 * v0 + 1]));
        });
      } else {
        for (int64_t bi = 0; bi < Bn; ++bi)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t v = nv[r];
            hp[bi * rows + r] = act_scalar<scalar_t>(net.act_code[v], hp[bi * rows + r],
                                                     scalar_t(net.act_param[2 * v]), scalar_t(net.act_param[2 * v + 1]));
          }
      }
    });
    cols = rows;
  }
  return h.index_select(1, net_t[NET_DENSE_OUT_POS]);
}

}  // namespace iosparse
