"""torch_iosparse.distributed and the sdgc command: batch-sharded inference, the layer pipeline, DDP and FSDP2
training of a sparsified model, and the errors when ranks disagree.

The multi-process cases run in ONE group of two gloo processes started by ``distributed.run_local`` (a file
store under a temporary directory: no ports, so parallel pytest workers never collide; a time limit, so a hang
fails instead of blocking): ``two_ranks`` runs every scenario below on both ranks and each test checks one
scenario's results. One torchrun run covers the command as users start it.
"""
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn
from torch.nn.utils import prune

import torch_iosparse as tis
from torch_iosparse import distributed as D
from torch_iosparse import generate
from torch_iosparse.tools import sdgc

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
# Small challenge networks whose outputs are not all zero (fan-in 32 over width 64 keeps the signal alive).
SMALL = ["--width", "64", "--depth", "4", "--batch", "33", "--repeat", "1"]
TOLERANCE = 1e-6


# ---------------------------------------------------------------------- models shared by both sides
def _pruned_mlp(sizes=(12, 24, 6, 3), amount=0.7, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(a, b)
        prune.l1_unstructured(lin, "weight", amount=amount)
        prune.remove(lin, "weight")
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _train_model() -> nn.Module:
    """A sparsified model (a pruned Linear chain, then a dense Linear head) to train."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6), nn.Tanh(), nn.Linear(6, 3))
    for lin in (model[0], model[2]):
        prune.l1_unstructured(lin, "weight", amount=0.7)
    return tis.sparsify(model)


def _train_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)


def _one_process_grads():
    model = _train_model()
    x, target = _train_data()
    (model(x) - target).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------- scenarios (run on every rank)
def _expect_error(fn) -> str:
    """The RuntimeError text ``fn`` raises ('' when it does not raise)."""
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return ""


def _sharded_command():
    return sdgc.run(SMALL + ["--check"], quiet=True)


def _pipeline_command():
    return sdgc.run(["--width", "64", "--depth", "5", "--batch", "33", "--repeat", "1", "--pipeline", "2",
                     "--microbatches", "3", "--check"], quiet=True)


def _command_detects_a_wrong_rank():
    """Rank 1 computes on wrong rows: the gathered output differs and the command fails on every rank."""
    rank, _ = D.world()
    real = D.scatter_batch
    if rank == 1:
        D.scatter_batch = lambda *a, **k: real(*a, **k) + 1.0
    try:
        return sdgc.main(SMALL + ["--check"])
    finally:
        D.scatter_batch = real


def _sharded_library():
    rank, size = D.world()
    misses_before = tis.cache.stats["misses"]
    net = D.build_replicated(_pruned_mlp(), memory=8)
    planned_here = tis.cache.stats["misses"] - misses_before
    orders = D.gather_objects(net.plan_order.tolist())
    out = {"planned_here": planned_here, "same_plan": all(o == orders[0] for o in orders)}
    torch.manual_seed(0)
    no_bias = D.build_replicated(nn.Sequential(nn.Linear(4, 3, bias=False)))
    out["no_bias_parameters"] = sorted(n for n, _ in no_bias.named_parameters())
    for n_rows in (5, 1, 0):  # uneven, fewer rows than ranks, empty
        x = torch.randn(n_rows, 12, generator=torch.Generator().manual_seed(n_rows)) if rank == 0 else None
        stats = {}
        y = D.sharded_forward(net, x, stats=stats)
        out[n_rows] = {"rows": stats["rows"]}
        if rank == 0:
            with torch.no_grad():
                out[n_rows]["diff"] = float((y - net(x)).abs().max()) if n_rows else 0.0
            out[n_rows]["shape"] = tuple(y.shape)
        else:
            out[n_rows]["none"] = y is None
    return out


def _pipeline_library():
    rank, size = D.world()
    mlp = _pruned_mlp(sizes=(12, 24, 16, 6, 3))
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    start, stop = D.split_layers(len(linears), size)[rank]
    # this rank's Linears with the activation after each (the last stage ends on its Linear): only its part
    stage = tis.IOSparseNetwork(nn.Sequential(*list(mlp)[2 * start:2 * stop]))
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(3))
    out = {"stage_edges": stage.nnz, "stage_inputs": stage.n_inputs}
    stats = {}
    y = D.pipeline_forward(stage, x if rank == 0 else None, microbatches=3, stats=stats)
    out["tiles"] = stats["tiles"]
    if rank == 0:
        with torch.no_grad():
            out["diff"] = float((y - mlp(x)).abs().max())
    else:
        out["none"] = y is None
    return out


def _disagreements():
    rank, size = D.world()
    out = {}
    out["network"] = _expect_error(lambda: D.build_replicated(generate.radix_net(16, 2, fan_in=4, seed=rank)))
    same_structure_other_biases = generate.radix_net(16, 2, fan_in=4, bias=-0.1 - 0.1 * rank)
    out["weights"] = _expect_error(lambda: D.build_replicated(same_structure_other_biases))
    out["arguments"] = _expect_error(lambda: sdgc.run(SMALL[:-2] + ["--repeat", str(1 + rank)], quiet=True))
    out["pipeline_size"] = _expect_error(lambda: sdgc.run(SMALL + ["--pipeline", "3"], quiet=True))
    out["stage_widths"] = _expect_error(lambda: D.pipeline_forward(
        nn.Linear(8, 5 + rank), torch.zeros(2, 8) if rank == 0 else None))
    out["stage_dtype"] = _expect_error(lambda: D.pipeline_forward(
        nn.Linear(8, 8, dtype=torch.float64 if rank else torch.float32), torch.zeros(2, 8) if rank == 0 else None))
    out["no_batch"] = _expect_error(lambda: D.scatter_batch("rows" if rank == 0 else None))
    out["row_shapes"] = _expect_error(lambda: D.gather_batch(torch.zeros(2, 3 + rank)))
    out["forward_fails"] = _expect_error(lambda: D.sharded_forward(
        nn.Linear(4, 2) if rank == 0 else nn.Linear(5, 2), torch.zeros(4, 4) if rank == 0 else None))
    D.check_consensus("still in step", "the end of the scenario")  # the group is usable after every error
    return out


def _ddp():
    from torch.nn.parallel import DistributedDataParallel

    rank, size = D.world()
    model = DistributedDataParallel(_train_model())
    x, target = _train_data()
    (model(x.chunk(size)[rank]) - target.chunk(size)[rank]).square().mean().backward()
    ref = _one_process_grads()
    return {"sparse": any(isinstance(m, tis.IOSparseNetwork) for m in model.modules()),
            "diff": {n[len("module."):]: float((p.grad - ref[n[len("module."):]]).abs().max())
                     for n, p in model.named_parameters()}}


def _fsdp2():
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        return {"skip": f"FSDP2 unavailable: {e}"}
    rank, size = D.world()
    model = _train_model()
    mesh = init_device_mesh("cpu", (size,))
    for m in model.modules():
        if isinstance(m, tis.IOSparseNetwork):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, target = _train_data()
    (model(x.chunk(size)[rank]) - target.chunk(size)[rank]).square().mean().backward()
    ref = _one_process_grads()
    out = {"sharded": {n: type(p).__name__ for n, p in model.named_parameters()},
           "local_numel": {n: p.to_local().numel() for n, p in model.named_parameters()},
           "diff": {n: float((p.grad.full_tensor() - ref[n]).abs().max()) for n, p in model.named_parameters()}}
    # one optimizer step, then the updated weights against the one-process step
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    single = _train_model()
    x, target = _train_data()
    (single(x) - target).square().mean().backward()
    torch.optim.SGD(single.parameters(), lr=0.1).step()
    ref_p = dict(single.named_parameters())
    out["step_diff"] = {n: float((p.full_tensor() - ref_p[n]).abs().max()) for n, p in model.named_parameters()}
    return out


SCENARIOS = {"sharded_command": _sharded_command, "pipeline_command": _pipeline_command,
             "wrong_rank": _command_detects_a_wrong_rank, "sharded_library": _sharded_library,
             "pipeline_library": _pipeline_library, "disagreements": _disagreements, "ddp": _ddp, "fsdp2": _fsdp2}


def _all_scenarios(cache_dir: str):
    os.environ["IOSPARSE_CACHE_DIR"] = cache_dir
    os.environ["IOSPARSE_TUNE"] = "0"  # no first-call measurements: the same paths on every run
    results = {}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = ("ok", fn())
        except Exception:
            results[name] = ("error", traceback.format_exc())
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario's ``(status, result)`` on rank 0 and rank 1. Computed once per test session: pytest-xdist
    workers share it through a file under their common temporary root, behind a lock (filelock comes with
    torch), the pattern pytest-xdist documents for fixtures that must run once."""
    import pickle

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    done = root / "test_distributed_two_ranks.pkl"
    with FileLock(str(done) + ".lock"):
        if not done.exists():
            cache = str(tmp_path_factory.mktemp("plan_cache"))
            done.write_bytes(pickle.dumps(D.run_local(_all_scenarios, 2, (cache,), timeout=300, threads=1)))
    return pickle.loads(done.read_bytes())


def _ok(two_ranks, name):
    out = []
    for rank, results in enumerate(two_ranks):
        status, value = results[name]
        assert status == "ok", f"rank {rank}, scenario {name}:\n{value}"
        out.append(value)
    return out


# ---------------------------------------------------------------------- two processes
def test_sharded_command_equals_one_process(two_ranks):
    r0, r1 = _ok(two_ranks, "sharded_command")
    for r in (r0, r1):
        assert r["mode"] == "sharded" and r["world_size"] == 2
        assert r["check"]["ok"], r["check"]
        assert r["check"]["categories"] > 0  # the outputs are not all zero: the comparison means something
    assert [p["inputs"] for p in r0["ranks"]] == [17, 16]
    assert all(p["edges"] == r0["edges"] == 4 * 64 * 32 for p in r0["ranks"])  # every rank holds the whole net
    assert r0["rate"] == pytest.approx(33 * r0["edges"] / r0["wall_s"])


def test_pipeline_command_equals_one_process_and_ranks_hold_their_layers(two_ranks):
    r0, r1 = _ok(two_ranks, "pipeline_command")
    assert r0["check"]["ok"] and r1["check"]["ok"], r0["check"]
    assert r0["check"]["categories"] > 0
    ranks = r0["ranks"]
    assert [p["layers"] for p in ranks] == [(0, 3), (3, 5)]
    assert [p["edges"] for p in ranks] == [3 * 64 * 32, 2 * 64 * 32]  # each rank built only its part
    assert sum(p["edges"] for p in ranks) == r0["edges"]


def test_command_fails_on_every_rank_when_a_rank_computes_wrongly(two_ranks):
    assert _ok(two_ranks, "wrong_rank") == [1, 1]


def test_sharded_library_plans_once_and_handles_uneven_batches(two_ranks):
    r0, r1 = _ok(two_ranks, "sharded_library")
    assert r0["planned_here"] == 1 and r1["planned_here"] == 0  # rank 1 received rank 0's plan
    assert r0["same_plan"]
    assert r0["no_bias_parameters"] == r1["no_bias_parameters"] == ["weight"]  # bias=False kept on every rank
    for n_rows, rows in ((5, (3, 2)), (1, (1, 0)), (0, (0, 0))):
        assert (r0[n_rows]["rows"], r1[n_rows]["rows"]) == rows
        assert r0[n_rows]["shape"] == (n_rows, 3) and r1[n_rows]["none"]
        assert r0[n_rows]["diff"] <= TOLERANCE


def test_pipeline_library_equals_the_dense_model(two_ranks):
    r0, r1 = _ok(two_ranks, "pipeline_library")
    assert r0["diff"] <= TOLERANCE and r1["none"]
    assert r0["tiles"] == r1["tiles"] == 3
    assert (r0["stage_inputs"], r1["stage_inputs"]) == (12, 16)  # rank 1 holds layers 3 and 4 only


@pytest.mark.parametrize("case, words", [
    ("network", "disagree on the network"), ("weights", "disagree on the network"),
    ("arguments", "disagree on the command-line arguments"), ("pipeline_size", "--pipeline 3 needs 3 processes"),
    ("stage_widths", "stage 1 takes 8 inputs but stage 0 gives 5 outputs"), ("stage_dtype", "torch.float64"),
    ("no_batch", "must be a tensor"), ("row_shapes", "differ in shape"),
    ("forward_fails", "rank 1: the forward failed")])
def test_disagreeing_ranks_raise_on_every_rank(two_ranks, case, words):
    results = _ok(two_ranks, "disagreements")
    for rank, r in enumerate(results):
        assert words in r[case], f"rank {rank}, {case}: {r[case]!r}"
    assert results[0][case] == results[1][case]  # the same message on every rank


def test_ddp_gradients_equal_one_process(two_ranks):
    for r in _ok(two_ranks, "ddp"):
        assert r["sparse"]
        assert set(r["diff"]) == {"0.weight", "0.bias", "4.weight", "4.bias"}
        assert max(r["diff"].values()) <= TOLERANCE, r["diff"]


def test_fsdp2_gradients_and_step_equal_one_process(two_ranks):
    results = _ok(two_ranks, "fsdp2")
    if "skip" in results[0]:
        pytest.skip(results[0]["skip"])
    for r in results:
        assert set(r["sharded"].values()) == {"DTensor"}
        assert max(r["diff"].values()) <= TOLERANCE, r["diff"]
        assert max(r["step_diff"].values()) <= TOLERANCE, r["step_diff"]
    nnz = _train_model()[0].nnz
    assert results[0]["local_numel"]["0.weight"] + results[1]["local_numel"]["0.weight"] == nnz  # really sharded


def test_torchrun_command(tmp_path):
    env = dict(os.environ, IOSPARSE_CACHE_DIR=str(tmp_path / "cache"), IOSPARSE_TUNE="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "torch_iosparse.tools.sdgc"] + SMALL + ["--check"]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check passed" in p.stdout
    lines = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["0", "1", "total"]


# ---------------------------------------------------------------------- the launcher's failure paths
def _rank0_raises_rank1_hangs():
    rank, _ = D.world()
    torch.distributed.barrier()  # both ranks are past the group's set-up
    if rank == 0:
        raise ValueError("rank zero gives up")
    time.sleep(3600)


def test_run_local_reports_a_failing_rank_and_kills_the_hanging_one():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)1 of 2 ranks failed \(ranks \[1\] were still waiting and were "
                                           r"killed\).*ValueError: rank zero gives up"):
        D.run_local(_rank0_raises_rank1_hangs, 2, timeout=120, grace=1.0)
    assert time.monotonic() - t0 < 100


def test_run_local_times_out_on_a_hang():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 1 did not finish within 2 s"):
        D.run_local(time.sleep, 1, (3600,), timeout=2)
    assert time.monotonic() - t0 < 20


# ---------------------------------------------------------------------- one process
@given(st.integers(0, 50), st.integers(1, 9))
def test_split_rows(n, parts):
    counts = D.split_rows(n, parts)
    assert len(counts) == parts and sum(counts) == n and max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)
    assert counts == [len(c) for c in torch.arange(n).tensor_split(parts)]


