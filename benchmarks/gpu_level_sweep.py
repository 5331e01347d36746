"""Tile sweep of the Triton level kernels on a GPU, to tune their defaults: the source-sharing block
kernel (neurons per block R, distinct sources per chunk UC, batch tile BT) and the row-blocked kernel,
beside torch CSR, on a radix net.

    python benchmarks/gpu_level_sweep.py [--width 16384] [--batches 1 64 256 1024]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_speed as gs  # noqa: E402
from torch_iosparse.backends.cuda import triton_kernels as tk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--block-rows", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--block-chunks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--tiles", type=int, nargs="+", default=[16, 32, 64])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    dev = torch.device("cuda")
    dag = gs.radix_like(args.width, args.depth)
    w, b = dag.weight.to(dev), dag.bias.to(dev)
    csr = gs.CSRLayers(dag, dev, torch.float32)
    lv = tk.encode_levels_from_dag(dag, dev)  # default blocks
    encoded = {}
    for R in args.block_rows:
        for UC in args.block_chunks:
            if R * UC <= 1024:
                encoded[(R, UC)] = tk.encode_levels(lv.in_ptr, lv.in_src, lv.level_ptr, lv.level_neuron, lv.act_code,
                                                    lv.act_lo, lv.act_hi, lv.outputs, lv.n_inputs, dev,
                                                    block_rows=R, block_chunk=UC)
    print(f"radix N={args.width} depth {args.depth}, edges {dag.n_edges}, reuse per layer at the default blocks "
          f"{[round(r, 1) for *_, r in lv.seg_blocks]}; ms (median, CUDA events)")
    print("| B | kernel | BT | R | UC | ms | G edge*batch/s |")
    print("|---|---|---|---|---|---|---|")
    for B in args.batches:
        x = torch.randn(B, dag.n_inputs, device=dev)
        ref = csr(x)
        t_csr = gs.time_cuda(lambda: csr(x))
        t_rows = gs.time_cuda(lambda: tk.level_forward(x, w, b, lv, blocks=False), budget_s=1.0)
        print(f"| {B} | torch CSR | | | | {t_csr:.3f} | {dag.n_edges * B / t_csr / 1e6:.1f} |")
        print(f"| {B} | rows (default tiles) | | | | {t_rows:.3f} | {dag.n_edges * B / t_rows / 1e6:.1f} |")
        best = (float("inf"), None)
        for BT in ([1] if B == 1 else args.tiles):
            for (R, UC), lp in encoded.items():
                if R * UC * BT > 65536:
                    continue
                y = tk.level_forward(x, w, b, lp, batch_tile=BT)  # auto: the dot form where R, UC, BT >= 16
                if gs.max_rel_err(y, ref) > 1e-4:
                    sys.exit(f"FAILED B={B} BT={BT} R={R} UC={UC}")
                t = gs.time_cuda(lambda: tk.level_forward(x, w, b, lp, batch_tile=BT), budget_s=0.5)
                best = min(best, (t, (BT, R, UC)))
                print(f"| {B} | blocks | {BT} | {R} | {UC} | {t:.3f} | {dag.n_edges * B / t / 1e6:.1f} |")
        print(f"| {B} | best blocks {best[1]} | | | | {best[0]:.3f} | CSR / best = {t_csr / best[0]:.2f}, "
              f"rows / best = {t_rows / best[0]:.2f} |")


if __name__ == "__main__":
    main()
