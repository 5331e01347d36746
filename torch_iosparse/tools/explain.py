"""explain: what each sparse network in a model costs, by the cost model (docs/theory.md).

``explain(model)`` prints one row per :class:`IOSparseNetwork`: neurons, edges, fast memory M, batch
tile BT, the lower bound LB, the planned I/O, the 2-optimal upper bound UB, the execution strategy the
backend chose, how many batch-size buckets were measured on this machine (torch_iosparse.tuning) and the
bytes one batch tile is predicted to move between slow and fast memory; then, per network, the path each
range of batch sizes runs, ``*`` marking the measured ones (the others come from the cost model).
``plot_io_vs_memory`` draws the planned I/O of each network as M varies, between its bounds, one small
panel per network. :func:`sparsify_report` is the one-screen summary of a converted model.
:func:`save_plans` / :func:`apply_plans` write every network's plan to a folder and put plans from such a
folder back into the networks of the same names (``python -m torch_iosparse plan --save-dir`` / ``apply``).

Networks are named by their dotted module path, as ``model.named_modules()`` names them (``2.ffn.0``);
a network that is the model itself is ``(root)``.
"""
from __future__ import annotations

import difflib
import math
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..cost.iomodel import count_io, lower_bound, upper_bound
from ..nn.module import IOSparseNetwork
from ..planning import Plan, PlanError

ROOT_NAME = "(root)"
DEFAULT_PLOT_PATH = "io_vs_memory.png"
PLAN_SUFFIX = ".plan.npz"


def networks(model: nn.Module) -> List[Tuple[str, IOSparseNetwork]]:
    """Every IOSparseNetwork inside ``model`` (itself included), with its qualified name."""
    return [(name or ROOT_NAME, m) for name, m in model.named_modules() if isinstance(m, IOSparseNetwork)]


def network_name(name: str) -> str:
    """A network name as :func:`networks` spells it: the dotted module path (``2/ffn/0``, the command line's
    older spelling, is read as ``2.ffn.0``)."""
    name = name.strip()
    return name if name == ROOT_NAME else name.replace("/", ".")


def select_networks(model: nn.Module, names: Optional[Iterable[str]] = None) -> List[Tuple[str, IOSparseNetwork]]:
    """The networks of ``model`` named in ``names`` (all of them when None), in the model's order. An unknown
    name raises KeyError with the closest names the model has."""
    nets = networks(model)
    if names is None:
        return nets
    known = {n: net for n, net in nets}
    wanted = []
    for raw in names:
        name = network_name(raw)
        if name not in known:
            raise KeyError(unknown_network_message(raw, list(known)))
        wanted.append(name)
    return [(n, net) for n, net in nets if n in wanted]


def unknown_network_message(name: str, known: Sequence[str]) -> str:
    """``no network named 'x'; did you mean 'y'?`` (or the list of names when nothing is close)."""
    if not known:
        return f"no network named {name!r}: the model has no IOSparseNetwork"
    close = difflib.get_close_matches(network_name(name), list(known), n=3, cutoff=0.6)
    if close:
        return f"no network named {name!r}; did you mean {' or '.join(repr(c) for c in close)}?"
    shown = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
    return f"no network named {name!r}; the networks are: {shown}"


def predicted_bytes(summary: Dict, itemsize: int = 4) -> int:
    """Bytes one batch tile of BT columns moves under the plan: every weight and bias once per tile, and
    each activation load/store as a BT-column vector."""
    io = summary["io"]
    return int((io.weights + io.biases + (io.loads + io.stores) * summary["batch_tile"]) * itemsize)


def rows(model: nn.Module, names: Optional[Iterable[str]] = None) -> List[Dict]:
    """One dict per network of ``model`` (those in ``names`` when given, see :func:`select_networks`): the
    numbers :func:`explain` prints."""
    out = []
    for name, net in select_networks(model, names):
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
        lines.append("path by batch size (* measured on this machine, else the cost model's):")
        for r in table:
            lines.append(f"  {r['name']}: {_batch_runs(r['paths'])}")
    return "\n".join(lines)


