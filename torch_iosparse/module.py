"""IOSparseNetwork: a pruned network as a drop-in ``nn.Module`` that runs an I/O-planned schedule.

Parameters are only the nonzero weights (one 1-D ``weight`` of length nnz, in the DAG's in-edge order)
and the biases of the computed neurons (``bias``); the structure and the plan live in buffers. Zeros
therefore stay zero under any optimizer: they are not parameters.

``forward`` dispatches to the native custom op ``torch.ops.iosparse`` (``ops.dag_forward``) on CPU, and
on any other device whose kernel is registered for it (the Triton/CUDA kernel); otherwise to
:func:`reference_forward`, a pure-PyTorch, differentiable, level-by-level evaluation.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import activations as acts
from .activations import Activation
from .dag import GraphError, SparseDAG
from .iomodel import IOCount, lower_bound, normalize_memory, upper_bound
from .planning import Plan

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

# Structure + plan: persistent buffers (what a state_dict must carry to rebuild the network).
# act_bounds holds each activation's (lo, hi) as float64 bit patterns in int64, so module.to(dtype) can
# never round them.
_STRUCTURE = ("in_ptr", "in_src", "outputs", "act_index", "act_code", "act_bounds", "layer_sizes",
              "plan_order", "plan_memory", "plan_method")
_METHOD_BYTES = 32  # fixed width, so states planned by different methods load into each other

DEFAULT_BATCH_TILE = 64


# ---------------------------------------------------------------------- native op discovery
def _ops_module():
    """``torch_iosparse.ops`` when it exists and its native op loads, else None (then the reference op
    below runs everywhere)."""
    try:
        from . import ops
        from . import _native
        _native.ops()
        if not hasattr(torch.ops.iosparse, "dag_forward"):
            return None
        return ops
    except (ImportError, AttributeError, RuntimeError):
        return None


_KERNEL_CACHE: Dict[str, bool] = {}
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)  # what kernels/cpu accepts
OP_NAME = "iosparse::dag_forward"


def _has_kernel(device_type: str) -> bool:
    """Whether the native op has a kernel for ``device_type`` (checked once per device type; the GPU
    backend registers its CUDA kernel for the same op from Python)."""
    if not _KERNEL_CACHE.get(device_type, False):  # only positive answers are final
        ok = False
        if device_type == "cuda":
            try:  # the GPU backend registers its kernel when imported
                from . import gpu  # noqa: F401
            except Exception:
                pass
        if _ops_module() is not None:
            key = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}.get(device_type, device_type.upper())
            try:
                ok = bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key))
            except Exception:
                ok = device_type == "cpu"
        _KERNEL_CACHE[device_type] = ok
    return _KERNEL_CACHE[device_type]


# ---------------------------------------------------------------------- memory
def _l2_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            s = f.read().strip().upper()
        mult = {"K": 1024, "M": 1024 ** 2}.get(s[-1], 1)
        return int(s.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 1024 ** 2


def resolve_batch_tile(batch_tile: Optional[int], dtype: torch.dtype = torch.float32) -> int:
    """BT: the given value, else the CPU backend's choice for this machine, else 64."""
    if batch_tile is not None:
        if int(batch_tile) < 1:
            raise ValueError(f"batch_tile must be >= 1, got {batch_tile}")
        return int(batch_tile)
    try:
        from . import hardware
        return int(hardware.batch_tile(dtype))
    except (ImportError, AttributeError):
        return DEFAULT_BATCH_TILE


