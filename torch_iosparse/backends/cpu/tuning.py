"""Measured strategy choice: per network and batch-size bucket, the forward path that runs fastest on this
machine, kept on disk for later processes.

Buckets are powers of two (1, 2, 4, ..., 512, and 1024 for every batch >= 1024); a bucket b covers the
batches b .. 2b - 1 and is measured at batch b. The first time a network runs at a bucket (or
:func:`tune` asks for it), the few paths the cost model deems plausible there (within
``PLAUSIBLE_FACTOR`` x the model's best, or ``PLAUSIBLE_SLACK`` seconds, plus the path the model's
thresholds run) are timed, best of ``REPEATS`` after a warm-up, within ``BUDGET_SECONDS`` per bucket. The
winner (the model's own path when it is within ``TIE_TOLERANCE`` of the fastest) replaces the model's
choice for that bucket; :func:`torch_iosparse.backends.cpu.strategy.thresholds_from_paths` turns the per-bucket paths
(measured where measured, the model's elsewhere) into the kernel's thresholds in ``meta``.

On disk: ``<cache>/tuning/<sha256 of the key>.json`` (the cache folder of torch_iosparse.cache:
``$IOSPARSE_CACHE_DIR`` or ``~/.cache/torch_iosparse``), one JSON file per key = (network: a hash of the
op's buffers and configuration, bucket, dtype, thread count, machine: CPU model, ISA and ``IOSPARSE_ISA``,
cache sizes, torch version and a hash of the native kernel). The file repeats its key; an entry that cannot
be read, is truncated, names another key (machine, network...) or a path the network cannot run is
ignored and measured again. Writes go to a temporary file renamed over the entry.

The backward has two paths on networks with block buffers (level by level, or by source blocks from
``block_backward_min_batch`` in ``meta``). The first backward at a new bucket (a hook on the forward's output)
times both paths of the op's backward, within the same budget, and keeps them in an entry of its own (the
key adds ``"pass": "backward"``); that backward itself runs by the rule in place at its forward, the
measured one serves the next calls. The threshold is the first bucket of the longest suffix of buckets
where the block path wins; unmeasured buckets follow the kernel's rule (block once the batch fills a
64-byte vector).

Switches: ``IOSPARSE_TUNE=0`` (read when a network is built) or ``tune=False``
(``IOSparseNetwork(..., tune=False)``, ``ops.prepare(..., tune=False)``) keep the cost model alone (no
measurement, no cache reads). Measurement is skipped while torch.compile / torch.export / torch.jit trace
(compiled graphs keep the thresholds they were traced with: tune first), for fake or meta tensors, functorch
transforms and non-CPU devices; it runs under ``torch.no_grad()``, outside the caller's autograd graph.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import stat
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from ...planning import cache
from ... import env
from . import hardware
from ...abi import CONFIG_KEYS, NET_KEYS, NEVER, STRATEGY_CODES
from ...files import atomic_write
from ...ops.reference import _compute_dtype
from . import strategy as strategy_mod

BUCKETS: Tuple[int, ...] = tuple(1 << k for k in range(11))  # 1 .. 1024 (the last: every batch >= 1024)
ENV_VAR = "IOSPARSE_TUNE"  # read through torch_iosparse.env
FORMAT = 1
PLAUSIBLE_FACTOR = 3.0    # time the paths the model predicts within 3x of its best ...
PLAUSIBLE_SLACK = 50e-6   # ... or within 50 us of it (small nets: the model's per-call costs are the least sure)
TIE_TOLERANCE = 0.05      # the model's own path wins when measured within 5 % of the fastest (noise)
BUDGET_SECONDS = 1.0      # per network and bucket; paths not reached in time are not timed
REPEATS = 5               # timed calls per path after one warm-up call
MAX_ENTRY_BYTES = 1 << 16
BACKWARD_KEY = "block_backward_min_batch"  # the meta / config entry the backward's measurement sets
BACKWARD_PATHS = ("level", "block")

log = logging.getLogger("torch_iosparse")
# What happened per bucket since the process started; tests read these to prove a cache hit.
stats = {"measured": 0, "cached": 0, "ignored": 0}
_lock = threading.RLock()


def bucket(batch: int) -> int:
    """The bucket of a batch size: the largest power of two <= batch, at most 1024 (batch >= 1)."""
    return BUCKETS[min(len(BUCKETS) - 1, int(batch).bit_length() - 1)]


def enabled(tune: Optional[bool] = None) -> bool:
    """``tune`` when given, else the environment (``IOSPARSE_TUNE=0|off|false|no|none`` switches tuning off)."""
    if tune is not None:
        return bool(tune)
    return env.tune_enabled()


def tuning_dir(directory: Union[str, bool, None] = None) -> Optional[str]:
    """``<cache folder>/tuning`` (``directory``: another cache folder; False: no disk), None when disabled."""
    if directory is False:
        return None
    d = cache.cache_dir(directory if isinstance(directory, str) else None)
    return None if d is None else os.path.join(d, "tuning")


# ---------------------------------------------------------------------- the machine and the network
@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def kernel_id() -> str:
    """SHA-256 (first 16 hex digits) of the native extension: a rebuilt kernel is another machine."""
    import importlib.util
    try:  # located, not imported (torch_iosparse._native imports it, once)
        spec = importlib.util.find_spec(__package__ + "._C")
        with open(spec.origin, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (ImportError, OSError, AttributeError, TypeError, ValueError):
        return "unknown"


def machine_key() -> Dict:
    """What identifies this machine (and software) for measured timings."""
    info = hardware.detect()
    return {"cpu": hardware.cpu_model(), "isa": info.isa, "isa_override": env.isa_override(),
            "l1d": info.l1d_bytes, "l2": info.l2_bytes, "l3": info.l3_bytes, "cpus": os.cpu_count() or 0,
            "torch": torch.__version__, "kernel": kernel_id()}


def machine_hash() -> str:
    return hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:16]


_META_KEYS = ("n_inputs", "n_neurons", "n_outputs", "memory", "n_slow", "batch_tile", "layered", "panel_tile",
              "n_edges", "n_levels")


def network_key(buffers: Dict[str, torch.Tensor], meta: Dict) -> str:
    """SHA-256 of everything the op runs on except the weights: its buffers and configuration."""
    h = hashlib.sha256()
    h.update(json.dumps({k: int(meta[k]) for k in _META_KEYS if k in meta}, sort_keys=True).encode())
    for k in NET_KEYS:
        t = buffers.get(k)
        if t is None:
            h.update(f"{k}:absent;".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------- files
def read_json(path: str) -> Optional[Dict]:
    """The JSON object in a regular file of at most MAX_ENTRY_BYTES, or None (missing, not a regular file,
    too big, unreadable, not a JSON object). Never blocks on a FIFO."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ENTRY_BYTES:
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(MAX_ENTRY_BYTES + 1).decode())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None


