"""Annealing speed: exact move evaluations per second on ~10^5-edge networks (issue 3 target: 10^5/s).

    python benchmarks/anneal_speed.py            # radix 1024x3 fan_in 32 (98 304 edges) and more
    python benchmarks/anneal_speed.py --quick --seconds 2
    python benchmarks/anneal_speed.py --seconds 2 --repeats 3   # median of 3 runs per configuration
    python benchmarks/anneal_speed.py --seconds 1.5 --repeats 3 --nets skip --memories 64 --configs 1:none,2:none,4:none
    python benchmarks/anneal_speed.py --nets skip,radix,mlp --memories 64 --quality 1,2,4,16,64 --seconds 5

For each network, memory M and max_shift it runs the native annealer (constant temperature 0.1 x the
mean uphill delta) for a fixed time and reports evaluated moves per second (the median over --repeats
runs, each from the same start: the machine is shared, single runs are noisy), the steps replayed per
evaluation (all of them, and those before the window, replayed because an earlier eviction decision may
change), the acceptance and the I/O gained. The capped rows reject proposals whose replay would exceed
the caps, unevaluated: faster, still exact. --configs picks the (max_shift, caps) rows; --quality runs
the full annealer (default schedule, time budget --seconds) per max_shift and reports the I/O reached.
"""
import argparse
import time

import numpy as np

from torch_iosparse import generate
from torch_iosparse.cost.iomodel import count_io
from torch_iosparse.planning.heuristics import _annealer, _best_start, anneal_order
from torch_iosparse.testing.planner_bench import pruned_mlp, random_skip_dag


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=None, help="annealing time per configuration and run")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration; the median rate is shown")
    ap.add_argument("--nets", default=None, help="comma-separated subset of: radix, mlp, skip (default: all; "
                    "--quick: radix)")
    ap.add_argument("--memories", default=None, help="comma-separated M values (default 64,256; --quick: 64)")
    ap.add_argument("--starts", default="two_optimal,best", help="comma-separated: two_optimal, best")
    ap.add_argument("--configs", default="32:none,4:none,4:8/16",
                    help="comma-separated max_shift:caps, caps = none or back/forward (default %(default)s)")
    ap.add_argument("--quality", default=None, metavar="SHIFTS",
                    help="instead of rates at constant temperature: run plan(method='anneal') for --seconds with "
                         "each comma-separated max_shift and report the I/O reached (annealing quality vs move set)")
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    wanted = (args.nets or ("radix" if args.quick else "radix,mlp,skip")).split(",")
    builders = {"radix": ("radix 1024x3 f32", lambda: generate.radix_net(1024, 3, fan_in=32)),
                "mlp": ("mlp 1024x4 97%", lambda: pruned_mlp([1024] * 4, 0.97)),
                "skip": ("skip DAG 30k", lambda: random_skip_dag(64, 30000, 3.4))}
    nets = {builders[w][0]: builders[w][1]() for w in wanted}
    Ms = [int(m) for m in (args.memories or ("64" if args.quick else "64,256")).split(",")]
    configs = []
    for c in args.configs.split(","):
        shift, caps = c.split(":")
        configs.append((int(shift), (-1, -1) if caps == "none" else tuple(int(x) for x in caps.split("/"))))
    if args.quality:
        return quality(nets, Ms, [int(k) for k in args.quality.split(",")], seconds, args.repeats)
    print("| network | edges | M | start | max_shift | caps | proposals | evaluated/s | steps/eval | "
          "back/eval | accepted | io before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dag in nets.items():
        for M in Ms:
            for start in args.starts.split(","):
                if start == "best":
                    order = _best_start(dag, M)[1]
                else:
                    order = np.arange(dag.n_inputs, dag.n_neurons)
                for shift, caps in configs:
                    rates = []
                    for _ in range(max(1, args.repeats)):
                        ann = _annealer(dag, order, M, 0, 1 << 24)
                        before = ann.cost()
                        d = ann.sample_deltas(100, shift).numpy()
                        up = d[d > 0]
                        t = 0.1 * float(up.mean()) if up.size else 1.0
                        t0 = time.perf_counter()
                        moves, evaluated, accepted, steps, back, chunk = 0, 0, 0, 0, 0, 50
                        while time.perf_counter() - t0 < seconds:  # constant temperature t
                            st = ann.run(chunk, t, t, shift, *caps).tolist()
                            moves += chunk
                            evaluated += st[0]
                            accepted += st[1]
                            steps += st[6]
                            back += st[9]
                        rates.append(evaluated / (time.perf_counter() - t0))
                    fixed = dag.n_edges + dag.n_computed
                    io = count_io(dag, ann.order().numpy(), M)
                    assert io.total == st[4] + fixed, "annealer disagrees with the exact simulator"
                    print(f"| {name} | {dag.n_edges} | {M} | {start} | {shift} | {caps if caps[0] >= 0 else 'none'} | "
                          f"{moves} | {float(np.median(rates)):,.0f} | {steps / max(evaluated, 1):.1f} | "
                          f"{back / max(evaluated, 1):.1f} | {accepted} | {before + fixed} -> {st[4] + fixed} |",
                          flush=True)


def quality(nets, Ms, shifts, seconds, repeats):
    """I/O reached by the full annealer (default schedule over a time budget, start = best greedy order)
    for several max_shift values: a faster move set only helps if it also finds better orders."""
    print(f"anneal for {seconds} s from the best greedy order (median over {repeats} runs, seeds 0..)")
    print("| network | M | max_shift | start I/O | anneal I/O | gain vs start | evaluated/s | accepted |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dag in nets.items():
        for M in Ms:
            start = _best_start(dag, M)[1]
            for shift in shifts:
                ios, rates, acc = [], [], []
                for seed in range(max(1, repeats)):
                    _, info = anneal_order(dag, M, seed=seed, time_budget=seconds, start=start, max_shift=shift,
                                           progress=False)
                    ios.append(info["io"])
                    rates.append(info["evaluated_per_s"])
                    acc.append(info["accepted"])
                io = float(np.median(ios))
                print(f"| {name} | {M} | {shift} | {info['start_io']} | {io:.0f} | "
                      f"{100 * (info['start_io'] - io) / info['start_io']:.2f} % | {float(np.median(rates)):,.0f} | "
                      f"{int(np.median(acc))} |", flush=True)


if __name__ == "__main__":
    main()
