"""The level path's parallel chunks (kernels/cpu/net.h::run_chunked: torch's OpenMP threads by
default, the private ChunkPool with IOSPARSE_WORKERS=pool and in forked children): forward ==
forward_reference when every level is split into many chunks shared by the caller and helper threads, with
poisoned buffers, on deep non-layered DAGs (chunks of a level must wait for all earlier levels), repeated
and concurrent calls."""
import pytest
import os
import subprocess
import sys

import torch

from torch_iosparse import SparseDAG, ops

POOL_CHECK = r"""
import threading, torch
from torch_iosparse import SparseDAG, ops
torch.set_num_threads(THREADS)
g = torch.Generator().manual_seed(SEED)
n_in, n = 16, 400
src = torch.randint(0, n, (6000,), generator=g); dst = torch.randint(0, n, (6000,), generator=g)
lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
keep = (lo != hi) & (hi >= n_in)
dag = SparseDAG.from_edges(n_in, lo[keep], hi[keep], torch.randn(int(keep.sum()), generator=g).double(),
                           n_neurons=n, activation='tanh')
assert len(dag.levels()) > 20, len(dag.levels())
for dt in (torch.float32, torch.float64):
    net = ops.prepare(dag, memory=8, strategy='level', dtype=dt)
    w, b = dag.weight.to(dt), dag.bias.to(dt)
    for B in (1, 3, 17):
        x = torch.randn(B, n_in, dtype=dt, generator=g)
        want = dag.forward_reference(x.double()).to(dt)
        for _ in range(20):  # many jobs: stale helpers must never claim chunks of a later job
            torch.testing.assert_close(ops.dag_forward(x, w, b, net.buffers, net.meta), want, rtol=2e-4, atol=2e-4)
    # concurrent callers share the pool (one job at a time)
    x = torch.randn(2, n_in, dtype=dt, generator=g)
    want = dag.forward_reference(x.double()).to(dt)
    errors = []
    def worker():
        try:
            for _ in range(10):
                torch.testing.assert_close(ops.dag_forward(x, w, b, net.buffers, net.meta), want, rtol=2e-4, atol=2e-4)
        except Exception as e:
            errors.append(e)
    ts = [threading.Thread(target=worker) for _ in range(3)]
    [t.start() for t in ts]; [t.join() for t in ts]
    assert not errors, errors
print('ok')
"""


def run_pool_check(threads, seed, chunk, workers):
    env = dict(os.environ, IOSPARSE_POISON="1", IOSPARSE_LEVEL_SERIAL="0", IOSPARSE_LEVEL_CHUNK=str(chunk),
               IOSPARSE_WORKERS=workers)
    code = POOL_CHECK.replace("THREADS", str(threads)).replace("SEED", str(seed))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("workers", ["omp", "pool"])
def test_pool_tiny_chunks_two_threads(workers):
    run_pool_check(threads=2, seed=0, chunk=1, workers=workers)  # one neuron per chunk: most interleaving


@pytest.mark.parametrize("workers", ["omp", "pool"])
def test_pool_mid_chunks_four_threads(workers):
    run_pool_check(threads=4, seed=1, chunk=300, workers=workers)  # more helpers than cores (oversubscribed)


def test_large_batch1_net_uses_pool_by_default():
    """A net above the default serial threshold (n_edges * B >= 65536) at batch 1, in process."""
    torch.manual_seed(3)
    sizes = [64, 512, 512, 32]
    src, dst, base = [], [], 0
    for a, c in zip(sizes[:-1], sizes[1:]):
        m = torch.rand(c, a) < 0.3
        d, s = m.nonzero(as_tuple=True)
        src.append(s + base)
        dst.append(d + base + a)
        base += a
    src, dst = torch.cat(src), torch.cat(dst)
    dag = SparseDAG.from_edges(sizes[0], src, dst, torch.randn(len(src)).double(), n_neurons=sum(sizes),
                               activation='relu')
    assert dag.weight.numel() >= 65536
    old = os.environ.get("IOSPARSE_POISON")
    os.environ["IOSPARSE_POISON"] = "1"
    try:
        net = ops.prepare(dag, memory=64, strategy="level")
        x = torch.randn(1, sizes[0])
        for _ in range(5):
            got = ops.dag_forward(x, dag.weight.float(), dag.bias.float(), net.buffers, net.meta)
            torch.testing.assert_close(got, dag.forward_reference(x.double()).float(), rtol=2e-4, atol=2e-4)
    finally:
        if old is None:
            del os.environ["IOSPARSE_POISON"]
        else:
            os.environ["IOSPARSE_POISON"] = old


