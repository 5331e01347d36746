"""IOSparseNetwork: a pruned network as a drop-in ``nn.Module`` that runs an I/O-planned schedule.

Parameters are only the nonzero weights (one 1-D ``weight`` of length nnz, in the DAG's in-edge order)
and the biases of the computed neurons (``bias``); the structure and the plan live in buffers. Zeros
therefore stay zero under any optimizer: they are not parameters.

``forward`` calls the custom op ``torch.ops.iosparse.dag_forward`` (:func:`torch_iosparse.ops.dag_forward`)
on every device and dtype: the C++ kernel on CPU, the Triton kernel on CUDA (torch_iosparse.backends.cuda.gpu), the
op's pure-PyTorch reference kernel elsewhere.
"""
from __future__ import annotations

import contextlib
import hashlib
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..graph import activations as acts
from ..backends.cpu import hardware, tuning
from .. import ops
from ..graph.activations import Activation
from ..graph.dag import GraphError, SparseDAG
from ..cost.iomodel import IOCount, lower_bound, normalize_memory, upper_bound
from ..planning import Plan

# Structure + plan: persistent buffers (what a state_dict must carry to rebuild the network).
# act_bounds holds each activation's (lo, hi) as float64 bit patterns in int64, so module.to(dtype) can
# never round them.
_STRUCTURE = ("in_ptr", "in_src", "outputs", "act_index", "act_code", "act_bounds", "layer_sizes",
              "plan_order", "plan_memory", "plan_method")
_METHOD_BYTES = 32  # fixed width, so states planned by different methods load into each other

# ---------------------------------------------------------------------- memory
def _auto_memory(memory, dtype: torch.dtype, batch_tile: Optional[int]) -> Optional[int]:
    """Fast-memory slots: ``"auto"`` is what ops.prepare chooses (hardware.fast_memory_slots for the
    batch tile of this machine), anything else goes through iomodel.normalize_memory."""
    if isinstance(memory, str) and memory.lower() == "auto":
        return int(hardware.fast_memory_slots(_batch_tile(batch_tile, dtype), dtype))
    return normalize_memory(memory)


def _batch_tile(batch_tile: Optional[int], dtype: torch.dtype) -> int:
    if batch_tile is None:
        return int(hardware.batch_tile(dtype))
    if int(batch_tile) < 1:
        raise ValueError(f"batch_tile must be >= 1, got {batch_tile}")
    return int(batch_tile)


# ---------------------------------------------------------------------- the module
# The dtype of every persistent structure buffer: a state must carry exactly these (act_bounds is a bit
# pattern, so any other dtype would change its values; a float in_ptr would be truncated by copy_).
_STRUCTURE_DTYPES = {k: torch.int64 for k in _STRUCTURE}
_STRUCTURE_DTYPES["plan_method"] = torch.uint8
_OPTIONAL = ("plan_method",)  # a state without it loads as method "loaded"


@contextlib.contextmanager
def _ordinary_tensors():
    """Context for creating the module's tensors: never inference tensors (they have no version counter,
    cannot be saved for backward or updated in place outside ``torch.inference_mode``), never recorded by
    autograd. So a network built or loaded under ``torch.inference_mode()`` is the same as one built
    outside it: it runs inside and outside inference mode and can later be trained."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _structure_tensors(dag: SparseDAG, plan: Plan) -> Dict[str, torch.Tensor]:
    # np.array copies: the buffers never share memory with the DAG's arrays (which ops.prepare turns into
    # the kernel's op_ buffers) nor with the caller's
    i64 = lambda a: torch.from_numpy(np.array(a, dtype=np.int64))  # noqa: E731
    return {
        "in_ptr": i64(dag.in_ptr), "in_src": i64(dag.in_src), "outputs": i64(dag.outputs),
        "act_index": i64(dag.act_index),
        "act_code": torch.tensor([a.code for a in dag.activations], dtype=torch.int64),
        "act_bounds": torch.tensor([[a.lo, a.hi] for a in dag.activations], dtype=torch.float64).view(torch.int64),
        "layer_sizes": i64(dag.layer_sizes if dag.layer_sizes is not None else []),
        "plan_order": i64(plan.order),
        "plan_memory": torch.tensor(-1 if plan.memory is None else plan.memory, dtype=torch.int64),
        "plan_method": _encode_method(plan.method),
    }


def _encode_method(name: str) -> torch.Tensor:
    b = name.encode()[:_METHOD_BYTES]
    return torch.tensor(list(b) + [0] * (_METHOD_BYTES - len(b)), dtype=torch.uint8)


def _decode_method(t: torch.Tensor) -> str:
    return bytes(int(c) for c in t.cpu().tolist() if c).decode(errors="replace") or "loaded"


def _fingerprint(t: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of the structure tensors (shapes, dtypes and values)."""
    h = hashlib.sha256()
    for k in _STRUCTURE:
        v = t[k].detach().cpu().contiguous()
        h.update(k.encode() + str(tuple(v.shape)).encode() + str(v.dtype).encode() + v.numpy().tobytes())
    return h.hexdigest()


