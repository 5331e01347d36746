"""Sparse DNN Graph Challenge-style check: RadiX-Net networks on binarised digits (no download).

    python benchmarks/sdgc.py                       # widths 1024 and 4096, 6 layers, 256 inputs
    python benchmarks/sdgc.py --widths 1024 --depth 24 --batch 1024

Validates ``SparseDAG.forward_reference`` against a scipy.sparse layer-by-layer reference (the
challenge's own formulation, Y = min(max(Y W + b, 0), 32)) and reports the challenge metric,
inputs × edges / second, for both, plus the challenge's "categories" (inputs with a nonzero output row).
"""
import argparse
import time

import torch

from torch_iosparse import generate


def timed(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--fan-in", type=int, default=32)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print("| width | layers | edges | inputs | categories | max abs diff | forward_reference inputs·edges/s | "
          "scipy inputs·edges/s |")
    print("|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        dag = generate.radix_net(width, args.depth, fan_in=args.fan_in, seed=0)
        x = generate.challenge_inputs(width, args.batch, seed=0)
        t_ref, y = timed(lambda: dag.forward_reference(x))
        t_sp, y_sp = timed(lambda: generate.scipy_reference(dag, x))
        diff = float((y - y_sp).abs().max())
        if diff > 1e-4 * max(1.0, float(y_sp.abs().max())):
            raise SystemExit(f"forward_reference disagrees with scipy by {diff}")
        cats = int((y.abs().sum(1) > 0).sum())
        work = args.batch * dag.n_edges
        print(f"| {width} | {args.depth} | {dag.n_edges} | {args.batch} | {cats} | {diff:.1e} | "
              f"{work / t_ref:.3e} | {work / t_sp:.3e} |", flush=True)


if __name__ == "__main__":
    main()
