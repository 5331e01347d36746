"""Small PyTorch models shared by the module, sparsify, checkpoint, explain and CLI tests: pruned MLPs,
a nested model with networks at dotted paths, and a BERT-shaped encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn


def pruned_sequential(sizes=(12, 24, 16, 6), amount=0.8, acts=(nn.ReLU, nn.GELU), seed=0):
    """nn.Sequential of Linear layers pruned with torch.nn.utils.prune (l1, ``amount``), activations between."""
    torch.manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        lin = nn.Linear(sizes[k], sizes[k + 1])
        prune.l1_unstructured(lin, "weight", amount)
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(acts[k % len(acts)]())
    return nn.Sequential(*layers)


def two_chains():
    """Two chains of pruned Linear layers split by a LayerNorm (two networks once sparsified: "0" and "4")."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    for x in m:
        if type(x) is nn.Linear:
            prune.l1_unstructured(x, "weight", 0.85)
    return m


class Residual(nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.ffn = ffn

    def forward(self, x):
        return x + self.ffn(x)


def nested():
    """Networks at dotted paths: 1.ffn.0 and 2."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.LayerNorm(8), Residual(nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8))),
                      nn.Linear(8, 5))
    for x in m.modules():
        if type(x) is nn.Linear:
            prune.l1_unstructured(x, "weight", 0.8)
    return m


# ---------------------------------------------------------------------- a BERT-shaped encoder
D, M = 8, 16


class GELUActivation(nn.Module):
    """Like Hugging Face's: a module whose forward is one functional call."""

    def __init__(self):
        super().__init__()
        self.act = F.gelu

    def forward(self, input):
        return self.act(input)


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


class Intermediate(nn.Module):
    def __init__(self, d, act):
        super().__init__()
        self.dense = nn.Linear(d, 4 * d)
        self.intermediate_act_fn = act

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class Output(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(4 * d, d)
        self.LayerNorm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class Layer(nn.Module):
    def __init__(self, d, act):
        super().__init__()
        self.attention = SelfAttention(d)
        self.intermediate = Intermediate(d, act)
        self.output = Output(d)

    def forward(self, x):
        a = x + self.attention(x)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    """BertModel-shaped: attribute Linears in separate modules, residual + LayerNorm around the FFN."""

    def __init__(self, d=D, n_layers=2, act=GELUActivation):
        super().__init__()
        self.layer = nn.ModuleList([Layer(d, act()) for _ in range(n_layers)])
        self.pooler = nn.Linear(d, d)

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x, torch.tanh(self.pooler(x[:, 0]))


def pruned_encoder(seed=0, act=GELUActivation, n_layers=2):
    torch.manual_seed(seed)
    model = Encoder(act=act, n_layers=n_layers).eval()
    for layer in model.layer:
        for lin in (layer.intermediate.dense, layer.output.dense):
            prune.l1_unstructured(lin, "weight", amount=0.9)
    return model


def assert_same_outputs(a, b, x):
    with torch.no_grad():
        for u, v in zip(a(x), b(x)):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