def _entry(t: Dict[str, torch.Tensor], k: str, ndim: Optional[int] = None) -> torch.Tensor:
    """``t[k]`` checked to be a tensor of the structure dtype (and ``ndim`` dimensions), on the CPU."""
    try:
        v = t[k]
    except KeyError:
        raise KeyError(f"state_dict lacks the IOSparseNetwork structure entry {k!r}") from None
    if not isinstance(v, torch.Tensor):
        raise GraphError(f"structure entry {k!r} must be a tensor, got {type(v).__name__}")
    if v.dtype != _STRUCTURE_DTYPES[k]:
        raise GraphError(f"structure entry {k!r} must have dtype {_STRUCTURE_DTYPES[k]}, got {v.dtype}")
    if ndim is not None and v.dim() != ndim:
        raise GraphError(f"structure entry {k!r} must be {ndim}-D, got shape {list(v.shape)}")
    return v.detach().cpu()


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _dag_from_tensors(t: Dict[str, torch.Tensor], weight: torch.Tensor, bias_computed: torch.Tensor) -> SparseDAG:
    """Rebuild a SparseDAG from structure tensors (a state_dict or the module's buffers), validating every
    entry: a forged state raises (GraphError, a ValueError, or KeyError for a missing entry) instead of
    building a network that computes another function or crashes the kernel."""
    in_ptr = _entry(t, "in_ptr", 1).numpy().astype(np.int64)
    in_src = _entry(t, "in_src", 1).numpy().astype(np.int64)
    outputs = _entry(t, "outputs", 1).numpy().astype(np.int64)
    act_index = _entry(t, "act_index", 1).numpy().astype(np.int64)
    codes = _entry(t, "act_code", 1).numpy().astype(np.int64)
    bounds_t = _entry(t, "act_bounds", 2)
    sizes = _entry(t, "layer_sizes", 1).tolist()
    for name, v in (("weight", weight), ("bias", bias_computed)):
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
            raise GraphError(f"{name} must be a 1-D floating-point tensor, got "
                             f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                             f"{' ' + str(v.dtype) if isinstance(v, torch.Tensor) else ''}")
    # the CSR of in-edges
    n = in_ptr.size - 1
    n_in = n - bias_computed.numel()
    if n < 2 or n_in < 1:
        raise GraphError(f"in_ptr describes {n} neurons and bias {bias_computed.numel()} computed ones: a network "
                         "needs at least one input and one computed neuron")
    if in_ptr[0] != 0 or (np.diff(in_ptr) < 0).any() or in_ptr[-1] != in_src.size:
        raise GraphError(f"in_ptr must ascend from 0 to the number of edges ({in_src.size}); got in_ptr[0]="
                         f"{int(in_ptr[0])}, in_ptr[-1]={int(in_ptr[-1])}"
                         + (f", a decrease after position {_first(np.diff(in_ptr) < 0)}"
                            if (np.diff(in_ptr) < 0).any() else ""))
    if weight.numel() != in_src.size:
        raise GraphError(f"weight has {weight.numel()} entries for {in_src.size} edges")
    # the activation table
    k = codes.size
    if k < 1:
        raise GraphError("act_code must hold at least one activation")
    if tuple(bounds_t.shape) != (k, 2):
        raise GraphError(f"act_bounds must have shape [{k}, 2] (one (lo, hi) per act_code entry), got "
                         f"{list(bounds_t.shape)}")
    bad = (codes < 0) | (codes >= len(acts.KINDS))
    if bad.any():
        raise GraphError(f"act_code[{_first(bad)}] = {int(codes[_first(bad)])} is not an activation code "
                         f"(0..{len(acts.KINDS) - 1}: {', '.join(acts.KINDS)})")
    bounds = bounds_t.contiguous().view(torch.float64).numpy()
    lo, hi = bounds[:, 0], bounds[:, 1]
    bad = np.isnan(lo) | np.isnan(hi) | ~(lo <= hi)
    if bad.any():
        i = _first(bad)
        raise GraphError(f"act_bounds[{i}] = ({lo[i]}, {hi[i]}) is not an interval lo <= hi")
    table = [Activation(acts.KINDS[int(c)], float(lo[i]), float(hi[i])) for i, c in enumerate(codes)]
    if act_index.size != n:
        raise GraphError(f"act_index must have one entry per neuron ({n}), got {act_index.size}")
    bad = (act_index < 0) | (act_index >= k)
    if bad.any():
        raise GraphError(f"act_index[{_first(bad)}] = {int(act_index[_first(bad)])} is not an index into the "
                         f"{k} activations of act_code")
    # the DAG (from_edges checks indices, inputs without in-edges, outputs and acyclicity)
    dst = np.repeat(np.arange(n, dtype=np.int64), np.diff(in_ptr))
    w = weight.detach().cpu()
    b = torch.cat([torch.zeros(n_in, dtype=bias_computed.dtype), bias_computed.detach().cpu()])
    per_neuron = table[0] if len(table) == 1 else [table[int(i)] for i in act_index]
    dag = SparseDAG.from_edges(n_in, in_src, dst, w, b, n_neurons=n, outputs=outputs, activation=per_neuron)
    if dag.n_edges != in_src.size or not np.array_equal(dag.in_src.astype(np.int64), in_src):
        # from_edges sorted or merged them: the weights would no longer line up with the edges
        raise GraphError("in_src must list each neuron's sources in ascending order, without repeats")
    if sizes:
        _check_layers(dag, [int(s) for s in sizes])
        dag.layer_sizes = [int(s) for s in sizes]
        dag._levels = None
    return dag


def _check_layers(dag: SparseDAG, sizes: List[int]) -> None:
    """``layer_sizes`` claim a layered network (levels, dense twin, numbering order are derived from them):
    the sizes must partition the neurons with the inputs first, every edge must join consecutive layers, the
    outputs must be the last layer and each layer must have one activation."""
    n, n_in = dag.n_neurons, dag.n_inputs
    if len(sizes) < 2 or min(sizes) < 1 or sum(sizes) != n or sizes[0] != n_in:
        raise GraphError(f"layer_sizes {sizes} do not partition {n} neurons into an input layer of {n_in} and "
                         "non-empty layers")
    layer = np.repeat(np.arange(len(sizes)), sizes)
    src, dst = dag.edges()
    bad = layer[src] + 1 != layer[dst]
    if bad.any():
        e = _first(bad)
        raise GraphError(f"layer_sizes {sizes} do not match the edges: edge {int(src[e])} -> {int(dst[e])} joins "
                         f"layer {int(layer[src[e]])} to layer {int(layer[dst[e]])}, not to the next one")
    if not np.array_equal(np.asarray(dag.outputs, dtype=np.int64), np.arange(n - sizes[-1], n)):
        raise GraphError(f"layer_sizes {sizes} do not match the outputs: a layered network's outputs are its last "
                         f"layer, neurons {n - sizes[-1]}..{n - 1}")
    off = np.cumsum([0] + sizes)
    for j in range(1, len(sizes)):
        a = dag.act_index[off[j]:off[j + 1]]
        if (a != a[0]).any():
            raise GraphError(f"layer {j} of layer_sizes {sizes} mixes activations; a layer has one")


def _plan_from_tensors(t: Dict[str, torch.Tensor], dag: SparseDAG) -> Plan:
    """The Plan recorded in structure tensors, validated against ``dag`` (order and memory) and re-counted."""
    from ..cost.iomodel import count_io, normalize_order
    mem_t = _entry(t, "plan_memory")
    if mem_t.numel() != 1 or mem_t.dim() > 1:
        raise GraphError(f"plan_memory must hold one number, got shape {list(mem_t.shape)}")
    mem = int(mem_t.reshape(-1)[0])
    try:
        M = None if mem == -1 else normalize_memory(mem)
    except (TypeError, ValueError) as e:
        raise GraphError(f"plan_memory {mem} is invalid ({e}; -1 means unbounded)") from None
    order = _entry(t, "plan_order", 1).numpy().astype(np.int64)
    try:
        norm = normalize_order(dag, order)
    except (TypeError, ValueError) as e:
        raise GraphError(f"plan_order is not an order of this network: {e}") from None
    if not np.array_equal(norm, order):
        raise GraphError(f"plan_order must list each of the {dag.n_computed} computed neurons once (and no inputs), "
                         f"got {order.size} entries")
    method = _decode_method(_entry(t, "plan_method", 1)) if "plan_method" in t else "loaded"
    return Plan(norm, M, count_io(dag, norm, M), method, dag.structure_hash())


