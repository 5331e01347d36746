"""Scale-out on ``torch.distributed``: batch-sharded inference and a layer pipeline (docs/distributed.md).

Two modes, both on an initialised default process group (gloo on CPU, nccl on CUDA) or, when none is
initialised, in this one process (world size 1: the helpers then run the network locally):

* **Batch-sharded** (data parallel): every rank holds the whole network. :func:`build_replicated` builds it
  on every rank, planned once (rank ``src`` plans, through the on-disk plan cache, and broadcasts the plan),
  after checking that every rank was given the same network. :func:`sharded_forward` scatters the rows of
  a batch held by rank ``src`` (:func:`scatter_batch`), runs each rank's rows, and gathers the outputs on
  rank ``dst`` (:func:`gather_batch`).
* **Layer pipeline** (for networks larger than one machine): rank ``r`` holds only stage ``r``, the
  consecutive layers :func:`split_layers` gives it (e.g. ``generate.radix_net(..., layers=...)``), and
  :func:`pipeline_forward` passes the activation tiles of micro-batches from stage to stage with
  ``send`` / ``recv``.

Whenever ranks disagree (different networks, stage widths that do not chain, a stage count that is not the
world size, inputs missing on the source rank) every rank raises the same RuntimeError: the helpers first
``all_gather`` what each rank has, so no rank is left waiting in a collective that the others never join.

:func:`run_local` starts ``n`` local processes in one gloo group (a file store in a temporary directory, so
no port is needed) and returns what each returned, with a time limit: the tests and
``benchmarks/distributed_scaling.py`` use it.

Training needs nothing from this module: a sparsified model works under ``DistributedDataParallel`` and
FSDP2's ``fully_shard`` like any module (tests/nn/test_distributed.py).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..graph.dag import SparseDAG
from ..cost.iomodel import IOCount
from ..planning import Plan

__all__ = ["world", "gather_objects", "check_consensus", "network_fingerprint", "build_replicated", "split_rows",
           "scatter_batch",
           "gather_batch", "sharded_forward", "split_layers", "pipeline_forward", "run_local"]


# ---------------------------------------------------------------------- the group
def world(group=None) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default: the default group); ``(0, 1)`` when torch.distributed is
    unavailable or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (point-to-point and rooted collectives take global ranks)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def gather_objects(value: Any, group=None) -> List[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` without a group)."""
    rank, size = world(group)
    if size == 1:
        return [value]
    out: List[Any] = [None] * size
    dist.all_gather_object(out, value, group=group)
    return out


def _raise_on_every_rank(problem: Optional[str], group=None) -> None:
    """Raise the same RuntimeError on every rank when any rank has a ``problem`` (a message, None = fine).
    A check that only one rank can make goes through here, so the other ranks do not wait forever in the
    next collective."""
    problems = gather_objects(problem, group)
    bad = [(r, p) for r, p in enumerate(problems) if p is not None]
    if bad:
        raise RuntimeError("torch_iosparse.distributed: " + "; ".join(f"rank {r}: {p}" for r, p in bad))


def check_consensus(value: Any, what: str, group=None) -> List[Any]:
    """Check that every rank passes an equal ``value`` (any picklable, compared with ``==``); raise a
    RuntimeError naming each rank's value on every rank otherwise. Returns the gathered values."""
    values = gather_objects(value, group)
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
        raise RuntimeError(f"torch_iosparse.distributed: the ranks disagree on {what} ({shown})")
    return values


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# ---------------------------------------------------------------------- identity of a network
def network_fingerprint(network: Union[SparseDAG, nn.Module]) -> str:
    """SHA-256 of a network's structure, weights, biases and activations (what two ranks must share to
    compute the same function). Takes a :class:`SparseDAG`, an ``IOSparseNetwork`` or an ``nn.Sequential``
    of pruned ``nn.Linear`` layers."""
    dag = _as_dag(network)
    h = hashlib.sha256(dag.structure_hash().encode())
    for t in (dag.weight, dag.bias):
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr([str(a) for a in dag.activations]).encode())
    h.update(np.ascontiguousarray(dag.act_index, dtype=np.int64).tobytes())
    return h.hexdigest()


def _as_dag(network: Union[SparseDAG, nn.Module]) -> SparseDAG:
    from .module import IOSparseNetwork

    if isinstance(network, SparseDAG):
        return network
    if isinstance(network, IOSparseNetwork):
        return network.to_dag()
    if isinstance(network, nn.Module):
        return SparseDAG.from_module(network)
    raise TypeError(f"expected a SparseDAG, an IOSparseNetwork or an nn.Module, got {type(network).__name__}")


