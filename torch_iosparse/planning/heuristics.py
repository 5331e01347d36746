"""Planning methods that beat the 2-optimal strategy's plain topological order (docs/planner.md).

Three methods of :func:`torch_iosparse.planning.plan` (registered in torch_iosparse/planning/__init__.py):

``method="greedy"``
    Locality-aware starting orders — cache-aware list scheduling (native), consumer-driven depth-first
    order, and barycentric reordering of neurons inside each level — each measured with the exact
    simulator; the best of them and ``two_optimal`` is returned.
``method="anneal"``
    Simulated annealing over topological orders, starting from the best ``greedy`` candidate. A move
    relocates one neuron inside its legal window (after its last computed source, before its first
    reader; ``max_shift`` bounds the distance, 1 = swap of neighbours). Moves are evaluated exactly in
    native code (kernels/anneal/anneal.cpp) by replaying only from the first affected eviction decision
    until the simulator state re-joins the current order's run. The returned plan's I/O is recomputed
    by :func:`torch_iosparse.cost.iomodel.count_io` and is never worse than the start.
``method="level_grouped"``
    Level by level; inside a level, neurons with the same source set next to each other, so the CPU
    kernel can compute them as one group (docs/cpu-kernel.md).

``greedy`` and ``anneal`` never return a plan worse than ``two_optimal``.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..cost.iomodel import _native_arrays, count_io, normalize_order, topological_order
from ..graph.dag import SparseDAG

__all__ = ["greedy_orders", "anneal_order", "barycenter_order", "dfs_order", "cache_greedy_order",
           "level_grouped_order"]


def _ops():
    from .. import _native
    return _native.ops()


def _int64(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


# ---------------------------------------------------------------------- starting orders
def cache_greedy_order(dag: SparseDAG, memory: Optional[int], base: Optional[np.ndarray] = None) -> np.ndarray:
    """List scheduling that always runs the ready neuron with the most sources held in a simulated
    LRU fast memory of ``memory`` slots; ties keep the ``base`` order (default: two_optimal)."""
    base = topological_order(dag) if base is None else np.asarray(base, dtype=np.int64)
    rank = np.zeros(dag.n_neurons, dtype=np.int64)
    rank[base] = np.arange(base.size)
    in_ptr, in_src, _, out_ptr, out_dst = _native_arrays(dag)
    M = dag.n_neurons + 1 if memory is None else int(memory)
    return _ops().greedy_cache_order(in_ptr, in_src, out_ptr, out_dst, dag.n_inputs, M, _int64(rank)).numpy()


def dfs_order(dag: SparseDAG) -> np.ndarray:
    """Consumer-driven depth-first order: for each output in turn, compute its missing sources
    (recursively, ascending) and then the output — values are produced right before they are read."""
    n_in, n = dag.n_inputs, dag.n_neurons
    in_ptr, in_src = dag.in_ptr, dag.in_src
    done = np.zeros(n, dtype=bool)
    done[:n_in] = True
    order: List[int] = []
    # outputs first, then any computed neuron that no output depends on (in numbering order)
    roots = list(int(v) for v in dag.outputs) + list(range(n_in, n))
    for r in roots:
        if done[r]:
            continue
        stack = [(r, int(in_ptr[r]))]
        while stack:
            v, e = stack[-1]
            end = int(in_ptr[v + 1])
            while e < end and done[in_src[e]]:
                e += 1
            if e < end:
                stack[-1] = (v, e + 1)
                u = int(in_src[e])
                stack.append((u, int(in_ptr[u])))
            else:
                stack.pop()
                if not done[v]:
                    done[v] = True
                    order.append(v)
    return np.asarray(order, dtype=np.int64)


def barycenter_order(dag: SparseDAG, sweeps: int = 1) -> np.ndarray:
    """Level by level, sort each level's neurons by the mean position of their sources (inputs at
    their index, computed neurons at their place in the order so far): neurons that read the same
    region of the previous level run next to each other."""
    lv = dag.levels()
    n_in = dag.n_inputs
    src, dst = dag.edges()
    pos = np.zeros(dag.n_neurons, dtype=np.float64)
    pos[:n_in] = np.arange(n_in) / max(n_in, 1)
    order = []
    for _ in range(max(1, sweeps)):
        order = []
        for L in range(1, int(lv.max()) + 1):
            nodes = np.flatnonzero(lv == L)
            sums = np.bincount(dst, weights=pos[src], minlength=dag.n_neurons)[nodes]
            deg = np.diff(dag.in_ptr)[nodes]
            key = np.where(deg > 0, sums / np.maximum(deg, 1), -1.0)
            nodes = nodes[np.lexsort((nodes, key))]
            pos[nodes] = np.linspace(0.0, 1.0, nodes.size, endpoint=False) if nodes.size else pos[nodes]
            order.append(nodes)
    return np.concatenate(order).astype(np.int64)


def greedy_orders(dag: SparseDAG, memory: Optional[int]) -> Dict[str, np.ndarray]:
    """The candidate starting orders by name (two_optimal included)."""
    base = topological_order(dag)
    cands = {"two_optimal": base, "cache_greedy": cache_greedy_order(dag, memory, base),
             "dfs": dfs_order(dag), "barycenter": barycenter_order(dag)}
    cands["barycenter_cache_greedy"] = cache_greedy_order(dag, memory, cands["barycenter"])
    return cands


def _best_start(dag: SparseDAG, memory: Optional[int]) -> Tuple[str, np.ndarray, Dict[str, int]]:
    costs: Dict[str, int] = {}
    best = None
    for name, order in greedy_orders(dag, memory).items():
        c = count_io(dag, order, memory).total
        costs[name] = c
        if best is None or c < best[2]:  # strict: two_optimal (first) wins ties
            best = (name, order, c)
    return best[0], best[1], costs


def _greedy(dag: SparseDAG, memory, seed=0, time_budget=None, **kw):
    if kw:
        raise TypeError(f"greedy takes no options, got {sorted(kw)}")
    name, order, costs = _best_start(dag, memory)
    return order, {"candidate": name, "candidates": costs}


# ---------------------------------------------------------------------- annealing
def _annealer(dag: SparseDAG, order: np.ndarray, memory: int, seed: int, checkpoint_budget: int):
    _ops()  # loads the library that defines the class
    in_ptr, in_src, is_out, _, _ = _native_arrays(dag)
    return torch.classes.iosparse.Annealer(in_ptr, in_src, is_out, dag.n_inputs, int(memory),
                                           _int64(order), int(seed), int(checkpoint_budget))


def anneal_order(dag: SparseDAG, memory: Optional[int], *, seed: int = 0, iterations: Optional[int] = None,
                 time_budget: Optional[float] = None, start="best", t_start: Optional[float] = None,
                 t_end: Optional[float] = None, max_shift: int = 64, back_cap: Optional[int] = None,
                 forward_cap: Optional[int] = None, chunks: int = 100, progress: Optional[bool] = None,
                 checkpoint_budget: int = 1 << 22) -> Tuple[np.ndarray, Dict]:
    """Simulated annealing over topological orders. Returns ``(order, info)``.

    Args:
        memory: fast-memory slots (None = unbounded: every order costs the lower bound, nothing to do).
        seed: RNG seed; with ``time_budget=None`` the same seed gives the same order.
        iterations: proposals to make (default ``min(100_000, 10_000 + 10·n_computed)`` when no
            ``time_budget`` is given). With both, the schedule follows ``iterations`` and the time only
            stops it early.
        time_budget: seconds; alone, the temperature follows the elapsed fraction of it.
        start: ``"best"`` (best of :func:`greedy_orders`), ``"two_optimal"``, or an explicit order.
        t_start, t_end: temperature in I/Os (default: 0.1 × the mean uphill delta of 200 sampled
            moves, and 1 % of that; cool, since greedy starts are already good); geometric in between.
        max_shift: furthest a neuron moves in one proposal (1 = swap with a neighbour).
        back_cap, forward_cap: optional bounds on how far before / after the move one evaluation may
            replay; proposals over a cap are rejected without being evaluated (faster, exactness kept).
        progress: tqdm bar: True / False, or None (default) for a bar only when stderr is a terminal.
        checkpoint_budget: most int32 entries kept for state checkpoints (one per step while
            n_computed·M fits, else one every K steps).
    Info holds ``start``, ``start_io``, ``io``, counts of moves and a per-chunk ``history`` (lists of
    ``moves``, ``io``, ``best_io``, ``temperature``, ``acceptance``, ``seconds``) for plots.
    """
    if max_shift < 1:
        raise ValueError(f"max_shift must be >= 1, got {max_shift}")
    if iterations is not None and iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget}")
    if isinstance(start, str):
        if start == "best":
            start_name, start_order, cand = _best_start(dag, memory)
        elif start == "two_optimal":
            start_name, start_order, cand = "two_optimal", topological_order(dag), {}
        else:
            raise ValueError(f"start must be 'best', 'two_optimal' or an order, got {start!r}")
    else:
        start_name, start_order, cand = "given", normalize_order(dag, start), {}
    start_io = count_io(dag, start_order, memory)
    fixed = start_io.weights + start_io.biases
    info: Dict = {"start": start_name, "start_io": start_io.total, "candidates": cand, "evaluated": 0,
                  "accepted": 0, "proposed": 0, "skipped": 0, "unresolved": 0, "seconds": 0.0,
                  "history": {k: [] for k in ("moves", "io", "best_io", "temperature", "acceptance", "seconds")}}
    if memory is None or memory > dag.n_neurons or dag.n_computed < 2:
        info["io"] = start_io.total  # nothing is ever evicted: every order costs the lower bound
        return start_order, info
    if iterations is None and time_budget is None:
        iterations = min(100_000, 10_000 + 10 * dag.n_computed)

    t0 = time.perf_counter()
    ann = _annealer(dag, start_order, memory, seed, checkpoint_budget)
    assert ann.cost() + fixed == start_io.total, "native annealer disagrees with the simulator"
    bc = -1 if back_cap is None else int(back_cap)
    fc = -1 if forward_cap is None else int(forward_cap)
    if t_start is None:
        d = ann.sample_deltas(200, max_shift).numpy()
        up = d[d > 0]
        t_start = 0.1 * float(up.mean()) if up.size else 1.0  # a mean uphill move passes ~e^-10 at first
    if t_end is None:
        t_end = 0.01 * t_start
    if not (t_start > 0 and t_end > 0):
        raise ValueError("t_start and t_end must be positive")

    total = iterations if iterations is not None else None
    chunk = max(1, (total // chunks) if total else 50)  # time-only: resized below to ~budget/chunks
    bar = None
    if progress is not False:
        from tqdm.auto import tqdm
        bar = tqdm(total=total if total is not None else None, desc="anneal", unit="move", leave=False,
                   disable=None if progress is None else False)  # None: tqdm hides it off a terminal
    done = 0
    hist = info["history"]
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if total is not None:
                if done >= total:
                    break
                frac = done / max(total, 1)
                k = min(chunk, total - done)
            else:
                frac = min(1.0, elapsed / time_budget)
                k = chunk
            if time_budget is not None and elapsed >= time_budget:
                break
            frac_next = min(1.0, frac + (k / total if total else 1.0 / chunks))
            ta = t_start * (t_end / t_start) ** frac
            tb = t_start * (t_end / t_start) ** frac_next
            st = ann.run(k, ta, tb, max_shift, bc, fc).tolist()
            done += k
            info["proposed"] += k
            info["evaluated"] += st[0]
            info["accepted"] += st[1]
            info["skipped"] += st[7]
            info["unresolved"] += st[8]
            hist["moves"].append(done)
            hist["io"].append(st[4] + fixed)
            hist["best_io"].append(st[5] + fixed)
            hist["temperature"].append(tb)
            hist["acceptance"].append(st[1] / max(st[0], 1))
            hist["seconds"].append(time.perf_counter() - t0)
            if total is None:  # aim at `chunks` chunks over the budget, at the measured rate
                rate = done / max(time.perf_counter() - t0, 1e-9)
                chunk = max(1, min(100_000, int(rate * time_budget / chunks)))
            if bar is not None:
                bar.update(k)
                bar.set_postfix(io=st[4] + fixed, best=st[5] + fixed)
    finally:
        if bar is not None:
            bar.close()
    best = ann.best_order().numpy()
    seconds = time.perf_counter() - t0
    info["seconds"] = seconds
    info["evaluated_per_s"] = info["evaluated"] / seconds if seconds > 0 else 0.0
    # The returned I/O always comes from the exact simulator; never return worse than the start.
    io = count_io(dag, best, memory)
    if io.total != ann.best_cost() + fixed:
        raise RuntimeError(f"internal error: annealer bookkeeping ({ann.best_cost() + fixed}) disagrees with "
                           f"the simulator ({io.total})")
    if io.total > start_io.total:
        best, io = start_order, start_io
    info["io"] = io.total
    return best, info


def _anneal(dag: SparseDAG, memory, seed=0, time_budget=None, **kw):
    return anneal_order(dag, memory, seed=seed, time_budget=time_budget, **kw)


def _source_set_hash(dag: SparseDAG) -> np.ndarray:
    """One uint64 per neuron that is equal for neurons with equal source sets (sum of mixed ids)."""
    src = np.asarray(dag.in_src, dtype=np.uint64)
    mixed = (src + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    mixed ^= mixed >> np.uint64(29)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    out = np.zeros(dag.n_neurons, dtype=np.uint64)
    deg = np.diff(dag.in_ptr)
    nz = np.flatnonzero(deg > 0)
    if src.size:
        out[nz] = np.add.reduceat(mixed, dag.in_ptr[nz])
    return out


def level_grouped_order(dag: SparseDAG) -> np.ndarray:
    """Level by level; inside a level, neurons with the same source set next to each other (so the
    kernel can group them), else by neuron id."""
    lv = dag.levels().astype(np.int64)
    comp = np.arange(dag.n_inputs, dag.n_neurons)
    h = _source_set_hash(dag)[comp]
    return comp[np.lexsort((comp, h, lv[comp]))]


def _level_grouped(dag: SparseDAG, memory, seed=0, time_budget=None, **kw):
    return level_grouped_order(dag)
