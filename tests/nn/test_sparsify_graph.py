"""sparsify on the traced dataflow graph: chains across module boundaries (a BERT-shaped encoder), what
ends a chain, the fallback when fx cannot trace, the run-time check of fused chains, rough edges."""
import io
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import torch_iosparse as tis
from torch_iosparse import FusedInto, IOSparseNetwork, sparsify, sparsify_
from torch_iosparse.nn.sparsify import find_chains
from torch_iosparse.testing.models import D, M, GELUActivation, assert_same_outputs, pruned_encoder


@pytest.mark.parametrize("act", [GELUActivation, nn.GELU])
def test_bert_shaped_ffn_is_one_network(act):
    model = pruned_encoder(act=act)
    conv = sparsify(model, memory=M)
    nets = [m for m in conv.modules() if isinstance(m, IOSparseNetwork)]
    assert len(nets) == len(model.layer)  # one per FFN; attention and pooler are dense
    for orig, layer in zip(model.layer, conv.layer):
        net = layer.intermediate.dense
        assert isinstance(net, IOSparseNetwork) and net.summary()["layer_sizes"] == [D, 4 * D, D]
        assert isinstance(layer.intermediate.intermediate_act_fn, FusedInto)
        assert isinstance(layer.output.dense, FusedInto)
        assert isinstance(layer.output.LayerNorm, nn.LayerNorm) and type(layer.attention.query) is nn.Linear
        # the same I/O as the chain written as one Sequential
        seq = nn.Sequential(orig.intermediate.dense, nn.GELU(), orig.output.dense)
        assert net.io == IOSparseNetwork(seq, memory=M).io
    assert "layer.0.intermediate.dense" in repr(conv.layer[0].output.dense)
    assert_same_outputs(conv, model, torch.randn(3, 5, D))
    assert type(model.layer[0].intermediate.dense) is nn.Linear  # the original is untouched
    chains, _ = find_chains(model)
    assert [c.describe() for c in chains] == [
        f"layer.{i}.[intermediate.dense,intermediate.intermediate_act_fn,output.dense]" for i in range(2)]
    assert chains[0].scope == "layer.0"


def test_functional_activation_in_a_parent_forward_ends_the_chain():
    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))  # F.gelu cannot be removed by swapping a module

    torch.manual_seed(1)
    model = FFN()
    for lin in (model.fc1, model.fc2):
        prune.l1_unstructured(lin, "weight", amount=0.8)
    conv = sparsify(model, memory=M)
    assert isinstance(conv.fc1, IOSparseNetwork) and conv.fc1.summary()["layer_sizes"] == [D, 4 * D]
    assert isinstance(conv.fc2, IOSparseNetwork)
    x = torch.randn(4, D)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)


def test_intermediate_with_another_consumer_or_read_weight_is_not_fused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)
            self.fc3 = nn.Linear(D, D)

        def forward(self, x):
            h = self.act(self.fc1(x))
            y = self.fc2(h) + h                             # h has two consumers
            return F.linear(y, self.fc3.weight, self.fc3.bias)  # fc3's weight is read directly

    torch.manual_seed(2)
    model = Net()
    for lin in (model.fc1, model.fc2, model.fc3):
        prune.l1_unstructured(lin, "weight", amount=0.8)
    conv = sparsify(model, memory=M)
    assert conv.fc1.summary()["layer_sizes"] == [D, D] and isinstance(conv.act, FusedInto)
    assert isinstance(conv.fc2, IOSparseNetwork) and type(conv.fc3) is not IOSparseNetwork
    assert ("fc3", "its weight is read directly by a forward") in find_chains(model)[1]
    x = torch.randn(4, D)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)


def test_untraceable_forward_falls_back_with_a_note():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)

        def forward(self, x):
            h = self.act(self.fc1(x))
            if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
                h = h * 2
            return self.fc2(h)

    torch.manual_seed(3)
    model = Gated()
    for lin in (model.fc1, model.fc2):
        prune.l1_unstructured(lin, "weight", amount=0.8)
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace Gated.forward .*fc1, fc2 are converted one by one"):
        conv = sparsify(model, memory=M)
    assert isinstance(conv.fc1, IOSparseNetwork) and isinstance(conv.fc2, IOSparseNetwork)
    assert type(conv.act) is nn.ReLU
    x = torch.randn(4, D)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)
    # an untraceable submodule is opaque: the rest of the model is still traced and fused
    outer = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), Gated())
    for lin in (outer[0], outer[2], outer[3].fc1, outer[3].fc2):
        prune.l1_unstructured(lin, "weight", amount=0.8)
    with pytest.warns(UserWarning, match="Gated.forward at 3"):
        conv = sparsify(outer, memory=M)
    assert conv[0].summary()["layer_sizes"] == [D, D, D]
    torch.testing.assert_close(conv(x), outer(x), rtol=1e-5, atol=1e-5)


