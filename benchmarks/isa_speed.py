"""Each forward path's time in the AVX2 build against the generic (SSE2) build of the same code, on one
thread: the issue's "AVX2 >= 1.5x generic" check. The ISA is fixed per process (IOSPARSE_ISA), so every
(ISA, network) pair runs in its own child process; time = median thread CPU time of 7 calls after 2 warm-ups.

    python benchmarks/isa_speed.py                # MLP 2048^3-512 90 % (B = 1, 8, 16, 64), RadiX-Net 1024 x 30 (B = 64)
    python benchmarks/isa_speed.py --smoke        # tiny nets, a few seconds
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
from torch import nn
from torch_iosparse import SparseDAG, ops, generate
net_name, width, batches, paths = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")], sys.argv[4].split(",")
torch.manual_seed(0)
if net_name == "mlp":
    sizes = [width, width, width, width // 4]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(b, a) < 0.1)
        layers += [lin, nn.ReLU()]
    dag = SparseDAG.from_module(nn.Sequential(*layers[:-1]))
else:
    dag = generate.radix_net(width, 30 if width >= 1024 else 4)
w, b = dag.weight.float(), dag.bias.float()
for B in batches:
    x = torch.randn(B, dag.n_inputs)
    for p in paths:
        net = ops.prepare(dag, memory="auto", strategy=p, tune=False)
        f = lambda: ops.dag_forward(x, w, b, net.buffers, net.meta)
        f(); f()
        ts = []
        for _ in range(7):
            t = time.thread_time(); f(); ts.append(time.thread_time() - t)
        print(net_name, B, p, sorted(ts)[3] * 1e3, flush=True)
"""


def run(isa, args):
    env = dict(os.environ, IOSPARSE_ISA=isa, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, check=True)
    return {(n, int(B), p): float(t) for n, B, p, t in (line.split() for line in out.stdout.splitlines())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny nets")
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from torch_iosparse.backends.cpu import hardware
    cases = ([("mlp", "256", "1,16", "block,level,program"), ("radix", "256", "64", "panel,block")] if a.smoke else
             [("mlp", "2048", "1,8,16,64", "block,level,program"), ("radix", "1024", "64", "panel,block,level,program")])
    info = hardware.detect()
    print(f"machine: {hardware.cpu_model()}, {info.isa}, L1d {info.l1d_bytes >> 10} KiB, L2 {info.l2_bytes >> 10} "
          f"KiB/core, L3 {info.l3_bytes >> 20} MiB; 1 thread\n")
    print("| network | B | path | AVX2 ms | generic ms | AVX2 speed-up |\n|---|---|---|---|---|---|")
    for case in cases:
        fast, base = run("avx2", case), run("generic", case)
        for key in fast:
            print(f"| {key[0]} {case[1]} | {key[1]} | {key[2]} | {fast[key]:.2f} | {base[key]:.2f} | "
                  f"{base[key] / fast[key]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
