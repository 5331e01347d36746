"""The block layout's backward (kernels/cpu/block_backward.cpp) equals the pure-PyTorch reference backward:
random DAGs (skip edges, bias-only and unread neurons, every activation), batch sizes around its tile
widths, one and two threads, every ISA variant, non-finite values."""
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_iosparse import SparseDAG, ops
from torch_iosparse.testing.checks import run_under_isa
from torch_iosparse.testing.networks import random_dags


def native_and_reference(dag, net, x, gy, dtype):
    net_list, config = ops._op_args(net.buffers, net.meta)
    w, b = dag.weight.to(dtype), dag.bias.to(dtype)
    got = torch.ops.iosparse.dag_backward(gy, x, w, b, net_list, config)
    want = ops.reference_backward(gy.double(), x.double(), w.double(), b.double(), net_list, config)
    return got, want


def assert_gradients_close(got, want, dtype):
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for name, g, r in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g, r.to(dtype), equal_nan=True, msg=lambda m: f"{name}: {m}", **tol)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@given(dag=random_dags(max_inputs=6, max_computed=14), dtype=st.sampled_from([torch.float32, torch.float64]),
       batch=st.sampled_from([8, 9, 16, 17, 33, 64, 100]), n_threads=st.sampled_from([1, 2]),
       block_sources=st.sampled_from([1, 3, 16, None]), chunk_edges=st.sampled_from([1, 7, 1 << 16]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_block_backward_equals_reference(threads, dag, dtype, batch, n_threads, block_sources, chunk_edges):
    threads(n_threads)
    net = ops.prepare(dag, memory=4, strategy="block", dtype=dtype)
    net.buffers.update(ops.block_buffers(net.buffers, block_sources=block_sources, chunk_edges=chunk_edges))
    x = torch.randn(batch, dag.n_inputs, dtype=dtype)
    gy = torch.randn(batch, dag.n_outputs, dtype=dtype)
    assert_gradients_close(*native_and_reference(dag, net, x, gy, dtype), dtype)


def pruned_layers(sizes, density, seed=0, dtype=torch.float32):
    """A layered network with more sources per layer than one block holds (several blocks per segment run)."""
    rng = np.random.default_rng(seed)
    off = np.cumsum([0] + sizes)
    src, dst = [], []
    for k in range(len(sizes) - 1):
        a, b = np.nonzero(rng.random((sizes[k + 1], sizes[k])) < density)
        src.append(b + off[k])
        dst.append(a + off[k + 1])
    src, dst = np.concatenate(src), np.concatenate(dst)
    return SparseDAG.from_edges(sizes[0], src, dst, rng.standard_normal(src.size) / 8, rng.standard_normal(off[-1]),
                                activation="gelu", dtype=dtype)


@pytest.mark.parametrize("batch", [16, 40, 64, 130])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_block_backward_on_wide_layers(threads, batch, n_threads):
    threads(n_threads)
    dag = pruned_layers([600, 300, 280, 40], 0.2)
    net = ops.prepare(dag, memory=64, strategy="block", dtype=torch.float32)
    assert net.meta["block_chunks"] > 1
    x = torch.randn(batch, 600)
    gy = torch.randn(batch, 40)
    assert_gradients_close(*native_and_reference(dag, net, x, gy, torch.float32), torch.float32)


def test_block_backward_non_finite_values_like_the_reference():
    dag = pruned_layers([50, 30, 20], 0.3, seed=3, dtype=torch.float64)
    dag.weight[5] = float("inf")
    net = ops.prepare(dag, memory=8, strategy="block", dtype=torch.float64)
    x = torch.randn(21, 50, dtype=torch.float64)  # 21: the last tile has padding columns
    x[3, 7] = float("nan")
    x[9, 1] = float("-inf")
    gy = torch.randn(21, 20, dtype=torch.float64)
    got, want = native_and_reference(dag, net, x, gy, torch.float64)
    assert_gradients_close(got, want, torch.float64)


def test_forced_other_strategies_keep_the_level_backward_and_agree(threads):
    """Level-by-level backward (strategy forced to level) and block backward give the same gradients."""
    threads(2)
    dag = pruned_layers([300, 120, 50], 0.25, seed=1)
    x = torch.randn(48, 300)
    gy = torch.randn(48, 50)
    grads = []
    for strategy in ("level", "block"):
        net = ops.prepare(dag, memory=16, strategy=strategy)
        grads.append(native_and_reference(dag, net, x, gy, torch.float32)[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


@given(dag=random_dags(max_inputs=6, max_computed=14), dtype=st.sampled_from([torch.float32, torch.float64]),
       batch=st.sampled_from([1, 7, 8, 16, 40]), threshold=st.sampled_from([0, 8, 16, 32, ops.NEVER]))
@settings(max_examples=25, deadline=None)
def test_block_backward_min_batch_picks_the_path_and_both_equal_the_reference(dag, dtype, batch, threshold):
    """config's block_backward_min_batch (what tuning measures) moves the auto strategy's backward between
    the level and the block path; either way the gradients are the reference's."""
    net = ops.prepare(dag, memory=4, strategy="auto", dtype=dtype, tune=False)
    net.buffers.update(ops.block_buffers(net.buffers))
    net.meta.update(block_backward_min_batch=threshold,
                    block_chunks=int(net.buffers["block_chunk_seg"].numel() - 1))
    x = torch.randn(batch, dag.n_inputs, dtype=dtype)
    gy = torch.randn(batch, dag.n_outputs, dtype=dtype)
    assert_gradients_close(*native_and_reference(dag, net, x, gy, dtype), dtype)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_block_backward_under_each_isa(isa):
    code = (
        "import numpy as np, torch\n"
        "from torch_iosparse import SparseDAG, ops\n"
        "rng = np.random.default_rng(2)\n"
        "a, b = np.nonzero(rng.random((90, 300)) < 0.3)\n"
        "c, d = np.nonzero(rng.random((12, 90)) < 0.5)\n"
        "src = np.concatenate([b, d + 300]); dst = np.concatenate([a + 300, c + 390])\n"
        "dag = SparseDAG.from_edges(300, src, dst, rng.standard_normal(src.size) / 8, rng.standard_normal(402),"
        " activation='relu')\n"
        "for dt, B in ((torch.float32, 16), (torch.float32, 70), (torch.float64, 8), (torch.float64, 70)):\n"
        "    net = ops.prepare(dag, memory=12, strategy='block', dtype=dt)\n"
        "    nl, cfg = ops._op_args(net.buffers, net.meta)\n"
        "    x = torch.randn(B, 300, dtype=dt); gy = torch.randn(B, 12, dtype=dt)\n"
        "    got = torch.ops.iosparse.dag_backward(gy, x, dag.weight.to(dt), dag.bias.to(dt), nl, cfg)\n"
        "    want = ops.reference_backward(gy.double(), x.double(), dag.weight, dag.bias, nl, cfg)\n"
        "    for g, r in zip(got, want):\n"
        "        torch.testing.assert_close(g, r.to(dt), rtol=2e-4, atol=2e-4)\n"
        "print('ok')\n")
    run_under_isa(isa, code)


def test_block_sources_follow_the_l2():
    from torch_iosparse.backends.cpu import hardware
    info = hardware.detect()
    sizes = {l2: hardware.block_sources(dataclasses.replace(info, l2_bytes=l2)) for l2 in (4 << 10, 32 << 10, 1 << 20)}
    assert sizes == {4 << 10: hardware.BLOCK_MIN_SOURCES, 32 << 10: 64, 1 << 20: hardware.BLOCK_MAX_SOURCES}


def test_forward_and_backward_under_an_emulated_small_cache():
    """IOSPARSE_L2_BYTES=32K: smaller source blocks (more segments per row), same results."""
    code = (
        "import numpy as np, torch\n"
        "from torch_iosparse import SparseDAG, ops\n"
        "from torch_iosparse.backends.cpu import hardware\n"
        "assert hardware.block_sources() == 64, hardware.block_sources()\n"
        "rng = np.random.default_rng(5)\n"
        "a, b = np.nonzero(rng.random((70, 400)) < 0.3)\n"
        "src, dst = b, a + 400\n"
        "dag = SparseDAG.from_edges(400, src, dst, rng.standard_normal(src.size) / 8, rng.standard_normal(470),"
        " activation='sigmoid')\n"
        "net = ops.prepare(dag, memory=12, strategy='block')\n"
        "assert int(net.buffers['block_seg'].numel() // 3) >= 7 * 70 * 0.9\n"
        "nl, cfg = ops._op_args(net.buffers, net.meta)\n"
        "x = torch.randn(40, 400); gy = torch.randn(40, 70)\n"
        "y = torch.ops.iosparse.dag_forward(x, dag.weight.float(), dag.bias.float(), nl, cfg)\n"
        "torch.testing.assert_close(y, dag.forward_reference(x.double()).float(), rtol=2e-4, atol=2e-4)\n"
        "got = torch.ops.iosparse.dag_backward(gy, x, dag.weight.float(), dag.bias.float(), nl, cfg)\n"
        "want = ops.reference_backward(gy.double(), x.double(), dag.weight, dag.bias, nl, cfg)\n"
        "for g, r in zip(got, want):\n"
        "    torch.testing.assert_close(g, r.float(), rtol=2e-4, atol=2e-4)\n"
        "print('ok')\n")
    run_under_isa("", code, IOSPARSE_L2_BYTES="32K")