# ---------------------------------------------------------------------- batch-sharded inference
def build_replicated(network: Union[SparseDAG, nn.Module], *, src: int = 0, group=None, check: bool = True,
                     **network_kwargs):
    """An ``IOSparseNetwork`` of ``network`` on every rank, planned once.

    Every rank passes the same network (a :class:`SparseDAG` or an ``nn.Sequential`` of pruned Linears).
    With ``check`` (default) the ranks first compare :func:`network_fingerprint` and raise a RuntimeError on
    every rank when they differ. Rank ``src`` then builds its module (planning through the plan cache, so a
    cache directory shared by the nodes plans once per structure for good) and broadcasts the plan: the other
    ranks build theirs from it without planning. ``network_kwargs`` go to ``IOSparseNetwork`` (``memory``,
    ``method``, ``strategy``, ...); with ``memory="auto"`` rank ``src``'s machine sizes M for everyone.
    """
    from .module import IOSparseNetwork

    if isinstance(network, IOSparseNetwork):
        raise TypeError("build_replicated takes the network (a SparseDAG or a pruned nn.Sequential / nn.Linear), "
                        "not an IOSparseNetwork; pass net.to_dag()")
    if "plan" in network_kwargs:
        raise ValueError("build_replicated plans on rank src and broadcasts that plan; do not pass plan=")
    rank, size = world(group)
    if size == 1:
        return IOSparseNetwork(network, **network_kwargs)
    dag = _as_dag(network)
    if check:
        check_consensus(network_fingerprint(dag), "the network (structure, weights and activations)", group)
    net, meta, problem = None, None, None
    if rank == src:
        try:
            net = IOSparseNetwork(network, **network_kwargs)  # the module itself: its bias=False carries over
            meta = {"n": int(net.plan_order.numel()), "memory": net.memory, "io": net.io.as_tuple(),
                    "method": net.method}
        except Exception as e:  # tell the other ranks instead of leaving them in the broadcast
            problem = f"building the network on rank {src} failed: {type(e).__name__}: {e}"
    _raise_on_every_rank(problem, group)
    box = [meta]
    dist.broadcast_object_list(box, src=_global_rank(group, src), group=group)
    meta = box[0]
    order = net.plan_order.detach().cpu().to(torch.int64).contiguous() if rank == src else \
        torch.empty(meta["n"], dtype=torch.int64)
    order = _broadcast(order, src, group)
    if rank != src:
        plan = Plan(order.numpy(), meta["memory"], IOCount(*meta["io"]), meta["method"], dag.structure_hash())
        kwargs = {k: v for k, v in network_kwargs.items() if k not in ("memory", "method")}
        net = IOSparseNetwork(network, plan=plan, **kwargs)
    return net


def _comm_device(group=None) -> torch.device:
    """Where the backend wants tensors: the current CUDA device for nccl, the CPU otherwise (gloo)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """``t`` of rank ``src`` on every rank (same shape and dtype given everywhere), on ``t``'s device."""
    buf = t.to(_comm_device(group))
    dist.broadcast(buf, src=_global_rank(group, src), group=group)
    return buf.to(t.device)


def split_rows(n_rows: int, parts: int) -> List[int]:
    """How many of ``n_rows`` rows each of ``parts`` ranks takes: as equal as possible, the first
    ``n_rows % parts`` ranks one more (``torch.tensor_split``'s rule)."""
    n_rows, parts = int(n_rows), int(parts)
    if n_rows < 0 or parts < 1:
        raise ValueError(f"split_rows needs n_rows >= 0 and parts >= 1, got {n_rows} and {parts}")
    q, r = divmod(n_rows, parts)
    return [q + (i < r) for i in range(parts)]


def _describe_batch(x: Any) -> Tuple[Optional[Tuple], Optional[str]]:
    """``((n_rows, row_shape, dtype), None)`` for a batch tensor, ``(None, problem)`` otherwise."""
    if not isinstance(x, torch.Tensor):
        return None, f"the batch must be a tensor on the source rank, got {type(x).__name__}"
    if x.dim() < 1:
        return None, f"the batch must have a batch dimension, got a tensor of shape {list(x.shape)}"
    return (int(x.shape[0]), tuple(x.shape[1:]), x.dtype), None


