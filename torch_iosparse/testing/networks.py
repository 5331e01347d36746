"""Networks for the tests and benchmarks, from one place: :func:`sample_inputs` (the fixed networks the op's
correctness, gradient and opcheck tests run), hypothesis strategies of random DAGs (:func:`dags`,
:func:`random_dags`), seeded random DAGs (:func:`random_dag`), pruned MLPs and butterfly networks, plus an
independent schedule checker and a naive per-neuron evaluator. Tests of these helpers:
tests/testing/test_networks.py."""
from __future__ import annotations

import math
from collections import deque
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

import torch_iosparse as tis
from torch_iosparse.graph.activations import KINDS, Activation
from torch_iosparse.graph.dag import SparseDAG

MEMORIES = (2, 3, 4, 8, 64, None)


# ---------------------------------------------------------------------- random graphs
def random_edges(rng: np.random.Generator, n_inputs: int, n_computed: int, *, max_fan_in: int = 8,
                 layered: bool = True, n_layers: int = 2, skip_prob: float = 0.0, min_fan_in: int = 1):
    """Random DAG edges ``(src, dst)`` over neurons ``0..n_inputs+n_computed-1`` (inputs first).

    Layered: computed neurons split into ``n_layers`` consecutive layers; a neuron of layer k draws its
    sources from layer k-1, and with probability ``skip_prob`` per edge from any earlier layer (skip edges).
    Non-layered: neuron v draws from every neuron before it. Fan-in is uniform in [min_fan_in, max_fan_in],
    capped by the available sources; sources of one neuron are distinct.
    """
    n = n_inputs + n_computed
    starts = [0, n_inputs]  # layer k spans [starts[k], starts[k+1]); layer 0 = the inputs
    if layered:
        n_layers = max(1, min(n_layers, n_computed))
        if n_layers > 1:
            cuts = np.sort(rng.choice(np.arange(1, n_computed), size=n_layers - 1, replace=False))
            starts += [n_inputs + int(c) for c in cuts]
    starts.append(n)
    layer_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    src, dst = [], []
    for v in range(n_inputs, n):
        if layered:
            k = int(layer_of[v])
            prev = np.arange(starts[k - 1], starts[k])
            earlier = np.arange(0, starts[k - 1])
        else:
            prev, earlier = np.arange(0, v), np.arange(0)
        fan = int(rng.integers(min_fan_in, max_fan_in + 1))
        k_skip = min(int(rng.binomial(fan, skip_prob)) if earlier.size else 0, earlier.size)
        k_prev = min(fan - k_skip, prev.size)
        chosen = set(rng.choice(prev, size=k_prev, replace=False).tolist())
        chosen |= set(rng.choice(earlier, size=k_skip, replace=False).tolist())
        for u in sorted(chosen):
            src.append(u)
            dst.append(v)
    return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)


def relabel(rng, n_inputs: int, n: int, src, dst):
    """Renumber the computed neurons by a random permutation, so the numbering is (usually) not
    topological any more."""
    perm = np.arange(n)
    perm[n_inputs:] = n_inputs + rng.permutation(n - n_inputs)
    return perm[src], perm[dst], perm


