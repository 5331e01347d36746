"""The panel path of iosparse::dag_forward (kernels/cpu/panel.cpp): neurons of a level that
share sources are computed together over the union of their sources. Forward == dag.forward_reference on
random DAGs, every activation, both dtypes, every tile and panel shape; outputs poisoned; corrupt panel
buffers raise; the builder groups sliding-window (RadiX-Net) layers; the strategy picks it where the model
says it wins."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_iosparse.testing.networks import pruned_mlp, radix_like
from torch_iosparse.testing.checks import run, run_under_isa, tol
from torch_iosparse.testing.networks import ALL_ACTIVATIONS, random_dags
from torch_iosparse import SparseDAG, ops
from torch_iosparse.backends.cpu import strategy
from torch_iosparse.graph.generate import radix_net


pytestmark = pytest.mark.usefixtures("poison_buffers")  # conftest: outputs filled with NaN before each call


def with_panels(net, max_rows=8, min_efficiency=0.75, tile=None):
    """net's buffers and meta with panels built by the given parameters, strategy forced to panel."""
    bufs = dict(net.buffers, **ops.panel_buffers(net.buffers, max_rows=max_rows, min_efficiency=min_efficiency))
    meta = dict(net.meta, strategy=ops.STRATEGIES["panel"])
    if tile is not None:
        meta["panel_tile"] = tile
    return bufs, meta


def check_panel_invariants(dag, bufs):
    """Every computed neuron once, every edge once, cells join their column's source to their row."""
    pp, ps, rp, pt = (bufs[k].numpy() for k in ("panel_ptr", "panel_src", "panel_row_ptr", "panel_target"))
    ep, pe = bufs["panel_edge_ptr"].numpy(), bufs["panel_edge"].numpy()
    assert sorted(pt.tolist()) == list(range(dag.n_inputs, dag.n_neurons))
    seen = []
    for p in range(len(pp) - 1):
        R = rp[p + 1] - rp[p]
        block = pe[ep[p]:ep[p + 1]].reshape(-1, R)
        for u, row in enumerate(block):
            for r, e in enumerate(row):
                if e >= 0:
                    assert dag.in_src[e] == ps[pp[p] + u]
                    assert dag.in_ptr[pt[rp[p] + r]] <= e < dag.in_ptr[pt[rp[p] + r] + 1]
                    seen.append(int(e))
    assert sorted(seen) == list(range(dag.n_edges))


@given(dag=random_dags(), batch=st.sampled_from([0, 1, 3, 17, 64, 130]),
       dtype=st.sampled_from([torch.float32, torch.float64]), tile=st.sampled_from([8, 16, 32, 64]),
       max_rows=st.integers(1, 8), min_efficiency=st.sampled_from([0.0, 0.3, 0.75, 1.0]))
@settings(max_examples=60)
def test_panel_forward_matches_reference(dag, batch, dtype, tile, max_rows, min_efficiency):
    net = ops.prepare(dag, memory=None, dtype=dtype)
    bufs, meta = with_panels(net, max_rows, min_efficiency, tile)
    check_panel_invariants(dag, bufs)
    assert int(torch.diff(bufs["panel_row_ptr"]).max()) <= max_rows
    x = torch.randn(batch, dag.n_inputs, dtype=dtype) * 2
    w, b = dag.weight.to(dtype), dag.bias.to(dtype)
    got = ops.dag_forward(x, w, b, bufs, meta)
    assert got.shape == (batch, dag.n_outputs) and got.dtype == dtype
    torch.testing.assert_close(got, dag.forward_reference(x.double()).to(dtype), **tol(dtype))


@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_panel_every_activation(act, dtype):
    model = pruned_mlp([12, 20, 20, 7], 0.4, [act], seed=3)
    dag = SparseDAG.from_module(model)
    net = ops.prepare(dag, memory=4, strategy="panel")
    x = torch.randn(37, 12, dtype=torch.float64) * 3
    # min_efficiency 0: panels of 8 rows with many zero-weight cells
    for bufs, meta in ((net.buffers, net.meta), with_panels(net, 8, 0.0, 32)):
        got = ops.dag_forward(x.to(dtype), dag.weight.to(dtype), dag.bias.to(dtype), bufs, meta)
        torch.testing.assert_close(got, model(x).detach().to(dtype), **tol(dtype))