class IOSparseNetwork(nn.Module):
    """A sparse feed-forward network (pruned ``nn.Linear`` stack or any :class:`SparseDAG`) evaluated
    by an I/O-planned schedule.

    Args:
        dag_or_module: a :class:`SparseDAG`, or an ``nn.Sequential`` of ``nn.Linear`` + supported
            activations (zeros or ``torch.nn.utils.prune`` masks define the sparsity), or one ``nn.Linear``.
        memory: fast-memory slots M (int >= 2), ``None``/``"unbounded"``, or ``"auto"`` (fit the
            per-core cache for ``batch_tile`` columns).
        method: planning method (``"two_optimal"``, or ``"greedy"``/``"anneal"`` from the planner).
        plan: a ready :class:`Plan` for this network (skips planning and the cache).
        seed, time_budget, **plan_kwargs: passed to the planner.
        batch_tile: batch columns per tile (BT) for the kernel; default chosen by the backend.
        strategy: native kernel strategy (``"auto"`` picks per batch size; ``"program"`` always streams
            the planned schedule; ``"level"``/``"dense"``), see torch_iosparse/backends/cpu/strategy.py.
        tune: with ``strategy="auto"``, the first call at a batch-size bucket (1, 2, 4, ..., 1024+) times the
            paths the cost model deems plausible and keeps the fastest, on disk per machine
            (:mod:`torch_iosparse.tuning`; :func:`torch_iosparse.tune` does it ahead of time, e.g. before
            torch.compile). False: the cost model alone. Default: on unless ``IOSPARSE_TUNE=0`` when the
            network is built.
        cache: look up / store the plan in the on-disk plan cache (:mod:`torch_iosparse.cache`), and the
            measured strategy choices (False: they live in this process only).
        cache_dir: cache directory (default ``$IOSPARSE_CACHE_DIR`` or ``~/.cache/torch_iosparse``).
        train_bias: make the biases a Parameter (default: yes, unless built from Linear layers that all
            have ``bias=False``; then they stay a zero buffer, as in the source model).

    Input: ``[..., n_inputs]`` (any leading dims); output ``[..., n_outputs]``.

    ``load_state_dict`` is all or nothing: the incoming entries (shapes, dtypes, and the network and plan
    they describe together with the entries a non-strict load keeps) are validated before anything is
    copied; a state that fails raises and leaves the module as it was. :meth:`from_state_dict` applies the
    same validation.

    Built, loaded, converted (``.to``) or sparsified under ``torch.inference_mode()`` or ``torch.no_grad()``,
    the module's own tensors are still ordinary tensors, never inference tensors: it runs inside and
    outside inference mode and can be trained later. An *input* created under inference mode is an
    inference tensor, and PyTorch forbids using it where autograd records the graph (outside inference
    mode / no_grad with trainable weights): it raises "Inference tensors cannot be saved for backward".
    """

    def __init__(self, dag_or_module: Union[SparseDAG, nn.Module], memory="auto", method: str = "two_optimal", *,
                 plan: Optional[Plan] = None, seed: int = 0, time_budget: Optional[float] = None,
                 batch_tile: Optional[int] = None, strategy: str = "auto", cache: bool = True,
                 cache_dir: Optional[str] = None, train_bias: Optional[bool] = None,
                 dtype: Optional[torch.dtype] = None, tune: Optional[bool] = None, **plan_kwargs):
        super().__init__()
        if isinstance(dag_or_module, SparseDAG):
            dag = dag_or_module
        elif isinstance(dag_or_module, nn.Module):
            dag = SparseDAG.from_module(dag_or_module, dtype=dtype)
        else:
            raise TypeError(f"IOSparseNetwork takes a SparseDAG or an nn.Module, got {type(dag_or_module).__name__}")
        self.batch_tile = batch_tile
        self.strategy = strategy
        self.cache_hit = False
        self._tune = tuning.enabled(tune)  # resolved now: IOSPARSE_TUNE is read when the network is built
        self._tune_cache = cache_dir if cache else False
        if plan is None:
            if method not in _planning_methods():
                raise ValueError(f"unknown planning method {method!r}; available: {', '.join(_planning_methods())}")
            M = _auto_memory(memory, dtype or dag.weight.dtype, batch_tile)
            from ..planning.cache import cached_plan
            plan, self.cache_hit = cached_plan(dag, M, method, seed, time_budget, directory=cache_dir,
                                               use_cache=cache, **plan_kwargs)
            self._replan = {"memory": memory, "method": method, "seed": seed, "time_budget": time_budget,
                            "cache": cache, "cache_dir": cache_dir, "plan_kwargs": dict(plan_kwargs)}
        else:
            plan.check_dag(dag)
            self._replan = _replan_like(plan.memory, plan.method, cache, cache_dir)
        self.method = plan.method
        wdt = dtype or dag.weight.dtype
        if train_bias is None:  # like the source: layers built with bias=False keep no trainable bias
            train_bias = not (isinstance(dag_or_module, nn.Module) and _all_linears_without_bias(dag_or_module))
        with _ordinary_tensors():  # also under torch.inference_mode(): see _ordinary_tensors
            self.weight = nn.Parameter(dag.weight.detach().to(wdt).clone())
            b = dag.bias[dag.n_inputs:].detach().to(wdt).clone()
            if train_bias:
                self.bias = nn.Parameter(b)
            else:
                self.register_buffer("bias", b)  # zeros, same state_dict key, not trained
            for k, v in _structure_tensors(dag, plan).items():
                self.register_buffer(k, v)
        self._install_derived(self._derive(dag, plan))
        _watch_pattern(self.weight)

    # -------------------------------------------------------------- construction helpers
    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor], prefix: str = "", **kwargs) -> "IOSparseNetwork":
        """Build a module from a state_dict alone (structure, plan, weights): the inverse of
        ``state_dict()``, e.g. after ``torch.load(path, weights_only=True)``. The state is validated as
        :meth:`load_state_dict` validates it (GraphError, a ValueError, for a forged or corrupt structure;
        KeyError for a missing entry)."""
        t = {k: state_dict[prefix + k] for k in _STRUCTURE if prefix + k in state_dict}
        for k in ("weight", "bias"):
            if prefix + k not in state_dict:
                raise KeyError(f"state_dict lacks {prefix + k!r}: not an IOSparseNetwork state")
        dag = _dag_from_tensors(t, state_dict[prefix + "weight"], state_dict[prefix + "bias"])
        return cls(dag, plan=_plan_from_tensors(t, dag), **kwargs)

    def _derive(self, dag: SparseDAG, plan: Plan) -> Dict:
        """Everything that follows from structure + plan (the op's compiled network and the summary
        numbers), computed without changing the module: :meth:`_install_derived` puts it in place."""
        with _ordinary_tensors():
            net = ops.prepare(dag, plan, batch_tile=_batch_tile(self.batch_tile, self.weight.dtype),
                              strategy=self.strategy, dtype=self.weight.dtype, tune=getattr(self, "_tune", False),
                              tune_cache=getattr(self, "_tune_cache", None))
            dev = self.weight.device
            # copies: the op's buffers never share memory with the persistent buffers or the caller's DAG
            # (ops.prepare makes some of them from the DAG's arrays without copying)
            buffers = {k: v.to(dev, copy=True) for k, v in net.buffers.items()}
            # The kernel fixes the dtype of its float buffers (e.g. float64 activation bounds); keep the
            # originals so module.to(dtype) / .half() cannot change (or round) them, see _apply.
            fixed = {"op_" + k: v.clone() for k, v in net.buffers.items() if v.is_floating_point()}
        M = plan.memory
        sizes = dag.layer_sizes
        dense = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) if sizes else None
        summary = {
            "n_inputs": dag.n_inputs, "n_outputs": dag.n_outputs, "n_neurons": dag.n_neurons,
            "n_edges": dag.n_edges, "layer_sizes": list(sizes) if sizes else None, "dense_weights": dense,
            "memory": M, "method": plan.method, "io": plan.io, "lb": lower_bound(dag, M), "ub": upper_bound(dag, M),
            "batch_tile": int(net.meta["batch_tile"]), "strategy": _describe_strategy(net.meta),
        }
        tuner = net.info["tuner"]
        tuner.meta = dict(net.meta)  # the module's own meta: the tuner updates its thresholds in place
        return {"buffers": buffers, "fixed": fixed, "meta": tuner.meta, "summary": summary,
                "method": plan.method, "tuner": tuner}

    def _install_derived(self, d: Dict) -> None:
        """Replace the op's buffers and the summary by those of :meth:`_derive`. The op's buffers are
        non-persistent: state_dicts carry only the structure."""
        for k in [k for k in self._buffers if k.startswith("op_")]:
            del self._buffers[k]
            self._non_persistent_buffers_set.discard(k)
        self._op_keys: Tuple[str, ...] = tuple(d["buffers"])
        for k, v in d["buffers"].items():
            self.register_buffer("op_" + k, v, persistent=False)
        self._op_fixed = d["fixed"]
        self._op_meta: Dict = d["meta"]
        self._tuner = d["tuner"]  # holds the same meta dict
        self._summary = d["summary"]
        self.method = d["method"]
        self._fingerprint = self._structure_fingerprint()

    def _apply(self, fn, recurse=True):
        with _ordinary_tensors():  # .to() / .half() under inference_mode make no inference tensors either
            super()._apply(fn, recurse)
            for k, orig in getattr(self, "_op_fixed", {}).items():
                cur = self._buffers.get(k)
                if cur is not None and cur.dtype != orig.dtype:
                    self._buffers[k] = orig.to(cur.device)
        if self._parameters.get("weight") is not None:  # a conversion may make a new Parameter
            _watch_pattern(self.weight)
        return self

    def _own_state(self) -> Dict[str, torch.Tensor]:
        """The tensors of this module's state_dict entries (parameters and persistent buffers)."""
        out = {k: v for k, v in self._parameters.items() if v is not None}
        out.update((k, v) for k, v in self._buffers.items()
                   if v is not None and k not in self._non_persistent_buffers_set)
        return out

    def _structure_fingerprint(self) -> str:
        return _fingerprint(self._own_state())

    def _check_state(self, state_dict, prefix: str) -> Tuple[List[str], Optional[Dict]]:
        """Validate this module's entries of ``state_dict`` before anything is copied: every entry a tensor
        of the right shape and dtype, and the structure they describe together with the entries that are
        not in the state (a non-strict load keeps those) a valid network and plan. Returns the problems
        and, when the structure changes, the derived state to install after the copy."""
        own = self._own_state()
        incoming, problems = {}, []
        for k, cur in own.items():
            if prefix + k not in state_dict:
                continue
            v = state_dict[prefix + k]
            if not isinstance(v, torch.Tensor):
                problems.append(f'While copying the parameter named "{prefix + k}", expected torch.Tensor '
                                f"but received {type(v).__name__}")
                continue
            if cur.dim() == 0 and v.dim() == 1 and v.shape[0] == 1:  # as nn.Module loads a [1] into a 0-d
                v = v[0]
            if v.shape != cur.shape:
                problems.append(f"size mismatch for {prefix + k}: copying a param with shape {v.shape} from "
                                f"checkpoint, the shape in current model is {cur.shape}.")
            elif k in _STRUCTURE_DTYPES and v.dtype != _STRUCTURE_DTYPES[k]:
                problems.append(f"dtype mismatch for {prefix + k}: the structure entry must be "
                                f"{_STRUCTURE_DTYPES[k]}, got {v.dtype}")
            elif k not in _STRUCTURE_DTYPES and not v.is_floating_point():
                problems.append(f"dtype mismatch for {prefix + k}: expected a floating-point tensor, got {v.dtype}")
            elif v.is_meta:
                problems.append(f"{prefix + k} is a meta tensor (no values)")
            incoming[k] = v
        if problems:
            return problems, None
        merged = {**own, **incoming}
        if _fingerprint(merged) == self._fingerprint:
            return [], None
        try:
            dag = _dag_from_tensors(merged, merged["weight"], merged["bias"])
            return [], self._derive(dag, _plan_from_tensors(merged, dag))
        except Exception as e:  # GraphError, PlanError, KeyError, a kernel builder's RuntimeError ...
            return [f"the IOSparseNetwork structure in the state is invalid ({type(e).__name__}: {e}); "
                    "nothing of this module was loaded"], None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # All or nothing: validate first (a corrupt in_ptr copied in and found wrong afterwards would stay in
        # the buffers, so state_dict() would return it and the kernel would read it), then copy, then
        # install the structure-derived state.
        problems, derived = self._check_state(state_dict, prefix)
        if problems:
            own = self._own_state()
            missing_keys.extend(prefix + k for k in own if prefix + k not in state_dict)
            if strict:
                unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own)
            error_msgs.extend(problems)
            return
        changed = {k: v.detach().clone() for k, v in self._own_state().items() if k in _STRUCTURE} \
            if derived is not None else {}
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) > n_errors:  # a copy failed after all: put the old structure back
            with _ordinary_tensors():
                for k, v in changed.items():
                    self._buffers[k] = v
            return
        if derived is not None:
            self._install_derived(derived)
            if any(not torch.equal(changed[k].cpu(), self._buffers[k].cpu()) for k in ("in_ptr", "in_src")):
                _pattern_changed(self.weight)  # optimizer state of the old edges must not reach the new ones

    # -------------------------------------------------------------- pattern updates (gradual pruning)
    def masks(self) -> List[torch.Tensor]:
        """The sparsity pattern as one bool mask per layer, ``[out_features, in_features]`` (True = an edge),
        in layer order: the form :meth:`update_mask_` takes (layered networks)."""
        sizes = self._layer_sizes_or_raise("masks()")
        off = np.cumsum([0] + sizes)
        src, dst = self._edges()
        out = []
        for k in range(len(sizes) - 1):
            sel = (dst >= off[k + 1]) & (dst < off[k + 2])
            m = torch.zeros(sizes[k + 1], sizes[k], dtype=torch.bool)
            m[torch.from_numpy(dst[sel] - off[k + 1]), torch.from_numpy(src[sel] - off[k])] = True
            out.append(m)
        return out

    def update_mask_(self, masks, *, weights=None, optimizer=None) -> "MaskUpdate":
        """Give the network a new sparsity pattern in place (gradual pruning, prune-and-regrow): a new mask
        is a new network, re-planned through the plan cache (a pattern planned before, with the options
        this module was built with, is a cache hit: :attr:`cache_hit`).

        Args:
            masks: one mask per layer, ``[out_features, in_features]`` (bool, or numbers where nonzero
                means an edge, as ``torch.nn.utils.prune``'s ``weight_mask``), in the order of
                :meth:`masks`; or, for any network, a :class:`SparseDAG` over the same neurons (inputs,
                outputs, activations) whose edges are the new pattern (its weights are not used).
            weights: the values of the new edges. Default: an edge of both patterns keeps its current
                (trained) weight, a new edge starts at zero. Else one dense ``[out_features, in_features]``
                matrix per layer (its entries outside the new mask are ignored) or a 1-D tensor with one
                value per new edge in in-edge order (sorted by target neuron, then source).
            optimizer: an optimizer (or a list of them) holding this network's parameters: its state of
                ``weight`` (momentum, Adam moments, ...) is remapped edge by edge, see
                :func:`remap_optimizer_state_`.

        The Parameter objects stay the same (``weight`` is resized through ``.data``; ``bias`` does not
        change), so optimizers, parameter groups and schedulers keep working; the old ``weight.grad`` is
        dropped. Optimizer state of the old edges is never applied to the new ones: an optimizer that held
        state of ``weight`` and was not remapped (here or with :func:`remap_optimizer_state_`) raises at
        its next ``step()`` (eager optimizers; a ``torch.compile``d ``step`` is not checked). Wrappers that
        size buffers by the parameters at construction (DDP, FSDP, an EMA copy) must be rebuilt or
        remapped (:meth:`MaskUpdate.remap`). Nothing changes when the masks or the planning are invalid.

        Returns a :class:`MaskUpdate` (which edges survived, counts, cache hit).
        """
        opts = _optimizer_list(optimizer)
        for opt in opts:  # an optimizer that cannot be remapped stops the update before anything changes
            if not _holds(opt, self.weight):
                raise ValueError(f"this {type(opt).__name__} does not optimize the network's weight")
            _check_remappable(opt, self.weight, self.nnz)
        pending = self._prepare_mask_update(masks, weights)
        self._commit_mask_update(pending)
        update = pending["update"]
        for opt in opts:
            remap_optimizer_state_(opt, self.weight, update)
        return update

    def _layer_sizes_or_raise(self, what: str) -> List[int]:
        sizes = self._summary["layer_sizes"]
        if not sizes:
            raise ValueError(f"{what} needs a layered network (built from nn.Linear layers); for a general DAG "
                             "pass a SparseDAG over the same neurons to update_mask_")
        return list(sizes)

    def _edges(self) -> Tuple[np.ndarray, np.ndarray]:
        """(source, target) of every edge, in in-edge order (target, then source, ascending)."""
        in_ptr = self.in_ptr.cpu().numpy().astype(np.int64)
        return self.in_src.cpu().numpy().astype(np.int64), np.repeat(np.arange(in_ptr.size - 1), np.diff(in_ptr))

    def _pattern_edges(self, masks) -> Tuple[np.ndarray, np.ndarray]:
        """(source, target) of the edges of ``masks`` (see :meth:`update_mask_`), in in-edge order."""
        n, n_in = self._summary["n_neurons"], self._summary["n_inputs"]
        if isinstance(masks, SparseDAG):
            dag = masks
            if dag.n_inputs != n_in or dag.n_neurons != n or \
                    not np.array_equal(np.asarray(dag.outputs, np.int64), self.outputs.cpu().numpy()):
                raise ValueError(f"the new pattern's SparseDAG must have the same neurons ({n_in} inputs, {n} neurons, "
                                 f"the same outputs); got {dag.n_inputs} inputs, {dag.n_neurons} neurons")
            code = np.array([a.code for a in dag.activations], np.int64)[dag.act_index.astype(np.int64)]
            bounds = np.array([[a.lo, a.hi] for a in dag.activations], np.float64)[dag.act_index.astype(np.int64)]
            idx = self.act_index.cpu().numpy()
            mine_code = self.act_code.cpu().numpy()[idx]
            mine_bounds = self.act_bounds.cpu().contiguous().view(torch.float64).numpy()[idx]
            differ = (code != mine_code) | (bounds != mine_bounds).any(axis=1)
            differ[:n_in] = False
            if differ.any():
                v = _first(differ)
                raise ValueError(f"the new pattern's SparseDAG has other activations (neuron {v}: "
                                 f"{dag.activation_of(v)}); a pattern update keeps the neurons")
            src, dst = dag.edges()
            return src.astype(np.int64), dst.astype(np.int64)
        sizes = self._layer_sizes_or_raise("per-layer masks")
        if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)):
            raise TypeError(f"masks must be a list of {len(sizes) - 1} per-layer masks or a SparseDAG, got "
                            f"{type(masks).__name__}")
        if len(masks) != len(sizes) - 1:
            raise ValueError(f"this network has {len(sizes) - 1} layers (sizes {sizes}); got {len(masks)} masks")
        off = np.cumsum([0] + sizes)
        srcs, dsts = [], []
        for k, m in enumerate(masks):
            m = _as_layer_matrix(m, (sizes[k + 1], sizes[k]), f"mask of layer {k}")
            rows, cols = (m != 0).nonzero(as_tuple=True)  # row-major: in-edge order
            srcs.append(cols.numpy() + off[k])
            dsts.append(rows.numpy() + off[k + 1])
        return np.concatenate(srcs).astype(np.int64), np.concatenate(dsts).astype(np.int64)

    def _prepare_mask_update(self, masks, weights) -> Dict:
        """Everything a pattern update installs, computed and validated without changing the module (ordinary
        tensors also under ``torch.inference_mode()``: the weight stays trainable)."""
        if torch.compiler.is_compiling():
            raise RuntimeError("update_mask_ changes the network's structure: call it outside torch.compile")
        with _ordinary_tensors():
            n = self._summary["n_neurons"]
            src, dst = self._pattern_edges(masks)
            old_src, old_dst = self._edges()
            _, kept_old, kept_new = np.intersect1d(old_dst * n + old_src, dst * n + src, assume_unique=True,
                                                   return_indices=True)
            kept_old, kept_new = torch.from_numpy(kept_old), torch.from_numpy(kept_new)
            cur = self.weight.detach()
            if weights is None:
                w = torch.zeros(src.size, dtype=cur.dtype, device=cur.device)
                w[kept_new.to(cur.device)] = cur[kept_old.to(cur.device)]
            else:
                w = self._new_edge_values(weights, src, dst).to(device=cur.device, dtype=cur.dtype)
            in_ptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(dst, minlength=n), out=in_ptr[1:])
            t = {k: getattr(self, k) for k in _STRUCTURE}
            t["in_ptr"], t["in_src"] = torch.from_numpy(in_ptr), torch.from_numpy(src)
            dag = _dag_from_tensors(t, w, self.bias)  # validates (layers, outputs, acyclicity)
            plan, hit = self._replan_pattern(dag)
            derived = self._derive(dag, plan)
            structure = _structure_tensors(dag, plan)
        update = MaskUpdate(kept_old, kept_new, int(old_src.size), int(src.size), hit)
        return {"weight": w, "structure": structure, "derived": derived, "update": update}

    def _new_edge_values(self, weights, src: np.ndarray, dst: np.ndarray) -> torch.Tensor:
        if isinstance(weights, torch.Tensor) and weights.dim() == 1:
            if weights.numel() != src.size:
                raise ValueError(f"weights: the new pattern has {src.size} edges, got {weights.numel()} values")
            vals = weights.detach()
        else:
            sizes = self._layer_sizes_or_raise("per-layer weights")
            if not isinstance(weights, (list, tuple)) or len(weights) != len(sizes) - 1:
                raise ValueError(f"weights must be one dense matrix per layer ({len(sizes) - 1}) or a 1-D tensor "
                                 "with one value per new edge")
            off = np.cumsum([0] + sizes)
            layer = np.searchsorted(off, dst, side="right") - 2  # the layer each edge's target ends
            vals = torch.empty(src.size, dtype=torch.float64)
            for k, W in enumerate(weights):
                W = _as_layer_matrix(W, (sizes[k + 1], sizes[k]), f"weights of layer {k}")
                sel = np.flatnonzero(layer == k)
                vals[torch.from_numpy(sel)] = W[torch.from_numpy(dst[sel] - off[k + 1]),
                                                torch.from_numpy(src[sel] - off[k])].double()
        if not vals.is_floating_point() or not torch.isfinite(vals).all():
            raise ValueError("weights must be finite floating-point values")
        return vals

    def _replan_pattern(self, dag: SparseDAG) -> Tuple[Plan, bool]:
        """A plan of ``dag`` made as this module's own was (memory spec, method, seed, ...), through the
        plan cache."""
        from ..planning.cache import cached_plan
        o = getattr(self, "_replan", None) or _replan_like(self.memory, self.method, True, None)
        M = _auto_memory(o["memory"], self.weight.dtype, self.batch_tile)
        return cached_plan(dag, M, o["method"], o["seed"], o["time_budget"], directory=o["cache_dir"],
                           use_cache=o["cache"], **o["plan_kwargs"])

    def _commit_mask_update(self, pending: Dict) -> None:
        """Install a prepared pattern update (cannot fail half-way: everything was built and checked)."""
        dev = self.in_ptr.device
        with _ordinary_tensors():
            self.weight.data = pending["weight"]
            self.weight.grad = None  # the gradient of the old edges
            for k, v in pending["structure"].items():
                self._buffers[k] = v.to(dev)
        self._install_derived(pending["derived"])
        self.cache_hit = pending["update"].cache_hit
        _pattern_changed(self.weight)

    # -------------------------------------------------------------- views
    @property
    def n_inputs(self) -> int:
        return self._summary["n_inputs"]

    @property
    def n_outputs(self) -> int:
        return self._summary["n_outputs"]

    @property
    def nnz(self) -> int:
        return self._summary["n_edges"]

    @property
    def memory(self) -> Optional[int]:
        return self._summary["memory"]

    @property
    def io(self) -> IOCount:
        return self._summary["io"]

    def summary(self) -> Dict:
        """Sizes, plan and bounds as a dict (what :func:`torch_iosparse.explain` prints). ``strategy``: the
        kernel's rule for the weights' dtype at this thread count; ``strategy_by_bucket``: per batch-size
        bucket the path that runs and whether it was "measured" or comes from the cost "model";
        ``tuning``: whether buckets are measured on first use."""
        s = dict(self._summary)
        tuner, dt = self._tuner, self.weight.dtype
        s["strategy"] = _describe_strategy(tuner.thresholds_meta(dt))
        s["strategy_by_bucket"] = tuner.report(dt)
        s["tuning"] = "on (measured on first use)" if tuner.enabled else \
            "off (cost model)" if self.strategy == "auto" else "forced strategy"
        return s

    def _tune_bucket(self, b: int, dtype: torch.dtype, force: bool = False, backward: bool = False) -> Optional[Dict]:
        """Measure bucket ``b`` for inputs of ``dtype`` now (torch_iosparse.tune; ``backward``: the backward's
        paths too); None when not tuned."""
        tuner = self._tuner
        if not tuner.enabled or self.weight.device.type != "cpu":
            return None
        bufs = {k: self._buffers["op_" + k] for k in self._op_keys}
        with torch.no_grad():
            bias_full = nn.functional.pad(self.bias, (self._summary["n_inputs"], 0))
        return tuner.ensure(b, dtype, torch.get_num_threads(), self.weight, bias_full, bufs, force=force,
                            backward=backward)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_tuner" not in self.__dict__ and "_op_meta" in self.__dict__:  # pickled before tuning existed
            self._tuner = tuning.Tuner(self._op_meta, enabled=False)
        if "weight" in self._parameters:
            _watch_pattern(self.weight)

    def to_dag(self) -> SparseDAG:
        """The network (with the current, possibly trained, weights) as a :class:`SparseDAG`."""
        t = {k: getattr(self, k) for k in _STRUCTURE}
        return _dag_from_tensors(t, self.weight, self.bias)

    def plan(self) -> Plan:
        """The plan this module runs."""
        from ..cost.iomodel import count_io
        dag = self.to_dag()
        order = self.plan_order.cpu().numpy()
        return Plan(order, self.memory, self.io, self.method, dag.structure_hash())

    def to_dense(self) -> nn.Sequential:
        """An equivalent ``nn.Sequential`` of dense ``nn.Linear`` (+ activation) layers (layered nets)."""
        if not self._summary["layer_sizes"]:
            raise ValueError("to_dense() needs a layered network (built from nn.Linear layers); this one is a "
                             "general DAG — use to_dag().forward_reference instead")
        layers: List[nn.Module] = []
        dev, dt = self.weight.device, self.weight.dtype
        with_bias = "bias" in self._parameters or bool(self.bias.any())
        for W, b, a in self.to_dag().to_dense_layers():
            lin = nn.Linear(W.shape[1], W.shape[0], bias=with_bias, device=dev, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(W)
                if with_bias:
                    lin.bias.copy_(b)
            layers.append(lin)
            if a.kind != "identity":
                layers.append(a.to_module())
        return nn.Sequential(*layers)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: the kernel is a custom op with Python-side dispatch and
        metadata, which TorchScript cannot compile; say so instead of failing on IOCount's source."""
        raise RuntimeError("torch.jit.script cannot compile an IOSparseNetwork (its kernel is a custom op with a "
                           "Python dispatcher); use torch.compile or torch.export, or torch_iosparse.densify(model) "
                           "for a dense TorchScript model")

    def extra_repr(self) -> str:
        s = self._summary
        sizes = "x".join(map(str, s["layer_sizes"])) if s["layer_sizes"] else \
            f"{s['n_inputs']}->{s['n_neurons'] - s['n_inputs'] - s['n_outputs']} hidden->{s['n_outputs']}"
        dens = f", density={s['n_edges'] / s['dense_weights']:.2%}" if s["dense_weights"] else ""
        M = "unbounded" if s["memory"] is None else s["memory"]
        return (f"sizes={sizes}, nnz={s['n_edges']}{dens}, M={M}, method={s['method']}, "
                f"io={s['io'].total} (LB={s['lb']}, UB={s['ub']})")

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in = self._summary["n_inputs"]
        if x.dim() == 0 or x.shape[-1] != n_in:
            raise ValueError(f"IOSparseNetwork expects inputs of width {n_in} (shape [..., {n_in}]), "
                             f"got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"IOSparseNetwork expects a floating-point input, got {x.dtype}")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):  # like nn.Linear
            raise TypeError(f"IOSparseNetwork has {self.weight.dtype} weights but the input is {x.dtype}; convert "
                            f"one of them (e.g. net.to({x.dtype}) or x.to({self.weight.dtype}))")
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, n_in)
        bias_full = nn.functional.pad(self.bias, (n_in, 0))
        # self._buffers directly: nn.Module.__getattr__ costs ~0.75 us per name (21 us for the 28 buffers,
        # a fifth of a small net's call)
        buffers = self._buffers
        bufs = {k: buffers["op_" + k] for k in self._op_keys}
        tuner = self._tuner
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            meta = tuner.op_meta()  # a constant of the traced graph (see Tuner.op_meta)
        else:
            if tuner.enabled:  # measure a new batch-size bucket (eager only)
                tuner.maybe_tune(x2, self.weight, bias_full, bufs)
            meta = self._op_meta
        y = ops.dag_forward(x2.contiguous(), self.weight, bias_full, bufs, meta)
        if tuner.enabled and y.requires_grad and not torch.compiler.is_compiling():
            tuner.maybe_tune_backward(x2, y, self.weight, bias_full, bufs)
        # A 2-D input gets the op's own output, not a view of it (FSDP2 warns about modules returning views:
        # an in-place op on one would skip its pre-backward hook).
        return y if x.dim() == 2 else y.reshape(*lead, self._summary["n_outputs"])


# ---------------------------------------------------------------------- pattern updates
@dataclass(frozen=True)
class MaskUpdate:
    """What :meth:`IOSparseNetwork.update_mask_` changed: the edges of both patterns (``kept_old[i]`` in the
    old ``weight`` is ``kept_new[i]`` in the new one), the edge counts and whether the plan came from the
    cache. :meth:`remap` carries any per-edge tensor (an EMA of the weights, an optimizer's state) over."""

    kept_old: torch.Tensor
    kept_new: torch.Tensor
    n_old: int
    n_new: int
    cache_hit: bool

    @property
    def kept(self) -> int:
        return int(self.kept_old.numel())

    @property
    def removed(self) -> int:
        return self.n_old - self.kept

    @property
    def added(self) -> int:
        return self.n_new - self.kept

    def remap(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A per-edge tensor of the old pattern (first dimension ``n_old``) for the new one: entries of
        surviving edges kept, new edges ``fill``."""
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != self.n_old:
            raise ValueError(f"remap takes a tensor with one entry per old edge ({self.n_old}), got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        with torch.inference_mode(False):  # an ordinary tensor (trainable state) also under inference mode
            out = t.new_full((self.n_new, *t.shape[1:]), fill)
            out[self.kept_new.to(t.device)] = t[self.kept_old.to(t.device)]
        return out


def remap_optimizer_state_(optimizer: torch.optim.Optimizer, param: torch.Tensor, update: MaskUpdate) -> None:
    """Carry ``optimizer``'s state of a network's ``weight`` over a pattern update (``update`` from
    :meth:`IOSparseNetwork.update_mask_`): every per-edge state tensor (SGD's momentum buffer, Adam's
    moments, ...) keeps the entries of surviving edges, new edges start at zero, as a new parameter's state
    would; scalars (Adam's ``step``) are kept. A state tensor of any other shape cannot be remapped: a
    ValueError, before anything is changed."""
    if not _holds(optimizer, param):
        raise ValueError(f"this {type(optimizer).__name__} does not optimize the given parameter (pass the "
                         "optimizer that holds the network's weight)")
    _check_remappable(optimizer, param, update.n_old)
    state = optimizer.state.get(param) or {}
    for k, v in list(state.items()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            state[k] = update.remap(v)


def _holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(p is param for g in optimizer.param_groups for p in g["params"])


def _check_remappable(optimizer: torch.optim.Optimizer, param: torch.Tensor, n_old: int) -> None:
    for k, v in (optimizer.state.get(param) or {}).items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != (n_old,):
            raise ValueError(f"{type(optimizer).__name__} state {k!r} has shape {list(v.shape)}, not one entry per "
                             f"edge ({n_old}): it cannot be remapped to the new pattern")


def update_masks_(model: nn.Module, masks, *, optimizer=None) -> Dict[str, MaskUpdate]:
    """:meth:`IOSparseNetwork.update_mask_` for the networks of a sparsified model, all or none.

    Args:
        masks: ``{name: mask(s)}``, where a name is either
            - a network's path (as ``model.named_modules()`` gives it, e.g. ``"0"`` or ``"2.ffn.0"``) with its
              per-layer masks (a list) or a SparseDAG, as :meth:`IOSparseNetwork.update_mask_` takes them; or
            - the path of an ``nn.Linear`` that :func:`~torch_iosparse.sparsify` fused into a network (its path in
              the original model, in :func:`~torch_iosparse.densify`'s copy and for ``torch.nn.utils.prune``)
              with that layer's mask (one ``[out_features, in_features]`` tensor); the network's other layers
              keep their patterns. A network's own path names its first Linear too: a tensor there is that
              layer's mask, a list the whole network's.
            Or a callable ``(name, network) -> masks or None`` (per network; None: keep it), e.g. magnitude
            pruning from ``network.to_dense()``.
        optimizer: an optimizer (or a list) whose state of the networks' weights is remapped.

    Every update is validated and planned before any network changes. Returns ``{network path: MaskUpdate}``.
    """
    nets = {name: m for name, m in model.named_modules() if isinstance(m, IOSparseNetwork)}
    if callable(masks):
        chosen = {name: masks(name, net) for name, net in nets.items()}
        chosen = {k: v for k, v in chosen.items() if v is not None}
    else:
        chosen = _masks_by_network(model, nets, dict(masks))
    opts = _optimizer_list(optimizer)
    pending = {name: nets[name]._prepare_mask_update(m, None) for name, m in chosen.items()}
    holders = {name: [o for o in opts if _holds(o, nets[name].weight)] for name in pending}
    for name in pending:
        for opt in holders[name]:
            _check_remappable(opt, nets[name].weight, nets[name].nnz)
    out = {}
    for name, p in pending.items():
        nets[name]._commit_mask_update(p)
        out[name] = p["update"]
        for opt in holders[name]:
            remap_optimizer_state_(opt, nets[name].weight, out[name])
    return out


def _masks_by_network(model: nn.Module, nets: Dict[str, IOSparseNetwork], masks: Dict) -> Dict:
    """``{network path: per-layer masks}`` from names of networks and of the Linear layers fused into them."""
    from .chains import FusedInto
    layer_of: Dict[str, Tuple[str, int]] = {name: (name, 0) for name in nets}  # a network's path: its first layer
    by_record = {id(net.sparsify_record): name for name, net in nets.items()
                 if getattr(net, "sparsify_record", None) is not None}
    for path, m in model.named_modules():
        if isinstance(m, FusedInto) and m.linear_index is not None and id(m.chain) in by_record:
            layer_of[path] = (by_record[id(m.chain)], m.linear_index)
    out: Dict[str, object] = {}
    per_layer: Dict[str, Dict[int, object]] = {}
    for name, value in masks.items():
        if name not in layer_of:
            raise KeyError(f"no IOSparseNetwork or Linear fused into one is named {name!r} in the model (networks: "
                           f"{', '.join(repr(n) for n in nets) or 'none'})")
        if isinstance(value, (torch.Tensor, np.ndarray)):  # one Linear's mask
            net_name, k = layer_of[name]
            per_layer.setdefault(net_name, {})[k] = value
        elif name in nets:
            out[name] = value
        else:
            raise TypeError(f"{name!r} is a Linear fused into the network {layer_of[name][0]!r}: give its mask as one "
                            f"tensor, got {type(value).__name__}")
    for net_name, layers in per_layer.items():
        if net_name in out:
            raise ValueError(f"the network {net_name!r} is given both whole and by layer; give one of them")
        current = nets[net_name].masks()
        for k, m in layers.items():
            if k >= len(current):
                raise ValueError(f"the network {net_name!r} has {len(current)} layers, a mask was given for layer {k}")
            current[k] = m
        out[net_name] = current
    return out


def _optimizer_list(optimizer) -> List[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), got {type(o).__name__}")
    return opts


def _replan_like(memory, method: str, cache: bool, cache_dir: Optional[str]) -> Dict:
    """Planning options for pattern updates of a network built from a ready plan: that plan's memory and
    method (or the 2-optimal order when the method is not a registered one, e.g. a loaded plan)."""
    return {"memory": memory, "method": method if method in _planning_methods() else "two_optimal", "seed": 0,
            "time_budget": None, "cache": cache, "cache_dir": cache_dir, "plan_kwargs": {}}


def _as_layer_matrix(m, shape: Tuple[int, int], name: str) -> torch.Tensor:
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(m)
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {list(shape)}, got {type(m).__name__}")
    if tuple(m.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ([out_features, in_features]), got {list(m.shape)}")
    m = m.detach().cpu()
    if m.is_floating_point() and not torch.isfinite(m).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    return m


# Stale optimizer state. A pattern update keeps the weight Parameter but changes what its entries mean;
# state an optimizer kept for the old edges (the same tensors, not remapped) must not reach the new ones,
# even when the edge count did not change (prune-and-regrow). Every network's weight is registered with its
# pattern version; global optimizer step hooks remember, per optimizer and weight, the version and the state
# tensors after each step, and before the next step raise when the version moved on but the tensors did not.
_PATTERN_VERSION: "WeakIdKeyDictionary" = None
_SEEN_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _watch_pattern(weight: torch.Tensor) -> None:
    global _PATTERN_VERSION
    if _PATTERN_VERSION is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from torch.utils.weak import WeakIdKeyDictionary
        _PATTERN_VERSION = WeakIdKeyDictionary()
        register_optimizer_step_pre_hook(_check_optimizer_state)
        register_optimizer_step_post_hook(_record_optimizer_state)
    if weight not in _PATTERN_VERSION:
        _PATTERN_VERSION[weight] = 0


def _pattern_changed(weight: torch.Tensor) -> None:
    _watch_pattern(weight)
    _PATTERN_VERSION[weight] += 1


def _watched_state(optimizer):
    """(weight, its pattern version, its per-edge state tensors) for every watched weight ``optimizer`` holds."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            version = _PATTERN_VERSION.get(p)
            if version is not None:
                yield p, version, [v for v in optimizer.state.get(p, {}).values()
                                   if isinstance(v, torch.Tensor) and v.dim() > 0]


def _check_optimizer_state(optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():  # first: nothing else here is traced
        return
    seen = _SEEN_STATE.get(optimizer)
    if seen is None:
        return
    for p, version, state in _watched_state(optimizer):
        last = seen.get(p)
        if last is None or last[0] == version:
            continue
        before = {id(r()) for r in last[1] if r() is not None}
        if any(id(t) in before for t in state):
            raise RuntimeError(
                f"{type(optimizer).__name__}.step(): its state of an IOSparseNetwork weight belongs to the sparsity "
                "pattern before update_mask_ (or before a load_state_dict that changed the structure); pass the "
                "optimizer to update_mask_(..., optimizer=opt), or call torch_iosparse.nn.module."
                "remap_optimizer_state_(opt, net.weight, update), or clear its state of that weight")


def _record_optimizer_state(optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():  # first: nothing else here is traced
        return
    seen = _SEEN_STATE.get(optimizer)
    if seen is None:
        from torch.utils.weak import WeakIdKeyDictionary
        seen = _SEEN_STATE[optimizer] = WeakIdKeyDictionary()
    for p, version, state in _watched_state(optimizer):
        seen[p] = (version, [weakref.ref(t) for t in state])


def _all_linears_without_bias(module: nn.Module) -> bool:
    lins = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return bool(lins) and all(m.bias is None for m in lins)


def _describe_strategy(meta: Dict) -> str:
    """The kernel's strategy in words, e.g. ``auto(B<=32:level, else program)``."""
    names = {v: k for k, v in ops.STRATEGIES.items()}
    name = names.get(meta["strategy"], str(meta["strategy"]))
    if name != "auto":
        return name
    rules = []
    if int(meta.get("level_max_batch", 0)) > 0:
        rules.append(f"B<={int(meta['level_max_batch'])}:level")
    if int(meta.get("dense_min_batch", ops.NEVER)) < ops.NEVER:
        rules.append(f"B>={int(meta['dense_min_batch'])}:dense")
    for path, built in (("panel", "panels"), ("block", "block_chunks")):  # below the dense range; panels first
        if int(meta.get(built, 0)) > 0 and int(meta.get(f"{path}_min_batch", ops.NEVER)) < ops.NEVER:
            rules.append(f"B>={int(meta[path + '_min_batch'])}:{path}")
    return f"auto({', '.join(rules + ['else program'])})" if rules else "auto(program)"


def _planning_methods() -> List[str]:
    from .. import planning
    return planning.methods()
