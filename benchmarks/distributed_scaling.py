"""Scaling of the challenge inference over processes: 1 process against N processes (1 torch thread each) in
the batch-sharded and the layer-pipeline modes of ``torch_iosparse.tools.sdgc`` (docs/distributed.md), one
markdown table naming the machine.

    python benchmarks/distributed_scaling.py                     # width 1024, 24 layers, 2048 inputs, 1 vs 2
    python benchmarks/distributed_scaling.py --processes 1 2 4 --microbatches 8
    python benchmarks/distributed_scaling.py --smoke             # tiny network, one run each: checks, no timing

Every configuration runs in its own local gloo group (``distributed.run_local``) with ``sdgc.run``, the
command's own code, and is checked against the single-process run (``--check``) before its time counts.
Configurations are measured in ``--rounds`` interleaved rounds (best of all), so load from other processes
hits them alike. Wall = one distributed inference of the whole batch, scatter / stage transfers / gather
included; the rate is inputs x edges / wall. Run it on a quiet machine: with N processes on N cores any other
process takes a core away from a rank.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anchors  # noqa: E402  (benchmarks/anchors.py: the machine)

from torch_iosparse import distributed  # noqa: E402
from torch_iosparse.backends.cpu import hardware
from torch_iosparse.tools import sdgc


def machine_line(backend: str = "gloo") -> str:
    info = hardware.detect()
    return (f"machine: {anchors.cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs; ISA {info.isa}; "
            f"L1d {info.l1d_bytes >> 10} KiB, L2 {info.l2_bytes >> 10} KiB/core, L3 {info.l3_bytes >> 20} MiB; "
            f"torch {torch.__version__}, {backend}; 1 torch thread per process")


def configurations(processes, microbatches):
    """``(label, processes, extra sdgc arguments)``: one process first (the baseline of both modes)."""
    out = [("one process", 1, [])]
    for n in processes:
        if n > 1:
            out.append(("batch sharded", n, []))
            mb = microbatches or 2 * n
            out.append((f"layer pipeline ({mb} micro-batches)", n, ["--pipeline", str(n), "--microbatches", str(mb)]))
    return out


def measure(argv, n: int, timeout: float):
    """rank 0's result of ``sdgc.run(argv)`` on ``n`` local processes (1 thread each)."""
    run = functools.partial(sdgc.run, quiet=True)
    results = distributed.run_local(run, n, (argv,), timeout=timeout, threads=1)
    r = results[0]
    if not r["check"]["ok"]:
        raise SystemExit(f"{argv} on {n} processes: the output differs from the single-process run: {r['check']}")
    return r


def table(best, args) -> str:
    base = best["one process"]
    lines = [machine_line(), "",
             f"RadiX-Net width {args.width}, {args.depth} layers, fan-in {args.fan_in}: {base['edges']:,} edges; "
             f"{args.batch} inputs; best of {args.repeat} runs x {args.rounds} round(s) per configuration", "",
             "| processes | mode | wall ms | inputs·edges/s | speed-up vs 1 process | efficiency | "
             "slowest rank's compute ms | edges held per rank (max) |", "|---|---|---|---|---|---|---|---|"]
    for label, r in best.items():
        n = r["world_size"]
        speedup = base["wall_s"] / r["wall_s"]
        compute = max(p["seconds"] for p in r["ranks"])
        held = max(p["edges"] for p in r["ranks"])
        lines.append(f"| {n} | {label} | {r['wall_s'] * 1e3:.2f} | {r['rate']:.3e} | {speedup:.2f}x | "
                     f"{speedup / n:.0%} | {compute * 1e3:.2f} | {held:,} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--fan-in", type=int, default=32)
    ap.add_argument("--processes", type=int, nargs="+", default=[2], help="process counts beside 1 (default 2)")
    ap.add_argument("--microbatches", type=int, default=None, help="pipeline micro-batches (default 2 x processes)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs inside each group (best counts)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the configurations")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per group before it is killed")
    ap.add_argument("--smoke", action="store_true", help="width 64, 4 layers, 32 inputs, one run: a check only")
    args = ap.parse_args()
    if args.smoke:
        args.width, args.depth, args.batch, args.repeat, args.rounds = 64, 4, 32, 1, 1
    common = ["--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch),
              "--fan-in", str(args.fan_in), "--repeat", str(args.repeat), "--check"]
    best = {}
    for _ in range(args.rounds):
        for label, n, extra in configurations(args.processes, args.microbatches):
            r = measure(common + extra, n, args.timeout)
            if label not in best or r["wall_s"] < best[label]["wall_s"]:
                best[label] = r
            print(f"{label}, {n} process(es): {r['wall_s'] * 1e3:.2f} ms", file=sys.stderr, flush=True)
    print(table(best, args))


if __name__ == "__main__":
    main()