def resolve_memory(memory, dtype: torch.dtype = torch.float32, batch_tile: Optional[int] = None) -> Optional[int]:
    """Turn ``memory`` into slots. ``"auto"``: the slots of ``batch_tile`` columns of ``dtype`` that fit in
    this core's cache share (cost-model.md, "Mapping to real hardware")."""
    if isinstance(memory, str) and memory.lower() == "auto":
        bt = resolve_batch_tile(batch_tile, dtype)
        try:
            from . import hardware
            return int(hardware.fast_memory_slots(bt, dtype))
        except (ImportError, AttributeError):
            itemsize = torch.empty(0, dtype=dtype).element_size()
            return max(2, (_l2_bytes() // 2) // (bt * itemsize))
    return normalize_memory(memory)


# ---------------------------------------------------------------------- pure-PyTorch reference
_REF_KEYS = ("ref_edge_perm", "ref_src_pos", "ref_dst_local", "ref_bias_index", "ref_out_pos", "ref_levels",
             "ref_segments", "ref_act", "ref_crow")


def reference_prepare(dag: SparseDAG) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Index tensors for :func:`reference_forward`: neurons relabelled level by level (and by activation
    inside a level) so that each level is a contiguous block and each activation a contiguous run.

    Everything, the level table included, is an int64 tensor (``ref_act`` holds the activation
    ``(code, lo, hi)`` rows with lo/hi bit-cast from float64), so ``module.to(dtype)`` leaves it intact and
    the custom op below can take it as arguments."""
    n, n_in = dag.n_neurons, dag.n_inputs
    lv = dag.levels().astype(np.int64)
    ai = dag.act_index.astype(np.int64)
    comp = np.arange(n_in, n, dtype=np.int64)
    neurons = comp[np.lexsort((comp, ai[comp], lv[comp]))]
    pos = np.empty(n, dtype=np.int64)
    pos[:n_in] = np.arange(n_in)
    pos[neurons] = n_in + np.arange(neurons.size)
    src, dst = dag.edges()
    eperm = np.lexsort((pos[src], pos[dst]))  # by destination, then source position: CSR rows, sorted columns
    dst_pos, src_pos = pos[dst[eperm]], pos[src[eperm]]
    lvs = lv[neurons]
    levels, segments = [], []
    for L in range(1, int(lvs.max()) + 1 if lvs.size else 1):
        v0 = n_in + int(np.searchsorted(lvs, L, "left"))
        v1 = n_in + int(np.searchsorted(lvs, L, "right"))
        if v1 == v0:
            continue
        e0 = int(np.searchsorted(dst_pos, v0, "left"))
        e1 = int(np.searchsorted(dst_pos, v1, "left"))
        seg_act = ai[neurons[v0 - n_in:v1 - n_in]]
        cuts = np.flatnonzero(np.diff(seg_act)) + 1
        bounds = [0, *cuts.tolist(), v1 - v0]
        g0 = len(segments)
        segments += [(v0 + bounds[i], v0 + bounds[i + 1], int(seg_act[bounds[i]])) for i in range(len(bounds) - 1)]
        levels.append((v0, v1, e0, e1, g0, len(segments)))
    dst_local = dst_pos.copy()
    crows = []  # per level, the CSR row pointer of its [v1-v0, v0] weight matrix (relative to e0)
    for v0, v1, e0, e1, _, _ in levels:
        dst_local[e0:e1] -= v0
        crow = np.zeros(v1 - v0 + 1, dtype=np.int64)
        np.cumsum(np.bincount(dst_local[e0:e1], minlength=v1 - v0), out=crow[1:])
        crows.append(crow)
    lohi = np.array([[a.lo, a.hi] for a in dag.activations], dtype=np.float64).view(np.int64)
    act = np.concatenate([np.array([[a.code] for a in dag.activations], dtype=np.int64), lohi], axis=1)
    buffers = {
        "ref_edge_perm": torch.from_numpy(eperm.astype(np.int64)),
        "ref_src_pos": torch.from_numpy(src_pos),
        "ref_dst_local": torch.from_numpy(dst_local),
        "ref_bias_index": torch.from_numpy(neurons - n_in),
        "ref_out_pos": torch.from_numpy(pos[dag.outputs.astype(np.int64)]),
        "ref_levels": torch.tensor(levels, dtype=torch.int64).reshape(-1, 6),
        "ref_segments": torch.tensor(segments, dtype=torch.int64).reshape(-1, 3),
        "ref_act": torch.from_numpy(np.ascontiguousarray(act)),
        "ref_crow": torch.from_numpy(np.concatenate(crows) if crows else np.zeros(0, dtype=np.int64)),
    }
    return buffers, _ref_meta(buffers, n_in, n)


def _ref_meta(buffers: Dict[str, torch.Tensor], n_in: int, n: int) -> Dict:
    segs = [tuple(r) for r in buffers["ref_segments"].tolist()]
    levels = tuple((v0, v1, e0, e1, tuple(segs[g0:g1])) for v0, v1, e0, e1, g0, g1 in buffers["ref_levels"].tolist())
    act = buffers["ref_act"].cpu()
    lohi = act[:, 1:].contiguous().view(torch.float64).tolist()
    table = tuple(Activation(acts.KINDS[int(c)], lo, hi) for c, (lo, hi) in zip(act[:, 0].tolist(), lohi))
    crow_offsets, c = [], 0
    for v0, v1, *_ in levels:
        crow_offsets.append(c)
        c += v1 - v0 + 1
    return {"n_inputs": n_in, "n_neurons": n, "levels": levels, "activations": table,
            "crow_offsets": tuple(crow_offsets)}


def reference_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, buffers: Dict[str, torch.Tensor],
                      meta: Dict) -> torch.Tensor:
    """Differentiable pure-PyTorch evaluation: ``x [B, n_inputs] -> [B, n_outputs]``.

    ``weight``: the edge weights in in-edge order; ``bias``: one per *computed* neuron. Gathers and
    out-of-place ``index_add`` only, so autograd gives gradients for x, weight and bias.
    """
    n_in, n = meta["n_inputs"], meta["n_neurons"]
    B = x.shape[0]
    w = weight.to(x.dtype)[buffers["ref_edge_perm"]].unsqueeze(1)
    b = bias.to(x.dtype)[buffers["ref_bias_index"]]
    src_pos, dst_local = buffers["ref_src_pos"], buffers["ref_dst_local"]
    vals = x.new_zeros(n, B)  # feature-major, neurons in level order
    vals[:n_in] = x.t()
    table: Tuple[Activation, ...] = meta["activations"]
    for v0, v1, e0, e1, segs in meta["levels"]:
        acc = b[v0 - n_in:v1 - n_in].unsqueeze(1).expand(v1 - v0, B)
        if e1 > e0:
            contrib = vals[src_pos[e0:e1]] * w[e0:e1]
            acc = acc.index_add(0, dst_local[e0:e1], contrib)
        for s0, s1, k in segs:
            vals[s0:s1] = table[k].apply(acc[s0 - v0:s1 - v0])
    return vals[buffers["ref_out_pos"]].t()


# The reference as an opaque custom op: torch.compile / torch.export see one node with a fake kernel (no
# graph breaks, no Inductor codegen of the scatter loop) on devices that have no native kernel.
def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    # torch's sparse CSR kernels lack float16/bfloat16 on CPU; accumulate those in float32 (more exact too)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def _level_matrix(bufs, meta, i: int, values: torch.Tensor) -> torch.Tensor:
    """Level i's weights as a CSR matrix [its neurons, all earlier positions]."""
    v0, v1, e0, e1, _ = meta["levels"][i]
    c0 = meta["crow_offsets"][i]
    return torch.sparse_csr_tensor(bufs["ref_crow"][c0:c0 + v1 - v0 + 1], bufs["ref_src_pos"][e0:e1], values,
                                   size=(v1 - v0, v0), check_invariants=False)  # built valid by reference_prepare


# Below this many multiply-adds per level (edges x batch) a gather + index_add beats building a CSR matrix
# (tensor construction and library-call overhead dominate small levels).
SPARSE_MM_MIN_WORK = 1 << 18


def _use_sparse_mm(edges: int, batch: int) -> bool:
    return edges * batch >= SPARSE_MM_MIN_WORK


def _sparse_eval(x, weight, bias, bufs, meta, keep_pre: bool):
    """The reference as one sparse-dense matmul per level (same values as :func:`reference_forward`,
    without its [edges, batch] intermediate). Returns (y, vals, pre) in the compute dtype."""
    n_in, n = meta["n_inputs"], meta["n_neurons"]
    B = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    w = weight.to(cdt)[bufs["ref_edge_perm"]]
    b = bias.to(cdt)[bufs["ref_bias_index"]]
    vals = x.new_zeros(n, B, dtype=cdt)
    pre = x.new_zeros(n, B, dtype=cdt) if keep_pre else None
    vals[:n_in] = x.t().to(cdt)
    table = meta["activations"]
    for i, (v0, v1, e0, e1, segs) in enumerate(meta["levels"]):
        acc = b[v0 - n_in:v1 - n_in].unsqueeze(1).expand(v1 - v0, B)
        if e1 > e0 and _use_sparse_mm(e1 - e0, B):
            acc = acc + torch.sparse.mm(_level_matrix(bufs, meta, i, w[e0:e1]), vals[:v0])
        elif e1 > e0:
            contrib = vals[bufs["ref_src_pos"][e0:e1]] * w[e0:e1].unsqueeze(1)
            acc = acc.index_add(0, bufs["ref_dst_local"][e0:e1], contrib)
        if keep_pre:
            pre[v0:v1] = acc
        for s0, s1, k in segs:
            vals[s0:s1] = table[k].apply(acc[s0 - v0:s1 - v0])
    return vals[bufs["ref_out_pos"]].t(), vals, pre


def _sparse_grad(grad, x, weight, bias, bufs, meta):
    """Gradients w.r.t. (x, weight, bias): recompute the forward keeping pre-activations, then walk the
    transposed DAG level by level (W^T·g for the inputs, a sampled product g·x^T for the weights)."""
    n_in, n = meta["n_inputs"], meta["n_neurons"]
    cdt = _compute_dtype(x.dtype)
    _, vals, pre = _sparse_eval(x, weight, bias, bufs, meta, keep_pre=True)
    w = weight.to(cdt)[bufs["ref_edge_perm"]]
    B = x.shape[0]
    gvals = x.new_zeros(n, B, dtype=cdt)
    gvals.index_add_(0, bufs["ref_out_pos"], grad.to(cdt).t())
    gw_sorted = x.new_zeros(w.shape[0], dtype=cdt)
    gb_sorted = x.new_zeros(n - n_in, dtype=cdt)
    table = meta["activations"]
    for i in reversed(range(len(meta["levels"]))):
        v0, v1, e0, e1, segs = meta["levels"][i]
        gacc = torch.empty_like(gvals[v0:v1])
        for s0, s1, k in segs:
            gacc[s0 - v0:s1 - v0] = _activation_backward(table[k], gvals[s0:s1], pre[s0:s1], vals[s0:s1])
        gb_sorted[v0 - n_in:v1 - n_in] = gacc.sum(1)
        if e1 > e0 and _use_sparse_mm(e1 - e0, B):
            A = _level_matrix(bufs, meta, i, w[e0:e1])
            gvals[:v0] += torch.sparse.mm(A.t(), gacc)
            pattern = _level_matrix(bufs, meta, i, torch.ones_like(w[e0:e1]))
            gw_sorted[e0:e1] = torch.sparse.sampled_addmm(pattern, gacc, vals[:v0].t(), beta=0.0).values()
        elif e1 > e0:
            src = bufs["ref_src_pos"][e0:e1]
            g_e = gacc[bufs["ref_dst_local"][e0:e1]]  # [edges, B]
            gw_sorted[e0:e1] = (g_e * vals[src]).sum(1)
            gvals.index_add_(0, src, g_e * w[e0:e1].unsqueeze(1))
    gx = gvals[:n_in].t().to(x.dtype).contiguous()
    gw = torch.zeros_like(weight).index_put_((bufs["ref_edge_perm"],), gw_sorted.to(weight.dtype))
    gb = torch.zeros_like(bias).index_put_((bufs["ref_bias_index"],), gb_sorted.to(bias.dtype))
    return gx, gw, gb


@torch.library.custom_op("iosparse_module::reference_forward", mutates_args=())
def reference_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ref: List[torch.Tensor],
                 n_neurons: int) -> torch.Tensor:
    bufs = dict(zip(_REF_KEYS, ref))
    y, _, _ = _sparse_eval(x, weight, bias, bufs, _ref_meta(bufs, x.shape[1], n_neurons), keep_pre=False)
    return y.to(x.dtype).contiguous()


@reference_op.register_fake
def _(x, weight, bias, ref, n_neurons):
    return x.new_empty(x.shape[0], ref[_REF_KEYS.index("ref_out_pos")].shape[0])


def _activation_backward(a: Activation, grad: torch.Tensor, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """d act(pre) / d pre · grad, with the same conventions as autograd for :meth:`Activation.apply`."""
    k = a.kind
    if k == "identity":
        return grad
    if k == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if k == "hardtanh":  # torch.clamp passes the gradient on the closed interval [lo, hi]
        return grad * ((pre >= a.lo) & (pre <= a.hi)).to(grad.dtype)
    if k in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if k == "gelu_tanh" else "none")
    if k == "tanh":
        return torch.ops.aten.tanh_backward(grad, out)
    if k == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, out)
    raise AssertionError(k)


