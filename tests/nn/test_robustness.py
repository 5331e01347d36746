"""Hardening of the module layer: all-or-nothing, validated state loads (persistent buffers never share
memory with the kernel's), networks built under torch.inference_mode, plan files and cache entries that
are FIFOs or decompression bombs, atomic Plan.save, zero-width layers and the command line's messages."""
import io
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_iosparse as tis
from torch_iosparse import cache, ops, planning
from torch_iosparse.tools.cli import main
from torch_iosparse.graph.dag import GraphError, SparseDAG
from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.nn.sparsify import sparsify

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SIZES = (6, 12, 5)


def pruned(seed=0, sizes=SIZES):
    """A pruned MLP with two different activations (so act_index / act_code matter)."""
    torch.manual_seed(seed)
    a, b = nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2])
    for lin in (a, b):
        prune.l1_unstructured(lin, "weight", 0.6)
    return nn.Sequential(a, nn.ReLU(), b, nn.Tanh())


def network(seed=0, **kw):
    kw.setdefault("memory", 4)
    return IOSparseNetwork(pruned(seed), dtype=torch.float64, **kw)


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_state_equal(net, before):
    now = net.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def assert_matches_reference(net, seed=0, batch=5):
    """Forward and backward (input, weights, biases) of ``net`` equal SparseDAG.forward_reference of
    ``net.to_dag()`` — so the kernel runs the structure that the module reports."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.n_inputs, generator=g, dtype=net.weight.dtype, requires_grad=True)
    y = net(x)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, net.weight, net.bias), gy)
    dag = net.to_dag()
    w, b = dag.weight.clone().requires_grad_(), dag.bias.clone().requires_grad_()
    dag.weight, dag.bias = w, b
    xr = x.detach().clone().requires_grad_()
    yr = dag.forward_reference(xr)
    rx, rw, rb = torch.autograd.grad(yr, (xr, w, b), gy)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb[net.n_inputs:])


def assert_no_shared_memory(net):
    """No persistent tensor (state_dict entry) shares memory with a kernel (op_) buffer."""
    persistent = list(net.state_dict(keep_vars=True).items())
    kernel = [(k, v) for k, v in net._buffers.items() if k.startswith("op_")]
    assert kernel
    for ka, a in persistent:
        for kb, b in kernel:
            if a.numel() and b.numel():
                assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr(), (ka, kb)


def corrupted(sd, key, fn):
    bad = {k: v.clone() for k, v in sd.items()}
    fn(bad[key])
    return bad


# ---------------------------------------------------------------------- 3: all-or-nothing loads
def test_persistent_buffers_never_share_memory_with_the_kernel_buffers():
    dag = SparseDAG.from_module(pruned())
    net = IOSparseNetwork(dag, memory=4)
    assert_no_shared_memory(net)
    # nor with the caller's DAG: writing into it changes nothing in the module
    for k in ("in_ptr", "in_src", "outputs"):
        arr = getattr(dag, k)
        for name, t in net._buffers.items():
            if t.numel() and t.device.type == "cpu":
                assert t.untyped_storage().data_ptr() != arr.__array_interface__["data"][0], (k, name)
    net.load_state_dict(network(seed=0, memory=9).state_dict())  # another plan: rebuilt kernel buffers
    assert net.memory == 9
    assert_no_shared_memory(net)
    with torch.no_grad():  # a write into a persistent buffer does not reach the kernel
        net.in_ptr[3] += 1000
    assert int(net.op_in_ptr[3]) != int(net.in_ptr[3])


CORRUPTIONS = {
    "in_ptr decreases": ("in_ptr", lambda t: t.__setitem__(3, 10**6)),
    "in_ptr shifted": ("in_ptr", lambda t: t.add_(1)),
    "in_src out of range": ("in_src", lambda t: t.__setitem__(0, 10**6)),
    "in_src negative": ("in_src", lambda t: t.__setitem__(2, -1)),
    "in_src into a later layer": ("in_src", lambda t: t.__setitem__(t.numel() - 1, int(sum(SIZES)) - 1)),
    "plan_order repeats": ("plan_order", lambda t: t.__setitem__(0, int(t[1]))),
    "plan_order reversed": ("plan_order", lambda t: t.copy_(t.flip(0))),
    "plan_order names an input": ("plan_order", lambda t: t.__setitem__(0, 0)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.parametrize("strict", [True, False])
def test_corrupt_state_raises_and_changes_nothing(case, strict):
    key, fn = CORRUPTIONS[case]
    net = network()
    other = network(seed=1)  # other weights, same structure: must not be half-loaded either
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="structure in the state is invalid"):
        net.load_state_dict(corrupted(other.state_dict(), key, fn), strict=strict)
    assert_state_equal(net, before)
    assert_no_shared_memory(net)
    assert_matches_reference(net)
    with pytest.raises((GraphError, ValueError, KeyError)):  # the same validation without a module
        IOSparseNetwork.from_state_dict(corrupted(other.state_dict(), key, fn))


def test_partial_non_strict_state_is_checked_with_the_rest_of_the_module():
    net = network()
    before = snapshot(net)
    bad = {"in_ptr": net.in_ptr.clone(), "weight": torch.zeros_like(net.weight)}
    bad["in_ptr"][1] = 5
    with pytest.raises(RuntimeError, match="in_ptr"):
        net.load_state_dict(bad, strict=False)
    assert_state_equal(net, before)
    result = net.load_state_dict({"weight": torch.ones_like(net.weight)}, strict=False)  # a valid partial load
    assert "weight" not in result.missing_keys and torch.equal(net.weight.detach(), torch.ones_like(net.weight))
    assert_matches_reference(net)


@pytest.mark.parametrize("key,value,match", [
    ("in_ptr", lambda t: t.double(), "dtype mismatch for in_ptr"),
    ("act_bounds", lambda t: t.view(torch.float64), "dtype mismatch for act_bounds"),
    ("plan_method", lambda t: t.long(), "dtype mismatch for plan_method"),
    ("weight", lambda t: t.long(), "dtype mismatch for weight"),
    ("in_src", lambda t: t[:-1], "size mismatch for in_src"),
    ("outputs", lambda t: [1, 2], "expected torch.Tensor"),
])
def test_wrong_shape_or_dtype_copies_nothing(key, value, match):
    net = network()
    before = snapshot(net)
    sd = network(seed=1).state_dict()
    sd[key] = value(sd[key])
    with pytest.raises(RuntimeError, match=match):
        net.load_state_dict(sd)
    assert_state_equal(net, before)  # not even the valid weights of seed 1
    assert_matches_reference(net)


STRUCTURE_KEYS = ("in_ptr", "in_src", "outputs", "act_index", "act_code", "layer_sizes", "plan_order", "plan_memory")


@settings(max_examples=40, deadline=None)
@given(data=st.data(), key=st.sampled_from(STRUCTURE_KEYS), strict=st.booleans())
def test_any_single_entry_forgery_is_rejected_whole_or_loaded_consistently(data, key, strict):
    net = network()
    before = snapshot(net)
    sd = network(seed=2).state_dict()
    t = sd[key].clone()
    flat = t.view(-1)
    i = data.draw(st.integers(0, flat.numel() - 1), label="index")
    n = net.n_inputs + net.weight.numel()
    flat[i] = data.draw(st.one_of(st.integers(-3, sum(SIZES) + 3), st.integers(-2**63, 2**63 - 1),
                                  st.sampled_from([n, 2**31, -2**31])), label="value")
    sd[key] = t
    try:
        net.load_state_dict(sd, strict=strict)
    except RuntimeError:
        assert_state_equal(net, before)
    else:  # a forgery that happens to describe a valid network (e.g. another topological order) loads whole
        assert_state_equal(net, sd)
    assert_no_shared_memory(net)
    assert_matches_reference(net)


# ---------------------------------------------------------------------- 9: every field validated
FORGERIES = {
    "layer_sizes off by one": ("layer_sizes", lambda t: t.copy_(torch.tensor([6, 13, 4])), "layer_sizes"),
    "layer_sizes with an empty layer": ("layer_sizes", lambda t: t.copy_(torch.tensor([6, 17, 0])), "layer_sizes"),
    "layer_sizes wrong sum": ("layer_sizes", lambda t: t.copy_(torch.tensor([6, 12, 6])), "layer_sizes"),
    "layer_sizes negative": ("layer_sizes", lambda t: t.copy_(torch.tensor([6, 18, -1])), "layer_sizes"),
    "act_code -1": ("act_code", lambda t: t.__setitem__(0, -1), "act_code"),
    "act_code 65537": ("act_code", lambda t: t.__setitem__(-1, 65537), "act_code"),
    "act_code 7": ("act_code", lambda t: t.__setitem__(0, 7), "act_code"),
    "act_index out of the table": ("act_index", lambda t: t.__setitem__(-1, 2), "act_index"),
    "act_index 65537 (int16 wrap)": ("act_index", lambda t: t.__setitem__(-1, 65537), "act_index"),
    "act_index negative": ("act_index", lambda t: t.__setitem__(-1, -1), "act_index"),
    "act_bounds NaN": ("act_bounds", lambda t: t.view(torch.float64).__setitem__((0, 0), float("nan")), "act_bounds"),
    "act_bounds lo > hi": ("act_bounds", lambda t: t.view(torch.float64)[1].copy_(torch.tensor([1.0, -1.0])),
                           "act_bounds"),
    "plan_memory 1": ("plan_memory", lambda t: t.fill_(1), "plan_memory"),
    "plan_memory -7": ("plan_memory", lambda t: t.fill_(-7), "plan_memory"),
    "outputs not the last layer": ("outputs", lambda t: t.__setitem__(0, 6), "outputs|layer"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_field_is_a_clear_error_and_leaves_the_module_unchanged(case):
    key, fn, match = FORGERIES[case]
    net = network()
    before = snapshot(net)
    bad = corrupted(net.state_dict(), key, fn)
    with pytest.raises(RuntimeError, match=match):
        net.load_state_dict(bad)
    assert_state_equal(net, before)
    assert_matches_reference(net)
    with pytest.raises(GraphError, match=match):
        IOSparseNetwork.from_state_dict(bad)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(-2, 25), min_size=3, max_size=3))
def test_layer_sizes_load_only_when_they_are_the_network_s_layers(sizes):
    net = network()
    before = snapshot(net)
    sd = net.state_dict()
    sd["layer_sizes"] = torch.tensor(sizes, dtype=torch.int64)
    if tuple(sizes) == SIZES:
        net.load_state_dict(sd)
    else:
        with pytest.raises(RuntimeError, match="layer_sizes"):
            net.load_state_dict(sd)
        with pytest.raises(GraphError, match="layer_sizes"):
            IOSparseNetwork.from_state_dict(sd)
    assert_state_equal(net, before)
    assert net.to_dag().layer_sizes == list(SIZES)


@settings(max_examples=30, deadline=None)
@given(code=st.integers(-2**63, 2**63 - 1) | st.integers(-2, 9), which=st.integers(0, 1))
def test_activation_codes_must_name_an_activation(code, which):
    net = network()
    before = snapshot(net)
    sd = net.state_dict()
    sd["act_code"] = sd["act_code"].clone()
    sd["act_code"][which] = code
    if 0 <= code < len(tis.graph.activations.KINDS):  # another activation is a legitimate state: it loads
        net.load_state_dict(sd)
        neuron = SIZES[0] if which == 0 else sum(SIZES) - 1  # act_code is [relu (layer 1), tanh (layer 2)]
        assert net.to_dag().activation_of(neuron).kind == tis.graph.activations.KINDS[code]
    else:
        with pytest.raises(RuntimeError, match="act_code"):
            net.load_state_dict(sd)
        assert_state_equal(net, before)
    assert_matches_reference(net)


def test_cli_rebuilds_states_with_the_same_validation(tmp_path, capsys):
    sd = network().state_dict()
    sd["act_code"][0] = 65537
    torch.save(sd, tmp_path / "forged.pt")
    assert main(["explain", str(tmp_path / "forged.pt")]) == 1
    err = capsys.readouterr().err
    assert "act_code" in err and "Traceback" not in err and err.count("\n") == 1


# ---------------------------------------------------------------------- 10: inference mode
def _reference(net_or_dag, x):
    dag = net_or_dag if isinstance(net_or_dag, SparseDAG) else net_or_dag.to_dag()
    return dag.forward_reference(x)


def _build_network():
    return IOSparseNetwork(pruned(), memory=4)


def _build_sparsified():
    return sparsify(nn.Sequential(pruned(), nn.LayerNorm(SIZES[-1])), memory=4)


def _build_loaded():
    net = IOSparseNetwork(pruned(), memory=9)
    net.load_state_dict(IOSparseNetwork(pruned(seed=1), memory=4).state_dict())
    return net


@pytest.mark.parametrize("build", [_build_network, _build_sparsified, _build_loaded], ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_build_and_run_under_inference_mode(build, mode):
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        model = build()
        x = torch.randn(7, SIZES[0])
        y = model(x)
        if isinstance(model, IOSparseNetwork):
            torch.testing.assert_close(y, _reference(model, x))
        else:
            torch.testing.assert_close(y, model[1](_reference(model[0][0], x)))


def test_prepare_and_dag_forward_under_inference_mode():
    with torch.inference_mode():
        dag = SparseDAG.from_module(pruned())
        net = ops.prepare(dag, tis.plan(dag, 4))
        x = torch.randn(7, SIZES[0])
        y = ops.dag_forward(x, dag.weight, dag.bias, net.buffers, net.meta)
        torch.testing.assert_close(y, dag.forward_reference(x))


@pytest.mark.parametrize("build", [_build_network, _build_loaded], ids=lambda f: f.__name__)
def test_built_under_inference_mode_runs_and_trains_outside(build):
    """The module makes its tensors outside inference mode (module._ordinary_tensors): a network built or
    loaded under torch.inference_mode() is an ordinary module afterwards — forward, backward and in-place
    optimizer steps work outside, as for one built there."""
    with torch.inference_mode():
        net = build()
        net.to(torch.float64)  # conversions there make no inference tensors either
    assert not any(t.is_inference() for t in list(net.parameters()) + list(net.buffers()))
    assert_matches_reference(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(3, SIZES[0], dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert_matches_reference(net)


def test_sparsified_under_inference_mode_trains_outside():
    with torch.inference_mode():
        model = _build_sparsified()
    assert not any(t.is_inference() for t in model.parameters())
    x = torch.randn(4, SIZES[0])
    model(x).square().sum().backward()  # LayerNorm's copied parameters too
    assert all(p.grad is not None for p in model.parameters())


def test_inference_tensor_input_cannot_be_saved_for_backward():
    """PyTorch's own rule, not lifted: an input created under inference mode cannot enter a graph that
    autograd records (the error says so clearly); under no_grad / inference_mode it runs."""
    net = _build_network()
    with torch.inference_mode():
        x = torch.randn(3, SIZES[0])
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        net(x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _reference(net, x))


# ---------------------------------------------------------------------- 11: plan files and the cache
def _cache_entry(seq, memory=4):
    dag = SparseDAG.from_module(seq)
    key = cache.cache_key(dag, memory, "two_optimal", 0, None)
    d = cache.cache_dir()
    path = os.path.join(d, key[:2], key + ".plan.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return dag, path


def _in_thread(fn, timeout, unblock=None):
    """Run fn in a daemon thread; fail (instead of hanging) if it is still running after ``timeout`` s."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        if unblock is not None:
            unblock()
        th.join(10)
        pytest.fail(f"{fn} still blocked after {timeout} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _unblock_fifo(path):
    def go():
        try:  # a writer that opens and closes: the blocked reader sees end-of-file
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    return go


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_at_a_cache_entry_is_a_miss_not_a_hang():
    seq = pruned()
    _, path = _cache_entry(seq)
    os.mkfifo(path)
    corrupt = cache.stats["corrupt"]
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        net = _in_thread(lambda: IOSparseNetwork(seq, memory=4), 30, _unblock_fifo(path))
    assert not net.cache_hit and cache.stats["corrupt"] == corrupt + 1
    assert stat.S_ISREG(os.stat(path).st_mode)  # replaced by a real entry
    assert IOSparseNetwork(seq, memory=4).cache_hit


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_plan_load_refuses_fifos_and_devices(tmp_path):
    fifo = str(tmp_path / "p.plan.npz")
    os.mkfifo(fifo)
    with pytest.raises(planning.PlanError, match="not a regular file"):
        _in_thread(lambda: planning.Plan.load(fifo), 30, _unblock_fifo(fifo))
    if os.path.exists("/dev/zero"):
        with pytest.raises(planning.PlanError, match="not a regular file"):
            _in_thread(lambda: planning.Plan.load("/dev/zero"), 30)


def _npy_header(n_items):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (n_items,)})
    return buf.getvalue()


