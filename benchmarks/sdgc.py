"""Sparse DNN Graph Challenge-style check: RadiX-Net networks on binarised digits (no download).

    python benchmarks/sdgc.py                       # widths 1024 and 4096, 6 layers, 256 inputs
    python benchmarks/sdgc.py --widths 1024 --depth 24 --batch 1024

Validates ``SparseDAG.forward_reference`` and ``IOSparseNetwork`` against a scipy.sparse layer-by-layer
reference (the challenge's own formulation, Y = min(max(Y W + b, 0), 32)) and reports the challenge metric,
inputs × edges / second, for the three, plus the challenge's "categories" (inputs with a nonzero output row).
The measurement lives in ``torch_iosparse.tools.sdgc`` (``reference_table``); the same module runs the challenge
on many processes: ``torchrun --nproc_per_node 2 -m torch_iosparse.tools.sdgc --check`` (docs/distributed.md).
"""
import argparse

from torch_iosparse.tools import sdgc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--fan-in", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        sdgc.reference_table(args.widths, args.depth, args.batch, args.fan_in, args.repeat)
    except RuntimeError as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