class ExplainTable(list):
    """The rows :func:`explain` printed (a list of dicts), and ``plot_path``: the absolute path of the
    plot it saved (None when it drew none)."""

    plot_path: Optional[str] = None


def explain(model: nn.Module, *, plot: Union[str, os.PathLike, bool, None] = None, file: Optional[TextIO] = None,
            names: Optional[Iterable[str]] = None, **sparsify_kwargs) -> ExplainTable:
    """Print the I/O table of every IOSparseNetwork in ``model`` and return its rows.

    A model that has not been converted yet is explained as :func:`sparsify` would convert it (a copy;
    ``sparsify_kwargs`` are passed on). ``names``: only these networks (dotted names; an unknown one raises
    KeyError naming the closest). ``plot``: a PNG path, or True for ``io_vs_memory.png`` in the working
    directory: draws I/O versus M between the bounds, one panel per network with its planned M marked
    (:func:`plot_io_vs_memory`), prints where it saved it and returns that path as ``table.plot_path``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain takes an nn.Module, got {type(model).__name__}")
    file = file or sys.stdout
    table = ExplainTable()
    if not networks(model):
        from ..nn.sparsify import sparsify
        model = sparsify(model, **sparsify_kwargs)
        if not networks(model):
            print("no sparse Linear chain found (nothing pruned beyond min_sparsity)", file=file)
            return table
        print("(model not converted yet: showing what sparsify(model) would build)", file=file)
    selected = select_networks(model, names)
    table.extend(rows(model, [name for name, _ in selected]))
    print(format_table(table), file=file)
    if plot:
        path = os.path.abspath(DEFAULT_PLOT_PATH if plot is True else os.fspath(plot))
        fig = plot_io_vs_memory([net for _, net in selected], path=path, titles=[name for name, _ in selected])
        import matplotlib
        if matplotlib.get_backend().lower() == "agg":  # no window or notebook shows it: the file is the result
            import matplotlib.pyplot as plt
            plt.close(fig)
        table.plot_path = path
        print(f"saved the plot of I/O against fast memory M to {path}", file=file)
    return table


def io_curve(net_or_dag, memories: Optional[Sequence[int]] = None, order=None):
    """``(memories, planned I/O, LB, UB)`` arrays for the network's plan order at each M. By default 24
    values of M from 2 to ``min(n_neurons, 4096)`` on a log scale, plus the network's planned M."""
    dag = net_or_dag.to_dag() if isinstance(net_or_dag, IOSparseNetwork) else net_or_dag
    if order is None:
        order = net_or_dag.plan_order.cpu().numpy() if isinstance(net_or_dag, IOSparseNetwork) else None
    if order is None:
        from ..cost.iomodel import topological_order
        order = topological_order(dag)
    if memories is None:
        top = max(4, min(dag.n_neurons, 4096))
        memories = np.geomspace(2, top, num=24).astype(int)
        if isinstance(net_or_dag, IOSparseNetwork) and net_or_dag.memory is not None:
            memories = np.append(memories, net_or_dag.memory)
        memories = np.unique(memories)
    memories = [int(m) for m in memories]
    io = np.array([count_io(dag, order, m).total for m in memories])
    lb = np.array([lower_bound(dag, m) for m in memories])
    ub = np.array([upper_bound(dag, m) for m in memories])
    return np.array(memories), io, lb, ub


def grid_shape(n: int) -> Tuple[int, int]:
    """``(rows, columns)`` of the panel grid for ``n`` networks: about square, at most 5 columns."""
    cols = max(1, min(n, 5, math.ceil(math.sqrt(n))))
    return max(1, math.ceil(n / cols)), cols


def _short(title: str, width: int = 34) -> str:
    return title if len(title) <= width else "…" + title[-(width - 1):]


