"""Automatic choice, per network and batch size, between the forward strategies of
``iosparse::dag_forward``: the planned program, the level-by-level path, panels, source blocks and dense
GEMMs (layered nets).

The kernel decides per call from batch thresholds stored in ``net.meta``:
``B >= dense_min_batch`` (layered nets) -> dense; ``B <= level_max_batch`` -> level path;
``B >= panel_min_batch`` -> panels; ``B >= block_min_batch`` -> source blocks; else program.
:func:`configure` sets them from a small cost model (default) or from a one-off measurement on this
machine (:func:`calibrate_thresholds`, cached in memory per network structure, dtype and thread count).
torch_iosparse.tuning refines the model's choice by measurement, per batch-size bucket, cached on disk
(:func:`thresholds_from_paths` turns its per-bucket winners into thresholds).

The model's rates form a :class:`Profile`: the constants below are the defaults (fitted on the development
machine, AVX-512); :func:`calibrate_profile` measures this machine's rates and saves them in the cache
folder (``tuning/profile-<machine>.json``), and :func:`current_profile` reads them back for this machine.

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

import dataclasses
import json
import math
import os
import time
from typing import Dict, Iterable, Optional, Tuple

import torch

from ...abi import NEVER, STRATEGY_CODES, Strategy
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


@dataclasses.dataclass(frozen=True)
class Profile:
    """The cost model's machine-dependent rates (seconds, per thread). The defaults are the constants above
    (the development machine); :func:`calibrate_profile` fits them on this machine. ``block_scale``
    multiplies BLOCK_EDGE_COST and BLOCK_SEGMENT_COST; ``source`` says where the numbers come from."""

    program_rate: float = PROGRAM_RATE
    program_overhead: float = PROGRAM_OVERHEAD
    level_rate: float = LEVEL_RATE
    level_overhead: float = LEVEL_OVERHEAD
    call_overhead: float = CALL_OVERHEAD
    dense_rate: float = DENSE_RATE
    scatter_cost: float = SCATTER_COST
    panel_rate_l2: float = PANEL_RATE_L2
    panel_rate_l2_full: float = PANEL_RATE_L2_FULL
    panel_rate_l3: float = PANEL_RATE_L3
    panel_overhead: float = PANEL_OVERHEAD
    block_scale: float = 1.0
    block_overhead: float = BLOCK_OVERHEAD
    move_cost: float = 0.64e-9  # MOVE_COST (below)
    source: str = "defaults"

    def rates(self) -> Dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}


DEFAULT_PROFILE = Profile()
PROFILE_FORMAT = 1
_profile_override: Optional[Profile] = None
_profile_memo: Dict[Tuple, Profile] = {}


def profile_path(directory: Optional[str] = None) -> Optional[str]:
    """Where this machine's profile lives (None when the cache is disabled)."""
    from . import tuning
    d = tuning.tuning_dir(directory)
    return None if d is None else os.path.join(d, f"profile-{tuning.machine_hash()}.json")


def set_profile(profile: Optional[Profile]) -> None:
    """Use ``profile`` for every model evaluation of this process (None: this machine's saved profile, or
    the defaults)."""
    global _profile_override
    _profile_override = profile


def current_profile(directory: Optional[str] = None) -> Profile:
    """The profile the cost model uses: :func:`set_profile`'s, else the one saved for this machine in the
    cache folder (read once per process and folder), else :data:`DEFAULT_PROFILE`. A corrupt, truncated or
    foreign (other machine) file is ignored."""
    if _profile_override is not None:
        return _profile_override
    from ...planning import cache
    from ... import env
    memo_key = (cache.cache_dir(directory), env.isa_override())
    p = _profile_memo.get(memo_key)
    if p is None:
        p = _profile_memo[memo_key] = load_profile(directory) or DEFAULT_PROFILE
    return p


