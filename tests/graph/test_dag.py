"""SparseDAG: construction (from_module, from_edges), CSR structure, levels, and forward_reference against
nn.Sequential and against a naive per-neuron evaluation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import torch_iosparse as tis
from torch_iosparse.graph import dag as dagmod
from torch_iosparse.testing.networks import dags, naive_forward, random_edges, relabel

ACTIVATION_MODULES = {
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "identity": lambda: nn.Identity(),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 1.5),
    "none": None,  # Linear directly followed by Linear
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| relative to max(|ref|_inf, 1) (outputs here are O(1); the guard keeps all-zero ReLU
    outputs meaningful)."""
    return float((y - ref).abs().max() / max(float(ref.abs().max()), 1.0)) if ref.numel() else 0.0


def pruned_mlp(rng, widths, acts, bias, how, dtype):
    layers = []
    for k in range(len(widths) - 1):
        lin = nn.Linear(widths[k], widths[k + 1], bias=bias).to(dtype)
        amount = float(rng.choice([0.0, 0.5, 0.9, 0.99]))
        if how == "mask":
            prune.random_unstructured(lin, "weight", amount=amount)
        elif how == "l1":
            prune.l1_unstructured(lin, "weight", amount=amount)
        else:  # zeros in the weights
            with torch.no_grad():
                lin.weight[torch.rand(lin.weight.shape) < amount] = 0
        layers.append(lin)
        make = ACTIVATION_MODULES[acts[k]]
        if make is not None:
            layers.append(make().to(dtype))
    return nn.Sequential(*layers)


@settings(max_examples=2 * settings.default.max_examples)
@given(seed=st.integers(0, 2**31 - 1), depth=st.integers(1, 4), bias=st.booleans(),
       how=st.sampled_from(["mask", "l1", "zeros"]), dtype=st.sampled_from([torch.float32, torch.float64]),
       data=st.data())
def test_forward_reference_equals_sequential(seed, depth, bias, how, dtype, data):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    widths = [int(w) for w in rng.integers(1, 40, size=depth + 1)]
    acts = [data.draw(st.sampled_from(sorted(ACTIVATION_MODULES))) for _ in range(depth)]
    seq = pruned_mlp(rng, widths, acts, bias, how, dtype)
    dag = tis.SparseDAG.from_module(seq)
    x = torch.randn(int(rng.integers(1, 9)), widths[0], dtype=dtype)
    with torch.no_grad():
        ref = seq(x)
    y = dag.forward_reference(x)
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y, ref) <= TOL[dtype]
    # one edge per nonzero of the mask (or of the weight when there is no mask)
    lins = [m for m in seq if isinstance(m, nn.Linear)]
    expect = sum(int((getattr(m, "weight_mask", m.weight) != 0).sum()) for m in lins)
    assert dag.n_edges == expect
    assert dag.layer_sizes == widths and dag.n_outputs == widths[-1]


def test_every_supported_activation_module_is_recognised():
    x = torch.randn(5, 6, dtype=torch.float64)
    for name, make in ACTIVATION_MODULES.items():
        mods = [nn.Linear(6, 4).double()] + ([make().double()] if make else [])
        seq = nn.Sequential(*mods)
        dag = tis.SparseDAG.from_module(seq)
        with torch.no_grad():
            assert rel_err(dag.forward_reference(x), seq(x)) <= 1e-12, name
    assert str(tis.SparseDAG.from_module(nn.Sequential(nn.Linear(2, 2), nn.ReLU6())).activations[0]) == "hardtanh(0,6)"


def test_prune_mask_defines_the_edges_not_the_values():
    lin = nn.Linear(4, 3)
    prune.custom_from_mask(lin, "weight", torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))
    with torch.no_grad():
        lin.weight_orig[0, 0] = 0.0  # unpruned but zero: still an edge
        lin.weight_orig[1, 1] = 5.0  # pruned: no edge whatever its value
    dag = tis.SparseDAG.from_module(nn.Sequential(lin))
    assert dag.n_edges == 6
    x = torch.randn(3, 4)
    assert rel_err(dag.forward_reference(x), lin(x).detach()) <= 1e-6


def test_nested_sequential_is_flattened():
    seq = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 2)))
    x = torch.randn(2, 3)
    assert rel_err(tis.SparseDAG.from_module(seq).forward_reference(x), seq(x).detach()) <= 1e-6