def plot_io_vs_memory(nets: Iterable, memories: Optional[Sequence[int]] = None, path: Optional[str] = None,
                      titles: Optional[Sequence[str]] = None, progress: Optional[bool] = None):
    """Plot planned I/O against fast memory M between the lower bound LB and the 2-optimal upper bound UB,
    one small panel per network in a grid (:func:`grid_shape`), the network's planned M marked by a
    vertical line and a dot. Returns the figure (saved to ``path`` when given). Uses the non-interactive
    Agg backend unless one is already chosen. ``progress``: a tqdm bar over the networks (None: only on a
    terminal)."""
    import matplotlib
    if path is not None and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    nets = [nets] if isinstance(nets, IOSparseNetwork) else list(nets)
    if not nets:
        raise ValueError("plot_io_vs_memory needs at least one network")
    if titles is not None and len(titles) != len(nets):
        raise ValueError(f"{len(titles)} titles for {len(nets)} networks")
    n_rows, n_cols = grid_shape(len(nets))
    width = max(3.3 * n_cols, 5.0)
    legend_cols = 4 if width >= 8 else 2
    legend_height = 0.22 * math.ceil(4 / legend_cols) + 0.05  # inches above the panels
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, 2.5 * n_rows + legend_height), squeeze=False)
    flat = axes.ravel()
    any_planned = False
    for k, net in enumerate(tqdm(nets, desc="torch_iosparse: I/O curves", unit="network",
                                 disable=None if progress is None else not progress)):
        ax = flat[k]
        M, io, lb, ub = io_curve(net, memories)
        ax.fill_between(M, lb, ub, color="0.92")
        ax.plot(M, lb, "--", color="green", lw=1, label="lower bound LB")
        ax.plot(M, ub, ":", color="red", lw=1.2, label="2-optimal upper bound UB")
        ax.plot(M, io, "-", color="C0", lw=1.4, label="planned I/O")
        title = _short(titles[k] if titles is not None else f"network {k}", 40)
        if isinstance(net, IOSparseNetwork):
            planned = net.memory
            title += ("\n" if len(title) > 26 else "  ") + ("(M=\u221e)" if planned is None else f"(M={planned})")
            if planned is not None and M[0] <= planned <= M[-1]:
                any_planned = True
                ax.axvline(planned, color="0.3", lw=0.9)
                if planned in M:
                    ax.plot([planned], [io[list(M).index(planned)]], "o", color="C0", ms=4)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.yaxis.get_offset_text().set_fontsize(7)
        if k % n_cols == 0:
            ax.set_ylabel("I/Os", fontsize=8)
        if k >= len(nets) - n_cols:
            ax.set_xlabel("fast memory M (slots)", fontsize=8)
    for ax in flat[len(nets):]:
        ax.set_visible(False)
    handles, labels = flat[0].get_legend_handles_labels()
    if any_planned:
        handles.append(matplotlib.lines.Line2D([], [], color="0.3", lw=0.9, marker="o", mfc="C0", mec="C0", ms=4))
        labels.append("planned M")
    fig.legend(handles, labels, loc="upper center", ncol=legend_cols, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - legend_height / fig.get_figheight()))
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------- the one-screen summary
def _batch_runs(paths: Dict[int, Dict]) -> str:
    """The path per batch-size bucket as batch ranges: ``1-31 level*, 32-1023 program, 1024+ block``
    (``*``: measured on this machine). Bucket b covers the batches b .. 2b - 1, the last one every larger
    batch."""
    buckets = sorted(paths)
    runs: List[List] = []
    for b in buckets:
        key = (paths[b]["path"], paths[b]["source"] == "measured")
        if runs and runs[-1][0] == key:
            runs[-1][2] = b
        else:
            runs.append([key, b, b])
    last = buckets[-1]
    parts = []
    for (path, measured), lo, hi in runs:
        span = f"{lo}+" if hi == last else (str(lo) if 2 * hi - 1 == lo else f"{lo}-{2 * hi - 1}")
        parts.append(f"{span} {path}{'*' if measured else ''}")
    return ", ".join(parts)


