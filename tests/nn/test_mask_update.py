"""Gradual pruning: IOSparseNetwork.update_mask_ gives a network a new sparsity pattern in place (re-planned
through the plan cache), keeps the optimizer usable (state remapped edge by edge) and never lets optimizer
state of the old edges reach the new ones."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import torch_iosparse as tis
from torch_iosparse import SparseDAG, cache
from torch_iosparse.nn.module import IOSparseNetwork, MaskUpdate, remap_optimizer_state_, update_masks_

from torch_iosparse.testing.models import pruned_sequential
from torch_iosparse.testing.networks import random_dags

SIZES = (10, 24, 16, 3)


def network(seed=0, dtype=torch.float64, **kw):
    dense = pruned_sequential(SIZES, 0.7, (nn.Tanh, nn.ReLU), seed=seed)
    return IOSparseNetwork(dense, dtype=dtype, tune=False, **kw), dense


def random_masks(seed, density=0.3, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, a, generator=g) < density for a, b in zip(sizes[:-1], sizes[1:])]


def swap_one_edge(masks):
    """The same pattern with one edge of the first layer pruned and one grown: the same edge count."""
    out = [m.clone() for m in masks]
    on, off = out[0].nonzero()[0], (~out[0]).nonzero()[0]
    out[0][tuple(on)], out[0][tuple(off)] = False, True
    return out


def dense_weights(net):
    return [m.weight.detach() for m in net.to_dense() if isinstance(m, nn.Linear)]


def masked_dense_model(net, masks):
    """The masked dense model of ``net`` with ``masks``: nn.Linear layers holding ``net``'s weights of the
    surviving edges and zeros elsewhere (what update_mask_ promises to compute)."""
    ref = net.to_dense()
    with torch.no_grad():
        for lin, m in zip([l for l in ref if isinstance(l, nn.Linear)], masks):
            lin.weight.mul_(m)
    return ref


@given(seed=st.integers(0, 10_000), density=st.floats(0.05, 0.9), batch=st.sampled_from([1, 5, 70]))
@settings(max_examples=15)
def test_forward_after_update_equals_masked_dense_with_the_new_mask(seed, density, batch):
    net, _ = network(seed % 7)
    weight, bias = net.weight, net.bias
    masks = random_masks(seed, density)
    expected = masked_dense_model(net, masks)
    update = net.update_mask_(masks)
    assert net.weight is weight and net.bias is bias  # the same Parameter objects
    assert [torch.equal(a, b) for a, b in zip(net.masks(), masks)] == [True] * len(masks)
    assert net.nnz == update.n_new == sum(int(m.sum()) for m in masks)
    x = torch.randn(batch, SIZES[0], dtype=torch.float64)
    torch.testing.assert_close(net(x), expected(x), rtol=1e-10, atol=1e-12)
    # the network is a valid network of its own: its state rebuilds it
    rebuilt = IOSparseNetwork.from_state_dict(net.state_dict(), tune=False)
    torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=0)


def test_explicit_weights_and_edge_bookkeeping():
    net, _ = network(1)
    old_masks, old_dense = net.masks(), dense_weights(net)
    masks = random_masks(2, 0.4)
    values = [torch.randn(m.shape, dtype=torch.float64) for m in masks]
    update = net.update_mask_(masks, weights=values)
    for W, v, m in zip(dense_weights(net), values, masks):
        torch.testing.assert_close(W, v * m, rtol=0, atol=0)
    both = sum(int((a & b).sum()) for a, b in zip(old_masks, masks))
    assert (update.kept, update.added, update.removed) == (both, update.n_new - both, update.n_old - both)
    # kept_old / kept_new pair the same (target, source) edges: remap carries values over
    old_w = torch.cat([W[m] for W, m in zip(old_dense, old_masks)])
    carried = update.remap(old_w, fill=float("nan"))
    new_kept = torch.cat([(a & b)[b] for a, b in zip(old_masks, masks)])
    torch.testing.assert_close(carried[new_kept], torch.cat([W[a & b] for W, a, b in zip(old_dense, old_masks, masks)]))
    assert torch.isnan(carried[~new_kept]).all()


def _reference_step(ref_layers, masks, opt, x, y):
    opt.zero_grad()
    out = x
    for lin, act in ref_layers:
        out = act(lin(out))
    nn.functional.cross_entropy(out, y).backward()
    for (lin, _), m in zip(ref_layers, masks):
        lin.weight.grad.mul_(m)  # the masked dense model's weight gradient: zero off the pattern
    opt.step()


def _restrict_reference(ref_layers, masks, opt):
    """A pattern change in the masked dense reference: weights and optimizer state off the new pattern are
    zero (a pruned edge is forgotten; a grown edge starts from zero, with fresh state)."""
    with torch.no_grad():
        for (lin, _), m in zip(ref_layers, masks):
            lin.weight.mul_(m)
            for v in opt.state.get(lin.weight, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == m.shape:
                    v.mul_(m)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, amsgrad=True),
], ids=["sgd-momentum", "adam", "adamw-amsgrad"])
def test_training_across_pattern_changes_matches_masked_dense_reference(make_opt, tmp_path):
    net, _ = network(3, cache_dir=str(tmp_path))
    acts = [nn.Tanh(), nn.ReLU(), nn.Identity()]
    ref_layers = [(lin, a) for lin, a in zip([l for l in net.to_dense() if isinstance(l, nn.Linear)], acts)]
    ref_opt = make_opt([p for lin, _ in ref_layers for p in lin.parameters()])
    opt = make_opt(net.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, SIZES[0], generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    first = net.masks()
    # prune to a sub-pattern (gradual magnitude pruning), then prune-and-regrow, then the first pattern again
    pruned = [m & (W.abs() > W.abs()[m].median()) for m, W in zip(first, dense_weights(net))]
    patterns = [first, pruned, random_masks(5, 0.35), first]
    hits_before = cache.stats["hits"]
    for k, masks in enumerate(patterns):
        if k:
            update = net.update_mask_(masks, optimizer=opt)
            _restrict_reference(ref_layers, masks, ref_opt)
            assert update.cache_hit == (k == len(patterns) - 1)  # the repeated pattern is planned once
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            _reference_step(ref_layers, masks, ref_opt, x, y)
        for W, (lin, _), m in zip(dense_weights(net), ref_layers, masks):
            torch.testing.assert_close(W, lin.weight.detach() * m, rtol=1e-9, atol=1e-11)
            assert torch.all(lin.weight.detach()[~m] == 0)  # the reference really is restricted
        torch.testing.assert_close(net.bias.detach(), torch.cat([lin.bias.detach() for lin, _ in ref_layers]),
                                   rtol=1e-9, atol=1e-11)
    assert cache.stats["hits"] == hits_before + 1


def test_stale_optimizer_state_is_an_error_even_with_the_same_edge_count():
    """Prune-and-regrow keeps the number of edges: the old momentum would fit the new weight tensor."""
    net, _ = network(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(6, SIZES[0], dtype=torch.float64)

    def step():
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()

    step()
    masks = net.masks()
    swapped = swap_one_edge(masks)
    update = net.update_mask_(swapped)  # optimizer not passed
    assert update.n_new == update.n_old
    with pytest.raises(RuntimeError, match="update_mask_"):
        step()
    remap_optimizer_state_(opt, net.weight, update)
    step()  # remapped: fine
    net.update_mask_(masks, optimizer=opt)
    step()
    fresh = torch.optim.Adam(net.parameters())  # an optimizer made after an update has nothing stale
    net.update_mask_(swapped)
    fresh.zero_grad()
    net(x).sum().backward()
    fresh.step()
    with pytest.raises(RuntimeError, match="update_mask_"):
        opt.step()  # still holds state of the pattern before
    opt.state.clear()  # cleared state is not stale either
    opt.step()


def test_invalid_updates_raise_and_change_nothing():
    net, _ = network(5)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, SIZES[0], dtype=torch.float64)).sum().backward()
    opt.step()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    masks = net.masks()
    bad = [
        (masks[:2], ValueError, "3 layers"),
        ([masks[0].t(), masks[1], masks[2]], ValueError, "shape"),
        ([masks[0].double().fill_(float("nan")), masks[1], masks[2]], ValueError, "NaN"),
        (masks[0], TypeError, "list"),
        ([m.tolist() for m in masks], TypeError, "tensor"),
    ]
    for arg, err, match in bad:
        with pytest.raises(err, match=match):
            net.update_mask_(arg, optimizer=opt)
    with pytest.raises(ValueError, match="weights"):
        net.update_mask_(masks, weights=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not optimize"):
        net.update_mask_(masks, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    lbfgs = torch.optim.LBFGS(net.parameters())
    lbfgs.state[net.weight]["d"] = torch.zeros(net.nnz + net.bias.numel())  # a flat state of all parameters
    with pytest.raises(ValueError, match="cannot be remapped"):
        net.update_mask_(random_masks(1), optimizer=lbfgs)
    other = SparseDAG.from_module(pruned_sequential(SIZES, 0.7, (nn.ReLU, nn.ReLU), seed=5))  # other activations
    with pytest.raises(ValueError, match="activations"):
        net.update_mask_(other)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    opt.step()  # nothing changed: the optimizer is not stale


@given(dag=random_dags(max_inputs=3, max_computed=7), seed=st.integers(0, 1000))
@settings(max_examples=12)
def test_general_dag_pattern_update(dag, seed):
    """Any network: the new pattern is a SparseDAG over the same neurons (here: random extra and dropped
    edges among the ones a topological order allows)."""
    net = IOSparseNetwork(dag, memory=3, tune=False, cache=False)
    rng = np.random.default_rng(seed)
    src, dst = dag.edges()
    keep = rng.random(src.size) < 0.6
    order = np.argsort(np.argsort(dag.levels(), kind="stable"), kind="stable")  # a topological rank
    cand = [(u, v) for v in range(dag.n_inputs, dag.n_neurons) for u in range(dag.n_neurons)
            if order[u] < order[v] and rng.random() < 0.2]
    pairs = sorted(set(zip(src[keep].tolist(), dst[keep].tolist())) | set(cand), key=lambda e: (e[1], e[0]))
    new_src = np.array([u for u, _ in pairs], dtype=np.int64)
    new_dst = np.array([v for _, v in pairs], dtype=np.int64)
    acts = [dag.activation_of(v) for v in range(dag.n_neurons)]
    pattern = SparseDAG.from_edges(dag.n_inputs, new_src, new_dst, np.ones(len(pairs)), dag.bias,
                                   n_neurons=dag.n_neurons, outputs=dag.outputs, activation=acts, dtype=torch.float64)
    update = net.update_mask_(pattern)
    # expected: surviving edges keep their weights, new ones are zero
    old = {(int(u), int(v)): w for u, v, w in zip(src, dst, dag.weight.tolist())}
    w = torch.tensor([old.get(e, 0.0) for e in pairs], dtype=torch.float64)
    expected = SparseDAG.from_edges(dag.n_inputs, new_src, new_dst, w, dag.bias, n_neurons=dag.n_neurons,
                                    outputs=dag.outputs, activation=acts, dtype=torch.float64)
    assert update.kept == sum(e in old for e in pairs)
    x = torch.randn(4, dag.n_inputs, dtype=torch.float64)
    torch.testing.assert_close(net(x), expected.forward_reference(x), rtol=1e-10, atol=1e-12)


def test_model_level_update_all_or_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(pruned_sequential((8, 16, 12), 0.7), nn.LayerNorm(12), pruned_sequential((12, 10, 4), 0.7))
    sparse = tis.sparsify(model, tune=False)
    names = [n for n, m in sparse.named_modules() if isinstance(m, IOSparseNetwork)]
    assert names == ["0.0", "2.0"]
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 8)
    sparse(x).sum().backward()
    opt.step()
    new = {"0.0": random_masks(1, 0.5, (8, 16, 12)), "2.0": random_masks(2, 0.5, (12, 10, 4))}
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        update_masks_(sparse, {"0.0": new["0.0"], "2.0": new["0.0"]}, optimizer=opt)
    with pytest.raises(KeyError, match="named '1'"):
        update_masks_(sparse, {"1": new["0.0"]})
    with pytest.raises(ValueError, match="both whole and by layer"):
        update_masks_(sparse, {"0.0": new["0.0"], "0.2": new["0.0"][1]})
    with pytest.raises(TypeError, match="one tensor"):
        update_masks_(sparse, {"0.2": new["0.0"]})
    assert all(torch.equal(v, before[k]) for k, v in sparse.state_dict().items())
    # by the original Linear layers' names (as torch.nn.utils.prune on densify(model) names them)
    dense = tis.densify(sparse)
    linears = {n: m for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    assert list(linears) == ["0.0", "0.2", "2.0", "2.2"]
    prune.l1_unstructured(linears["0.2"], "weight", amount=0.9)
    kept = sparse.get_submodule("0.0").masks()[0]
    updates = update_masks_(sparse, {"0.2": linears["0.2"].weight_mask}, optimizer=opt)
    assert list(updates) == ["0.0"]
    assert torch.equal(sparse.get_submodule("0.0").masks()[0], kept)
    assert torch.equal(sparse.get_submodule("0.0").masks()[1], linears["0.2"].weight_mask.bool())
    torch.testing.assert_close(sparse(x), dense(x))
    updates = update_masks_(sparse, lambda name, net: new[name] if name == "2.0" else None, optimizer=opt)
    assert list(updates) == ["2.0"] and isinstance(updates["2.0"], MaskUpdate)
    updates = update_masks_(sparse, new, optimizer=opt)
    assert set(updates) == {"0.0", "2.0"}
    for name, masks in new.items():
        assert all(torch.equal(a, b) for a, b in zip(sparse.get_submodule(name).masks(), masks))
    sparse(x).sum().backward()
    opt.step()


def test_compiled_module_follows_the_update():
    """A torch.compile'd network is not stuck on the old structure: its guards see the new buffers."""
    torch._dynamo.reset()
    net, _ = network(6, dtype=torch.float32)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x = torch.randn(4, SIZES[0])
    torch.testing.assert_close(compiled(x), net(x))
    masks = random_masks(1, 0.2)
    for masks in (masks, swap_one_edge(masks)):  # another edge count, then the same count
        net.update_mask_(masks)
        torch.testing.assert_close(compiled(x), masked_dense_model(net, masks)(x), rtol=1e-5, atol=1e-6)


def test_load_state_dict_of_another_pattern_makes_optimizer_state_stale_but_another_plan_does_not():
    import copy
    net, dense = network(7)
    opt = torch.optim.Adam(net.parameters())
    x = torch.randn(3, SIZES[0], dtype=torch.float64)

    def step():
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()

    step()
    replanned = IOSparseNetwork(dense, dtype=torch.float64, tune=False, memory=5)  # same edges, another plan
    net.load_state_dict(replanned.state_dict())
    assert net.memory == 5
    step()  # the same edges: the state still fits
    other = copy.deepcopy(net)
    other.update_mask_(swap_one_edge(net.masks()))
    net.load_state_dict(other.state_dict())  # the same edge count, other edges
    with pytest.raises(RuntimeError, match="load_state_dict"):
        step()


def test_update_under_inference_mode_keeps_the_network_trainable():
    net, _ = network(8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(3, SIZES[0], dtype=torch.float64)
    net(x).sum().backward()
    opt.step()
    with torch.inference_mode():
        net.update_mask_(random_masks(3), optimizer=opt)
    assert not net.weight.is_inference() and not opt.state[net.weight]["momentum_buffer"].is_inference()
    opt.zero_grad()
    net(x).sum().backward()
    opt.step()