@torch.library.custom_op("iosparse_module::reference_backward", mutates_args=())
def reference_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          ref: List[torch.Tensor], n_neurons: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bufs = dict(zip(_REF_KEYS, ref))
    return _sparse_grad(grad, x, weight, bias, bufs, _ref_meta(bufs, x.shape[1], n_neurons))


@reference_backward_op.register_fake
def _(grad, x, weight, bias, ref, n_neurons):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _ref_setup_context(ctx, inputs, output):
    x, weight, bias, ref, n_neurons = inputs
    ctx.save_for_backward(x, weight, bias, *ref)
    ctx.n_neurons = n_neurons


def _ref_backward(ctx, grad):
    x, weight, bias, *ref = ctx.saved_tensors
    gx, gw, gb = reference_backward_op(grad.contiguous(), x, weight, bias, ref, ctx.n_neurons)
    return gx, gw, gb, [None] * len(ref), None


reference_op.register_autograd(_ref_backward, setup_context=_ref_setup_context)


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
            _refresh_pruned_weights(dag_or_module)
            dag = SparseDAG.from_module(dag_or_module, dtype=dtype)
        else:
            raise TypeError(f"IOSparseNetwork takes a SparseDAG or an nn.Module, got {type(dag_or_module).__name__}")
        self.batch_tile = batch_tile
        self.strategy = strategy
        self.cache_hit = False
        if plan is None:
            if method not in _planning_methods():
                raise ValueError(f"unknown planning method {method!r}; available: {', '.join(_planning_methods())}")
            M = resolve_memory(memory, dtype or dag.weight.dtype, batch_tile)
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
        """(Re)compute everything that follows from structure + plan: reference indices, the native
        program, the summary numbers. Non-persistent buffers, so state_dicts carry only the structure."""
        for k in [k for k in self._buffers if k.startswith(("ref_", "op_"))]:
            del self._buffers[k]
            self._non_persistent_buffers_set.discard(k)
        dev = self.weight.device
        rb, self._ref_meta = reference_prepare(dag)
        for k, v in rb.items():
            self.register_buffer(k, v.to(dev), persistent=False)
        self._op_keys: Tuple[str, ...] = ()
        self._op_meta: Optional[Dict] = None
        self._op_fixed: Dict[str, torch.Tensor] = {}
        ops = _ops_module()
        strategy = "reference"
        if ops is not None:
            net = ops.prepare(dag, plan, batch_tile=resolve_batch_tile(self.batch_tile, self.weight.dtype),
                              strategy=self.strategy, dtype=self.weight.dtype)
            self._op_keys = tuple(net.buffers)
            for k, v in net.buffers.items():
                self.register_buffer("op_" + k, v.to(dev), persistent=False)
            # The kernel fixes the dtype of its float buffers (e.g. float64 activation bounds); keep the
            # originals so module.to(dtype) / .half() cannot change (or round) them, see _apply.
            self._op_fixed = {"op_" + k: v.clone() for k, v in net.buffers.items() if v.is_floating_point()}
            self._op_meta = dict(net.meta)
            for d in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                _has_kernel(d)
            strategy = _describe_strategy(ops, self._op_meta)
        M = plan.memory
        io = plan.io
        sizes = dag.layer_sizes
        dense = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) if sizes else None
        self._summary = {
            "n_inputs": dag.n_inputs, "n_outputs": dag.n_outputs, "n_neurons": dag.n_neurons,
            "n_edges": dag.n_edges, "layer_sizes": list(sizes) if sizes else None, "dense_weights": dense,
            "memory": M, "method": plan.method, "io": io, "lb": lower_bound(dag, M), "ub": upper_bound(dag, M),
            "batch_tile": int((self._op_meta or {}).get("batch_tile", resolve_batch_tile(self.batch_tile,
                                                                                          self.weight.dtype))),
            "strategy": strategy,
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
    def _use_op(self, x: torch.Tensor) -> bool:
        if self._op_meta is None:
            return False
        if x.device.type == "cpu" and x.dtype not in _CPU_KERNEL_DTYPES:
            return False  # e.g. bfloat16 / float16 on CPU: the reference op computes them
        if torch.compiler.is_compiling():
            return _KERNEL_CACHE.get(x.device.type, False)  # filled eagerly (dynamo guards on the dict)
        return _has_kernel(x.device.type)

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
        if self._use_op(x2):
            bias_full = nn.functional.pad(self.bias, (n_in, 0))
            bufs = {k: getattr(self, "op_" + k) for k in self._op_keys}
            from . import ops
            y = ops.dag_forward(x2.contiguous(), self.weight, bias_full, bufs, self._op_meta)
        else:
            ref = [getattr(self, k) for k in _REF_KEYS]
            y = reference_op(x2.contiguous(), self.weight, self.bias, ref, self._summary["n_neurons"])
        return y.reshape(*lead, self._summary["n_outputs"])


def _refresh_pruned_weights(module: nn.Module) -> None:
    """torch.nn.utils.prune recomputes ``weight = weight_orig * weight_mask`` only in the next forward, so
    after ``.double()``, ``.to()`` or an optimizer step the attribute is stale; recompute it now."""
    from torch.nn.utils import prune
    for m in module.modules():  # exactly what the prune hook does at the start of a forward
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(m, hook._tensor_name, hook.apply_mask(m))


def _all_linears_without_bias(module: nn.Module) -> bool:
    lins = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return bool(lins) and all(m.bias is None for m in lins)


def _describe_strategy(ops, meta: Dict) -> str:
    """The native kernel's strategy in words, e.g. ``auto(B<=32:level, else program)``."""
    names = {v: k for k, v in getattr(ops, "STRATEGIES", {}).items()}
    name = names.get(meta.get("strategy"), str(meta.get("strategy", "native")))
    if name != "auto":
        return name
    rules = []
    if int(meta.get("level_max_batch", 0)) > 0:
        rules.append(f"B<={int(meta['level_max_batch'])}:level")
    never = getattr(ops, "NEVER", 2**62)
    if int(meta.get("dense_min_batch", never)) < never:
        rules.append(f"B>={int(meta['dense_min_batch'])}:dense")
    return f"auto({', '.join(rules + ['else program'])})" if rules else "auto(program)"


def _planning_methods() -> List[str]:
    from . import planning
    try:  # the planner module registers "greedy" / "anneal" on import, when it exists
        from . import planner  # noqa: F401
    except ImportError:
        pass
    return planning.methods()
