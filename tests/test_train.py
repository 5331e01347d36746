"""Training: gradients equal the masked dense model's, optimizer steps keep the sparsity pattern."""
import copy

import pytest
import torch
from torch import nn

from torch_iosparse.module import IOSparseNetwork
from torch_iosparse.sparsify import sparsify

from test_module import pruned_mlp


def pruned(seed=0):
    return pruned_mlp((10, 32, 16, 3), 0.8, (nn.Tanh, nn.ReLU), seed=seed)


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
