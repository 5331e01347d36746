"""The package's import graph (docs/architecture.md): the module-level imports of torch_iosparse form no
cycle, run one way down the pipeline (graph -> cost -> planning -> compile -> ops -> backends -> nn -> tools
-> testing), imports inside functions that go the other way are the known few, and every sub-package
imports on its own in a fresh interpreter."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Set, Tuple

import pytest

import torch_iosparse

PKG_DIR = pathlib.Path(torch_iosparse.__file__).resolve().parent
ROOT = "torch_iosparse"
# Bottom to top. The leaf modules at the top level (the op's ABI, the environment, file writing, the
# loader of the native extension) may be imported by every layer.
LAYERS = ["graph", "cost", "planning", "compile", "ops", "backends", "nn", "tools", "testing"]
LEAVES = {"abi", "env", "files", "_native", "_C"}
SUBPACKAGES = LAYERS + ["backends.cpu", "backends.cuda"]
# Imports inside functions that reach a higher layer, each for a reason docs/architecture.md gives.
UPWARD_CALLS = {
    ("torch_iosparse.graph.generate", "torch_iosparse.cost.iomodel"),  # io_optimal checks its I/O = the bound
    ("torch_iosparse.compile.prepare", "torch_iosparse.ops.registry"),  # CompiledNetwork.forward runs the op
    ("torch_iosparse.compile.prepare", "torch_iosparse.backends.cpu.hardware"),  # prepare: tile and M,
    ("torch_iosparse.compile.prepare", "torch_iosparse.backends.cpu.strategy"),  # the path per batch size,
    ("torch_iosparse.compile.prepare", "torch_iosparse.backends.cpu.tuning"),  # the tuner
    ("torch_iosparse.backends.cpu.tuning", "torch_iosparse.nn.module"),  # tune(model) walks the model
    ("torch_iosparse.nn.sparsify", "torch_iosparse.tools.explain"),  # sparsify(report=True) prints the report
}


def module_files() -> Dict[str, pathlib.Path]:
    out = {}
    for path in PKG_DIR.rglob("*.py"):
        parts = path.relative_to(PKG_DIR).with_suffix("").parts
        name = ".".join((ROOT,) + (parts[:-1] if parts[-1] == "__init__" else parts))
        out[name] = path
    return out


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> List[str]:
    """The torch_iosparse modules an ``import`` / ``from ... import`` statement loads."""
    if node.level:
        base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith(ROOT):
        return []
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    # ``from package import submodule`` loads the submodule (and the package above it, see loaded_with);
    # any other name is read from the module ``target`` itself.
    submodules += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" == f"{ROOT}._C"]  # the extension
    whole = target in MODULES and len(submodules) < len(node.names)
    return ([target] if whole else []) + submodules


def imports_of(name: str) -> Tuple[Set[str], Set[str]]:
    """(module-level imports, imports inside functions) of module ``name``: torch_iosparse modules only."""
    tree = ast.parse(MODULES[name].read_text())
    top: Set[str] = set()
    inner: Set[str] = set()

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
                continue
            found: List[str] = []
            if isinstance(child, ast.Import):
                found = [a.name for a in child.names if a.name in MODULES]
            elif isinstance(child, ast.ImportFrom):
                found = resolve(name, child)
            (inner if in_function else top).update(found)
            visit(child, in_function)

    visit(tree, False)
    return top, inner


def loaded_with(importer: str, target: str) -> List[str]:
    """Importing ``target`` from inside ``importer`` runs ``target`` and every package above it that is
    not already being imported (the importer's own packages are)."""
    own = {".".join(importer.split(".")[:k]) for k in range(1, importer.count(".") + 2)}
    parts = target.split(".")
    chain = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return [m for m in chain if m not in own and m != importer]


def graph() -> Dict[str, Set[str]]:
    """Module -> the modules its module-level imports run (packages above them included)."""
    return {name: {m for t in imports_of(name)[0] for m in loaded_with(name, t)} for name in MODULES}


def layer(name: str) -> int:
    """Position in LAYERS; -1 for the leaf modules, None for the top-level package and __main__."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return None
    if parts[1] in LEAVES:
        return -1
    return LAYERS.index(parts[1])


def find_cycle(g: Dict[str, Set[str]]):
    state: Dict[str, int] = {}
    stack: List[str] = []

    def dfs(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(g.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = dfs(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(g):
        if v not in state:
            found = dfs(v)
            if found:
                return found
    return None


def test_every_folder_of_the_pipeline_is_a_package():
    for sub in SUBPACKAGES:
        assert (PKG_DIR / sub.replace(".", "/") / "__init__.py").is_file(), sub


def test_module_level_imports_have_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_module_level_imports_run_down_the_pipeline():
    bad = []
    for name, targets in graph().items():
        here = layer(name)
        if here is None:
            continue
        for t in targets:
            there = layer(t)
            if there is None or there > here:
                bad.append(f"{name} imports {t}")
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(sorted(bad))


def test_imports_inside_functions_that_go_up_are_the_known_ones():
    upward = set()
    for name in MODULES:
        here = layer(name)
        if here is None:
            continue
        for t in imports_of(name)[1]:
            there = layer(t)
            if there is None or there > here:
                upward.add((name, t))
    assert upward == UPWARD_CALLS, (f"new: {sorted(upward - UPWARD_CALLS)}; gone: {sorted(UPWARD_CALLS - upward)}; "
                                    "keep docs/architecture.md and UPWARD_CALLS in step")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PKG_DIR.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


# The sub-package imported first, without the top-level __init__ (a stub package stands in for it), so
# each sub-package's own imports must bring in everything it needs, in an order that works.
ALONE = """
import importlib, importlib.util, sys, types
spec = importlib.util.find_spec("torch_iosparse")
stub = types.ModuleType("torch_iosparse")
stub.__path__, stub.__file__, stub.__spec__ = list(spec.submodule_search_locations), spec.origin, spec
sys.modules["torch_iosparse"] = stub
importlib.import_module("torch_iosparse.{sub}")
print("ok")
"""


@pytest.mark.parametrize("sub", [s for s in SUBPACKAGES if s != "backends.cuda"])
def test_each_subpackage_imports_alone_in_a_fresh_interpreter(sub):
    for code in (ALONE.format(sub=sub), f"import torch_iosparse.{sub}; print('ok')"):
        r = run_python(code)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_cuda_backend_imports_alone_when_triton_is_installed():
    pytest.importorskip("triton")
    for code in (ALONE.format(sub="backends.cuda.gpu"), "import torch_iosparse.backends.cuda.gpu; print('ok')"):
        r = run_python(code)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# One-word module paths that resolve only for pickles (torch_iosparse/__init__.py): code and docs use the
# package paths.
PICKLE_PATHS = ("activations", "dag", "generate", "iomodel", "planner", "cache", "program", "hardware", "strategy",
                "tuning", "module", "chains", "sparsify", "checkpoint", "distributed", "explain")


def test_code_docs_and_notebooks_import_the_package_paths():
    import re

    repo = PKG_DIR.parent
    names = "|".join(PICKLE_PATHS)
    stmt = re.compile(rf"(from\s+torch_iosparse\.({names})\s+import|import\s+torch_iosparse\.({names})\b"
                      rf"|-m\s+torch_iosparse\.({names})\b|torch_iosparse/({names})\.py)")
    files = [p for d in ("torch_iosparse", "tests", "benchmarks", "docs", "notebooks", "scripts")
             for p in (repo / d).rglob("*") if p.suffix in (".py", ".md", ".ipynb", ".sh") and "history" not in p.parts]
    files += [repo / "README.md", repo / "Makefile"]
    bad = [f"{p.relative_to(repo)}: {m.group(0)}" for p in files if p.is_file()
           for m in stmt.finditer(p.read_text(errors="replace"))]
    assert not bad, "\n".join(bad)
