"""Measured strategy choice (torch_iosparse/backends/cpu/tuning.py): per network and batch-size bucket, on disk per
machine; switches; reports; tune(); torch.compile / export; the cost model's per-machine profile.

Small networks only: a measurement takes milliseconds here. conftest.py gives every test its own cache
folder ($IOSPARSE_CACHE_DIR)."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import torch_iosparse as tis
from torch_iosparse import ops, tuning
from torch_iosparse.backends.cpu import strategy
from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.nn.sparsify import sparsify
from torch_iosparse.testing.models import two_chains

N_IN = 32
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

# The network of the subprocess test; the same code builds it in-process (same seed: same structure).
NET_SOURCE = """
import torch, torch.nn.utils.prune as prune
from torch import nn

def small_mlp(seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in ((32, 64), (64, 64), (64, 8)):
        lin = nn.Linear(a, b)
        prune.l1_unstructured(lin, "weight", 0.85)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])
"""
exec(NET_SOURCE)  # defines small_mlp


def make_net(**kw):
    return IOSparseNetwork(small_mlp(), **kw)  # noqa: F821 (defined by NET_SOURCE)


def thresholds(net):
    return tuple(int(net._op_meta[k]) for k in strategy.THRESHOLD_KEYS)


def model_thresholds(net):
    return strategy.model_thresholds(net._op_meta, net.summary()["dense_weights"], torch.get_num_threads())


def delta(before):
    return {k: tuning.stats[k] - before[k] for k in before}


def entry_path(net, b, dtype=torch.float32):
    key = net._tuner._entry_key(b, (dtype, torch.get_num_threads()))
    return key, net._tuner._path(key)


def tuning_files(tmp_path):
    d = tmp_path / "cache" / "tuning"
    return sorted(p for p in d.iterdir() if not p.name.startswith("profile-")) if d.is_dir() else []


# ---------------------------------------------------------------------- thresholds from per-bucket paths
@pytest.mark.parametrize("paths", [
    ["level"] * 3 + ["program"] * 4 + ["block"] * 2 + ["dense"] * 2,
    ["level"] * 11,
    ["program"] * 5 + ["panel"] * 6,
    ["dense"] * 11,
    ["level", "program", "program", "block", "block", "panel", "panel", "panel", "panel", "dense", "dense"],
    ["program"] * 11,
])
def test_thresholds_reproduce_every_representable_table(paths):
    table = dict(zip(tuning.BUCKETS, paths))
    meta = {"strategy": 0, "layered": 1, "panels": 5, "block_chunks": 5}
    meta.update(zip(strategy.THRESHOLD_KEYS, strategy.thresholds_from_paths(table)))
    for b, path in table.items():
        last = b * 2 - 1 if b < tuning.BUCKETS[-1] else 10**6
        assert strategy.chosen(meta, b) == path and strategy.chosen(meta, last) == path, (b, meta)
    assert tuning.bucket(1) == 1 and tuning.bucket(3) == 2 and tuning.bucket(1023) == 512
    assert tuning.bucket(1024) == tuning.bucket(10**6) == 1024


def test_unrepresentable_measurements_follow_the_kernels_precedence():
    # level measured at 1 and 4 but not at 2: the level range stops at 1; bucket 4 runs what follows
    table = dict(zip(tuning.BUCKETS, ["level", "program", "level"] + ["program"] * 8))
    lm, dm, pm, bm = strategy.thresholds_from_paths(table)
    assert lm == 1 and dm == pm == bm == strategy.NEVER


# ---------------------------------------------------------------------- measured once, reused, also by a new process
def test_first_call_at_a_bucket_measures_once_and_logs_one_line(caplog):
    net = make_net()
    before = dict(tuning.stats)
    with caplog.at_level(logging.INFO, logger="torch_iosparse"):
        for _ in range(5):
            net(torch.randn(4, N_IN))
        net(torch.randn(6, N_IN))  # same bucket (4..7)
    assert delta(before)["measured"] == 1
    lines = [r for r in caplog.records if "measured the forward paths" in r.getMessage()]
    assert len(lines) == 1 and "batch 4" in lines[0].getMessage()
    rep = net.summary()["strategy_by_bucket"]
    assert rep[4]["source"] == "measured" and not rep[4]["cached"] and len(rep[4]["times"]) >= 2
    assert rep[4]["path"] == strategy.chosen(net._op_meta, 4)
    # the result is the model's function whatever path won
    x = torch.randn(5, N_IN)
    torch.testing.assert_close(net(x), small_mlp()(x), rtol=1e-4, atol=1e-5)  # noqa: F821


def test_measured_choice_is_written_and_reused_by_a_new_process(tmp_path):
    script = NET_SOURCE + """
