"""Training: gradients equal the masked dense model's, optimizer steps keep the sparsity pattern, a whole train step
compiles as one graph, and what is saved for backward is no more than the masked dense model saves."""
import copy

import pytest
import torch
from torch import nn

from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.nn.sparsify import sparsify

from torch_iosparse.testing.models import pruned_sequential


def pruned(seed=0):
    return pruned_sequential((10, 32, 16, 3), 0.8, (nn.Tanh, nn.ReLU), seed=seed)


def test_gradients_equal_masked_dense_gradients():
    dense = pruned()
    net = IOSparseNetwork(dense)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(dense(x), y).backward()
    nn.functional.cross_entropy(net(x), y).backward()
    grads = []
    for lin in (dense[0], dense[2], dense[4]):
        mask = lin.weight_mask.bool()
        grads.append(lin.weight_orig.grad[mask])  # row-major = the network's in-edge order
    torch.testing.assert_close(net.weight.grad, torch.cat(grads), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bias.grad, torch.cat([dense[i].bias.grad for i in (0, 2, 4)]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_steps_keep_the_sparsity_pattern(opt):
    dense = pruned(1)
    model = sparsify(nn.Sequential(dense, nn.LayerNorm(3)))
    net = model[0][0]
    pattern = [(lin.weight_mask != 0) for lin in (dense[0], dense[2], dense[4])]
    o = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt == "sgd"
         else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    w0 = net.weight.detach().clone()
    losses = []
    for _ in range(5):
        o.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        o.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(net.weight, w0) and net.weight.shape == w0.shape
    layers = [m for m in net.to_dense() if isinstance(m, nn.Linear)]
    for lin, pat in zip(layers, pattern):
        assert torch.all(lin.weight[~pat] == 0)  # zeros are not parameters: they stay zero
    assert set(n for n, _ in model.named_parameters()) == {"0.0.weight", "0.0.bias", "1.weight", "1.bias"}


def test_train_eval_and_no_grad_modes():
    net = IOSparseNetwork(pruned(2))
    x = torch.randn(4, 10, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert not y.requires_grad
    frozen = copy.deepcopy(net).requires_grad_(False)
    assert frozen(x).requires_grad  # still differentiable w.r.t. the input


def test_whole_train_step_compiles_fullgraph_and_matches_eager():
    """forward + loss + backward + optimizer update as one torch.compile(fullgraph=True) graph (Inductor, CPU).

    ``loss.backward()`` inside a compiled function needs dynamo's ``trace_autograd_ops``; ``Optimizer.step()``
    itself holds a deliberate graph break (torch/optim/optimizer.py, ``_use_grad``), so the update is the
    optimizer's functional form (``torch.optim.sgd.sgd``), which the eager ``torch.optim.SGD`` also runs."""
    import importlib

    import torch._dynamo
    from torch._dynamo.utils import counters

    sgd = importlib.import_module("torch.optim.sgd").sgd
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(pruned(3), nn.LayerNorm(3)), tune=False)
    eager = copy.deepcopy(model)
    params = list(model.parameters())
    initial = [p.detach().clone() for p in params]
    momentum = [torch.zeros_like(p) for p in params]  # SGD's first step: buffer = grad = 0 * 0.9 + grad
    hyper = dict(weight_decay=1e-3, momentum=0.9, lr=0.1, dampening=0.0, nesterov=False, maximize=False)

    def train_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():
            sgd(params, [p.grad for p in params], momentum, foreach=False, **hyper)
        for p in params:
            p.grad = None
        return loss.detach()

    opt = torch.optim.SGD(eager.parameters(), foreach=False, **{k: v for k, v in hyper.items() if k != "maximize"})
    batches = [(torch.randn(16, 10), torch.randint(0, 3, (16,))) for _ in range(3)]
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(train_step, fullgraph=True)
        losses = [compiled(x, y) for x, y in batches]
    for (x, y), loss in zip(batches, losses):
        opt.zero_grad()
        ref = nn.functional.cross_entropy(eager(x), y)
        ref.backward()
        opt.step()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    for (name, p), q, p0 in zip(model.named_parameters(), eager.parameters(), initial):
        assert not torch.equal(p, p0), name  # trained
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("batch", [16, 256])
def test_saved_for_backward_is_no_more_than_the_masked_dense_model(batch):
    """What autograd keeps for backward (saved-tensor hooks, distinct storages; benchmarks/train_speed.py's
    measure) on a 3-layer MLP at 90 % sparsity: what a step allocates for it (neither the model's parameters
    and buffers nor the input) and everything, the references to the model's tensors included."""
    import os
    import sys

    from torch.nn.utils import prune

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
    from train_speed import masked_mlp, saved_tensor_bytes

    dense = masked_mlp([256, 256, 256, 64], 0.9)
    assert all(prune.is_pruned(m) for m in dense[::2])
    ours = sparsify(dense, tune=False)
    x = torch.randn(batch, 256)
    dense_step, dense_all = saved_tensor_bytes(dense, x)
    ours_step, ours_all = saved_tensor_bytes(ours, x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours(x).sum()
    biggest = sorted(((t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype)) for t in saved), reverse=True)[:6]
    assert ours_step <= dense_step, (ours_step, dense_step, biggest)
    assert ours_all <= dense_all, (ours_all, dense_all, biggest)
