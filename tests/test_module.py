"""IOSparseNetwork: equivalence with the pruned model, parameters, buffers, copies, errors."""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, strategies as st
from torch import nn

from torch_iosparse import SparseDAG
from torch_iosparse.module import _REF_KEYS, IOSparseNetwork, reference_forward, reference_op, reference_prepare


def pruned_mlp(sizes=(12, 24, 16, 6), amount=0.8, acts=(nn.ReLU, nn.GELU), seed=0):
    torch.manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        lin = nn.Linear(sizes[k], sizes[k + 1])
        prune.l1_unstructured(lin, "weight", amount)
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(acts[k % len(acts)]())
    return nn.Sequential(*layers)


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_IOSPARSE_CACHE", str(tmp_path / "cache"))


def test_equals_pruned_model_and_counts_parameters():
    seq = pruned_mlp()
    net = IOSparseNetwork(seq)
    x = torch.randn(9, 12)
    assert rel_err(net(x), seq(x)) <= 1e-5
    nnz = sum(int(m.weight_mask.sum()) for m in seq if isinstance(m, nn.Linear))
    params = dict(net.named_parameters())
    assert set(params) == {"weight", "bias"}
    assert params["weight"].shape == (nnz,) and params["bias"].shape == (24 + 16 + 6,)
    assert all(not k.startswith(("weight", "bias")) for k, _ in net.named_buffers())
    assert net.nnz == nnz and net.n_inputs == 12 and net.n_outputs == 6


def test_extra_repr_shows_sizes_density_memory_and_bounds():
    net = IOSparseNetwork(pruned_mlp(), memory=8)
    r = repr(net)
    s = net.summary()
    for part in ("sizes=12x24x16x6", f"nnz={net.nnz}", "density=", "M=8", f"LB={s['lb']}", f"UB={s['ub']}",
                 f"io={s['io'].total}"):
        assert part in r, (part, r)
    assert s["lb"] <= s["io"].total <= s["ub"]


def test_leading_dims_and_1d_input():
    seq = pruned_mlp()
    net = IOSparseNetwork(seq)
    x = torch.randn(2, 3, 12)
    assert net(x).shape == (2, 3, 6)
    assert rel_err(net(x), seq(x)) <= 1e-5
    assert rel_err(net(x[0, 0]), seq(x[0, 0])) <= 1e-5


def test_wrong_width_is_an_error_naming_the_expected_width():
    net = IOSparseNetwork(pruned_mlp())
    with pytest.raises(ValueError, match=r"width 12"):
        net(torch.randn(4, 13))
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.ones(4, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="SparseDAG or an nn.Module"):
        IOSparseNetwork([1, 2, 3])
    with pytest.raises(ValueError, match="unknown planning method"):
        IOSparseNetwork(pruned_mlp(), method="nope")


def test_to_dense_is_equivalent_sequential():
    seq = pruned_mlp()
    net = IOSparseNetwork(seq)
    dense = net.to_dense()
    assert isinstance(dense, nn.Sequential)
    assert [type(m) for m in dense] == [nn.Linear, nn.ReLU, nn.Linear, nn.GELU, nn.Linear]
    x = torch.randn(5, 12)
    assert rel_err(dense(x), seq(x)) <= 1e-6


def test_to_dense_rejects_general_dag():
    dag = SparseDAG.from_edges(2, [0, 1, 0, 2], [2, 2, 3, 3], [1.0, 2.0, 3.0, 4.0])
    net = IOSparseNetwork(dag)
    with pytest.raises(ValueError, match="layered"):
        net.to_dense()


def test_deepcopy_pickle_and_to():
    seq = pruned_mlp()
    net = IOSparseNetwork(seq)
    x = torch.randn(3, 12)
    ref = seq(x)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert rel_err(clone(x), ref) <= 1e-5
        assert clone.weight.data_ptr() != net.weight.data_ptr()
    n64 = copy.deepcopy(net).to(torch.float64)
    assert n64.weight.dtype == torch.float64
    assert n64(x.double()).dtype == torch.float64
    assert rel_err(n64(x.double()), seq.double()(x.double())) <= 1e-10


def test_dtype_argument_and_mismatch_error():
    net = IOSparseNetwork(pruned_mlp(), dtype=torch.float64)
    assert net.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="float64 weights but the input is torch.float32"):
        net(torch.randn(2, 12))


@st.composite
def random_dags(draw):
    n_in = draw(st.integers(1, 5))
    n = n_in + draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    src, dst = [], []
    for v in range(n_in, n):
        k = rng.integers(0, min(v, 4) + 1)
        for u in rng.choice(v, size=k, replace=False):
            src.append(int(u)); dst.append(v)
    w = rng.normal(size=len(src))
    b = rng.normal(size=n)
    kinds = ["relu", "tanh", "identity", "sigmoid", "gelu", "hardtanh(-0.5,0.5)"]
    act = [kinds[i] for i in rng.integers(0, len(kinds), size=n)]
    return SparseDAG.from_edges(n_in, src, dst, torch.tensor(w, dtype=torch.float64),
                                torch.tensor(b, dtype=torch.float64), n_neurons=n, activation=act)


@given(random_dags(), st.integers(1, 4))
def test_reference_forward_matches_dag_reference(dag, batch):
    x = torch.randn(batch, dag.n_inputs, dtype=torch.float64)
    bufs, meta = reference_prepare(dag)
    y = reference_forward(x, dag.weight, dag.bias[dag.n_inputs:], bufs, meta)
    torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-12, atol=1e-12)


