"""explain: the table's numbers are the cost model's, the plot draws I/O between the bounds in a grid of
panels, the summary and the plan folders (save_plans / apply_plans)."""
import io
import os

import numpy as np
import pytest
import torch
from torch import nn

from torch_iosparse import PlanError, count_io, lower_bound, upper_bound
from torch_iosparse.tools.explain import (apply_plans, explain, grid_shape, io_curve, measured_speedups, networks,
                                    plan_file_name, plot_io_vs_memory, predicted_bytes, save_plans,
                                    select_networks, sparsify_report, _batch_runs)
from torch_iosparse.nn.sparsify import sparsify
from torch_iosparse.backends.cpu.tuning import BUCKETS
from torch_iosparse.testing.models import nested, two_chains as model


def test_table_matches_cost_model():
    conv = sparsify(model(), memory=6)
    out = io.StringIO()
    table = explain(conv, file=out)
    text = out.getvalue()
    assert [r["name"] for r in table] == ["0", "4"]
    for r, net in zip(table, (conv[0], conv[4])):
        dag = net.to_dag()
        assert r["neurons"] == dag.n_neurons and r["edges"] == dag.n_edges and r["M"] == 6
        assert r["LB"] == lower_bound(dag, 6) and r["UB"] == upper_bound(dag, 6)
        assert r["IO"] == count_io(dag, net.plan_order.numpy(), 6).total
        assert r["LB"] <= r["IO"] <= r["UB"]
        s = net.summary()
        bt = s["batch_tile"]
        assert r["bytes/tile"] == 4 * (dag.n_edges + dag.n_computed + (s["io"].loads + s["io"].stores) * bt)
        assert predicted_bytes(s) == r["bytes/tile"]
        for col in ("neurons", "edges", "LB", "IO", "UB", "strategy", "bytes/tile"):
            assert col in text
        assert f" {r['IO']} " in text
    assert table.plot_path is None


def test_unconverted_model_is_explained_as_sparsify_would_build_it():
    out = io.StringIO()
    table = explain(model(), file=out, memory=6)
    assert "not converted" in out.getvalue() and len(table) == 2
    dense = nn.Sequential(nn.Linear(4, 4))
    assert explain(dense, file=io.StringIO()) == []
    with pytest.raises(TypeError):
        explain("x")


def test_names_are_dotted_module_paths_and_typos_name_the_closest():
    conv = sparsify(nested(), memory=6)
    assert [n for n, _ in networks(conv)] == ["1.ffn.0", "2"]
    assert [n for n, _ in select_networks(conv, ["1/ffn/0"])] == ["1.ffn.0"]  # the slash spelling reads the same
    with pytest.raises(KeyError, match=r"did you mean '1\.ffn\.0'"):
        select_networks(conv, ["1.ffn.1"])
    with pytest.raises(KeyError, match="has no IOSparseNetwork"):
        select_networks(nn.Linear(2, 2), ["0"])
    table = explain(conv, names=["2"], file=io.StringIO())
    assert [r["name"] for r in table] == ["2"]


def test_io_curve_includes_the_planned_memory():
    conv = sparsify(model(), memory=6)
    M, planned, lb, ub = io_curve(conv[0], memories=[2, 4, 8, 1000])
    assert list(M) == [2, 4, 8, 1000]
    assert (lb <= planned).all() and (planned <= ub).all()
    assert np.all(np.diff(planned) <= 0)  # more memory never costs more for furthest-next-use eviction
    M, planned, _, _ = io_curve(conv[0])
    assert 6 in M and planned[list(M).index(6)] == conv[0].io.total


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 10, 17, 40, 41])
def test_grid_shape(n):
    rows, cols = grid_shape(n)
    assert rows * cols >= n and (rows - 1) * cols < n  # every panel has a cell, no empty row
    assert 1 <= cols <= 5 and cols <= n


def test_plot_is_a_grid_marking_the_planned_memory(tmp_path):
    conv = sparsify(nested(), memory=6)
    extra = sparsify(model(), memory=None)
    nets = [net for _, net in networks(conv)] + [extra[0]]
    path = tmp_path / "io.png"
    fig = plot_io_vs_memory(nets, path=str(path), titles=["a", "b", "unbounded"])
    assert path.stat().st_size > 5000
    assert grid_shape(3) == (2, 2) and len(fig.axes) == 4
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    for ax, net in zip(visible, nets):
        vertical = [ln for ln in ax.lines if len(set(ln.get_xdata())) == 1 and len(ln.get_xdata()) == 2]
        if net.memory is None:
            assert not vertical and "\u221e" in ax.get_title()
        else:
            assert [ln.get_xdata()[0] for ln in vertical] == [net.memory] and f"M={net.memory}" in ax.get_title()
    with pytest.raises(ValueError, match="at least one"):
        plot_io_vs_memory([])


