"""IOSparseNetwork: a pruned network as a drop-in ``nn.Module`` that runs an I/O-planned schedule.

Parameters are only the nonzero weights (one 1-D ``weight`` of length nnz, in the DAG's in-edge order)
and the biases of the computed neurons (``bias``); the structure and the plan live in buffers. Zeros
therefore stay zero under any optimizer: they are not parameters.

``forward`` calls the custom op ``torch.ops.iosparse.dag_forward`` (:func:`torch_iosparse.ops.dag_forward`)
on every device and dtype: the C++ kernel on CPU, the Triton kernel on CUDA (torch_iosparse.gpu), the
op's pure-PyTorch reference kernel elsewhere.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import activations as acts
from . import hardware, ops
from .activations import Activation
from .dag import GraphError, SparseDAG
from .iomodel import IOCount, lower_bound, normalize_memory, upper_bound
from .planning import Plan

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
def _structure_tensors(dag: SparseDAG, plan: Plan) -> Dict[str, torch.Tensor]:
    i64 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
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


def _dag_from_tensors(t: Dict[str, torch.Tensor], weight: torch.Tensor, bias_computed: torch.Tensor) -> SparseDAG:
    """Rebuild a SparseDAG from structure tensors (a state_dict or the module's buffers), validating it."""
    try:
        in_ptr = t["in_ptr"].cpu().numpy().astype(np.int64)
        in_src = t["in_src"].cpu().numpy().astype(np.int64)
        outputs = t["outputs"].cpu().numpy().astype(np.int64)
        act_index = t["act_index"].cpu().numpy().astype(np.int16)
        codes = t["act_code"].cpu().tolist()
        bounds = t["act_bounds"].cpu().contiguous().view(torch.float64).reshape(-1, 2)
        lo, hi = bounds[:, 0].tolist(), bounds[:, 1].tolist()
        sizes = t["layer_sizes"].cpu().tolist()
    except KeyError as e:
        raise KeyError(f"state_dict lacks the IOSparseNetwork structure entry {e}") from None
    table = [Activation(acts.KINDS[c], lo[i], hi[i]) for i, c in enumerate(codes)]
    n = in_ptr.size - 1
    n_in = n - bias_computed.numel()
    src = in_src
    dst = np.repeat(np.arange(n, dtype=np.int64), np.diff(in_ptr))
    w = weight.detach().cpu()
    b = torch.cat([torch.zeros(n_in, dtype=bias_computed.dtype), bias_computed.detach().cpu()])
    per_neuron = table[0] if len(table) == 1 else [table[int(k)] for k in act_index]
    dag = SparseDAG.from_edges(n_in, src, dst, w, b, n_neurons=n, outputs=outputs, activation=per_neuron)
    if sizes:
        if sum(sizes) != n or sizes[0] != n_in:
            raise GraphError(f"layer_sizes {sizes} do not match {n} neurons with {n_in} inputs")
        dag.layer_sizes = [int(s) for s in sizes]
        dag._levels = None
    return dag


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
            the planned schedule; ``"level"``/``"dense"``), see torch_iosparse/strategy.py.
        cache: look up / store the plan in the on-disk plan cache (:mod:`torch_iosparse.cache`).
        cache_dir: cache directory (default ``$TORCH_IOSPARSE_CACHE`` or ``~/.cache/torch_iosparse``).
        train_bias: make the biases a Parameter (default: yes, unless built from Linear layers that all
            have ``bias=False``; then they stay a zero buffer, as in the source model).

    Input: ``[..., n_inputs]`` (any leading dims); output ``[..., n_outputs]``.
    """

    def __init__(self, dag_or_module: Union[SparseDAG, nn.Module], memory="auto", method: str = "two_optimal", *,
                 plan: Optional[Plan] = None, seed: int = 0, time_budget: Optional[float] = None,
                 batch_tile: Optional[int] = None, strategy: str = "auto", cache: bool = True,
                 cache_dir: Optional[str] = None, train_bias: Optional[bool] = None,
                 dtype: Optional[torch.dtype] = None, **plan_kwargs):
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
        if plan is None:
            if method not in _planning_methods():
                raise ValueError(f"unknown planning method {method!r}; available: {', '.join(_planning_methods())}")
            M = _auto_memory(memory, dtype or dag.weight.dtype, batch_tile)
            from .cache import cached_plan
            plan, self.cache_hit = cached_plan(dag, M, method, seed, time_budget, directory=cache_dir,
                                               use_cache=cache, **plan_kwargs)
        else:
            plan.check_dag(dag)
        self.method = plan.method
        wdt = dtype or dag.weight.dtype
        self.weight = nn.Parameter(dag.weight.detach().to(wdt).clone())
        b = dag.bias[dag.n_inputs:].detach().to(wdt).clone()
        if train_bias is None:  # like the source: layers built with bias=False keep no trainable bias
            train_bias = not (isinstance(dag_or_module, nn.Module) and _all_linears_without_bias(dag_or_module))
        if train_bias:
            self.bias = nn.Parameter(b)
        else:
            self.register_buffer("bias", b)  # zeros, same state_dict key, not trained
        for k, v in _structure_tensors(dag, plan).items():
            self.register_buffer(k, v)
        self._build_derived(dag, plan)

    # -------------------------------------------------------------- construction helpers
    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor], prefix: str = "", **kwargs) -> "IOSparseNetwork":
        """Build a module from a state_dict alone (structure, plan, weights): the inverse of
        ``state_dict()``, e.g. after ``torch.load(path, weights_only=True)``."""
        t = {k: state_dict[prefix + k] for k in _STRUCTURE if prefix + k in state_dict}
        for k in ("weight", "bias"):
            if prefix + k not in state_dict:
                raise KeyError(f"state_dict lacks {prefix + k!r}: not an IOSparseNetwork state")
        dag = _dag_from_tensors(t, state_dict[prefix + "weight"], state_dict[prefix + "bias"])
        mem = int(t["plan_memory"])
        from .iomodel import count_io
        order = t["plan_order"].cpu().numpy()
        M = None if mem < 0 else mem
        method = _decode_method(t["plan_method"]) if "plan_method" in t else "loaded"
        p = Plan(order, M, count_io(dag, order, M), method, dag.structure_hash())
        return cls(dag, plan=p, **kwargs)

    def _build_derived(self, dag: SparseDAG, plan: Plan) -> None:
        """(Re)compute everything that follows from structure + plan: the op's compiled network and the
        summary numbers. Non-persistent buffers, so state_dicts carry only the structure."""
        for k in [k for k in self._buffers if k.startswith("op_")]:
            del self._buffers[k]
            self._non_persistent_buffers_set.discard(k)
        dev = self.weight.device
        net = ops.prepare(dag, plan, batch_tile=_batch_tile(self.batch_tile, self.weight.dtype),
                          strategy=self.strategy, dtype=self.weight.dtype)
        self._op_keys: Tuple[str, ...] = tuple(net.buffers)
        for k, v in net.buffers.items():
            self.register_buffer("op_" + k, v.to(dev), persistent=False)
        # The kernel fixes the dtype of its float buffers (e.g. float64 activation bounds); keep the
        # originals so module.to(dtype) / .half() cannot change (or round) them, see _apply.
        self._op_fixed = {"op_" + k: v.clone() for k, v in net.buffers.items() if v.is_floating_point()}
        self._op_meta: Dict = dict(net.meta)
        M = plan.memory
        io = plan.io
        sizes = dag.layer_sizes
        dense = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) if sizes else None
        self._summary = {
            "n_inputs": dag.n_inputs, "n_outputs": dag.n_outputs, "n_neurons": dag.n_neurons,
            "n_edges": dag.n_edges, "layer_sizes": list(sizes) if sizes else None, "dense_weights": dense,
            "memory": M, "method": plan.method, "io": io, "lb": lower_bound(dag, M), "ub": upper_bound(dag, M),
            "batch_tile": int(self._op_meta["batch_tile"]), "strategy": _describe_strategy(self._op_meta),
        }
        self._fingerprint = self._structure_fingerprint()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for k, orig in getattr(self, "_op_fixed", {}).items():
            cur = self._buffers.get(k)
            if cur is not None and cur.dtype != orig.dtype:
                self._buffers[k] = orig.to(cur.device)
        return self

    def _structure_fingerprint(self) -> str:
        h = hashlib.sha256()
        for k in _STRUCTURE:
            t = getattr(self, k).detach().cpu().contiguous()
            h.update(k.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
        return h.hexdigest()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # A state of the same shapes may carry another structure or plan: rebuild what derives from it.
        if not any(k.startswith(prefix) for k in missing_keys) and self._structure_fingerprint() != self._fingerprint:
            try:
                dag = self.to_dag()
                from .iomodel import count_io
                order = self.plan_order.cpu().numpy()
                mem = int(self.plan_memory)
                M = None if mem < 0 else mem
                p = Plan(order, M, count_io(dag, order, M), _decode_method(self.plan_method), dag.structure_hash())
                self.method = p.method
                self._build_derived(dag, p)
            except Exception as e:
                error_msgs.append(f"loaded IOSparseNetwork structure is invalid: {e}")

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
        """Sizes, plan and bounds as a dict (what :func:`torch_iosparse.explain` prints)."""
        return dict(self._summary)

    def to_dag(self) -> SparseDAG:
        """The network (with the current, possibly trained, weights) as a :class:`SparseDAG`."""
        t = {k: getattr(self, k) for k in _STRUCTURE}
        return _dag_from_tensors(t, self.weight, self.bias)

    def plan(self) -> Plan:
        """The plan this module runs."""
        from .iomodel import count_io
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
        if x.dtype != self.weight.dtype:  # like nn.Linear: no silent casts
            raise TypeError(f"IOSparseNetwork has {self.weight.dtype} weights but the input is {x.dtype}; convert "
                            f"one of them (e.g. net.to({x.dtype}) or x.to({self.weight.dtype}))")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n_in)
        bias_full = nn.functional.pad(self.bias, (n_in, 0))
        # self._buffers directly: nn.Module.__getattr__ costs ~0.75 us per name (21 us for the 28 buffers,
        # a fifth of a small net's call)
        buffers = self._buffers
        bufs = {k: buffers["op_" + k] for k in self._op_keys}
        y = ops.dag_forward(x2.contiguous(), self.weight, bias_full, bufs, self._op_meta)
        return y.reshape(*lead, self._summary["n_outputs"])


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
    from . import planning
    try:  # the planner module registers "greedy" / "anneal" on import, when it exists
        from . import planner  # noqa: F401
    except ImportError:
        pass
    return planning.methods()