def write_json(path: str, data: Dict) -> bool:
    """Write atomically (files.atomic_write); False on an OS error (logged)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(data, sort_keys=True).encode()))
        return True
    except OSError as e:  # a read-only or full disk must not stop the user's model from running
        log.warning("torch_iosparse: could not write %s: %s", path, e)
        return False


def clear(directory: Optional[str] = None) -> int:
    """Delete every measured entry and profile of the cache folder; returns how many files were removed."""
    d = tuning_dir(directory)
    n = 0
    if d and os.path.isdir(d):
        for f in os.listdir(d):
            if f.endswith((".json", ".tmp")):
                try:
                    os.remove(os.path.join(d, f))
                    n += 1
                except OSError:
                    pass
    return n


# ---------------------------------------------------------------------- timing
def time_call(fn: Callable[[], object], repeats: int = REPEATS, deadline: float = math.inf,
              cutoff: float = math.inf) -> float:
    """Best of up to ``repeats`` timed calls of ``fn`` after one warm-up call; at least one timed call, no
    more once ``deadline`` (a time.perf_counter() value) has passed. A warm-up slower than ``cutoff``
    seconds ends it: its time is returned (the path is not worth timing further)."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    if warm > cutoff:
        return warm
    best = math.inf
    for r in range(max(1, repeats)):
        if r and time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def plausible(times: Dict[str, float], must: Iterable[str] = ()) -> List[str]:
    """The paths worth timing, the model's fastest first: within PLAUSIBLE_FACTOR x (or PLAUSIBLE_SLACK
    seconds of) the best prediction, and ``must``."""
    best = min(times.values())
    keep = {s for s, t in times.items() if t <= PLAUSIBLE_FACTOR * best or t <= best + PLAUSIBLE_SLACK}
    keep.update(s for s in must if s in times)
    return sorted(keep, key=times.get)


