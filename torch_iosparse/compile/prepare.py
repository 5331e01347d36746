"""The differentiable op: ``ops.prepare(dag, plan)`` compiles a network once; ``ops.dag_forward(x, weight,
bias, net.buffers, net.meta)`` evaluates it. See docs/program-format.md ("The op") and docs/cpu-kernel.md.

The op is ``torch.ops.iosparse.dag_forward(x, weight, bias, net: Tensor[], config: int[])`` with a C++
CPU kernel (kernels/cpu/), a fake kernel (torch.compile / export), autograd through
``torch.ops.iosparse.dag_backward`` and pure-PyTorch reference kernels for every other device
(``CompositeExplicitAutograd``): a GPU backend overrides them with
``torch.library.register_kernel("iosparse::dag_forward", "cuda", fn)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import _native, activations, hardware
from . import program as program_mod
from .abi import BLOCK_KEYS, CONFIG_KEYS, NET_DTYPES, NET_KEYS, NEVER, PANEL_KEYS, ActCode, NetIndex
from .abi import STRATEGY_CODES as STRATEGIES
from .dag import SparseDAG
from .planning import Plan, plan as make_plan

# The orders of the op's Tensor[] and int[] arguments (NET_KEYS, CONFIG_KEYS; the panel and block buffers
# PANEL_KEYS, BLOCK_KEYS may be absent and then run as empty tensors) and the strategy codes (STRATEGIES,
# {name: code}) come from torch_iosparse.abi, the one Python definition of the op's ABI.
# Panel construction (build_panels): rows per panel, least useful fraction of a panel's multiply-adds,
# sources / out-edges scanned per neighbour search.
PANEL_MAX_ROWS = 8
PANEL_MIN_EFFICIENCY = 0.75
PANEL_SCAN_LIMIT = 64
# Block construction (build_blocks): edges per chunk of a level's rows (the unit of parallel work); the
# sources per block come from the detected L2 (hardware.block_sources).
BLOCK_CHUNK_EDGES = 1 << 16


@dataclass
class CompiledNetwork:
    """What :func:`prepare` returns. ``buffers`` (tensors) and ``meta`` (plain ints/floats) are all
    :func:`dag_forward` needs; ``plan`` and ``program`` are kept for inspection."""

    buffers: Dict[str, torch.Tensor]
    meta: Dict[str, Union[int, float]]
    plan: Optional[Plan] = None
    program: Optional[program_mod.Program] = None
    info: Dict = field(default_factory=dict)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``dag_forward`` with this network's buffers; measures the strategies of x's batch-size bucket
        first when tuning is on and the bucket is new (torch_iosparse.tuning)."""
        tuner = self.info.get("tuner")
        if tuner is not None and tuner.enabled and not torch.compiler.is_compiling():
            tuner.maybe_tune(x, weight, bias, self.buffers)
        return dag_forward(x, weight, bias, self.buffers, self.meta)


