"""Training speed of a sparsified MLP against the models a researcher would train instead, side by side in
one run: the masked dense model (torch.nn.utils.prune), SparseProp's SparseLinear layers (optional,
benchmarks/requirements.txt) and torch_iosparse (tis.sparsify). One train step = forward + backward + SGD
step; also the forward alone (no grad), on a pruned MLP 2048-2048-2048-512 (ReLU) at 90 / 95 / 99 % sparsity
and B = 16 / 64 / 256.

Memory, two measures:
- saved MiB: the bytes autograd saves for backward in one forward (saved-tensor hooks, distinct storages),
  "step / all": the tensors a step allocates for backward (not the model's parameters or buffers, not the
  input) / all of them (also the parameters and buffers the backward reads, which exist anyway). SparseProp
  keeps its input on a ctx attribute instead of saving it, which the hooks do not see: its saved column
  undercounts, its peak column does not;
- peak MiB: how much a train step raises the resident set (VmHWM after the step minus VmRSS before it, the
  peak reset through /proc/self/clear_refs), measured in a fresh process per configuration holding only that
  model. torch allocates on the CPU through malloc, so this sees activations, gradients and temporaries;
  memory the allocator kept from the untimed forward before it is not counted again.

    python benchmarks/train_speed.py                 # full sweep, prints a table (and --out FILE appends it)
    python benchmarks/train_speed.py --smoke         # tiny sizes, a few seconds
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anchors  # noqa: E402
import torch_iosparse as tis  # noqa: E402
from torch_iosparse.backends.cpu import hardware  # noqa: E402


def masked_mlp(sizes, sparsity, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    for lin in model[::2]:
        prune.l1_unstructured(lin, "weight", amount=sparsity)
    return model


def sparseprop_model(model):
    """The same network with SparseProp's SparseLinear layers (None when SparseProp is absent)."""
    if not anchors.sparseprop_available():
        return None
    from sparseprop.modules import SparseLinear
    layers = []
    for m in model:
        if isinstance(m, nn.Linear):
            lin = nn.Linear(m.in_features, m.out_features)
            with torch.no_grad():
                lin.weight.copy_(m.weight)
                lin.bias.copy_(m.bias)
            layers.append(SparseLinear.from_dense(lin))
        else:
            layers.append(copy.deepcopy(m))
    return nn.Sequential(*layers)


def saved_tensor_bytes(model, x):
    """(step, all): bytes of the tensors autograd saves for backward in one forward of ``model`` on ``x``,
    distinct storages; ``step`` leaves out the model's parameters and buffers and the input."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    return sum(v for k, v in seen.items() if k not in owned), sum(seen.values())


def time_best(fn, rounds):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


MODELS = ("masked dense", "torch_iosparse", "SparseProp")


def build(name, sizes, sparsity):
    """Model ``name`` on the masked dense MLP (None for SparseProp when it is absent)."""
    dense = masked_mlp(sizes, sparsity)
    if name == "masked dense":
        return dense
    if name == "torch_iosparse":
        return tis.sparsify(dense)
    return sparseprop_model(dense)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def step_peak(name, sizes, sparsity, batch):
    """In this (fresh) process: MiB a train step of model ``name`` adds to the resident set at its peak."""
    model = build(name, sizes, sparsity)
    gc.collect()
    x = torch.randn(batch, sizes[0])
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    with torch.no_grad():
        model(x)  # lazy setup (the measured path choice, SparseProp's buffers) is not a step's memory
    gc.collect()
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        peak_source = "VmHWM"
    except OSError:  # no Linux /proc: the process's lifetime peak (model construction included)
        before, peak_source = 0, "ru_maxrss"
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()
    peak = _status_kib("VmHWM") if peak_source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - before) / 1024, "source": peak_source}


def measure_peak(name, sizes, sparsity, batch, threads):
    """:func:`step_peak` in a fresh Python process (nothing else allocated there)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--step-peak", name, str(sparsity), str(batch),
           "--sizes", ",".join(map(str, sizes)), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def bench(sizes, sparsities, batches, rounds, threads):
    rows = []
    for sp in sparsities:
        models = {n: m for n in MODELS if (m := build(n, sizes, sp)) is not None}
        dense = models["masked dense"]
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in models.items()}
        for B in batches:
            x = torch.randn(B, sizes[0])
            ref = dense(x).detach()
            for name, m in models.items():
                torch.testing.assert_close(m(x).detach(), ref, rtol=1e-3, atol=1e-3)  # never time a wrong model
            res = {}
            for name, m in models.items():
                opt = opts[name]

                def step(m=m, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    m(x).square().mean().backward()
                    opt.step()

                def fwd(m=m):
                    with torch.no_grad():
                        m(x)

                res[name] = (time_best(step, rounds), time_best(fwd, rounds), *saved_tensor_bytes(m, x),
                             measure_peak(name, sizes, sp, B, threads))
            rows.append((sp, B, res))
            base = res["masked dense"][0]
            print(f"{sp:.0%} B={B}: " + ", ".join(
                f"{k} step {v[0] * 1e3:.1f} ms ({base / v[0]:.2f}x dense), fwd {v[1] * 1e3:.1f} ms, saved "
                f"{v[2] / 2**20:.1f} / {v[3] / 2**20:.1f} MiB, peak +{v[4]:.1f} MiB" for k, v in res.items()),
                flush=True)
    return rows


def machine_line(threads):
    info = hardware.detect()
    return (f"Machine: {anchors.cpu_model()}, {info.isa}, L1d {info.l1d_bytes >> 10} KiB, L2 {info.l2_bytes >> 10} "
            f"KiB/core, L3 {info.l3_bytes >> 20} MiB, {threads} threads; torch {torch.__version__}, "
            f"{anchors.sparseprop_status()}")


def table(rows, threads):
    names = list(rows[0][2])
    out = [machine_line(threads) + "\n", "Saved MiB: for backward, step / all (module docstring); peak MiB: what "
           "one train step adds to the resident set (a fresh process per cell).\n",
           "| sparsity | B | " + " | ".join(f"{n} step ms | {n} fwd ms | {n} saved MiB | {n} peak MiB" for n in names)
           + " | ours vs masked dense (step) |", "|" + "---|" * (4 * len(names) + 3)]
    for sp, B, res in rows:
        cells = " | ".join(f"{res[n][0] * 1e3:.1f} | {res[n][1] * 1e3:.1f} | {res[n][2] / 2**20:.2f} / "
                           f"{res[n][3] / 2**20:.1f} | {res[n][4]:.1f}" for n in names)
        out.append(f"| {sp:.0%} | {B} | {cells} | {res['masked dense'][0] / res['torch_iosparse'][0]:.2f}x |")
    return "\n".join(out) + "\n"


SIZES = [2048, 2048, 2048, 512]
SMOKE_SIZES = [64, 64, 64, 16]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one sparsity and batch size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="append the table to this file")
    ap.add_argument("--step-peak", nargs=3, metavar=("MODEL", "SPARSITY", "BATCH"), default=None,
                    help=argparse.SUPPRESS)  # one peak-memory measurement (run by measure_peak in a fresh process)
    ap.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.step_peak:
        name, sp, B = a.step_peak
        print(json.dumps(step_peak(name, [int(v) for v in a.sizes.split(",")], float(sp), int(B))))
        return 0
    threads = torch.get_num_threads()
    if a.smoke:
        rows = bench(SMOKE_SIZES, [0.9], [8], 2, threads)
    else:
        rows = bench(SIZES, [0.9, 0.95, 0.99], [16, 64, 256], a.rounds, threads)
    text = table(rows, threads)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
