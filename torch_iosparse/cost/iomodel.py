"""The I/O cost model (docs/theory.md) in one place: IOCount, the exact simulator of the
2-optimal strategy, and the lower / upper bounds.

Schedule semantics (the contract the native simulator, this reference and the kernels share):
    for v in order (computed neurons only, topological):
        init v                      -> takes a slot (evicting if none is free)
        for u in sources(v), ascending:
            load u if x_u is not in a slot   (takes a slot)
            fma u -> v
            if that was u's last read: store u if it is an unstored output, then drop u
        finish v
        if nobody reads v: store v if it is an output, drop v;  else v stays in its slot (dirty)
    Eviction frees the resident value whose next read is furthest in the future (never the partial sum
    being accumulated), storing it first if it is dirty (not yet in slow memory). A free slot is always
    the smallest free index, so traces are reproducible slot by slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..graph.dag import GraphError, SparseDAG

MemorySpec = Union[int, float, str, None]

OPS = ("init", "load", "fma", "finish", "store", "drop")


@dataclass(frozen=True)
class IOCount:
    """I/Os of one schedule, split as the cost model reports them.

    ``weights`` and ``biases`` are fixed by the network (m and n − n_I); ``loads + stores`` is the
    activation traffic that order and memory change.
    """

    weights: int
    biases: int
    loads: int
    stores: int
    total: Optional[int] = None

    def __post_init__(self):
        total = self.weights + self.biases + self.loads + self.stores
        if self.total is None:
            object.__setattr__(self, "total", total)
        elif self.total != total:
            raise ValueError(f"IOCount total {self.total} != weights+biases+loads+stores = {total}")

    @property
    def activation_traffic(self) -> int:
        return self.loads + self.stores

    def as_tuple(self) -> Tuple[int, int, int, int, int]:
        return (self.weights, self.biases, self.loads, self.stores, self.total)


class Event(NamedTuple):
    """One step of a schedule. ``src`` is set for ``fma`` (the edge src -> neuron), else -1."""

    op: str
    neuron: int
    src: int
    slot: int

    def __str__(self) -> str:
        if self.op == "fma":
            return f"fma    {self.src} -> {self.neuron}  (x_{self.src} in slot {self.slot}, weight read)"
        note = {"init": ", bias read", "load": ", 1 I/O", "store": ", 1 I/O"}.get(self.op, "")
        return f"{self.op:<6} {self.neuron}  (slot {self.slot}{note})"


# ---------------------------------------------------------------------- argument checking
def normalize_memory(memory: MemorySpec) -> Optional[int]:
    """``None`` means unbounded. Accepts an int >= 2, or None / math.inf / 'inf' / 'unbounded'."""
    if memory is None:
        return None
    if isinstance(memory, str):
        if memory.lower() in ("inf", "unbounded", "infinite"):
            return None
        raise ValueError(f"memory must be an integer >= 2 or 'unbounded', got {memory!r}")
    if isinstance(memory, bool):
        raise TypeError("memory must be an integer number of slots, not a bool")
    if isinstance(memory, float):
        if math.isinf(memory) and memory > 0:
            return None
        if not memory.is_integer():
            raise ValueError(f"memory must be a whole number of slots, got {memory}")
    try:
        M = int(memory)
    except (TypeError, ValueError):
        raise TypeError(f"memory must be an integer number of slots, got {type(memory).__name__}") from None
    if M < 2:
        raise ValueError(f"memory must be >= 2 slots (one for the partial sum, one for an operand), got {M}")
    if M > MAX_MEMORY:
        raise ValueError(f"memory must be at most 2**62 slots, got {M}; use memory=None for unbounded memory")
    return M


# The largest M accepted (the native simulator and kernels count slots in int64; kernels cap M at what a
# network can use, program.compile_plan).
MAX_MEMORY = 2**62


def _native():
    from .. import _native as nat
    return nat.ops()


def _int64(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def _native_arrays(dag: SparseDAG):
    cache = getattr(dag, "_native_cache", None)
    if cache is None:
        cache = (_int64(dag.in_ptr), _int64(dag.in_src), torch.from_numpy(dag.is_output_mask()),
                 _int64(dag.out_ptr), _int64(dag.out_dst))
        dag._native_cache = cache
    return cache


def topological_order(dag: SparseDAG) -> np.ndarray:
    """The stable topological order of the computed neurons: the numbering itself when it is
    topological, else Kahn's algorithm always taking the smallest ready neuron. Raises GraphError on a
    cycle."""
    if dag.numbering_is_topological():
        return np.arange(dag.n_inputs, dag.n_neurons, dtype=np.int64)
    in_ptr, _, _, out_ptr, out_dst = _native_arrays(dag)
    try:
        return _native().topo_sort(in_ptr, out_ptr, out_dst, dag.n_inputs).numpy()
    except (RuntimeError, ValueError) as e:
        raise GraphError(str(e).split("\n")[0]) from None


def normalize_order(dag: SparseDAG, order) -> np.ndarray:
    """Check that ``order`` is a topological permutation of the computed neurons (inputs may be
    included; they are skipped) and return it as int64 without the inputs."""
    if hasattr(order, "order") and hasattr(order, "memory"):  # a Plan
        order.check_dag(dag)
        order = order.order
    if isinstance(order, torch.Tensor):
        order = order.detach().cpu().numpy()
    o = np.asarray(order)
    if o.ndim != 1:
        raise ValueError(f"order must be one-dimensional, got shape {o.shape}")
    if o.size and not np.issubdtype(o.dtype, np.integer):
        raise TypeError(f"order must hold integer neuron ids, got dtype {o.dtype}")
    o = o.astype(np.int64, copy=False)
    if (o.size == dag.n_computed and dag.numbering_is_topological() and o.size
            and o[0] == dag.n_inputs and (np.diff(o) == 1).all()):
        return o.copy()  # the numbering itself (the common case): topological by construction
    if o.size and (o.min() < 0 or o.max() >= dag.n_neurons):
        raise ValueError(f"order has neuron ids outside [0, {dag.n_neurons})")
    o = o[o >= dag.n_inputs]
    pos = np.full(dag.n_neurons, -1, dtype=np.int64)
    pos[o] = np.arange(o.size)
    if o.size != dag.n_computed or (pos[dag.n_inputs:] < 0).any():
        missing = np.flatnonzero(pos[dag.n_inputs:] < 0) + dag.n_inputs
        if missing.size:
            raise ValueError(f"order must list every computed neuron exactly once; missing e.g. {int(missing[0])}")
        raise ValueError("order lists a computed neuron more than once")
    src, dst = dag.edges()
    comp = src >= dag.n_inputs
    bad = pos[src[comp]] > pos[dst[comp]]
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"order is not topological: neuron {int(src[comp][k])} must come before "
                         f"{int(dst[comp][k])}")
    return o


# ---------------------------------------------------------------------- simulation
def simulate(dag: SparseDAG, order, memory: MemorySpec, *, record: bool = False):
    """Native exact replay. Returns ``(IOCount, events)`` where events is an int32 tensor of rows
    ``(op, a, b, slot)`` (op indexes :data:`OPS`; fma has a=src, b=dst) when ``record``, else None."""
    M = normalize_memory(memory)
    return _simulate_checked(dag, normalize_order(dag, order), M, record)


def _simulate_checked(dag: SparseDAG, o: np.ndarray, M: Optional[int], record: bool = False):
    """simulate() for an order and memory that already went through normalize_order/normalize_memory."""
    in_ptr, in_src, is_out, _, _ = _native_arrays(dag)
    o = torch.from_numpy(np.ascontiguousarray(o, dtype=np.int64))
    counts, events = _native().simulate(in_ptr, in_src, o, is_out, dag.n_inputs,
                                        -1 if M is None else M, record)
    w, b, ld, st = (int(c) for c in counts)
    return IOCount(w, b, ld, st), (events if record else None)


def count_io(dag: SparseDAG, order, memory: MemorySpec) -> IOCount:
    """Exact I/O count of the 2-optimal strategy for ``order`` with ``memory`` slots (native code).

    ``order``: a topological permutation of the computed neurons (inputs may be listed; they are
    skipped), or a Plan of this DAG. ``memory``: slots (>= 2) or None for unbounded.
    """
    return simulate(dag, order, memory)[0]


def trace(dag: SparseDAG, order, memory: MemorySpec) -> List[Event]:
    """The event list of the schedule (native simulator), for debugging and the docs."""
    _, ev = simulate(dag, order, memory, record=True)
    return [Event(OPS[r[0]], int(r[2]) if r[0] == 2 else int(r[1]), int(r[1]) if r[0] == 2 else -1, int(r[3]))
            for r in ev.tolist()]


def simulate_reference(dag: SparseDAG, order, memory: MemorySpec) -> Tuple[IOCount, List[Event]]:
    """Pure-Python twin of the native simulator, written independently: next uses are found by
    scanning the remaining edge sequence, victims by a linear search. Small graphs only."""
    M = normalize_memory(memory)
    o = normalize_order(dag, order)
    n_in, is_out = dag.n_inputs, dag.is_output_mask()
    seq = [(int(u), int(v)) for v in o for u in sorted(dag.in_src[dag.in_ptr[v]:dag.in_ptr[v + 1]])]
    reads_left = {}
    for u, _ in seq:
        reads_left[u] = reads_left.get(u, 0) + 1
    slot = {}           # value -> slot
    in_slow = set(range(n_in))
    events: List[Event] = []
    loads = stores = 0
    t = 0  # index of the next edge event in seq

    def next_read(u):
        for k in range(t, len(seq)):
            if seq[k][0] == u:
                return k
        return math.inf

    def free_slot(acc):
        nonlocal stores
        used = set(slot.values())
        cap = M if M is not None else len(used) + 1
        for s in range(cap):
            if s not in used:
                return s
        victim = max((u for u in slot if u != acc), key=next_read)
        if victim not in in_slow:
            stores += 1
            in_slow.add(victim)
            events.append(Event("store", victim, -1, slot[victim]))
        s = slot.pop(victim)
        events.append(Event("drop", victim, -1, s))
        return s

    for v in o:
        v = int(v)
        slot[v] = free_slot(None)
        events.append(Event("init", v, -1, slot[v]))
        for u in sorted(int(x) for x in dag.in_src[dag.in_ptr[v]:dag.in_ptr[v + 1]]):
            if u not in slot:
                assert u in in_slow, "a value was lost"
                slot[u] = free_slot(v)
                loads += 1
                events.append(Event("load", u, -1, slot[u]))
            events.append(Event("fma", v, u, slot[u]))
            t += 1
            reads_left[u] -= 1
            if reads_left[u] == 0:
                if is_out[u] and u not in in_slow:
                    stores += 1
                    in_slow.add(u)
                    events.append(Event("store", u, -1, slot[u]))
                events.append(Event("drop", u, -1, slot.pop(u)))
        events.append(Event("finish", v, -1, slot[v]))
        if reads_left.get(v, 0) == 0:
            if is_out[v]:
                stores += 1
                in_slow.add(v)
                events.append(Event("store", v, -1, slot[v]))
            events.append(Event("drop", v, -1, slot.pop(v)))
    assert all(out in in_slow for out in dag.outputs), "an output never reached slow memory"
    return IOCount(dag.n_edges, dag.n_computed, loads, stores), events


# ---------------------------------------------------------------------- bounds
def _used_inputs(dag: SparseDAG) -> int:
    return int((dag.out_degree()[: dag.n_inputs] > 0).sum())


def lower_bound(dag: SparseDAG, memory: MemorySpec = None) -> int:
    """LB = m + (n − n_I) + n_I + n_O: every weight and bias read once, every input loaded once, every
    output stored once (docs/theory.md). Inputs that no neuron reads are never loaded and not counted.
    Holds for every M >= 2; ``memory`` is validated for API symmetry."""
    normalize_memory(memory)
    return dag.n_edges + dag.n_computed + _used_inputs(dag) + dag.n_outputs


def upper_bound(dag: SparseDAG, memory: MemorySpec = None) -> int:
    """The 2-optimal guarantee: any topological order costs at most this (docs/theory.md), and
    UB <= 2·LB. With unbounded memory nothing is ever evicted, so UB = LB."""
    M = normalize_memory(memory)
    if M is None:
        return lower_bound(dag, None)
    # loads <= one per edge; stores <= one per computed neuron that is read later or is an output.
    stored = int(((dag.out_degree() > 0) | dag.is_output_mask())[dag.n_inputs:].sum())
    return 2 * dag.n_edges + dag.n_computed + stored
