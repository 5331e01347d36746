"""Plans: the two_optimal order, save/load round trip, and refusal of plans of other networks or of
damaged files."""
from __future__ import annotations

import gc
import hashlib
import io
import json
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_iosparse as tis
from torch_iosparse import planning
from torch_iosparse.planning import plans
from torch_iosparse.testing.networks import MEMORIES, dags


@pytest.fixture
def net():
    return tis.SparseDAG.from_edges(2, [0, 1, 0, 2, 3, 1], [3, 3, 4, 4, 2, 2])  # numbering not topological


def test_two_optimal_order_is_the_stable_topological_sort(net):
    p = tis.plan(net, 2)
    assert p.order.tolist() == [3, 2, 4]  # 3 first: 2 reads it; then 2, then 4
    assert p.method == "two_optimal" and p.memory == 2 and p.dag_hash == net.structure_hash()
    assert p.io == tis.count_io(net, p.order, 2)
    assert "two_optimal" in planning.methods()


@settings(max_examples=20)
@given(dags(max_computed=10), st.sampled_from(MEMORIES))
def test_save_load_round_trip(tmp_path_factory, dag, memory):
    p = tis.plan(dag, memory)
    path = tmp_path_factory.mktemp("plans") / "p.plan"
    p.save(str(path))
    q = tis.Plan.load(str(path), dag)
    assert np.array_equal(p.order, q.order) and q.order.dtype == np.int64
    assert (q.memory, q.io, q.method, q.dag_hash) == (p.memory, p.io, p.method, p.dag_hash)
    assert tis.count_io(dag, q, memory) == p.io


def test_plan_of_another_network_is_refused(tmp_path, net):
    other = tis.SparseDAG.from_edges(2, [0, 1, 0, 2, 3], [3, 3, 4, 4, 2])  # one edge fewer
    p = tis.plan(net, 3)
    path = str(tmp_path / "net.plan")
    p.save(path)
    with pytest.raises(tis.PlanError, match="made for another network"):
        tis.Plan.load(path, other)
    with pytest.raises(tis.PlanError, match="made for another network"):
        tis.count_io(other, tis.Plan.load(path), 3)
    # same structure, other weights: accepted (a plan depends on the structure only)
    same = tis.SparseDAG.from_edges(2, [0, 1, 0, 2, 3, 1], [3, 3, 4, 4, 2, 2], np.arange(6.0))
    assert tis.count_io(same, tis.Plan.load(path, same), 3) == p.io


def _saved(tmp_path, net):
    path = tmp_path / "x.plan"
    tis.plan(net, 4).save(str(path))
    return path


def test_truncated_and_corrupted_files_are_refused(tmp_path, net):
    path = _saved(tmp_path, net)
    data = path.read_bytes()
    for k, damaged in enumerate([data[: len(data) // 2], data[:10], b"", b"not a plan at all" * 20,
                                 data[:-40]]):
        bad = tmp_path / f"bad{k}.plan"
        bad.write_bytes(damaged)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(tis.PlanError, match="not a readable torch_iosparse plan file|corrupt"):
                tis.Plan.load(str(bad))
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], "Plan.load left a file open"
    with pytest.raises(FileNotFoundError):
        tis.Plan.load(str(tmp_path / "missing.plan"))


def _rewrite(path, out, meta_edit=None, order_edit=None, keep_checksum=False):
    with np.load(path) as z:
        meta, order, checksum = json.loads(str(z["meta"])), z["order"].copy(), str(z["checksum"])
    if meta_edit:
        meta_edit(meta)
    if order_edit is not None:
        order = order_edit(order)
    meta_s = json.dumps(meta, sort_keys=True)
    if not keep_checksum:
        checksum = hashlib.sha256(meta_s.encode() + np.ascontiguousarray(order, dtype=np.int64).tobytes()).hexdigest()
    with open(out, "wb") as f:
        np.savez(f, meta=np.array(meta_s), order=order, checksum=np.array(checksum))


def test_tampered_contents_are_refused(tmp_path, net):
    path = _saved(tmp_path, net)
    bad = tmp_path / "bad.plan"
    # order changed, checksum not updated
    _rewrite(path, bad, order_edit=lambda o: o[::-1].copy(), keep_checksum=True)
    with pytest.raises(tis.PlanError, match="checksum"):
        tis.Plan.load(str(bad))
    # a flipped byte inside the stored order (zip stores npz members uncompressed)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = z.getinfo("order.npy")
    raw[info.header_offset + 30 + len(info.filename) + info.extra.__len__() + 128 + 1] ^= 0x01
    bad.write_bytes(bytes(raw))
    with pytest.raises(tis.PlanError):
        tis.Plan.load(str(bad))
    # another format version / another file format / missing fields
    _rewrite(path, bad, meta_edit=lambda m: m.update(version=99))
    with pytest.raises(tis.PlanError, match="version 99"):
        tis.Plan.load(str(bad))
    _rewrite(path, bad, meta_edit=lambda m: m.update(format="something.else"))
    with pytest.raises(tis.PlanError, match="not a torch_iosparse plan file"):
        tis.Plan.load(str(bad))
    _rewrite(path, bad, meta_edit=lambda m: m.pop("io"))
    with pytest.raises(tis.PlanError, match="malformed"):
        tis.Plan.load(str(bad))


def test_loaded_plan_with_a_non_topological_order_is_caught_when_used(tmp_path, net):
    # a consistent file (checksum recomputed) whose order is wrong: count_io checks it
    path = _saved(tmp_path, net)
    bad = tmp_path / "bad.plan"
    _rewrite(path, bad, order_edit=lambda o: o[::-1].copy())
    p = tis.Plan.load(str(bad), net)
    with pytest.raises(ValueError, match="not topological"):
        tis.count_io(net, p, 4)


def test_register_method_plugs_into_plan():
    @planning.register_method("custom_method_test")
    def _custom(dag, memory, seed=0, time_budget=None, **kw):
        order = tis.topological_order(dag)
        return order, {"note": "test"}

    dag = tis.SparseDAG.from_edges(1, [0, 0], [1, 2])
    p = tis.plan(dag, 2, method="custom_method_test")
    assert p.info == {"note": "test"} and p.io == tis.count_io(dag, p.order, 2)
    plans._METHODS.pop("custom_method_test")
    repr(p)


def test_info_is_saved_when_json_serialisable(tmp_path, net):
    p = tis.plan(net, 3)
    p.info = {"history": np.arange(3), "best": np.int64(7), "note": "x", "opaque": object()}
    path = str(tmp_path / "i.plan")
    p.save(path)
    assert tis.Plan.load(path, net).info == {"history": [0, 1, 2], "best": 7, "note": "x"}
