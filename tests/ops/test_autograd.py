"""Training-side behaviour of the op: double backward (gradient penalties) is correct, torch.autocast behaves
like nn.Linear on every path, and torch.func (vmap, grad, jacrev) works through the op."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_iosparse as tis
from torch_iosparse import SparseDAG, ops
from torch_iosparse.testing.networks import random_dags, sample_inputs

STRATEGIES = ["program", "level", "panel", "block", "dense"]


def masked_mlp(dtype=torch.float64, seed=0, sizes=(6, 10, 8, 3)):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(a, b).to(dtype)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(b, a, generator=g) < 0.6)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def sparse_net(model, strategy):
    return tis.IOSparseNetwork(model, cache=False, tune=False, strategy=strategy, memory=4)


@given(dag=random_dags(max_inputs=3, max_computed=6), strategy=st.sampled_from(["program", "level", "auto"]),
       batch=st.sampled_from([1, 3]))
@settings(max_examples=12)
def test_gradgradcheck_float64(dag, strategy, batch):
    net = ops.prepare(dag, memory=3, strategy=strategy, batch_tile=8, dtype=torch.float64)
    x = torch.randn(batch, dag.n_inputs, dtype=torch.float64, requires_grad=True)
    w = dag.weight.clone().requires_grad_(True)
    b = dag.bias.clone().requires_grad_(True)
    f = lambda x, w, b: ops.dag_forward(x, w, b, net.buffers, net.meta)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_penalty_equals_masked_dense(strategy):
    model = masked_mlp()
    net = sparse_net(model, strategy)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)

    def penalty(f):
        g, = torch.autograd.grad(f(x).pow(2).sum(), x, create_graph=True)
        return g.pow(2).sum()

    penalty(net).backward()
    penalty(model).backward()
    dense_w = torch.cat([l.weight.grad[l.weight != 0] for l in model[::2]])
    assert net.weight.grad.abs().sum() > 0  # never silent zeros
    torch.testing.assert_close(net.weight.grad, dense_w)
    torch.testing.assert_close(net.bias.grad, torch.cat([l.bias.grad for l in model[::2]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("batch", [1, 64])
def test_autocast_like_linear(dtype, strategy, batch):
    model = masked_mlp(torch.float32)
    net = sparse_net(model, strategy)
    x = torch.randn(batch, 6)
    with torch.autocast("cpu", dtype=dtype):
        y = net(x)
        want = model(x)
    assert y.dtype == want.dtype == dtype
    torch.testing.assert_close(y.float(), want.float(), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert net.weight.grad is not None and net.weight.grad.dtype == torch.float32 and net.weight.grad.isfinite().all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_calls_without_a_graph_equal_the_graph_path(strategy):
    """Calls that record no graph (no_grad, inference_mode, nothing requiring grad) dispatch below autograd:
    the same values as a recorded call, no grad_fn, and autocast still applies."""
    for s in sample_inputs(dtype=torch.float32, requires_grad=True):
        if strategy == "dense" and not s.layered:
            continue
        net = ops.prepare(s.dag, memory=4, strategy=strategy, tune=False)
        recorded = ops.dag_forward(s.x, s.weight, s.bias, net.buffers, net.meta)
        assert recorded.grad_fn is not None
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                y = ops.dag_forward(s.x, s.weight, s.bias, net.buffers, net.meta)
            assert y.grad_fn is None
            torch.testing.assert_close(y, recorded.detach(), rtol=0, atol=0, msg=lambda m: f"{s.name}: {m}")
        plain = ops.dag_forward(s.x.detach(), s.weight.detach(), s.bias.detach(), net.buffers, net.meta)
        torch.testing.assert_close(plain, recorded.detach(), rtol=0, atol=0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            low = ops.dag_forward(s.x, s.weight, s.bias, net.buffers, net.meta)
        assert low.dtype == torch.bfloat16


def test_vmap_over_inputs_and_ensembles():
    model = masked_mlp(torch.float32)
    net = sparse_net(model, "auto")
    xs = torch.randn(4, 5, 6)
    torch.testing.assert_close(torch.func.vmap(net)(xs), torch.stack([net(x) for x in xs]))
    # vmap over weights (an ensemble of the same sparsity pattern)
    ws = net.weight.detach() * torch.rand(3, 1)
    bias = nn.functional.pad(net.bias.detach(), (6, 0))
    bufs = {k: net._buffers["op_" + k] for k in net._op_keys}
    f = lambda w: ops.dag_forward(xs[0], w, bias, bufs, net._op_meta)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f)(ws), torch.stack([f(w) for w in ws]))


def test_vmap_over_buffers_is_a_clear_error():
    net = sparse_net(masked_mlp(torch.float32), "level")
    bufs = {k: net._buffers["op_" + k] for k in net._op_keys}
    bias = nn.functional.pad(net.bias.detach(), (6, 0))
    stacked = torch.stack([bufs["act_param"]] * 2)

    x = torch.randn(2, 6)

    def f(p):
        return ops.dag_forward(x, net.weight, bias, dict(bufs, act_param=p), net._op_meta)

    with pytest.raises(ValueError, match="vmap over the network buffers"):
        torch.func.vmap(f)(stacked)


def test_jacrev_and_grad_match_dense():
    model = masked_mlp()
    net = sparse_net(model, "auto")
    x = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(torch.func.jacrev(net)(x), torch.func.jacrev(model)(x))
    g = torch.func.grad(lambda x: net(x).sum())(x)
    torch.testing.assert_close(g, torch.func.grad(lambda x: model(x).sum())(x))
    params = {"weight": net.weight.detach()}
    gw = torch.func.grad(lambda p: torch.func.functional_call(net, p, (x.unsqueeze(0),)).sum())(params)["weight"]
    x1 = x.unsqueeze(0)
    net.zero_grad()
    net(x1).sum().backward()
    torch.testing.assert_close(gw, net.weight.grad)


@pytest.mark.parametrize("strategy", ["level", "block", "program"])
def test_nested_torch_func_transforms_equal_the_dense_model(strategy):
    """grad(grad(f)), jacrev(jacrev(f)) and vmap(grad(f)) through the op equal the masked dense model's;
    a third derivative raises instead of returning a wrong value."""
    model = masked_mlp()
    net = sparse_net(model, strategy)
    x = torch.randn(5, 6, dtype=torch.float64)
    f_sparse = lambda v: net(v.unsqueeze(0)).pow(2).sum()  # noqa: E731
    f_dense = lambda v: model(v.unsqueeze(0)).pow(2).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(lambda v: torch.func.grad(f_sparse)(v).sum())(x[0]),
                               torch.func.grad(lambda v: torch.func.grad(f_dense)(v).sum())(x[0]))
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(f_sparse))(x[0]),
                               torch.func.jacrev(torch.func.jacrev(f_dense))(x[0]))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f_sparse))(x),
                               torch.func.vmap(torch.func.grad(f_dense))(x))
    third = lambda f: torch.func.grad(lambda v: torch.func.grad(lambda u: torch.func.grad(f)(u).sum())(v).sum())  # noqa: E731
    with pytest.raises(NotImplementedError, match="third or higher order"):
        third(f_sparse)(x[0])
