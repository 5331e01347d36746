"""Annealing speed: exact move evaluations per second on ~10^5-edge networks (issue 3 target: 10^5/s).

    python benchmarks/anneal_speed.py            # radix 1024x3 fan_in 32 (98 304 edges) and more
    python benchmarks/anneal_speed.py --quick

For each network, memory M and max_shift it runs the native annealer for a fixed number of proposals
and reports evaluated moves per second, the steps replayed per evaluation (before the window, because
an earlier eviction saw it, and after, until the state re-joins), the acceptance and the I/O gained.
The capped rows reject proposals whose replay would exceed the caps, unevaluated: faster, still exact.
"""
import argparse
import time

import numpy as np

from torch_iosparse import generate
from torch_iosparse.iomodel import count_io
from torch_iosparse.planner import _annealer, _best_start
from torch_iosparse.planner_bench import pruned_mlp, random_skip_dag


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--moves", type=int, default=None)
    args = ap.parse_args()
    moves = args.moves or (3000 if args.quick else 20000)
    nets = {"radix 1024x3 f32": generate.radix_net(1024, 3, fan_in=32)}
    if not args.quick:
        nets["mlp 1024x4 97%"] = pruned_mlp([1024] * 4, 0.97)
        nets["skip DAG 30k"] = random_skip_dag(64, 30000, 3.4)
    print("| network | edges | M | start | max_shift | caps | proposals | evaluated/s | steps/eval | "
          "accepted | io before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dag in nets.items():
        Ms = [64, 256] if not args.quick else [64]
        for M in Ms:
            for start in ("two_optimal", "best"):
                if start == "best":
                    order = _best_start(dag, M)[1]
                else:
                    order = np.arange(dag.n_inputs, dag.n_neurons)
                for shift, caps in ((32, (-1, -1)), (4, (-1, -1)), (4, (8, 16))):
                    ann = _annealer(dag, order, M, 0, 1 << 24)
                    before = ann.cost()
                    d = ann.sample_deltas(100, shift).numpy()
                    up = d[d > 0]
                    t = 0.3 * float(up.mean()) if up.size else 1.0
                    t0 = time.perf_counter()
                    st = ann.run(moves, t, 0.01 * t, shift, *caps).tolist()
                    dt = time.perf_counter() - t0
                    fixed = dag.n_edges + dag.n_computed
                    io = count_io(dag, ann.order().numpy(), M)
                    assert io.total == st[4] + fixed, "annealer disagrees with the exact simulator"
                    print(f"| {name} | {dag.n_edges} | {M} | {start} | {shift} | {caps if caps[0] >= 0 else 'none'} | "
                          f"{moves} | {st[0] / dt:,.0f} | {st[6] / max(st[0], 1):.1f} | {st[1]} | "
                          f"{before + fixed} -> {st[4] + fixed} |", flush=True)


if __name__ == "__main__":
    main()
