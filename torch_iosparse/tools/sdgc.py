"""Sparse DNN Graph Challenge-style inference: RadiX-Net networks on binarised digits, one process or many.

    python -m torch_iosparse.tools.sdgc --width 1024 --depth 24 --batch 2048 --check
    torchrun --standalone --nproc_per_node 2 -m torch_iosparse.tools.sdgc --width 1024 --depth 24 --batch 2048 --check
    torchrun --standalone --nproc_per_node 2 -m torch_iosparse.tools.sdgc --width 1024 --depth 24 --batch 2048 --pipeline 2

Without ``--pipeline`` (or ``--pipeline 1``) the batch is sharded: every rank holds the whole network
(planned once, on rank 0), rank 0 scatters the inputs by rows and gathers the outputs. ``--pipeline N``
(N = the number of processes) splits the layers: rank r builds and holds only its stage, and micro-batches
flow from stage to stage (docs/distributed.md). Rank 0 prints the challenge metric, inputs x edges / second,
per rank (its rows, or its layers, over its compute time) and in total (the whole batch over the wall time
of one distributed inference, communication included). Without torchrun it runs in one process.

``--check`` compares the single-process run (this network in one process, on rank 0) with the challenge's
own scipy.sparse formulation, and the gathered output with the single-process run; the command exits 1 on
every rank when either differs. In pipeline mode the check builds the whole network on rank 0.

:func:`reference_table` is the one-process comparison of ``benchmarks/sdgc.py`` (pure-PyTorch reference,
scipy and ``IOSparseNetwork``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..nn import distributed
from ..graph import generate
from ..nn.module import IOSparseNetwork

# float32 results of different summation orders (another plan, kernel path or stage split) agree to a few
# units in the last place per layer; outputs are capped at 32, so this bound is far above rounding and far
# below any real error (a wrong edge or bias moves an output by at least 1/16 - 0.45).
CHECK_TOLERANCE = 1e-4


def timed(fn: Callable, repeat: int = 3):
    """``(best seconds, last result)`` of ``repeat`` calls of ``fn``."""
    best, out = float("inf"), None
    for _ in range(max(1, int(repeat))):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def categories(y: torch.Tensor) -> int:
    """The challenge's categories: how many inputs have a nonzero output row."""
    return int((y.abs().sum(1) > 0).sum())


def max_difference(y: torch.Tensor, reference: torch.Tensor) -> Tuple[float, bool]:
    """``(max abs difference, within CHECK_TOLERANCE of the reference's scale)``."""
    if y.shape != reference.shape:
        return float("inf"), False
    diff = float((y.double() - reference.double()).abs().max()) if y.numel() else 0.0
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return diff, diff <= CHECK_TOLERANCE * scale


# ---------------------------------------------------------------------- one process: the reference table
def reference_rows(widths: Sequence[int], depth: int, batch: int, fan_in: int = 32, repeat: int = 3):
    """For each width: the RadiX-Net, the challenge inputs, and the metric of ``forward_reference`` (pure
    PyTorch), the scipy.sparse layer-by-layer reference (the challenge's formulation) and ``IOSparseNetwork``;
    raises RuntimeError when an output differs from scipy's. Yields one dict per width."""
    for width in widths:
        dag = generate.radix_net(width, depth, fan_in=fan_in, seed=0)
        x = generate.challenge_inputs(width, batch, seed=0)
        net = IOSparseNetwork(dag)
        t_sp, y_sp = timed(lambda: generate.scipy_reference(dag, x), repeat)
        t_ref, y_ref = timed(lambda: dag.forward_reference(x), repeat)
        with torch.no_grad():
            net(x)  # first call: tuning, if on
            t_net, y_net = timed(lambda: net(x), repeat)
        diffs = {}
        for name, y in (("forward_reference", y_ref), ("IOSparseNetwork", y_net)):
            diffs[name], ok = max_difference(y, y_sp)
            if not ok:
                raise RuntimeError(f"{name} disagrees with the scipy reference by {diffs[name]} (width {width})")
        work = batch * dag.n_edges
        yield {"width": width, "depth": depth, "edges": dag.n_edges, "inputs": batch, "categories": categories(y_sp),
               "max_diff": max(diffs.values()), "forward_reference": work / t_ref, "scipy": work / t_sp,
               "IOSparseNetwork": work / t_net}


