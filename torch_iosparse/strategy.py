"""Automatic choice, per network and batch size, between the forward strategies of
``iosparse::dag_forward``: the planned program, the level-by-level path, panels, source blocks and dense
GEMMs (layered nets).

The kernel decides per call from batch thresholds stored in ``net.meta``:
``B >= dense_min_batch`` (layered nets) -> dense; ``B <= level_max_batch`` -> level path;
``B >= panel_min_batch`` -> panels; ``B >= block_min_batch`` -> source blocks; else program.
:func:`configure` sets them from a small cost model (default) or from a one-off measurement on this
machine (:func:`calibrate`, cached per network structure, dtype and thread count).

Cost model (seconds; rates measured on the development machine, see docs/cpu-kernel.md):
    program(B) = edges * ceil(B / 16) * 16 / (PROGRAM_RATE * min(threads, tiles)) + PROGRAM_OVERHEAD
    level(B)   = edges * level_columns(B) / (LEVEL_RATE * threads) + levels * LEVEL_OVERHEAD + CALL_OVERHEAD
                 level_columns: B = 1 -> 1 (gathered dot products); 2..16 with AVX-512 (one masked 16-lane
                 vector per edge, float) -> 1.35 at mean fan-in >= 64, else 2.5 (per-neuron costs weigh
                 more); 17..32 at fan-in >= 64 -> 1.9 (two vectors per edge); otherwise B / 5.5.
                 (33..64 also run four masked vectors, ~3.7 on a fan-in-400 MLP and up to 4.3 on fan-in-32
                 nets: no better than the program, so the model keeps B / 5.5 there.)
    dense(B)   = dense_weights * B / (DENSE_RATE * threads) + dense_weights * SCATTER_COST
    panel(B)   = panel_cells * ceil(B / tile) * tile / (panel_rate * min(threads, tiles)) + PANEL_OVERHEAD
                 (only when panels hold >= PANEL_MIN_ROWS rows on average: single-row panels are a slower
                 level path). panel_rate: PANEL_RATE_L2 while two levels of a tile fit the per-core L2,
                 PANEL_RATE_L2_FULL while they fit 4x L2 (sources prefetched), else PANEL_RATE_L3 (measured on RadiX-Net widths
                 4096 / 16384 / 65536, 1 thread). When panels compete, the program term also charges its
                 slot traffic: (loads + stores) * MOVE_COST per column (the plan's exact I/O at its M).
    block(B)   = tiles * (edges * BLOCK_EDGE_COST[nv] + segments * BLOCK_SEGMENT_COST[nv]) * spill
                 / min(threads, tiles if tiles >= threads else chunks per level) + BLOCK_OVERHEAD; nv = 64-byte vectors per column tile (1, 2 or 4
                 for B <= 16, <= 32, more), tiles = ceil(B / (16 nv)); spill = 1 + values / BLOCK_SPILL_BYTES
                 (values = n_neurons x tile x 4 bytes: every level writes fresh rows). Fitted on the pruned MLP
                 4096-4096-4096-1024 at 90 / 99 % (B = 16 / 32 / 64, 1 thread) and RadiX-Net 4096 / 16384.
                 Only where panels are not useful (panels measured faster on every RadiX-Net tried).
The kernel's order of precedence: dense (B >= dense_min_batch), level (B <= level_max_batch), panel
(B >= panel_min_batch), block (B >= block_min_batch), else program.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Iterable, Tuple

import torch

NEVER = 2**62
PROGRAM_RATE = 12e9     # batch-column x edge multiply-adds per second per thread (16-column tiles)
PROGRAM_OVERHEAD = 30e-6  # seconds per call (input transpose into the tile, output gather)
LEVEL_RATE = 1.2e9      # edges per second per thread, level path at batch 1 (memory-bound)
LEVEL_VECTOR_COLUMNS = 1.35  # 2 <= B <= 16 with AVX-512, mean fan-in >= 64: ~1.35x the batch-1 time (measured)
LEVEL_WIDE_SPEEDUP = 5.5     # B > 16 (or no AVX-512): columns in a scalar-vectorised loop, ~5.5 columns per batch-1 edge time
LEVEL_OVERHEAD = 2e-6   # seconds per level (chunk hand-off in the level pool)
CALL_OVERHEAD = 10e-6   # seconds per call
DENSE_RATE = 40e9       # GEMM multiply-adds per second per thread
SCATTER_COST = 0.4e-9   # seconds per dense weight to scatter the edge weights into a dense matrix

PANEL_RATE_L2 = 29e9       # panel cells (edges + zero-weight fill) x columns per second per thread
PANEL_RATE_L2_FULL = 24e9  # (RadiX-Net widths 4096 / 16384 / 65536 at B=256, 32-column tiles, 1 thread)
PANEL_RATE_L3 = 10e9
PANEL_OVERHEAD = 30e-6
PANEL_MIN_ROWS = 2.0

BLOCK_EDGE_COST = {1: 0.80e-9, 2: 0.92e-9, 4: 1.44e-9}     # seconds per edge per column tile, by nv
BLOCK_SEGMENT_COST = {1: 5.5e-9, 2: 7e-9, 4: 9.2e-9}       # seconds per (row, block) segment per tile
BLOCK_SPILL_BYTES = 32 * 2**20
BLOCK_OVERHEAD = 40e-6

_CACHE: Dict[Tuple, Tuple[int, int, int]] = {}


def level_columns(batch: int, fan_in: float = 1e9) -> float:
    """Batch-1 edge times per edge of the level path at ``batch`` (see the module docstring)."""
    if batch <= 1:
        return 1.0
    if batch <= 16 and _has_avx512():
        return LEVEL_VECTOR_COLUMNS if fan_in >= 64 else 2.5
    if batch <= 32 and fan_in >= 64 and _has_avx512():
        return 1.9  # two masked vectors per edge (measured on the fan-in-400 MLP; B=64 gains nothing)
    return batch / LEVEL_WIDE_SPEEDUP


def _has_avx512() -> bool:
    from torch_iosparse import hardware
    return hardware.detect().isa == "avx512"


def model_times(meta: Dict, batch: int, threads: int, dense_weights: int) -> Dict[str, float]:
    """Predicted seconds of each strategy at ``batch`` (dense only for layered nets)."""
    edges = max(1, int(meta["n_edges"]))
    tiles = max(1, math.ceil(batch / 16))
    fan_in = edges / max(1, int(meta.get("n_neurons", 0)) - int(meta.get("n_inputs", 0)))
    t = {
        "program": edges * tiles * 16 / (PROGRAM_RATE * min(threads, tiles)) + PROGRAM_OVERHEAD,
        "level": edges * level_columns(batch, fan_in) / (LEVEL_RATE * threads) + int(meta["n_levels"]) * LEVEL_OVERHEAD
        + CALL_OVERHEAD,
    }
    if meta.get("layered") and dense_weights:
        t["dense"] = dense_weights * batch / (DENSE_RATE * threads) + dense_weights * SCATTER_COST
    if panels_useful(meta):
        from . import hardware
        info = hardware.detect()
        tile = max(1, int(meta["panel_tile"]))
        ptiles = max(1, math.ceil(batch / tile))
        working = 2 * int(meta.get("max_level_width", 0)) * tile * 4
        rate = PANEL_RATE_L2 if working <= info.l2_bytes else PANEL_RATE_L2_FULL if working <= 4 * info.l2_bytes \
            else PANEL_RATE_L3
        t["panel"] = int(meta["panel_cells"]) * ptiles * tile / (rate * min(threads, ptiles)) + PANEL_OVERHEAD
        moves = int(meta.get("loads", 0)) + int(meta.get("stores", 0))
        t["program"] += moves * tiles * 16 * MOVE_COST / min(threads, tiles)
    if int(meta.get("block_chunks", 0)) > 0 and not panels_useful(meta):
        # Where panels share sources (RadiX-Net) they measured faster than blocks at every batch (1.3-1.7x
        # at N = 1024 / 4096, B = 16-256): blocks are for rows that share few sources.
        t["block"] = block_time(meta, batch, threads)
    return t


def block_time(meta: Dict, batch: int, threads: int) -> float:
    """Predicted seconds of the block path (see the module docstring)."""
    nv = 1 if batch <= 16 else 2 if batch <= 32 else 4
    tile = 16 * nv
    tiles = max(1, math.ceil(batch / tile))
    spill = 1 + int(meta["n_neurons"]) * tile * 4 / BLOCK_SPILL_BYTES
    work = int(meta["n_edges"]) * BLOCK_EDGE_COST[nv] + int(meta.get("block_segments", 0)) * BLOCK_SEGMENT_COST[nv]
    # Whole tiles per thread when there are enough of them, else the chunks of each level shared.
    chunks_per_level = max(1, int(meta["block_chunks"]) // max(1, int(meta["n_levels"])))
    parallel = min(threads, tiles if tiles >= threads else chunks_per_level)
    return tiles * work * spill / parallel + BLOCK_OVERHEAD


def panels_useful(meta: Dict) -> bool:
    """Whether the network's panels share sources (>= PANEL_MIN_ROWS rows per panel on average)."""
    panels = int(meta.get("panels", 0))
    return panels > 0 and (int(meta["n_neurons"]) - int(meta["n_inputs"])) / panels >= PANEL_MIN_ROWS


