"""densify (the way back) and save / load (sparse checkpoints into freshly built models), Hugging Face too."""
import os

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import torch_iosparse as tis
from torch_iosparse import FusedInto, IOSparseNetwork
from torch_iosparse.nn.checkpoint import CheckpointError
from torch_iosparse.nn.sparsify import _deepcopy

from torch_iosparse.testing.models import D, M, Encoder, assert_same_outputs, pruned_encoder


def squashed(model):
    """The pruned model with its masks applied (plain weights with zeros): what densify gives back."""
    model = _deepcopy(model)
    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)  # (prune.remove re-registers weight after bias: same keys, another order)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_densify_restores_tree_keys_and_values():
    model = pruned_encoder(10)
    sparse = tis.sparsify(model, memory=M)
    dense = tis.densify(sparse)
    ref = squashed(model)
    assert repr(dense) == repr(ref)
    assert_same_state(dense, ref)
    assert list(dense.state_dict()) == list(Encoder().state_dict())  # the architecture's own key order
    assert not any(isinstance(m, (IOSparseNetwork, FusedInto)) or m._forward_hooks for m in dense.modules())
    assert_same_outputs(dense, model, torch.randn(2, 4, D))
    assert isinstance(sparse.layer[0].intermediate.dense, IOSparseNetwork)  # densify copies
    # trained sparse weights come back at their places, the pruned ones stay zero
    with torch.no_grad():
        sparse.layer[0].intermediate.dense.weight.add_(1.0)
    back = tis.densify(sparse).layer[0].intermediate.dense.weight
    mask = model.layer[0].intermediate.dense.weight_mask.bool()
    assert torch.equal(back[mask], ref.layer[0].intermediate.dense.weight[mask] + 1.0)
    assert not back[~mask].any()


def test_densify_sequential_bare_linear_and_ao_pruned():
    from torch.ao.pruning import WeightNormSparsifier
    torch.manual_seed(11)
    seq = nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Identity(), nn.Linear(12, 6), nn.Tanh(),
                        nn.LayerNorm(6))
    sp = WeightNormSparsifier(sparsity_level=0.75, sparse_block_shape=(1, 4), zeros_per_block=4)
    sp.prepare(seq, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "3.weight"}])
    sp.step()
    sparse = tis.sparsify(seq, memory=M)
    assert sparse[0].summary()["layer_sizes"] == [6, 12, 6] and isinstance(sparse[4], FusedInto)
    dense = tis.densify(sparse)
    sp.squash_mask()  # torch.ao's own way back: the reference
    assert repr(dense) == repr(seq)
    assert_same_state(dense, seq)
    lin = nn.Linear(8, 3)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.8] = 0
    back = tis.densify(tis.sparsify(lin, memory=M))
    assert type(back) is nn.Linear
    assert_same_state(back, lin)


def test_save_load_into_fresh_model(tmp_path):
    model = pruned_encoder(12)
    sparse = tis.sparsify(model, memory=M, method="greedy")
    path = tmp_path / "model.tis"
    tis.save(sparse, path)
    for fresh in (lambda: Encoder().eval(), Encoder().eval()):  # a factory or an instance
        loaded = tis.load(fresh, path)
        assert repr(loaded) == repr(sparse)
        assert_same_state(loaded, sparse)
        assert_same_outputs(loaded, sparse, torch.randn(2, 4, D))
        net = loaded.layer[1].intermediate.dense
        assert net.method == "greedy" and net.memory == M
        assert loaded.layer[1].output.dense.chain is net.sparsify_record  # the run-time check is wired
    # saved again from the loaded model, densified: the same as densifying the original
    tis.save(loaded, path)
    assert_same_state(tis.densify(tis.load(Encoder, path)), tis.densify(sparse))
    # a bare network
    lin = nn.Linear(8, 3)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.8] = 0
    tis.save(tis.sparsify(lin, memory=M), path)
    back = tis.load(lambda: nn.Linear(8, 3), path)
    x = torch.randn(4, 8)
    assert isinstance(back, IOSparseNetwork) and torch.allclose(back(x), lin(x), atol=1e-6)


def test_load_refuses_foreign_corrupt_and_mismatched(tmp_path):
    sparse = tis.sparsify(pruned_encoder(13), memory=M)
    good = tmp_path / "good.tis"
    tis.save(sparse, good)
    plain = tmp_path / "plain.pt"
    torch.save(sparse.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a torch_iosparse checkpoint"):
        tis.load(Encoder, plain)
    corrupt = tmp_path / "corrupt.tis"
    corrupt.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch_iosparse checkpoint"):
        tis.load(Encoder, corrupt)
    with pytest.raises(CheckpointError, match="replaced a Linear"):
        tis.load(lambda: Encoder(d=2 * D), good)
    with pytest.raises(CheckpointError, match="no module there"):
        tis.load(lambda: Encoder(n_layers=1), good)
    assert sorted(os.listdir(tmp_path)) == ["cache", "corrupt.tis", "good.tis", "plain.pt"]  # no temporary files


def test_hugging_face_round_trips():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(14)
    model = transformers.BertModel(cfg).eval()
    for layer in model.encoder.layer:
        for lin in (layer.intermediate.dense, layer.output.dense):
            prune.l1_unstructured(lin, "weight", amount=0.9)
    sparse = tis.sparsify(model, memory=M)
    nets = [n for n, m in sparse.named_modules() if isinstance(m, IOSparseNetwork)]
    assert nets == [f"encoder.layer.{i}.intermediate.dense" for i in range(2)]  # one network per FFN
    ids = torch.randint(0, 40, (2, 7))

    def out(m):
        with torch.no_grad():
            return m(ids).last_hidden_state

    torch.testing.assert_close(out(sparse), out(model), rtol=1e-5, atol=1e-5)
    # the library's checkpoint into a freshly built BertModel
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tis.save(sparse, os.path.join(d, "bert.tis"))
        loaded = tis.load(lambda: transformers.BertModel(cfg).eval(), os.path.join(d, "bert.tis"))
        assert torch.equal(out(loaded), out(sparse))
        # Hugging Face's own format holds the dense (zero-padded) weights: densify, save, load, sparsify
        tis.densify(sparse).save_pretrained(d)
        again = tis.sparsify(transformers.BertModel.from_pretrained(d).eval(), memory=M)
        assert torch.equal(out(again), out(sparse))