@given(st.integers(1, 40), st.integers(1, 9))
def test_split_layers(n_layers, stages):
    if stages > n_layers:
        with pytest.raises(ValueError, match="cannot split"):
            D.split_layers(n_layers, stages)
        return
    ranges = D.split_layers(n_layers, stages)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
    assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


@given(st.sampled_from([8, 16, 27]), st.integers(1, 6), st.integers(1, 4), st.integers(0, 3))
def test_radix_net_stages_chain_to_the_whole_network(width, depth, fan_in, seed):
    full = generate.radix_net(width, depth, fan_in=fan_in, seed=seed)
    x = torch.rand(3, width, generator=torch.Generator().manual_seed(seed))
    for stages in range(1, depth + 1):
        y, edges = x, 0
        for layers in D.split_layers(depth, stages):
            part = generate.radix_net(width, depth, fan_in=fan_in, seed=seed, layers=layers)
            assert part.n_inputs == width and part.n_outputs == width
            y, edges = part.forward_reference(y), edges + part.n_edges
        assert edges == full.n_edges
        assert torch.equal(y, full.forward_reference(x))
    assert generate.radix_net(width, depth, fan_in=fan_in, seed=seed, layers=(0, depth)).structure_hash() == \
        full.structure_hash()


@pytest.mark.parametrize("layers", [(0, 0), (2, 1), (-1, 2), (0, 5)])
def test_radix_net_rejects_bad_layer_ranges(layers):
    with pytest.raises(ValueError, match="layers must be"):
        generate.radix_net(8, 4, fan_in=2, layers=layers)