def _runnable(meta: Dict) -> set:
    """The paths the kernel can take for this network in auto mode."""
    paths = {"program", "level"}
    if int(meta.get("layered", 0)):
        paths.add("dense")
    if int(meta.get("panels", 0)) > 0:
        paths.add("panel")
    if int(meta.get("block_chunks", 0)) > 0:
        paths.add("block")
    return paths


# ---------------------------------------------------------------------- per-network state
class Tuner:
    """The strategy state of one prepared network: the op's ``meta`` (thresholds updated in place), and
    per (dtype, threads) the measured buckets. ``enabled`` False: the model's thresholds, untouched."""

    def __init__(self, meta: Dict, *, enabled: bool, buffers: Optional[Dict[str, torch.Tensor]] = None,
                 dense_weights: int = 0, directory: Union[str, bool, None] = None):
        self.meta = meta
        self.enabled = bool(enabled) and int(meta.get("strategy", 0)) == 0
        self.dense_weights = int(dense_weights)
        self.directory = directory
        self.key = network_key(buffers, meta) if self.enabled and buffers is not None else None
        self._model: Dict[int, Tuple[int, int, int, int]] = {}
        self._tables: Dict[Tuple[torch.dtype, int], Dict[int, Dict]] = {}
        self._backward_tables: Dict[Tuple[torch.dtype, int], Dict[int, Dict]] = {}
        self._seen: set = set()
        self._backward_seen: set = set()
        self._ctx: Optional[Tuple[torch.dtype, int]] = None
        if self.enabled:  # the prepare-time thresholds are the model's for this thread count
            self._model[torch.get_num_threads()] = tuple(int(meta[k]) for k in strategy_mod.THRESHOLD_KEYS)

    def __setstate__(self, state: Dict) -> None:
        # A tuner pickled with its network by an earlier version lacks the backward's state.
        self.__dict__.update(state)
        self.__dict__.setdefault("_backward_tables", {})
        self.__dict__.setdefault("_backward_seen", set())

    def op_meta(self) -> Dict:
        """The meta the op runs with. Under torch.compile / export it is a constant of the graph (no guards
        on it): a later measurement in eager mode does not recompile graphs traced before it."""
        if torch.compiler.is_compiling():
            return dict(self._meta_items())
        return self.meta

    @torch._dynamo.assume_constant_result
    def _meta_items(self) -> Tuple:
        return tuple(self.meta.items())

    # -------------------------------------------------------------- per call
    def maybe_tune(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   buffers: Dict[str, torch.Tensor]) -> None:
        """Before a forward call of ``x`` [B, n_inputs]: measure B's bucket if it has not been seen in this
        (dtype, thread count), and put the thresholds of that context in ``meta``. Cheap when seen."""
        if type(x) is not torch.Tensor or not x.is_cpu:  # FakeTensor and other subclasses, CUDA, meta
            return
        seen = (x.shape[0].bit_length(), x.dtype, torch.get_num_threads())
        if seen in self._seen:  # (the batch's power of two, dtype, threads) of the context in meta
            return
        B = x.shape[0]
        if B < 1 or torch.jit.is_tracing() or _functorch_wrapped(x) or not weight.is_cpu:
            return
        self.ensure(bucket(B), seen[1], seen[2], weight, bias, buffers)
        self._seen.add(seen)

    def maybe_tune_backward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            buffers: Dict[str, torch.Tensor]) -> None:
        """After a forward call ``y = op(x, ...)`` that recorded a graph: if the backward of x's bucket has
        not been measured in this (dtype, thread count), measure it when that backward comes (a hook on
        ``y``: inference calls in grad mode cost nothing). That first backward runs by the rule in ``meta``
        at the forward; the measured threshold serves the calls after it."""
        if not self.backward_choice or not y.requires_grad or type(x) is not torch.Tensor or not x.is_cpu \
                or torch.jit.is_tracing():  # (shapes are tensors while tracing)
            return
        B = x.shape[0]
        seen = (B.bit_length(), x.dtype, torch.get_num_threads())
        if seen in self._backward_seen or B < 1 or _functorch_wrapped(x):
            return
        w, bi = weight.detach(), bias.detach()

        def measure(grad):  # seen once a backward came (forward calls without one leave no mark)
            self.ensure(bucket(B), seen[1], seen[2], w, bi, buffers, backward=True)
            self._backward_seen.add(seen)

        y.register_hook(measure)

    # -------------------------------------------------------------- buckets
    def ensure(self, b: int, dtype: torch.dtype, threads: int, weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], buffers: Dict[str, torch.Tensor], force: bool = False,
               backward: bool = False) -> Dict:
        """Bucket ``b``'s entry in the (dtype, threads) context, measured unless cached (or ``force``), and
        that context's thresholds put in ``meta``. ``backward``: the backward's entry of the bucket is made
        sure of too (where the network has a choice: block buffers). Returns the forward entry
        ({"source": "measured" | "model", "winner", "times", "cached"})."""
        with _lock:
            ctx = (dtype, int(threads))
            table = self._table(ctx)
            entry = table.get(b)
            if entry is None or force:
                entry = table[b] = self._measure(b, dtype, ctx[1], weight, bias, buffers)
            if backward and self.backward_choice:
                bw = self._table(ctx, backward=True)
                if b not in bw or force:
                    bw[b] = self._measure_backward(b, dtype, ctx[1], weight, bias, buffers)
            self._apply(ctx)
            return entry

    @property
    def backward_choice(self) -> bool:
        """Whether the backward has two paths to choose from here (level, and block: block buffers)."""
        return self.enabled and int(self.meta.get("block_chunks", 0)) > 0

    def preload(self, dtype: torch.dtype, threads: Optional[int] = None) -> None:
        """Read the (dtype, threads) context's entries from the disk and, if any, put its thresholds in
        ``meta`` (no measurement)."""
        if not self.enabled:
            return
        ctx = (dtype, torch.get_num_threads() if threads is None else int(threads))
        with _lock:
            if any(e["source"] == "measured" for t in (self._table(ctx), self._table(ctx, backward=True))
                   for e in t.values()):
                self._apply(ctx)

    def _table(self, ctx, backward: bool = False) -> Dict[int, Dict]:
        tables = self._backward_tables if backward else self._tables
        table = tables.get(ctx)
        if table is None:
            table = tables[ctx] = {}
            if backward and not self.backward_choice:
                return table
            for b in BUCKETS:
                e = self._read(b, ctx, backward)
                if e is not None:
                    table[b] = e
        return table

    def _entry_key(self, b: int, ctx, backward: bool = False) -> Dict:
        key = {"format": FORMAT, "network": self.key, "bucket": int(b), "dtype": str(ctx[0]).replace("torch.", ""),
               "threads": int(ctx[1]), "machine": machine_key()}
        if backward:
            key["pass"] = "backward"
        return key

    def _path(self, key: Dict) -> Optional[str]:
        d = tuning_dir(self.directory)
        if d is None or self.key is None:
            return None
        return os.path.join(d, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json")

    def _read(self, b: int, ctx, backward: bool = False) -> Optional[Dict]:
        key = self._entry_key(b, ctx, backward)
        path = self._path(key)
        if path is None or not os.path.lexists(path):
            return None
        data = read_json(path)
        problem = _check_entry(data, key, set(BACKWARD_PATHS) if backward else _runnable(self.meta))
        if problem:
            stats["ignored"] += 1
            log.info("torch_iosparse: ignoring tuning entry %s (%s); measuring again", path, problem)
            return None
        stats["cached"] += 1
        return {"source": "measured", "winner": data["winner"], "times": dict(data["times"]),
                "complete": bool(data.get("complete", True)), "cached": True}

    def _model_thresholds(self, threads: int) -> Tuple[int, int, int, int]:
        th = self._model.get(threads)
        if th is None:
            th = self._model[threads] = strategy_mod.model_thresholds(self.meta, self.dense_weights, threads)
        return th

    def _model_meta(self, threads: int) -> Dict:
        return dict(self.meta, **dict(zip(strategy_mod.THRESHOLD_KEYS, self._model_thresholds(threads))))

    def _measure(self, b: int, dtype: torch.dtype, threads: int, weight, bias, buffers) -> Dict:
        from ... import ops
        model_times = strategy_mod.model_times(self.meta, b, threads, self.dense_weights)
        model_path = strategy_mod.chosen(self._model_meta(threads), b)
        candidates = plausible({s: t for s, t in model_times.items() if s in _runnable(self.meta)}, [model_path])
        if len(candidates) < 2:
            return {"source": "model", "winner": model_path, "times": {}, "cached": False,
                    "reason": "one plausible path"}
        n_in, n = int(self.meta["n_inputs"]), int(self.meta["n_neurons"])
        g = torch.Generator().manual_seed(b)
        times: Dict[str, float] = {}
        errors = []
        start = time.perf_counter()
        deadline = start + BUDGET_SECONDS
        with torch.no_grad():
            x = torch.randn(b, n_in, generator=g).to(dtype)
            if weight is None:
                weight = torch.randn(int(self.meta["n_edges"]), generator=g) * 0.05
            w = weight.to(dtype)
            bi = bias.to(dtype) if bias is not None else torch.zeros(n, dtype=dtype)
            for s in candidates:
                if times and time.perf_counter() > deadline:
                    break
                meta = dict(self.meta, strategy=STRATEGY_CODES[s])
                cutoff = PLAUSIBLE_FACTOR * min(times.values()) if times else math.inf
                try:
                    times[s] = time_call(lambda: ops.dag_forward(x, w, bi, buffers, meta), REPEATS, deadline, cutoff)
                except Exception as e:  # a path that cannot run here is no candidate
                    errors.append(f"{s}: {type(e).__name__}: {e}")
        seconds = time.perf_counter() - start
        if not times:
            log.info("torch_iosparse: could not time any path at batch %d (%s); keeping the model's choice",
                     b, "; ".join(errors))
            return {"source": "model", "winner": model_path, "times": {}, "cached": False,
                    "reason": "measurement failed"}
        return self._record(b, dtype, threads, times, model_path, len(times) == len(candidates), seconds)

    def _measure_backward(self, b: int, dtype: torch.dtype, threads: int, weight, bias, buffers) -> Dict:
        """Time the backward's two paths at batch ``b`` (the op's backward alone, on random gradients) and
        write the winner to the disk, as :meth:`_measure` does for the forward."""
        from ... import ops
        run = _compute_dtype(dtype)
        model_path = backward_model_path(b, run)
        if model_path == "level":  # the block backward needs a vector of batch rows: no choice
            return {"source": "model", "winner": model_path, "times": {}, "cached": False,
                    "reason": "batch below one vector"}
        n_in, n = int(self.meta["n_inputs"]), int(self.meta["n_neurons"])
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, n_in, generator=g).to(run)
        gy = torch.randn(b, int(self.meta["n_outputs"]), generator=g).to(run)
        w = (weight if weight is not None else torch.randn(int(self.meta["n_edges"]), generator=g) * 0.05).to(run)
        bi = bias.to(run) if bias is not None else torch.zeros(n, dtype=run)
        net, config = ops._op_args(buffers, dict(self.meta, strategy=STRATEGY_CODES["auto"]))
        at = CONFIG_KEYS.index(BACKWARD_KEY)
        times: Dict[str, float] = {}
        start = time.perf_counter()
        deadline = start + BUDGET_SECONDS
        try:
            with torch.no_grad():
                for s in BACKWARD_PATHS:
                    if times and time.perf_counter() > deadline:
                        break
                    cfg = list(config)
                    cfg[at] = 0 if s == "block" else NEVER
                    times[s] = time_call(lambda: torch.ops.iosparse.dag_backward(gy, x, w, bi, net, cfg),
                                         REPEATS, deadline)
        except Exception as e:  # the backward cannot run here: keep the model's rule
            log.info("torch_iosparse: could not time the backward at batch %d (%s: %s); keeping the model's "
                     "choice", b, type(e).__name__, e)
            return {"source": "model", "winner": model_path, "times": {}, "cached": False,
                    "reason": "measurement failed"}
        seconds = time.perf_counter() - start
        return self._record(b, dtype, threads, times, model_path, len(times) == len(BACKWARD_PATHS), seconds,
                            backward=True)

    def _record(self, b: int, dtype: torch.dtype, threads: int, times: Dict[str, float], model_path: str,
                complete: bool, seconds: float, backward: bool = False) -> Dict:
        """The entry of a measured bucket: the winner (the model's path when within TIE_TOLERANCE of the
        fastest), one log line, the file on disk."""
        fastest = min(times, key=times.get)
        winner = model_path if model_path in times and times[model_path] <= (1 + TIE_TOLERANCE) * times[fastest] \
            else fastest
        stats["measured"] += 1
        log.info("torch_iosparse: measured the %s paths of a %d-edge network at batch %d (%s, %d threads) in "
                 "%.3f s: %s (%s; model: %s)", "backward" if backward else "forward", int(self.meta["n_edges"]), b,
                 str(dtype).replace("torch.", ""), threads, seconds, winner,
                 ", ".join(f"{s} {t * 1e6:.0f} us" for s, t in times.items()), model_path)
        key = self._entry_key(b, (dtype, threads), backward)
        path = self._path(key)
        if path is not None:
            write_json(path, {"key": key, "winner": winner, "times": times, "complete": complete,
                              "model": model_path, "seconds": seconds, "created": time.time()})
        return {"source": "measured", "winner": winner, "times": times, "complete": complete, "cached": False}

    # -------------------------------------------------------------- thresholds
    def paths(self, ctx) -> Dict[int, Tuple[str, str]]:
        """Per bucket: (path by measurement or model, "measured" | "model") in the context ``ctx``."""
        model_meta = self._model_meta(ctx[1])
        table = self._tables.get(ctx, {})
        out = {}
        for b in BUCKETS:
            e = table.get(b)
            if e is not None and e["source"] == "measured":
                out[b] = (e["winner"], "measured")
            else:
                out[b] = (strategy_mod.chosen(model_meta, b), "model")
        return out

    def thresholds(self, ctx) -> Tuple[int, int, int, int]:
        paths = self.paths(ctx)
        if all(src == "model" for _, src in paths.values()):
            return self._model_thresholds(ctx[1])
        return strategy_mod.thresholds_from_paths({b: p for b, (p, _) in paths.items()})

    def backward_paths(self, ctx) -> Dict[int, Tuple[str, str]]:
        """Per bucket: (the backward's path by measurement or model, "measured" | "model") in ``ctx``."""
        run = _compute_dtype(ctx[0])
        table = self._backward_tables.get(ctx, {})
        out = {}
        for b in BUCKETS:
            e = table.get(b)
            if not self.backward_choice:
                out[b] = ("level", "model")
            elif e is not None and e["source"] == "measured":
                out[b] = (e["winner"], "measured")
            else:
                out[b] = (backward_model_path(b, run), "model")
        return out

    def backward_threshold(self, ctx) -> int:
        """The batch from which the backward runs by blocks in ``ctx``: 0 (the kernel's own minimum) while
        nothing is measured, else the first bucket of the longest suffix of block buckets."""
        paths = self.backward_paths(ctx)
        if all(src == "model" for _, src in paths.values()):
            return 0
        return backward_threshold_from_paths({b: p for b, (p, _) in paths.items()})

    def _kernel_thresholds(self, ctx) -> Dict[str, int]:
        """The ``meta`` entries the kernel chooses its paths by in ``ctx``: the forward's and the backward's."""
        out = {k: int(v) for k, v in zip(strategy_mod.THRESHOLD_KEYS, self.thresholds(ctx))}
        out[BACKWARD_KEY] = int(self.backward_threshold(ctx))
        return out

    def _apply(self, ctx) -> None:
        self.meta.update(self._kernel_thresholds(ctx))
        if ctx != self._ctx:
            self._seen = set()  # the fast path's memos hold the context in meta only
            self._backward_seen = set()
        self._ctx = ctx

    # -------------------------------------------------------------- reports
    def report(self, dtype: torch.dtype, threads: Optional[int] = None) -> Dict[int, Dict]:
        """Per bucket, in the (dtype, threads) context (default: this thread count): the path that runs
        ("path"), "source" ("measured" or "model"), and for measured buckets the "times" and whether they
        came from the disk ("cached"); the same for the backward ("backward": "level" or "block",
        "backward_source", "backward_times"). Reads the disk, never measures, leaves ``meta`` as it is."""
        threads = torch.get_num_threads() if threads is None else int(threads)
        if not self.enabled:
            return {b: {"path": strategy_mod.chosen(self.meta, b), "source": "model",
                        "backward": backward_chosen(self.meta, b, dtype), "backward_source": "model"}
                    for b in BUCKETS}
        ctx = (dtype, threads)
        with _lock:
            table = self._table(ctx)
            bw_table = self._table(ctx, backward=True)
            meta = dict(self.meta, **self._kernel_thresholds(ctx))
            paths, bw_paths = self.paths(ctx), self.backward_paths(ctx)
        out = {}
        for b in BUCKETS:
            winner, src = paths[b]
            row = {"path": strategy_mod.chosen(meta, b), "source": src,
                   "backward": backward_chosen(meta, b, dtype), "backward_source": bw_paths[b][1]}
            if src == "measured":
                e = table[b]
                row.update(winner=winner, times=dict(e["times"]), cached=bool(e.get("cached")))
            if bw_paths[b][1] == "measured":
                row["backward_times"] = dict(bw_table[b]["times"])
            out[b] = row
        return out

    def thresholds_meta(self, dtype: torch.dtype, threads: Optional[int] = None) -> Dict:
        """``meta`` with the thresholds of the (dtype, threads) context (what :func:`report` describes)."""
        threads = torch.get_num_threads() if threads is None else int(threads)
        if not self.enabled:
            return dict(self.meta)
        with _lock:
            ctx = (dtype, threads)
            self._table(ctx)
            self._table(ctx, backward=True)
            return dict(self.meta, **self._kernel_thresholds(ctx))

    def measured_buckets(self, dtype: torch.dtype, threads: Optional[int] = None) -> List[int]:
        return [b for b, r in self.report(dtype, threads).items() if r["source"] == "measured"]


