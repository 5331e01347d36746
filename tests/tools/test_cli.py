"""python -m torch_iosparse explain|plan|bench|apply on saved models."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from torch_iosparse.tools.cli import load_model_file, main
from torch_iosparse.tools.explain import networks
from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.nn.sparsify import sparsify
from torch_iosparse.testing.models import nested

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


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
    assert [n for n, _ in networks(from_state)] == ["0", "4"]  # the names (and state_dict keys) of the model
    x = torch.randn(2, 12)
    torch.testing.assert_close(from_state.get_submodule("0")(x), conv[0](x))
    assert set(from_state.state_dict()) <= set(conv.state_dict())
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


@pytest.fixture
def nested_file(tmp_path):
    """A state_dict whose networks sit at 1.ffn.0 and 2, beside a LayerNorm."""
    conv = sparsify(nested(), memory=6)
    path = tmp_path / "nested.pt"
    torch.save(conv.state_dict(), path)
    return conv, path


def test_names_are_dotted_and_typos_are_one_line(nested_file, capsys):
    _, path = nested_file
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1.ffn.0" in out and "1/ffn/0" not in out
    assert main(["explain", str(path), "--network", "1/ffn/0"]) == 0  # the slash spelling still reads
    out = capsys.readouterr().out
    assert "1.ffn.0" in out and "\n2 " not in out
    assert main(["plan", str(path), "--network", "1.fn.0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean '1.ffn.0'" in err
    for argv, hint in ((["explian", str(path)], "'explain'"), (["plan", str(path), "--method", "gredy"], "'greedy'"),
                       (["plan", str(path), "--memroy", "3"], "'--memory'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert f"did you mean {hint}" in capsys.readouterr().err


def test_plan_save_dir_then_apply(nested_file, tmp_path, capsys):
    conv, path = nested_file
    plans = tmp_path / "plans"
    assert main(["plan", str(path), "--memory", "3", "--network", "2", "--save-dir", str(plans)]) == 0
    assert "apply them with" in capsys.readouterr().out
    assert sorted(os.listdir(plans)) == ["2.plan.npz"]
    out_file = tmp_path / "out.pt"
    assert main(["apply", str(path), str(plans), "-o", str(out_file)]) == 0
    assert "2: two_optimal plan for M=3" in capsys.readouterr().out
    sd = torch.load(out_file, weights_only=True)
    original = conv.state_dict()
    assert set(sd) == set(original)  # every entry kept, the LayerNorm's included
    assert int(sd["2.plan_memory"]) == 3 and int(sd["1.ffn.0.plan_memory"]) == 6
    for k in original:
        if not k.startswith("2.plan_"):
            assert torch.equal(sd[k], original[k]), k
    fresh = sparsify(conv, memory=6)  # the same architecture loads the applied state
    fresh.load_state_dict(sd)
    assert fresh[2].memory == 3
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh(x), conv(x))


def test_apply_whole_model_and_mismatch(files, tmp_path, capsys):
    conv, p = files
    plans = tmp_path / "plans"
    assert main(["plan", str(p["whole"]), "--full-model", "--memory", "unbounded", "--save-dir", str(plans)]) == 0
    out_file = tmp_path / "whole_applied.pt"
    assert main(["apply", str(p["whole"]), str(plans), "--full-model", "-o", str(out_file)]) == 0
    model = torch.load(out_file, weights_only=False)
    assert model[0].memory is None and model[4].memory is None
    capsys.readouterr()
    os.replace(plans / "4.plan.npz", plans / "0.plan.npz")  # the plan of network 4 offered to network 0
    assert main(["apply", str(p["whole"]), str(plans), "--full-model", "-o", str(out_file)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit network '0'" in err
    assert main(["apply", str(p["whole"]), str(tmp_path / "nowhere"), "--full-model", "-o", str(out_file)]) == 1
    assert "no such plan folder" in capsys.readouterr().err
