"""Block path parameters on the pruned MLP 4096-4096-4096-1024 (docs/cpu-kernel.md, "The block path"):
time of the forced block strategy for several block sizes (consecutive source neurons per block) and
chunk sizes (edges per unit of parallel work), each beside torch.sparse CSR layer by layer in the same
interleaved rounds.

    python benchmarks/block_sweep.py [--threads 1] [--batch 64] [--sparsity 0.9]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cpu_speed  # noqa: E402
from torch_iosparse import ops  # noqa: E402
from torch_iosparse.backends.cpu import hardware


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 4096, 4096, 1024])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dag = cpu_speed.pruned_mlp(args.sizes, args.sparsity)
    net = ops.prepare(dag)
    csr = cpu_speed.LevelCSR(dag)
    x = torch.rand(args.batch, dag.n_inputs)
    print(f"MLP {'-'.join(map(str, args.sizes))} {args.sparsity:.0%}, B={args.batch}, "
          f"{torch.get_num_threads()} threads, {dag.n_edges:,} edges")
    print("| block sources | chunk edges | segments | edges/segment | ours ms | torch CSR ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    configs = [(s, ops.BLOCK_CHUNK_EDGES) for s in (64, 128, 192, 256)] + \
        [(hardware.block_sources(), c) for c in (1 << 14, 1 << 18)]
    for sources, chunk in configs:
        bufs = dict(net.buffers, **ops.block_buffers(net.buffers, block_sources=sources, chunk_edges=chunk))
        meta = dict(net.meta, strategy=ops.STRATEGIES["block"])
        ours = lambda x, bufs=bufs, meta=meta: ops.dag_forward(x, dag.weight, dag.bias, bufs, meta)  # noqa: E731
        torch.testing.assert_close(ours(x), csr.torch_forward(x), rtol=1e-3, atol=1e-3)
        t = cpu_speed.time_side_by_side({"ours": ours, "csr": csr.torch_forward}, x, args.rounds)
        segs = bufs["block_seg"].numel() // 3
        print(f"| {sources} | {chunk} | {segs:,} | {dag.n_edges / segs:.1f} | {t['ours'] * 1e3:.2f} | "
              f"{t['csr'] * 1e3:.2f} | {t['csr'] / t['ours']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
