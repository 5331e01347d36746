"""The docs show real output: the traces in docs/theory.md and the README quickstart are regenerated and
compared; the demo runs and its extension points work."""
from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

import torch_iosparse as tis
from torch_iosparse import planning
from torch_iosparse.planning import plans
from torch_iosparse.tools import demo

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def run_readme_example(text, heading, tmp_path, monkeypatch):
    """Run the first python block after ``heading`` in a scratch directory; return (what it printed, the
    block shown after "prints")."""
    section = text.split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    expected = re.search(r"prints\n\n```\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    return out.getvalue(), expected


def test_theory_md_traces_are_real_output():
    text = read("docs/theory.md")
    dag = tis.SparseDAG.from_edges(2, [0, 1, 2, 0, 3], [2, 2, 3, 4, 4])
    assert repr(dag) in text
    assert f"({tis.lower_bound(dag, 2)}, {tis.upper_bound(dag, 2)})" in text
    for M in (2, 3):
        block = (f">>> tis.count_io(dag, [2, 3, 4], {M})\n{tis.count_io(dag, [2, 3, 4], M)}\n"
                 f">>> for e in tis.trace(dag, [2, 3, 4], {M}): print(e)\n"
                 + "\n".join(str(e) for e in tis.trace(dag, [2, 3, 4], M)) + "\n```")
        assert block in text, f"the M={M} trace in docs/theory.md is stale"


def test_readme_quickstart_output_is_real(tmp_path, monkeypatch):
    text = read("README.md")
    assert text.splitlines()[3:5] == ["make demo   # creates .venv/ if missing, builds the native extension, "
                                      "prunes an MLP, plans it, prints the I/O report",
                                      "make test   # the same set-up, then the whole test suite (pytest -n 2)"]
    printed, expected = run_readme_example(text, "## Quickstart", tmp_path, monkeypatch)
    assert printed == expected
    assert (tmp_path / "mlp.plan").exists()


def test_demo_runs_and_reports(capsys):
    assert demo.main(["--widths", "24,48,8", "--memory", "3,16,inf", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "forward_reference vs dense model, float32" in out and "MISMATCH" not in out
    rows = [line.split() for line in out.splitlines() if " two_optimal " in f" {line} "]
    assert [r[0] for r in rows] == ["3", "16", "inf"]
    for r in rows:
        lb, count, ub = (int(c.replace(",", "")) for c in r[2:5])
        assert lb <= count <= ub <= 2 * lb
    assert rows[-1][2] == rows[-1][3]  # unbounded memory: count == LB


def test_demo_extension_points(capsys, monkeypatch):
    @planning.register_method("demo_test_method")
    def _m(dag, memory, seed=0, time_budget=None, **kw):
        return tis.topological_order(dag)

    seen = []
    monkeypatch.setattr(demo, "PLAN_METHODS", demo.PLAN_METHODS + [("demo_test_method", {})])
    monkeypatch.setattr(demo, "SECTIONS", [])
    demo.section(lambda ctx: seen.append(sorted(k[0] for k in ctx.plans)))
    try:
        assert demo.main(["--widths", "8,8,4", "--memory", "4", "--batch", "2"]) == 0
    finally:
        plans._METHODS.pop("demo_test_method")
    out = capsys.readouterr().out
    assert "demo_test_method" in out and seen and "demo_test_method" in seen[0]


def test_demo_plot(tmp_path, capsys):
    path = tmp_path / "io.png"
    assert demo.main(["--widths", "8,16,4", "--memory", "2,4,8,inf", "--batch", "2", "--plot", str(path)]) == 0
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_readme_module_section_output_is_real(tmp_path, monkeypatch):
    # The drop-in-module example of the README (IOSparseNetwork, sparsify, torch.compile) prints what it shows.
    printed, expected = run_readme_example(read("README.md"), "## Drop-in modules", tmp_path, monkeypatch)
    assert machine_independent(printed) == machine_independent(expected)


def machine_independent(text):
    """The README's printed output with the one value that depends on the machine masked: M of a network
    whose memory was sized by ``memory="auto"`` (planned by the default two_optimal method there) comes
    from the detected cache size."""
    return re.sub(r"M=\d+(, method=two_optimal)", r"M=<auto>\1", text)


def test_machine_independent_masks_only_auto_memory():
    line = "IOSparseNetwork(sizes=4x4, nnz=3, M={}, method={}, io=9 (LB=9, UB=9))"
    assert machine_independent(line.format(4096, "two_optimal")) == machine_independent(line.format(2048, "two_optimal"))
    assert machine_independent(line.format(32, "greedy")) != machine_independent(line.format(64, "greedy"))
    assert machine_independent("max abs difference < 1e-6: True") != machine_independent("max abs difference < 1e-6: False")
