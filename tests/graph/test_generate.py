"""Generators (issue 3): I/O-optimal networks by construction, layered masks, RadiX-Nets, challenge inputs."""
import numpy as np
import pytest
import torch
import torch.nn.utils.prune  # noqa: F401
from hypothesis import assume, given
from hypothesis import strategies as st

from torch_iosparse import SparseDAG, count_io, generate, lower_bound
from torch_iosparse.cost.iomodel import topological_order
from torch_iosparse.planning import plan


def check_valid(dag, n_inputs, n_outputs, n_neurons, n_edges):
    assert (dag.n_inputs, dag.n_outputs, dag.n_neurons, dag.n_edges) == (n_inputs, n_outputs, n_neurons, n_edges)
    src, dst = dag.edges()
    assert (src < dst).all(), "numbering must be topological"
    assert (dag.out_degree()[:n_inputs] > 0).all(), "every input is read"
    assert (dag.in_degree()[n_inputs:] > 0).all(), "every computed neuron reads something"
    non_out = np.setdiff1d(np.arange(n_inputs, n_neurons), dag.outputs)
    assert (dag.out_degree()[non_out] > 0).all(), "every non-output neuron is read"


@st.composite
def io_params(draw):
    nI = draw(st.integers(1, 8))
    nO = draw(st.integers(1, 5))
    n = nI + nO + draw(st.integers(0, 40))
    M = draw(st.integers(2, 10))
    nC = n - nI
    m_min = max(nC, nI + nC - nO)
    m_max = sum(min(M - 1, nI + p) for p in range(nC))
    B = min(nO, nI) - 1
    assume(M >= 1 + -(-(nI - B + nC - 1) // nC))
    assume(m_max >= m_min)
    frac = draw(st.floats(0, 0.8))
    return nI, nO, n, m_min + int(frac * (m_max - m_min)), M, draw(st.integers(0, 2**31))


@given(io_params())
def test_io_optimal_costs_exactly_the_lower_bound(params):
    nI, nO, n, m, M, seed = params
    dag = generate.io_optimal(nI, nO, n, m, M, seed=seed)
    check_valid(dag, nI, nO, n, m)
    two = plan(dag, M, method="two_optimal")
    assert np.array_equal(two.order, np.arange(nI, n))  # its own numbering
    assert two.io.total == lower_bound(dag, M)
    # more memory never hurts a fixed order
    assert count_io(dag, two.order, M + 3).total == lower_bound(dag, M)


def test_io_optimal_is_deterministic_and_seeded():
    a = generate.io_optimal(6, 3, 50, 120, 6, seed=5)
    b = generate.io_optimal(6, 3, 50, 120, 6, seed=5)
    c = generate.io_optimal(6, 3, 50, 120, 6, seed=6)
    assert a.structure_hash() == b.structure_hash() != c.structure_hash()
    assert torch.equal(a.weight, b.weight)


def random_topological_order(dag, rng):
    indeg = dag.in_degree().copy()
    for u in range(dag.n_inputs):
        np.subtract.at(indeg, dag.out_dst[dag.out_ptr[u]:dag.out_ptr[u + 1]], 1)
    ready = [v for v in range(dag.n_inputs, dag.n_neurons) if indeg[v] == 0]
    out = []
    while ready:
        v = ready.pop(int(rng.integers(len(ready))))
        out.append(v)
        for w in dag.out_dst[dag.out_ptr[v]:dag.out_ptr[v + 1]]:
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(int(w))
    return np.asarray(out, dtype=np.int64)


def renumber(dag, order):
    """The same network with its computed neurons numbered in ``order``."""
    new = np.arange(dag.n_neurons)
    new[order] = np.arange(dag.n_inputs, dag.n_neurons)
    src, dst = dag.edges()
    bias = torch.zeros(dag.n_neurons)
    bias[torch.from_numpy(new)] = dag.bias
    return SparseDAG.from_edges(dag.n_inputs, new[src], new[dst], dag.weight, bias, n_neurons=dag.n_neurons,
                                outputs=new[dag.outputs])


@given(seed=st.integers(0, 2**31), M=st.integers(4, 8), n_inputs=st.integers(1, 9),
       density=st.floats(1.3, 2.2))
def test_anneal_closes_half_the_gap_after_shuffling(seed, M, n_inputs, density):
    rng = np.random.default_rng(seed)
    m = max(66, int(density * 56 * (M - 1) / 3))
    dag = generate.io_optimal(n_inputs, 4, 60 + n_inputs, m, M, seed=seed)
    lb = lower_bound(dag, M)
    shuffled = renumber(dag, random_topological_order(dag, rng))
    assert lower_bound(shuffled, M) == lb
    start = plan(shuffled, M, method="two_optimal").io.total
    a = plan(shuffled, M, method="anneal", seed=seed, iterations=5000, progress=False)
    assert a.io.total <= start
    if start > lb:
        assert start - a.io.total >= 0.5 * (start - lb)


def test_anneal_from_the_shuffled_order_itself_closes_half_the_gap_overall():
    # Annealing alone (no greedy start): total gap closed over a fixed batch of shuffled networks.
    gap = closed = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        M = int(rng.integers(4, 9))
        dag = generate.io_optimal(8, 4, 100, int(2.0 * 92 * (M - 1) / 3), M, seed=seed)
        order = random_topological_order(dag, rng)
        start = count_io(dag, order, M).total
        a = plan(dag, M, method="anneal", start=order, seed=seed, iterations=5000, progress=False)
        assert a.io.total <= start
        gap += start - lower_bound(dag, M)
        closed += start - a.io.total
    assert gap > 0
    assert closed >= 0.5 * gap


def test_io_optimal_errors_state_the_constraint():
    with pytest.raises(ValueError, match=r"n_neurons \(7\) must be >= n_inputs \+ n_outputs = 8"):
        generate.io_optimal(5, 3, 7, 20, 6)
    with pytest.raises(ValueError, match=r"n_edges \(10\) must be >= max\(n_computed, n_inputs \+ n_hidden\) = 37"):
        generate.io_optimal(5, 3, 40, 10, 6)
    with pytest.raises(ValueError, match=r"must be <= sum over steps p of min\(memory-1, n_inputs\+p\) = 175"):
        generate.io_optimal(5, 3, 40, 1000, 6)
    with pytest.raises(ValueError, match=r"memory \(2\) must be >= 1 \+ ceil.* = 4"):
        generate.io_optimal(5, 1, 8, 7, 2)
    with pytest.raises(ValueError, match="memory must be >= 2"):
        generate.io_optimal(3, 1, 10, 12, 1)
    with pytest.raises(TypeError, match="memory"):
        generate.io_optimal(3, 1, 10, 12, 4.5)
    with pytest.raises(ValueError, match="n_inputs and n_outputs"):
        generate.io_optimal(0, 1, 10, 12, 4)


@given(sizes=st.lists(st.integers(2, 12), min_size=2, max_size=4), density=st.floats(0.05, 0.6),
       extra=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_io_optimal_masks_train_ready_and_optimal(sizes, density, extra, seed):
    M = max(sizes) + extra + 2
    masks = generate.io_optimal_masks(sizes, density, M, seed=seed)
    assert [tuple(m.shape) for m in masks] == [(sizes[k + 1], sizes[k]) for k in range(len(sizes) - 1)]
    assert all(m.dtype == torch.bool for m in masks)
    layers = []
    for k, mk in enumerate(masks):
        lin = torch.nn.Linear(sizes[k], sizes[k + 1])
        torch.nn.utils.prune.custom_from_mask(lin, "weight", mk)
        layers += [lin, torch.nn.ReLU()]
    dag = SparseDAG.from_module(torch.nn.Sequential(*layers))
    assert dag.n_edges == sum(int(m.sum()) for m in masks)
    assert (dag.in_degree()[sizes[0]:] > 0).all() and (dag.out_degree()[:-sizes[-1]] > 0).all()
    assert count_io(dag, topological_order(dag), M).total == lower_bound(dag, M)


def test_io_optimal_masks_errors():
    with pytest.raises(ValueError, match=r"memory \(8\) must be >= 33 for layer_sizes \[16, 32, 8\]"):
        generate.io_optimal_masks([16, 32, 8], 0.3, 8)
    with pytest.raises(ValueError, match="density"):
        generate.io_optimal_masks([4, 4], 0.0, 8)
    with pytest.raises(ValueError, match="layer_sizes"):
        generate.io_optimal_masks([4], 0.5, 8)


@given(width_exp=st.integers(3, 8), depth=st.integers(1, 5), fan_exp=st.integers(1, 3), seed=st.integers(0, 99))
def test_radix_net_degrees_are_exactly_fan_in(width_exp, depth, fan_exp, seed):
    width, fan_in = 2**width_exp, 2**min(fan_exp, width_exp)
    dag = generate.radix_net(width, depth, fan_in=fan_in, seed=seed)
    assert dag.n_inputs == width and dag.n_neurons == width * (depth + 1) and dag.n_outputs == width
    assert dag.n_edges == width * depth * fan_in  # no duplicate edge was merged
    assert (dag.in_degree()[width:] == fan_in).all()
    assert (dag.out_degree()[:-width] == fan_in).all()
    assert torch.all(dag.weight == 1 / 16)
    assert str(dag.activations[0]) == "hardtanh(0,32)"


def test_radix_bias_matches_the_challenge():
    for w, b in [(1024, -0.30), (4096, -0.35), (16384, -0.40), (65536, -0.45)]:
        assert generate.radix_bias(w) == pytest.approx(b)
    assert float(generate.radix_net(64, 1, fan_in=4).bias[100]) == pytest.approx(generate.radix_bias(64))


@pytest.mark.parametrize("width,fan_in,depth", [(64, 16, 3), (256, 32, 4), (1024, 32, 2)])
def test_scipy_reference_agrees_with_forward_reference_on_challenge_inputs(width, fan_in, depth):
    dag = generate.radix_net(width, depth, fan_in=fan_in, seed=1, bias=-0.05 if width < 1024 else None)
    x = generate.challenge_inputs(width, n_samples=16, seed=2)
    assert x.shape == (16, width) and set(torch.unique(x).tolist()) <= {0.0, 1.0} and 0 < x.mean() < 1
    y = dag.forward_reference(x)
    ref = generate.scipy_reference(dag, x)
    assert y.abs().max() > 0  # a non-trivial check: some activations survive
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_radix_and_inputs_errors():
    with pytest.raises(ValueError, match="fan_in"):
        generate.radix_net(16, 2, fan_in=32)
    with pytest.raises(ValueError, match="width and depth"):
        generate.radix_net(0, 2)
    with pytest.raises(ValueError, match="width and n_samples"):
        generate.challenge_inputs(0)
    skip = SparseDAG.from_edges(2, [0, 1, 2, 0], [2, 2, 3, 3])
    with pytest.raises(ValueError, match="layered"):
        generate.scipy_reference(skip, torch.ones(1, 2))