def backward_model_path(b: int, dtype: torch.dtype) -> str:
    """The backward's path at batch ``b`` by the model's rule (the kernel's with block_backward_min_batch 0):
    block once the batch fills a 64-byte vector of ``dtype`` (float32 / float64), else level."""
    return "block" if b * dtype.itemsize >= 64 else "level"


def backward_threshold_from_paths(paths: Dict[int, str]) -> int:
    """``block_backward_min_batch`` from the backward's path per bucket: the first bucket of the longest
    suffix of "block" buckets (NEVER when the largest bucket runs "level")."""
    threshold = NEVER
    for b in sorted(paths, reverse=True):
        if paths[b] != "block":
            break
        threshold = b
    return threshold


def backward_chosen(meta: Dict, batch: int, dtype: torch.dtype) -> str:
    """The backward path the kernel runs for ``batch`` inputs of ``dtype`` under ``meta`` (mirrors
    dag_backward_cpu's rule)."""
    run = _compute_dtype(dtype)
    strategy = int(meta.get("strategy", 0))
    by_blocks = strategy in (STRATEGY_CODES["auto"], STRATEGY_CODES["block"]) and int(meta.get("block_chunks", 0)) > 0
    if by_blocks and batch >= int(meta.get(BACKWARD_KEY, 0)) and backward_model_path(batch, run) == "block":
        return "block"
    return "level"