def scatter_batch(x: Optional[torch.Tensor], src: int = 0, group=None) -> torch.Tensor:
    """Rank ``src``'s batch ``x`` (rows along dim 0) split by :func:`split_rows`; each rank gets its rows,
    rank ``r`` the ``r``-th slice. The other ranks pass None (or anything: it is ignored). Returns the rows
    on the backend's device (CPU for gloo). Ranks that get no rows (batch smaller than the world) receive
    an empty tensor of the right shape."""
    rank, size = world(group)
    if size == 1:
        _, problem = _describe_batch(x)
        if problem:
            raise TypeError(problem)
        return x
    desc, problem = _describe_batch(x) if rank == src else (None, None)
    box = [(desc, problem)]
    dist.broadcast_object_list(box, src=_global_rank(group, src), group=group)
    desc, problem = box[0]
    if problem is not None:
        raise RuntimeError(f"torch_iosparse.distributed.scatter_batch: rank {src}: {problem}")
    n_rows, row_shape, dtype = desc
    counts = split_rows(n_rows, size)
    pad = max(counts)
    device = _comm_device(group)
    buf = torch.empty((pad, *row_shape), dtype=dtype, device=device)
    chunks = None
    if rank == src:
        xs = x.detach().to(device)
        chunks, start = [], 0
        for c in counts:
            chunk = torch.zeros((pad, *row_shape), dtype=dtype, device=device)
            chunk[:c] = xs[start:start + c]
            chunks.append(chunk)
            start += c
    dist.scatter(buf, chunks, src=_global_rank(group, src), group=group)
    return buf[:counts[rank]]


def _gather_rows(y: Optional[torch.Tensor], problem: Optional[str], dst: int, group) -> Optional[torch.Tensor]:
    rank, size = world(group)
    desc = (int(y.shape[0]), tuple(y.shape[1:]), y.dtype) if problem is None else None
    descs = gather_objects((desc, problem), group)
    problems = [(r, p) for r, (_, p) in enumerate(descs) if p is not None]
    if problems:
        raise RuntimeError("torch_iosparse.distributed: " + "; ".join(f"rank {r}: {p}" for r, p in problems))
    shapes = {(d[1], d[2]) for d, _ in descs}
    if len(shapes) > 1:
        shown = ", ".join(f"rank {r}: rows of shape {list(d[1])} {d[2]}" for r, (d, _) in enumerate(descs))
        raise RuntimeError(f"torch_iosparse.distributed.gather_batch: the ranks' rows differ in shape or dtype "
                           f"({shown})")
    counts = [d[0] for d, _ in descs]
    row_shape, dtype = descs[0][0][1], descs[0][0][2]
    pad = max(counts)
    device = _comm_device(group)
    mine = torch.zeros((pad, *row_shape), dtype=dtype, device=device)
    mine[:counts[rank]] = y.detach().to(device)
    parts = [torch.empty_like(mine) for _ in range(size)] if rank == dst else None
    dist.gather(mine, parts, dst=_global_rank(group, dst), group=group)
    if rank != dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def gather_batch(y: torch.Tensor, dst: int = 0, group=None) -> Optional[torch.Tensor]:
    """Every rank's rows ``y`` concatenated in rank order on rank ``dst`` (the inverse of
    :func:`scatter_batch`); None on the other ranks. The ranks may hold different numbers of rows, but their
    rows must agree in shape and dtype (a RuntimeError on every rank otherwise)."""
    rank, size = world(group)
    if size == 1:
        return y
    if not isinstance(y, torch.Tensor) or y.dim() < 1:
        return _gather_rows(None, f"gather_batch needs a tensor with a batch dimension, got {_short(y)}", dst, group)
    return _gather_rows(y, None, dst, group)


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def sharded_forward(network: nn.Module, x: Optional[torch.Tensor], *, src: int = 0, dst: int = 0, group=None,
                    stats: Optional[Dict[str, float]] = None) -> Optional[torch.Tensor]:
    """Batch-sharded inference: rank ``src``'s batch ``x`` is scattered by rows, every rank runs its rows
    through its replica ``network`` (e.g. from :func:`build_replicated`), the outputs are gathered on rank
    ``dst`` (returned there; None elsewhere). The other ranks pass ``x=None``. A rank whose forward fails
    makes every rank raise. ``stats``, when given, receives this rank's ``rows`` and ``compute_s``."""
    rank, size = world(group)
    local = scatter_batch(x, src, group)
    y, problem = None, None
    t0 = time.perf_counter()
    try:
        y = network(local.to(_module_device(network)))
    except Exception as e:
        if size == 1:
            raise
        problem = f"the forward failed: {type(e).__name__}: {e}"
    if stats is not None:
        stats.update(rows=int(local.shape[0]), compute_s=time.perf_counter() - t0)
    if size == 1:
        return y
    return _gather_rows(y, problem, dst, group)