def _bomb(path, good, mib=64):
    """A plan file whose 'order' member is ``mib`` MiB of zeros deflated to ~``mib`` KiB; the other members
    are those of the good plan file ``good``."""
    with zipfile.ZipFile(good) as z:
        members = {n: z.read(n) for n in ("meta.npy", "checksum.npy")}
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
        zi = zipfile.ZipInfo("order.npy")
        zi.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(zi, "w") as w:
            w.write(_npy_header(mib << 17))
            chunk = bytes(1 << 20)
            for _ in range(mib):
                w.write(chunk)


def _lie_about_size(path, member, size):
    """Patch the uncompressed size that ``member`` declares (local header and central directory)."""
    data = bytearray(open(path, "rb").read())
    name = member.encode()
    for sig, size_at, name_len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        pos = 0
        while True:
            pos = data.index(sig, pos)
            n = struct.unpack_from("<H", data, pos + name_len_at)[0]
            if data[pos + name_at:pos + name_at + n] == name:
                struct.pack_into("<I", data, pos + size_at, size)
                break
            pos += 4
    open(path, "wb").write(bytes(data))


def _peak_while(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("with_dag", [True, False])
def test_decompression_bomb_is_rejected_before_it_inflates(tmp_path, with_dag):
    dag = SparseDAG.from_module(pruned())
    good = str(tmp_path / "good.plan.npz")
    tis.plan(dag, 4).save(good)
    bomb = str(tmp_path / "bomb.plan.npz")
    _bomb(bomb, good)
    assert os.path.getsize(bomb) < 1 << 20

    def load():
        with pytest.raises(planning.PlanError, match="declares"):
            planning.Plan.load(bomb, dag if with_dag else None)
    assert _peak_while(load) < 8 << 20


def test_member_that_inflates_past_its_declared_size_is_cut_there(tmp_path):
    dag = SparseDAG.from_module(pruned())
    good = str(tmp_path / "good.plan.npz")
    tis.plan(dag, 4).save(good)
    bomb = str(tmp_path / "liar.plan.npz")
    _bomb(bomb, good)
    _lie_about_size(bomb, "order.npy", 200)

    def load():
        with pytest.raises(planning.PlanError):
            planning.Plan.load(bomb, dag)
    assert _peak_while(load) < 8 << 20


def test_bomb_at_a_cache_entry_is_a_miss():
    seq = pruned()
    dag, path = _cache_entry(seq)
    good = path + ".good"
    tis.plan(dag, 4).save(good)
    _bomb(path, good)
    os.remove(good)
    with pytest.warns(RuntimeWarning, match="declares"):
        peak = _peak_while(lambda: IOSparseNetwork(seq, memory=4))
    assert peak < 32 << 20
    assert IOSparseNetwork(seq, memory=4).cache_hit


def test_plan_save_replaces_atomically_and_never_truncates(tmp_path, monkeypatch):
    dag = SparseDAG.from_module(pruned())
    path = tmp_path / "x.plan.npz"
    p4, p9 = tis.plan(dag, 4), tis.plan(dag, 9)
    p4.save(path)
    before = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as open(path, "wb") would make it

    def failing_savez(f, **kw):
        f.write(b"half a plan")
        raise OSError("disk full")
    with monkeypatch.context() as m:
        m.setattr(np, "savez", failing_savez)
        with pytest.raises(OSError, match="disk full"):
            p9.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.plan.npz"]
    assert planning.Plan.load(path, dag).memory == 4
    p9.save(str(path))
    assert planning.Plan.load(path, dag).memory == 9 and os.listdir(tmp_path) == ["x.plan.npz"]


# ---------------------------------------------------------------------- 12: zero widths, CLI messages
@pytest.mark.parametrize("layers,match", [
    ([nn.Linear(4, 0)], r"Linear layer 0 .*no outputs"),
    ([nn.Linear(0, 4)], r"Linear layer 0 .*no inputs"),
    ([nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 0)], r"Linear layer 1 .*out_features=0"),
    ([nn.Linear(4, 0), nn.Linear(0, 3)], r"Linear layer 0 .*no outputs"),
])
def test_zero_width_layers_are_rejected_at_construction(layers, match):
    seq = nn.Sequential(*layers)
    with pytest.raises(ValueError, match=match):
        IOSparseNetwork(seq)
    with pytest.raises(ValueError, match=match):
        SparseDAG.from_module(seq)
    model = nn.Sequential(*layers)
    conv = sparsify(model, min_sparsity=0.0)  # sparsify leaves them alone: the model keeps working
    x = torch.randn(2, layers[0].in_features)
    torch.testing.assert_close(conv(x), model(x))
    assert all(m.n_inputs and m.n_outputs for m in conv.modules() if isinstance(m, IOSparseNetwork))


