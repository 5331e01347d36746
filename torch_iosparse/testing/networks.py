"""Shared helpers of the core tests (random DAGs, an independent schedule checker, a naive evaluator),
plus tests of the helpers themselves. Other test_core_* files import them as ``test_core_support``."""
from __future__ import annotations

import math
from collections import deque
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_iosparse as tis

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


# ---------------------------------------------------------------------- tests of the helpers
@given(dags())
def test_random_dags_are_valid(dag):
    src, dst = dag.edges()
    assert (dst >= dag.n_inputs).all()
    fan_in = dag.in_degree()[dag.n_inputs:]
    assert fan_in.min() >= 1 and fan_in.max() <= 64
    assert dag.n_outputs >= 1
    lv = dag.levels()
    assert (lv[src] < lv[dst]).all()


def test_check_schedule_rejects_a_broken_trace():
    dag = tis.SparseDAG.from_edges(2, [0, 1, 2], [2, 2, 3])
    events = tis.trace(dag, [2, 3], 2)
    assert check_schedule(dag, events, 2) == tis.count_io(dag, [2, 3], 2)
    broken = [e for e in events if not (e.op == "load" and e.neuron == 1)]
    with pytest.raises(AssertionError):
        check_schedule(dag, broken, 2)
    with pytest.raises(AssertionError):  # more slots than allowed
        check_schedule(dag, events, 1)