def test_explain_saves_the_plot_where_it_says(tmp_path, monkeypatch):
    conv = sparsify(model(), memory=6)
    out = io.StringIO()
    table = explain(conv, plot=str(tmp_path / "b.png"), file=out)
    assert table.plot_path == str(tmp_path / "b.png") and os.path.exists(table.plot_path)
    assert table.plot_path in out.getvalue()
    monkeypatch.chdir(tmp_path)
    table = explain(conv, plot=True, file=io.StringIO())
    assert table.plot_path == str(tmp_path / "io_vs_memory.png") and os.path.exists(table.plot_path)


def test_batch_runs_and_measured_speedups():
    paths = {b: {"path": "level" if b < 32 else "program", "source": "model"} for b in BUCKETS}
    paths[1024] = {"path": "block", "source": "model"}
    assert _batch_runs(paths) == "1-31 level, 32-1023 program, 1024+ block"
    paths[64] = {"path": "program", "source": "measured", "winner": "program",
                 "times": {"program": 1e-4, "dense": 3e-4}}
    paths[1] = {"path": "level", "source": "measured", "winner": "level", "times": {"level": 2e-5, "program": 5e-5}}
    assert _batch_runs(paths) == "1 level*, 2-31 level, 32-63 program, 64-127 program*, 128-1023 program, 1024+ block"
    assert measured_speedups(paths) == ["B=1: level 20 us, speed-up 2.5x over program",
                                        "B=64: program 100 us, speed-up 3.0x over the dense path"]


def test_sparsify_report():
    conv = sparsify(nested(), memory=6, tune=False)
    text = sparsify_report(conv, skipped=[("0", "not a Linear")])
    nets = networks(conv)
    nnz = sum(net.nnz for _, net in nets)
    io_total = sum(net.io.total for _, net in nets)
    assert text.startswith(f"sparsify: 2 networks, {nnz:,} nonzero weights of")
    assert f"planned I/O {io_total:,} = " in text
    assert "1.ffn.0" in text and "8x24x8" in text and "cost model" in text
    assert "kept dense: 0 (not a Linear)" in text
    assert len(text.splitlines()) <= 10
    assert "no IOSparseNetwork" in sparsify_report(nn.Sequential(nn.Linear(2, 2)))
    assert sparsify_report(conv[2]).startswith("sparsify: 1 network,")  # a bare network is one
    many = sparsify(nn.Sequential(*[nested()[1] for _ in range(5)]), memory=6, tune=False)
    assert "... and 3 more" in sparsify_report(many, max_rows=2)
    with pytest.raises(TypeError):
        sparsify_report("x")


def test_save_and_apply_plans(tmp_path):
    conv = sparsify(nested(), memory=6)
    other = sparsify(nested(), memory=3, method="greedy")
    saved = save_plans(other, tmp_path / "plans")
    assert sorted(os.path.basename(p) for p in saved.values()) == ["1.ffn.0.plan.npz", "2.plan.npz"]
    params = [p for p in conv.parameters()]
    x = torch.randn(3, 8)
    before = conv(x)
    applied = apply_plans(conv, tmp_path / "plans")
    assert sorted(applied) == ["1.ffn.0", "2"]
    for (name, net), (_, ref) in zip(networks(conv), networks(other)):
        assert net.memory == 3 and net.method == ref.method and net.io == ref.io
        assert torch.equal(net.plan_order, ref.plan_order)
    assert all(a is b for a, b in zip(params, conv.parameters()))  # same tensors: an optimizer keeps working
    torch.testing.assert_close(conv(x), before)
    assert plan_file_name("(root)") == "root.plan.npz"


def test_apply_plans_checks_every_file_first(tmp_path):
    conv = sparsify(nested(), memory=6)
    d = tmp_path / "plans"
    save_plans(sparsify(nested(), memory=3), d)
    os.replace(d / "2.plan.npz", d / "1.ffn.1.plan.npz")  # names a network that does not exist
    with pytest.raises(KeyError, match=r"1\.ffn\.1.*did you mean '1\.ffn\.0'"):
        apply_plans(conv, d)
    assert all(net.memory == 6 for _, net in networks(conv))  # nothing applied
    os.replace(d / "1.ffn.1.plan.npz", d / "1.ffn.0.plan.npz")  # the plan of '2' under the name of '1.ffn.0'
    with pytest.raises(PlanError, match="does not fit network '1.ffn.0'"):
        apply_plans(conv, d)
    assert all(net.memory == 6 for _, net in networks(conv))
    with pytest.raises(FileNotFoundError, match="no such plan folder"):
        apply_plans(conv, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        apply_plans(conv, tmp_path / "empty")
