"""`python -m torch_iosparse.tools.demo` (what `make demo` runs): prune an MLP, turn it into a SparseDAG, check it
computes what the dense model computes, plan it and print the I/O report for several fast-memory sizes M.

Extending the demo:
  * a planning method registered with ``planning.register_method`` (e.g. "anneal") becomes a row of the I/O
    table per M by adding ``(name, kwargs)`` to :data:`PLAN_METHODS` (methods that are not registered in
    this installation are skipped with a note);
  * any other report (kernel timings, ...) is a function ``fn(ctx) -> None`` decorated with
    :func:`section`; sections run in order after the I/O table and get the :class:`DemoContext`.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from .. import planning
from ..graph.dag import SparseDAG
from ..cost.iomodel import lower_bound, normalize_memory, upper_bound

# (method, keyword arguments for plan()) — one row of the I/O table per method and M.
PLAN_METHODS: List[Tuple[str, Dict]] = [
    ("two_optimal", {}),
    ("greedy", {}),
    ("anneal", {"time_budget": 1.0, "seed": 0, "progress": False}),
]
# Modules that register extra planning methods when imported (absent ones are fine).
@dataclass
class DemoContext:
    """What every section sees: the pruned dense model, its DAG, a test batch, the M values and the plans
    made for the I/O table (``plans[(method, M)]``)."""

    model: nn.Sequential
    dag: SparseDAG
    x: torch.Tensor
    memories: List[Optional[int]]
    plans: Dict = field(default_factory=dict)
    args: Optional[argparse.Namespace] = None


SECTIONS: List[Callable[[DemoContext], None]] = []


def section(fn: Callable[[DemoContext], None]) -> Callable[[DemoContext], None]:
    """Register ``fn(ctx)`` to run (in registration order) after the I/O table."""
    SECTIONS.append(fn)
    return fn


def pruned_mlp(widths=(256, 512, 512, 10), sparsity: float = 0.9, seed: int = 0) -> nn.Sequential:
    """A ReLU MLP whose Linear layers are magnitude-pruned (torch.nn.utils.prune, L1) to ``sparsity``."""
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for k in range(len(widths) - 1):
        lin = nn.Linear(widths[k], widths[k + 1])
        prune.l1_unstructured(lin, "weight", amount=sparsity)
        layers.append(lin)
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, (int, np.integer)) else str(v)


def print_table(header: List[str], rows: List[List], out=None) -> None:
    out = out or sys.stdout
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def io_report(ctx: DemoContext) -> None:
    """The I/O table: per M and planning method, LB <= count <= UB and the split into loads/stores."""
    dag = ctx.dag
    rows = []
    skipped = []
    for M in ctx.memories:
        lb, ub = lower_bound(dag, M), upper_bound(dag, M)
        for method, kw in PLAN_METHODS:
            if method not in planning.methods():
                if method not in skipped:
                    skipped.append(method)
                continue
            t = time.perf_counter()
            p = planning.plan(dag, M, method=method, **kw)
            dt = time.perf_counter() - t
            ctx.plans[(method, M)] = p
            assert lb <= p.io.total <= ub, (method, M, p.io, lb, ub)
            rows.append(["inf" if M is None else M, method, lb, p.io.total, ub, p.io.loads, p.io.stores,
                         f"{p.io.total / lb:.3f}", f"{dt * 1e3:.0f}"])
    print(f"\nI/O report (weights={dag.n_edges:,} and biases={dag.n_computed:,} are read once in every plan; "
          "loads+stores is what the order and M change)")
    print_table(["M", "method", "LB", "count", "UB", "loads", "stores", "count/LB", "plan ms"], rows)
    for method in skipped:
        print(f"(method {method!r} is not available in this installation: row skipped)")


def _best_ms(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


@section
def kernel_report(ctx: DemoContext) -> None:
    """Run the network with the planned native kernel (IOSparseNetwork) and, side by side in one run,
    the standard ways: dense F.linear layers, torch.sparse CSR layer by layer, scipy.sparse CSR."""
    import scipy.sparse as sp

    from ..nn.module import IOSparseNetwork

    net = IOSparseNetwork(ctx.model, memory="auto").eval()
    x = ctx.x.float()
    with torch.no_grad():
        ref = ctx.model(x)
        y = net(x)
    err = float((y - ref).abs().max() / max(float(ref.abs().max()), 1.0))
    print(f"\nIOSparseNetwork (memory='auto'): {net.extra_repr()}")
    print(f"kernel output vs dense model: max relative error {err:.2e} {'OK' if err <= 1e-5 else 'MISMATCH'}")

    layers = [(m.weight.detach(), m.bias.detach()) for m in ctx.model if isinstance(m, nn.Linear)]
    relu = [isinstance(b, nn.ReLU) for a, b in zip(ctx.model, list(ctx.model)[1:]) if isinstance(a, nn.Linear)]
    relu += [False] * (len(layers) - len(relu))
    csr = [(W.to_sparse_csr(), b) for W, b in layers]
    sci = [(sp.csr_matrix(W.numpy()), b.numpy()) for W, b in layers]

    def chain(step):
        def run():
            h = x
            for k, layer in enumerate(step):
                h = layer(h)
                if relu[k]:
                    h = torch.relu(h)
            return h
        return run

    def scipy_run():
        h = x.numpy().T.copy()
        for k, (A, b) in enumerate(sci):
            h = A @ h + b[:, None]
            if relu[k]:
                np.maximum(h, 0, out=h)
        return h

    with torch.no_grad():
        times = {
            "torch_iosparse (planned kernel)": _best_ms(lambda: net(x)),
            "dense F.linear": _best_ms(chain([lambda h, W=W, b=b: torch.nn.functional.linear(h, W, b)
                                              for W, b in layers])),
            "torch.sparse CSR": _best_ms(chain([lambda h, A=A, b=b: (A @ h.t()).t() + b for A, b in csr])),
            "scipy.sparse CSR": _best_ms(scipy_run),
        }
    ours = times["torch_iosparse (planned kernel)"]
    print(f"\nforward time, batch {x.shape[0]} (best of 7, this machine, measured side by side)")
    print_table(["implementation", "ms", "vs ours"],
                [[k, f"{v:.3f}", f"{v / ours:.2f}x"] for k, v in times.items()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch_iosparse.tools.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="256,512,512,10", help="layer widths, inputs first")
    ap.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights pruned per layer")
    ap.add_argument("--memory", default="8,32,128,512,inf", help="fast-memory sizes M ('inf' = unbounded)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="FILE", help="also save a plot of the I/O counts against M (png/pdf/svg)")
    args = ap.parse_args(argv)

    widths = tuple(int(w) for w in args.widths.split(","))
    memories = [normalize_memory(m.strip()) if m.strip() in ("inf", "unbounded") else normalize_memory(int(m))
                for m in args.memory.split(",")]
    model = pruned_mlp(widths, args.sparsity, args.seed)
    t = time.perf_counter()
    dag = SparseDAG.from_module(model)
    t_build = time.perf_counter() - t
    dense = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    print(f"pruned MLP {'-'.join(map(str, widths))} ({args.sparsity:.0%} of the weights pruned with "
          f"torch.nn.utils.prune): {dag.n_edges:,} of {dense:,} weights remain")
    print(f"{dag}  [built in {t_build * 1e3:.0f} ms]")

    # The DAG must compute exactly what the pruned dense model computes.
    x = torch.randn(args.batch, widths[0], generator=torch.Generator().manual_seed(args.seed))
    ok = True
    for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        with torch.no_grad():
            ref = model.to(dt)(x.to(dt))
        y = dag.forward_reference(x.to(dt))
        err = float((y - ref).abs().max() / max(float(ref.abs().max()), 1.0))
        good = err <= tol
        ok &= good
        print(f"forward_reference vs dense model, {str(dt).replace('torch.', '')}: "
              f"max relative error {err:.2e} (tolerance {tol:.0e}) {'OK' if good else 'MISMATCH'}")
    model.float()

    ctx = DemoContext(model, dag, x, memories, args=args)
    io_report(ctx)
    for fn in SECTIONS:
        fn(ctx)
    if args.plot:
        plot_io(ctx, args.plot)
        print(f"\nplot saved to {args.plot}")
    return 0 if ok else 1


def plot_io(ctx: DemoContext, path: str) -> None:
    """Activation traffic (loads + stores) of every plan against M, between the bounds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dag = ctx.dag
    finite = sorted(M for M in ctx.memories if M is not None)
    fixed = dag.n_edges + dag.n_computed  # weights + biases: the same in every plan
    fig, ax = plt.subplots(figsize=(6, 4))
    if finite:
        ax.plot(finite, [lower_bound(dag, M) - fixed for M in finite], "k--", label="lower bound")
        ax.plot(finite, [upper_bound(dag, M) - fixed for M in finite], "k:", label="2-optimal upper bound")
        for method in sorted({k[0] for k in ctx.plans}):
            pts = [(M, ctx.plans[(method, M)].io.activation_traffic) for M in finite if (method, M) in ctx.plans]
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.set_xscale("log", base=2)
    ax.set_xlabel("fast memory M (slots)")
    ax.set_ylabel("loads + stores")
    ax.set_title(f"{dag.n_edges:,} edges, {dag.n_computed:,} computed neurons")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
