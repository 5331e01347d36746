"""The panel path's cache of panel-ordered weights (kernels/cpu/ordered_weights.cpp, OrderedWeights): a cached
gather must notice every in-place update made through PyTorch (the version counter), new weight tensors
(also ones allocated where a freed one lived), and stay bounded; the switch and the clear op work."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from torch_iosparse.testing.checks import tol
from torch_iosparse import _native, ops
from torch_iosparse.graph.generate import radix_net


@pytest.fixture(autouse=True)
def fresh_cache():
    _native.ops()
    torch.ops.iosparse.clear_panel_weight_cache()
    old = os.environ.pop("IOSPARSE_PANEL_WEIGHT_CACHE", None)
    yield
    torch.ops.iosparse.clear_panel_weight_cache()
    if old is not None:
        os.environ["IOSPARSE_PANEL_WEIGHT_CACHE"] = old


def panel_net(width=64, depth=3, fan=8, seed=0):
    dag = radix_net(width, depth, fan, seed=seed) if seed else radix_net(width, depth, fan)
    net = ops.prepare(dag, memory=None, dtype=torch.float32)
    assert net.meta["panels"] > 0
    return dag, net.buffers, dict(net.meta, strategy=ops.STRATEGIES["panel"])


def reference(dag, weight, bias, x):
    """forward_reference of ``dag`` with other weights (a shallow copy: the structure is shared)."""
    d = copy.copy(dag)
    d.weight, d.bias = weight.detach().double().clone(), bias.detach().double().clone()
    return d.forward_reference(x.double()).float()


def check(dag, bufs, meta, w, b, x):
    got = ops.dag_forward(x, w, b, bufs, meta)
    torch.testing.assert_close(got, reference(dag, w, b, x), **tol(torch.float32))
    return got


def cache_size():
    return int(torch.ops.iosparse.panel_weight_cache_size())


def test_in_place_updates_are_seen():
    dag, bufs, meta = panel_net()
    w, b = dag.weight.float().clone(), dag.bias.float().clone()
    x = torch.randn(40, dag.n_inputs)
    y0 = check(dag, bufs, meta, w, b, x)
    assert cache_size() == 1
    torch.testing.assert_close(ops.dag_forward(x, w, b, bufs, meta), y0)  # a hit: the same result
    w.add_(0.25)
    y1 = check(dag, bufs, meta, w, b, x)
    assert not torch.allclose(y0, y1)
    with torch.no_grad():
        w[::3] = -w[::3]
    check(dag, bufs, meta, w, b, x)
    w.copy_(torch.randn_like(w))
    check(dag, bufs, meta, w, b, x)
    w.view(-1, 1)[5] = 3.0  # through a view: the view shares the version counter
    check(dag, bufs, meta, w, b, x)
    b.mul_(-2)  # bias is read per call, never cached
    check(dag, bufs, meta, w, b, x)
    assert cache_size() == 1  # one network, one weight: one entry, refilled in place


def test_optimizer_steps_are_seen():
    dag, bufs, meta = panel_net()
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(dag.n_edges, generator=g) * 0.3)  # random: live ReLUs, nonzero grads
    b = torch.nn.Parameter(torch.randn(dag.n_neurons, generator=g) * 0.1)
    opt = torch.optim.SGD([w, b], lr=0.5)
    x = torch.randn(33, dag.n_inputs)
    for _ in range(3):
        y = check(dag, bufs, meta, w, b, x)
        opt.zero_grad()
        ((y - 1.0) ** 2).mean().backward()
        before = w.detach().clone()
        opt.step()
        assert not torch.equal(before, w.detach())
    check(dag, bufs, meta, w, b, x)
    opt2 = torch.optim.Adam([w], lr=0.1, foreach=False)
    y = ops.dag_forward(x, w, b, bufs, meta)
    opt2.zero_grad()
    y.sum().backward()
    opt2.step()
    check(dag, bufs, meta, w, b, x)


def test_new_tensors_at_a_reused_address_are_not_confused():
    """Fresh weight tensors each call (freed right after): the cache holds the old ones, so a new tensor
    never reuses a cached tensor's address with the same version."""
    dag, bufs, meta = panel_net()
    x = torch.randn(20, dag.n_inputs)
    for k in range(8):
        w = dag.weight.float() * (1 + k)
        check(dag, bufs, meta, w, dag.bias.float(), x)
        del w
    assert cache_size() <= 4  # bounded


def test_several_networks_and_dtypes():
    nets = [panel_net(64, 3, 8), panel_net(128, 2, 8)]
    for dtype in (torch.float32, torch.float64):
        for _ in range(2):
            for dag, bufs, meta in nets:
                x = torch.randn(17, dag.n_inputs, dtype=dtype)
                w, b = dag.weight.to(dtype), dag.bias.to(dtype)
                got = ops.dag_forward(x, w, b, bufs, meta)
                want = dag.forward_reference(x.double()).to(dtype)
                torch.testing.assert_close(got, want, **tol(dtype))
    assert 1 <= cache_size() <= 4


def test_inference_tensors_are_not_cached():
    dag, bufs, meta = panel_net()
    x = torch.randn(9, dag.n_inputs)
    with torch.inference_mode():
        w, b = dag.weight.float().clone(), dag.bias.float().clone()
        check(dag, bufs, meta, w, b, x)
        assert cache_size() == 0
        w.mul_(0.5)  # inference tensors have no version counter
        check(dag, bufs, meta, w, b, x)
    assert cache_size() == 0


def test_switch_off_and_clear():
    dag, bufs, meta = panel_net()
    w, b = dag.weight.float().clone(), dag.bias.float().clone()
    x = torch.randn(12, dag.n_inputs)
    os.environ["IOSPARSE_PANEL_WEIGHT_CACHE"] = "0"
    check(dag, bufs, meta, w, b, x)
    assert cache_size() == 0
    del os.environ["IOSPARSE_PANEL_WEIGHT_CACHE"]
    check(dag, bufs, meta, w, b, x)
    assert cache_size() == 1
    # A write to a single element that bypasses the version counter (.data) is not seen until the
    # cache is cleared (documented limit; the spot check of 64 cells may or may not sample it).
    w.data[7] += 1.0
    ops.clear_panel_weight_cache()
    assert cache_size() == 0 == ops.panel_weight_cache_size()
    check(dag, bufs, meta, w, b, x)


@pytest.mark.parametrize("update", ["mul", "add", "copy"])
def test_whole_tensor_writes_through_data_are_caught(update):
    """Hand-written SGD (`p.data.add_(...)`) bypasses the version counter; the spot check of a hit (64
    cells compared with their weights) sees writes that touch the whole tensor."""
    dag, bufs, meta = panel_net()
    w = torch.randn(dag.n_edges)
    b = torch.randn(dag.n_neurons) * 0.1
    x = torch.randn(12, dag.n_inputs)
    check(dag, bufs, meta, w, b, x)
    if update == "mul":
        w.data.mul_(-0.5)
    elif update == "add":
        w.data.add_(torch.randn_like(w) * 1e-3)
    else:
        w.data.copy_(torch.randn_like(w))
    check(dag, bufs, meta, w, b, x)
