"""GPU benchmark of the Triton executor: one script for a lent H100/H200.

Stage 1 (correctness): on every network, ours == SparseDAG.forward_reference (and the dense / CSR
baselines agree too). Stage 2 (speed): CUDA events, warm-up, median of repeats, for
    ours plan (Triton): the compiled plan, slots in an L2-resident scratch
    ours plan (CUDA C++): kernels/cuda, slots in shared memory (only where nvcc is found, else nan)
    ours level (Triton): the level kernel (not the plan), row-blocked and one neuron per program
    dense cuBLAS (F.linear per layer)  and  torch CSR (cuSPARSE SpMM per layer)
on RadiX-Net-like nets (width N = 1024 … 65536, fan-in 32) and pruned MLPs at B in {1, 64, 1024}.
Prints one table and appends it, with card and date, to benchmarks/RESULTS.md.

    python benchmarks/gpu_speed.py                 # on a CUDA machine
    python benchmarks/gpu_speed.py --dry           # correctness stage only, CPU, Triton interpreter, tiny net

"weight GB/s" is the edge-weight bytes per second of the faster of our two Triton kernels and "% copy" is
that over the device-to-device copy bandwidth measured in the same run (target at B = 1: >= 60 %).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time

DRY = "--dry" in sys.argv
if DRY:  # the interpreter must be on before triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch_iosparse as tis  # noqa: E402
from torch_iosparse.backends.cuda import triton_kernels as tk  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it, **kw):
        return it

T_START = time.perf_counter()
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


# ---------------------------------------------------------------------------------------------- networks
def radix_like(width: int, depth: int, fan_in: int = 32, seed: int = 0) -> tis.SparseDAG:
    """A RadiX-Net-like layered net: layer k connects neuron j to j + d * fan_in**k (mod width),
    d = 0..fan_in-1, so every neuron has exactly ``fan_in`` in-edges and paths mix across all strides.
    Uses torch_iosparse.generate.radix_net when the planner branch provides it."""
    rng = np.random.default_rng(seed)
    try:
        from torch_iosparse.graph.generate import radix_net
    except ImportError:
        radix_net = None
    if radix_net is not None:
        dag = radix_net(width, depth, fan_in=fan_in, seed=seed)
        # random weights and biases instead of the challenge's constants (1/16 and a negative bias under
        # a ReLU cap would zero most outputs and make the correctness stage blind)
        dag.weight = torch.from_numpy(rng.standard_normal(dag.n_edges).astype(np.float32) / math.sqrt(fan_in))
        b = rng.standard_normal(dag.n_neurons).astype(np.float32) * 0.1
        b[:width] = 0
        dag.bias = torch.from_numpy(b)
        if dag.layer_sizes is None:
            dag.layer_sizes = [width] * (depth + 1)  # layered (targets are relabelled inside each layer)
        return dag
    fan_in = min(fan_in, width)
    src, dst = [], []
    j = np.arange(width)
    for k in range(depth):
        # strides fan_in**0, fan_in**1, ... while fan_in * stride <= width (no duplicate edges)
        levels = max(1, int(math.log(width, fan_in) + 1e-9)) if fan_in > 1 else 1
        stride = fan_in ** (k % levels) if fan_in > 1 else 1
        for d in range(fan_in):
            src.append(k * width + (j + d * stride) % width)
            dst.append((k + 1) * width + j)
    src, dst = np.concatenate(src), np.concatenate(dst)
    w = torch.from_numpy(rng.standard_normal(src.size).astype(np.float32) / math.sqrt(fan_in))
    b = torch.from_numpy(rng.standard_normal(width * (depth + 1)).astype(np.float32) * 0.1)
    dag = tis.SparseDAG.from_edges(width, src, dst, w, b, n_neurons=width * (depth + 1), activation="relu")
    dag.layer_sizes = [width] * (depth + 1)  # layered: to_dense_layers works
    return dag


def pruned_mlp(sizes, density: float, seed: int = 0) -> tis.SparseDAG:
    """An MLP with ReLU between layers, each Linear randomly pruned to ``density`` (unstructured)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        lin = torch.nn.Linear(sizes[k], sizes[k + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(sizes[k] * density))
            lin.weight.mul_((torch.rand(lin.weight.shape, generator=g) < density).float())
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return tis.SparseDAG.from_module(torch.nn.Sequential(*layers))


# ---------------------------------------------------------------------------------------------- runners
def compile_program(dag, plan):
    from torch_iosparse.compile.program import compile_plan
    return compile_plan(dag, plan)


class Ours:
    def __init__(self, dag, memory, device, chunk):
        t0 = time.perf_counter()
        self.plan = tis.plan(dag, memory)
        prog = compile_program(dag, self.plan)
        self.kp = tk.encode(prog, n_edges=dag.n_edges, n_neurons=dag.n_neurons, chunk=chunk, device=device)
        self.prepare_s = time.perf_counter() - t0
        self.w = dag.weight.to(device)
        self.b = dag.bias.to(device)
        self.lp = tk.encode_levels_from_dag(dag, device)  # the level kernel (small-batch path)
        self.dag, self.op_net = dag, None
        self.cxx, self.cxx_note = None, "not built"
        if device.type == "cuda":  # the on-chip (shared-memory slots) CUDA C++ variant, when nvcc is there
            try:
                from torch_iosparse.backends.cuda import gpu
                self.cxx = gpu.CudaCxxForward(prog, dag.n_edges, device)
                self.cxx_note = "ok"
            except (RuntimeError, OSError) as e:
                self.cxx_note = str(e).splitlines()[0]

    def via_op(self, x):
        """The user-facing path: torch.ops.iosparse.dag_forward on x's device (on CUDA: our Triton
        kernel, registered by torch_iosparse.backends.cuda.gpu; on CPU: the C++ kernel)."""
        if self.op_net is None:
            from torch_iosparse import ops
            from torch_iosparse.backends.cuda import gpu  # noqa: F401  (registers the CUDA kernels)
            net = ops.prepare(self.dag, self.plan, strategy="program")
            self.op_net = ({k: v.to(x.device) for k, v in net.buffers.items()}, net.meta)
        from torch_iosparse import ops
        return ops.dag_forward(x, self.w.to(x.dtype), self.b.to(x.dtype), *self.op_net)

    def level(self, x, rows=None, blocks=None):
        """The level kernels: source-sharing blocks where they pay (default), row-blocked (``blocks=False``)
        or one neuron per program (``blocks=False, rows=1``)."""
        return tk.level_forward(x, self.w.to(x.dtype), self.b.to(x.dtype), self.lp, rows_per_program=rows,
                                blocks=blocks)

    def cxx_call(self, x):
        return self.cxx(x, self.w.to(x.dtype), self.b.to(x.dtype))

    def __call__(self, x, batch_tile=None):
        return tk.forward(x, self.w.to(x.dtype), self.b.to(x.dtype), self.kp, batch_tile=batch_tile)


class DenseLayers:
    """cuBLAS baseline: dense F.linear per layer (None when the dense weights exceed ``max_bytes``)."""

    def __init__(self, dag, device, dtype, max_bytes):
        sizes = dag.layer_sizes
        need = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * torch.tensor([], dtype=dtype).element_size()
        self.ok = need <= max_bytes
        if self.ok:
            self.layers = [(W.to(device, dtype), b.to(device, dtype), a) for W, b, a in dag.to_dense_layers()]

    def __call__(self, x):
        for W, b, a in self.layers:
            x = a.apply(F.linear(x, W, b))
        return x


class CSRLayers:
    """cuSPARSE baseline: per layer y^T = W_csr @ x^T (torch CSR SpMM), + bias, activation."""

    def __init__(self, dag, device, dtype):
        off = np.cumsum([0] + dag.layer_sizes)
        src, dst = dag.edges()
        self.layers = []
        for k in range(len(dag.layer_sizes) - 1):
            sel = np.flatnonzero((dst >= off[k + 1]) & (dst < off[k + 2]))
            # in-edge order is sorted by (dst, src): already CSR row order
            rows = torch.from_numpy(dst[sel] - off[k + 1])
            cols = torch.from_numpy(src[sel] - off[k])
            crow = torch.zeros(dag.layer_sizes[k + 1] + 1, dtype=torch.int64)
            crow[1:] = torch.cumsum(torch.bincount(rows, minlength=dag.layer_sizes[k + 1]), 0)
            W = torch.sparse_csr_tensor(crow, cols, dag.weight[torch.from_numpy(sel)].to(dtype),
                                        size=(dag.layer_sizes[k + 1], dag.layer_sizes[k])).to(device)
            b = dag.bias[off[k + 1]:off[k + 2]].to(device, dtype)
            self.layers.append((W, b[:, None], dag.activation_of(int(off[k + 1]))))

    def __call__(self, x):
        h = x.t().contiguous()
        for W, b, a in self.layers:
            h = a.apply(W @ h + b)
        return h.t()


# ---------------------------------------------------------------------------------------------- timing
def time_cuda(fn, warmup=3, repeats=20, budget_s=3.0):
    """Median milliseconds of ``fn()`` over CUDA events (fewer repeats when one call is slow).
    Without CUDA (the --dry run) one wall-clock call: that only exercises the code path."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    fn()  # compiles on first use
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > 0.5 * budget_s / 3:  # a slow kernel: one more warm-up, three timed calls
        warmup, repeats = 1, 3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    t_end = time.perf_counter() + budget_s
    for _ in range(repeats):
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
        if time.perf_counter() > t_end and len(times) >= 3:
            break
    return statistics.median(times)


def copy_bandwidth(device, nbytes=1 << 30):
    """Device-to-device copy bandwidth in GB/s (read + write bytes over time)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ms = time_cuda(lambda: b.copy_(a), warmup=3, repeats=10)
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e9


def max_rel_err(y, ref):
    y, ref = y.double(), ref.double().to(y.device)
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def save_plot(rows, path, title):
    """One panel per batch size: milliseconds vs edges for each method (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
    methods = [("op", "ours (op, auto)", "o-"), ("level1", "ours level 1-row", "x:"),
               ("plan", "ours plan executor", "s:"), ("dense", "dense cuBLAS", "^--"), ("csr", "torch CSR", "v--")]
    for ax, B in zip(axes[0], batches):
        for net in ("radix", "mlp"):
            sel = sorted((r for r in rows if r["B"] == B and r["net"] == net), key=lambda r: r["edges"])
            for key, label, style in methods:
                pts = [(r["edges"], r[key]) for r in sel if r[key] == r[key]]  # drop nan
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{label} ({net})", alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("edges")
        ax.set_ylabel("ms")
        ax.set_title(f"B = {B}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def networks(args):
    if args.dry:
        return [("radix", 16, radix_like(16, 2, fan_in=4)), ("mlp", 12, pruned_mlp([12, 16, 8], 0.3))]
    nets = []
    for N in args.widths:
        nets.append(("radix", N, radix_like(N, args.depth, fan_in=args.fan_in)))
    for N in args.mlp_widths:
        nets.append(("mlp", N, pruned_mlp([N, 4 * N, 4 * N, N], args.density)))
    return nets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="correctness stage only, on CPU under the Triton interpreter")
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--mlp-widths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--depth", type=int, default=4, help="layers of the radix nets")
    ap.add_argument("--fan-in", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.1, help="kept fraction of the pruned MLP weights")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=tk.DEFAULT_CHUNK)
    ap.add_argument("--memory", type=int, default=None, help="slots M (default: choose_tiling for the largest batch)")
    ap.add_argument("--max-dense-gib", type=float, default=8.0)
    ap.add_argument("--plan-max-edges", type=float, default=6e5,
                    help="time the plan executors (25-100x slower than the level kernel on an H100) only up to this size")
    ap.add_argument("--max-seconds", type=float, default=420.0,
                    help="stop timing further networks once this much wall time has passed (device budgets)")
    ap.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    ap.add_argument("--plot", default=None,
                    help="PNG of time vs edges per batch size (default on CUDA: benchmarks/gpu_speed.png; "
                         "--dry plots only when given)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    if args.dry:
        device = torch.device("cpu")
        args.batches = [1, 5]
        args.memory = args.memory or 5  # spills on the tiny nets
        args.no_append = True
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_speed.py needs a CUDA device (or --dry for the CPU correctness stage)")
        device = torch.device("cuda")
    nets = networks(args)

    # ---- stage 1: correctness against the pure-PyTorch reference, computed on the device in float64 (fast:
    # on a lent GPU the host-side reference of the 10^7-edge nets took most of a 10-minute call)
    print("stage 1: correctness against SparseDAG.forward_reference (float64, on the device)", flush=True)
    runners = {}
    for name, N, dag in tqdm(nets, disable=args.no_progress, desc="correctness"):
        M = args.memory or tk.choose_tiling(device, max(args.batches)).memory
        ours = Ours(dag, M, device, args.chunk)
        runners[(name, N)] = ours
        check_plan = dag.n_edges <= args.plan_max_edges  # the plan executors are slow on big nets
        dense = DenseLayers(dag, device, torch.float32, args.max_dense_gib * 2**30)
        csr_layers = CSRLayers(dag, device, torch.float32)
        for B in sorted({min(args.batches), 3, 64}):
            x = torch.randn(B, dag.n_inputs, generator=torch.Generator().manual_seed(B)).to(device)
            ref = dag.forward_reference(x.double())  # computes in float64, weights upcast
            checks = [("the iosparse op", lambda: ours.via_op(x)), ("torch CSR", lambda: csr_layers(x))]
            checks += [(f"the level kernel (rows={r}, blocks={bl})", lambda r=r, bl=bl: ours.level(x, r, bl))
                       for r, bl in ((None, None), (None, False), (1, False))]
            if check_plan:
                checks.append(("the plan executor (Triton)", lambda: ours(x)))
                if ours.cxx is not None:
                    checks.append(("the plan executor (CUDA C++)", lambda: ours.cxx_call(x)))
            if dense.ok:
                checks.append(("dense", lambda: dense(x)))
            for what, fn in checks:
                try:
                    err = max_rel_err(fn(), ref)
                except ValueError as e:  # the CUDA C++ kernel: M x BT does not fit shared memory
                    if "CUDA C++" not in what:
                        raise
                    ours.cxx, ours.cxx_note = None, str(e)
                    continue
                if not err < 1e-4:
                    sys.exit(f"FAILED: {what} differs from the reference on {name} N={N} B={B}: rel err {err:.2e}")
        del dense, csr_layers
        reuse = [round(r, 1) for *_, r in ours.lp.seg_blocks]
        print(f"  ok  {name:<5} N={N:<6} edges={dag.n_edges:<9} M={ours.kp.memory:<5} reuse/segment={reuse} "
              f"loads={ours.plan.io.loads} stores={ours.plan.io.stores} prepare {ours.prepare_s:.2f}s"
              + (f"  CUDA C++: {ours.cxx_note}" if device.type == "cuda" else ""), flush=True)
    print("correctness stage passed", flush=True)

    # ---- stage 2: speed (in --dry: one untimed-quality call each, to exercise the code path)
    card = torch.cuda.get_device_properties(device).name if device.type == "cuda" else "CPU (dry run, not a timing)"
    if device.type == "cuda":  # bring the clocks up before the first timing (idle SM clock is ~345 MHz)
        a = torch.randn(4096, 4096, device=device)
        t_end = time.perf_counter() + 2.0
        while time.perf_counter() < t_end:
            a @ a
            torch.cuda.synchronize()
        del a
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 20))
    nan = float("nan")
    rows = []
    skipped = []
    for name, N, dag in tqdm(nets, disable=args.no_progress, desc="timing"):
        if time.perf_counter() - T_START > args.max_seconds:
            skipped.append(f"{name} N={N}")
            continue
        ours = runners[(name, N)]
        dense = DenseLayers(dag, device, dtype, args.max_dense_gib * 2**30)
        csr = CSRLayers(dag, device, dtype)
        time_plan = dag.n_edges <= args.plan_max_edges
        for B in args.batches:
            x = torch.randn(B, dag.n_inputs, device=device, dtype=dtype)
            r = dict(net=name, N=N, edges=dag.n_edges, B=B)
            r["op"] = time_cuda(lambda: ours.via_op(x))
            r["level"] = time_cuda(lambda: ours.level(x, blocks=False))
            r["level1"] = time_cuda(lambda: ours.level(x, rows=1, blocks=False))
            r["plan"] = time_cuda(lambda: ours(x)) if time_plan else nan
            r["cxx"] = time_cuda(lambda: ours.cxx_call(x)) if time_plan and ours.cxx is not None else nan
            r["dense"] = time_cuda(lambda: dense(x)) if dense.ok else nan
            try:
                r["csr"] = time_cuda(lambda: csr(x))
            except RuntimeError:  # e.g. no half-precision CSR kernel
                r["csr"] = nan
            wbytes = dag.n_edges * torch.tensor([], dtype=dtype).element_size()
            r["ratio"] = r["csr"] / r["op"]
            r["gbs"] = wbytes / (r["op"] * 1e-3) / 1e9
            r["copy"] = 100 * r["gbs"] / bw
            rows.append(r)
            print("  timed " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)  # a run stopped by its time limit still leaves these lines
        del dense, csr
        if device.type == "cuda":
            torch.cuda.empty_cache()

    cols = [("op", "ours: iosparse op (auto) ms"), ("level", "level rows, no blocks ms"), ("level1", "level 1-row ms"),
            ("plan", "plan executor (Triton) ms"), ("cxx", "plan executor (CUDA C++) ms"), ("dense", "dense cuBLAS ms"),
            ("csr", "torch CSR ms")]
    hdr = ("| net | N | edges | B | " + " | ".join(c[1] for c in cols)
           + " | CSR / ours | ours weight GB/s | % copy |\n|" + "---|" * (4 + len(cols) + 3))
    lines = [hdr] + [f"| {r['net']} | {r['N']} | {r['edges']} | {r['B']} | "
                     + " | ".join(f"{r[k]:.3f}" for k, _ in cols)
                     + f" | **{r['ratio']:.2f}** | {r['gbs']:.1f} | {r['copy']:.1f} |" for r in rows]
    if any(r["plan"] != r["plan"] for r in rows):
        lines.append(f"\n(plan executors timed only on nets of at most {args.plan_max_edges:.0f} edges: "
                     "--plan-max-edges; nan = not timed)")
    if skipped:
        lines.append(f"\n(not timed, --max-seconds {args.max_seconds:g} reached: {', '.join(skipped)})")
    table = "\n".join(lines)
    head = (f"## gpu_speed.py — {card}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
            + ("tiny nets of the dry run, " if args.dry else
               f"radix depth {args.depth}, fan-in {args.fan_in}, MLP [N, 4N, 4N, N] density {args.density}, ")
            + f"dtype {args.dtype}, "
            f"chunk {args.chunk}, copy bandwidth {bw:.0f} GB/s, torch {torch.__version__}\n\n")
    print()
    print(head + table)
    plot = args.plot or (None if args.dry else os.path.join(os.path.dirname(RESULTS), "gpu_speed.png"))
    if plot and rows:
        save_plot(rows, plot, head.splitlines()[0].lstrip("# "))
        print(f"plot written to {plot}")
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write("\n" + head + table + "\n")
        print(f"\nappended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
