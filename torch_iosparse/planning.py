"""Plans: an order of the computed neurons plus the memory it was made for, and its exact I/O count.

``plan(dag, memory, method)`` dispatches to a registered method; every method returns a plan whose I/O
is at most that of the 2-optimal plan it started from. Plans save to a versioned ``.npz`` that records
the DAG's structure hash and a checksum, so a plan is never silently applied to another network.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from .dag import SparseDAG
from .iomodel import (IOCount, MemorySpec, _simulate_checked, count_io, normalize_memory, normalize_order,
                      topological_order)

PLAN_FORMAT = "torch_iosparse.plan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan file that is corrupt, of another format version, or made for another network."""


@dataclass
class Plan:
    """An execution plan: ``order`` (computed neurons, topological), ``memory`` (slots; None =
    unbounded), its exact ``io`` (an IOCount), the ``method`` that made it and the DAG hash."""

    order: np.ndarray
    memory: Optional[int]
    io: IOCount
    method: str
    dag_hash: str
    info: Dict = field(default_factory=dict)  # method-specific extras (e.g. the annealing history)

    def check_dag(self, dag: SparseDAG) -> None:
        """Raise PlanError unless this plan was made for ``dag``'s structure."""
        if dag.structure_hash() != self.dag_hash:
            raise PlanError(f"this plan was made for another network (structure hash {self.dag_hash[:12]}…, "
                            f"this network has {dag.structure_hash()[:12]}…)")

    def save(self, path: str) -> None:
        """Write the plan to ``path`` (npz, no pickle) with format version, DAG hash and checksum.
        ``info`` entries are kept when they are JSON-serialisable (numpy values become lists/numbers)."""
        meta = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "memory": self.memory, "method": self.method,
                "dag_hash": self.dag_hash, "io": list(self.io.as_tuple()), "info": _jsonable(self.info)}
        order = np.ascontiguousarray(self.order, dtype=np.int64)
        meta_s = json.dumps(meta, sort_keys=True)
        checksum = hashlib.sha256(meta_s.encode() + order.tobytes()).hexdigest()
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(meta_s), order=order, checksum=np.array(checksum))

    @classmethod
    def load(cls, path: str, dag: Optional[SparseDAG] = None) -> "Plan":
        """Read a plan saved by :meth:`save`; with ``dag``, also check it belongs to that network."""
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        try:
            # open the file ourselves: np.load leaves its own handle open when the file is no npz
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
                meta_s = str(z["meta"])
                order = np.array(z["order"], dtype=np.int64)
                checksum = str(z["checksum"])
            meta = json.loads(meta_s)
        except Exception as e:  # zipfile, json, key and value errors all mean the same to the user
            raise PlanError(f"{path} is not a readable torch_iosparse plan file ({type(e).__name__}: {e})") from None
        if meta.get("format") != PLAN_FORMAT:
            raise PlanError(f"{path} is not a torch_iosparse plan file")
        if meta.get("version") != PLAN_VERSION:
            raise PlanError(f"{path} has plan format version {meta.get('version')}; this torch_iosparse "
                            f"reads version {PLAN_VERSION}")
        if hashlib.sha256(meta_s.encode() + order.tobytes()).hexdigest() != checksum:
            raise PlanError(f"{path} is corrupt (checksum mismatch)")
        try:
            memory = None if meta["memory"] is None else int(meta["memory"])
            p = cls(order, memory, IOCount(*(int(c) for c in meta["io"])), str(meta["method"]),
                    str(meta["dag_hash"]), dict(meta.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{path} has malformed plan metadata ({type(e).__name__}: {e})") from None
        if order.ndim != 1:
            raise PlanError(f"{path} has a malformed order (shape {order.shape})")
        if dag is not None:
            p.check_dag(dag)
        return p

    def __repr__(self) -> str:
        return (f"Plan(method={self.method!r}, memory={self.memory}, io={self.io}, "
                f"n_computed={len(self.order)})")


def _jsonable(info: Dict) -> Dict:
    """The entries of ``info`` that survive a JSON round trip (numpy arrays and scalars are converted)."""
    out = {}
    for k, v in (info or {}).items():
        try:
            json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else _raise(o))
        except (TypeError, ValueError):
            continue
        out[str(k)] = json.loads(json.dumps(v, default=lambda o: o.tolist()))
    return out


def _raise(o):
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------- methods
PlanMethod = Callable[..., np.ndarray]  # (dag, memory, seed, time_budget, **kw) -> order
_METHODS: Dict[str, PlanMethod] = {}


def register_method(name: str):
    """Decorator: make ``plan(..., method=name)`` call ``fn(dag, memory, seed=, time_budget=, **kw)``,
    which returns an order (or ``(order, info_dict)``)."""
    def deco(fn):
        _METHODS[name] = fn
        return fn
    return deco


def methods():
    return sorted(_METHODS)


@register_method("two_optimal")
def _two_optimal(dag: SparseDAG, memory, seed=0, time_budget=None, **kw):
    # The numbering when it is topological (layer order for layered nets: the standard way), else the
    # stable topological sort of it.
    return topological_order(dag)


def plan(dag: SparseDAG, memory: MemorySpec = None, method: str = "two_optimal", seed: int = 0,
         time_budget: Optional[float] = None, **kwargs) -> Plan:
    """Plan ``dag`` for ``memory`` fast-memory slots.

    Args:
        memory: slots (int >= 2), or None for unbounded.
        method: one of :func:`methods` (``"two_optimal"`` always; ``"greedy"``/``"anneal"`` when the
            planner module is present).
        seed, time_budget: passed to stochastic methods; ignored by ``two_optimal``.
    """
    if not isinstance(dag, SparseDAG):
        raise TypeError(f"plan() takes a SparseDAG, got {type(dag).__name__}")
    M = normalize_memory(memory)
    if method not in _METHODS:
        raise ValueError(f"unknown planning method {method!r}; available: {', '.join(methods())}")
    result = _METHODS[method](dag, M, seed=seed, time_budget=time_budget, **kwargs)
    order, info = result if isinstance(result, tuple) else (result, {})
    order = normalize_order(dag, order)
    return Plan(order, M, _simulate_checked(dag, order, M)[0], method, dag.structure_hash(), info)


# ---------------------------------------------------------------------- brute force
def all_topological_orders(dag: SparseDAG):
    """Every topological order of the computed neurons (generator; exponential — tiny DAGs only)."""
    n_in = dag.n_inputs
    comp = list(range(n_in, dag.n_neurons))
    preds = {v: {int(u) for u in dag.in_src[dag.in_ptr[v]:dag.in_ptr[v + 1]] if u >= n_in} for v in comp}
    order = []
    placed = set()

    def rec():
        if len(order) == len(comp):
            yield np.array(order, dtype=np.int64)
            return
        for v in comp:
            if v not in placed and preds[v] <= placed:
                placed.add(v)
                order.append(v)
                yield from rec()
                order.pop()
                placed.discard(v)

    yield from rec()


def brute_force_optimum(dag: SparseDAG, memory: MemorySpec, max_computed: int = 8):
    """The cheapest order under the 2-optimal strategy, by exhaustive search over all topological
    orders (at most ``max_computed`` computed neurons). Returns ``(order, IOCount)``."""
    if dag.n_computed > max_computed:
        raise ValueError(f"brute force is limited to {max_computed} computed neurons, this DAG has "
                         f"{dag.n_computed}")
    best = None
    for order in all_topological_orders(dag):
        io = count_io(dag, order, memory)
        if best is None or io.total < best[1].total:
            best = (order, io)
    return best
