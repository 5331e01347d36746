"""How fast is the core on a big network? two_optimal plan + exact I/O count of a layered network with
10^7 edges (issue 2 target: <= 10 s on the 2-core CI machine).

Phases, each timed separately (best and median of --repeats runs):
    build   SparseDAG.from_edges (validation, CSR of in- and out-edges, acyclicity)
    topo    topological_order + normalize_order (the checks every plan and count do), and the full
            permutation + edge-by-edge check of an arbitrary order (layers reversed)
    plan    tis.plan(dag, M) end to end: order, checks, exact count, structure hash
    count   count_io(dag, order, M) alone (the native simulator)
The target is build + plan (plan contains the exact count). Edges are generated sorted (as a generator or
from_module would emit them); --shuffled also times construction from a shuffled edge list.

    python benchmarks/planner_speed.py                 # 10^7 edges
    python benchmarks/planner_speed.py --edges 1e6 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import torch_iosparse as tis
from torch_iosparse.cost import iomodel


def layered_edges(width: int, depth: int, fan_in: int, seed: int = 0):
    """Layered net: ``depth`` layers of ``width`` neurons after ``width`` inputs; each neuron reads exactly
    ``fan_in`` distinct random neurons of the previous layer (one in each of fan_in equal bins)."""
    rng = np.random.default_rng(seed)
    bin_w = width // fan_in
    src = []
    for layer in range(depth):
        s = rng.integers(0, bin_w, size=(width, fan_in)) + np.arange(fan_in) * bin_w + layer * width
        src.append(s.reshape(-1))
    src = np.concatenate(src)
    dst = np.repeat(np.arange(width, width * (depth + 1)), fan_in)
    return src, dst


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times), statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", type=float, default=1e7)
    ap.add_argument("--fan-in", type=int, default=100)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--memory", default="64,4096,inf", help="comma-separated M values ('inf' = unbounded)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shuffled", action="store_true", help="also build from a shuffled edge list")
    args = ap.parse_args()

    width = max(args.fan_in, int(round(args.edges / (args.depth * args.fan_in))))
    width -= width % args.fan_in
    src, dst = layered_edges(width, args.depth, args.fan_in)
    w = torch.randn(src.size)
    m = src.size
    print(f"layered network: {width} inputs, {args.depth} layers x {width} neurons, fan-in {args.fan_in}: "
          f"{m:,} edges; torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows = []
    dag, b_best, b_med = timed(lambda: tis.SparseDAG.from_edges(width, src, dst, w), args.repeats)
    rows.append(("build (from_edges, sorted edges)", b_best, b_med))
    if args.shuffled:
        perm = np.random.default_rng(1).permutation(m)
        s2, d2, w2 = src[perm], dst[perm], w[torch.from_numpy(perm)]
        _, best, med = timed(lambda: tis.SparseDAG.from_edges(width, s2, d2, w2), args.repeats)
        rows.append(("build (from_edges, shuffled edges)", best, med))
        del s2, d2, w2

    def topo():
        dag._topo_numbering = None  # recompute the cached "numbering is topological" test every time
        return iomodel.normalize_order(dag, iomodel.topological_order(dag))

    order, best, med = timed(topo, args.repeats)
    rows.append(("topo (topological_order + check)", best, med))
    # Another valid order (each layer reversed) takes the full permutation + edge-by-edge check.
    other = np.concatenate([np.arange(width * (k + 2) - 1, width * (k + 1) - 1, -1) for k in range(args.depth)])
    _, best, med = timed(lambda: iomodel.normalize_order(dag, other), args.repeats)
    rows.append(("topo (full check of an arbitrary order)", best, med))

    totals = []
    for spec in args.memory.split(","):
        M = None if spec.strip() in ("inf", "none", "unbounded") else int(spec)
        dag._hash = None  # time the structure hash as part of every plan
        p, p_best, p_med = timed(lambda: tis.plan(dag, M), args.repeats)
        rows.append((f"plan M={spec} (order + checks + exact count)", p_best, p_med))
        io, best, med = timed(lambda: tis.count_io(dag, order, M), args.repeats)
        assert io == p.io
        rows.append((f"count M={spec} (native simulator)", best, med))
        lb, ub = tis.lower_bound(dag, M), tis.upper_bound(dag, M)
        assert lb <= io.total <= ub <= 2 * lb
        totals.append((spec, b_med + p_med, io, lb, ub))

    print(f"\n{'phase':<48}{'best s':>9}{'median s':>10}{'edges/s (median)':>19}")
    for name, best, med in rows:
        print(f"{name:<48}{best:>9.3f}{med:>10.3f}{m / med:>19,.0f}")
    print(f"\n{'M':>6}  {'build+plan s':>12}  {'target':>7}  {'loads':>11}  {'stores':>9}  {'LB':>11}  {'count':>11}  {'UB':>11}")
    for spec, total, io, lb, ub in totals:
        ok = "ok" if total <= 10 else "MISSED"
        print(f"{spec:>6}  {total:>12.2f}  {ok:>7}  {io.loads:>11,}  {io.stores:>9,}  {lb:>11,}  {io.total:>11,}  {ub:>11,}")


if __name__ == "__main__":
    main()
