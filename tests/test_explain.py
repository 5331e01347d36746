"""explain: the table's numbers are the cost model's, the plot draws I/O between the bounds."""
import io

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from torch_iosparse import count_io, lower_bound, upper_bound
from torch_iosparse.explain import explain, io_curve, plot_io_vs_memory, predicted_bytes
from torch_iosparse.sparsify import sparsify


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    for x in m:
        if type(x) is nn.Linear:
            prune.l1_unstructured(x, "weight", 0.85)
    return m


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


def test_unconverted_model_is_explained_as_sparsify_would_build_it():
    out = io.StringIO()
    table = explain(model(), file=out, memory=6)
    assert "not converted" in out.getvalue() and len(table) == 2
    dense = nn.Sequential(nn.Linear(4, 4))
    assert explain(dense, file=io.StringIO()) == []
    with pytest.raises(TypeError):
        explain("x")


def test_io_curve_and_plot(tmp_path):
    conv = sparsify(model(), memory=6)
    M, planned, lb, ub = io_curve(conv[0], memories=[2, 4, 8, 1000])
    assert list(M) == [2, 4, 8, 1000]
    assert (lb <= planned).all() and (planned <= ub).all()
    assert np.all(np.diff(planned) <= 0)  # more memory never costs more for furthest-next-use eviction
    path = tmp_path / "io.png"
    fig = plot_io_vs_memory([conv[0], conv[4]], path=str(path))
    assert path.stat().st_size > 5000 and len(fig.axes) == 2
    explain(conv, plot=str(tmp_path / "b.png"), file=io.StringIO())
    assert (tmp_path / "b.png").exists()