def test_network_fingerprint_covers_weights_and_activations():
    mlp = _pruned_mlp()
    fp = D.network_fingerprint(mlp)
    assert fp == D.network_fingerprint(tis.SparseDAG.from_module(mlp)) == D.network_fingerprint(
        tis.IOSparseNetwork(mlp))
    with torch.no_grad():
        mlp[0].bias[0] += 1e-3
    assert D.network_fingerprint(mlp) != fp
    mlp[0].bias.data[0] -= 1e-3
    other = nn.Sequential(*[nn.ReLU() if isinstance(m, nn.Tanh) else m for m in mlp])
    assert D.network_fingerprint(other) != D.network_fingerprint(mlp)
    with pytest.raises(TypeError, match="expected a SparseDAG"):
        D.network_fingerprint("net")


def test_helpers_without_a_process_group():
    assert D.world() == (0, 1)
    net = D.build_replicated(_pruned_mlp(), memory=8)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(D.sharded_forward(net, x), net(x))
        assert torch.equal(D.pipeline_forward(net, x, microbatches=2), net(x))
    assert D.scatter_batch(x) is x and D.gather_batch(x) is x
    assert D.check_consensus(3, "a number") == [3]
    with pytest.raises(RuntimeError, match="2 columns but stage 0 takes 12"):
        D.pipeline_forward(net, torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="microbatches must be a positive int"):
        D.pipeline_forward(net, x, microbatches=0)
    with pytest.raises(RuntimeError, match="n_inputs / n_outputs"):
        D.pipeline_forward(nn.ReLU(), x)
    with pytest.raises(TypeError, match="not an IOSparseNetwork"):
        D.build_replicated(net)
    with pytest.raises(ValueError, match="do not pass plan="):
        D.build_replicated(_pruned_mlp(), plan=net.plan())
    no_bias = nn.Sequential(nn.Linear(4, 3, bias=False))
    assert "bias" not in dict(D.build_replicated(no_bias).named_parameters())  # like IOSparseNetwork(no_bias)