# ---------------------------------------------------------------------- layer pipeline
def split_layers(n_layers: int, n_stages: int) -> List[Tuple[int, int]]:
    """Consecutive ``(start, stop)`` layer ranges, one per pipeline stage, as even as possible (the first
    ``n_layers % n_stages`` stages one layer more), every stage at least one layer."""
    n_layers, n_stages = int(n_layers), int(n_stages)
    if n_stages < 1 or n_layers < n_stages:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages of at least one layer each")
    bounds = np.concatenate([[0], np.cumsum(split_rows(n_layers, n_stages))])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# Output tiles a pipeline stage may have sent without the next stage having received them yet.
SENDS_IN_FLIGHT = 2


def _stage_widths(stage: nn.Module) -> Tuple[Optional[int], Optional[int], Optional[str]]:
    """``(inputs, outputs, problem)`` of a stage: an IOSparseNetwork (n_inputs / n_outputs) or a module with
    in_features / out_features (nn.Linear)."""
    for a, b in (("n_inputs", "n_outputs"), ("in_features", "out_features")):
        if isinstance(getattr(stage, a, None), int) and isinstance(getattr(stage, b, None), int):
            return getattr(stage, a), getattr(stage, b), None
    return None, None, (f"a pipeline stage must have n_inputs / n_outputs (IOSparseNetwork) or in_features / "
                        f"out_features, got {type(stage).__name__}")


def _stage_dtype(stage: nn.Module) -> Optional[torch.dtype]:
    for p in stage.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


@torch.no_grad()
def pipeline_forward(stage: nn.Module, x: Optional[torch.Tensor] = None, *, microbatches: Optional[int] = None,
                     dst: int = 0, group=None, stats: Optional[Dict[str, float]] = None) -> Optional[torch.Tensor]:
    """Layer-pipeline inference: rank ``r`` of the group runs ``stage``, the ``r``-th part of the network
    (stage 0 the first layers). Rank 0 holds the batch ``x`` ``[B, n_inputs]`` (the others pass None); it
    is cut into ``microbatches`` tiles of rows (default ``2 * world_size``, at most B), each tile flows
    stage to stage with ``send`` / ``recv`` (a stage sends tile ``m`` on while it receives tile ``m + 1``),
    and the last stage's outputs, concatenated, are returned on rank ``dst`` (None elsewhere).

    Checked first, with the same RuntimeError on every rank: rank 0 has a 2-D floating batch of its stage's
    width, every stage's inputs are the previous stage's outputs (widths), and every stage holds the batch's
    dtype. ``stats``, when given, receives this rank's ``compute_s`` (time in its stage) and ``wait_s`` (time
    waiting for tiles from the previous stage)."""
    rank, size = world(group)
    n_in, n_out, problem = _stage_widths(stage)
    batch = None
    if rank == 0 and problem is None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            got = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else _short(x)
            problem = f"rank 0 must pass the batch as a 2-D floating tensor, got {got}"
        elif x.shape[1] != n_in:
            problem = f"the batch has {x.shape[1]} columns but stage 0 takes {n_in} inputs"
        else:
            batch = (int(x.shape[0]), x.dtype)
    if microbatches is not None and (not isinstance(microbatches, int) or microbatches < 1):
        problem = problem or f"microbatches must be a positive int, got {microbatches!r}"
    infos = gather_objects((n_in, n_out, _stage_dtype(stage), problem, batch), group)
    problems = [f"rank {r}: {p}" for r, (_, _, _, p, _) in enumerate(infos) if p is not None]
    for r in range(1, size):
        if infos[r][0] != infos[r - 1][1]:
            problems.append(f"stage {r} takes {infos[r][0]} inputs but stage {r - 1} gives {infos[r - 1][1]} outputs")
    if not problems:
        n_rows, dtype = infos[0][4]
        problems += [f"stage {r} holds {d} weights but the batch is {dtype}" for r, (_, _, d, _, _) in enumerate(infos)
                     if d is not None and d != dtype]
    if problems:
        raise RuntimeError("torch_iosparse.distributed.pipeline_forward: " + "; ".join(problems))
    tiles = split_rows(n_rows, max(1, min(microbatches or 2 * size, n_rows)))
    device, comm = _module_device(stage), _comm_device(group)
    prev, nxt = _global_rank(group, rank - 1) if rank > 0 else None, \
        _global_rank(group, rank + 1) if rank < size - 1 else None
    compute = wait = 0.0
    sends, outputs, start = [], [], 0
    for rows in tiles:
        if rank == 0:
            inp = x[start:start + rows]
            start += rows
        else:
            inp = torch.empty((rows, n_in), dtype=dtype, device=comm)
            t0 = time.perf_counter()
            dist.recv(inp, src=prev, group=group)
            wait += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = stage(inp.to(device))
        compute += time.perf_counter() - t0
        if nxt is not None:
            out = out.to(comm).contiguous()
            sends.append((dist.isend(out, dst=nxt, group=group), out))  # keep the tile alive until sent
            while len(sends) > SENDS_IN_FLIGHT:  # bounded memory; a slower next stage holds this one back
                sends.pop(0)[0].wait()
        else:
            outputs.append(out)
    for work, _ in sends:
        work.wait()
    if stats is not None:
        stats.update(compute_s=compute, wait_s=wait, tiles=len(tiles))
    last = size - 1
    if rank == last:
        y = torch.cat(outputs) if outputs else torch.empty((0, n_out), dtype=dtype, device=device)
        if dst == last:
            return y
        dist.send(y.to(comm).contiguous(), dst=_global_rank(group, dst), group=group)
        return None
    if rank == dst:
        y = torch.empty((n_rows, infos[last][1]), dtype=dtype, device=comm)
        dist.recv(y, src=_global_rank(group, last), group=group)
        return y.to(device)
    return None


