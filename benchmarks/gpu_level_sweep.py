"""Tile sweep of the row-blocked Triton level kernel on a GPU: rows per program R and batch tile BT,
beside the automatic choice (triton_kernels.level_rows) and torch CSR, to tune the heuristic.

    python benchmarks/gpu_level_sweep.py [--width 16384] [--batches 1 64 256 1024]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_speed as gs  # noqa: E402
from torch_iosparse import triton_kernels as tk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 16, 64])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    dev = torch.device("cuda")
    dag = gs.radix_like(args.width, args.depth)
    lp = tk.encode_levels_from_dag(dag, dev)
    w, b = dag.weight.to(dev), dag.bias.to(dev)
    csr = gs.CSRLayers(dag, dev, torch.float32)
    print(f"radix N={args.width} depth {args.depth}, edges {dag.n_edges}; ms (median, CUDA events)")
    print("| B | BT | R | level rows ms | G edge*batch/s |")
    print("|---|---|---|---|---|")
    for B in args.batches:
        x = torch.randn(B, dag.n_inputs, device=dev)
        ref = csr(x)
        t_csr = gs.time_cuda(lambda: csr(x))
        best = (float("inf"), None)
        for BT in args.tiles:
            if BT > max(1, tk._pow2_at_least(B)):
                continue
            for R in [None] + args.rows:
                if R is not None and R * BT * 32 > 16384:
                    continue
                y = tk.level_forward(x, w, b, lp, batch_tile=BT, rows_per_program=R)
                if gs.max_rel_err(y, ref) > 1e-4:
                    sys.exit(f"FAILED B={B} BT={BT} R={R}")
                t = gs.time_cuda(lambda: tk.level_forward(x, w, b, lp, batch_tile=BT, rows_per_program=R),
                                 budget_s=1.0)
                best = min(best, (t, (BT, R)))
                print(f"| {B} | {BT} | {'auto' if R is None else R} | {t:.3f} | {dag.n_edges * B / t / 1e6:.1f} |")
        print(f"| {B} | best {best[1]} | | {best[0]:.3f} | torch CSR {t_csr:.3f} ms, ratio {t_csr / best[0]:.2f} |")


if __name__ == "__main__":
    main()