def test_sdgc_one_process(capsys, monkeypatch):
    monkeypatch.setenv("IOSPARSE_TUNE", "0")
    assert sdgc.main(SMALL + ["--check"]) == 0
    out = capsys.readouterr().out
    assert "one process" in out and "check passed" in out
    result = sdgc.run(SMALL, quiet=True)
    assert result["world_size"] == 1 and result["ranks"][0]["inputs"] == 33 and "check" not in result
    # the check can fail: a reference that disagrees makes the command exit 1
    real = generate.scipy_reference
    monkeypatch.setattr(generate, "scipy_reference", lambda dag, x: real(dag, x) + 0.5)
    assert sdgc.main(SMALL + ["--check"]) == 1
    assert "check FAILED" in capsys.readouterr().out


def test_sdgc_rejects_a_pipeline_without_its_processes(capsys):
    assert sdgc.main(SMALL + ["--pipeline", "2"]) == 1
    assert "--pipeline 2 needs 2 processes" in capsys.readouterr().err
    assert sdgc.main(SMALL + ["--batch", "0"]) == 1
    assert "--batch must be >= 1" in capsys.readouterr().err


def test_sdgc_reference_table(capsys):
    sdgc.reference_table([64], 2, 5, repeat=1)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 1 and rows[0].split("|")[5].strip() == "5"  # every input has a category
