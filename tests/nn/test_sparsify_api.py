"""sparsify_ API conventions (torchao style config / filter_fn order), bare Linear, torch.ao.pruning interop."""
import dataclasses
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torch_iosparse as tis
from torch_iosparse import IOSparseConfig, IOSparseNetwork, sparsify, sparsify_
from torch_iosparse.nn.sparsify import linear_sparsity


def _mlp(seed=0, density=0.2):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        for lin in m[::2]:
            lin.weight[torch.rand_like(lin.weight) > density] = 0
    return m


# ---------------------------------------------------------------- config

def test_config_has_every_network_option():
    import inspect
    net_params = set(inspect.signature(IOSparseNetwork.__init__).parameters) - {"self", "dag_or_module", "plan",
                                                                                 "plan_kwargs"}
    fields = {f.name for f in dataclasses.fields(IOSparseConfig)}
    assert net_params <= fields
    assert {"min_sparsity", "verbose", "plan_kwargs"} <= fields
    assert tis.IOSparseConfig is IOSparseConfig and "IOSparseConfig" in tis.__all__


def test_keywords_are_sugar_for_config():
    m = _mlp()
    a = sparsify(m, memory=8, method="greedy")
    b = sparsify(m, config=IOSparseConfig(memory=8, method="greedy"))
    c = sparsify(m, IOSparseConfig(memory=8, method="greedy"))  # positional, like torchao's quantize_
    for conv in (a, b, c):
        assert isinstance(conv[0], IOSparseNetwork)
        assert conv[0].memory == 8 and conv[0].method == "greedy"
    assert torch.equal(a[0].plan_order, b[0].plan_order)
    x = torch.randn(3, 12)
    assert torch.allclose(b(x), m(x), atol=1e-5)
    m2 = _mlp()
    assert sparsify_(m2, config=IOSparseConfig(memory=8)) is m2 and m2[0].memory == 8


def test_config_and_conflicting_keyword_is_an_error():
    m = _mlp()
    cfg = IOSparseConfig(memory=8)
    with pytest.raises(ValueError, match="memory=16"):
        sparsify(m, config=cfg, memory=16)
    with pytest.raises(ValueError, match="either in config"):
        sparsify_(m, cfg, min_sparsity=0.1)
    assert isinstance(sparsify(m, config=cfg, memory=8)[0], IOSparseNetwork)  # agreeing keyword is fine
    with pytest.raises(TypeError, match="IOSparseConfig"):
        sparsify(m, config={"memory": 8})


def test_config_min_sparsity_and_verbose(capsys):
    m = _mlp()
    with torch.no_grad():
        m[4].weight.fill_(1.0)  # dense
    conv = sparsify(m, config=IOSparseConfig(memory=8, verbose=True))
    out = capsys.readouterr().out
    assert "sparsify: [0,1,2,3] ->" in out and "kept dense: 4 (sparsity" in out
    assert type(conv[4]) is nn.Linear
    none = sparsify(m, config=IOSparseConfig(min_sparsity=0.99))
    assert not any(isinstance(x, IOSparseNetwork) for x in none.modules())


# ---------------------------------------------------------------- filter_fn order

def test_filter_fn_module_first():
    m = _mlp()
    seen = []

    def keep(module, fqn):
        seen.append((type(module), fqn))
        return fqn != "4"

    conv = sparsify(m, memory=8, filter_fn=keep)
    assert (nn.Linear, "0") in seen and (nn.Linear, "4") in seen
    assert isinstance(conv[0], IOSparseNetwork) and type(conv[4]) is nn.Linear
    by_shape = sparsify(m, memory=8, filter_fn=lambda mod, _: mod.out_features != 8)
    assert type(by_shape[2]) is nn.Linear and isinstance(by_shape[0], IOSparseNetwork)


@pytest.mark.parametrize("old", [
    lambda name, lin: name != "2",            # old order by parameter names: would silently accept all
    lambda fqn, module: True,
    lambda a, b: a.startswith("0"),           # treats the module as a string: AttributeError
    lambda a, b: b.out_features > 1,          # treats the name as a module: AttributeError
    lambda a, b: "0" in a,                    # TypeError: argument of type 'Linear' is not iterable
])
def test_filter_fn_in_old_order_is_a_clear_error(old):
    with pytest.raises(ValueError, match=r"filter_fn\(module, fqn\)"):
        sparsify(_mlp(), memory=8, filter_fn=old)