@given(random_dags())
def test_module_matches_dag_reference_and_gradcheck(dag):
    net = IOSparseNetwork(dag, memory=3, cache=False)
    x = torch.randn(3, dag.n_inputs, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(net(x), dag.forward_reference(x), rtol=1e-10, atol=1e-10)
    # the reference custom op's hand-written backward (transposed DAG) against finite differences
    bufs, _ = reference_prepare(dag)
    ref = [bufs[k] for k in _REF_KEYS]
    w = dag.weight.clone().requires_grad_(dag.n_edges > 0)
    b = dag.bias[dag.n_inputs:].clone().requires_grad_()
    torch.autograd.gradcheck(lambda x, w, b: reference_op(x, w, b, ref, dag.n_neurons), (x, w, b))


def test_cpu_forward_dispatches_to_the_native_op_and_matches_the_reference(monkeypatch):
    from torch_iosparse import module as mod
    if mod._ops_module() is None:
        pytest.fail("the native op torch.ops.iosparse.dag_forward is not built")
    seq = pruned_mlp()
    net = IOSparseNetwork(seq, memory=5)
    assert net.summary()["strategy"] != "reference"
    calls = []
    monkeypatch.setattr(mod, "reference_op", lambda *a: calls.append(1))  # must not be reached on CPU
    x = torch.randn(7, 12, requires_grad=True)
    y = net(x)
    assert not calls and rel_err(y, seq(x)) <= 1e-5
    monkeypatch.undo()
    # the same module with the native op switched off runs the reference op: same values and grads
    ref_net = copy.deepcopy(net)
    ref_net._op_meta = None
    yr = ref_net(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, net.weight, net.bias), g)
    rx, rw, rb = torch.autograd.grad(yr, (x, ref_net.weight, ref_net.bias), g)
    for a, b in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@given(random_dags(), st.sampled_from([2, 3, 16, None]), st.integers(1, 70))
def test_native_and_reference_paths_agree(dag, memory, batch):
    net = IOSparseNetwork(dag, memory=memory, cache=False, dtype=torch.float32)
    x = torch.randn(batch, dag.n_inputs)
    y = net(x)
    expect = dag.forward_reference(x.double()).float()
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5)


def test_dtype_conversions_keep_structure_exact():
    torch.manual_seed(4)
    seq = nn.Sequential(nn.Linear(12, 20), nn.Hardtanh(-0.3, 0.7), nn.Linear(20, 6))
    for m in seq:
        if type(m) is nn.Linear:
            prune.l1_unstructured(m, "weight", 0.7)
    x = torch.randn(5, 12)
    back = IOSparseNetwork(seq).double().float()  # kernel buffers keep their own dtype
    assert rel_err(back(x), seq(x)) <= 1e-5
    assert back.to_dag().activations[0] == ("hardtanh", -0.3, 0.7)  # bounds never rounded
    for dt in (torch.float16, torch.bfloat16):  # no CPU kernel for these: the reference op runs
        low = IOSparseNetwork(seq).to(dt)
        assert low(x.to(dt)).dtype == dt
        assert rel_err(low(x.to(dt)).float(), seq(x)) <= 3e-2
        assert low.to_dag().activations[0] == ("hardtanh", -0.3, 0.7)


def test_linears_without_bias_keep_no_trainable_bias():
    torch.manual_seed(5)
    seq = nn.Sequential(nn.Linear(12, 20, bias=False), nn.GELU(), nn.Linear(20, 6, bias=False))
    for m in seq:
        if type(m) is nn.Linear:
            prune.l1_unstructured(m, "weight", 0.7)
    net = IOSparseNetwork(seq)
    assert [n for n, _ in net.named_parameters()] == ["weight"]
    assert "bias" in net.state_dict() and not net.bias.any()
    x = torch.randn(4, 12)
    assert rel_err(net(x), seq(x)) <= 1e-5
    net(x).sum().backward()
    assert net.weight.grad is not None
    dense = net.to_dense()
    assert all(m.bias is None for m in dense if isinstance(m, nn.Linear))
    fresh = IOSparseNetwork(seq)
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert [n for n, _ in IOSparseNetwork(seq, train_bias=True).named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize("min_work", [0, 1 << 62])
def test_reference_op_sparse_mm_and_gather_levels_agree(min_work, monkeypatch):
    """The reference op runs big levels as CSR matmuls and small ones as gathers: check both."""
    from torch_iosparse import module as mod
    monkeypatch.setattr(mod, "SPARSE_MM_MIN_WORK", min_work)
    torch.manual_seed(6)
    seq = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))
    for m in seq:
        if type(m) is nn.Linear:
            prune.l1_unstructured(m, "weight", 0.6)
    seq = seq.double()
    net = IOSparseNetwork(seq, cache=False)
    ref = [getattr(net, k) for k in _REF_KEYS]
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    w = net.weight.detach().clone().requires_grad_()
    b = net.bias.detach().clone().requires_grad_()
    fn = lambda x, w, b: reference_op(x, w, b, ref, net.summary()["n_neurons"])  # noqa: E731
    torch.testing.assert_close(fn(x, w, b), seq(x), rtol=1e-10, atol=1e-10)
    torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    for dt in (torch.bfloat16, torch.float32):  # low precision accumulates in float32
        y = reference_op(x.detach().to(dt), w.detach().to(dt), b.detach().to(dt), ref, net.summary()["n_neurons"])
        assert y.dtype == dt and rel_err(y.double(), seq(x)) <= 2e-2


def test_stale_pruned_weight_attribute_is_refreshed():
    seq = pruned_mlp()
    with torch.no_grad():
        seq[0].weight_orig.mul_(3.0)  # prune's `weight` attribute is stale until the next forward
    seq = seq.double()
    net = IOSparseNetwork(seq)
    assert net.weight.dtype == torch.float64
    x = torch.randn(3, 12, dtype=torch.float64)
    assert rel_err(net(x), seq(x)) <= 1e-12
