"""Forward and forward + backward of one sparsified MLP (no optimizer), in thread CPU time, beside the masked
dense model: the measurement behind the block backward's figures in RESULTS.md and docs/cpu-kernel.md.

    python benchmarks/backward_speed.py                                  # 90 %, B = 64, 1 thread
    IOSPARSE_ISA=generic python benchmarks/backward_speed.py             # the generic build of the same paths
    IOSPARSE_BACKWARD_TILE=2 python benchmarks/backward_speed.py         # the block backward's tile capped at 32 columns

Best of ``--rounds`` calls of ``time.thread_time`` (the calling thread's CPU time: with 1 thread, other
processes on the second core do not count).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch_iosparse as tis  # noqa: E402
from train_speed import machine_line, masked_mlp  # noqa: E402


def best_thread_ms(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 2048, 2048, 512])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense = masked_mlp(args.sizes, args.sparsity)
    sparse = tis.sparsify(dense, verbose=False)
    x = torch.randn(args.batch, args.sizes[0])
    xr = x.clone().requires_grad_()

    def forward(model):
        with torch.no_grad():
            model(x)

    def forward_backward(model):
        model(xr).sum().backward()

    print(machine_line(args.threads))
    print(f"MLP {'-'.join(map(str, args.sizes))} at {args.sparsity:.0%}, B = {args.batch}, "
          f"IOSPARSE_ISA={os.environ.get('IOSPARSE_ISA', '')!r}, "
          f"IOSPARSE_BACKWARD_TILE={os.environ.get('IOSPARSE_BACKWARD_TILE', '')!r}; best of {args.rounds}, ms")
    for name, model in (("torch_iosparse", sparse), ("masked dense", dense)):
        f, fb = best_thread_ms(lambda: forward(model), args.rounds), best_thread_ms(lambda: forward_backward(model),
                                                                                   args.rounds)
        print(f"{name:15s} forward {f:7.2f}  forward + backward {fb:7.2f}  backward {fb - f:7.2f}")


if __name__ == "__main__":
    main()