# ---------------------------------------------------------------- bare Linear

def _sparse_linear(seed=3):
    torch.manual_seed(seed)
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) > 0.2] = 0
    return lin


def test_bare_linear_honours_filter_fn_and_options(capsys):
    lin = _sparse_linear()
    kept = sparsify(lin, filter_fn=lambda mod, fqn: False)
    assert type(kept) is nn.Linear and kept is not lin
    assert sparsify(lin, filter_fn=lambda mod, fqn: fqn == "") .__class__ is IOSparseNetwork
    net = sparsify(lin, memory=4, method="greedy", strategy="level", verbose=True)
    out = capsys.readouterr().out
    assert isinstance(net, IOSparseNetwork) and "sparsify: (root) ->" in out
    assert net.memory == 4 and net.method == "greedy" and net.strategy == "level"
    x = torch.randn(5, 10)
    assert torch.allclose(net(x), lin(x), atol=1e-5)
    sparsify(lin, min_sparsity=0.99, verbose=True)
    assert "kept (root) (sparsity" in capsys.readouterr().out
    with pytest.raises(ValueError, match="filter_fn"):
        sparsify(lin, filter_fn=lambda name, lin: True)
    with pytest.raises(TypeError, match="root module"):
        sparsify_(lin)


# ---------------------------------------------------------------- torch.ao.pruning

def _ao_pruned(seed=4):
    from torch.ao.pruning import WeightNormSparsifier
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    sp = WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4), zeros_per_block=4)
    sp.prepare(m, [{"tensor_fqn": f"{i}.weight"} for i in (0, 2, 4)])
    sp.step()
    return m, sp


def test_ao_pruning_parametrized_layers_are_converted():
    m, sp = _ao_pruned()
    assert parametrize.is_parametrized(m[0], "weight")
    assert linear_sparsity(m[0]) >= 0.75
    conv = sparsify(m, memory=16)
    assert isinstance(conv[0], IOSparseNetwork) and conv[0].summary()["layer_sizes"] == [16, 32, 32, 8]
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert torch.allclose(conv(x), m(x), atol=1e-5)
    # edges = the mask's nonzeros (an unpruned weight that happens to be zero stays an edge)
    with torch.no_grad():
        keep = m[2].parametrizations.weight[0].mask.nonzero()[0]
        m[2].parametrizations.weight.original[keep[0], keep[1]] = 0
    conv = sparsify(m, memory=16)
    assert conv[0].summary()["n_edges"] == sum(int(m[i].parametrizations.weight[0].mask.sum()) for i in (0, 2, 4))
    # the original is untouched, and squash_mask afterwards gives the same function
    assert parametrize.is_parametrized(m[0], "weight")
    sp.squash_mask()
    assert type(m[0]) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(conv(x), m(x), atol=1e-5)


def test_ao_pruning_in_place_and_explain():
    m, _ = _ao_pruned(5)
    buf = io.StringIO()
    table = tis.explain(m, memory=16, file=buf)
    assert len(table) == 1 and "nothing pruned" not in buf.getvalue()
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = m(x)
    sparsify_(m, memory=16)
    assert isinstance(m[0], IOSparseNetwork)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-5)


def test_ao_pruned_bare_linear_and_verbose(capsys):
    from torch.ao.pruning import WeightNormSparsifier
    torch.manual_seed(6)
    holder = nn.Sequential(nn.Linear(16, 8))
    sp = WeightNormSparsifier(sparsity_level=0.75, sparse_block_shape=(1, 4), zeros_per_block=4)
    sp.prepare(holder, [{"tensor_fqn": "0.weight"}])
    sp.step()
    lin = holder[0]
    net = sparsify(lin, memory=8, verbose=True)
    assert isinstance(net, IOSparseNetwork) and "(root) ->" in capsys.readouterr().out
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(net(x), lin(x), atol=1e-5)
    assert net.summary()["n_edges"] == int(lin.parametrizations.weight[0].mask.sum())