def _t64(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def _layer_structure(dag: SparseDAG, levels: np.ndarray, level_neuron: np.ndarray, level_ptr: np.ndarray):
    """Dense-path tensors when every edge joins consecutive levels and all outputs sit on the last
    level; else None."""
    src, dst = dag.edges()
    src = src.astype(np.int64)
    dst = dst.astype(np.int64)
    L = int(levels.max())
    if src.size and not np.all(levels[src] + 1 == levels[dst]):
        return None
    if not np.all(levels[dag.outputs] == L):
        return None
    pos = np.zeros(dag.n_neurons, dtype=np.int64)  # position of a neuron inside its level
    pos[: dag.n_inputs] = np.arange(dag.n_inputs)
    pos[level_neuron] = np.arange(level_neuron.size) - np.repeat(level_ptr[:-1], np.diff(level_ptr))
    width = np.concatenate([[dag.n_inputs], np.diff(level_ptr)])  # width of level 0..L
    dense_edge = np.argsort(levels[dst], kind="stable")  # edges grouped by layer
    # flat index in the layer's dense [rows, cols] matrix, listed in dense_edge order
    dense_index = (pos[dst] * width[levels[dst] - 1] + pos[src])[dense_edge]
    dense_edge_ptr = np.zeros(L + 1, dtype=np.int64)
    dense_edge_ptr[1:] = np.cumsum(np.bincount(levels[dst] - 1, minlength=L))
    return {"dense_index": _t64(dense_index), "dense_edge": _t64(dense_edge),
            "dense_edge_ptr": _t64(dense_edge_ptr), "dense_out_pos": _t64(pos[np.asarray(dag.outputs, np.int64)])}


def structure_buffers(dag: SparseDAG) -> Dict[str, torch.Tensor]:
    """The network-structure tensors of the op (everything but the compiled program)."""
    n_in = dag.n_inputs
    levels = dag.levels().astype(np.int64)
    comp_levels = levels[n_in:]
    level_neuron = np.argsort(comp_levels, kind="stable") + n_in
    L = int(levels.max())
    level_ptr = np.zeros(L + 1, dtype=np.int64)
    level_ptr[1:] = np.cumsum(np.bincount(comp_levels - 1, minlength=L))
    act_code = np.array([a.code for a in dag.activations], dtype=np.int8)[dag.act_index.astype(np.int64)]
    act_param = np.array([[a.lo, a.hi] for a in dag.activations], dtype=np.float64)[dag.act_index.astype(np.int64)]
    act_code[:n_in] = 0
    buffers = {
        "in_ptr": _t64(dag.in_ptr),
        "in_src": torch.from_numpy(np.ascontiguousarray(dag.in_src, dtype=np.int32)),
        "act_code": torch.from_numpy(act_code),
        "act_param": torch.from_numpy(np.ascontiguousarray(act_param)),
        "outputs": _t64(dag.outputs),
        "level_ptr": _t64(level_ptr),
        "level_neuron": _t64(level_neuron),
    }
    dense = _layer_structure(dag, levels, level_neuron, level_ptr)
    if dense is None:
        empty = torch.zeros(0, dtype=torch.int64)
        dense = {"dense_index": empty, "dense_edge": empty.clone(), "dense_edge_ptr": torch.zeros(L + 1, dtype=torch.int64),
                 "dense_out_pos": empty.clone()}
    buffers.update(dense)
    return buffers


def prepare(dag: SparseDAG, plan: Optional[Plan] = None, *, memory: Union[int, str, None] = "auto",
            batch_tile: Optional[int] = None, strategy: str = "auto", dtype: torch.dtype = torch.float32,
            calibrate: bool = False, group_size: int = 4, tune: Optional[bool] = None,
            tune_cache: Union[str, bool, None] = None) -> CompiledNetwork:
    """Compile ``dag`` for :func:`dag_forward`.

    Args:
        plan: a Plan of ``dag`` (checked: a plan of another network raises PlanError). Default: the
            2-optimal (numbering / layer) order planned for ``memory`` slots.
        memory: fast-memory slots M when ``plan`` is None: ``"auto"`` sizes M to the per-core cache
            (hardware.fast_memory_slots), an int >= 2, or None (unbounded).
        batch_tile: BT columns per kernel pass. Default: with ``plan=None, memory="auto"``, BT and M are
            chosen together (strategy.choose_tile: the register tile or its halves, whichever predicts
            the fastest run given the exact I/O at its M); otherwise hardware.batch_tile.
        strategy: ``"auto"`` (pick per batch size, see strategy.py), ``"program"``, ``"level"``,
            ``"dense"`` (layered networks only), ``"panel"`` (level by level over panels of neurons
            that share sources) or ``"block"`` (level by level, each neuron's edges one block of source
            neurons at a time; built unless panels are useful or with this strategy), docs/cpu-kernel.md.
        dtype: the dtype the network will mostly run in (sizes BT and M; any float dtype still works).
        group_size: up to this many consecutive neurons with identical inputs are computed together
            (1..4; 1 disables grouping).
        calibrate: with ``strategy="auto"``, time every strategy once on this machine at the model's batch
            sizes instead of using the cost model (strategy.calibrate_thresholds; cached in memory).
        tune: with ``strategy="auto"`` (and no ``calibrate``), refine the model's choice by measurement per
            batch-size bucket (torch_iosparse.tuning): entries measured earlier on this machine are applied
            now, new buckets are measured by :meth:`CompiledNetwork.forward` on first use. False: the cost
            model alone. Default: on unless ``IOSPARSE_TUNE=0``.
        tune_cache: where measured entries live: None (the cache folder, ``$IOSPARSE_CACHE_DIR``), a
            folder, or False (this process only).
    """
    from . import strategy as strategy_mod  # (the argument `strategy` shadows the module name)

    if not isinstance(dag, SparseDAG):
        raise TypeError(f"prepare() takes a SparseDAG, got {type(dag).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    tile_info = None
    if batch_tile is None and plan is None and memory == "auto":
        # BT and M together: the tile whose M (per-core cache share) gives the cheapest predicted run.
        bt, _, tile_info = strategy_mod.choose_tile(dag, dtype)
    else:
        bt = int(batch_tile) if batch_tile is not None else hardware.batch_tile(dtype)
    if bt < 1:
        raise ValueError(f"batch_tile must be >= 1, got {bt}")
    if plan is None:
        M = hardware.fast_memory_slots(bt, dtype) if memory == "auto" else memory
        plan = make_plan(dag, M)
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be a torch_iosparse Plan or None, got {type(plan).__name__}")
    if not 1 <= int(group_size) <= 4:
        raise ValueError(f"group_size must be in 1..4, got {group_size}")
    prog = program_mod.compile_plan(dag, plan)  # raises PlanError for a plan of another network
    buffers = structure_buffers(dag)
    buffers.update(program_mod.program_tensors(prog))
    buffers["prog_group_ptr"] = _t64(program_mod.group_positions(prog, dag, max_group=group_size))
    buffers.update(panel_buffers(buffers))
    # Blocks only where the strategy can use them: panels win wherever rows share sources (strategy.py), and
    # on a RadiX-Net N=65536 the block layout would hold 73 MB for nothing.
    n_panels = int(buffers["panel_ptr"].numel() - 1)
    if strategy == "block" or not strategy_mod.panels_useful(
            {"panels": n_panels, "n_neurons": dag.n_neurons, "n_inputs": dag.n_inputs}):
        buffers.update(block_buffers(buffers))
    else:
        buffers.update(_empty_buffers(BLOCK_KEYS, None))
    layered = int(buffers["dense_index"].numel() == dag.n_edges and dag.n_edges > 0)
    max_width = max([dag.n_inputs] + torch.diff(buffers["level_ptr"]).tolist())
    meta = {
        "n_inputs": dag.n_inputs, "n_neurons": dag.n_neurons, "n_outputs": dag.n_outputs,
        "memory": prog.memory, "n_slow": prog.n_slow, "batch_tile": bt, "strategy": STRATEGIES[strategy],
        "level_max_batch": 0, "dense_min_batch": NEVER, "layered": layered,
        "n_edges": dag.n_edges, "n_levels": int(buffers["level_ptr"].numel() - 1),
        "loads": prog.io.loads, "stores": prog.io.stores,
        "panel_min_batch": NEVER, "panel_tile": hardware.panel_tile(dtype, max_width),
        "panel_cells": int(buffers["panel_edge"].numel()), "panels": int(buffers["panel_ptr"].numel() - 1),
        "max_level_width": max_width,
        "block_min_batch": NEVER, "block_chunks": max(0, int(buffers["block_chunk_seg"].numel() - 1)),
        "block_segments": int(buffers["block_seg"].numel() // 3),
    }
    net = CompiledNetwork(buffers, meta, plan, prog)
    if tile_info is not None:
        net.info["tile_choice"] = {b: (m, io.loads + io.stores, c) for b, (m, io, c) in tile_info.items()}
    if strategy == "auto":
        strategy_mod.configure(net, dag, calibrate=calibrate)
    from . import tuning
    on = strategy == "auto" and not calibrate and tuning.enabled(tune)
    tuner = tuning.Tuner(net.meta, enabled=on, buffers=buffers if on else None,
                         dense_weights=strategy_mod._dense_weights(net) if on else 0, directory=tune_cache)
    tuner.preload(dtype)
    measured = tuner.measured_buckets(dtype) if on else []
    if measured:
        net.info["strategy_source"] = f"measured at buckets {measured}, cost model elsewhere"
    net.info["tuner"] = tuner
    return net


def panel_buffers(buffers: Dict[str, torch.Tensor], max_rows: int = PANEL_MAX_ROWS,
                  min_efficiency: float = PANEL_MIN_EFFICIENCY, scan_limit: int = PANEL_SCAN_LIMIT
                  ) -> Dict[str, torch.Tensor]:
    """The panel tensors (neurons of a level computed together over the union of their sources) built
    from the structure buffers by the native greedy builder (kernels/cpu/builders.cpp, build_panels)."""
    _native.ops()
    n = int(buffers["in_ptr"].numel() - 1)
    out = torch.ops.iosparse.build_panels(buffers["in_ptr"].cpu(), buffers["in_src"].cpu(), buffers["level_ptr"].cpu(),
                                          buffers["level_neuron"].cpu(), n, int(max_rows), float(min_efficiency),
                                          int(scan_limit))
    return dict(zip(PANEL_KEYS, out))


def block_buffers(buffers: Dict[str, torch.Tensor], block_sources: Optional[int] = None,
                  chunk_edges: int = BLOCK_CHUNK_EDGES) -> Dict[str, torch.Tensor]:
    """The block tensors (each level's rows in chunks of about ``chunk_edges`` edges; inside a chunk the
    edges grouped by source block of ``block_sources`` consecutive neurons (default: from this machine's
    L2, hardware.block_sources), then by row) built from the structure buffers by the native builder
    (kernels/cpu/builders.cpp, build_blocks)."""
    _native.ops()
    if block_sources is None:
        block_sources = hardware.block_sources()
    n = int(buffers["in_ptr"].numel() - 1)
    out = torch.ops.iosparse.build_blocks(buffers["in_ptr"].cpu(), buffers["in_src"].cpu(), buffers["level_ptr"].cpu(),
                                          buffers["level_neuron"].cpu(), n, int(block_sources), int(chunk_edges))
    return dict(zip(BLOCK_KEYS, out))


def clear_panel_weight_cache() -> None:
    """Drop the CPU panel path's cached panel-ordered weights (and the references it holds to weight tensors).

    The cache (docs/cpu-kernel.md, "Weight cache") notices every in-place update made through PyTorch (the
    tensor's version counter) and whole-tensor writes through ``.data``; call this after writing single
    weights in a way that bypasses the version counter (``weight.data[i] = ...``, numpy views, raw pointers),
    or set ``IOSPARSE_PANEL_WEIGHT_CACHE=0`` to switch the cache off."""
    _native.ops()
    torch.ops.iosparse.clear_panel_weight_cache()


def panel_weight_cache_size() -> int:
    """Number of (weight tensor, network) entries the CPU panel path holds now (at most 4)."""
    _native.ops()
    return int(torch.ops.iosparse.panel_weight_cache_size())


def _empty_buffers(keys, device) -> Dict[str, torch.Tensor]:
    """Empty tensors for optional buffers (the kernels then run without panels / blocks)."""
    return {k: torch.zeros(0, dtype=NET_DTYPES[k], device=device) for k in keys}


def _op_args(buffers: Dict[str, torch.Tensor], meta: Dict[str, Union[int, float]]):
    for keys in (PANEL_KEYS, BLOCK_KEYS):
        if all(k not in buffers for k in keys):  # optional buffers absent: run without them
            ref = buffers.get("in_ptr")
            buffers = dict(buffers, **_empty_buffers(keys, ref.device if isinstance(ref, torch.Tensor) else None))
    if "panel_min_batch" not in meta:
        meta = dict(meta, panel_min_batch=NEVER, panel_tile=0)
    if "block_min_batch" not in meta:
        meta = dict(meta, block_min_batch=NEVER)
    try:
        net = [buffers[k] for k in NET_KEYS]
    except KeyError as e:
        raise KeyError(f"network buffers lack {e.args[0]!r}; build them with torch_iosparse.ops.prepare") from None
    try:
        config = [int(meta[k]) for k in CONFIG_KEYS]
    except KeyError as e:
        raise KeyError(f"network meta lacks {e.args[0]!r}; build it with torch_iosparse.ops.prepare") from None
    return net, config


def dag_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, buffers: Dict[str, torch.Tensor],
                meta: Dict[str, Union[int, float]]) -> torch.Tensor:
    """Evaluate the prepared network: ``x`` [B, n_inputs] -> [B, n_outputs] (differentiable w.r.t. x,
    weight (edge weights in dag in-edge order) and bias (one per neuron)). Any float dtype: float16 and
    bfloat16 on CPU are computed in float32 and the result cast back."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    net, config = _op_args(buffers, meta)
    _check_same_device(x, weight, bias, net[:1])  # all buffers move together: the first stands for them
    _native.ops()
    if x.device.type == "cpu" and x.dtype in _CPU_UPCAST:
        # The C++ CPU kernel takes float32/float64: run float16/bfloat16 in float32 and cast back (plain
        # differentiable casts, so torch.compile(fullgraph=True) and export see no graph break).
        if weight.dtype != x.dtype or bias.dtype != x.dtype:  # the same rule as the kernel's, before casting
            raise TypeError(f"iosparse: weight ({weight.dtype}) and bias ({bias.dtype}) must have the input's "
                            f"dtype {x.dtype}")
        y = torch.ops.iosparse.dag_forward(x.float(), weight.float(), bias.float(), net, config)
        return y.to(x.dtype)
    if _functorch_active():
        return _DagForwardFunction.apply(x, weight, bias, tuple(config), *net)
    return torch.ops.iosparse.dag_forward(x, weight, bias, net, config)


_CPU_UPCAST = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------- pure-PyTorch reference kernels
# The one reference of the op (the oracle the C++ and Triton kernels are tested against, the kernel of every
# device without its own, and what the CUDA backend runs for its backward and for float64).
def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32 (more exact, and torch's sparse CSR kernels lack them on CPU)."""
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


# Below this many multiply-adds per level (edges x batch) a gather + index_add beats building a CSR matrix
# (tensor construction and library-call overhead dominate small levels).
SPARSE_MM_MIN_WORK = 1 << 18


def _use_sparse_mm(edges: int, batch: int) -> bool:
    return edges * batch >= SPARSE_MM_MIN_WORK


def _per_code(fn, z: torch.Tensor, code: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``fn(code, rows of z, lo, hi)`` (activations.forward or .gradient) for every activation code present,
    rows of ``z`` [k, B] grouped by their code [k]; (lo, hi) per row from ``param`` [k, 2]."""
    out = torch.empty_like(z)
    for c in torch.unique(code).tolist():
        if not 0 <= c < len(ActCode):
            raise ValueError(f"iosparse: network buffers are corrupt or belong to another network (unknown "
                             f"activation code {c}; codes are 0..{len(ActCode) - 1})")
        rows = (code == c).nonzero(as_tuple=True)[0]
        p = param[rows].to(z.dtype)
        out[rows] = fn(c, z[rows], p[:, :1], p[:, 1:])
    return out


def _act_apply(z: torch.Tensor, code: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Activation per row of ``z`` [k, B] with per-row code [k] and (lo, hi) [k, 2] (activations.forward)."""
    return _per_code(activations.forward, z, code, param)


def _act_grad(z: torch.Tensor, code: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """d act / d z per row of ``z`` (activations.gradient)."""
    return _per_code(activations.gradient, z, code, param)


def _level_edges(in_ptr: torch.Tensor, in_src: torch.Tensor, neurons: torch.Tensor, n: int):
    """The in-edges of a level's ``neurons``: (edge ids, local row of their target, source neuron), sorted
    by (row, source) so that they are also the CSR layout of the level's [len(neurons), n] weight matrix."""
    starts, ends = in_ptr[neurons], in_ptr[neurons + 1]
    counts = ends - starts
    local = torch.repeat_interleave(torch.arange(neurons.numel(), device=neurons.device), counts)
    offs = torch.cumsum(counts, 0) - counts
    edges = torch.repeat_interleave(starts - offs, counts) + torch.arange(int(counts.sum()), device=neurons.device)
    src = in_src[edges].to(torch.int64)
    order = torch.argsort(local * n + src)  # sorted columns inside each row (local is already sorted)
    crow = torch.zeros(neurons.numel() + 1, dtype=torch.int64, device=neurons.device)
    crow[1:] = torch.cumsum(counts, 0)
    return edges[order], local, src[order], crow


def _level_matrix(crow: torch.Tensor, src: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """A level's weights as a CSR matrix [its neurons, all n neurons] (built valid by _level_edges)."""
    return torch.sparse_csr_tensor(crow, src, values, size=(crow.numel() - 1, n), check_invariants=False)


_LEVEL_CACHE: "WeakIdKeyDictionary" = None  # level_neuron tensor -> (key, per-level index tensors)


def _levels_of(net: Sequence[torch.Tensor], n: int):
    """Per level: (neurons, edges, local, src, crow) index tensors on the buffers' device. Cached per
    ``level_neuron`` buffer (weakly; rebuilt when a structure buffer was replaced or written in place), so
    training steps on a device without a kernel (and the CUDA backward) do not rebuild them."""
    global _LEVEL_CACHE
    from torch.utils.weak import WeakIdKeyDictionary
    if _LEVEL_CACHE is None:
        _LEVEL_CACHE = WeakIdKeyDictionary()
    in_ptr, in_src = net[NetIndex.IN_PTR], net[NetIndex.IN_SRC]
    level_ptr, level_neuron = net[NetIndex.LEVEL_PTR], net[NetIndex.LEVEL_NEURON]
    try:
        key = tuple((t.data_ptr(), t._version) for t in (in_ptr, in_src, level_ptr, level_neuron)) + (n,)
    except RuntimeError:  # inference tensors have no version counter: do not cache
        key = None
    hit = _LEVEL_CACHE.get(level_neuron) if key is not None else None
    if hit is not None and hit[0] == key:
        return hit[1]
    lp = level_ptr.tolist()
    levels = []
    for l in range(len(lp) - 1):
        neurons = level_neuron[lp[l]:lp[l + 1]].clone()  # not a view: the cache must not keep its key alive
        levels.append((neurons, *_level_edges(in_ptr, in_src, neurons, n)))
    if key is not None:
        _LEVEL_CACHE[level_neuron] = (key, levels)
    return levels


def _reference_levels(x, weight, bias, net: Sequence[torch.Tensor], config: Sequence[int], keep_pre: bool,
                      differentiable: bool = False):
    """Forward level by level in the compute dtype: (values [n, B], pre-activations or None, per-level
    index tensors, w, compute dtype). Big levels run as one CSR matmul, small ones as gathers;
    ``differentiable``: gathers only (ops that autograd differentiates twice), for double backward."""
    n_in, n = config[0], config[1]
    act_code, act_param = net[NetIndex.ACT_CODE], net[NetIndex.ACT_PARAM]
    B = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    w, b = weight.to(cdt), bias.to(cdt)
    vals = torch.zeros(n, B, dtype=cdt, device=x.device)
    pre = torch.zeros(n, B, dtype=cdt, device=x.device) if keep_pre else None
    vals[:n_in] = x.t().to(cdt)
    per_level = _levels_of(net, n)
    for neurons, edges, local, src, crow in per_level:
        acc = b[neurons].unsqueeze(1).expand(-1, B).clone()
        if edges.numel() and not differentiable and _use_sparse_mm(edges.numel(), B):
            acc += torch.sparse.mm(_level_matrix(crow, src, w[edges], n), vals)
        elif edges.numel():
            acc = acc.index_add(0, local, vals[src] * w[edges].unsqueeze(1))
        if keep_pre:
            pre[neurons] = acc
        vals[neurons] = _act_apply(acc, act_code[neurons], act_param.view(-1, 2)[neurons])
    return vals, pre, per_level, w, cdt


def reference_forward(x, weight, bias, net: List[torch.Tensor], config: List[int]) -> torch.Tensor:
    """Pure-PyTorch kernel of ``iosparse::dag_forward`` (level by level; float16/bfloat16 accumulate in
    float32); any device."""
    vals, _, _, _, _ = _reference_levels(x, weight, bias, net, config, keep_pre=False)
    return vals[net[NetIndex.OUTPUTS]].t().to(x.dtype).contiguous()


def differentiable_backward(grad_y, x, weight, bias, net: List[torch.Tensor], config: List[int]):
    """(grad_x, grad_weight, grad_bias) as a graph autograd can differentiate again (double backward:
    gradient penalties, Hessian-vector products): the reference forward rebuilt from differentiable
    gathers, then torch.autograd.grad with create_graph=True. A gradient is None where its input does not
    require one."""
    with torch.enable_grad():
        inputs = [t for t in (x, weight, bias) if t.requires_grad]
        if not inputs:
            return None, None, None
        vals, _, _, _, _ = _reference_levels(x, weight, bias, net, config, keep_pre=False, differentiable=True)
        y = vals[net[NetIndex.OUTPUTS]].t().to(x.dtype)
        grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True, allow_unused=True))
        return tuple(next(grads) if t.requires_grad else None for t in (x, weight, bias))


def reference_backward(grad_y, x, weight, bias, net: List[torch.Tensor], config: List[int]):
    """Pure-PyTorch kernel of ``iosparse::dag_backward``: (grad_x, grad_weight, grad_bias), computed
    explicitly (it runs below the autograd key): recompute the pre-activations, then walk the transposed
    DAG level by level (W^T g for the values, a sampled product g x^T for the weights)."""
    n_in, n = config[0], config[1]
    vals, pre, per_level, w, cdt = _reference_levels(x, weight, bias, net, config, keep_pre=True)
    act_code, act_param = net[NetIndex.ACT_CODE], net[NetIndex.ACT_PARAM].view(-1, 2)
    outputs = net[NetIndex.OUTPUTS]
    B = x.shape[0]
    G = torch.zeros_like(vals)
    G.index_add_(0, outputs, grad_y.t().to(cdt))
    gw = torch.zeros(weight.shape, dtype=cdt, device=x.device)
    gb = torch.zeros(bias.shape, dtype=cdt, device=x.device)
    for neurons, edges, local, src, crow in reversed(per_level):
        dz = G[neurons] * _act_grad(pre[neurons], act_code[neurons], act_param[neurons])
        gb[neurons] = dz.sum(1)
        if edges.numel() and _use_sparse_mm(edges.numel(), B):
            G += torch.sparse.mm(_level_matrix(crow, src, w[edges], n).t(), dz)
            pattern = _level_matrix(crow, src, torch.ones_like(w[edges]), n)
            gw[edges] = torch.sparse.sampled_addmm(pattern, dz, vals.t(), beta=0.0).values()
        elif edges.numel():
            gw[edges] = (dz[local] * vals[src]).sum(1)
            G.index_add_(0, src, w[edges].unsqueeze(1) * dz[local])
    return G[:n_in].t().to(x.dtype).contiguous(), gw.to(weight.dtype), gb.to(bias.dtype)


# ---------------------------------------------------------------------- autograd, torch.func, autocast
def _backward_of(grad_y, x, weight, bias, net, config):
    """The op's backward: the native kernel, or, while a graph of the gradients is being recorded
    (``create_graph=True``: double backward), the differentiable reference."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, weight, bias)):
        return differentiable_backward(grad_y, x, weight, bias, net, config)
    return torch.ops.iosparse.dag_backward(grad_y.contiguous(), x, weight, bias, net, config)


def _functorch_active() -> bool:
    # Not while torch.compile / export traces: dynamo wraps the interpreter-stack query in a grad-mode
    # region (the op would then sit inside a wrap_with_set_grad_enabled submodule of the exported graph).
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


class _DagForwardFunction(torch.autograd.Function):
    """The op as an autograd.Function, used only under torch.func transforms (grad, jacrev, vjp, ...):
    PyTorch's autograd registration of custom ops lacks the setup_context those transforms require
    (pytorch/pytorch#168393). The forward and backward are the same as the op's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, config, *net):
        return torch.ops.iosparse.dag_forward(x, weight, bias, list(net), list(config))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, config, *net = inputs
        ctx.save_for_backward(x, weight, bias, *net)
        ctx.config = list(config)

    @staticmethod
    def backward(ctx, grad_y):
        # The transforms track requires_grad at their own levels, so every gradient is computed here, by
        # _DagBackwardFunction (the native kernel; differentiable again for nested grad / jacrev).
        x, weight, bias, *net = ctx.saved_tensors
        gx, gw, gb = _DagBackwardFunction.apply(grad_y.contiguous(), x, weight, bias, tuple(ctx.config), *net)
        return (gx, gw, gb, None) + (None,) * len(net)


class _DagBackwardFunction(torch.autograd.Function):
    """``iosparse::dag_backward`` under torch.func transforms, differentiable once more: nested transforms
    (``grad(grad(f))``, ``jacrev(jacrev(f))``, Hessians) differentiate the backward through the
    differentiable reference (:func:`differentiable_backward`). A third derivative raises instead of
    returning a wrong value (:class:`_NoThirdDerivative`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, x, weight, bias, config, *net):
        return torch.ops.iosparse.dag_backward(grad_y, x, weight, bias, list(net), list(config))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, weight, bias, config, *net = inputs
        ctx.save_for_backward(grad_y, x, weight, bias, *net)
        ctx.config = list(config)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        grad_y, x, weight, bias, *net = ctx.saved_tensors
        config = ctx.config

        def forward(x_, w_, b_):
            vals = _reference_levels(x_, w_, b_, net, config, keep_pre=False, differentiable=True)[0]
            return vals[net[NetIndex.OUTPUTS]].t().to(x_.dtype)

        def backward(gy_, x_, w_, b_):
            return torch.func.vjp(forward, x_, w_, b_)[1](gy_)

        # Inside a transform, gradients are taken with torch.func (requires_grad_ is not available there).
        _, vjp = torch.func.vjp(backward, *_NoThirdDerivative.apply(grad_y, x, weight, bias))
        cotangents = tuple(torch.zeros_like(t) if g is None else g for g, t in zip((ggx, ggw, ggb), (x, weight, bias)))
        return (*vjp(cotangents), None) + (None,) * len(net)


class _NoThirdDerivative(torch.autograd.Function):
    """Identity whose derivative raises: marks the inputs of the op's second derivative, so that a third
    derivative through the op is an error instead of a wrong value."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("iosparse: derivatives of third or higher order through the op are not "
                                  "supported (first and second order are)")


def _in_dim(d, i=None):
    """The batch dim of argument d (element i of a Tensor[] argument)."""
    if isinstance(d, (list, tuple)):
        return d[i] if i is not None and i < len(d) else None
    return d


def _vmap_forward(info, in_dims, x, weight, bias, net, config):
    """vmap of dag_forward. Batched inputs only (the common case): one call on the batches stacked along
    the batch dimension. Batched weights or biases (model ensembles): one call per vmapped element.
    Batched network buffers would be different networks: a clear error."""
    xd, wd, bd, nd = in_dims[0], in_dims[1], in_dims[2], in_dims[3]
    if any(_in_dim(nd, i) is not None for i in range(len(net))):
        raise ValueError("iosparse: vmap over the network buffers is not supported (each vmapped element "
                         "would be another network); vmap over inputs, weights or biases instead")
    if wd is None and bd is None:
        xs = x.movedim(xd, 0)
        V, B = xs.shape[0], xs.shape[1]
        y = torch.ops.iosparse.dag_forward(xs.reshape(V * B, xs.shape[2]), weight, bias, net, config)
        return y.reshape(V, B, y.shape[-1]), 0
    return _vmap_loop(1)(info, in_dims, x, weight, bias, net, config)


def _vmap_loop(n_outputs: int):
    """A vmap rule that calls the op once per vmapped element (any batched tensor argument)."""

    def rule(info, in_dims, *args):
        op = torch.ops.iosparse.dag_forward if n_outputs == 1 else torch.ops.iosparse.dag_backward

        def pick(a, d, i):
            if isinstance(a, (list, tuple)):
                return [pick(t, _in_dim(d, k), i) for k, t in enumerate(a)]
            return a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a

        outs = [op(*(pick(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        if n_outputs == 1:
            return torch.stack(outs), 0
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * n_outputs
    return rule


def _autocast_forward(device: str):
    """Under torch.autocast the op behaves like nn.Linear: inputs, weights and biases cast to the autocast
    dtype, the sums accumulated in float32 (the CPU kernel computes float16 / bfloat16 in float32), the
    result in the autocast dtype; autocast itself is off inside (the dense path's GEMM must not re-cast)."""

    def kernel(x, weight, bias, net, config):
        dt = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            if x.is_floating_point() and x.device.type == device:
                x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
            if x.device.type == "cpu" and x.dtype in _CPU_UPCAST:
                return torch.ops.iosparse.dag_forward(x.float(), weight.float(), bias.float(), net, config).to(x.dtype)
            return torch.ops.iosparse.dag_forward(x, weight, bias, net, config)
    return kernel


# ---------------------------------------------------------------------- registration
_registered = False


def _check_same_device(x, weight, bias, net, *more) -> None:
    """The dispatcher picks the kernel from every tensor argument: one buffer on ``meta`` sends a CPU call to
    the fake kernel, which would return uninitialised memory. The fake kernel therefore accepts a call only
    when every tensor is on the input's device (all on ``meta``, or all fake tensors of one device).
    :func:`dag_forward` checks the same before dispatching, for the weight, the bias and the first buffer."""
    for name, t in (("weight", weight), ("bias", bias), *(("grad_output", g) for g in more),
                    *((f"network buffer {NET_KEYS[i] if i < len(NET_KEYS) else i}", b) for i, b in enumerate(net))):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"iosparse: input is on device {x.device} but {name} is on {t.device}; move the "
                             "network (module.to(device)) or the input")


def _register():
    global _registered
    if _registered:
        return
    _native.ops()  # defines the schemas (C++)

    @torch.library.register_fake("iosparse::dag_forward")
    def _fake_forward(x, weight, bias, net, config):
        _check_same_device(x, weight, bias, net)
        torch._check(x.dim() == 2, lambda: f"iosparse: input must be 2-D [batch, n_inputs], got {x.dim()}-D")
        return x.new_empty((x.shape[0], config[2]))

    @torch.library.register_fake("iosparse::dag_backward")
    def _fake_backward(grad_y, x, weight, bias, net, config):
        _check_same_device(x, weight, bias, net, grad_y)
        return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
                torch.empty_like(bias))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, net, config = inputs
        ctx.save_for_backward(x, weight, bias, *net)
        ctx.config = config

    def _backward(ctx, grad_y):
        x, weight, bias, *net = ctx.saved_tensors
        gx, gw, gb = _backward_of(grad_y, x, weight, bias, net, ctx.config)
        return gx, gw, gb, [None] * len(net), None

    torch.library.register_autograd("iosparse::dag_forward", _backward, setup_context=_setup_context)
    torch.library.register_vmap("iosparse::dag_forward", _vmap_forward)
    torch.library.register_vmap("iosparse::dag_backward", _vmap_loop(3))
    for device in ("cpu", "cuda"):
        torch.library.impl("iosparse::dag_forward", "Autocast" + device.upper(), _autocast_forward(device))

    # Every device without its own kernel runs the pure-PyTorch reference (a GPU backend replaces it with
    # torch.library.register_kernel("iosparse::dag_forward", "cuda", fn)).
    global _lib
    _lib = torch.library.Library("iosparse", "FRAGMENT")
    _lib.impl("dag_forward", reference_forward, "CompositeExplicitAutograd")
    _lib.impl("dag_backward", reference_backward, "CompositeExplicitAutograd")
    _registered = True


_lib = None
_register()
