"""Fuzz cases for the op, its config and IOSparseNetwork's state dict (run by tests/ops/test_fuzz.py).

Each case takes a valid prepared network, mutates it at random (a buffer element set to an extreme value,
a buffer truncated, extended, emptied, recast, made non-contiguous or permuted; a config value; a state-dict
entry; or a buffer written through numpy after it was validated, which bypasses the version counter) and
runs forward (and backward) on every strategy. A case passes when it returns or raises a Python exception:
the process must not crash or hang. Usage: ``python -m torch_iosparse.testing.fuzz_cases SEED FIRST COUNT``; it prints
``case K`` before case K, so the parent can name the case that crashed.
"""
from __future__ import annotations

import io
import random
import sys

import numpy as np
import torch
from torch import nn

import torch_iosparse as tis
from torch_iosparse import SparseDAG, ops

STRATEGIES = ("program", "level", "panel", "block", "dense")
EXTREMES = (-2**31, -2**15, -257, -2, -1, 0, 1, 2, 3, 255, 256, 2**15, 2**31 - 1)


def networks():
    """(name, dag, {strategy: CompiledNetwork}, module): a layered MLP, a DAG with skip edges, a
    radix-like net whose neighbours share sources (panels)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))
    with torch.no_grad():
        for lin in mlp[::2]:
            lin.weight.mul_(torch.rand_like(lin.weight) < 0.4)
    rng = np.random.default_rng(1)
    n_in, n = 6, 20
    src, dst = [], []
    for v in range(n_in, n):
        for u in rng.choice(v, size=min(v, 4), replace=False):
            src.append(int(u))
            dst.append(v)
    skip = SparseDAG.from_edges(n_in, src, dst, rng.standard_normal(len(src)).tolist(), activation="relu",
                                dtype=torch.float32)
    width = 16
    rsrc = [(i + k) % width for i in range(width) for k in range(4)]
    rdst = [width + i for i in range(width) for _ in range(4)]
    radix = SparseDAG.from_edges(width, rsrc + [width + s for s in rsrc], rdst + [width + d for d in rdst],
                                 torch.randn(2 * len(rsrc)).tolist(), activation="relu", dtype=torch.float32)
    out = []
    for name, dag, module in (("mlp", SparseDAG.from_module(mlp), mlp), ("skip", skip, None), ("radix", radix, None)):
        nets = {}
        for strategy in STRATEGIES:
            try:
                nets[strategy] = ops.prepare(dag, memory=4, strategy=strategy, batch_tile=16)
            except ValueError:  # dense needs a layered net
                pass
        out.append((name, dag, nets, module))
    return out


def mutate(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A mutated copy of ``t`` (or a new tensor in its place)."""
    t = t.clone()
    kind = rng.choice(["set", "set", "set", "shift", "swap", "truncate", "extend", "empty", "dtype", "stride"])
    if kind in ("set", "shift", "swap") and t.numel() == 0:
        kind = "extend"
    flat = t.view(-1)
    if kind == "set":
        i = rng.randrange(t.numel())
        if t.is_floating_point():
            flat[i] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e300, -1.0, 0.0])
        else:
            info = torch.iinfo(t.dtype)
            flat[i] = max(info.min, min(info.max, rng.choice(EXTREMES + (int(flat[i]) + 1, int(flat[i]) - 1))))
    elif kind == "shift":
        if t.is_floating_point():
            flat += 1
        else:
            info = torch.iinfo(t.dtype)
            flat.copy_((flat.to(torch.int64) + rng.choice([-1, 1])).clamp(info.min, info.max).to(t.dtype))
    elif kind == "swap":
        i, j = rng.randrange(t.numel()), rng.randrange(t.numel())
        a, b = flat[i].clone(), flat[j].clone()
        flat[i], flat[j] = b, a
    elif kind == "truncate":
        return flat[: rng.randrange(t.numel() + 1)].clone()
    elif kind == "extend":
        return torch.cat([flat, flat[:1].clone() if t.numel() else torch.zeros(1, dtype=t.dtype)])
    elif kind == "empty":
        return torch.zeros(0, dtype=t.dtype)
    elif kind == "dtype":
        return t.to(rng.choice([torch.int32, torch.int64, torch.float32, torch.uint8]))
    elif kind == "stride":
        return (torch.cat([flat, flat]).view(2, -1).t().reshape(-1)[: t.numel()] if t.numel() > 1
                else flat[:1].expand(3))
    return t


