"""I/O tables and plots shared by benchmarks/io_table.py and notebooks/io_theory.ipynb.

For a set of networks and memories it reports, per (network, M): the lower bound, the 2-optimal
strategy in layer order (neurons sorted by depth: the standard way), in the network's own numbering
(``two_optimal``), the best ``greedy`` order, ``anneal``, and the 2-optimal upper bound.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..graph import generate
from ..graph.dag import SparseDAG
from ..cost.iomodel import count_io, lower_bound, upper_bound
from ..planning import plan

METHODS = ("LB", "layer", "two_optimal", "greedy", "anneal", "UB")


def pruned_mlp(sizes: Sequence[int], sparsity: float, seed: int = 0) -> SparseDAG:
    """A random MLP whose weights are pruned at random to ``sparsity`` (fraction of zeros)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_((torch.rand(b, a, generator=g) >= sparsity).to(lin.weight.dtype))
        layers += [lin, torch.nn.ReLU()]
    return SparseDAG.from_module(torch.nn.Sequential(*layers))


def random_skip_dag(n_inputs: int, n_neurons: int, avg_in: float, skip: float = 0.3, seed: int = 0) -> SparseDAG:
    """A random DAG: each computed neuron reads ~avg_in earlier neurons, mostly nearby (a window of
    about 2·avg_in), with probability ``skip`` from anywhere before it (skip edges)."""
    rng = np.random.default_rng(seed)
    src, dst = [], []
    for v in range(n_inputs, n_neurons):
        k = max(1, int(rng.poisson(avg_in)))
        for _ in range(k):
            if rng.random() < skip:
                u = int(rng.integers(0, v))
            else:
                u = int(rng.integers(max(0, v - int(4 * avg_in)), v))
            src.append(u)
            dst.append(v)
    return SparseDAG.from_edges(n_inputs, src, dst, n_neurons=n_neurons)


def level_order(dag: SparseDAG) -> np.ndarray:
    """Computed neurons sorted by depth (stable): the standard layer-by-layer order."""
    lv = dag.levels()
    comp = np.arange(dag.n_inputs, dag.n_neurons)
    return comp[np.argsort(lv[comp], kind="stable")]


def networks(size: str = "small", seed: int = 0) -> Dict[str, SparseDAG]:
    """The benchmark networks: ``size`` is "small" (CI, seconds) or "full"."""
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    w = 48 if size == "small" else 256
    nets: Dict[str, SparseDAG] = {}
    for sp in (0.8, 0.9, 0.95, 0.99):
        nets[f"mlp {int(sp * 100)}%"] = pruned_mlp([w] * 4, sp, seed)
    if size == "small":
        nets["radix 64x3 f8"] = generate.radix_net(64, 3, fan_in=8, seed=seed)
    else:
        nets["radix 1024x3 f32"] = generate.radix_net(1024, 3, fan_in=32, seed=seed)
        nets["radix 256x4 f16"] = generate.radix_net(256, 4, fan_in=16, seed=seed)
    n_gen = 200 if size == "small" else 2000
    nets["io_optimal M=12"] = generate.io_optimal(16, 8, n_gen, int(3.5 * n_gen), 12, seed=seed)
    nets["skip DAG"] = random_skip_dag(16, n_gen, 3.0, seed=seed)
    return nets


def memories_for(dag: SparseDAG, count: int = 4) -> List[int]:
    """``count`` memories spread geometrically from 4 to about the widest level."""
    widest = int(np.bincount(dag.levels()).max())
    hi = max(8, widest)
    return sorted({int(round(x)) for x in np.geomspace(4, hi, count)})


def io_rows(nets: Dict[str, SparseDAG], memories: Optional[Dict[str, Sequence[int]]] = None,
            anneal_iterations: int = 2000, anneal_time: Optional[float] = None, seed: int = 0,
            progress: bool = False) -> List[Dict]:
    """One row per (network, M) with the total I/O of every method in :data:`METHODS`."""
    rows = []
    for name, dag in nets.items():
        Ms = (memories or {}).get(name) or memories_for(dag)
        lay = level_order(dag)
        for M in Ms:
            g = plan(dag, M, method="greedy")
            a = plan(dag, M, method="anneal", seed=seed, iterations=None if anneal_time else anneal_iterations,
                     time_budget=anneal_time, progress=progress)
            rows.append({"network": name, "edges": dag.n_edges, "M": int(M), "LB": lower_bound(dag, M),
                         "layer": count_io(dag, lay, M).total,
                         "two_optimal": plan(dag, M, method="two_optimal").io.total,
                         "greedy": g.io.total, "greedy_by": g.info["candidate"], "anneal": a.io.total,
                         "anneal_moves_per_s": a.info.get("evaluated_per_s", 0.0),
                         "UB": upper_bound(dag, M)})
    return rows


def markdown_table(rows: List[Dict]) -> str:
    head = ["network", "edges", "M", *METHODS, "greedy vs layer", "anneal vs layer"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gain_g = 100 * (r["layer"] - r["greedy"]) / r["layer"]
        gain_a = 100 * (r["layer"] - r["anneal"]) / r["layer"]
        out.append("| " + " | ".join([r["network"], str(r["edges"]), str(r["M"])] + [str(r[k]) for k in METHODS]
                                     + [f"{gain_g:.1f} %", f"{gain_a:.1f} %"]) + " |")
    return "\n".join(out)


def plot_rows(rows: List[Dict], path: Optional[str] = None):
    """I/O versus M per network, with the bounds shaded. Returns the matplotlib figure."""
    import matplotlib
    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["network"] for r in rows))
    cols = min(3, len(names))
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((len(names) + cols - 1) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        rs = [r for r in rows if r["network"] == name]
        Ms = [r["M"] for r in rs]
        ax.fill_between(Ms, [r["LB"] for r in rs], [r["UB"] for r in rs], color="0.92", label="[LB, UB]")
        ax.plot(Ms, [r["LB"] for r in rs], "k--", lw=1, label="LB")
        ax.plot(Ms, [r["UB"] for r in rs], "k:", lw=1, label="UB")
        for key, style in (("layer", "o-"), ("two_optimal", "x--"), ("greedy", "s-"), ("anneal", "^-")):
            ax.plot(Ms, [r[key] for r in rs], style, ms=4, label=key)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} (m={rs[0]['edges']})", fontsize=10)
        ax.set_xlabel("fast memory M (slots)")
        ax.set_ylabel("I/Os")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