@pytest.mark.parametrize("width,depth,fan", [(256, 3, 32), (2048, 2, 32)])
def test_sliding_window_layers_form_full_panels(width, depth, fan):
    """generate.radix_net layers are sliding windows over the previous layer: the builder finds panels of
    8 rows whose union has fan + 7 sources (efficiency fan / (fan + 7) = 0.82 >= PANEL_MIN_EFFICIENCY)."""
    dag = radix_net(width, depth, fan)
    net = ops.prepare(dag, memory=None)
    rows = torch.diff(net.buffers["panel_row_ptr"])
    cols = torch.diff(net.buffers["panel_ptr"])
    assert (rows == 8).float().mean() > 0.9
    assert int(cols[rows == 8].min()) >= fan and float(cols[rows == 8].float().mean()) <= fan + 7 + 1
    assert strategy.panels_useful(net.meta)
    x = torch.rand(70, width)
    for tile in (16, 32, 64):
        meta = dict(net.meta, strategy=ops.STRATEGIES["panel"], panel_tile=tile)
        got = ops.dag_forward(x, dag.weight.float(), dag.bias.float(), net.buffers, meta)
        torch.testing.assert_close(got, dag.forward_reference(x.double()).float(), **tol(torch.float32))


def test_identical_source_sets_and_multi_edges():
    dag = radix_like(16, 3, 4)
    net = ops.prepare(dag, memory=None)
    bufs, meta = with_panels(net, 4, 1.0)
    assert int(torch.diff(bufs["panel_row_ptr"]).min()) == 4  # groups of 4 with identical sources: efficiency 1
    x = torch.randn(21, 16, dtype=torch.float64)
    torch.testing.assert_close(ops.dag_forward(x, dag.weight, dag.bias, bufs, meta), dag.forward_reference(x))
    # a repeated (source, target) pair gets a column of its own inside the panel
    md = SparseDAG.from_edges(2, [0, 0, 1, 0, 2, 2], [2, 2, 2, 3, 3, 3], [0.5, -1.0, 2.0, 1.5, 0.25, 0.75],
                              [0.0, 0.0, 0.1, -0.2], activation="identity", dtype=torch.float64)
    mnet = ops.prepare(md, memory=None)
    for rows in (1, 2, 8):
        bufs, meta = with_panels(mnet, rows, 0.0)
        check_panel_invariants(md, bufs)
        x = torch.randn(5, 2, dtype=torch.float64)
        torch.testing.assert_close(ops.dag_forward(x, md.weight, md.bias, bufs, meta), md.forward_reference(x))


# gradcheck and opcheck of the panel and block paths: tests/ops/test_dag_forward.py (with the other strategies).


def test_corrupt_panel_buffers_raise():
    dag = radix_net(32, 2, 4)
    net = ops.prepare(dag, memory=None, strategy="panel")
    x = torch.rand(20, 32)
    w, b = dag.weight.float(), dag.bias.float()
    ops.dag_forward(x, w, b, net.buffers, net.meta)
    edits = [("panel_src", 0, 10**6), ("panel_src", 0, 40),  # out of range; a neuron not computed yet
             ("panel_target", 0, 0), ("panel_target", 1, int(net.buffers["panel_target"][0])),  # input; twice
             ("panel_edge", 0, 10**6), ("panel_edge", 0, -1),  # out of range; an edge left out
             ("panel_row_ptr", 1, 20)]
    for key, idx, value in edits:
        bufs = dict(net.buffers)
        bufs[key] = bufs[key].clone()
        if key == "panel_edge" and value == -1:
            idx = int((bufs[key] >= 0).nonzero()[0])
        bufs[key][idx] = value
        with pytest.raises(ValueError, match="corrupt|panel"):
            ops.dag_forward(x, w, b, bufs, net.meta)
    # an in-place change after a successful call is noticed (version counter)
    ok = dict(net.buffers, panel_edge=net.buffers["panel_edge"].clone())
    ops.dag_forward(x, w, b, ok, net.meta)
    first = int((ok["panel_edge"] >= 0).nonzero()[0])
    ok["panel_edge"][first] = -1
    with pytest.raises(ValueError, match="corrupt"):
        ops.dag_forward(x, w, b, ok, net.meta)


def test_build_panels_rejects_bad_arguments():
    dag = radix_net(32, 2, 4)
    net = ops.prepare(dag, memory=None)
    with pytest.raises(ValueError, match="max_rows"):
        ops.panel_buffers(net.buffers, max_rows=9)
    with pytest.raises(ValueError, match="max_rows"):
        ops.panel_buffers(net.buffers, max_rows=0)
    bad = dict(net.buffers, in_src=net.buffers["in_src"].clone())
    bad["in_src"][3] = 10**6
    with pytest.raises(ValueError, match="in_src"):
        ops.panel_buffers(bad)