def load_profile(directory: Optional[str] = None) -> Optional[Profile]:
    """This machine's saved profile, or None (none saved, or the file is unusable)."""
    from . import tuning
    path = profile_path(directory)
    if path is None:
        return None
    data = tuning.read_json(path)
    try:
        if data is None or data.get("format") != PROFILE_FORMAT or data.get("machine") != tuning.machine_key():
            return None
        rates = data["rates"]
        names = set(DEFAULT_PROFILE.rates())
        if set(rates) != names or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                                          for v in rates.values()):
            return None
        return Profile(**{k: float(v) for k, v in rates.items()}, source=f"calibrated ({path})")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def save_profile(profile: Profile, directory: Optional[str] = None) -> Optional[str]:
    """Write ``profile`` as this machine's (atomically); returns the path, None when the cache is disabled."""
    from . import tuning
    path = profile_path(directory)
    if path is None:
        return None
    tuning.write_json(path, {"format": PROFILE_FORMAT, "machine": tuning.machine_key(), "rates": profile.rates(),
                             "threads": torch.get_num_threads(), "created": time.time()})
    _profile_memo.clear()
    return path


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
    from . import hardware
    return hardware.detect().isa == "avx512"


def model_times(meta: Dict, batch: int, threads: int, dense_weights: int,
                profile: Optional[Profile] = None) -> Dict[str, float]:
    """Predicted seconds of each strategy at ``batch`` (dense only for layered nets), with ``profile``'s
    rates (default: :func:`current_profile`)."""
    p = profile or current_profile()
    edges = max(1, int(meta["n_edges"]))
    tiles = max(1, math.ceil(batch / 16))
    fan_in = edges / max(1, int(meta.get("n_neurons", 0)) - int(meta.get("n_inputs", 0)))
    t = {
        "program": edges * tiles * 16 / (p.program_rate * min(threads, tiles)) + p.program_overhead,
        "level": edges * level_columns(batch, fan_in) / (p.level_rate * threads)
        + int(meta["n_levels"]) * p.level_overhead + p.call_overhead,
    }
    if meta.get("layered") and dense_weights:
        t["dense"] = dense_weights * batch / (p.dense_rate * threads) + dense_weights * p.scatter_cost
    if panels_useful(meta):
        tile = max(1, int(meta["panel_tile"]))
        ptiles = max(1, math.ceil(batch / tile))
        t["panel"] = int(meta["panel_cells"]) * ptiles * tile / (panel_rate(meta, p) * min(threads, ptiles)) \
            + p.panel_overhead
        moves = int(meta.get("loads", 0)) + int(meta.get("stores", 0))
        t["program"] += moves * tiles * 16 * p.move_cost / min(threads, tiles)
    if int(meta.get("block_chunks", 0)) > 0 and not panels_useful(meta):
        # Where panels share sources (RadiX-Net) they measured faster than blocks at every batch (1.3-1.7x
        # at N = 1024 / 4096, B = 16-256): blocks are for rows that share few sources.
        t["block"] = block_time(meta, batch, threads, p)
    return t


def panel_rate(meta: Dict, profile: Optional[Profile] = None) -> float:
    """Panel cells x columns per second per thread: by where two levels of a tile live (L2, 4x L2, beyond)."""
    from . import hardware
    p = profile or current_profile()
    info = hardware.detect()
    working = 2 * int(meta.get("max_level_width", 0)) * max(1, int(meta["panel_tile"])) * 4
    return p.panel_rate_l2 if working <= info.l2_bytes else p.panel_rate_l2_full if working <= 4 * info.l2_bytes \
        else p.panel_rate_l3


