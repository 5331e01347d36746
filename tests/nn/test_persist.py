"""Persistence: state_dict round trips, weights_only loads, and the on-disk plan cache."""
import os

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from torch_iosparse import cache, planning
from torch_iosparse.planning import plans
from torch_iosparse.cost.iomodel import IOCount
from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.nn.sparsify import sparsify


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "plans"
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", str(d))
    return d


def pruned(seed=0, sizes=(10, 20, 8)):
    torch.manual_seed(seed)
    layers = []
    for k in range(len(sizes) - 1):
        lin = nn.Linear(sizes[k], sizes[k + 1])
        prune.l1_unstructured(lin, "weight", 0.7)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def perturbed(net):
    with torch.no_grad():
        net.weight.add_(torch.randn_like(net.weight))
        net.bias.add_(1.0)
    return net


def test_state_dict_strict_round_trip_into_fresh_module(cache_dir, tmp_path):
    seq = pruned()
    trained = perturbed(IOSparseNetwork(seq, memory=6))
    fresh = IOSparseNetwork(seq, memory=6)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(4, 10)
    torch.testing.assert_close(fresh(x), trained(x))
    path = tmp_path / "net.pt"
    torch.save(trained.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    rebuilt = IOSparseNetwork.from_state_dict(sd)  # from the file alone, no original model
    torch.testing.assert_close(rebuilt(x), trained(x))
    assert rebuilt.memory == 6 and rebuilt.nnz == trained.nnz
    assert set(sd) == set(trained.state_dict())


def test_loading_another_plan_of_the_same_shapes_rebuilds_the_program(cache_dir):
    seq = pruned()
    a = perturbed(IOSparseNetwork(seq, memory=3))
    b = IOSparseNetwork(seq, memory=40)
    b.load_state_dict(a.state_dict())
    assert b.memory == 3 and b.io == a.io
    x = torch.randn(2, 10)
    torch.testing.assert_close(b(x), a(x))


def test_mismatched_state_is_an_error(cache_dir):
    a = IOSparseNetwork(pruned(seed=0))
    b = IOSparseNetwork(pruned(seed=1, sizes=(10, 20, 9)))
    with pytest.raises(RuntimeError, match="size mismatch|Missing|Unexpected"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(KeyError, match="weight"):
        IOSparseNetwork.from_state_dict({"in_ptr": torch.zeros(3)})


def test_sparsified_model_weights_only_round_trip(cache_dir, tmp_path):
    model = nn.Sequential(pruned(), nn.LayerNorm(8), nn.Linear(8, 3))
    conv = sparsify(model)
    with torch.no_grad():
        conv[0][0].weight.mul_(2.0)
    torch.save(conv.state_dict(), tmp_path / "m.pt")
    fresh = sparsify(model)  # same structure, original weights
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    x = torch.randn(3, 10)
    torch.testing.assert_close(fresh(x), conv(x))
    torch.save(conv, tmp_path / "whole.pt")  # a whole model needs the classes: weights_only=False
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(whole(x), conv(x))


def test_cache_hit_on_second_build(cache_dir, monkeypatch):
    seq = pruned()
    first = IOSparseNetwork(seq, memory=5)
    assert not first.cache_hit
    files = list(cache_dir.rglob("*.plan.npz"))
    assert len(files) == 1

    def no_planning(*a, **k):
        raise AssertionError("planned again despite a cache entry")
    monkeypatch.setattr(plans, "plan", no_planning)
    second = IOSparseNetwork(seq, memory=5)
    assert second.cache_hit and second.io == first.io
    assert np.array_equal(second.plan_order.numpy(), first.plan_order.numpy())
    monkeypatch.undo()
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", str(cache_dir))
    other = IOSparseNetwork(seq, memory=6)  # other planning arguments: another key
    assert not other.cache_hit and len(list(cache_dir.rglob("*.plan.npz"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_io", "other_net"])
def test_corrupt_cache_entry_is_ignored_and_rebuilt(cache_dir, damage):
    seq = pruned()
    good = IOSparseNetwork(seq, memory=5)
    (path,) = cache_dir.rglob("*.plan.npz")
    if damage == "garbage":
        path.write_bytes(b"not a plan at all")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "wrong_io":  # a well-formed, checksummed file whose recorded I/O is a lie
        p = planning.Plan.load(str(path))
        io = IOCount(p.io.weights, p.io.biases, 0, 0)
        planning.Plan(p.order, p.memory, io, p.method, p.dag_hash).save(str(path))
    else:  # a valid plan of another network stored under this key
        other = IOSparseNetwork(pruned(seed=5), memory=5, cache=False)
        other.plan().save(str(path))
    with pytest.warns(RuntimeWarning, match="corrupt plan cache entry"):
        again = IOSparseNetwork(seq, memory=5)
    assert not again.cache_hit and again.io == good.io
    x = torch.randn(3, 10)
    torch.testing.assert_close(again(x), seq(x))
    third = IOSparseNetwork(seq, memory=5)  # the rebuilt entry is good again
    assert third.cache_hit


def test_cache_location_and_disable(tmp_path, monkeypatch):
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", str(tmp_path / "x"))
    assert cache.cache_dir() == str(tmp_path / "x")
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", "0")
    assert cache.cache_dir() is None
    net = IOSparseNetwork(pruned(), memory=5)
    assert not net.cache_hit and not (tmp_path / "x").exists()
    monkeypatch.delenv("IOSPARSE_CACHE_DIR")
    assert cache.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "torch_iosparse")
    a = cache.cache_key(IOSparseNetwork(pruned(), memory=5, cache=False).to_dag(), 5, "two_optimal", 0, None)
    b = cache.cache_key(IOSparseNetwork(pruned(), memory=5, cache=False).to_dag(), 5, "two_optimal", 1, None)
    assert a != b


def test_planning_method_is_used_cached_and_persisted(cache_dir, tmp_path):
    calls = []

    @planning.register_method("test_last_first")
    def _last_first(dag, memory, seed=0, time_budget=None, **kw):
        # a legal order different from the numbering: each layer's neurons in reverse
        calls.append(seed)
        lv = dag.levels()
        comp = np.arange(dag.n_inputs, dag.n_neurons)
        return comp[np.lexsort((-comp, lv[comp]))]

    try:
        seq = pruned()
        net = IOSparseNetwork(seq, memory=4, method="test_last_first", seed=3)
        assert calls == [3] and net.method == "test_last_first" and "method=test_last_first" in repr(net)
        assert net.plan_order[0] > net.plan_order[1]
        x = torch.randn(3, 10)
        torch.testing.assert_close(net(x), seq(x))
        again = IOSparseNetwork(seq, memory=4, method="test_last_first", seed=3)
        assert again.cache_hit and calls == [3]
        IOSparseNetwork(seq, memory=4, method="test_last_first", seed=4)  # another seed: another entry
        assert calls == [3, 4]
        torch.save(net.state_dict(), tmp_path / "s.pt")
        rebuilt = IOSparseNetwork.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        assert rebuilt.method == "test_last_first" and torch.equal(rebuilt.plan_order, net.plan_order)
        assert rebuilt.io == net.io
    finally:
        plans._METHODS.pop("test_last_first", None)


def test_cache_key_ignores_progress_flags_only():
    dag = IOSparseNetwork(pruned(), memory=5, cache=False).to_dag()
    base = cache.cache_key(dag, 5, "anneal", 0, 1.0)
    assert cache.cache_key(dag, 5, "anneal", 0, 1.0, progress=False) == base
    assert cache.cache_key(dag, 5, "anneal", 0, 1.0, chunks=7) != base
    assert cache.cache_key(dag, 5, "anneal", 0, 2.0) != base


def test_pickled_whole_model_naming_the_one_word_module_paths_loads():
    """tests/nn/data/whole_model.pt: torch.save of a sparsified model, a Plan and an IOCount whose pickle
    names the classes as torch_iosparse.module.IOSparseNetwork, torch_iosparse.chains.FusedInto,
    torch_iosparse.dag.SparseDAG, torch_iosparse.iomodel.IOCount, torch_iosparse.tuning.Tuner, ...: it loads,
    and the model computes what it computed when it was saved."""
    import torch_iosparse as tis
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "whole_model.pt")
    with open(path, "rb") as f:
        raw = f.read()
    assert b"torch_iosparse.module" in raw and b"torch_iosparse.chains" in raw  # what the test is about
    d = torch.load(path, weights_only=False)
    model = d["model"]
    assert isinstance(model[0], IOSparseNetwork) and isinstance(d["dag"], tis.SparseDAG)
    torch.testing.assert_close(model(torch.ones(2, 8)), d["y"])
    assert d["plan"].io == d["io"] == tis.count_io(d["dag"], d["plan"].order, 4)
