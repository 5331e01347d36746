"""Training speed of a sparsified MLP against the models a researcher would train instead, side by side in
one run: the masked dense model (torch.nn.utils.prune), SparseProp's SparseLinear layers (optional,
benchmarks/requirements.txt) and torch_iosparse (tis.sparsify). One train step = forward + backward + SGD
step; also the forward alone (no grad) and the bytes each model saves for backward (saved-tensor hooks),
on a pruned MLP 2048-2048-2048-512 (ReLU) at 90 / 95 / 99 % sparsity and B = 16 / 64 / 256.

    python benchmarks/train_speed.py                 # full sweep, prints a table (and --out FILE appends it)
    python benchmarks/train_speed.py --smoke         # tiny sizes, a few seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anchors  # noqa: E402
import torch_iosparse as tis  # noqa: E402
from torch_iosparse import hardware  # noqa: E402


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


def saved_bytes(model, x):
    """Bytes of the tensors autograd saves for backward in one forward (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def time_best(fn, rounds):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(sizes, sparsities, batches, rounds):
    rows = []
    for sp in sparsities:
        dense = masked_mlp(sizes, sp)
        models = {"masked dense": dense, "torch_iosparse": tis.sparsify(dense)}
        sprop = sparseprop_model(dense)
        if sprop is not None:
            models["SparseProp"] = sprop
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

                res[name] = (time_best(step, rounds), time_best(fwd, rounds), saved_bytes(m, x))
            rows.append((sp, B, res))
            base = res["masked dense"][0]
            print(f"{sp:.0%} B={B}: " + ", ".join(f"{k} step {v[0] * 1e3:.1f} ms ({base / v[0]:.2f}x dense), "
                                                  f"fwd {v[1] * 1e3:.1f} ms, saved {v[2] / 2**20:.1f} MiB"
                                                  for k, v in res.items()), flush=True)
    return rows


def table(rows, threads):
    info = hardware.detect()
    head = (f"Machine: {anchors.cpu_model()}, {info.isa}, L1d {info.l1d_bytes >> 10} KiB, L2 {info.l2_bytes >> 10} "
            f"KiB/core, L3 {info.l3_bytes >> 20} MiB, {threads} threads; torch {torch.__version__}, "
            f"{anchors.sparseprop_status()}\n\n")
    names = list(rows[0][2])
    out = [head, "| sparsity | B | " + " | ".join(f"{n} step ms | {n} fwd ms | {n} saved MiB" for n in names)
           + " | ours vs masked dense (step) |", "|" + "---|" * (3 * len(names) + 3)]
    for sp, B, res in rows:
        cells = " | ".join(f"{res[n][0] * 1e3:.1f} | {res[n][1] * 1e3:.1f} | {res[n][2] / 2**20:.1f}" for n in names)
        out.append(f"| {sp:.0%} | {B} | {cells} | {res['masked dense'][0] / res['torch_iosparse'][0]:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="append the table to this file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.smoke:
        rows = bench([64, 64, 16], [0.9], [8], 2)
    else:
        rows = bench([2048, 2048, 2048, 512], [0.9, 0.95, 0.99], [16, 64, 256], a.rounds)
    text = table(rows, torch.get_num_threads())
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