ACT_SPECS = ["identity", "relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "hardtanh(-0.3,0.7)", "relu6"]


@settings(max_examples=2 * settings.default.max_examples)
@given(seed=st.integers(0, 2**31 - 1), layered=st.booleans(), shuffled=st.booleans(),
       per_neuron=st.booleans(), dups=st.booleans())
def test_from_edges_matches_naive_evaluation(seed, layered, shuffled, per_neuron, dups):
    rng = np.random.default_rng(seed)
    n_in, n_comp = int(rng.integers(1, 8)), int(rng.integers(1, 20))
    n = n_in + n_comp
    src, dst = random_edges(rng, n_in, n_comp, max_fan_in=6, layered=layered, n_layers=3, skip_prob=0.3)
    if shuffled:
        src, dst, _ = relabel(rng, n_in, n, src, dst)
    if dups and src.size:  # repeat some edges: their weights add up
        k = rng.integers(0, src.size, size=max(1, src.size // 3))
        src, dst = np.concatenate([src, src[k]]), np.concatenate([dst, dst[k]])
    perm = rng.permutation(src.size)  # any edge order
    src, dst = src[perm], dst[perm]
    w = rng.standard_normal(src.size)
    b = rng.standard_normal(n)
    acts = [ACT_SPECS[int(i)] for i in rng.integers(0, len(ACT_SPECS), size=n)] if per_neuron \
        else ACT_SPECS[int(rng.integers(len(ACT_SPECS)))]
    x = rng.standard_normal((3, n_in))
    for dtype in (torch.float64, torch.float32):
        dag = tis.SparseDAG.from_edges(n_in, src, dst, torch.tensor(w, dtype=dtype), b, n_neurons=n,
                                       activation=acts)
        outputs = dag.outputs.tolist()
        ref = naive_forward(n_in, n, list(zip(src.tolist(), dst.tolist(), w.tolist())), b,
                            dag.activation_of, outputs, x)
        y = dag.forward_reference(torch.tensor(x, dtype=dtype))
        assert y.dtype == dtype
        assert rel_err(y.double(), torch.from_numpy(ref)) <= TOL[dtype]


def test_from_edges_copies_the_callers_arrays():
    w, b, src = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0, 1.0]), np.array([0, 1])
    dag = tis.SparseDAG.from_edges(2, src, [2, 2], w, b, activation="identity")
    w[:] = 100.0
    b[:] = 100.0
    src[:] = 0
    assert dag.forward_reference(torch.ones(1, 2)).tolist() == [[4.0]]


def test_duplicate_edges_are_merged_by_summing():
    dag = tis.SparseDAG.from_edges(2, [0, 1, 0, 0], [2, 2, 2, 2], [1.0, 10.0, 2.0, 4.0], activation="identity")
    assert dag.n_edges == 2
    assert dag.in_src.tolist() == [0, 1] and dag.weight.tolist() == [7.0, 10.0]
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    assert dag.forward_reference(x).tolist() == [[17.0], [4.0]]
    # the I/O model sees one edge, too
    assert tis.count_io(dag, [2], 2).weights == 2


@given(dags())
def test_csr_views_are_consistent(dag):
    src, dst = dag.edges()
    for v in range(dag.n_neurons):  # in-edges grouped by destination, sources ascending
        s = dag.in_src[dag.in_ptr[v]:dag.in_ptr[v + 1]]
        assert (np.diff(s) > 0).all()
    pairs_out = [(u, int(dag.out_dst[e])) for u in range(dag.n_neurons) for e in range(dag.out_ptr[u], dag.out_ptr[u + 1])]
    assert pairs_out == sorted(zip(src.tolist(), dst.tolist()))
    assert (src[dag.out_edge] == np.repeat(np.arange(dag.n_neurons), dag.out_degree())).all()
    assert (dst[dag.out_edge] == dag.out_dst).all()
    assert dag.in_src.dtype == np.int32 and dag.outputs.dtype == np.int32


@given(st.integers(0, 2**31 - 1), st.integers(0, 300), st.integers(1, 50), st.booleans())
def test_native_bucket_sort_equals_numpy(seed, m, n_keys, two_keys):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_keys, size=m)
    b = rng.integers(0, n_keys, size=m) if two_keys else None
    assert (dagmod._stable_sort(a, b, n_keys) == dagmod._stable_sort_numpy(a, b)).all()
    assert (dagmod._stable_sort(a.astype(np.int32), None if b is None else b.astype(np.int32), n_keys)
            == dagmod._stable_sort_numpy(a, b)).all()


