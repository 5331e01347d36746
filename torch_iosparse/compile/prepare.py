"""Prepare a network for the op: ``prepare(dag, plan)`` compiles it once into the buffers (tensors) and
meta (plain ints / floats) that :func:`torch_iosparse.ops.dag_forward` takes: the structure buffers, the
compiled program, the panel and block layouts (built by the native builders), and the strategy choice of
the CPU backend. Also the control of the panel path's weight cache. See docs/program-format.md ("The op")
and docs/cpu-kernel.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import numpy as np
import torch

from .. import _native
from ..abi import BLOCK_KEYS, CONFIG_KEYS, NET_DTYPES, NET_KEYS, NEVER, PANEL_KEYS
from ..abi import STRATEGY_CODES as STRATEGIES
from ..graph.dag import SparseDAG
from ..planning import Plan, plan as make_plan
from . import program as program_mod

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
        from ..ops.registry import dag_forward

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
        strategy: ``"auto"`` (pick per batch size, see backends/cpu/strategy.py), ``"program"``, ``"level"``,
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
    from ..backends.cpu import hardware
    from ..backends.cpu import strategy as strategy_mod  # (the argument `strategy` shadows the module name)

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
        "block_backward_min_batch": 0,
        "block_segments": int(buffers["block_seg"].numel() // 3),
    }
    net = CompiledNetwork(buffers, meta, plan, prog)
    if tile_info is not None:
        net.info["tile_choice"] = {b: (m, io.loads + io.stores, c) for b, (m, io, c) in tile_info.items()}
    if strategy == "auto":
        strategy_mod.configure(net, dag, calibrate=calibrate)
    from ..backends.cpu import tuning
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
    from ..backends.cpu import hardware

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
    if "block_backward_min_batch" not in meta:  # the kernel's own minimum (one vector of batch rows)
        meta = dict(meta, block_backward_min_batch=0)
    try:
        net = [buffers[k] for k in NET_KEYS]
    except KeyError as e:
        raise KeyError(f"network buffers lack {e.args[0]!r}; build them with torch_iosparse.ops.prepare") from None
    try:
        config = [int(meta[k]) for k in CONFIG_KEYS]
    except KeyError as e:
        raise KeyError(f"network meta lacks {e.args[0]!r}; build it with torch_iosparse.ops.prepare") from None
    return net, config


