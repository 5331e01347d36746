"""CPU speed of torch_iosparse's op against the anchors, side by side in one run (issue 4).

For every network and batch size: ours (ops.prepare + ops.dag_forward, automatic strategy) vs a dense
F.linear chain (layered nets whose dense weights fit in memory) vs torch.sparse CSR level by level vs
scipy.sparse CSR level by level vs SparseProp's SparseLinear layer by layer (nets that are chains of
layers: MLPs, RadiX-Nets; optional, benchmarks/requirements.txt). Methods are timed in interleaved rounds
(best of N), so load from other processes hits all of them alike; ratio = best anchor time / ours. Every
anchor's output is checked against the reference before it is timed.
DeepSparse 1.8 (own venv: bash benchmarks/deepsparse_venv.sh) runs the masked dense model exported to
ONNX, in a subprocess after the interleaved rounds (benchmarks/deepsparse_runner.py), on the layered
(MLP) rows; it has its own column and ratio. Also: for one network where M matters, the measured time of
several orders beside their simulated I/O.

    python benchmarks/cpu_speed.py            # full sweep (several minutes), writes benchmarks/RESULTS.md
    python benchmarks/cpu_speed.py --quick    # small sizes
    python benchmarks/cpu_speed.py --smoke    # tiny sizes, every anchor once, 1 thread, < 30 s, writes nothing
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anchors  # noqa: E402  (benchmarks/anchors.py: SparseProp, DeepSparse, the machine)

from torch_iosparse import SparseDAG, ops, plan  # noqa: E402
from torch_iosparse.backends.cpu import hardware, strategy  # noqa: E402
from torch_iosparse.cost.iomodel import count_io  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **kw):
        return x

DENSE_LIMIT_BYTES = 1 << 30  # skip the dense anchor when its weights exceed this


# ---------------------------------------------------------------------- networks
def radix(width: int, depth: int) -> SparseDAG:
    """The planner issue's RadiX-Net generator (GraphChallenge-like, fan-in 32)."""
    from torch_iosparse.graph.generate import radix_net
    return radix_net(width, depth, 32)


def pruned_mlp(sizes, sparsity: float, seed: int = 0) -> SparseDAG:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        lin = nn.Linear(sizes[k], sizes[k + 1])
        with torch.no_grad():
            mask = torch.rand(sizes[k + 1], sizes[k], generator=g) >= sparsity
            lin.weight.mul_(mask).add_(mask * 1e-4)
        layers += [lin, nn.ReLU()]
    return SparseDAG.from_module(nn.Sequential(*layers))


_DEEP = {}


def deep_net(n_inputs, n_outputs, n_neurons, n_edges, memory, seed=0):
    from torch_iosparse.graph.generate import io_optimal
    key = (n_inputs, n_outputs, n_neurons, n_edges, memory, seed)
    if key not in _DEEP:
        _DEEP[key] = io_optimal(n_inputs, n_outputs, n_neurons, n_edges, memory, seed=seed)
    return _DEEP[key]