def _seconds(t: float) -> str:
    return f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def measured_speedups(paths: Dict[int, Dict]) -> List[str]:
    """Per measured bucket of a network's ``summary()["strategy_by_bucket"]``: the winning path's time and
    its speed-up over the kernel's dense path when that was timed too (the tuner times only the paths the
    cost model deems plausible), else over the next-fastest path timed."""
    out = []
    for b in sorted(paths):
        r = paths[b]
        times = r.get("times") or {}
        win = r.get("winner", r["path"])
        if r["source"] != "measured" or win not in times:
            continue
        t = times[win]
        if "dense" in times and win != "dense" and t > 0:
            vs = f", speed-up {times['dense'] / t:.1f}x over the dense path"
        elif len(times) > 1 and t > 0:
            runner_up = min((p for p in times if p != win), key=times.get)
            vs = f", speed-up {times[runner_up] / t:.1f}x over {runner_up}"
        else:
            vs = ""
        out.append(f"B={b}: {win} {_seconds(t)}{vs}")
    return out


def sparsify_report(model: nn.Module, skipped: Optional[Sequence[Tuple[str, str]]] = None,
                    max_rows: int = 16) -> str:
    """A one-screen summary of the IOSparseNetworks in ``model`` (what ``sparsify(verbose=True)`` prints):
    how many networks, their nonzero weights and density, the planned I/O against the lower bound LB, the
    path each batch size runs (``*``: measured on this machine by torch_iosparse.tuning, else the cost
    model's choice) and, for measured buckets, the measured time and speed-up. ``skipped``: ``(name,
    reason)`` of layers left dense, listed at the end. At most ``max_rows`` networks are listed one by one
    (the totals count all; :func:`explain` lists every one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify_report takes an nn.Module, got {type(model).__name__}")
    nets = networks(model)
    lines = []
    if not nets:
        lines.append("sparsify: no IOSparseNetwork in the model (no Linear pruned beyond min_sparsity, or none "
                     "accepted by filter_fn)")
    else:
        summaries = [(name, net.summary()) for name, net in nets]
        nnz = sum(s["n_edges"] for _, s in summaries)
        dense = [s["dense_weights"] for _, s in summaries]
        io = sum(s["io"].total for _, s in summaries)
        lb = sum(s["lb"] for _, s in summaries)
        ub = sum(s["ub"] for _, s in summaries)
        kept = f"{nnz:,} nonzero weights"
        if all(dense):
            kept += f" of {sum(dense):,} ({nnz / sum(dense):.2%} dense)"
        lines.append(f"sparsify: {len(nets)} network{'s' if len(nets) != 1 else ''}, {kept}")
        lines.append(f"planned I/O {io:,} = {io / lb:.3f} x the lower bound LB {lb:,} (2-optimal upper bound "
                     f"{ub:,})")
        header = ["network", "sizes", "nnz", "density", "M", "IO/LB", "path by batch size"]
        cells = [header]
        for name, s in summaries[:max_rows]:
            sizes = "x".join(map(str, s["layer_sizes"])) if s["layer_sizes"] else \
                f"{s['n_inputs']}->{s['n_neurons'] - s['n_inputs'] - s['n_outputs']}->{s['n_outputs']}"
            density = f"{s['n_edges'] / s['dense_weights']:.2%}" if s["dense_weights"] else "-"
            cells.append([_short(name, 40), sizes, f"{s['n_edges']:,}", density,
                          "inf" if s["memory"] is None else str(s["memory"]), f"{s['io'].total / s['lb']:.3f}",
                          _batch_runs(s["strategy_by_bucket"])])
        widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
        for r in cells:
            lines.append("  " + "  ".join(c.ljust(w) if i in (0, 1) else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1])
        if len(summaries) > max_rows:
            lines.append(f"  ... and {len(summaries) - max_rows} more (torch_iosparse.explain(model) lists them all)")
        tuned = [(name, measured_speedups(s["strategy_by_bucket"])) for name, s in summaries]
        tuned = [(name, sp) for name, sp in tuned if sp]
        if tuned:
            lines.append("measured on this machine (torch_iosparse.tuning):")
            for name, sp in tuned[:max_rows]:
                lines.append(f"  {_short(name, 40)}: " + "; ".join(sp))
            if len(tuned) > max_rows:
                lines.append(f"  ... and {len(tuned) - max_rows} more")
            lines.append("* measured; other batch sizes follow the cost model")
        else:
            lines.append("paths from the cost model (torch_iosparse.tune(model) measures them on this machine)")
    if skipped:
        shown = [f"{name or ROOT_NAME} ({why})" for name, why in list(skipped)[:max_rows]]
        more = f", ... and {len(skipped) - max_rows} more" if len(skipped) > max_rows else ""
        lines.append(f"kept dense: {', '.join(shown)}{more}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plans in a folder
def plan_file_name(name: str) -> str:
    """The file a network's plan is saved under in a plan folder: its dotted name and ``.plan.npz``
    (``root.plan.npz`` for a model that is one network)."""
    stem = "root" if name == ROOT_NAME else network_name(name)
    return stem.replace(os.sep, "_") + PLAN_SUFFIX


def save_plans(model: nn.Module, directory: Union[str, os.PathLike]) -> Dict[str, str]:
    """Save the plan of every IOSparseNetwork in ``model`` into ``directory`` (created if missing), one
    :meth:`Plan.save` file per network named by :func:`plan_file_name`. Returns ``{network name: path}``."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    out = {}
    for name, net in networks(model):
        path = os.path.join(directory, plan_file_name(name))
        net.plan().save(path)
        out[name] = path
    return out