@pytest.fixture
def bad_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(network().state_dict(), good)
    files = {"missing": tmp_path / "nope.pt", "directory": tmp_path, "empty": tmp_path / "empty.pt",
             "random": tmp_path / "random.pt", "truncated": tmp_path / "truncated.pt",
             "tensor": tmp_path / "tensor.pt", "no network": tmp_path / "linear.pt",
             "whole model": tmp_path / "whole.pt", "text": tmp_path / "text.txt"}
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(3000))
    files["truncated"].write_bytes(good.read_bytes()[:300])
    torch.save(torch.zeros(3), files["tensor"])
    torch.save(nn.Linear(2, 3).state_dict(), files["no network"])
    torch.save(nn.Linear(2, 3), files["whole model"])
    files["text"].write_text("hello\n")
    return good, files


@pytest.mark.parametrize("command", ["explain", "plan", "bench"])
def test_cli_bad_files_print_one_line_and_exit_1(bad_files, command, capsys):
    _, files = bad_files
    expected = {"missing": "no such file", "directory": "not a regular file", "empty": "empty file",
                "random": "not a file saved by torch.save", "truncated": "not a file saved by torch.save",
                "tensor": "expected a state_dict", "no network": "no IOSparseNetwork",
                "whole model": "--full-model", "text": "not a file saved by torch.save"}
    for kind, path in files.items():
        assert main([command, str(path)]) == 1, kind
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and expected[kind] in err and "Traceback" not in err, (kind, err)
        assert err.startswith("python -m torch_iosparse: error: "), err
    assert main([command, str(files["random"]), "--full-model"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a file saved by torch.save" in err


@pytest.mark.parametrize("argv,match", [
    (["plan", "{f}", "--memory", "abc"], "--memory"),
    (["plan", "{f}", "--memory", "1"], "--memory.*>= 2"),
    (["plan", "{f}", "--method", "nope"], "--method.*invalid choice"),
    (["plan", "{f}", "--seed", "x"], "--seed"),
    (["plan", "{f}", "--time-budget", "-1"], "--time-budget"),
    (["bench", "{f}", "--batch", "0"], "--batch"),
    (["bench", "{f}", "--repeats", "nan"], "--repeats"),
    (["explain"], "model_file"),
    (["frobnicate", "{f}"], "invalid choice"),
])
def test_cli_bad_options_exit_2(bad_files, argv, match, capsys):
    good, _ = bad_files
    with pytest.raises(SystemExit) as e:
        main([a.format(f=good) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(match, err.splitlines()[-1]), err


def test_cli_unwritable_save_dir_is_one_line(bad_files, tmp_path, capsys):
    good, _ = bad_files
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["plan", str(good), "--memory", "4", "--save-dir", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_process_exit_status_and_stderr(bad_files):
    good, files = bad_files
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for argv, code in ((["explain", str(files["random"]), "--full-model"], 1),
                       (["plan", str(good), "--memory", "x"], 2)):
        r = subprocess.run([sys.executable, "-m", "torch_iosparse", *argv], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == code, r.stderr
        assert "Traceback" not in r.stderr
        if code == 1:
            assert r.stderr.count("\n") == 1
