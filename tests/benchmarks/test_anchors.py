"""benchmarks/anchors.py: the external anchors of benchmarks/cpu_speed.py compute what the dense model
computes (so a wrong anchor is never timed), on tiny nets. SparseProp and DeepSparse are optional
benchmark dependencies (benchmarks/requirements.txt, bash benchmarks/deepsparse_venv.sh): their tests
skip when they are absent; the chain decomposition they rely on is tested without them."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import anchors  # noqa: E402
import torch_iosparse as tis  # noqa: E402
from torch_iosparse.graph.generate import radix_net  # noqa: E402


def _mlp(sizes=(48, 40, 40, 12), amount=0.8, last_act=True, seed=0):
    torch.manual_seed(seed)
    mods = []
    for k in range(len(sizes) - 1):
        lin = nn.Linear(sizes[k], sizes[k + 1])
        prune.l1_unstructured(lin, "weight", amount=amount)
        prune.remove(lin, "weight")
        mods += [lin, nn.ReLU()] if (last_act or k < len(sizes) - 2) else [lin]
    return nn.Sequential(*mods).eval()


def _chain_forward(layers, x):
    """The chain in numpy/scipy: what every chain-based anchor must reproduce."""
    for layer in layers:
        x = layer.act.apply(torch.from_numpy(np.asarray(layer.W @ x.numpy().T).T.copy()) + layer.b)
    return x if layers[-1].out_index is None else x[:, layers[-1].out_index]


@pytest.mark.parametrize("last_act", [True, False])
def test_layer_chain_of_a_pruned_mlp_matches_the_model(last_act):
    model = _mlp(last_act=last_act)
    dag = tis.SparseDAG.from_module(model)
    layers = anchors.layer_chain(dag)
    assert layers is not None and len(layers) == 3
    assert sum(layer.W.nnz for layer in layers) == dag.n_edges
    x = torch.rand(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(_chain_forward(layers, x), model(x), rtol=1e-5, atol=1e-5)
    seq = anchors.dense_sequential(dag)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), model(x), rtol=1e-6, atol=1e-6)


def test_layer_chain_of_a_radix_net_and_none_for_skip_edges():
    dag = radix_net(64, 3, 8)
    layers = anchors.layer_chain(dag)
    assert layers is not None and len(layers) == 3
    x = torch.rand(4, dag.n_inputs)
    torch.testing.assert_close(_chain_forward(layers, x), dag.forward_reference(x), rtol=1e-5, atol=1e-4)
    assert anchors.dense_sequential(dag) is None  # not built by from_module: no DeepSparse export
    skip = tis.SparseDAG.from_edges(n_inputs=2, src=[0, 1, 2, 0, 3], dst=[2, 2, 3, 4, 4],
                                    weight=[0.5, -1.0, 2.0, 1.0, 1.0])
    assert anchors.layer_chain(skip) is None


def test_check_close_reports_a_wrong_anchor():
    ref = torch.ones(3, 4)
    assert anchors.check_close(ref.clone(), ref) is None
    assert "max abs difference" in anchors.check_close(ref + 0.5, ref)
    assert "shape" in anchors.check_close(ref[:2], ref)


def test_machine_line_names_the_cpu():
    import cpu_speed
    line = cpu_speed.machine_line(1)
    assert anchors.cpu_model() in line and "ISA" in line and "L1d" in line and "L3" in line
    assert "threads: 1" in line


needs_sparseprop = pytest.mark.skipif(not anchors.sparseprop_available(),
                                      reason="SparseProp absent (pip install -r benchmarks/requirements.txt)")


@needs_sparseprop
@pytest.mark.parametrize("via_csr", [False, True])
@pytest.mark.parametrize("B", [1, 7, 16])
def test_sparseprop_chain_equals_the_dense_model(monkeypatch, via_csr, B):
    if via_csr:  # the path for layers too big to densify (RadiX-Net levels)
        monkeypatch.setattr(anchors, "SPARSEPROP_DENSE_LIMIT", 0)
    model = _mlp(sizes=(48, 32, 32, 16), last_act=False)
    chain = anchors.sparseprop_chain(tis.SparseDAG.from_module(model))
    x = torch.rand(B, 48)
    with torch.no_grad():
        assert anchors.check_close(chain(x), model(x), rtol=1e-5, atol=1e-5) is None


@needs_sparseprop
def test_sparseprop_chain_on_a_radix_net_and_in_a_bench_row():
    import cpu_speed
    dag = radix_net(64, 3, 8)
    chain = anchors.sparseprop_chain(dag)
    x = torch.rand(16, dag.n_inputs)
    assert anchors.check_close(chain(x), dag.forward_reference(x), rtol=1e-4, atol=1e-4) is None
    rows = cpu_speed.bench_case("radix", dag, [16], rounds=1, use_deepsparse=False)
    assert "sparseprop" in rows[0]["times"] and not rows[0]["failed"]
    table = cpu_speed.fmt_rows(rows)
    assert "| SparseProp |" in table and "wrong" not in table


def _has_onnx():
    try:
        import onnx  # noqa: F401
        return True
    except ImportError:
        return False


needs_deepsparse = pytest.mark.skipif(not (anchors.deepsparse_available() and _has_onnx()),
                                      reason="DeepSparse venv (bash benchmarks/deepsparse_venv.sh) or onnx absent")


@needs_deepsparse
def test_deepsparse_matches_the_dense_model_and_rejects_a_wrong_reference(tmp_path):
    model = _mlp(sizes=(32, 24, 8))
    dag = tis.SparseDAG.from_module(model)
    res = anchors.deepsparse_times(dag, {1: torch.rand(1, 32), 4: torch.rand(4, 32)}, threads=1, rounds=1)
    assert not res.errors, res.errors
    assert set(res) == {1, 4} and all(t is not None and t > 0 for t in res.values()), res.note
    # The runner's own check: a reference that is off makes it refuse to time that batch size.
    onnx_path = tmp_path / "m.onnx"
    anchors.export_onnx(anchors.dense_sequential(dag), 32, str(onnx_path))
    x = torch.rand(2, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    np.savez(tmp_path / "c.npz", x_2=x.numpy(), ref_2=ref + 1.0)
    r = subprocess.run([anchors.DEEPSPARSE_PYTHON, anchors.DEEPSPARSE_RUNNER, str(onnx_path), str(tmp_path / "c.npz"),
                        "--threads", "1", "--rounds", "1", "--min-time", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert out["results"]["2"] is None and "differs from the dense model" in out["errors"]["2"]
