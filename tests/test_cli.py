"""python -m torch_iosparse explain|plan|bench on saved models."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from torch_iosparse.cli import load_model_file, main
from torch_iosparse.module import IOSparseNetwork
from torch_iosparse.sparsify import sparsify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    for x in m:
        if type(x) is nn.Linear:
            prune.l1_unstructured(x, "weight", 0.8)
    conv = sparsify(m, memory=5)
    paths = {"state": tmp_path / "state.pt", "whole": tmp_path / "whole.pt", "single": tmp_path / "single.pt",
             "junk": tmp_path / "junk.pt"}
    torch.save(conv.state_dict(), paths["state"])
    torch.save(conv, paths["whole"])
    torch.save(conv[0].state_dict(), paths["single"])
    torch.save({"a": torch.zeros(2)}, paths["junk"])
    return conv, paths


def test_load_model_file_kinds(files):
    conv, p = files
    from_state = load_model_file(str(p["state"]))
    assert sorted(from_state.keys()) == ["0", "4"]
    x = torch.randn(2, 12)
    torch.testing.assert_close(from_state["0"](x), conv[0](x))
    assert isinstance(load_model_file(str(p["single"])), IOSparseNetwork)
    with pytest.raises(SystemExit, match="--full-model"):
        load_model_file(str(p["whole"]))
    assert isinstance(load_model_file(str(p["whole"]), full_model=True), nn.Sequential)
    with pytest.raises(SystemExit, match="no IOSparseNetwork"):
        load_model_file(str(p["junk"]))


def test_commands_in_process(files, capsys, tmp_path):
    _, p = files
    assert main(["explain", str(p["state"]), "--plot", str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert "neurons" in out and "UB" in out and (tmp_path / "x.png").exists()
    assert main(["plan", str(p["single"]), "--memory", "3", "--save-dir", str(tmp_path / "plans")]) == 0
    out = capsys.readouterr().out
    assert "(was)" in out and "(now)" in out and list((tmp_path / "plans").glob("*.plan.npz"))
    assert main(["bench", str(p["whole"]), "--full-model", "--batch", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "dense/sparse" in out and "reference ms" in out and out.count("\n") >= 4


def test_module_entry_point(files):
    _, p = files
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "torch_iosparse", "explain", str(p["state"])], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "two_optimal" in r.stdout
    r = subprocess.run([sys.executable, "-m", "torch_iosparse", "bogus"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_incomplete_state_is_a_clean_error(files, tmp_path):
    conv, _ = files
    sd = conv.state_dict()
    del sd["0.act_bounds"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(SystemExit, match="cannot be rebuilt.*act_bounds"):
        load_model_file(str(tmp_path / "broken.pt"))