# ---------------------------------------------------------------------- local launcher
def _local_worker(fn: Callable, rank: int, world_size: int, store: str, queue, args: tuple, threads: Optional[int],
                  backend: str, timeout: float) -> None:
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method="file://" + store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        result = fn(*args)
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable, nprocs: int, args: tuple = (), *, timeout: float = 120.0, threads: Optional[int] = 1,
              backend: str = "gloo", grace: float = 10.0) -> List[Any]:
    """Run ``fn(*args)`` in ``nprocs`` new local processes that form one process group, and return what
    each returned, in rank order.

    ``fn`` must be importable by name (a module-level function): the processes are spawned. The group meets
    through a file store in a temporary directory, so no network port is used and parallel runs never
    collide. Each process runs ``threads`` torch threads (None: torch's default). Raises RuntimeError with
    every failing rank's traceback when a rank raises (ranks still waiting for it are killed ``grace``
    seconds later), and TimeoutError when the ranks have not all finished after ``timeout`` seconds (they
    are killed: a hang fails instead of blocking)."""
    import multiprocessing
    import queue as queue_mod

    nprocs = int(nprocs)
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="torch_iosparse_dist_")
    store = os.path.join(tmp, "store")
    results: Dict[int, Tuple[bool, Any]] = {}
    q = ctx.Queue()
    procs = [ctx.Process(target=_local_worker, args=(fn, r, nprocs, store, q, tuple(args), threads, backend, timeout),
                         daemon=True) for r in range(nprocs)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        exited_at: Dict[int, float] = {}
        while len(results) < nprocs and time.monotonic() < deadline:
            try:
                rank, ok, payload = q.get(timeout=0.2)
                results[rank] = (ok, payload)
                if not ok:
                    deadline = min(deadline, time.monotonic() + grace)
                continue
            except queue_mod.Empty:
                pass
            now = time.monotonic()
            for r, p in enumerate(procs):  # died without reporting (killed, crashed in C++)?
                if r in results or p.exitcode is None:
                    continue
                if now - exited_at.setdefault(r, now) > max(grace, 5.0):  # a report would have come by now
                    results[r] = (False, f"exited with code {p.exitcode} without a result")
                    deadline = min(deadline, now + grace)
        while True:  # reports that came late replace "without a result"
            try:
                rank, ok, payload = q.get(timeout=0.1)
                results[rank] = (ok, payload)
            except queue_mod.Empty:
                break
    finally:
        for r, p in enumerate(procs):
            if r in results:  # reported: let it tear its group down
                p.join(timeout=2.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        q.close()
        shutil.rmtree(tmp, ignore_errors=True)
    failed = {r: msg for r, (ok, msg) in sorted(results.items()) if not ok}
    missing = [r for r in range(nprocs) if r not in results]
    if failed:
        text = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in failed.items())
        hung = f" (ranks {missing} were still waiting and were killed)" if missing else ""
        raise RuntimeError(f"run_local: {len(failed)} of {nprocs} ranks failed{hung}:\n{text}")
    if missing:
        raise TimeoutError(f"run_local: ranks {missing} of {nprocs} did not finish within {timeout} s (killed)")
    return [pickle.loads(results[r][1]) for r in range(nprocs)]
