"""I/O of every planning method versus fast memory M, with the bounds (issue 3).

    python benchmarks/io_table.py --size small            # seconds
    python benchmarks/io_table.py --size full --anneal-time 20 --plot io_table.png

Prints a markdown table (LB, layer order, two_optimal in the numbering, greedy, anneal, UB) and the
gain of greedy / anneal over layer order; then, for radix nets with M well below the width, the margin
by which anneal and greedy beat two_optimal in layer order.
"""
import argparse
import time

from torch_iosparse import generate
from torch_iosparse.testing.planner_bench import io_rows, markdown_table, networks, plot_rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "full"], default="small")
    ap.add_argument("--anneal-iterations", type=int, default=3000)
    ap.add_argument("--anneal-time", type=float, default=None, help="seconds per anneal run (overrides iterations)")
    ap.add_argument("--plot", default=None, help="write the I/O-vs-M plots to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--radix-width", type=int, default=None, help="width of the radix margin study")
    args = ap.parse_args()

    t0 = time.perf_counter()
    rows = io_rows(networks(args.size, args.seed), anneal_iterations=args.anneal_iterations,
                   anneal_time=args.anneal_time, seed=args.seed)
    print(markdown_table(rows))
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    if args.plot:
        plot_rows(rows, args.plot)
        print(f"plots: {args.plot}")

    width = args.radix_width or (128 if args.size == "small" else 1024)
    fan = 8 if width < 1024 else 32
    dag = generate.radix_net(width, 3, fan_in=fan, seed=args.seed)
    Ms = [width // 16, width // 8, width // 4, width // 2]
    study = io_rows({f"radix {width}x3 f{fan}": dag}, {f"radix {width}x3 f{fan}": Ms},
                    anneal_iterations=args.anneal_iterations, anneal_time=args.anneal_time, seed=args.seed)
    print(f"\nRadix net width {width}, fan_in {fan}, 3 layers ({dag.n_edges} edges): margin over two_optimal in layer order")
    print("| M | M/width | layer | greedy | anneal | greedy gain | anneal gain | anneal moves/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in study:
        print(f"| {r['M']} | {r['M'] / width:.3f} | {r['layer']} | {r['greedy']} | {r['anneal']} | "
              f"{100 * (r['layer'] - r['greedy']) / r['layer']:.1f} % | "
              f"{100 * (r['layer'] - r['anneal']) / r['layer']:.1f} % | {r['anneal_moves_per_s']:.0f} |")


if __name__ == "__main__":
    main()