def test_shared_activation_in_a_sequential_still_fuses():
    torch.manual_seed(4)
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(D, D), act, nn.Linear(D, D), act, nn.Linear(D, 4))
    with torch.no_grad():
        for lin in model[::2]:
            lin.weight[torch.rand_like(lin.weight) < 0.8] = 0
    conv = sparsify(model, memory=M)
    assert conv[0].summary()["layer_sizes"] == [D, D, D, 4]
    x = torch.randn(3, D)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)


class Switchable(nn.Module):
    """Its forward stops after the first Linear when ``early`` is set (an attribute, invisible to tracing)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)
        self.early = False

    def forward(self, x):
        h = self.fc1(x)
        if self.early:
            return h
        return self.fc2(self.act(h))


def test_run_time_check_refuses_a_different_dataflow():
    torch.manual_seed(5)
    model = Switchable()
    for lin in (model.fc1, model.fc2):
        prune.l1_unstructured(lin, "weight", amount=0.8)
    conv = sparsify(model, memory=M)
    assert isinstance(conv.act, FusedInto) and isinstance(conv.fc2, FusedInto)
    x = torch.randn(4, D)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)
    conv.early = True
    with pytest.raises(RuntimeError, match="returned before the layers fused into"):
        conv(x)
    conv.early = False
    torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)  # recovers
    with pytest.raises(RuntimeError, match="fused into the IOSparseNetwork 'fc1'"):
        conv.fc2(torch.randn(4, D))  # a pass-through on its own
    compiled = torch.compile(conv, fullgraph=True, backend="eager")  # the checks are eager-only
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_chain_found_in_one_mode_only_is_not_fused_and_modes_are_restored():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            h = self.fc1(x)
            if self.training:
                h = h + 0.0 * torch.randn_like(h)
            return self.fc2(h)

    torch.manual_seed(6)
    model = nn.Sequential(Noisy(), nn.ReLU()).eval()
    model[1].train()  # mixed modes must come back as they were
    for lin in (model[0].fc1, model[0].fc2):
        prune.l1_unstructured(lin, "weight", amount=0.8)
    conv = sparsify(model, memory=M)
    assert isinstance(conv[0].fc1, IOSparseNetwork) and isinstance(conv[0].fc2, IOSparseNetwork)
    assert [m.training for m in model.modules()] == [False, False, False, False, True]
    x = torch.randn(4, D)
    for mode in (True, False):
        conv.train(mode), model.train(mode)
        torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)


def test_optimizer_made_before_sparsify_in_place_is_named():
    model = pruned_encoder(7, n_layers=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"SGD optimizer holds \d+ parameter\(s\) of layers that sparsify_ replaced"):
        sparsify_(model, memory=M)
    del opt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh copy has no such optimizer: no warning
        sparsify(pruned_encoder(7, n_layers=1), memory=M)


def test_meta_model_and_jit_script_give_clear_errors():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(D, D), nn.ReLU())
    with pytest.raises(ValueError, match="meta device"):
        sparsify(meta)
    conv = sparsify(pruned_encoder(8, n_layers=1), memory=M)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile"):
        torch.jit.script(conv)
    lin = nn.Linear(D, D)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.8] = 0
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile an IOSparseNetwork"):
        torch.jit.script(sparsify(lin, memory=M))


def test_verbose_prints_networks_and_no_progress_bar_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    sparsify(pruned_encoder(9), memory=M, verbose=True)
    out, err = capsys.readouterr()
    assert "sparsify: layer.1.[intermediate.dense,intermediate.intermediate_act_fn,output.dense] ->" in out
    assert "kept dense: " in out and "pooler (sparsity" in out and "planning" not in err
    sparsify(pruned_encoder(9), memory=M, verbose=False)
    assert capsys.readouterr() == ("", "")