def _dense_weights(net) -> int:
    if not net.meta.get("layered"):
        return 0
    lp = net.buffers["level_ptr"]
    widths = [int(net.meta["n_inputs"])] + torch.diff(lp).tolist()
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def thresholds_from(times_by_batch: Dict[int, Dict[str, float]]) -> Tuple[int, int]:
    """(level_max_batch, dense_min_batch) from per-batch timings: the level path up to the largest
    batch where it wins, dense from the smallest batch where it wins and keeps winning."""
    batches = sorted(times_by_batch)
    best = {b: min(times_by_batch[b], key=times_by_batch[b].get) for b in batches}
    level_max = 0
    for b in batches:
        if best[b] == "level":
            level_max = b
        else:
            break
    dense_min = NEVER
    for b in reversed(batches):
        if best[b] == "dense":
            dense_min = b
        else:
            break
    if dense_min <= level_max:
        dense_min = level_max + 1
    return level_max, dense_min


def panel_threshold(times_by_batch: Dict[int, Dict[str, float]], level_max: int, dense_min: int,
                    name: str = "panel", above: int = NEVER) -> int:
    """panel_min_batch from per-batch timings: the smallest batch above the level range from which the
    panel path wins at every larger batch below the dense range (NEVER if none). With ``name="block"``
    and ``above=panel_min_batch``: block_min_batch, the same for the block path below the panel range
    (panels take precedence in the kernel)."""
    best = {b: min(t, key=t.get) for b, t in times_by_batch.items()}
    found = NEVER
    for b in sorted(times_by_batch, reverse=True):
        if b >= dense_min or b >= above:
            continue
        if b <= level_max or best[b] != name:
            break
        found = b
    return found