def test_buffers_without_panels_still_run_and_refuse_the_panel_strategy():
    """Networks prepared before the panel path existed (no panel buffers or meta keys) run as before."""
    dag = SparseDAG.from_module(pruned_mlp([6, 8, 3], 0.5, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, memory=3)
    old_bufs = {k: v for k, v in net.buffers.items() if k not in ops.PANEL_KEYS}
    old_meta = {k: v for k, v in net.meta.items() if k not in ("panel_min_batch", "panel_tile")}
    x = torch.randn(70, 6)
    torch.testing.assert_close(ops.dag_forward(x, dag.weight, dag.bias, old_bufs, old_meta),
                               dag.forward_reference(x), **tol(torch.float32))
    with pytest.raises(ValueError, match="panel"):
        ops.dag_forward(x, dag.weight, dag.bias, old_bufs, dict(old_meta, strategy=ops.STRATEGIES["panel"]))


def test_strategy_picks_panels_for_sliding_windows_only():
    radix = ops.prepare(radix_net(1024, 3, 32))
    assert strategy.chosen(radix.meta, 256) == "panel"
    assert strategy.chosen(radix.meta, 1) == "level"
    mlp = ops.prepare(SparseDAG.from_module(pruned_mlp([64, 64, 16], 0.1, [ALL_ACTIVATIONS[1]], dtype=torch.float32)))
    assert not strategy.panels_useful(mlp.meta)  # random rows share few sources: single-row panels
    assert all(strategy.chosen(mlp.meta, b) != "panel" for b in (1, 16, 64, 256, 1024))
    t = {1: {"level": 1, "program": 2, "panel": 3}, 64: {"level": 5, "program": 2, "panel": 1},
         128: {"level": 9, "program": 3, "panel": 4}, 256: {"level": 9, "program": 5, "panel": 4}}
    assert strategy.panel_threshold(t, 1, strategy.NEVER) == 256  # 128 breaks the run
    assert strategy.panel_threshold(t, 1, 256) == strategy.NEVER


def test_auto_with_panels_matches_reference():
    dag = radix_net(256, 3, 16)
    net = ops.prepare(dag)
    for batch in (1, 5, 40, 300):
        x = torch.rand(batch, 256)
        torch.testing.assert_close(run(net, x, dag), dag.forward_reference(x.double()).float(), **tol(torch.float32))


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_panel_isa_fallbacks(isa):
    code = (
        "import torch\n"
        "from torch_iosparse import ops\n"
        "from torch_iosparse.graph.generate import radix_net\n"
        "dag = radix_net(64, 3, 8)\n"
        "net = ops.prepare(dag, memory=None, strategy='panel')\n"
        "for dt in (torch.float32, torch.float64):\n"
        "    for tile in (16, 32, 64):\n"
        "        x = torch.rand(50, 64, dtype=dt)\n"
        "        y = ops.dag_forward(x, dag.weight.to(dt), dag.bias.to(dt), net.buffers, dict(net.meta, panel_tile=tile))\n"
        "        torch.testing.assert_close(y, dag.forward_reference(x.double()).to(dt), rtol=2e-4, atol=2e-4)\n"
        "print('ok')\n")
    run_under_isa(isa, code)


def test_concurrent_callers_on_the_chunk_pool():
    """Program and panel tiles run on the shared chunk pool (one job at a time): callers from several
    Python threads at once all get their own, correct results."""
    import threading
    torch.set_num_threads(2)
    dag = radix_net(256, 3, 16)
    net = ops.prepare(dag)
    w, b = dag.weight.float(), dag.bias.float()
    xs = [torch.rand(70 + 13 * i, 256) for i in range(6)]
    want = [dag.forward_reference(x.double()).float() for x in xs]
    errors = []

    def worker(i):
        try:
            for rep in range(5):
                s = ("program", "panel")[(i + rep) % 2]
                got = ops.dag_forward(xs[i], w, b, net.buffers, dict(net.meta, strategy=ops.STRATEGIES[s]))
                torch.testing.assert_close(got, want[i], **tol(torch.float32))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_wrong_layered_flag_raises():
    """The panel path keeps only two levels of a layered net (ping-pong rows) and the dense path builds
    one matrix per layer: a layered flag on a net with skip edges must raise, not compute garbage."""
    dag = SparseDAG.from_edges(2, [0, 1, 2, 0], [2, 2, 3, 3], [1.0, 2.0, 3.0, 4.0], [0.0] * 4, dtype=torch.float32)
    net = ops.prepare(dag, memory=None)
    assert net.meta["layered"] == 0  # edge 0 -> 3 skips a level
    x = torch.randn(40, 2)
    for s in ("panel", "program", "level"):
        with pytest.raises(ValueError, match="layered"):
            ops.dag_forward(x, dag.weight, dag.bias, net.buffers, dict(net.meta, layered=1, strategy=ops.STRATEGIES[s]))
    torch.testing.assert_close(ops.dag_forward(x, dag.weight, dag.bias, net.buffers, dict(net.meta, strategy=4)),
                               dag.forward_reference(x))