# ---------------------------------------------------------------------- anchors
class LevelCSR:
    """torch.sparse CSR and scipy CSR executors, level by level (layer by layer for layered nets):
    values feature-major [n_neurons, B]; level l computes act(W_l @ values + b_l) for its neurons."""

    def __init__(self, dag: SparseDAG):
        self.dag = dag
        lv = dag.levels()
        src, dst = dag.edges()
        self.levels = []
        w = dag.weight.numpy()
        for L in range(1, int(lv.max()) + 1):
            neurons = np.flatnonzero(lv == L)
            sel = np.isin(dst, neurons) if neurons.size < dag.n_neurons else np.ones(dst.size, bool)
            pos = np.full(dag.n_neurons, -1)
            pos[neurons] = np.arange(neurons.size)
            cols_used = np.unique(src[sel])
            colpos = np.full(dag.n_neurons, -1)
            colpos[cols_used] = np.arange(cols_used.size)
            m = sp.csr_matrix((w[sel], (pos[dst[sel]], colpos[src[sel]])), shape=(neurons.size, cols_used.size))
            t = torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                        torch.from_numpy(m.indices.astype(np.int64)),
                                        torch.from_numpy(m.data.astype(np.float32)), size=m.shape)
            acts = {dag.act_index[v] for v in neurons[:1]}
            self.levels.append((torch.from_numpy(neurons), torch.from_numpy(cols_used), t, m, neurons, cols_used,
                                dag.bias[torch.from_numpy(neurons)].unsqueeze(1),
                                dag.bias.numpy()[neurons][:, None], dag.activations[acts.pop()]))
        self.uniform = len(dag.activations) == 1
        self.outputs = torch.from_numpy(dag.outputs.astype(np.int64))

    def torch_forward(self, x):
        vals = torch.empty(self.dag.n_neurons, x.shape[0])
        vals[: self.dag.n_inputs] = x.t()
        for neurons_t, cols_t, W, _, _, _, b, _, act in self.levels:
            vals[neurons_t] = act.apply(torch.sparse.mm(W, vals[cols_t]) + b)
        return vals[self.outputs].t()

    def scipy_forward(self, x):
        vals = np.empty((self.dag.n_neurons, x.shape[0]), dtype=np.float32)
        vals[: self.dag.n_inputs] = x.numpy().T
        for _, _, _, W, neurons, cols, _, b, act in self.levels:
            z = W @ vals[cols] + b
            if act.kind == "relu":
                np.maximum(z, 0, out=z)
            elif act.kind == "hardtanh":
                np.clip(z, act.lo, act.hi, out=z)
            else:
                z = act.apply(torch.from_numpy(z)).numpy()
            vals[neurons] = z
        return torch.from_numpy(vals[self.dag.outputs].T)


def dense_chain(dag: SparseDAG):
    if dag.layer_sizes is None:
        return None
    total = sum(a * b for a, b in zip(dag.layer_sizes[:-1], dag.layer_sizes[1:])) * 4
    if total > DENSE_LIMIT_BYTES:
        return None
    layers = dag.to_dense_layers()

    def run(x):
        for W, b, act in layers:
            x = act.apply(F.linear(x, W, b))
        return x
    return run


