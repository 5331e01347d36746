"""torch_iosparse/backends/cpu: hardware.py (cache detection, BT and M formulas) and strategy.py (automatic
strategy choice)."""
import pytest
import torch

from torch_iosparse.testing.networks import pruned_mlp
from torch_iosparse.testing.checks import run
from torch_iosparse.testing.networks import ALL_ACTIVATIONS
from torch_iosparse import SparseDAG, ops
from torch_iosparse.backends.cpu import hardware, strategy


def test_cache_detection_and_formulas(monkeypatch):
    info = hardware.detect()
    assert info.l1d_bytes > 0 and info.l2_bytes >= info.l1d_bytes and info.vector_bytes in (16, 32, 64)
    fake = hardware.CpuInfo(48 << 10, 2 << 20, 32 << 20, 2, 64, "avx512", "test")
    assert hardware.batch_tile(torch.float32, fake) == 64
    assert hardware.batch_tile(torch.float64, fake) == 32
    assert hardware.fast_memory_slots(64, torch.float32, fake) == (1 << 20) // 256
    tiny = hardware.CpuInfo(1024, 1024, 1024, 1, 16, "generic", "test")
    assert hardware.fast_memory_slots(64, torch.float32, tiny) == 2  # never below 2 slots


def test_cache_size_override_by_environment(monkeypatch):
    hardware.detect.cache_clear()
    monkeypatch.setenv("IOSPARSE_L2_BYTES", "256K")
    try:
        info = hardware.detect()
        assert info.l2_bytes == 256 << 10 and "env" in info.source
    finally:
        monkeypatch.delenv("IOSPARSE_L2_BYTES")
        hardware.detect.cache_clear()


def test_size_parser():
    assert hardware._parse_size("48K") == 48 << 10
    assert hardware._parse_size("2048K\n") == 2 << 20
    assert hardware._parse_size("32M") == 32 << 20
    assert hardware._parse_size("123") == 123
    with pytest.raises(ValueError):
        hardware._parse_size("lots")


def test_thresholds_from_timings():
    t = {1: {"level": 1, "program": 2, "dense": 9}, 4: {"level": 3, "program": 2, "dense": 5},
         64: {"level": 9, "program": 3, "dense": 2}, 256: {"level": 30, "program": 9, "dense": 4}}
    assert strategy.thresholds_from(t) == (1, 64)
    t2 = {1: {"level": 2, "program": 1}, 8: {"level": 5, "program": 1}}
    assert strategy.thresholds_from(t2) == (0, strategy.NEVER)


def test_cost_model_choices():
    # deep chain: thousands of levels -> never the level path
    meta = {"n_edges": 100000, "n_levels": 9000, "layered": 0}
    times = strategy.model_times(meta, 1, 2, 0)
    assert times["program"] < times["level"]
    # shallow, very sparse net at batch 1 -> level path
    meta = {"n_edges": 20000, "n_levels": 3, "layered": 1}
    assert min(strategy.model_times(meta, 1, 2, 10**6).items(), key=lambda kv: kv[1])[0] == "level"
    # nearly dense layered net at a large batch -> dense
    meta = {"n_edges": 900000, "n_levels": 2, "layered": 1}
    assert min(strategy.model_times(meta, 1024, 2, 10**6).items(), key=lambda kv: kv[1])[0] == "dense"


@pytest.mark.parametrize("batch", [1, 2, 16, 300])
def test_auto_matches_forced_strategies(batch):
    model = pruned_mlp([20, 30, 10], 0.9, [ALL_ACTIVATIONS[1]], dtype=torch.float32)
    dag = SparseDAG.from_module(model)
    net = ops.prepare(dag)
    chosen = strategy.chosen(net.meta, batch)
    assert chosen in ("program", "level", "dense")
    x = torch.randn(batch, 20)
    forced = ops.prepare(dag, strategy=chosen)
    torch.testing.assert_close(run(net, x, dag), run(forced, x, dag))
    torch.testing.assert_close(run(net, x, dag), model(x).detach(), rtol=2e-4, atol=2e-4)


def test_calibration_measures_and_caches():
    dag = SparseDAG.from_module(pruned_mlp([16, 16, 4], 0.5, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, calibrate=True)
    assert net.info["strategy_source"] == "measured"
    assert set(net.info["calibration"][1]) - {"panel"} == {"program", "level", "dense", "block"}
    lm, dm, bm = net.meta["level_max_batch"], net.meta["dense_min_batch"], net.meta["block_min_batch"]
    assert 0 <= lm < dm and (bm == ops.NEVER or lm < bm < dm)
    again = ops.prepare(dag, calibrate=True)  # cached: same thresholds, no new measurement
    assert (again.meta["level_max_batch"], again.meta["dense_min_batch"], again.meta["block_min_batch"]) == (lm, dm, bm)
    assert "calibration" not in again.info


def test_sysfs_cache_reader_closes_its_files(tmp_path, monkeypatch):
    import gc
    import warnings
    for name, level, kind, size in (("index0", 1, "Data", "48K"), ("index1", 1, "Instruction", "32K"),
                                    ("index2", 2, "Unified", "2048K"), ("index3", 3, "Unified", "32M")):
        d = tmp_path / name
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    monkeypatch.setattr(hardware, "_SYS_CACHE", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        sizes = hardware._from_sys()
        gc.collect()
    assert sizes == {1: 48 << 10, 2: 2 << 20, 3: 32 << 20}  # the instruction cache is skipped
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], "sysfs files left open"


def test_tile_and_memory_chosen_together():
    from torch_iosparse.testing.networks import radix_like
    dag = radix_like(256, 3, 4, dtype=torch.float32)
    bt, M, table = strategy.choose_tile(dag, torch.float32)
    assert bt in table and table[bt][0] == M == hardware.fast_memory_slots(bt)
    assert table[bt][2] <= 1.1 * min(c for _, _, c in table.values())
    assert all(b <= bt for b in table if table[b][2] <= 1.1 * min(c for _, _, c in table.values()))
    net = ops.prepare(dag)
    # the plan's M; the kernel's slot buffer holds no more than the network can use (program.compile_plan)
    assert net.meta["batch_tile"] == bt and net.plan.memory == M and net.meta["memory"] == min(M, dag.n_neurons + 1)
    # an explicit tile or memory is respected
    assert ops.prepare(dag, batch_tile=32).meta["batch_tile"] == 32
    assert ops.prepare(dag, memory=7).meta["memory"] == 7
