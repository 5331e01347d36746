"""The block path of iosparse::dag_forward (kernels/cpu/block.cpp): level by level, each
neuron's edges visited one source block (consecutive neurons) at a time. Forward == dag.forward_reference
on random DAGs, every activation, both dtypes, every tile width, block size and chunk size; outputs
poisoned; the layout covers every edge once; corrupt block buffers raise; old buffers without blocks
still run; the block-ordered weight cache follows weight updates; other ISAs; the strategy picks it for
pruned MLPs. (gradcheck and opcheck: tests/ops/test_dag_forward.py, with every strategy.)"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_iosparse.testing.networks import pruned_mlp
from torch_iosparse.testing.checks import run_under_isa, tol
from torch_iosparse.testing.networks import ALL_ACTIVATIONS, random_dags
from torch_iosparse import SparseDAG, ops
from torch_iosparse.backends.cpu import strategy
from torch_iosparse.graph.generate import radix_net

pytestmark = pytest.mark.usefixtures("poison_buffers")  # conftest: outputs filled with NaN before each call


def with_blocks(net, block_sources=None, chunk_edges=ops.BLOCK_CHUNK_EDGES):
    """net's buffers and meta with blocks built by the given parameters, strategy forced to block."""
    bufs = dict(net.buffers, **ops.block_buffers(net.buffers, block_sources=block_sources, chunk_edges=chunk_edges))
    return bufs, dict(net.meta, strategy=ops.STRATEGIES["block"])


def check_block_invariants(dag, bufs, block_sources):
    """Chunks cover the level order; every edge once, under its target, from base + local == its source,
    sources of one segment inside one block of ``block_sources`` neurons."""
    cs, cr, ce = (bufs[k].numpy() for k in ("block_chunk_seg", "block_chunk_row", "block_chunk_edge"))
    seg = bufs["block_seg"].numpy().reshape(-1, 3)
    local, edge = bufs["block_local"].numpy().astype(np.int64), bufs["block_edge"].numpy()
    level_neuron = bufs["level_neuron"].numpy()
    assert cr[0] == 0 and cr[-1] == dag.n_computed and np.all(np.diff(cr) >= 1)
    assert cs[-1] == len(seg) and ce[-1] == dag.n_edges
    k = 0
    for c in range(len(cs) - 1):
        rows = set(level_neuron[cr[c]:cr[c + 1]].tolist())
        for t, base, cnt in seg[cs[c]:cs[c + 1]]:
            assert t in rows and base % block_sources == 0 and cnt >= 1
            e = edge[k:k + cnt]
            assert np.all(dag.in_src[e] == base + local[k:k + cnt])
            assert np.all((dag.in_ptr[t] <= e) & (e < dag.in_ptr[t + 1]))
            k += cnt
        assert k == ce[c + 1]
    assert sorted(edge.tolist()) == list(range(dag.n_edges))


@given(dag=random_dags(), batch=st.sampled_from([0, 1, 3, 17, 40, 64, 130, 1000]),
       dtype=st.sampled_from([torch.float32, torch.float64]), block_sources=st.sampled_from([1, 3, 16, 256]),
       chunk_edges=st.sampled_from([1, 7, 1 << 16]))
@settings(max_examples=60)
def test_block_forward_matches_reference(dag, batch, dtype, block_sources, chunk_edges):
    net = ops.prepare(dag, memory=None, dtype=dtype)
    bufs, meta = with_blocks(net, block_sources, chunk_edges)
    check_block_invariants(dag, bufs, block_sources)
    x = torch.randn(batch, dag.n_inputs, dtype=dtype) * 2
    got = ops.dag_forward(x, dag.weight.to(dtype), dag.bias.to(dtype), bufs, meta)
    assert got.shape == (batch, dag.n_outputs) and got.dtype == dtype
    torch.testing.assert_close(got, dag.forward_reference(x.double()).to(dtype), **tol(dtype))


@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_every_activation(act, dtype):
    model = pruned_mlp([300, 40, 40, 7], 0.3, [act], seed=3)
    dag = SparseDAG.from_module(model)
    net = ops.prepare(dag, memory=4, strategy="block")
    x = torch.randn(70, 300, dtype=torch.float64) * 3
    for bufs, meta in ((net.buffers, net.meta), with_blocks(net, 5, 64)):
        got = ops.dag_forward(x.to(dtype), dag.weight.to(dtype), dag.bias.to(dtype), bufs, meta)
        torch.testing.assert_close(got, model(x).detach().to(dtype), **tol(dtype))


