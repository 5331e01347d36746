"""explain: what each sparse network in a model costs, by the cost model (docs/theory.md).

``explain(model)`` prints one row per :class:`IOSparseNetwork`: neurons, edges, fast memory M, batch
tile BT, the lower bound LB, the planned I/O, the 2-optimal upper bound UB, the execution strategy the
backend chose, how many batch-size buckets were measured on this machine (torch_iosparse.tuning) and the
bytes one batch tile is predicted to move between slow and fast memory; then, per network, the path each
batch-size bucket runs, ``*`` marking the measured ones (the others come from the cost model).
``plot_io_vs_memory`` draws the planned I/O of a network as M varies, between its bounds.
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch
from torch import nn

from .iomodel import count_io, lower_bound, upper_bound
from .module import IOSparseNetwork


def networks(model: nn.Module) -> List[Tuple[str, IOSparseNetwork]]:
    """Every IOSparseNetwork inside ``model`` (itself included), with its qualified name."""
    return [(name or "(root)", m) for name, m in model.named_modules() if isinstance(m, IOSparseNetwork)]


def predicted_bytes(summary: Dict, itemsize: int = 4) -> int:
    """Bytes one batch tile of BT columns moves under the plan: every weight and bias once per tile, and
    each activation load/store as a BT-column vector."""
    io = summary["io"]
    return int((io.weights + io.biases + (io.loads + io.stores) * summary["batch_tile"]) * itemsize)


def rows(model: nn.Module) -> List[Dict]:
    out = []
    for name, net in networks(model):
        s = net.summary()
        itemsize = net.weight.element_size()
        by_bucket = s["strategy_by_bucket"]
        measured = sum(r["source"] == "measured" for r in by_bucket.values())
        out.append({"name": name, "neurons": s["n_neurons"], "edges": s["n_edges"],
                    "M": "inf" if s["memory"] is None else s["memory"], "BT": s["batch_tile"], "LB": s["lb"],
                    "IO": s["io"].total, "UB": s["ub"], "IO/LB": s["io"].total / s["lb"],
                    "strategy": s["strategy"], "method": s["method"],
                    "tuned": f"{measured}/{len(by_bucket)}" if s["tuning"].startswith("on") else "off",
                    "paths": by_bucket, "bytes/tile": predicted_bytes(s, itemsize)})
    return out


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(table: List[Dict]) -> str:
    cols = ["name", "neurons", "edges", "M", "BT", "LB", "IO", "UB", "IO/LB", "method", "strategy", "tuned",
            "bytes/tile"]
    cells = [[str(c) for c in cols]]
    for r in table:
        cells.append([r["name"], str(r["neurons"]), str(r["edges"]), str(r["M"]), str(r["BT"]), str(r["LB"]),
                      str(r["IO"]), str(r["UB"]), f"{r['IO/LB']:.3f}", r["method"], r["strategy"], r["tuned"],
                      _fmt_bytes(r["bytes/tile"])])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i in (0, 9, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if table and all("paths" in r for r in table):
        lines.append("path per batch-size bucket (* measured on this machine, else the cost model's):")
        for r in table:
            lines.append(f"  {r['name']}: " + ", ".join(
                f"{b}{'+' if b == max(r['paths']) else ''} {p['path']}{'*' if p['source'] == 'measured' else ''}"
                for b, p in sorted(r["paths"].items())))
    return "\n".join(lines)


def explain(model: nn.Module, *, plot: Optional[str] = None, file: Optional[TextIO] = None,
            **sparsify_kwargs) -> List[Dict]:
    """Print the I/O table of every IOSparseNetwork in ``model`` and return its rows.

    A model that has not been converted yet is explained as :func:`sparsify` would convert it (a copy;
    ``sparsify_kwargs`` are passed on). ``plot``: a path; draws I/O versus M for each network there
    (one panel per network).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain takes an nn.Module, got {type(model).__name__}")
    file = file or sys.stdout
    if not networks(model):
        from .sparsify import sparsify
        model = sparsify(model, **sparsify_kwargs)
        if not networks(model):
            print("no sparse Linear chain found (nothing pruned beyond min_sparsity)", file=file)
            return []
        print("(model not converted yet: showing what sparsify(model) would build)", file=file)
    table = rows(model)
    print(format_table(table), file=file)
    if plot:
        plot_io_vs_memory([net for _, net in networks(model)], path=plot,
                          titles=[name for name, _ in networks(model)])
    return table


def io_curve(net_or_dag, memories: Optional[Sequence[int]] = None, order=None):
    """``(memories, planned I/O, LB, UB)`` arrays for the network's plan order at each M."""
    dag = net_or_dag.to_dag() if isinstance(net_or_dag, IOSparseNetwork) else net_or_dag
    if order is None:
        order = net_or_dag.plan_order.cpu().numpy() if isinstance(net_or_dag, IOSparseNetwork) else None
    if order is None:
        from .iomodel import topological_order
        order = topological_order(dag)
    if memories is None:
        top = max(4, min(dag.n_neurons, 4096))
        memories = np.unique(np.geomspace(2, top, num=24).astype(int))
    memories = [int(m) for m in memories]
    io = np.array([count_io(dag, order, m).total for m in memories])
    lb = np.array([lower_bound(dag, m) for m in memories])
    ub = np.array([upper_bound(dag, m) for m in memories])
    return np.array(memories), io, lb, ub


def plot_io_vs_memory(nets: Iterable, memories: Optional[Sequence[int]] = None, path: Optional[str] = None,
                      titles: Optional[Sequence[str]] = None):
    """Plot planned I/O against fast memory M with LB and UB, one panel per network. Returns the figure
    (saved to ``path`` when given). Uses the non-interactive Agg backend unless one is already chosen."""
    import matplotlib
    if path is not None and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(nets) if not isinstance(nets, (IOSparseNetwork,)) else [nets]
    fig, axes = plt.subplots(1, len(nets), figsize=(4.5 * len(nets), 3.4), squeeze=False)
    for k, (net, ax) in enumerate(zip(nets, axes[0])):
        M, io, lb, ub = io_curve(net, memories)
        ax.fill_between(M, lb, ub, color="0.9", label="[LB, UB]")
        ax.plot(M, io, "o-", ms=3, label="planned I/O")
        ax.plot(M, lb, "--", color="green", label="lower bound")
        ax.plot(M, ub, ":", color="red", label="2-optimal upper bound")
        if isinstance(net, IOSparseNetwork) and net.memory is not None and M[0] <= net.memory <= M[-1]:
            ax.axvline(net.memory, color="0.4", lw=0.8, label=f"planned M={net.memory}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fast memory M (slots)")
        ax.set_ylabel("I/Os")
        ax.set_title(titles[k] if titles else f"network {k}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