@st.composite
def dags(draw, *, max_inputs: int = 12, max_computed: int = 24, max_fan_in: int = 64, allow_relabel=True,
         extra_outputs=True):
    """A random SparseDAG: layered or not, skip edges, fan-in up to ``max_fan_in``, numbering topological
    or shuffled, outputs = sinks (+ sometimes some inner neurons)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    max_fan = draw(st.integers(1, max_fan_in))
    n_inputs = draw(st.integers(1, max(1, min(max_inputs, max_fan + 2))))
    n_computed = draw(st.integers(1, max_computed))
    layered = draw(st.booleans())
    n_layers = draw(st.integers(1, 4))
    skip = draw(st.sampled_from([0.0, 0.2, 0.6]))
    src, dst = random_edges(rng, n_inputs, n_computed, max_fan_in=max_fan, layered=layered, n_layers=n_layers,
                            skip_prob=skip)
    n = n_inputs + n_computed
    if allow_relabel and draw(st.booleans()):
        src, dst, _ = relabel(rng, n_inputs, n, src, dst)
    outputs = None
    if extra_outputs and draw(st.booleans()):
        outdeg = np.bincount(src, minlength=n)
        sinks = [v for v in range(n_inputs, n) if outdeg[v] == 0]
        inner = [v for v in range(n_inputs, n) if outdeg[v] > 0]
        k = int(rng.integers(0, len(inner) + 1))
        outputs = sorted(sinks + list(rng.choice(inner, size=k, replace=False)) if inner else sinks)
        rng.shuffle(outputs)
    w = rng.standard_normal(src.size)
    b = rng.standard_normal(n)
    return tis.SparseDAG.from_edges(n_inputs, src, dst, w, b, n_neurons=n, outputs=outputs,
                                    activation="relu", dtype=torch.float64)


def random_topological_order(dag: tis.SparseDAG, rng: np.random.Generator) -> np.ndarray:
    """A uniformly-random-choice Kahn order of the computed neurons (plain Python)."""
    n_in = dag.n_inputs
    indeg = {v: sum(1 for u in dag.in_src[dag.in_ptr[v]:dag.in_ptr[v + 1]] if u >= n_in)
             for v in range(n_in, dag.n_neurons)}
    succ: Dict[int, List[int]] = {v: [] for v in range(dag.n_neurons)}
    src, dst = dag.edges()
    for u, v in zip(src.tolist(), dst.tolist()):
        succ[u].append(v)
    ready = [v for v, d in indeg.items() if d == 0]
    order = []
    while ready:
        v = ready.pop(int(rng.integers(len(ready))))
        order.append(v)
        for w in succ[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
    assert len(order) == dag.n_computed
    return np.array(order, dtype=np.int64)


# ---------------------------------------------------------------------- schedule checker
def check_schedule(dag: tis.SparseDAG, events: Sequence, memory: Optional[int]) -> tis.IOCount:
    """Replay an event trace against the cost model's rules, independently of both simulators:
    at most M occupied slots, every operand resident when used, loads only of values in slow memory,
    stores only of resident values, every edge applied exactly once after its source was finished, every
    neuron initialised and finished once, every output in slow memory at the end. Returns the I/O count
    the trace implies."""
    n_in = dag.n_inputs
    slot_holder: Dict[int, int] = {}  # slot -> value
    where: Dict[int, int] = {}        # value -> slot
    in_slow = set(range(n_in))
    finished = set(range(n_in))
    applied = set()
    inited = set()
    loads = stores = 0
    edges = set(zip(*(a.tolist() for a in dag.edges())))
    for ev in events:
        op, v, u, s = ev.op, ev.neuron, ev.src, ev.slot
        if memory is not None:
            assert 0 <= s < memory, f"slot {s} outside the {memory} slots: {ev}"
        if op in ("init", "load"):
            assert s not in slot_holder, f"{ev}: slot {s} is occupied by {slot_holder.get(s)}"
            assert v not in where, f"{ev}: value {v} already resident"
            if op == "init":
                assert v >= n_in and v not in inited, ev
                inited.add(v)
            else:
                assert v in in_slow, f"{ev}: value {v} is not in slow memory"
                loads += 1
            slot_holder[s] = v
            where[v] = s
        elif op == "fma":
            assert (u, v) in edges and (u, v) not in applied, ev
            assert u in finished, f"{ev}: source not finished"
            assert where.get(u) == s and v in where and v not in finished, ev
            applied.add((u, v))
        elif op == "finish":
            assert where.get(v) == s and v not in finished, ev
            finished.add(v)
        elif op == "store":
            assert where.get(v) == s and v in finished and v not in in_slow, ev
            in_slow.add(v)
            stores += 1
        elif op == "drop":
            assert where.get(v) == s, ev
            assert v in finished, f"{ev}: partial sums are never dropped"
            del slot_holder[s], where[v]
        else:
            raise AssertionError(f"unknown op {op}")
        if memory is not None:
            assert len(slot_holder) <= memory
    assert applied == edges, "some edge was never applied"
    assert finished == set(range(dag.n_neurons)), "some neuron was never finished"
    assert not where, f"values left in fast memory at the end: {sorted(where)}"
    assert set(dag.outputs.tolist()) <= in_slow, "an output never reached slow memory"
    return tis.IOCount(len(edges), len(inited), loads, stores)


# ---------------------------------------------------------------------- naive evaluation
def naive_activation(spec: tis.Activation, z: float) -> float:
    k = spec.kind
    if k == "identity":
        return z
    if k == "relu":
        return max(z, 0.0)
    if k == "hardtanh":
        return min(max(z, spec.lo), spec.hi)
    if k == "gelu":
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
    if k == "gelu_tanh":
        return 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    if k == "tanh":
        return math.tanh(z)
    if k == "sigmoid":
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    raise AssertionError(k)


def naive_forward(n_inputs: int, n: int, edges, bias, act_of, outputs, x: np.ndarray) -> np.ndarray:
    """Per-neuron evaluation in float64 straight from an edge list (duplicates summed), in a plain Python
    topological order. ``edges``: list of (u, v, w); ``act_of(v)``: Activation of v."""
    preds: Dict[int, List] = {v: [] for v in range(n)}
    succ: Dict[int, List[int]] = {v: [] for v in range(n)}
    for u, v, w in edges:
        preds[v].append((u, w))
        succ[u].append(v)
    indeg = {v: len(preds[v]) for v in range(n)}
    queue = deque(v for v in range(n) if indeg[v] == 0)
    order = []
    while queue:
        v = queue.popleft()
        order.append(v)
        for w in succ[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                queue.append(w)
    assert len(order) == n
    out = np.zeros((x.shape[0], len(outputs)))
    for r in range(x.shape[0]):
        val = {}
        for v in order:
            if v < n_inputs:
                val[v] = float(x[r, v])
                continue
            z = float(bias[v]) + sum(float(w) * val[u] for u, w in preds[v])
            val[v] = naive_activation(act_of(v), z)
        out[r] = [val[o] for o in outputs]
    return out


# ---------------------------------------------------------------------- more random graphs
ALL_ACTIVATIONS = [Activation("identity"), Activation("relu"), Activation("hardtanh", -0.5, 0.7),
                   Activation("gelu"), Activation("gelu_tanh"), Activation("tanh"), Activation("sigmoid")]


@st.composite
def random_dags(draw, max_inputs=5, max_computed=12, mixed_activations=True):
    """A random DAG (skip edges, bias-only neurons, unread non-outputs allowed) with random weights."""
    n_in = draw(st.integers(1, max_inputs))
    n_comp = draw(st.integers(1, max_computed))
    n = n_in + n_comp
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.floats(0.1, 0.9))
    src, dst = [], []
    for v in range(n_in, n):
        for u in range(v):
            if rng.random() < density:
                src.append(u)
                dst.append(v)
    # A random relabelling keeps the numbering from always being topological.
    perm_comp = rng.permutation(n_comp) + n_in if draw(st.booleans()) else np.arange(n_in, n)
    relabel = np.concatenate([np.arange(n_in), perm_comp])
    src = relabel[np.array(src, dtype=np.int64)] if src else np.zeros(0, np.int64)
    dst = relabel[np.array(dst, dtype=np.int64)] if dst else np.zeros(0, np.int64)
    w = rng.standard_normal(len(src))
    b = rng.standard_normal(n)
    if mixed_activations:
        acts = [ALL_ACTIVATIONS[i] for i in rng.integers(0, len(ALL_ACTIVATIONS), n)]
    else:
        acts = draw(st.sampled_from(ALL_ACTIVATIONS))
    outputs = None
    if draw(st.booleans()):  # outputs: a random nonempty subset of the computed neurons, random order
        k = int(rng.integers(1, n_comp + 1))
        outputs = rng.choice(np.arange(n_in, n), size=k, replace=False)
    return SparseDAG.from_edges(n_in, src, dst, w, b, n_neurons=n, outputs=outputs, activation=acts,
                                dtype=torch.float64)


ALL_ACTS = [Activation(k) if k != "hardtanh" else Activation("hardtanh", -0.5, 0.75) for k in KINDS]


def random_dag(seed: int, n_inputs: int, n_computed: int, max_fan_in: int = 4, acts=None, skip=True):
    """A random DAG: each computed neuron reads 1..max_fan_in earlier neurons (skip edges allowed)."""
    rng = np.random.default_rng(seed)
    n = n_inputs + n_computed
    src, dst = [], []
    for v in range(n_inputs, n):
        lo = 0 if skip else max(0, v - n_inputs - 3)
        cand = np.arange(lo, v)
        k = int(rng.integers(1, max_fan_in + 1))
        s = rng.choice(cand, size=min(k, cand.size), replace=False)
        src += s.tolist()
        dst += [v] * len(s)
    acts = acts or ALL_ACTS
    act = [acts[int(rng.integers(len(acts)))] for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(len(src), generator=g) * 0.7
    b = torch.randn(n, generator=g) * 0.3
    return SparseDAG.from_edges(n_inputs, src, dst, w, b, activation=act)


# ---------------------------------------------------------------------- structured networks
def pruned_mlp(sizes, density, acts, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        lin = nn.Linear(sizes[k], sizes[k + 1]).to(dtype)
        with torch.no_grad():
            mask = torch.rand(sizes[k + 1], sizes[k], generator=g) < density
            lin.weight.mul_(mask)
            lin.weight.add_(mask * 1e-3)  # no accidental zeros inside the pattern
        layers += [lin, acts[k % len(acts)].to_module()]
    return nn.Sequential(*layers)


def radix_like(N, L, fan, dtype=torch.float64, seed=0):
    """Butterfly network: neuron j of layer k reads the `fan` neurons that differ from j only in its k-th
    base-`fan` digit, so groups of `fan` neurons share all their sources."""
    r = max(1, int(round(np.log(N) / np.log(fan))))
    j = np.arange(N)
    src, dst = [], []
    for k in range(L):
        stride = fan ** (k % r)
        base = j - ((j // stride) % fan) * stride
        for s in range(fan):
            src.append(base + s * stride + k * N)
            dst.append(j + (k + 1) * N)
    src, dst = np.concatenate(src), np.concatenate(dst)
    rng = np.random.default_rng(seed)
    return SparseDAG.from_edges(N, src, dst, rng.standard_normal(src.size) / fan, rng.standard_normal(N * (L + 1)),
                                activation="hardtanh(0,4)", dtype=dtype)


# ---------------------------------------------------------------------- sample inputs
class Sample(NamedTuple):
    """One network with an input batch: ``weight`` / ``bias`` are the DAG's, in the requested dtype and on
    the requested device; ``layered``: every edge joins consecutive levels (the dense path runs it)."""

    name: str
    dag: SparseDAG
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    layered: bool


def _sample_dags() -> List[tuple]:
    """(name, float64 DAG, batch size) of every sample network."""
    out = [
        ("skip_edges_gelu", SparseDAG.from_edges(3, [0, 1, 2, 3, 3, 4, 1], [3, 3, 4, 4, 5, 5, 5],
                                                 [0.5, -1.2, 0.3, 0.8, -0.4, 1.1, 0.7],
                                                 [0.1, -0.2, 0.3, -0.5, 0.2, 0.4], activation="gelu",
                                                 dtype=torch.float64), 20),
        ("mlp_hardtanh_gelu", SparseDAG.from_module(pruned_mlp([9, 11, 6], 0.5, [ALL_ACTIVATIONS[2],
                                                                                ALL_ACTIVATIONS[3]])), 13),
        ("mlp_gelu_tanh_sigmoid", SparseDAG.from_module(
            pruned_mlp([10, 14, 9, 5], 0.35, [ALL_ACTIVATIONS[4], ALL_ACTIVATIONS[6]], seed=5)), 7),
        ("random_every_activation", random_dag(11, 4, 10, max_fan_in=3), 5),
        ("shared_sources", radix_like(8, 2, 2), 6),
    ]
    # Bias-only neuron (5), unread non-output neuron (3), outputs not in numbering order.
    out.append(("bias_only_unread", SparseDAG.from_edges(2, [0, 1, 0, 4], [3, 4, 4, 6], [0.7, -0.3, 1.5, 0.9],
                                                         [0.0, 0.0, 0.2, -0.1, 0.4, 0.6, -0.2], n_neurons=7,
                                                         outputs=[6, 5], activation="tanh", dtype=torch.float64), 4))
    return out


def sample_inputs(device="cpu", dtype: torch.dtype = torch.float64, *, requires_grad: bool = False,
                  seed: int = 0) -> List[Sample]:
    """The fixed networks (small, so gradcheck and opcheck stay cheap) with a seeded input batch each:
    skip edges, layered MLPs with every activation kind, a random DAG mixing activations, groups of
    neurons sharing all their sources, a bias-only and an unread neuron. ``requires_grad``: x, weight and
    bias are leaves that require gradients."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for name, dag, batch in _sample_dags():
        x = (torch.randn(batch, dag.n_inputs, generator=g, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
        w = dag.weight.to(device=device, dtype=dtype)
        b = dag.bias.to(device=device, dtype=dtype)
        if requires_grad:
            x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
        src, dst = dag.edges()
        lv = dag.levels()
        layered = bool(np.all(lv[src] + 1 == lv[dst]) and np.all(lv[np.asarray(dag.outputs)] == lv.max()))
        samples.append(Sample(name, dag, x, w, b, layered))
    return samples