# ---------------------------------------------------------------------- timing
def time_side_by_side(fns: dict, x, rounds: int):
    """Best-of-``rounds`` wall time of each function, interleaved round by round."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f(x)  # warm-up
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(x)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def strategy_label(meta, B):
    s = strategy.chosen(meta, B)
    if s == "panel":
        rows = (int(meta["n_neurons"]) - int(meta["n_inputs"])) / max(1, int(meta["panels"]))
        return f"panel tile={meta['panel_tile']} {rows:.1f} rows/panel"
    if s == "block":
        tile = 16 if B <= 16 else 32 if B <= 32 else 64  # float32 columns per tile (cpu/block.cpp block_forward)
        edges = int(meta["n_edges"]) / max(1, int(meta["block_segments"]))
        return f"block tile={tile} {edges:.1f} edges/segment"
    return f"{s} BT={meta['batch_tile']} M={meta['memory']}"


_NOTED = set()


def bench_case(name, dag, batches, rounds, memory="auto", plan_method="two_optimal", check=True,
               with_program=False, use_sparseprop=True, use_deepsparse=True):
    rows = []
    t0 = time.perf_counter()
    if memory == "auto" and plan_method == "two_optimal":
        net = ops.prepare(dag)  # the product's default: BT and M chosen together, 2-optimal order
    else:
        M = hardware.fast_memory_slots(hardware.batch_tile()) if memory == "auto" else memory
        net = ops.prepare(dag, plan(dag, M, plan_method))
    t_prepare = time.perf_counter() - t0
    csr = LevelCSR(dag)
    dense = dense_chain(dag)
    sprop = anchors.sparseprop_chain(dag) if use_sparseprop else None
    w, b = dag.weight, dag.bias
    xs = {B: torch.rand(B, dag.n_inputs) for B in batches}
    for B in batches:
        x = xs[B]
        net.forward(x, w, b)  # the product's first call at this batch bucket: measures the paths (tuning)
        fns = {"ours": lambda x: net.forward(x, w, b),
               "torch_csr": csr.torch_forward, "scipy_csr": csr.scipy_forward}
        if dense is not None:
            fns["dense"] = dense
        if sprop is not None:
            fns["sparseprop"] = sprop
        if with_program and strategy.chosen(net.meta, B) != "program":
            prog_meta = dict(net.meta, strategy=ops.STRATEGIES["program"])
            fns["program"] = lambda x: ops.dag_forward(x, w, b, net.buffers, prog_meta)
        failed = {}
        if check or "sparseprop" in fns:
            ref = csr.torch_forward(x)
            if check:
                torch.testing.assert_close(fns["ours"](x), ref, rtol=1e-3, atol=1e-3)
            if "sparseprop" in fns:  # an external anchor that disagrees is reported, never timed
                why = anchors.check_close(fns["sparseprop"](x), ref)
                if why:
                    failed["sparseprop"] = why
                    del fns["sparseprop"]
                    print(f"{name} B={B}: SparseProp output differs from the reference, not timed: {why}")
        t = time_side_by_side(fns, x, rounds)
        anchor_t = {k: v for k, v in t.items() if k not in ("ours", "program")}
        best_anchor = min(anchor_t, key=anchor_t.get)
        rows.append(dict(name=name, B=B, edges=dag.n_edges,
                         strategy=strategy_label(net.meta, B),
                         times=t, failed=failed,
                         best_anchor=best_anchor, ratio=anchor_t[best_anchor] / t["ours"], prepare=t_prepare,
                         M=net.meta["memory"]))
    if use_deepsparse and dense is not None:
        ds = anchors.deepsparse_times(dag, xs, torch.get_num_threads(), rounds)
        for r in rows:
            B = r["B"]
            if ds.get(B) is not None:
                r["times"]["deepsparse"] = ds[B]
                r["ratio_deepsparse"] = ds[B] / r["times"]["ours"]
            elif B in ds.errors:
                r["failed"]["deepsparse"] = ds.errors[B]
                print(f"{name} B={B}: DeepSparse not timed: {ds.errors[B]}")
        if not ds and ds.note and ds.note not in _NOTED:
            _NOTED.add(ds.note)  # once per run ("DeepSparse absent: ..."), not once per network
            print(ds.note)
    return rows


def orders_study(dag, memory, B, rounds, anneal_budget):
    """Measured program-path time of several orders at one M, beside their simulated I/O."""
    methods = ["two_optimal", "level_grouped", "greedy", "anneal"]
    out = []
    x = torch.rand(B, dag.n_inputs)
    fns = {}
    ios = {}
    from torch_iosparse import planning
    for m in methods:
        if m not in planning.methods():
            continue
        kw = {"time_budget": anneal_budget} if m == "anneal" else {}
        pl = plan(dag, memory, m, **kw)
        net = ops.prepare(dag, pl, strategy="program")
        ios[m] = pl.io
        fns[m] = (lambda n: (lambda x: ops.dag_forward(x, dag.weight, dag.bias, n.buffers, n.meta)))(net)
    t = time_side_by_side(fns, x, rounds)
    for m in fns:
        out.append(dict(method=m, loads=ios[m].loads, stores=ios[m].stores, ms=t[m] * 1e3,
                        gps=B * dag.n_edges / t[m] / 1e9))
    return out


# ---------------------------------------------------------------------- report
def fmt_rows(rows):
    """The sweep table. Times in ms; "n/a": the method does not apply (or is not installed), "wrong": its
    output failed the check and it was not timed. ratio = best of dense / torch CSR / scipy CSR /
    SparseProp over ours; DeepSparse (run apart, in its own process) has its own ratio."""
    lines = ["| network | B | edges | ours | dense | torch CSR | scipy CSR | SparseProp | ours G/s | best anchor G/s | "
             "ratio | DeepSparse | vs DeepSparse | strategy | program path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["times"]

        def ms(k):
            if k in t:
                return f"{t[k] * 1e3:.3f}"
            return "wrong" if k in r.get("failed", {}) else "n/a"
        gps = r["B"] * r["edges"] / t["ours"] / 1e9
        gpa = r["B"] * r["edges"] / t[r["best_anchor"]] / 1e9
        vs_ds = f"**{r['ratio_deepsparse']:.2f}x**" if "ratio_deepsparse" in r else "n/a"
        lines.append(f"| {r['name']} | {r['B']} | {r['edges']:,} | {ms('ours')} | {ms('dense')} | {ms('torch_csr')} | "
                     f"{ms('scipy_csr')} | {ms('sparseprop')} | {gps:.2f} | {gpa:.2f} ({r['best_anchor']}) | "
                     f"**{r['ratio']:.2f}x** | {ms('deepsparse')} | {vs_ds} | {r['strategy']} | {ms('program')} |")
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    """One line naming the machine and the threads every method ran with (above every table)."""
    info = hardware.detect()
    return (f"machine: {anchors.cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs; ISA {info.isa}; "
            f"L1d {info.l1d_bytes >> 10} KiB, L2 {info.l2_bytes >> 10} KiB/core, L3 {info.l3_bytes >> 20} MiB "
            f"({info.source}); threads: {threads} (ours, dense, torch CSR, SparseProp; DeepSparse num_cores), "
            f"scipy 1")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, every method and anchor once (< 30 s; 1 thread unless --threads); implies --no-write")
    ap.add_argument("--no-sparseprop", action="store_true", help="leave SparseProp out")
    ap.add_argument("--no-deepsparse", action="store_true", help="leave DeepSparse out")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds per method (best of)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--only", choices=["radix", "mlp", "deep", "orders"], nargs="*")
    ap.add_argument("--with-program", action="store_true",
                    help="also time the program path where the automatic strategy picks another one")
    args = ap.parse_args()
    if args.smoke:
        args.no_write = True
    rounds = args.rounds or (2 if args.smoke else 3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.smoke:  # 1 thread: a smoke run on a busy machine would otherwise wait on OpenMP barriers
        torch.set_num_threads(1)
    only = set(args.only or ["radix", "mlp", "deep", "orders"])

    if args.smoke:
        radix_cfgs = [(256, 3, 16)]
        mlp_sizes, mlp_sparsity, mlp_batches = [256, 256, 256, 64], [0.90], [1, 16]
        deep_cfgs = [(16, 16, 300, 3000, 16, 16)]
        orders_cfg = (256, 3, 16, 16, 0.2)
    elif args.quick:
        radix_cfgs = [(1024, 4, 64), (4096, 2, 256)]
        mlp_sizes, mlp_sparsity, mlp_batches = [1024, 1024, 1024, 256], [0.90, 0.99], [1, 16, 64]
        deep_cfgs = [(32, 32, 3000, 30000, 32, 64)]
        orders_cfg = (1024, 3, 64, 64, 2.0)
    else:
        radix_cfgs = [(1024, 30, 64), (4096, 30, 1024), (16384, 12, 256), (65536, 4, 256)]
        mlp_sizes, mlp_sparsity, mlp_batches = [4096, 4096, 4096, 1024], [0.90, 0.95, 0.99], [1, 16, 64]
        deep_cfgs = [(64, 64, 10000, 100000, 64, 64), (64, 64, 10000, 100000, 64, 1)]
        orders_cfg = (4096, 4, 64, 256, 20.0)

    rows = []
    if "radix" in only:
        for (N, L, B) in tqdm(radix_cfgs, desc="radix"):
            rows += bench_case(f"radix N={N} L={L}", radix(N, L), [B], rounds, with_program=args.with_program,
                               use_sparseprop=not args.no_sparseprop, use_deepsparse=not args.no_deepsparse)
    if "mlp" in only:
        for s in tqdm(mlp_sparsity, desc="mlp"):
            dag = pruned_mlp(mlp_sizes, s)
            rows += bench_case(f"MLP {'-'.join(map(str, mlp_sizes))} {int(s * 100)}%", dag, mlp_batches, rounds,
                               with_program=args.with_program, use_sparseprop=not args.no_sparseprop,
                               use_deepsparse=not args.no_deepsparse)
    if "deep" in only:
        for (ni, no, n, m, M, B) in tqdm(deep_cfgs, desc="deep"):
            try:
                dag = deep_net(ni, no, n, m, M)
            except ImportError:
                print("deep generator nets need torch_iosparse.generate (planner branch); skipped")
                break
            depth = int(dag.levels().max())
            rows += bench_case(f"deep io_optimal n={n} m={m} depth={depth}", dag, [B], rounds,
                               use_sparseprop=not args.no_sparseprop, use_deepsparse=not args.no_deepsparse)
    orders = []
    if "orders" in only:
        N, L, B, M, budget = orders_cfg
        orders = orders_study(radix(N, L), M, B, rounds, budget)

    threads = torch.get_num_threads()
    machine = machine_line(threads)
    omp = anchors.openmp_runtimes()
    sp_note = ("skipped (--no-sparseprop)" if args.no_sparseprop else anchors.sparseprop_status()
               + ("" if len(omp) <= 1 else f"; WARNING: {len(omp)} OpenMP runtimes loaded ({', '.join(omp)}): "
                  "SparseProp's threads may not follow torch.set_num_threads"))
    ds_note = "skipped (--no-deepsparse)" if args.no_deepsparse else anchors.deepsparse_status()
    head = [f"# CPU benchmark results (benchmarks/cpu_speed.py)", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- {machine}",
            f"- software: torch {torch.__version__}, numpy {np.__version__}, scipy {anchors.version('scipy')}; "
            f"SparseProp: {sp_note}; DeepSparse: {ds_note}",
            f"- command: `python benchmarks/cpu_speed.py {' '.join(sys.argv[1:])}`",
            f"- timing: best of {rounds} interleaved rounds (wall clock), ms; ratio = best anchor time / ours "
            "(> 1: we are faster), anchors = dense F.linear, torch CSR, scipy CSR, SparseProp; \"vs DeepSparse\" = "
            "DeepSparse time / ours (DeepSparse runs in its own process after the rounds, best of at least "
            f"{rounds} calls and 0.2 s). n/a: the method does not apply or is absent; wrong: it failed the "
            "output check and was not timed. G/s = batch x edges per second. The machine is shared: absolute "
            "numbers are noisy, ratios measured side by side less so.", "",
            f"## Sweep ({threads} threads)", "", machine, ""]
    text = "\n".join(head) + fmt_rows(rows) + "\n"
    if orders:
        N, L, B, M, budget = orders_cfg
        text += (f"\n## Orders at fixed M (radix N={N} L={L}, B={B}, M={M} slots, program path)\n\n{machine}\n\n"
                 "| order | loads | stores | ms | G/s |\n|---|---|---|---|---|\n")
        for o in orders:
            text += f"| {o['method']} | {o['loads']:,} | {o['stores']:,} | {o['ms']:.3f} | {o['gps']:.2f} |\n"
    print(text)
    if not args.no_write:
        # Newest run first; earlier runs stay below as history (they are the record of past claims).
        previous = open(args.out).read() if os.path.exists(args.out) else ""
        title = "# CPU benchmark results (benchmarks/cpu_speed.py)\n"
        if previous.startswith(title):
            previous = previous[len(title):]
        if not text.startswith(title):
            text = title + "\n" + text
        with open(args.out, "w") as f:
            f.write(text + ("\n## History (earlier runs)\n" + previous if previous.strip() else ""))
        print(f"wrote {args.out} (earlier runs kept below)")


if __name__ == "__main__":
    main()