def block_time(meta: Dict, batch: int, threads: int, profile: Optional[Profile] = None) -> float:
    """Predicted seconds of the block path (see the module docstring)."""
    p = profile or current_profile()
    nv = 1 if batch <= 16 else 2 if batch <= 32 else 4
    tile = 16 * nv
    tiles = max(1, math.ceil(batch / tile))
    spill = 1 + int(meta["n_neurons"]) * tile * 4 / BLOCK_SPILL_BYTES
    work = int(meta["n_edges"]) * BLOCK_EDGE_COST[nv] + int(meta.get("block_segments", 0)) * BLOCK_SEGMENT_COST[nv]
    # Whole tiles per thread when there are enough of them, else the chunks of each level shared.
    chunks_per_level = max(1, int(meta["block_chunks"]) // max(1, int(meta["n_levels"])))
    parallel = min(threads, tiles if tiles >= threads else chunks_per_level)
    return tiles * work * p.block_scale * spill / parallel + p.block_overhead


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


MODEL_BATCHES = (1, 2, 4, 8, 16, 32, 64, 256, 1024)


def model_thresholds(meta: Dict, dense_weights: int, threads: int, batches: Iterable[int] = MODEL_BATCHES,
                     profile: Optional[Profile] = None) -> Tuple[int, int, int, int]:
    """(level_max_batch, dense_min_batch, panel_min_batch, block_min_batch) from the cost model evaluated at
    ``batches``."""
    times = {b: model_times(meta, b, threads, dense_weights, profile) for b in batches}
    level_max, dense_min = thresholds_from(times)
    panel_min = panel_threshold(times, level_max, dense_min)
    block_min = panel_threshold(times, level_max, dense_min, "block", panel_min)
    return level_max, dense_min, panel_min, block_min


THRESHOLD_KEYS = ("level_max_batch", "dense_min_batch", "panel_min_batch", "block_min_batch")


def thresholds_from_paths(paths: Dict[int, str]) -> Tuple[int, int, int, int]:
    """Thresholds from the path to run per batch-size bucket (``{1: "level", 2: "level", 4: "block", ...}``,
    bucket b covering b .. next bucket - 1, the last one every larger batch): the level range is the prefix
    of level buckets, dense the suffix of dense buckets, then the panel and block suffixes below it (the
    kernel's precedence). Buckets that do not fit that shape run what the thresholds give them."""
    bs = sorted(paths)
    level_max = 0
    for i, b in enumerate(bs):
        if paths[b] != "level":
            break
        level_max = bs[i + 1] - 1 if i + 1 < len(bs) else NEVER
    dense_min = NEVER
    for b in reversed(bs):
        if paths[b] != "dense":
            break
        dense_min = b

    def suffix(name: str, above: int) -> int:
        found = NEVER
        for b in reversed(bs):
            if b >= dense_min or b >= above:
                continue
            if b <= level_max or paths[b] != name:
                break
            found = b
        return found

    panel_min = suffix("panel", NEVER)
    return level_max, dense_min, panel_min, suffix("block", panel_min)


def configure(net, dag=None, calibrate: bool = False, batches: Iterable[int] = MODEL_BATCHES):
    """Set ``net.meta['level_max_batch']``, ``['dense_min_batch']``, ``['panel_min_batch']`` and
    ``['block_min_batch']`` (cost model or measurement)."""
    threads = torch.get_num_threads()
    if calibrate:
        thresholds = calibrate_thresholds(net, batches=batches)
    else:
        thresholds = model_thresholds(net.meta, _dense_weights(net), threads, batches)
    for k, v in zip(THRESHOLD_KEYS, thresholds):
        net.meta[k] = int(v)
    net.info["strategy_source"] = "measured" if calibrate else "cost model"


def calibrate_thresholds(net, batches: Iterable[int] = MODEL_BATCHES,
                         dtype: torch.dtype = torch.float32, repeats: int = 3, max_seconds: float = 20.0):
    """Time every strategy at each batch size once (best of ``repeats``) and derive the thresholds.
    Cached per (network structure, dtype, threads). Stops growing the batch when a sweep point takes
    longer than ``max_seconds`` overall."""
    from ... import ops

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
            meta = dict(net.meta, strategy=STRATEGY_CODES[s])
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


def _calibration_nets():
    """The networks :func:`calibrate_profile` times: a pruned MLP 512-512-512-512 at 10 % density (program,
    level, dense and block paths), a RadiX-Net of width 1024, depth 3 (panels) and an 8-8-8 MLP (per-call
    costs)."""
    from ...graph import generate
    from ... import ops
    from ...graph.dag import SparseDAG

    def mlp(width: int, density: float):
        g = torch.Generator().manual_seed(0)
        layers = []
        for k in range(3):
            lin = torch.nn.Linear(width, width)
            with torch.no_grad():
                mask = torch.rand(width, width, generator=g) < density
                lin.weight.mul_(mask).add_(mask * 1e-3)  # no accidental zeros inside the pattern
            layers += [lin, torch.nn.ReLU()]
        return ops.prepare(SparseDAG.from_module(torch.nn.Sequential(*layers[:-1])), tune=False)

    return mlp(512, 0.1), ops.prepare(generate.radix_net(1024, 3), tune=False), mlp(8, 1.0)


def calibrate_profile(save: bool = True, directory: Optional[str] = None, repeats: int = 5) -> Profile:
    """Fit the cost model's per-thread rates on this machine, on one thread (about a second): per-call costs
    of the program and level paths on a tiny net; the program rate (two batch sizes) and the level rate
    (batch 1) on a pruned MLP with those costs taken off; the dense rate and scatter cost from two batch
    sizes; one speed factor each for the panel rates and the block costs (measured / predicted with the
    defaults). Each time is the best of 3 rounds of ``repeats`` calls. Values outside 1/20 .. 20x the
    defaults are not trusted (the default is kept). With ``save``, written to the cache folder as this
    machine's profile, which :func:`current_profile` (so every later cost-model evaluation, in this and later
    processes) then uses. The model's division by the thread count stays an assumption; the per-bucket
    measurements of torch_iosparse.tuning run at the caller's thread count."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-thread rates, free of waits on a descheduled helper thread
    try:
        profile = _fit_profile(repeats)
    finally:
        torch.set_num_threads(saved_threads)
    if save:
        path = save_profile(profile, directory)
        if path is not None:
            profile = dataclasses.replace(profile, source=f"calibrated ({path})")
    return profile


def _fit_profile(repeats: int) -> Profile:
    from ... import ops
    from .tuning import time_call

    d = DEFAULT_PROFILE
    mlp, radix, tiny = _calibration_nets()

    def measure(net, path: str, batch: int) -> float:
        g = torch.Generator().manual_seed(batch)
        w = torch.randn(int(net.meta["n_edges"]), generator=g) * 0.05
        b = torch.zeros(int(net.meta["n_neurons"]))
        x = torch.randn(batch, int(net.meta["n_inputs"]), generator=g)
        meta = dict(net.meta, strategy=STRATEGY_CODES[path])
        with torch.no_grad():
            return min(time_call(lambda: ops.dag_forward(x, w, b, net.buffers, meta), repeats) for _ in range(3))

    def trusted(value: float, default: float) -> float:
        return value if math.isfinite(value) and default / 20 <= value <= default * 20 else default

    rates = d.rates()
    # per-call costs: a tiny net's time is almost all of it
    rates["program_overhead"] = trusted(measure(tiny, "program", 16), d.program_overhead)
    level_fixed = int(tiny.meta["n_levels"]) * d.level_overhead
    rates["call_overhead"] = trusted(measure(tiny, "level", 1) - level_fixed, d.call_overhead)
    # program: t = edges * 16 * tiles / rate + overhead (one thread), at 1 and 16 tiles
    edges = int(mlp.meta["n_edges"])
    work = sum(edges * 16 * tiles for tiles in (1, 16))
    busy = sum(measure(mlp, "program", 16 * tiles) for tiles in (1, 16)) - 2 * rates["program_overhead"]
    if busy > 0:
        rates["program_rate"] = trusted(work / busy, d.program_rate)
    # level at batch 1: t = edges / rate + levels * level_overhead + call_overhead
    busy = measure(mlp, "level", 1) - int(mlp.meta["n_levels"]) * d.level_overhead - rates["call_overhead"]
    if busy > 0:
        rates["level_rate"] = trusted(edges / busy, d.level_rate)
    # dense: t = dense_weights * (B / rate + scatter), at B = 16 and 256
    dw = _dense_weights(mlp)
    t16, t256 = measure(mlp, "dense", 16), measure(mlp, "dense", 256)
    if t256 > t16:
        rate = trusted(dw * 240 / (t256 - t16), d.dense_rate)
        rates["dense_rate"] = rate
        rates["scatter_cost"] = trusted((t16 - dw * 16 / rate) / dw, d.scatter_cost)
    # block (B = 64) and panels (RadiX-Net, B = 64): one speed factor against the default prediction
    predicted = block_time(mlp.meta, 64, 1, d) - d.block_overhead
    t = measure(mlp, "block", 64) - d.block_overhead
    if t > 0 and predicted > 0:
        rates["block_scale"] = trusted(t / predicted, 1.0)
    if panels_useful(radix.meta):
        predicted = model_times(radix.meta, 64, 1, 0, d)["panel"] - d.panel_overhead
        t = measure(radix, "panel", 64) - d.panel_overhead
        if t > 0 and predicted > 0:
            factor = trusted(predicted / t, 1.0)
            for k in ("panel_rate_l2", "panel_rate_l2_full", "panel_rate_l3"):
                rates[k] = getattr(d, k) * factor
    return Profile(**rates, source="calibrated")


def chosen(meta: Dict, batch: int) -> str:
    """The strategy the kernel will run for ``batch`` under ``meta`` (mirrors choose_strategy in C++)."""
    s = Strategy.from_code(int(meta["strategy"]))
    if s is not Strategy.AUTO:
        return s.value
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
    from ...cost.iomodel import count_io, topological_order

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
