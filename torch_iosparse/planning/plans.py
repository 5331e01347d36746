"""Plans: an order of the computed neurons plus the memory it was made for, and its exact I/O count.

``plan(dag, memory, method)`` dispatches to a registered method; every method returns a plan whose I/O
is at most that of the 2-optimal plan it started from. Plans save to a versioned ``.npz`` that records
the DAG's structure hash and a checksum, so a plan is never silently applied to another network.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import stat
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from ..graph.dag import SparseDAG
from ..files import atomic_write
from ..cost.iomodel import (IOCount, MemorySpec, _simulate_checked, count_io, normalize_memory, normalize_order,
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
        ``info`` entries are kept when they are JSON-serialisable (numpy values become lists/numbers).

        The file is written under a temporary name in the same directory and then renamed over ``path``:
        an existing plan is replaced whole or, if writing fails, kept as it was (never truncated)."""
        meta = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "memory": self.memory, "method": self.method,
                "dag_hash": self.dag_hash, "io": list(self.io.as_tuple()), "info": _jsonable(self.info)}
        order = np.ascontiguousarray(self.order, dtype=np.int64)
        meta_s = json.dumps(meta, sort_keys=True)
        checksum = hashlib.sha256(meta_s.encode() + order.tobytes()).hexdigest()
        atomic_write(path, lambda f: np.savez(f, meta=np.array(meta_s), order=order, checksum=np.array(checksum)))

    @classmethod
    def load(cls, path: str, dag: Optional[SparseDAG] = None) -> "Plan":
        """Read a plan saved by :meth:`save`; with ``dag``, also check it belongs to that network.

        Only a regular file is opened (a FIFO or device at ``path`` raises PlanError instead of blocking),
        and what is read is bounded: each member of the archive by the size it declares, which must not
        exceed what a plan can need (for ``dag``: its computed neurons; else a multiple of the file size),
        so a small file cannot inflate to gigabytes before it is rejected."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise PlanError(f"{path} cannot be opened ({e.strerror or e})") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PlanError(f"{path} is not a regular file (a plan file is an .npz written by Plan.save)")
            limits = _member_limits(st.st_size, dag)
            try:
                arrays = _read_npz(f, limits)
                meta_s = str(arrays["meta"])
                order = np.array(arrays["order"], dtype=np.int64)
                checksum = str(arrays["checksum"])
                meta = json.loads(meta_s)
                if not isinstance(meta, dict):
                    raise ValueError("the metadata is not a JSON object")
            except PlanError as e:
                raise PlanError(f"{path}: {e}") from None
            except Exception as e:  # zipfile, json, key and value errors all mean the same to the user
                raise PlanError(f"{path} is not a readable torch_iosparse plan file "
                                f"({type(e).__name__}: {e})") from None
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


# Members of a plan file and the size each may take once decompressed: the npy header (at most 64 KiB by
# the npy format) plus the data. np.savez stores members uncompressed; a compressed member (e.g. from
# np.savez_compressed) may expand at most _RATIO times the file size.
_MEMBERS = ("meta", "order", "checksum")
_NPY_HEADER = 1 << 16
_RATIO = 64


def _member_limits(file_size: int, dag: Optional[SparseDAG]) -> Dict[str, int]:
    generic = _NPY_HEADER + _RATIO * int(file_size)
    order = _NPY_HEADER + 8 * dag.n_computed if dag is not None else generic
    return {"meta": generic, "order": order, "checksum": _NPY_HEADER + 4 * 64}


def _read_npz(f, limits: Dict[str, int]) -> Dict[str, np.ndarray]:
    """The arrays of an npz archive, reading at most ``limits[name]`` decompressed bytes per member."""
    out = {}
    with zipfile.ZipFile(f) as zf:
        for name in _MEMBERS:
            try:
                info = zf.getinfo(name + ".npy")
            except KeyError:
                raise PlanError(f"the archive has no member {name!r}") from None
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise PlanError(f"member {name!r} uses an unsupported compression (type {info.compress_type})")
            limit = limits[name]
            if info.file_size > limit:
                raise PlanError(f"member {name!r} declares {info.file_size} bytes, more than a plan of this size "
                                f"can hold ({limit})")
            # ZipExtFile never returns more than the declared size and decompresses in bounded steps
            with zf.open(info) as m:
                data = m.read(limit + 1)
            out[name] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    return out


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
