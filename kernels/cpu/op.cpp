// The op iosparse::dag_forward / dag_backward on the CPU: the strategy choice, the forward and backward
// entry points, and the registration of the ops of kernels/cpu (the only TORCH_LIBRARY_FRAGMENT of them).
#include <torch/library.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu/ordered_weights.h"
#include "cpu/paths.h"

namespace iosparse {

namespace {

int64_t choose_strategy(const Net& net, int64_t B) {
  if (net.strategy != STRAT_AUTO) {
    TORCH_CHECK_VALUE(net.strategy >= STRAT_PROGRAM && net.strategy <= STRAT_BLOCK, "iosparse: unknown strategy ",
                      net.strategy);
    TORCH_CHECK_VALUE(net.strategy != STRAT_DENSE || net.layered,
                      "iosparse: the dense strategy needs a layered network (edges only between consecutive levels)");
    return net.strategy;
  }
  if (net.layered && B >= net.dense_min_batch) return STRAT_DENSE;
  if (B <= net.level_max_batch) return STRAT_LEVEL;
  if (net.n_panels > 0 && B >= net.panel_min_batch) return STRAT_PANEL;
  if (net.n_block_chunks > 0 && B >= net.block_min_batch) return STRAT_BLOCK;
  return STRAT_PROGRAM;
}

// A fresh multi-MiB output is page-faulted in 4 KiB pages on its first write (radix N=65536 B=256: 64 MiB,
// ~25 ms of a ~150 ms call, the allocator returns freshly mapped memory every call). Asking for
// transparent huge pages on its 2 MiB-aligned interior (madvise needs a page-aligned start; the
// allocator's pointer is only 64-byte aligned) cuts that first touch to ~10 ms where THP is in "madvise"
// mode. A hint only: failures are ignored.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE = uintptr_t(1) << 21;
  if (bytes < 2 * HUGE) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(HUGE - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// The panel and dense paths also multiply zero-weight cells (a source that does not feed a row), which is
// exact for finite values but turns an Inf or NaN source into a NaN where the network has no edge
// (0 * inf = NaN). Such a NaN reaches every output downstream (NaN passes every activation and sum), so the
// batch rows whose outputs hold a NaN are recomputed by the level path, which multiplies edges only.
at::Tensor exact_where_nan(const Net& net, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           at::Tensor y) {
  const at::Tensor rows = y.isnan().any(1).nonzero().flatten();
  if (rows.numel() == 0) return y;
  const at::Tensor xs = x.index_select(0, rows).contiguous();
  at::Tensor ys = at::empty({rows.numel(), net.n_outputs}, y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_exact_where_nan", [&] {
    level_forward_out<scalar_t>(net, xs.data_ptr<scalar_t>(), rows.numel(), weight.data_ptr<scalar_t>(),
                                bias.data_ptr<scalar_t>(), ys.data_ptr<scalar_t>());
  });
  return y.index_copy_(0, rows, ys);
}

at::Tensor dag_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                           at::TensorList net_t, at::IntArrayRef config) {
  std::atomic<bool> corrupt{false};
  Net net = unpack(x_in, weight_in, bias_in, net_t, config, corrupt);
  const int64_t B = x_in.size(0);
  at::Tensor y = at::empty({B, net.n_outputs}, x_in.options());
  if (B == 0) return y;
  at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t strategy = choose_strategy(net, B);
  if (strategy == STRAT_DENSE) {
    y = dense_forward(net, x, weight, bias, net_t).contiguous();
  } else {
    advise_huge_pages(y.data_ptr(), size_t(y.nbytes()));
    if (poison_enabled()) AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "poison", [&] { poison(y.data_ptr<scalar_t>(), y.numel()); });
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_dag_forward", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* wp = weight.data_ptr<scalar_t>();
      const scalar_t* bp = bias.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      if (strategy == STRAT_PROGRAM) {
        program_forward<scalar_t>(net, xp, B, wp, bp, yp);
      } else if (strategy == STRAT_PANEL) {
        panel_forward<scalar_t>(net, xp, B, wp, bp, yp, weight, net_t[NET_PANEL_EDGE]);
      } else if (strategy == STRAT_BLOCK) {
        block_forward<scalar_t>(net, xp, B, wp, bp, yp, weight, net_t[NET_BLOCK_EDGE]);
      } else {
        level_forward_out<scalar_t>(net, xp, B, wp, bp, yp);
      }
    });
  }
  // The two paths that multiply zero-weight cells (exact_where_nan).
  if (strategy == STRAT_DENSE || strategy == STRAT_PANEL) y = exact_where_nan(net, x, weight, bias, y);
  check_not_corrupt(corrupt);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dag_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                                const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                                at::TensorList net_t, at::IntArrayRef config) {
  std::atomic<bool> corrupt{false};
  Net net = unpack(x_in, weight_in, bias_in, net_t, config, corrupt);
  const int64_t B = x_in.size(0);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 2 && grad_y_in.size(0) == B && grad_y_in.size(1) == net.n_outputs,
                    "iosparse: grad_output must have shape [", B, ", ", net.n_outputs, "], got ", grad_y_in.sizes());
  TORCH_CHECK_TYPE(grad_y_in.scalar_type() == x_in.scalar_type(), "iosparse: grad_output dtype ",
                   grad_y_in.scalar_type(), " differs from the input's ", x_in.scalar_type());
  at::Tensor x = x_in.contiguous(), gy = grad_y_in.contiguous();
  at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::zeros_like(weight);
  at::Tensor gb = at::zeros_like(bias);
  if (B == 0) return {gx, gw, gb};
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, B / 8));
  const int64_t per = (B + chunks - 1) / chunks;
  // The block layout's backward where the forward may run the block path (auto or block), the batch fills a
  // 64-byte vector and reaches config's block_backward_min_batch (measured per machine by
  // torch_iosparse.tuning); the level-by-level backward, one batch chunk per thread, otherwise.
  const bool by_blocks = (net.strategy == STRAT_AUTO || net.strategy == STRAT_BLOCK) && net.n_block_chunks > 0 &&
                         B >= net.block_backward_min_batch;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "iosparse_dag_backward", [&] {
    if (by_blocks && B >= block_backward_min_batch<scalar_t>()) {
      block_backward<scalar_t>(net, x.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), B, weight.data_ptr<scalar_t>(),
                               bias.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
                               gb.data_ptr<scalar_t>(), weight, net_t[NET_BLOCK_EDGE]);
      return;
    }
    std::vector<at::Tensor> gw_part(chunks), gb_part(chunks);
    for (int64_t k = 0; k < chunks; ++k) {
      gw_part[k] = k == 0 ? gw : at::zeros_like(weight);
      gb_part[k] = k == 0 ? gb : at::zeros_like(bias);
    }
    at::parallel_for(0, chunks, 1, [&](int64_t s, int64_t e) {
      for (int64_t k = s; k < e; ++k) {
        const int64_t c0 = k * per, nb = std::max<int64_t>(0, std::min(per, B - c0));
        if (nb == 0) continue;
        backward_chunk<scalar_t>(net, x.data_ptr<scalar_t>() + c0 * net.n_inputs,
                                 gy.data_ptr<scalar_t>() + c0 * net.n_outputs, nb, weight.data_ptr<scalar_t>(),
                                 bias.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>() + c0 * net.n_inputs,
                                 gw_part[k].data_ptr<scalar_t>(), gb_part[k].data_ptr<scalar_t>());
      }
    });
    for (int64_t k = 1; k < chunks; ++k) {
      gw.add_(gw_part[k]);
      gb.add_(gb_part[k]);
    }
  });
  check_not_corrupt(corrupt);
  // Inputs are not neurons with a bias: their bias gradient is zero by definition.
  gb.slice(0, 0, net.n_inputs).zero_();
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(iosparse, m) {
  // Device-independent helpers of the panel path's weight cache (dag_forward, "panel").
  m.def("clear_panel_weight_cache() -> ()", &clear_panel_weight_cache);
  m.def("panel_weight_cache_size() -> int", &panel_weight_cache_size);
  m.def("dag_forward(Tensor x, Tensor weight, Tensor bias, Tensor[] net, int[] config) -> Tensor");
  m.def("dag_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor[] net, int[] config) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("build_panels(Tensor in_ptr, Tensor in_src, Tensor level_ptr, Tensor level_neuron, int n_neurons, "
        "int max_rows, float min_efficiency, int scan_limit) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("build_blocks(Tensor in_ptr, Tensor in_src, Tensor level_ptr, Tensor level_neuron, int n_neurons, "
        "int block_sources, int chunk_edges) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(iosparse, CPU, m) {
  m.impl("dag_forward", &dag_forward_cpu);
  m.impl("dag_backward", &dag_backward_cpu);
  m.impl("build_panels", &build_panels_cpu);
  m.impl("build_blocks", &build_blocks_cpu);
}

}  // namespace iosparse
