// Entry points of the CPU paths, the backward pass and the builders (defined in the file named at each,
// instantiated there for float and double), called by op.cpp.
#pragma once
#include <tuple>

#include "cpu/net.h"

namespace iosparse {

// program.cpp: the compiled plan per batch tile; y [B, n_outputs].
template <typename T>
void program_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y);

// panel.cpp: level by level over panels of neurons that share sources. weight_t / panel_edge_t key the
// cache of panel-ordered weights (ordered_weights.h).
template <typename T>
void panel_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y, const at::Tensor& weight_t,
                   const at::Tensor& panel_edge_t);

// Rows of the block path's values buffers past the last neuron: a block may start at any neuron and its
// one-byte offsets reach 255 rows further (only forged buffers read them; the block builder never does).
constexpr int64_t BLOCK_PAD_ROWS = 256;
// A block segment (target, block start, edge count) that the block kernels may run: the target is a neuron,
// the block starts at one (the values buffers have BLOCK_PAD_ROWS rows past the last neuron for the one-byte
// offsets) and its edges stay inside the chunk (edges_left of them). Checked per segment: check_pointers
// does not read the segments, and a forged one must not reach memory outside the buffers.
inline bool block_segment_ok(const Net& net, const int32_t* seg, int64_t edges_left) {
  return uint64_t(seg[0]) < uint64_t(net.n_neurons) && uint64_t(seg[1]) < uint64_t(net.n_neurons) && seg[2] >= 0 &&
         seg[2] <= edges_left;
}

// block.cpp: level by level, each row's edges one source block at a time.
template <typename T>
void block_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y, const at::Tensor& weight_t,
                   const at::Tensor& block_edge_t);

// level.cpp: every value of the batch, vals [n_neurons, B] feature-major; optionally the pre-activations
// in `pre` (same layout). parallel=false: one thread (used inside the backward pass, which is parallel over
// batch chunks).
template <typename T>
void level_forward(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* vals, T* pre,
                   bool parallel = true);
// level.cpp: the level path for a whole batch into y [B, n_outputs]: every multiply-add is an edge.
template <typename T>
void level_forward_out(const Net& net, const T* x, int64_t B, const T* w, const T* b, T* y);

// dense.cpp: layered networks, one at::addmm per layer.
at::Tensor dense_forward(const Net& net, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         at::TensorList net_t);

// backward.cpp: gradients of one batch chunk (x [B, n_in], gy [B, n_out]) into gx and the chunk's own
// gw / gb accumulators.
template <typename T>
void backward_chunk(const Net& net, const T* x, const T* gy, int64_t B, const T* w, const T* b, T* gx, T* gw,
                    T* gb);

// block_backward.cpp: the gradients of a whole batch through the block layout (the forward recomputed by
// the block path keeping pre-activations, then the chunks in reverse), into gx [B, n_in] and the zeroed
// gw / gb. Needs B >= block_backward_min_batch<T>() and block buffers.
template <typename T>
void block_backward(const Net& net, const T* x, const T* gy, int64_t B, const T* w, const T* b, T* gx, T* gw, T* gb,
                    const at::Tensor& weight_t, const at::Tensor& block_edge_t);
template <typename T>
constexpr int64_t block_backward_min_batch() {
  return int64_t(64 / sizeof(T));
}

// builders.cpp: the panel and block buffers (as described at NetIndex) from the structure buffers.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_panels_cpu(
    const at::Tensor& in_ptr_t, const at::Tensor& in_src_t, const at::Tensor& level_ptr_t,
    const at::Tensor& level_neuron_t, int64_t n_neurons, int64_t max_rows, double min_efficiency,
    int64_t scan_limit);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_blocks_cpu(
    const at::Tensor& in_ptr_t, const at::Tensor& in_src_t, const at::Tensor& level_ptr_t,
    const at::Tensor& level_neuron_t, int64_t n_neurons, int64_t block_sources, int64_t chunk_edges);

}  // namespace iosparse