def configure(net, dag=None, calibrate: bool = False, batches: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 256, 1024)):
    """Set ``net.meta['level_max_batch']``, ``['dense_min_batch']`` and ``['panel_min_batch']`` (cost
    model or measurement)."""
    threads = torch.get_num_threads()
    if calibrate:
        level_max, dense_min, panel_min, block_min = calibrate_thresholds(net, batches=batches)
    else:
        dw = _dense_weights(net)
        times = {b: model_times(net.meta, b, threads, dw) for b in batches}
        level_max, dense_min = thresholds_from(times)
        panel_min = panel_threshold(times, level_max, dense_min)
        block_min = panel_threshold(times, level_max, dense_min, "block", panel_min)
    net.meta["level_max_batch"] = int(level_max)
    net.meta["dense_min_batch"] = int(dense_min)
    net.meta["panel_min_batch"] = int(panel_min)
    net.meta["block_min_batch"] = int(block_min)
    net.info["strategy_source"] = "measured" if calibrate else "cost model"


def calibrate_thresholds(net, batches: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 256, 1024),
                         dtype: torch.dtype = torch.float32, repeats: int = 3, max_seconds: float = 20.0):
    """Time every strategy at each batch size once (best of ``repeats``) and derive the thresholds.
    Cached per (network structure, dtype, threads). Stops growing the batch when a sweep point takes
    longer than ``max_seconds`` overall."""
    from . import ops

    key = (tuple(int(net.meta[k]) for k in ("n_inputs", "n_neurons", "n_edges", "memory")),
           int(net.buffers["prog_ops"].numel()), dtype, torch.get_num_threads())
    if key in _CACHE:
        return _CACHE[key]
    n_in = int(net.meta["n_inputs"])
    w = torch.randn(int(net.meta["n_edges"]), dtype=dtype) * 0.1
    b = torch.zeros(int(net.meta["n_neurons"]), dtype=dtype)
    strategies = ["program", "level"] + (["dense"] if net.meta.get("layered") else []) + \
        (["panel"] if panels_useful(net.meta) else []) + (["block"] if int(net.meta.get("block_chunks", 0)) else [])
    times: Dict[int, Dict[str, float]] = {}
    t_start = time.perf_counter()
    for B in sorted(batches):
        x = torch.randn(B, n_in, dtype=dtype)
        times[B] = {}
        for s in strategies:
            meta = dict(net.meta, strategy=ops.STRATEGIES[s])
            ops.dag_forward(x, w, b, net.buffers, meta)  # warm-up
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                ops.dag_forward(x, w, b, net.buffers, meta)
                best = min(best, time.perf_counter() - t0)
            times[B][s] = best
        if time.perf_counter() - t_start > max_seconds:
            break
    level_max, dense_min = thresholds_from(times)
    panel_min = panel_threshold(times, level_max, dense_min)
    result = (level_max, dense_min, panel_min, panel_threshold(times, level_max, dense_min, "block", panel_min))
    net.info["calibration"] = times
    _CACHE[key] = result
    return result


