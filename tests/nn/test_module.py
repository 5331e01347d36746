"""IOSparseNetwork: equivalence with the pruned model, parameters, buffers, copies, errors."""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, strategies as st
from torch import nn

from torch_iosparse import SparseDAG, ops
from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.testing.models import pruned_sequential


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_equals_pruned_model_and_counts_parameters():
    seq = pruned_sequential()
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
    net = IOSparseNetwork(pruned_sequential(), memory=8)
    r = repr(net)
    s = net.summary()
    for part in ("sizes=12x24x16x6", f"nnz={net.nnz}", "density=", "M=8", f"LB={s['lb']}", f"UB={s['ub']}",
                 f"io={s['io'].total}"):
        assert part in r, (part, r)
    assert s["lb"] <= s["io"].total <= s["ub"]


def test_leading_dims_and_1d_input():
    seq = pruned_sequential()
    net = IOSparseNetwork(seq)
    x = torch.randn(2, 3, 12)
    assert net(x).shape == (2, 3, 6)
    assert rel_err(net(x), seq(x)) <= 1e-5
    assert rel_err(net(x[0, 0]), seq(x[0, 0])) <= 1e-5


def test_wrong_width_is_an_error_naming_the_expected_width():
    net = IOSparseNetwork(pruned_sequential())
    with pytest.raises(ValueError, match=r"width 12"):
        net(torch.randn(4, 13))
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.ones(4, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="SparseDAG or an nn.Module"):
        IOSparseNetwork([1, 2, 3])
    with pytest.raises(ValueError, match="unknown planning method"):
        IOSparseNetwork(pruned_sequential(), method="nope")


def test_to_dense_is_equivalent_sequential():
    seq = pruned_sequential()
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
    seq = pruned_sequential()
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
    net = IOSparseNetwork(pruned_sequential(), dtype=torch.float64)
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


def op_arguments(net):
    """The (net, config, full bias) arguments the module passes to the op, for ops.reference_*."""
    net_list, config = ops._op_args({k: getattr(net, "op_" + k) for k in net._op_keys}, net._op_meta)
    return net_list, config, nn.functional.pad(net.bias.detach(), (net.n_inputs, 0))


def reference_grads(fn, inputs, grad):
    """Autograd gradients of ``fn(*inputs)`` against ``grad`` (float64 inputs)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, grad, allow_unused=True, materialize_grads=True)


@given(random_dags(), st.integers(1, 4))
def test_reference_forward_matches_dag_reference(dag, batch):
    x = torch.randn(batch, dag.n_inputs, dtype=torch.float64)
    net_list, config, bias = op_arguments(IOSparseNetwork(dag, memory=3, cache=False))
    y = ops.reference_forward(x, dag.weight, dag.bias, net_list, config)
    torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-12, atol=1e-12)


@given(random_dags())
def test_module_matches_dag_reference_and_gradcheck(dag):
    net = IOSparseNetwork(dag, memory=3, cache=False)
    x = torch.randn(3, dag.n_inputs, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(net(x), dag.forward_reference(x), rtol=1e-10, atol=1e-10)
    # the module's gradients (the op's backward) against finite differences
    w = dag.weight.clone().requires_grad_(dag.n_edges > 0)
    b = dag.bias[dag.n_inputs:].clone().requires_grad_()
    net_list, config, _ = op_arguments(net)
    full = lambda b: nn.functional.pad(b, (dag.n_inputs, 0))  # noqa: E731
    torch.autograd.gradcheck(lambda x, w, b: ops.dag_forward(x, w, full(b), dict(zip(ops.NET_KEYS, net_list)),
                                                             net._op_meta), (x, w, b))
    # the reference's hand-written backward (transposed DAG) against autograd through the DAG's evaluator
    g = torch.randn(3, dag.n_outputs, dtype=torch.float64)

    def through_dag(x, w, b):
        d = copy.copy(dag)
        d.weight, d.bias = w, b
        return d.forward_reference(x)

    want = reference_grads(through_dag, (x, dag.weight, dag.bias), g)
    got = ops.reference_backward(g, x.detach(), dag.weight, dag.bias, net_list, config)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_cpu_forward_runs_the_native_op_and_matches_the_reference():
    seq = pruned_sequential()
    net = IOSparseNetwork(seq, memory=5)
    assert net.summary()["strategy"].startswith(("auto", "program", "level", "dense"))
    x = torch.randn(7, 12, requires_grad=True)
    y = net(x)
    assert rel_err(y, seq(x)) <= 1e-5
    assert torch._C._dispatch_has_kernel_for_dispatch_key("iosparse::dag_forward", "CPU")  # the C++ kernel
    # the op's pure-PyTorch reference kernels on the same arguments: same values and grads
    net_list, config, bias = op_arguments(net)
    yr = ops.reference_forward(x.detach(), net.weight.detach(), bias, net_list, config)
    torch.testing.assert_close(y.detach(), yr, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, net.weight, net.bias), g)
    rx, rw, rb = ops.reference_backward(g, x.detach(), net.weight.detach(), bias, net_list, config)
    for a, b in ((gx, rx), (gw, rw), (gb, rb[net.n_inputs:])):
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
    for dt in (torch.float16, torch.bfloat16):  # run by the CPU kernel in float32, cast back
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
def test_reference_sparse_mm_and_gather_levels_agree(min_work, monkeypatch):
    """The op's reference runs big levels as CSR matmuls and small ones as gathers: check both."""
    monkeypatch.setattr(ops.reference, "SPARSE_MM_MIN_WORK", min_work)
    torch.manual_seed(6)
    seq = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))
    for m in seq:
        if type(m) is nn.Linear:
            prune.l1_unstructured(m, "weight", 0.6)
    seq = seq.double()
    net = IOSparseNetwork(seq, cache=False)
    net_list, config, bias = op_arguments(net)
    x = torch.randn(5, 10, dtype=torch.float64)
    w = net.weight.detach()
    fn = lambda x, w, b: ops.reference_forward(x, w, b, net_list, config)  # noqa: E731
    torch.testing.assert_close(fn(x, w, bias), seq(x), rtol=1e-10, atol=1e-10)
    # hand-written backward against autograd through the module's native op (float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    bufs = dict(zip(ops.NET_KEYS, net_list))
    want = reference_grads(lambda x, w, b: ops.dag_forward(x, w, b, bufs, net._op_meta), (x, w, bias), g)
    for a, e in zip(ops.reference_backward(g, x, w, bias, net_list, config), want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    for dt in (torch.bfloat16, torch.float16, torch.float32):  # low precision accumulates in float32
        y = fn(x.to(dt), w.to(dt), bias.to(dt))
        assert y.dtype == dt and rel_err(y.double(), seq(x)) <= 2e-2
        gx, gw, gb = ops.reference_backward(g.to(dt), x.to(dt), w.to(dt), bias.to(dt), net_list, config)
        assert (gx.dtype, gw.dtype, gb.dtype) == (dt, dt, dt)
        for a, e in zip((gx, gw, gb), want):
            assert rel_err(a.double(), e) <= 2e-2


def test_stale_pruned_weight_attribute_is_refreshed():
    seq = pruned_sequential()
    with torch.no_grad():
        seq[0].weight_orig.mul_(3.0)  # prune's `weight` attribute is stale until the next forward
    seq = seq.double()
    net = IOSparseNetwork(seq)
    assert net.weight.dtype == torch.float64
    x = torch.randn(3, 12, dtype=torch.float64)
    assert rel_err(net(x), seq(x)) <= 1e-12