def test_every_small_batch_width_level_path():
    """Batches 1..70 on the level path (B=1 gathers; float32 2..16 one masked vector, 17..32 two, 33..64
    four; 65+ the generic loop), float32 and float64, poisoned buffers, on a DAG with skip connections and mixed fan-in."""
    torch.manual_seed(4)
    n_in, n = 12, 90
    src = torch.randint(0, n, (900,))
    dst = torch.randint(0, n, (900,))
    lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
    keep = (lo != hi) & (hi >= n_in)
    dag = SparseDAG.from_edges(n_in, lo[keep], hi[keep], torch.randn(int(keep.sum())).double(), n_neurons=n,
                               activation="gelu")
    old = os.environ.get("IOSPARSE_POISON")
    os.environ["IOSPARSE_POISON"] = "1"
    try:
        for dt in (torch.float32, torch.float64):
            net = ops.prepare(dag, memory=8, strategy="level", dtype=dt)
            for B in list(range(1, 20)) + [31, 32, 33, 47, 63, 64, 65, 70]:
                x = torch.randn(B, n_in, dtype=dt)
                got = ops.dag_forward(x, dag.weight.to(dt), dag.bias.to(dt), net.buffers, net.meta)
                torch.testing.assert_close(got, dag.forward_reference(x.double()).to(dt), rtol=2e-4, atol=2e-4)
    finally:
        if old is None:
            del os.environ["IOSPARSE_POISON"]
        else:
            os.environ["IOSPARSE_POISON"] = old


FORK_CHECK = r"""
import os, sys, threading, time, torch
from torch_iosparse import SparseDAG, ops
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
src = torch.randint(0, 64, (4000,), generator=g)
dst = torch.randint(64, 128, (4000,), generator=g)
dag = SparseDAG.from_edges(64, src, dst, torch.randn(4000, generator=g), n_neurons=128, activation="relu")
net = ops.prepare(dag, strategy="STRATEGY")
x = torch.randn(BATCH, 64, generator=g)
want = dag.forward_reference(x)
stop = False
def busy():  # keeps the pool's locks taken while the main thread forks
    while not stop:
        ops.dag_forward(x, dag.weight, dag.bias, net.buffers, net.meta)
t = threading.Thread(target=busy)
t.start()
bad = []
for _ in range(40):
    pid = os.fork()
    if pid == 0:
        y = ops.dag_forward(x, dag.weight, dag.bias, net.buffers, net.meta)
        os._exit(0 if torch.allclose(y, want, atol=1e-4) else 3)
    deadline = time.time() + 60  # generous on a loaded machine; a deadlocked child never finishes
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:  # the child hangs on a lock it inherited locked
            os.kill(pid, 9); os.waitpid(pid, 0); status = -1
            break
        time.sleep(0.01)
    if status != 0:
        bad.append("hung" if status == -1 else f"exit status {status}")
stop = True
t.join()
print("ok" if not bad else f"{len(bad)} of 40 forked children failed: {bad}")
"""


@pytest.mark.parametrize("strategy,batch", [("level", 1), ("block", 64)])
def test_forked_child_runs_the_level_path(strategy, batch):
    # A child forked while another thread is inside the pool (or an OpenMP region, or holding the weight
    # cache's lock: block path) must not hang (DataLoader workers fork). Without the pthread_atfork reset
    # 3 of 40 children hung here.
    env = dict(os.environ, IOSPARSE_LEVEL_SERIAL="0", IOSPARSE_LEVEL_CHUNK="64")
    code = FORK_CHECK.replace("STRATEGY", strategy).replace("BATCH", str(batch))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout[-2000:], out.stderr[-3000:])


def test_pool_job_beyond_its_claim_word_runs():
    """The pool's claim word holds < 2^20 chunks: a block-path job with 1,050,000 chunks (one edge each)
    must still finish with the right result (it hung before the serial fallback)."""
    code = """
import torch
from torch_iosparse import SparseDAG, ops
N = 1050000
dag = SparseDAG.from_edges(1, [0] * N, list(range(1, N + 1)), activation="identity")
net = ops.prepare(dag, memory=None, strategy="block")
bufs = dict(net.buffers, **ops.block_buffers(net.buffers, 256, 1))
assert bufs["block_chunk_seg"].numel() - 1 >= 1 << 20
torch.set_num_threads(2)
x = torch.randn(64, 1)
y = ops.dag_forward(x, dag.weight, dag.bias, bufs, dict(net.meta, strategy=ops.STRATEGIES["block"]))
torch.testing.assert_close(y, dag.forward_reference(x.double()).float())
print("ok")
"""
    env = dict(os.environ, IOSPARSE_WORKERS="pool")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