def set_plan(net: IOSparseNetwork, plan: Plan) -> None:
    """Make ``net`` run ``plan`` (same structure, checked: PlanError otherwise), in place: parameters stay
    the same tensors (an optimizer built on them keeps working), the kernel's buffers are rebuilt."""
    from ..nn.module import _structure_tensors
    dag = net.to_dag()
    plan.check_dag(dag)
    tensors = _structure_tensors(dag, plan)
    net.load_state_dict({k: v for k, v in tensors.items() if k.startswith("plan_")}, strict=False)


def apply_plans(model: nn.Module, directory: Union[str, os.PathLike]) -> Dict[str, Plan]:
    """Put the plans of a plan folder (written by :func:`save_plans` or ``python -m torch_iosparse plan
    --save-dir``) into the networks of ``model`` with the same names, in place. Every file is read and
    checked before any network changes: a file that names no network of the model raises KeyError (with
    the closest names), a plan made for another structure PlanError; networks without a file keep their
    plan. Returns ``{network name: plan applied}``."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such plan folder" if not os.path.exists(directory)
                                else f"{directory}: not a folder")
    files = sorted(f for f in os.listdir(directory) if f.endswith(PLAN_SUFFIX))
    if not files:
        raise FileNotFoundError(f"{directory} holds no {PLAN_SUFFIX} file")
    by_file = {plan_file_name(name): (name, net) for name, net in networks(model)}
    plans = []
    for f in files:
        if f not in by_file:
            raise KeyError(f"plan file {f}: " + unknown_network_message(f[: -len(PLAN_SUFFIX)],
                                                                           [n for n, _ in by_file.values()]))
        name, net = by_file[f]
        dag = net.to_dag()
        try:
            plan = Plan.load(os.path.join(directory, f), dag)
        except PlanError as e:
            raise PlanError(f"plan file {f} does not fit network {name!r}: {e}") from None
        plans.append((name, net, plan))
    for name, net, plan in plans:
        set_plan(net, plan)
    return {name: plan for name, _, plan in plans}