import json, sys
import torch_iosparse as tis
net = tis.IOSparseNetwork(small_mlp())
for B in (4, 4, 16, 17):
    net(torch.randn(B, 32))
rep = net.summary()["strategy_by_bucket"]
print(json.dumps({"stats": tis.tuning.stats, "rep": {b: rep[b] for b in (4, 16)}}))
"""
    env = dict(os.environ, IOSPARSE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop(tuning.ENV_VAR, None)

    def run():
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    assert first["stats"]["measured"] == 2 and first["stats"]["cached"] == 0
    assert len(tuning_files(tmp_path)) == 2
    assert not [p for p in (tmp_path / "cache" / "tuning").iterdir() if p.name.endswith(".tmp")]
    second = run()
    assert second["stats"] == {"measured": 0, "cached": 2, "ignored": 0}  # read, not measured again
    for b in ("4", "16"):
        assert second["rep"][b]["source"] == "measured" and second["rep"][b]["cached"]
        assert second["rep"][b]["path"] == first["rep"][b]["path"]
        assert second["rep"][b]["times"] == first["rep"][b]["times"]


def test_thread_count_is_its_own_context():
    net = make_net()
    threads = torch.get_num_threads()
    before = dict(tuning.stats)
    net(torch.randn(4, N_IN))
    try:
        torch.set_num_threads(1)
        net(torch.randn(4, N_IN))
        net(torch.randn(4, N_IN))
    finally:
        torch.set_num_threads(threads)
    net(torch.randn(4, N_IN))  # back to the first context: no new measurement
    assert delta(before)["measured"] == (2 if threads != 1 else 1)
    assert net._tuner._ctx == (torch.float32, threads)


# ---------------------------------------------------------------------- unusable entries
def _corruptions():
    def garbage(path, data):
        path.write_text("{not json")

    def truncated(path, data):
        text = json.dumps(data)
        path.write_text(text[: len(text) // 2])

    def empty(path, data):
        path.write_text("")

    def not_an_object(path, data):
        path.write_text("[1, 2, 3]")

    def other_machine(path, data):
        data["key"]["machine"]["cpu"] = "Some Other CPU"
        path.write_text(json.dumps(data))

    def other_isa(path, data):
        data["key"]["machine"]["isa_override"] = "generic"
        path.write_text(json.dumps(data))

    def other_network(path, data):
        data["key"]["network"] = "0" * 64
        path.write_text(json.dumps(data))

    def other_threads(path, data):
        data["key"]["threads"] = 999
        path.write_text(json.dumps(data))

    def unknown_path(path, data):
        data["winner"] = "warp"
        data["times"]["warp"] = 1e-9
        path.write_text(json.dumps(data))

    def bad_times(path, data):
        data["times"] = {data["winner"]: -1.0}
        path.write_text(json.dumps(data))

    def fifo(path, data):
        path.unlink()
        os.mkfifo(path)

    def directory(path, data):
        path.unlink()
        path.mkdir()

    return [garbage, truncated, empty, not_an_object, other_machine, other_isa, other_network, other_threads,
            unknown_path, bad_times, fifo, directory]


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_corrupt_truncated_or_foreign_entries_are_ignored_and_measured_again(tmp_path, corrupt):
    make_net()(torch.randn(4, N_IN))
    (path,) = tuning_files(tmp_path)
    data = json.loads(path.read_text())
    corrupt(path, data)
    before = dict(tuning.stats)
    net = make_net()  # a new network of the same structure reads the entry when built
    net(torch.randn(4, N_IN))
    d = delta(before)
    assert d["ignored"] == 1 and d["measured"] == 1 and d["cached"] == 0
    assert net.summary()["strategy_by_bucket"][4]["source"] == "measured"
    if path.is_file():  # rewritten (a directory in the way stays: the write fails, logged, the run goes on)
        fresh = json.loads(path.read_text())
        assert fresh["key"] == net._tuner._entry_key(4, (torch.float32, torch.get_num_threads()))
        before = dict(tuning.stats)
        make_net()(torch.randn(4, N_IN))
        assert delta(before) == {"measured": 0, "cached": 1, "ignored": 0}


def test_entries_outside_the_cache_folder_or_with_the_cache_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", "0")
    before = dict(tuning.stats)
    net = make_net()
    net(torch.randn(4, N_IN))
    net(torch.randn(4, N_IN))
    assert delta(before)["measured"] == 1  # measured, kept in memory only
    make_net(cache=False)(torch.randn(4, N_IN))
    assert delta(before)["measured"] == 2
    assert not (tmp_path / "cache" / "tuning").exists()


# ---------------------------------------------------------------------- the off switches
def _forge_level_everywhere(net):
    """Valid entries saying the level path won at every bucket (what the model does not pick here)."""
    for b in tuning.BUCKETS:
        key, path = entry_path(net, b)
        tuning.write_json(path, {"key": key, "winner": "level", "times": {"level": 1e-6, "program": 1.0}})


def test_off_switch_by_environment_and_argument_gives_the_models_choice(monkeypatch):
    ref = make_net(tune=False)
    assert thresholds(ref) == model_thresholds(ref) and strategy.chosen(ref._op_meta, 1024) != "level"
    _forge_level_everywhere(make_net())
    on = make_net()
    assert on._op_meta["level_max_batch"] == strategy.NEVER  # the entries are read when the network is built
    assert all(r["source"] == "measured" and r["path"] == "level" for r in on.summary()["strategy_by_bucket"].values())

    monkeypatch.setenv(tuning.ENV_VAR, "0")
    by_env = make_net()
    monkeypatch.delenv(tuning.ENV_VAR)
    by_arg = make_net(tune=False)
    dag = by_arg.to_dag()
    prepared = ops.prepare(dag, by_arg.plan(), batch_tile=by_arg._op_meta["batch_tile"], tune=False)
    before = dict(tuning.stats)
    for net in (by_env, by_arg):
        assert thresholds(net) == thresholds(ref) == model_thresholds(net)
        assert tuple(int(prepared.meta[k]) for k in strategy.THRESHOLD_KEYS) == thresholds(ref)
        for B in (1, 4, 64, 300):
            net(torch.randn(B, N_IN))
        assert thresholds(net) == thresholds(ref)
        s = net.summary()
        assert s["tuning"].startswith("off")
        assert all(r["source"] == "model" for r in s["strategy_by_bucket"].values())
        assert tis.tune(net, [1, 4], progress=False)[("(root)")][4]["source"] == "model"
    assert delta(before) == {"measured": 0, "cached": 0, "ignored": 0}  # nothing measured, nothing read
    # a forced strategy is never tuned either
    assert not make_net(strategy="program")._tuner.enabled


def test_prepare_tune_switch_and_compiled_network_forward(tmp_path):
    from torch_iosparse import SparseDAG
    dag = SparseDAG.from_module(small_mlp())  # noqa: F821
    off = ops.prepare(dag, tune=False)
    on = ops.prepare(dag)
    assert not off.info["tuner"].enabled and on.info["tuner"].enabled
    before = dict(tuning.stats)
    x = torch.randn(8, N_IN)
    torch.testing.assert_close(on.forward(x, dag.weight, dag.bias), off.forward(x, dag.weight, dag.bias),
                               rtol=1e-5, atol=1e-6)
    assert delta(before)["measured"] == 1 and len(tuning_files(tmp_path)) == 1
    assert on.info["tuner"].report(torch.float32)[8]["source"] == "measured"
    assert off.info["tuner"].report(torch.float32)[8]["source"] == "model"


# ---------------------------------------------------------------------- reports
def test_summary_and_explain_say_measured_or_model():
    import io
    net = make_net()
    s = net.summary()
    assert s["tuning"].startswith("on") and all(r["source"] == "model" for r in s["strategy_by_bucket"].values())
    net(torch.randn(4, N_IN))
    s = net.summary()
    by = s["strategy_by_bucket"]
    assert by[4]["source"] == "measured" and by[1]["source"] == by[1024]["source"] == "model"
    assert [b for b, r in by.items() if r["source"] == "measured"] == [4]
    assert s["strategy"].startswith("auto")
    out = io.StringIO()
    rows = tis.explain(net, file=out)
    text = out.getvalue()
    # explain prints the path per batch range ("4-7 block*"): bucket 4 covers the batches 4..7
    assert rows[0]["tuned"] == "1/11" and f"4-7 {by[4]['path']}*" in text and "measured" in text
    assert f"1-3 {by[1]['path']}," in text  # modelled: no star
    out = io.StringIO()
    rows = tis.explain(make_net(tune=False), file=out)
    assert rows[0]["tuned"] == "off" and "*" not in out.getvalue().split("(root): ")[1]


# ---------------------------------------------------------------------- tune()
def two_network_model():
    return sparsify(two_chains())


def test_tune_measures_every_network_and_bucket_ahead_of_time():
    model = two_network_model()
    from torch_iosparse.tools.explain import networks
    names = [name for name, _ in networks(model)]
    assert names == ["0", "4"]
    before = dict(tuning.stats)
    res = tis.tune(model, [1, 3, 16, 2], progress=False)
    assert set(res) == {"0", "4"} and all(sorted(r) == [1, 2, 16] for r in res.values())
    measured = sum(r["source"] == "measured" for per in res.values() for r in per.values())
    assert measured >= 1 and delta(before)["measured"] == measured
    for name, net in (("0", model[0]), ("4", model[4])):
        for b, r in res[name].items():
            assert r["path"] == strategy.chosen(net._op_meta, b)
    # running at the tuned buckets measures nothing; tune() again reuses; force measures again
    before = dict(tuning.stats)
    for B in (1, 3, 16):
        model(torch.randn(B, 16))
    tis.tune(model, [1, 2, 16], progress=False)
    assert delta(before)["measured"] == 0
    tis.tune(model[0], [16], progress=False, force=True)
    assert delta(before)["measured"] == int(res["0"][16]["source"] == "measured")
    with pytest.raises(TypeError):
        tis.tune("model", [1])


def test_tune_shows_a_progress_bar(capsys):
    tis.tune(make_net(), [1, 2], progress=True)
    assert "torch_iosparse.tune" in capsys.readouterr().err


def test_tuning_stays_outside_autograd():
    net, ref = make_net(), make_net(tune=False)
    x = torch.randn(8, N_IN, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    before = dict(tuning.stats)
    net(x).square().sum().backward()
    assert delta(before)["measured"] == 1
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        net(torch.randn(16, N_IN))
    assert delta(before)["measured"] == 2


# ---------------------------------------------------------------------- the backward's path
def backward_lines(caplog):
    return [r for r in caplog.records if "measured the backward paths" in r.getMessage()]


def test_first_backward_at_a_bucket_measures_its_two_paths_and_sets_the_threshold(caplog):
    net, ref = make_net(), make_net(tune=False)
    assert net._tuner.backward_choice and net._op_meta[tuning.BACKWARD_KEY] == 0  # the kernel's rule until measured
    before = dict(tuning.stats)
    with caplog.at_level(logging.INFO, logger="torch_iosparse"):
        with torch.no_grad():
            net(torch.randn(64, N_IN))
        net(torch.randn(64, N_IN))  # a graph recorded but no backward: nothing measured for it
        assert delta(before)["measured"] == 1 and not backward_lines(caplog)
        xs = [torch.randn(B, N_IN, requires_grad=True) for B in (64, 80, 127)]  # one bucket
        for x in xs:
            net(x).square().sum().backward()
            ref(x.detach()).square().sum().backward()
    assert delta(before)["measured"] == 2
    (line,) = backward_lines(caplog)
    assert "batch 64" in line.getMessage()
    entry = net._tuner._backward_tables[(torch.float32, torch.get_num_threads())][64]
    assert entry["source"] == "measured" and set(entry["times"]) == {"level", "block"}
    row = net.summary()["strategy_by_bucket"][64]
    assert row["backward_source"] == "measured" and row["backward_times"] == entry["times"]
    assert row["backward"] == entry["winner"]  # the one measured bucket decides its own path
    # unmeasured buckets follow the kernel's rule (block from 16 float32 rows): the block suffix
    expected = 16 if entry["winner"] == "block" else 128
    assert net._op_meta[tuning.BACKWARD_KEY] == expected
    torch.testing.assert_close(net.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)


def test_backward_entries_are_reused_and_foreign_ones_ignored(tmp_path):
    tis.tune(make_net(), [64], backward=True, progress=False)
    files = tuning_files(tmp_path)
    assert len(files) == 2  # the forward's entry and the backward's
    before = dict(tuning.stats)
    again = make_net()
    res = tis.tune(again, [64], backward=True, progress=False)
    assert delta(before) == {"measured": 0, "cached": 2, "ignored": 0}
    assert res["(root)"][64]["backward_source"] == "measured"
    bw = next(p for p in files if json.loads(p.read_text())["key"].get("pass") == "backward")
    data = json.loads(bw.read_text())
    data["winner"] = "panel"  # not a backward path
    bw.write_text(json.dumps(data))
    before = dict(tuning.stats)
    tis.tune(make_net(), [64], backward=True, progress=False)
    assert delta(before) == {"measured": 1, "cached": 1, "ignored": 1}


def _forge_backward(net, winners):
    for b, winner in winners.items():
        key = net._tuner._entry_key(b, (torch.float32, torch.get_num_threads()), backward=True)
        tuning.write_json(net._tuner._path(key), {"key": key, "winner": winner, "times": {winner: 1e-6}})


@pytest.mark.parametrize("winners, threshold", [
    ({b: "level" for b in tuning.BUCKETS}, strategy.NEVER),
    ({16: "block", 32: "level"}, 64),
    ({1024: "level"}, strategy.NEVER),
    ({16: "level", 64: "block"}, 32),
])
def test_measured_backward_paths_become_the_kernels_threshold(winners, threshold):
    _forge_backward(make_net(), winners)
    net = make_net()
    assert net._op_meta[tuning.BACKWARD_KEY] == threshold  # read when the network is built
    rows = net.summary()["strategy_by_bucket"]
    for b, r in rows.items():
        assert r["backward"] == ("block" if b >= max(threshold, 16) else "level")
        assert r["backward_source"] == ("measured" if b in winners else "model")
    x = torch.randn(64, N_IN, requires_grad=True)  # either path: the gradients are the model's
    net(x).square().sum().backward()
    dense = small_mlp()  # noqa: F821
    xd = x.detach().clone().requires_grad_()
    dense(xd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-4, atol=1e-5)
    off = make_net(tune=False)
    assert off._op_meta[tuning.BACKWARD_KEY] == 0
    assert all(r["backward_source"] == "model" for r in off.summary()["strategy_by_bucket"].values())


@given(st.lists(st.sampled_from(["level", "block"]), min_size=len(tuning.BUCKETS), max_size=len(tuning.BUCKETS)))
def test_backward_threshold_runs_the_block_suffix(paths):
    by_bucket = dict(zip(tuning.BUCKETS, paths))
    threshold = tuning.backward_threshold_from_paths(by_bucket)
    meta = {"strategy": 0, "block_chunks": 1, tuning.BACKWARD_KEY: threshold}
    chosen = {b: tuning.backward_chosen(meta, b, torch.float64) for b in tuning.BUCKETS}
    suffix = [b for b in tuning.BUCKETS if b >= threshold]
    assert all(by_bucket[b] == "block" for b in suffix)  # every bucket it sends to blocks won there ...
    below = [b for b in tuning.BUCKETS if b < threshold]
    assert not below or by_bucket[below[-1]] == "level" or threshold == strategy.NEVER  # ... and it is the longest
    assert all(chosen[b] == ("block" if b >= max(threshold, 8) else "level") for b in tuning.BUCKETS)


# ---------------------------------------------------------------------- torch.compile / export
def test_no_measurement_under_torch_compile_after_tune_and_without():
    torch._dynamo.reset()
    counters.clear()
    model = two_network_model()
    tis.tune(model, [4], progress=False)
    tuned = {name: thresholds(net) for name, net in (("0", model[0]), ("4", model[4]))}
    before = dict(tuning.stats)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    xs = {B: torch.randn(B, 16) for B in (4, 9, 33)}
    ys = {B: compiled(x) for B, x in xs.items()}
    assert delta(before)["measured"] == 0  # new buckets, but compiled: nothing measured
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    assert {"0": thresholds(model[0]), "4": thresholds(model[4])} == tuned
    for B, x in xs.items():  # eager calls measure their buckets; the compiled graph is not recompiled
        torch.testing.assert_close(ys[B], model(x), rtol=1e-5, atol=1e-6)
    assert delta(before)["measured"] >= 1
    compiled(xs[9])
    assert counters["stats"]["unique_graphs"] == 1

    torch._dynamo.reset()
    counters.clear()
    fresh = make_net()  # never tuned
    before = dict(tuning.stats)
    out = torch.compile(fresh, fullgraph=True)(torch.randn(8, N_IN))
    assert out.shape == (8, 8) and delta(before)["measured"] == 0
    assert sum(counters["graph_break"].values()) == 0


def test_no_measurement_under_torch_export():
    net = make_net().eval()
    before = dict(tuning.stats)
    for strict in (False, True):
        ep = torch.export.export(net, (torch.randn(6, N_IN),), strict=strict,
                                 dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
        assert any("iosparse.dag_forward" in str(n.target) for n in ep.graph.nodes)
    assert delta(before)["measured"] == 0
    x = torch.randn(11, N_IN)
    torch.testing.assert_close(ep.module()(x), net(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the cost model's profile
def test_profile_defaults_override_and_unusable_files(tmp_path):
    assert strategy.current_profile() == strategy.DEFAULT_PROFILE and strategy.load_profile() is None
    meta = make_net(tune=False)._op_meta
    fast_level = strategy.Profile(level_rate=1e15, level_overhead=0.0, call_overhead=0.0)
    try:
        strategy.set_profile(fast_level)
        assert strategy.model_thresholds(meta, 0, 2)[0] >= 1024  # the model reads the profile
    finally:
        strategy.set_profile(None)
    path = strategy.save_profile(dataclasses_replace(strategy.DEFAULT_PROFILE, program_rate=1.0))
    assert path and os.path.basename(path).startswith("profile-")
    loaded = strategy.current_profile()
    assert loaded.program_rate == 1.0 and loaded.source.startswith("calibrated")
    good = json.loads(open(path).read())
    for bad in ("{", "", json.dumps(dict(good, machine=dict(good["machine"], cpu="elsewhere"))),
                json.dumps(dict(good, rates=dict(good["rates"], dense_rate=-1))),
                json.dumps(dict(good, rates={"program_rate": 1.0}))):
        with open(path, "w") as f:
            f.write(bad)
        strategy._profile_memo.clear()
        assert strategy.current_profile() == strategy.DEFAULT_PROFILE
    strategy._profile_memo.clear()


def dataclasses_replace(p, **kw):
    import dataclasses
    return dataclasses.replace(p, **kw)


def test_calibrate_profile_writes_this_machines_rates():
    p = strategy.calibrate_profile()
    try:
        rates = p.rates()
        assert set(rates) == set(strategy.DEFAULT_PROFILE.rates())
        assert all(v > 0 for v in rates.values())
        assert strategy.current_profile().rates() == rates  # read back for this machine
        # the model's choice follows the profile (tune=False: model only)
        net = make_net(tune=False)
        assert thresholds(net) == strategy.model_thresholds(net._op_meta, net.summary()["dense_weights"],
                                                            torch.get_num_threads(), profile=p)
    finally:
        strategy._profile_memo.clear()
