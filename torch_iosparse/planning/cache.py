"""On-disk plan cache: building the same network twice does not plan twice.

An entry is keyed by the network's structure hash plus every planning argument (resolved memory, method,
seed, time budget, extra keywords) and the plan-format version. Entries are plan files written by
:meth:`Plan.save` (npz, no pickle, checksummed). A loaded entry is never trusted: its checksum, its
structure hash and its order (a valid topological order, re-counted by the exact simulator and compared
with the recorded I/O) are all checked; an entry that fails any check is ignored, deleted and rebuilt. Only a
regular file is read, and only as many bytes as a plan of the network can take (:meth:`Plan.load`): a FIFO,
a device or a decompression bomb at an entry's path is a corrupt entry too.

Location: ``$IOSPARSE_CACHE_DIR`` (or its alias ``$TORCH_IOSPARSE_CACHE``) when set, else
``~/.cache/torch_iosparse``. Set the variable to an empty string or ``0`` to disable the cache
(torch_iosparse.env).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Optional, Tuple

from .. import env
from . import plans
from ..graph.dag import SparseDAG
from ..cost.iomodel import count_io, normalize_order

ENV_VAR = "IOSPARSE_CACHE_DIR"  # read through torch_iosparse.env (alias TORCH_IOSPARSE_CACHE)
_DISABLED = ("", "0", "off", "none", "false")

# Planner keywords that only change how planning reports, not the plan it returns.
_NOT_PLAN_AFFECTING = frozenset({"progress", "verbose"})

# How many plans each call computed / found; tests read these to prove a cache hit.
stats = {"hits": 0, "misses": 0, "corrupt": 0}


def cache_dir(override: Optional[str] = None) -> Optional[str]:
    """The cache directory (created on demand), or None when caching is disabled."""
    if override is not None:
        return override
    setting = env.cache_dir_setting()
    if setting is not None:
        return None if setting.strip().lower() in _DISABLED else os.path.expanduser(setting)
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_iosparse")


def cache_key(dag: SparseDAG, memory: Optional[int], method: str, seed: int, time_budget, **kwargs) -> str:
    """SHA-256 of the structure and every argument that changes the plan."""
    args = {"dag": dag.structure_hash(), "memory": memory, "method": method, "seed": int(seed),
            "time_budget": time_budget,
            "kwargs": {k: repr(v) for k, v in sorted(kwargs.items()) if k not in _NOT_PLAN_AFFECTING},
            "format": plans.PLAN_VERSION}
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()


def _validate(p: plans.Plan, dag: SparseDAG, memory: Optional[int], method: str) -> None:
    p.check_dag(dag)
    if p.memory != memory or p.method != method:
        raise plans.PlanError(f"cache entry was made for memory={p.memory}, method={p.method!r}")
    order = normalize_order(dag, p.order)  # raises on a non-topological or incomplete order
    io = count_io(dag, order, memory)
    if io != p.io:
        raise plans.PlanError(f"cache entry records I/O {p.io} but its order costs {io}")


def cached_plan(dag: SparseDAG, memory: Optional[int], method: str = "two_optimal", seed: int = 0,
                time_budget: Optional[float] = None, *, directory: Optional[str] = None, use_cache: bool = True,
                **kwargs) -> Tuple[plans.Plan, bool]:
    """``plan(dag, memory, method, seed, time_budget, **kwargs)`` through the cache.

    Returns ``(plan, hit)``. ``memory`` must already be resolved (an int or None).
    """
    d = cache_dir(directory) if use_cache else None
    if d is None:
        stats["misses"] += 1
        return plans.plan(dag, memory, method=method, seed=seed, time_budget=time_budget, **kwargs), False
    key = cache_key(dag, memory, method, seed, time_budget, **kwargs)
    path = os.path.join(d, key[:2], key + ".plan.npz")
    if os.path.exists(path):
        try:
            p = plans.Plan.load(path, dag)
            _validate(p, dag, memory, method)
            stats["hits"] += 1
            return p, True
        except Exception as e:  # any failure means: do not trust it, rebuild
            stats["corrupt"] += 1
            warnings.warn(f"ignoring corrupt plan cache entry {path}: {e}", RuntimeWarning, stacklevel=3)
            try:
                os.remove(path)
            except OSError:
                pass
    stats["misses"] += 1
    p = plans.plan(dag, memory, method=method, seed=seed, time_budget=time_budget, **kwargs)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        p.save(path)  # atomic (a temporary file renamed over the entry): readers see the old or the new one
    except OSError as e:  # a read-only or full disk must not stop the user's model from building
        warnings.warn(f"could not write plan cache entry {path}: {e}", RuntimeWarning, stacklevel=3)
    return p, False


def clear(directory: Optional[str] = None) -> int:
    """Delete every cached plan; returns how many files were removed."""
    d = cache_dir(directory)
    n = 0
    if d and os.path.isdir(d):
        for root, _, files in os.walk(d):
            for f in files:
                if f.endswith(".plan.npz") or f.endswith(".tmp"):
                    os.remove(os.path.join(root, f))
                    n += 1
    return n