def _check_entry(data: Optional[Dict], key: Dict, runnable: set) -> Optional[str]:
    """Why a read entry is unusable (None: it is fine)."""
    if data is None:
        return "unreadable, truncated or not a JSON object"
    if data.get("key") != key:
        return "made for another key (machine, network, dtype, threads or format)"
    winner, times = data.get("winner"), data.get("times")
    if winner not in runnable:
        return f"names the path {winner!r}, which this network cannot run"
    if not isinstance(times, dict) or winner not in times or not all(
            k in runnable and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for k, v in times.items()):
        return "its timings are invalid"
    return None


def _functorch_wrapped(x: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------------- ahead of time
def tune(model, batch_sizes: Iterable[int] = BUCKETS, dtype: Optional[torch.dtype] = None, *, force: bool = False,
         backward: bool = False, progress: Optional[bool] = None) -> Dict[str, Dict[int, Dict]]:
    """Measure the forward paths of every IOSparseNetwork in ``model`` (or of a bare IOSparseNetwork) at the
    buckets of ``batch_sizes`` now, e.g. before torch.compile or torch.export (which keep the thresholds
    they trace with and never measure). Entries already on disk are reused (``force``: measure again).
    ``backward``: the backward's paths too (what the first training step at a bucket measures otherwise).

    ``dtype``: the input dtype to tune for (default: each network's weight dtype); the current thread count.
    A network built with ``tune=False`` (or under ``IOSPARSE_TUNE=0``), a forced strategy or a non-CPU
    network is not measured (its buckets report source "model"). ``progress``: a tqdm bar over networks x
    buckets (None: only on a terminal).

    Returns ``{network name: {bucket: {"path", "source", "winner", "times", "cached", "backward",
    "backward_source", "backward_times"}}}`` (see :meth:`Tuner.report`; names as :func:`torch_iosparse.explain`
    prints them; "(root)" for a bare network).
    """
    from tqdm.auto import tqdm

    from ...nn.module import IOSparseNetwork

    if isinstance(model, IOSparseNetwork):
        nets = [("(root)", model)]
    elif isinstance(model, torch.nn.Module):
        nets = [(name or "(root)", m) for name, m in model.named_modules() if isinstance(m, IOSparseNetwork)]
    else:
        raise TypeError(f"tune takes an nn.Module, got {type(model).__name__}")
    buckets = sorted({bucket(int(b)) for b in batch_sizes if int(b) >= 1})
    summary: Dict[str, Dict[int, Dict]] = {}
    threads = torch.get_num_threads()
    with tqdm(total=len(nets) * len(buckets), desc="torch_iosparse.tune", unit="bucket",
              disable=None if progress is None else not progress) as bar:
        for name, net in nets:
            dt = dtype or net.weight.dtype
            summary[name] = {}
            for b in buckets:
                bar.set_postfix_str(f"{name} B={b}", refresh=False)
                net._tune_bucket(b, dt, force=force, backward=backward)
                bar.update(1)
            rep = net._tuner.report(dt, threads)
            summary[name] = {b: rep[b] for b in buckets}
    return summary