def reference_table(widths: Sequence[int], depth: int, batch: int, fan_in: int = 32, repeat: int = 3,
                    out=None) -> None:
    """Print :func:`reference_rows` as a markdown table to ``out`` (default sys.stdout), one row per width
    as soon as it is measured."""
    out = sys.stdout if out is None else out
    print(f"torch threads: {torch.get_num_threads()}", file=out)
    print("| width | layers | edges | inputs | categories | max abs diff | forward_reference inputs·edges/s | "
          "scipy inputs·edges/s | IOSparseNetwork inputs·edges/s |", file=out)
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    for r in reference_rows(widths, depth, batch, fan_in, repeat):
        print(f"| {r['width']} | {r['depth']} | {r['edges']} | {r['inputs']} | {r['categories']} | "
              f"{r['max_diff']:.1e} | {r['forward_reference']:.3e} | {r['scipy']:.3e} | "
              f"{r['IOSparseNetwork']:.3e} |", file=out, flush=True)


# ---------------------------------------------------------------------- one or many processes
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m torch_iosparse.tools.sdgc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024, help="neurons per layer (default 1024)")
    ap.add_argument("--depth", type=int, default=24, help="layers (default 24)")
    ap.add_argument("--batch", type=int, default=2048, help="inputs (default 2048)")
    ap.add_argument("--fan-in", type=int, default=32, help="edges into each neuron (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the network and of the inputs")
    ap.add_argument("--pipeline", type=int, default=1,
                    help="1: shard the batch over all processes; N = the number of processes: split the layers")
    ap.add_argument("--microbatches", type=int, default=None,
                    help="pipeline micro-batches (default 2 x the number of stages)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    ap.add_argument("--memory", type=_memory, default="auto",
                    help="fast-memory slots M of the plan: auto (default), unbounded or a number")
    ap.add_argument("--method", default="two_optimal", help="planning method (default two_optimal)")
    ap.add_argument("--check", action="store_true",
                    help="compare with a single-process run and the scipy reference; exit 1 if they differ")
    return ap


def _memory(text: str):
    """``--memory``: ``auto``, ``unbounded`` / ``inf``, or a number of slots."""
    if text.lower() in ("auto", "unbounded", "inf"):
        return text.lower()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, unbounded or a number of slots, got {text!r}") from None


def _init_from_environment() -> bool:
    """Join the group torchrun describes (RANK / WORLD_SIZE / MASTER_ADDR in the environment); gloo on CPU.
    Returns whether this call initialised it."""
    if dist.is_initialized() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    dist.init_process_group("gloo")
    return True


