"""sparsify / sparsify_: which chains are replaced, equivalence, idempotence, boundaries, skips."""
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.nn.sparsify import find_chains, linear_sparsity, sparsify, sparsify_


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class Block(nn.Module):
    """A pre-norm transformer block with a Sequential FFN."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.att(x, x, x)[0]
        return x + self.ffn(self.norm(x))


def mixed_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16),          # chain A (0..2)
        nn.LeakyReLU(),                                          # unsupported: boundary
        nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.0),           # chain B (4..5), Dropout boundary
        Block(),                                                 # nested FFN chain
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        nn.Linear(16, 4))                                        # dense: skipped
    for name, mod in m.named_modules():
        if type(mod) is nn.Linear:
            prune.l1_unstructured(mod, "weight", 0.75)
    prune.remove(m[9], "weight")
    with torch.no_grad():
        m[9].weight.normal_()  # dense again
    return m.eval()


def test_mixed_model_equivalence_and_structure():
    model = mixed_model()
    x = torch.randn(3, 5, 8)
    conv = sparsify(model)
    assert rel_err(conv(x), model(x)) <= 1e-5
    with torch.no_grad():  # eval + no_grad: TransformerEncoderLayer's fast path must stay off
        assert rel_err(conv(x), model(x)) <= 1e-5
    assert isinstance(conv[0], IOSparseNetwork) and conv[0].summary()["layer_sizes"] == [8, 16, 16]
    assert isinstance(conv[1], nn.Identity) and isinstance(conv[2], nn.Identity)
    assert isinstance(conv[3], nn.LeakyReLU)
    assert isinstance(conv[4], IOSparseNetwork) and isinstance(conv[5], nn.Identity)
    assert isinstance(conv[6], nn.Dropout)
    assert isinstance(conv[7].ffn[0], IOSparseNetwork) and conv[7].ffn[0].summary()["layer_sizes"] == [16, 64, 16]
    assert type(conv[7].att.out_proj) is not IOSparseNetwork  # MHA reads .weight directly: untouched
    assert isinstance(conv[8].linear1, IOSparseNetwork) and isinstance(conv[8].linear2, IOSparseNetwork)
    assert type(conv[9]) is nn.Linear  # denser than min_sparsity
    # the original is untouched
    assert type(model[0]) is nn.Linear and type(model[7].ffn[0]) is nn.Linear


def test_idempotent_and_in_place():
    model = mixed_model()
    conv = sparsify(model)
    before = repr(conv)
    sd = {k: v.clone() for k, v in conv.state_dict().items()}
    again = sparsify_(conv)
    assert again is conv and repr(conv) == before
    assert all(torch.equal(sd[k], v) for k, v in conv.state_dict().items())
    assert find_chains(conv)[0] == []


def test_threshold_filter_and_zero_weights_without_masks():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        m[0].weight[torch.rand_like(m[0].weight) < 0.6] = 0  # zeros, no prune mask
        m[2].weight[torch.rand_like(m[2].weight) < 0.3] = 0
    assert 0.5 < linear_sparsity(m[0]) and linear_sparsity(m[2]) < 0.5
    conv = sparsify(m)
    assert isinstance(conv[0], IOSparseNetwork) and type(conv[2]) is nn.Linear
    assert conv[0].summary()["layer_sizes"] == [10, 20]  # chain stops at the dense Linear (ReLU kept in)
    x = torch.randn(4, 10)
    assert rel_err(conv(x), m(x)) <= 1e-5
    assert all(type(mm) is nn.Linear for mm in sparsify(m, min_sparsity=0.9) if not isinstance(mm, nn.ReLU))
    both = sparsify(m, min_sparsity=0.2)
    assert isinstance(both[0], IOSparseNetwork) and both[0].summary()["layer_sizes"] == [10, 20, 5]
    only_first = sparsify(m, min_sparsity=0.2, filter_fn=lambda lin, name: name != "2")
    assert type(only_first[2]) is nn.Linear
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(m, min_sparsity=1.5)


def test_shared_weights_are_skipped():
    torch.manual_seed(2)
    a = nn.Linear(8, 8)
    with torch.no_grad():
        a.weight[torch.rand_like(a.weight) < 0.8] = 0
    b = nn.Linear(8, 8)
    b.weight = a.weight  # tied
    c = nn.Linear(8, 8)
    with torch.no_grad():
        c.weight[torch.rand_like(c.weight) < 0.8] = 0
    m = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), c)
    conv = sparsify(m)
    assert type(conv[0]) is nn.Linear and type(conv[2]) is nn.Linear and isinstance(conv[4], IOSparseNetwork)
    same_module = nn.Sequential(c, nn.ReLU(), c)  # one module used twice
    conv2 = sparsify(same_module)
    assert all(type(mm) is not IOSparseNetwork for mm in conv2)


def test_unsupported_activation_between_linears_is_a_boundary_not_an_error():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(6, 12), nn.SiLU(), nn.Linear(12, 6), nn.ReLU(), nn.ReLU(), nn.Linear(6, 3))
    for mod in m:
        if type(mod) is nn.Linear:
            prune.random_unstructured(mod, "weight", 0.7)
    conv = sparsify(m)
    kinds = [type(mm).__name__ for mm in conv]
    # the fused ReLU's slot holds a pass-through (an nn.Identity that names the network doing its work)
    assert kinds == ["IOSparseNetwork", "SiLU", "IOSparseNetwork", "FusedInto", "ReLU", "IOSparseNetwork"]
    assert isinstance(conv[3], nn.Identity)
    x = torch.randn(5, 6)
    assert rel_err(conv(x), m(x)) <= 1e-5


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify_("model")
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight[:, :3] = 0
    net = sparsify(lin)
    assert isinstance(net, IOSparseNetwork)
    with pytest.raises(TypeError, match="root module"):
        sparsify_(lin)


def test_sequential_subclass_with_own_forward_is_traced():
    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    class Reuse(nn.Sequential):  # the hidden value is used twice: no chain through it
        def forward(self, x):
            h = self[1](self[0](x))
            return self[2](h) + h

    torch.manual_seed(4)
    block = Residual(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    reuse = Reuse(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    for m in [*block, *reuse]:
        if type(m) is nn.Linear:
            prune.l1_unstructured(m, "weight", 0.8)
    model = nn.Sequential(block, nn.ModuleList([nn.Linear(8, 8)]), reuse)
    conv = sparsify(model, min_sparsity=0.5)
    # the traced forward shows x + chain(x): the chain is fused, the skip stays in the user's forward
    assert [type(m).__name__ for m in conv[0]] == ["IOSparseNetwork", "FusedInto", "FusedInto"]
    assert type(conv[1][0]) is nn.Linear  # dense
    assert [type(m).__name__ for m in conv[2]] == ["IOSparseNetwork", "FusedInto", "IOSparseNetwork"]
    x = torch.randn(3, 8)
    assert rel_err(conv[0](x), block(x)) <= 1e-5
    assert rel_err(conv[2](x), reuse(x)) <= 1e-5


# ---------------------------------------------------------------------- random models (hypothesis)
from hypothesis import given, strategies as st  # noqa: E402

SUPPORTED = [nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ReLU6, nn.Identity]
UNSUPPORTED = [nn.SiLU, nn.LeakyReLU, nn.Softplus]


@st.composite
def random_models(draw, width=None, depth=0):
    """A Sequential of Linears (random width and sparsity), activations, norms and nested Sequentials."""
    width = width or draw(st.integers(2, 9))
    mods = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["linear", "linear", "sup", "unsup", "norm", "nested"] if depth < 2
                                    else ["linear", "sup", "unsup"]))
        if kind == "linear":
            out = draw(st.integers(1, 9))
            lin = nn.Linear(width, out, bias=draw(st.booleans()))
            zero = draw(st.floats(0.0, 0.95))
            with torch.no_grad():
                lin.weight[torch.rand_like(lin.weight) < zero] = 0
            if draw(st.booleans()):
                prune.random_unstructured(lin, "weight", draw(st.floats(0.0, 0.9)))
            mods.append(lin)
            width = out
        elif kind == "sup":
            mods.append(draw(st.sampled_from(SUPPORTED))())
        elif kind == "unsup":
            mods.append(draw(st.sampled_from(UNSUPPORTED))())
        elif kind == "norm":
            mods.append(nn.LayerNorm(width))
        else:
            inner, width = draw(random_models(width=width, depth=depth + 1))
            mods.append(inner)
    return nn.Sequential(*mods), width


@st.composite
def models_with_input_width(draw):
    w = draw(st.integers(2, 9))
    model, _ = draw(random_models(width=w))
    return model, w


@given(models_with_input_width(), st.sampled_from([0.0, 0.3, 0.6]), st.sampled_from([2, 7, None]),
       st.integers(0, 2**16))
def test_random_models_convert_equivalently_and_idempotently(model_width, min_sparsity, memory, seed):
    model, n_in = model_width
    model.eval()
    torch.manual_seed(seed)
    x = torch.randn(4, n_in)
    conv = sparsify(model, min_sparsity=min_sparsity, memory=memory, cache=False)
    assert rel_err(conv(x), model(x)) <= 1e-5
    for mod in conv.modules():
        if isinstance(mod, IOSparseNetwork):
            assert mod.summary()["layer_sizes"] is not None
    before = repr(conv)
    assert repr(sparsify_(conv, min_sparsity=min_sparsity, memory=memory, cache=False)) == before


def test_layers_with_user_hooks_are_kept():
    torch.manual_seed(7)
    m = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    for lin in (m[0], m[2]):
        prune.l1_unstructured(lin, "weight", 0.8)
    seen = []
    m[2].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    conv = sparsify(m)
    assert isinstance(conv[0], IOSparseNetwork) and type(conv[2]) is nn.Linear
    conv(torch.randn(2, 6))
    assert seen  # the user's hook still fires
    _, skipped = find_chains(m)
    assert ("2", "has forward hooks") in skipped


def test_second_activation_behind_an_identity_ends_the_chain():
    # Found by hypothesis: Linear, ReLU, Identity, ReLU is not one Linear(+activation) layer.
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    model = nn.Sequential(lin, nn.ReLU(), nn.Identity(), nn.ReLU())
    out = sparsify(model, min_sparsity=0.0)
    x = torch.randn(5, 4)
    torch.testing.assert_close(out(x), model(x))
    assert isinstance(out[0], IOSparseNetwork) and isinstance(out[-1], nn.ReLU)