def chosen(meta: Dict, batch: int) -> str:
    """The strategy the kernel will run for ``batch`` under ``meta`` (mirrors choose_strategy in C++)."""
    s = int(meta["strategy"])
    if s:
        return {1: "program", 2: "level", 3: "dense", 4: "panel", 5: "block"}[s]
    if meta.get("layered") and batch >= int(meta["dense_min_batch"]):
        return "dense"
    if batch <= int(meta["level_max_batch"]):
        return "level"
    if int(meta.get("panels", 0)) > 0 and batch >= int(meta.get("panel_min_batch", NEVER)):
        return "panel"
    if int(meta.get("block_chunks", 0)) > 0 and batch >= int(meta.get("block_min_batch", NEVER)):
        return "block"
    return "program"


# ---------------------------------------------------------------------- batch tile and M together
# Program-path time per batch column (measured here, 1 thread, radix nets):
#   edges * EDGE_COST[vectors per tile] + (loads + stores) * MOVE_COST
# one 64-byte vector per tile leaves the FMA loop overhead-bound; a LOAD/STORE (a copy through L2/DRAM
# plus the cache misses it implies) costs about as much as 10 edges.
EDGE_COST = {1: 1 / 11.4e9, 2: 1 / 17e9, 4: 1 / 17e9, 8: 1 / 17e9}
MOVE_COST = 0.64e-9


def choose_tile(dag, dtype: torch.dtype = torch.float32, order=None, candidates=None):
    """Pick (batch_tile, memory) for ``dag``: for each candidate BT (the register-sized tile and its
    halves), M = hardware.fast_memory_slots(BT) and the exact I/O of ``order`` (default: the 2-optimal
    order) at that M; the predicted time is the model above. Returns (bt, M, {bt: (M, IOCount, cost)})."""
    from . import hardware
    from .iomodel import count_io, topological_order

    itemsize = torch.empty((), dtype=dtype).element_size()
    full = hardware.batch_tile(dtype)
    if candidates is None:
        candidates = sorted({max(64 // itemsize, full >> k) for k in range(3)})
    if order is None:
        order = topological_order(dag)
    table = {}
    for bt in candidates:
        M = hardware.fast_memory_slots(bt, dtype)
        io = count_io(dag, order, M)
        nv = max(1, min(8, bt * itemsize // 64))
        cost = dag.n_edges * EDGE_COST.get(nv, EDGE_COST[8]) + (io.loads + io.stores) * MOVE_COST
        table[bt] = (M, io, cost)
    # Within 10 % of the cheapest, prefer the widest tile (fewer passes over the op stream and weights;
    # the model cannot resolve differences that small).
    cheapest = min(c for _, _, c in table.values())
    best = max(b for b in table if table[b][2] <= 1.1 * cheapest)
    return best, table[best][0], table
