"""torch_iosparse.gpu without a GPU: the device-agnostic reference forward/backward (what the CUDA
backward runs), the op adapter called directly on CPU tensors under the Triton interpreter, the CUDA
registration, its fake kernel with device='cuda' fake tensors, and a small compile/export test."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_iosparse as tis
from torch_iosparse import gpu

from test_triton import random_dag


def structure(dag):
    codes = torch.tensor([dag.activation_of(v).code for v in range(dag.n_neurons)], dtype=torch.int8)
    lo = torch.tensor([dag.activation_of(v).lo for v in range(dag.n_neurons)], dtype=torch.float64)
    hi = torch.tensor([dag.activation_of(v).hi for v in range(dag.n_neurons)], dtype=torch.float64)
    return (torch.from_numpy(dag.in_ptr.astype(np.int64)), torch.from_numpy(dag.in_src.astype(np.int32)), codes, lo, hi,
            torch.from_numpy(dag.outputs.astype(np.int64)), dag.n_inputs)


@given(seed=st.integers(0, 10**6), batch=st.sampled_from([1, 4, 9]))
@settings(max_examples=15)
def test_reference_forward_and_backward_match_autograd_of_forward_reference(seed, batch):
    dag = random_dag(seed, 4, 15)
    s = structure(dag)
    x = torch.randn(batch, dag.n_inputs, requires_grad=True)
    w = dag.weight.clone().requires_grad_()
    b = dag.bias.clone().requires_grad_()
    dag.weight, dag.bias = w, b  # forward_reference reads them: autograd flows into w and b
    y_ref = dag.forward_reference(x)
    torch.testing.assert_close(gpu.reference_forward(x.detach(), w.detach(), b.detach(), *s), y_ref.detach())
    gy = torch.randn_like(y_ref)
    gx, gw, gb = torch.autograd.grad(y_ref, [x, w, b], gy)
    rx, rw, rb = gpu.reference_backward(gy, x.detach(), w.detach(), b.detach(), *s)
    gb = gb.clone()
    gb[: dag.n_inputs] = 0  # inputs have no bias
    for got, want in ((rx, gx), (rw, gw), (rb, gb)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reference_handles_non_topological_numbering():
    # neuron 4 reads 5: the numbering is not topological
    dag = tis.SparseDAG.from_edges(2, [0, 1, 5, 0], [5, 5, 4, 4], torch.tensor([1.0, -2.0, 0.5, 3.0]),
                                   torch.tensor([0, 0, 0.1, 0, -0.2, 0.3]), n_neurons=6, outputs=[4],
                                   activation="tanh")
    x = torch.randn(3, 2)
    torch.testing.assert_close(gpu.reference_forward(x, dag.weight, dag.bias, *structure(dag)),
                               dag.forward_reference(x))