@given(dags())
def test_levels_native_equals_numpy_and_definition(dag):
    lv = dag.levels()
    assert (lv == dagmod._levels_numpy(dag.n_neurons, dag.n_inputs, dag.in_ptr, dag.out_ptr, dag.out_dst)).all()
    for v in range(dag.n_inputs, dag.n_neurons):
        s = dag.in_src[dag.in_ptr[v]:dag.in_ptr[v + 1]]
        assert lv[v] == (1 + lv[s].max() if s.size else 1)


def test_levels_of_a_long_chain_are_linear_time():
    n = 20000  # the old per-level bincount was O(n · depth): minutes here
    dag = tis.SparseDAG.from_edges(1, np.arange(n - 1), np.arange(1, n), activation="identity")
    assert dag.levels().tolist() == list(range(n))
    assert dagmod._levels_numpy(n, 1, dag.in_ptr, dag.out_ptr, dag.out_dst)[-1] == n - 1


def test_forward_reference_handles_half_precision_and_empty_batch():
    seq = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3))
    dag = tis.SparseDAG.from_module(seq)
    x = torch.randn(6, 5)
    for dt in (torch.float16, torch.bfloat16):
        y = dag.forward_reference(x.to(dt))
        assert y.dtype == dt and rel_err(y.float(), seq(x).detach()) < 2e-2
    assert dag.forward_reference(torch.zeros(0, 5)).shape == (0, 3)


def test_forward_reference_non_layered_mixed_activations_and_outputs_order():
    # outputs in a chosen column order, including an inner neuron
    dag = tis.SparseDAG.from_edges(2, [0, 1, 2, 0, 3], [2, 2, 3, 4, 4], [1.0, -2.0, 3.0, 0.5, 1.0],
                                   [0, 0, 0.1, -0.2, 0.3], outputs=[4, 2], activation=[None, None, "tanh", "relu", "sigmoid"],
                                   dtype=torch.float64)
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    h2 = np.tanh(0.1 + 0.3 - 2 * -0.7)
    h3 = max(0.0, -0.2 + 3 * h2)
    y4 = 1 / (1 + np.exp(-(0.3 + 0.5 * 0.3 + h3)))
    assert torch.allclose(dag.forward_reference(x), torch.tensor([[y4, h2]], dtype=torch.float64), rtol=0, atol=1e-14)


def test_structure_hash_depends_on_structure_only():
    a = tis.SparseDAG.from_edges(2, [0, 1, 2], [2, 2, 3], [1.0, 2.0, 3.0])
    b = tis.SparseDAG.from_edges(2, [1, 2, 0], [2, 3, 2], [9.0, 9.0, 9.0], bias=[0, 0, 5, 5])  # same edges
    c = tis.SparseDAG.from_edges(2, [0, 1, 2], [2, 2, 3], outputs=[3, 2])
    d = tis.SparseDAG.from_edges(2, [0, 2], [2, 3])
    assert a.structure_hash() == b.structure_hash()
    assert len({a.structure_hash(), c.structure_hash(), d.structure_hash()}) == 3


def test_to_dense_layers_round_trip():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2), nn.Sigmoid())
    dag = tis.SparseDAG.from_module(seq)
    layers = dag.to_dense_layers()
    assert torch.equal(layers[0][0], seq[0].weight.detach()) and torch.equal(layers[1][1], seq[2].bias.detach())
    assert [str(a) for _, _, a in layers] == ["relu", "sigmoid"]


def test_pickle_round_trip_drops_caches():
    import pickle

    seq = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    dag = tis.SparseDAG.from_module(seq)
    x = torch.randn(2, 5)
    y = dag.forward_reference(x)
    tis.count_io(dag, tis.plan(dag, 3).order, 3)  # fills the native-array cache
    blob = pickle.dumps(dag)
    back = pickle.loads(blob)
    assert not hasattr(back, "_lp") and not hasattr(back, "_native_cache")
    assert torch.equal(back.forward_reference(x), y)
    assert back.structure_hash() == dag.structure_hash()
    assert tis.count_io(back, tis.plan(back, 3).order, 3) == tis.count_io(dag, tis.plan(dag, 3).order, 3)


def test_forward_reference_is_differentiable_in_the_input():
    # The reference is also the gradient oracle: autograd through it must work (no in-place clobbering).
    seq = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.GELU()).double()
    dag = tis.SparseDAG.from_module(seq)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dag.forward_reference, (x,))
    x2 = x.detach().clone().requires_grad_(True)
    seq(x2).sum().backward()
    dag.forward_reference(x).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