def run(argv: Optional[Sequence[str]] = None, *, quiet: bool = False) -> Dict:
    """Run the command (see the module docstring) and return its numbers: ``mode``, ``world_size``,
    ``edges``, ``batch``, ``ranks`` (per rank: ``inputs``, ``edges``, ``layers``, ``seconds``, ``rate``),
    ``wall_s``, ``rate`` (inputs·edges/s in total) and, with ``--check``, ``check`` (``ok``, the max
    differences). Rank 0 prints the table unless ``quiet``. Raises RuntimeError (on every rank) when the
    ranks were started with different arguments or ``--pipeline`` is neither 1 nor the world size."""
    args = parser().parse_args(argv)
    for name in ("width", "depth", "batch", "fan_in", "pipeline", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, size = distributed.world()
    distributed.check_consensus(sorted(vars(args).items()), "the command-line arguments")
    if args.pipeline not in (1, size):
        raise RuntimeError(f"--pipeline {args.pipeline} needs {args.pipeline} processes (one stage each), "
                           f"but {size} were started; use --pipeline 1 to shard the batch instead")
    memory = args.memory
    x = generate.challenge_inputs(args.width, args.batch, seed=args.seed) if rank == 0 else None
    net_args = dict(fan_in=args.fan_in, seed=args.seed)
    pipeline = args.pipeline > 1
    if pipeline:
        layers = distributed.split_layers(args.depth, size)[rank]
        part = generate.radix_net(args.width, args.depth, layers=layers, **net_args)
        net = IOSparseNetwork(part, memory=memory, method=args.method)

        def once(stats):
            return distributed.pipeline_forward(net, x, microbatches=args.microbatches, stats=stats)
    else:
        layers = (0, args.depth)
        part = generate.radix_net(args.width, args.depth, **net_args)
        net = distributed.build_replicated(part, memory=memory, method=args.method)

        def once(stats):
            return distributed.sharded_forward(net, x, stats=stats)
    total_edges = sum(distributed.gather_objects(part.n_edges)) if pipeline else part.n_edges
    once({})  # warm-up: first-call tuning, page faults
    best_wall, best_compute, y = float("inf"), float("inf"), None
    for _ in range(args.repeat):
        stats: Dict[str, float] = {}
        if size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        y = once(stats)
        wall = time.perf_counter() - t0
        best_wall, best_compute = min(best_wall, wall), min(best_compute, stats["compute_s"])
    rows = args.batch if pipeline else distributed.split_rows(args.batch, size)[rank]
    mine = {"inputs": rows, "edges": part.n_edges, "layers": layers, "seconds": best_compute,
            "rate": rows * part.n_edges / best_compute if best_compute > 0 else float("inf")}
    walls = distributed.gather_objects(best_wall)
    result = {"mode": "pipeline" if pipeline else "sharded", "world_size": size, "edges": total_edges,
              "batch": args.batch, "ranks": distributed.gather_objects(mine), "wall_s": max(walls),
              "threads": torch.get_num_threads(), "width": args.width, "depth": args.depth}
    result["rate"] = args.batch * total_edges / result["wall_s"]
    if args.check:
        result["check"] = _check(args, y, net if not pipeline else None, memory, x)
    if rank == 0 and not quiet:
        print(_report(result, args), flush=True)
    return result


def _check(args, y: Optional[torch.Tensor], replica: Optional[IOSparseNetwork], memory, x) -> Dict:
    """Rank 0 runs the whole network in this one process and compares; the verdict goes to every rank."""
    rank, size = distributed.world()
    verdict = None
    if rank == 0:
        try:
            if replica is None:  # pipeline: the whole network exists nowhere else
                full = generate.radix_net(args.width, args.depth, fan_in=args.fan_in, seed=args.seed)
                replica = IOSparseNetwork(full, memory=memory, method=args.method)
            with torch.no_grad():
                single = replica(x)
            diff_sp, ok_sp = max_difference(single, generate.scipy_reference(replica.to_dag(), x))
            diff, ok = max_difference(y, single) if size > 1 else (0.0, True)
            verdict = {"ok": ok and ok_sp, "max_diff": diff, "max_diff_scipy": diff_sp,
                       "categories": categories(single), "categories_equal": categories(y) == categories(single)}
        except Exception as e:  # reported on every rank instead of leaving them in the broadcast
            verdict = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if size > 1:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    return verdict


def _report(r: Dict, args) -> str:
    mode = (f"layer pipeline over {r['world_size']} processes, {args.microbatches or 2 * r['world_size']} "
            f"micro-batches" if r["mode"] == "pipeline" else
            f"batch sharded over {r['world_size']} processes" if r["world_size"] > 1 else "one process")
    backend = f" ({dist.get_backend()})" if dist.is_initialized() else ""
    lines = [f"sdgc: RadiX-Net width {r['width']}, {r['depth']} layers, fan-in {args.fan_in}: {r['edges']:,} edges; "
             f"{r['batch']} inputs; {mode}{backend}, {r['threads']} torch thread(s) each",
             "| rank | layers | inputs | edges | seconds | inputs·edges/s |", "|---|---|---|---|---|---|"]
    for i, p in enumerate(r["ranks"]):
        a, b = p["layers"]
        lines.append(f"| {i} | {a + 1}-{b} | {p['inputs']} | {p['edges']:,} | {p['seconds']:.4f} | {p['rate']:.3e} |")
    lines.append(f"| total | 1-{r['depth']} | {r['batch']} | {r['edges']:,} | {r['wall_s']:.4f} (wall) | "
                 f"{r['rate']:.3e} |")
    c = r.get("check")
    if c is not None:
        if "error" in c:
            lines.append(f"check FAILED: {c['error']}")
        else:
            gathered = f"the gathered output vs the single-process run: max abs diff {c['max_diff']:.1e}; " \
                if r["world_size"] > 1 else ""
            lines.append(f"check {'passed' if c['ok'] else 'FAILED'}: {gathered}"
                         f"single-process run vs scipy reference: {c['max_diff_scipy']:.1e} (tolerance "
                         f"{CHECK_TOLERANCE:g} x max(1, |output|)); categories {c['categories']}"
                         f"{'' if c['categories_equal'] else ' (differ!)'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command: exit status 0, 1 when ``--check`` fails or the ranks disagree (on every rank)."""
    initialised = _init_from_environment()
    try:
        result = run(argv)
        return 0 if result.get("check", {"ok": True})["ok"] else 1
    except (RuntimeError, ValueError) as e:
        print(f"sdgc: error on rank {distributed.world()[0]}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if initialised:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