def test_block_non_contiguous_and_transposed_input():
    dag = SparseDAG.from_module(pruned_mlp([64, 48, 10], 0.2, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, strategy="block")
    xt = torch.randn(64, 33).t()  # [33, 64], transposed storage
    xs = torch.randn(33, 128)[:, ::2]  # strided columns
    for x in (xt, xs):
        torch.testing.assert_close(ops.dag_forward(x, dag.weight, dag.bias, net.buffers, net.meta),
                                   dag.forward_reference(x.double()).float(), **tol(torch.float32))


def test_multi_edges_and_skip_edges():
    """A repeated (source, target) pair and edges that skip levels (sources from any earlier level)."""
    md = SparseDAG.from_edges(2, [0, 0, 1, 0, 2, 2, 1, 3], [2, 2, 2, 3, 3, 3, 4, 4],
                              [0.5, -1.0, 2.0, 1.5, 0.25, 0.75, -0.5, 1.25], [0.0, 0.0, 0.1, -0.2, 0.3],
                              activation="tanh", dtype=torch.float64)
    net = ops.prepare(md, memory=None)
    for bs in (1, 2, 256):
        bufs, meta = with_blocks(net, bs, 1)
        check_block_invariants(md, bufs, bs)
        x = torch.randn(19, 2, dtype=torch.float64)
        torch.testing.assert_close(ops.dag_forward(x, md.weight, md.bias, bufs, meta), md.forward_reference(x))


# gradcheck and opcheck of the block path: tests/ops/test_dag_forward.py (with every strategy).


def test_corrupt_block_buffers_raise():
    dag = SparseDAG.from_module(pruned_mlp([40, 30, 20], 0.3, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, memory=None, strategy="block")
    bufs0, meta = with_blocks(net, 8, 50)
    x = torch.rand(20, 40)
    w, b = dag.weight, dag.bias
    ops.dag_forward(x, w, b, bufs0, meta)
    seg = bufs0["block_seg"].view(-1, 3)
    edits = [("block_edge", 0, 10**6), ("block_edge", 1, int(bufs0["block_edge"][0])),  # out of range; twice
             ("block_local", 0, (int(bufs0["block_local"][0]) + 1) % 8),  # points at another source
             ("block_seg", 0, 0), ("block_seg", 3, int(seg[-1, 0])),  # target an input; a row of another chunk
             ("block_seg", 2, int(seg[0, 2]) + 1),  # count beyond the chunk
             ("block_chunk_row", 1, 0), ("block_chunk_edge", 1, 10**6), ("block_chunk_seg", 1, 10**6),
             ("block_chunk_row", 1, 1 << 40)]  # far beyond the rows (was read before the order check)
    for key, idx, value in edits:
        bufs = dict(bufs0)
        bufs[key] = bufs[key].clone()
        bufs[key][idx] = value
        with pytest.raises(ValueError, match="corrupt|block"):
            ops.dag_forward(x, w, b, bufs, meta)
    # an in-place change after a successful call is noticed (version counter)
    ok = dict(bufs0, block_local=bufs0["block_local"].clone())
    ops.dag_forward(x, w, b, ok, meta)
    ok["block_local"][0] = (int(ok["block_local"][0]) + 1) % 8
    with pytest.raises(ValueError, match="corrupt"):
        ops.dag_forward(x, w, b, ok, meta)


def test_build_blocks_rejects_bad_arguments():
    dag = radix_net(32, 2, 4)
    net = ops.prepare(dag, memory=None)
    for kw in (dict(block_sources=0), dict(block_sources=257), dict(chunk_edges=0)):
        with pytest.raises(ValueError, match="block_sources|chunk_edges"):
            ops.block_buffers(net.buffers, **kw)
    bad = dict(net.buffers, in_src=net.buffers["in_src"].clone())
    bad["in_src"][3] = 10**6
    with pytest.raises(ValueError, match="in_src"):
        ops.block_buffers(bad)
    bad = dict(net.buffers, in_ptr=net.buffers["in_ptr"].clone())
    bad["in_ptr"][40] = 1 << 40  # not ascending: both native builders check before following it
    for build in (ops.block_buffers, ops.panel_buffers):
        with pytest.raises(ValueError, match="in_ptr"):
            build(bad)


def test_buffers_without_blocks_still_run_and_refuse_the_block_strategy():
    """Networks prepared before the block path existed (no block buffers or meta keys) run as before."""
    dag = SparseDAG.from_module(pruned_mlp([6, 8, 3], 0.5, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, memory=3)
    old_bufs = {k: v for k, v in net.buffers.items() if k not in ops.BLOCK_KEYS}
    old_meta = {k: v for k, v in net.meta.items() if not k.startswith("block_")}
    x = torch.randn(70, 6)
    torch.testing.assert_close(ops.dag_forward(x, dag.weight, dag.bias, old_bufs, old_meta),
                               dag.forward_reference(x), **tol(torch.float32))
    with pytest.raises(ValueError, match="block"):
        ops.dag_forward(x, dag.weight, dag.bias, old_bufs, dict(old_meta, strategy=ops.STRATEGIES["block"]))


def test_block_weight_cache_follows_updates():
    """The block-ordered weights are cached per (weight tensor, version): in-place updates, a new tensor
    and whole-tensor writes through .data are all seen."""
    dag = SparseDAG.from_module(pruned_mlp([50, 30, 10], 0.3, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, strategy="block")
    x = torch.randn(40, 50)
    w = dag.weight.clone()

    def check():
        ref = SparseDAG.from_edges(dag.n_inputs, *dag.edges(), w.tolist(), dag.bias.tolist(),
                                   activation="relu", outputs=dag.outputs, dtype=torch.float64)
        torch.testing.assert_close(ops.dag_forward(x, w, dag.bias, net.buffers, net.meta),
                                   ref.forward_reference(x.double()).float(), **tol(torch.float32))
    check()
    w.mul_(-0.5)  # version bump
    check()
    w.data.add_(0.25)  # no version bump: caught by the spot check (every cell changes)
    check()
    w = w.clone() * 2  # another tensor
    check()


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_block_path_under_other_isas(isa):
    run_under_isa(isa, """
import torch
from torch_iosparse import SparseDAG, ops
from torch_iosparse.graph.generate import radix_net
dag = radix_net(64, 3, 8)
net = ops.prepare(dag, memory=None, strategy="block")
for dtype in (torch.float32, torch.float64):
    for B in (5, 20, 70):
        x = torch.randn(B, 64, dtype=dtype)
        got = ops.dag_forward(x, dag.weight.to(dtype), dag.bias.to(dtype), net.buffers, net.meta)
        torch.testing.assert_close(got, dag.forward_reference(x.double()).to(dtype), rtol=2e-4, atol=2e-4)
print("ok")
""")


def test_strategy_picks_blocks_for_pruned_mlps():
    mlp = ops.prepare(SparseDAG.from_module(pruned_mlp([1024, 1024, 256], 0.1, [ALL_ACTIVATIONS[1]],
                                                       dtype=torch.float32)))
    assert strategy.chosen(mlp.meta, 64) == "block"
    assert strategy.chosen(mlp.meta, 1) == "level"
    radix = ops.prepare(radix_net(1024, 3, 32))
    assert strategy.chosen(radix.meta, 256) == "panel"  # panels share sources: they win there
    assert radix.meta["block_chunks"] == 0 and radix.buffers["block_edge"].numel() == 0  # so no blocks built
    forced = ops.prepare(radix_net(1024, 3, 32), strategy="block")
    assert forced.meta["block_chunks"] > 0 and strategy.chosen(forced.meta, 7) == "block"
    t = {16: {"level": 1, "block": 2}, 32: {"level": 5, "block": 2}, 64: {"block": 1, "panel": 2},
         256: {"panel": 1, "block": 2}}
    assert strategy.panel_threshold(t, 16, strategy.NEVER) == 256
    assert strategy.panel_threshold(t, 16, strategy.NEVER, "block", 256) == 32
    assert strategy.panel_threshold(t, 16, 64, "block", 256) == 32
    assert strategy.panel_threshold(t, 32, strategy.NEVER, "block", 256) == 64
