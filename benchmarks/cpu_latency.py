"""Per-call latency of the op on the pruned MLP 4096-4096-4096-1024 beyond best-of-N timings
(docs/cpu-kernel.md, "Threads for every path" and "Known limits"):

* ``--flush-mb N``: best time with warm weights vs after touching N MiB between calls (cold weights;
  512 MiB evicts this VM's large L3).
* ``--hog``: median and 90th percentile of 30 calls of ours and of torch CSR while a busy-loop process
  competes for a core. Run once as is (torch's OpenMP threads) and once with ``IOSPARSE_WORKERS=pool``.

    python benchmarks/cpu_latency.py --threads 1 --sparsity 0.95 --batch 1 --flush-mb 512
    python benchmarks/cpu_latency.py --hog --sparsity 0.95 --batch 1 64
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cpu_speed  # noqa: E402
from torch_iosparse import ops  # noqa: E402


def best_ms(f, flush=None, repeats=20):
    f()
    best = float("inf")
    for _ in range(repeats):
        if flush is not None:
            flush.add_(1)
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def percentiles_ms(f, calls=30):
    f()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3, ts[int(0.9 * len(ts))] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--flush-mb", type=int, default=0, help="MiB touched between calls (0: warm only)")
    ap.add_argument("--hog", action="store_true", help="a busy-loop process competes for a core")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dag = cpu_speed.pruned_mlp([4096, 4096, 4096, 1024], args.sparsity)
    net = ops.prepare(dag)
    csr = cpu_speed.LevelCSR(dag)
    workers = os.environ.get("IOSPARSE_WORKERS", "omp")
    print(f"MLP 4096-4096-4096-1024 {args.sparsity:.0%}, {torch.get_num_threads()} threads, workers={workers}")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
    try:
        for B in args.batch:
            x = torch.rand(B, dag.n_inputs)
            ours = lambda: ops.dag_forward(x, dag.weight, dag.bias, net.buffers, net.meta)  # noqa: E731
            if args.hog:
                om, op = percentiles_ms(ours)
                cm, cp = percentiles_ms(lambda: csr.torch_forward(x))
                print(f"B={B}: ours median {om:.2f} ms, p90 {op:.2f} ms; torch CSR median {cm:.2f} ms, p90 {cp:.2f} ms")
            else:
                warm = best_ms(ours)
                line = f"B={B}: warm {warm:.3f} ms"
                if args.flush_mb:
                    junk = torch.ones(args.flush_mb << 18)
                    line += f", cold ({args.flush_mb} MiB touched between calls) {best_ms(ours, junk):.3f} ms"
                print(line, flush=True)
    finally:
        if hog is not None:
            hog.kill()


if __name__ == "__main__":
    main()
