"""Every bad input gets a clear exception whose message says what is wrong."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import torch_iosparse as tis
from torch_iosparse.graph import activations
from torch_iosparse.cost import iomodel
from torch_iosparse.graph.dag import GraphError


def small():
    return tis.SparseDAG.from_edges(2, [0, 1, 2, 0, 3], [2, 2, 3, 4, 4])


# ---------------------------------------------------------------------- from_edges
@pytest.mark.parametrize("src,dst,match", [
    ([2, 3, 4], [3, 4, 2], "cycle"),                    # 2 -> 3 -> 4 -> 2
    ([0, 2, 3, 4], [2, 3, 4, 2], "cycle"),
    ([0, 2], [2, 2], "self-loop"),
    ([0, 1], [2], "same length"),
    ([[0, 1]], [[2, 2]], "one-dimensional"),
    ([0, 1.5], [2, 2], "integers"),
    ([0, float("nan")], [2, 2], "integers"),
    (["a", "b"], [2, 2], "integers"),
    ([True, False], [2, 2], "integers"),
    ([0, -1], [2, 2], "out of range"),
    ([0, 1], [2, 9], "out of range"),
    ([0, 2], [2, 1], "points into input"),
])
def test_malformed_edges(src, dst, match):
    with pytest.raises(GraphError, match=match):
        tis.SparseDAG.from_edges(2, src, dst, n_neurons=5)


def test_cycle_detection_names_a_neuron_and_is_a_value_error():
    with pytest.raises(ValueError, match=r"cycle.*neuron \d+"):
        tis.SparseDAG.from_edges(1, [0, 1, 2, 3], [1, 2, 3, 2])


def test_malformed_weights_bias_sizes_and_outputs():
    with pytest.raises(GraphError, match="3 entries for 2 edges"):
        tis.SparseDAG.from_edges(1, [0, 1], [1, 2], [1.0, 2.0, 3.0])
    with pytest.raises(GraphError, match="weight must be one-dimensional"):
        tis.SparseDAG.from_edges(1, [0, 1], [1, 2], torch.ones(2, 1))
    with pytest.raises(GraphError, match="real numbers"):
        tis.SparseDAG.from_edges(1, [0, 1], [1, 2], torch.ones(2, dtype=torch.complex64))
    with pytest.raises(GraphError, match="one entry per neuron"):
        tis.SparseDAG.from_edges(1, [0, 1], [1, 2], bias=[1.0, 2.0])
    with pytest.raises(GraphError, match="bias must be one-dimensional"):
        tis.SparseDAG.from_edges(1, [0, 1], [1, 2], bias=torch.zeros(3, 1))
    with pytest.raises(GraphError, match="n_inputs must be an integer"):
        tis.SparseDAG.from_edges(1.5, [0], [1])
    with pytest.raises(GraphError, match="n_inputs must be an integer"):
        tis.SparseDAG.from_edges(True, [0], [1])
    with pytest.raises(GraphError, match="n_neurons must be an integer"):
        tis.SparseDAG.from_edges(1, [0], [1], n_neurons="3")
    assert tis.SparseDAG.from_edges(2.0, [0], [2], n_neurons=np.int64(3)).n_computed == 1
    with pytest.raises(GraphError, match="n_inputs must be >= 1"):
        tis.SparseDAG.from_edges(0, [0], [1])
    with pytest.raises(GraphError, match="nothing to compute"):
        tis.SparseDAG.from_edges(3, [0], [1], n_neurons=3)
    with pytest.raises(GraphError, match="out of range"):
        tis.SparseDAG.from_edges(1, [0, 1], [1, 2], n_neurons=2)
    with pytest.raises(GraphError, match="at least one"):
        tis.SparseDAG.from_edges(1, [0], [1], outputs=[])
    with pytest.raises(GraphError, match="not a computed neuron"):
        tis.SparseDAG.from_edges(1, [0], [1], outputs=[0])
    with pytest.raises(GraphError, match="not a computed neuron"):
        tis.SparseDAG.from_edges(1, [0], [1], outputs=[7])
    with pytest.raises(GraphError, match="duplicates"):
        tis.SparseDAG.from_edges(1, [0, 0], [1, 2], outputs=[1, 1])
    with pytest.raises(GraphError, match="one spec or one per neuron"):
        tis.SparseDAG.from_edges(1, [0], [1], activation=["relu"] * 3)


@pytest.mark.parametrize("spec,match", [
    ("swish", "unsupported activation"), ("relu(1,2)", "takes no parameters"),
    ("hardtanh(2,1)", "lo <= hi"), ("relu((", "cannot parse"), (3, "must be a name"),
])
def test_bad_activation_specs(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tis.SparseDAG.from_edges(1, [0], [1], activation=spec)


def test_activation_parser_accepts_aliases():
    assert activations.parse("ReLU6") == tis.Activation("hardtanh", 0.0, 6.0)
    assert activations.parse("hardtanh") == tis.Activation("hardtanh", -1.0, 1.0)
    assert activations.parse(" clamp(-2, 3) ") == tis.Activation("hardtanh", -2.0, 3.0)
    assert activations.parse(None) == activations.parse("linear") == tis.Activation("identity")


# ---------------------------------------------------------------------- from_module
def test_unsupported_module_is_named():
    with pytest.raises(GraphError, match="Conv1d"):
        tis.SparseDAG.from_module(nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1)))
    with pytest.raises(GraphError, match="LayerNorm"):
        tis.SparseDAG.from_module(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(GraphError, match="Softmax"):
        tis.SparseDAG.from_module(nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1)))


def test_bad_module_structures():
    with pytest.raises(GraphError, match="before any nn.Linear"):
        tis.SparseDAG.from_module(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)))
    with pytest.raises(GraphError, match="two activations in a row"):
        tis.SparseDAG.from_module(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Tanh()))
    with pytest.raises(GraphError, match="expects 5 inputs but the previous layer produces 4"):
        tis.SparseDAG.from_module(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))
    with pytest.raises(GraphError, match="no nn.Linear"):
        tis.SparseDAG.from_module(nn.Sequential(nn.Identity()))
    with pytest.raises(TypeError, match="nn.Sequential"):
        tis.SparseDAG.from_module([nn.Linear(2, 2)])


# ---------------------------------------------------------------------- inputs of forward_reference
def test_bad_forward_inputs():
    dag = small()
    with pytest.raises(ValueError, match=r"shape \[batch, 2\]"):
        dag.forward_reference(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"shape \[batch, 2\]"):
        dag.forward_reference(torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \[batch, 2\]"):
        dag.forward_reference(torch.zeros(1, 3, 2))
    with pytest.raises(TypeError, match="floating-point"):
        dag.forward_reference(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dag.forward_reference(np.zeros((3, 2)))


# ---------------------------------------------------------------------- memory
@pytest.mark.parametrize("memory,exc,match", [
    (1, ValueError, ">= 2"), (0, ValueError, ">= 2"), (-4, ValueError, ">= 2"),
    (2.5, ValueError, "whole number"), (float("nan"), ValueError, "whole number"),
    (-math.inf, ValueError, "whole number"), ("lots", ValueError, "unbounded"),
    (True, TypeError, "bool"), ([4], TypeError, "integer"),
])
def test_bad_memory(memory, exc, match):
    dag = small()
    for fn in (lambda: tis.count_io(dag, [2, 3, 4], memory), lambda: tis.plan(dag, memory),
               lambda: tis.lower_bound(dag, memory), lambda: tis.upper_bound(dag, memory)):
        with pytest.raises(exc, match=match):
            fn()


def test_memory_spellings():
    dag = small()
    unbounded = tis.count_io(dag, [2, 3, 4], None)
    for spec in (math.inf, "inf", "unbounded", float("inf")):
        assert tis.count_io(dag, [2, 3, 4], spec) == unbounded
    assert tis.count_io(dag, [2, 3, 4], 3.0) == tis.count_io(dag, [2, 3, 4], np.int64(3))


# ---------------------------------------------------------------------- orders
@pytest.mark.parametrize("order,exc,match", [
    ([3, 2, 4], ValueError, "not topological: neuron 2 must come before 3"),
    ([2, 4, 3], ValueError, "not topological"),
    ([2, 3], ValueError, "missing e.g. 4"),
    ([2, 3, 4, 4], ValueError, "more than once"),
    ([2, 3, 3], ValueError, "missing e.g. 4"),
    ([2, 3, 5], ValueError, "outside"),
    ([2, 3, -1, 4], ValueError, "outside"),
    ([2.0, 3.0, 4.0], TypeError, "integer"),
    ([[2, 3, 4]], ValueError, "one-dimensional"),
])
def test_bad_orders(order, exc, match):
    dag = small()
    for fn in (tis.count_io, lambda d, o, m: tis.simulate_reference(d, o, m), tis.trace):
        with pytest.raises(exc, match=match):
            fn(dag, order, 2)


def test_unknown_plan_method_and_non_dag():
    with pytest.raises(ValueError, match="unknown planning method 'magic'.*two_optimal"):
        tis.plan(small(), 4, method="magic")
    with pytest.raises(TypeError, match="SparseDAG"):
        tis.plan(nn.Linear(2, 2), 4)


def test_topological_order_reports_cycles_from_a_corrupted_dag():
    dag = small()
    # hand-corrupt the CSR (not possible through the constructors) to reach the native cycle check
    bad = tis.SparseDAG(2, np.array([0, 0, 0, 2, 3, 5]), np.array([0, 3, 2, 0, 3], dtype=np.int32),
                        torch.ones(5), torch.zeros(5), dag.activations, dag.act_index, dag.outputs)
    with pytest.raises(GraphError, match="cycle"):
        iomodel.topological_order(bad)