def run(dag, buffers, meta, rng, backward=True):
    B = rng.choice([0, 1, 3, 17, 64])
    x = torch.randn(B, dag.n_inputs, requires_grad=backward)
    w = dag.weight.float().clone().requires_grad_(backward)
    y = ops.dag_forward(x, w, dag.bias.float(), buffers, meta)
    if backward and B:
        y.sum().backward()


def case_buffer(nets, rng):
    name, dag, by_strategy, _ = rng.choice(nets)
    net = by_strategy[rng.choice(sorted(by_strategy))]
    buffers = dict(net.buffers)
    for key in rng.sample(sorted(buffers), rng.choice([1, 1, 2])):
        buffers[key] = mutate(buffers[key], rng)
    run(dag, buffers, net.meta, rng)


def case_stealth(nets, rng):
    """Buffers validated once, then written through numpy (no version bump): guarded, never out of bounds."""
    name, dag, by_strategy, _ = rng.choice(nets)
    net = by_strategy[rng.choice(sorted(by_strategy))]
    buffers = {k: v.clone() for k, v in net.buffers.items()}
    run(dag, buffers, net.meta, rng, backward=False)
    key = rng.choice([k for k, v in buffers.items() if v.numel() and not v.is_floating_point()])
    arr = buffers[key].numpy().reshape(-1)
    info = np.iinfo(arr.dtype)
    for _ in range(rng.choice([1, 3, len(arr)])):
        arr[rng.randrange(arr.size)] = max(info.min, min(info.max, rng.choice(EXTREMES)))
    run(dag, buffers, net.meta, rng)


def case_config(nets, rng):
    name, dag, by_strategy, _ = rng.choice(nets)
    net = by_strategy[rng.choice(sorted(by_strategy))]
    meta = dict(net.meta)
    key = rng.choice(ops.CONFIG_KEYS)
    meta[key] = rng.choice([-1, 0, 1, 2, 2**31, 2**62, -2**62, int(meta[key]) + 1, int(meta[key]) * 1000 + 7])
    run(dag, net.buffers, meta, rng)


def case_state(nets, rng):
    mlp = next(module for _, _, _, module in nets if module is not None)
    model = tis.IOSparseNetwork(mlp, memory=rng.choice([3, 8, None]), cache=False,
                                strategy=rng.choice(STRATEGIES[:4] + ("auto",)))
    state = model.state_dict()
    for key in rng.sample(sorted(state), rng.choice([1, 1, 2])):
        state[key] = mutate(state[key], rng)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError):
        pass
    x = torch.randn(rng.choice([1, 4, 33]), 10, requires_grad=True)
    model(x).sum().backward()  # a failed load leaves the module as it was: this must work
    try:
        tis.IOSparseNetwork.from_state_dict(state, cache=False)(x.detach())
    except Exception:  # noqa: BLE001 - any Python error is a pass; only a crash or hang fails
        pass


CASES = ((case_buffer, 6), (case_stealth, 2), (case_config, 1), (case_state, 1))


def main(argv):
    seed, first, count = (int(a) for a in argv[1:4])
    nets = networks()
    kinds = [f for f, weight in CASES for _ in range(weight)]
    for k in range(first, first + count):
        print(f"case {k}", flush=True)
        rng = random.Random(seed * 1_000_003 + k)
        try:
            rng.choice(kinds)(nets, rng)
        except Exception:  # noqa: BLE001 - raising is a pass
            pass
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv)
