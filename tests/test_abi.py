"""The op's ABI agrees between Python (torch_iosparse.abi) and the C++ / CUDA sources, and every environment
variable is documented in torch_iosparse.env.

The C++ side is read as text: the enums of kernels/cpu/net.h, kernels/cpu/activation.h, kernels/sim/simulator.cpp
and kernels/cuda/*.cu, and the ``check_buffer`` calls of kernels/cpu/validate.cpp. A definition that moves
or changes its form makes the parser fail with the file and the enum it looked for (never a silent pass).
"""
from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch

from torch_iosparse import abi, cache, env
from torch_iosparse.graph import activations
from torch_iosparse.cost import iomodel

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
PACKAGE = ROOT / "torch_iosparse"


# ---------------------------------------------------------------------------------------------- C++ parsing
def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def parse_enum(path: pathlib.Path, name: str) -> dict:
    """``{member: value}`` of ``enum name [: type] { ... }`` in ``path`` (implicit values count up from the
    previous one, as in C++). Only integer literals are accepted as explicit values."""
    text = _strip_comments(path.read_text())
    found = re.findall(r"\benum\s+(?:class\s+)?" + re.escape(name) + r"\s*(?::\s*[\w:]+\s*)?\{(.*?)\}", text, re.S)
    assert len(found) == 1, f"expected one 'enum {name} {{...}}' in {path.relative_to(ROOT)}, found {len(found)}"
    members, value = {}, -1
    for item in (i.strip() for i in found[0].split(",")):
        if not item:
            continue
        m = re.fullmatch(r"([A-Za-z_]\w*)(?:\s*=\s*(-?\d+))?", item)
        assert m, f"cannot parse enum member {item!r} of {name} in {path.relative_to(ROOT)}"
        value = int(m.group(2)) if m.group(2) is not None else value + 1
        members[m.group(1)] = value
    return members


def _without_prefix(members: dict, prefix: str, count: str = None) -> dict:
    out = {}
    for k, v in members.items():
        if k == count:
            continue
        assert k.startswith(prefix), f"enum member {k} lacks the prefix {prefix}"
        out[k[len(prefix):].lower()] = v
    return out


def _switch_cases(path: pathlib.Path, function: str) -> set:
    """The ``case X:`` labels of the body of ``function`` in ``path``."""
    text = _strip_comments(path.read_text())
    m = re.search(r"\b" + re.escape(function) + r"\s*\([^)]*\)\s*\{", text)
    assert m, f"function {function} not found in {path.relative_to(ROOT)}"
    depth, i = 1, m.end()
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return set(re.findall(r"\bcase\s+(\w+)\s*:", text[m.end():i]))


CUDA_SOURCES = sorted((KERNELS / "cuda").glob("*.cu"))


# ---------------------------------------------------------------------------------------------- ABI agreement
def test_net_order_matches_net_h():
    members = parse_enum(KERNELS / "cpu" / "net.h", "NetIndex")
    assert members.pop("NET_COUNT") == len(abi.NET_KEYS)
    assert _without_prefix(members, "NET_") == {k: i for i, k in enumerate(abi.NET_KEYS)}


def test_net_dtypes_match_validate_cpp():
    dtype_of = {"kLong": torch.int64, "kInt": torch.int32, "kChar": torch.int8, "kDouble": torch.float64,
                "kByte": torch.uint8}
    text = _strip_comments((KERNELS / "cpu" / "validate.cpp").read_text())
    calls = re.findall(r'check_buffer\(\s*net_t\[NET_(\w+)\]\s*,\s*"(\w+)"\s*,\s*at::(\w+)', text)
    checked = {}
    for index, name, dtype in calls:
        assert index.lower() == name, f"validate.cpp checks net_t[NET_{index}] under the name {name!r}"
        checked[name] = dtype_of[dtype]
    assert checked == dict(abi.NET_DTYPES)


def test_config_order_matches_net_h():
    members = parse_enum(KERNELS / "cpu" / "net.h", "ConfigIndex")
    assert members.pop("CFG_COUNT") == len(abi.CONFIG_KEYS)
    assert _without_prefix(members, "CFG_") == {k: i for i, k in enumerate(abi.CONFIG_KEYS)}


def test_strategy_codes_match_net_h():
    members = _without_prefix(parse_enum(KERNELS / "cpu" / "net.h", "Strategy"), "STRAT_")
    assert members == {s.value: s.code for s in abi.Strategy} == dict(abi.STRATEGY_CODES)


@pytest.mark.parametrize("path,enum,prefix", [(KERNELS / "cpu" / "net.h", "Opcode", "OP_")]
                         + [(p, "Opcode", "") for p in CUDA_SOURCES])
def test_opcodes_match(path, enum, prefix):
    assert _without_prefix(parse_enum(path, enum), prefix) == {op.name.lower(): int(op) for op in abi.Opcode}


@pytest.mark.parametrize("path,enum,prefix,count", [(KERNELS / "cpu" / "activation.h", "ActCode", "ACT_", "ACT_COUNT")]
                         + [(p, "Act", "", None) for p in CUDA_SOURCES])
def test_activation_codes_match(path, enum, prefix, count):
    members = parse_enum(path, enum)
    if count is not None:
        assert members[count] == len(abi.ActCode)
    assert _without_prefix(members, prefix, count) == {a.kind: int(a) for a in abi.ActCode}


def test_every_activation_has_a_case_in_the_cpp_math():
    header = KERNELS / "cpu" / "activation.h"
    names = {"ACT_" + a.name for a in abi.ActCode}
    assert _switch_cases(header, "act_scalar") == names
    assert _switch_cases(header, "act_grad_scalar") == names
    for path in CUDA_SOURCES:  # identity is the default branch there
        assert _switch_cases(path, "activate") == {a.name for a in abi.ActCode if a != abi.ActCode.IDENTITY}


def test_simulator_events_match_iomodel():
    members = parse_enum(KERNELS / "sim" / "simulator.cpp", "Op")
    assert {k.lower(): v for k, v in members.items()} == {name: i for i, name in enumerate(iomodel.OPS)}


def test_python_modules_use_the_abi():
    from torch_iosparse import ops
    from torch_iosparse.backends.cuda import gpu, triton_kernels
    from torch_iosparse.compile import program
    from torch_iosparse.backends.cpu import strategy
    assert ops.NET_KEYS is abi.NET_KEYS and ops.CONFIG_KEYS is abi.CONFIG_KEYS and ops.STRATEGIES is abi.STRATEGY_CODES
    assert (program.LOAD, program.FMA, program.FINISH, program.STORE) == tuple(abi.Opcode)
    assert (triton_kernels.LOAD, triton_kernels.FMA, triton_kernels.FINISH, triton_kernels.STORE) == tuple(abi.Opcode)
    assert activations.KINDS is abi.ACTIVATION_KINDS
    assert gpu.NET_PROG_OPS == abi.NET_KEYS.index("prog_ops") and gpu.CFG_STRATEGY == abi.CONFIG_KEYS.index("strategy")
    assert strategy.NEVER == ops.NEVER == abi.NEVER
    # No module of the package spells out an order or a code table of its own.
    copies = [r'"in_ptr",\s*"in_src",\s*"act_code"', r'"n_slow",\s*"batch_tile",\s*"strategy"', r'"auto":\s*0',
              r'"identity",\s*"relu"', r"\b1:\s*\"program\""]
    for path in PACKAGE.rglob("*.py"):
        if path.name == "abi.py":
            continue
        text = path.read_text()
        for pattern in copies:
            assert not re.search(pattern, text), f"{path.relative_to(PACKAGE)} defines its own copy of an ABI table ({pattern})"


def test_enum_members_are_documented_and_codes_unique():
    for enum in (abi.Opcode, abi.Strategy, abi.ActCode):
        for member in enum:
            assert member.__doc__ and member.__doc__ != enum.__doc__, f"{member!r} has no docstring of its own"
    assert len({s.code for s in abi.Strategy}) == len(abi.Strategy)
    assert [a.kind for a in abi.ActCode] == list(abi.ACTIVATION_KINDS)
    assert abi.Strategy("panel") is abi.Strategy.PANEL and abi.Strategy.from_code(5) is abi.Strategy.BLOCK
    assert f"{abi.Strategy.LEVEL}" == "level" and abi.STRATEGY_CODES[abi.Strategy.DENSE] == 3
    with pytest.raises(ValueError, match="unknown strategy code 9"):
        abi.Strategy.from_code(9)
    assert set(abi.PANEL_KEYS) | set(abi.BLOCK_KEYS) <= set(abi.NET_KEYS)
    assert all(abi.NetIndex[k.upper()] == i for i, k in enumerate(abi.NET_KEYS))


# ---------------------------------------------------------------------------------------------- activation math
def _activation(kind: str) -> activations.Activation:
    return activations.Activation("hardtanh", -0.4, 0.7) if kind == "hardtanh" else activations.Activation(kind)


@pytest.mark.parametrize("kind", abi.ACTIVATION_KINDS)
def test_forward_is_the_torch_module(kind):
    act = _activation(kind)
    z = torch.randn(257, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    z[:3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    expected = act.to_module()(z)
    torch.testing.assert_close(activations.forward(act.code, z, act.lo, act.hi), expected, equal_nan=True)
    torch.testing.assert_close(act.apply(z), expected, equal_nan=True)


@pytest.mark.parametrize("kind", abi.ACTIVATION_KINDS)
def test_gradient_is_the_derivative_of_forward(kind):
    act = _activation(kind)
    z = torch.randn(257, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    z = z[(z - act.lo).abs().gt(1e-3) & (z - act.hi).abs().gt(1e-3) & z.abs().gt(1e-3)]  # away from the kinks
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(activations.forward(act.code, zz, act.lo, act.hi).sum(), zz)
    torch.testing.assert_close(activations.gradient(act.code, z, act.lo, act.hi), auto)
    # The conventions at the kinks are PyTorch's: relu'(0) = 0, hardtanh' = 0 at its bounds.
    kinks = torch.tensor([0.0, act.lo if math.isfinite(act.lo) else 0.0, act.hi if math.isfinite(act.hi) else 0.0],
                         dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(act.to_module()(kinks).sum(), kinks)
    torch.testing.assert_close(activations.gradient(act.code, kinks.detach(), act.lo, act.hi), auto)


def test_unknown_activation_code_is_an_error():
    with pytest.raises(ValueError, match="unknown activation code 7"):
        activations.forward(7, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown activation code -1"):
        activations.gradient(-1, torch.zeros(2))


# ---------------------------------------------------------------------------------------------- environment
_NAME = re.compile(r"(?<![A-Za-z0-9_])(?:TORCH_)?IOSPARSE_[A-Z0-9_]+(?![A-Za-z0-9_{])")


def _c_macros() -> set:
    names = set()
    for path in list(KERNELS.rglob("*")) + [ROOT / "setup.py"]:
        if path.is_file() and path.suffix in (".h", ".cpp", ".cu", ".py"):
            text = path.read_text(errors="replace")
            names |= set(re.findall(r"#\s*define\s+(IOSPARSE_\w+)", text))
            names |= set(re.findall(r"-D(IOSPARSE_\w+)", text))
    return names


def _files():
    yield from PACKAGE.rglob("*.py")
    yield from (ROOT / "tests").rglob("*.py")
    yield from (ROOT / "benchmarks").glob("*.py")
    yield from (ROOT / "benchmarks").glob("*.sh")
    yield from (ROOT / "notebooks").glob("*.ipynb")
    yield from (ROOT / "scripts").glob("*")
    yield from (ROOT / "docs").glob("*.md")
    yield from (p for p in (ROOT / "setup.py", ROOT / "README.md", ROOT / "Makefile") if p.exists())
    yield from (p for p in KERNELS.rglob("*") if p.suffix in (".h", ".cpp", ".cu"))


def test_every_environment_variable_is_documented():
    macros = _c_macros()
    undocumented = {}
    for path in _files():
        if not path.is_file():
            continue
        for name in set(_NAME.findall(path.read_text(errors="replace"))) - macros:
            if name not in env.ALL_NAMES:
                undocumented.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undocumented, f"read or mentioned but not documented in torch_iosparse/env.py: {undocumented}"
    doc = env.__doc__
    for var in env.VARIABLES.values():
        for name in (var.name, *var.aliases):
            assert f"``{name}``" in doc, f"{name} is missing from the table in env.py's docstring"


def test_every_documented_variable_is_read():
    cpp = "".join(p.read_text() for p in KERNELS.rglob("*") if p.suffix in (".h", ".cpp", ".cu"))
    cpp_reads = set(re.findall(r'(?:getenv|env_int)\(\s*"(IOSPARSE_\w+)"', cpp))
    python_src = "".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    # names passed to env.get / env.positive_int, f-string fields as wildcards
    python_reads = [re.compile(re.sub(r"\\\{[^}]*\\\}", "[A-Z0-9]+", re.escape(s)))
                    for s in re.findall(r'(?:\bget|positive_int)\(f?"(IOSPARSE_[^"]+)"', python_src)]
    where = {"tests": ROOT / "tests", "notebooks": ROOT / "notebooks"}
    for var in env.VARIABLES.values():
        for reader in var.readers:
            if reader == "c++":
                assert var.name in cpp_reads, f"{var.name}: documented as read by the C++ kernels, but no getenv"
            elif reader == "python":
                assert any(p.fullmatch(var.name) for p in python_reads), f"{var.name}: no env.get in the package"
            elif reader == "build":
                assert var.name in (ROOT / "setup.py").read_text()
            else:
                texts = "".join(p.read_text(errors="replace") for p in where[reader].rglob("*") if p.is_file()
                                and p.suffix in (".py", ".ipynb"))
                assert var.name in texts, f"{var.name}: documented as read by {reader}, found nowhere there"


def test_unknown_variable_name_is_refused():
    with pytest.raises(KeyError, match="not a documented"):
        env.get("IOSPARSE_" + "NO_SUCH_THING")  # (spelled in two parts: the grep above must not find it)


def test_cache_folder_alias(monkeypatch, tmp_path):
    monkeypatch.delenv("IOSPARSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCH_IOSPARSE_CACHE", str(tmp_path / "old"))
    assert cache.cache_dir() == str(tmp_path / "old")
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", str(tmp_path / "new"))  # the IOSPARSE_ name wins
    assert cache.cache_dir() == str(tmp_path / "new")
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", "off")
    assert cache.cache_dir() is None


def test_switches_and_numbers(monkeypatch):
    monkeypatch.setenv("IOSPARSE_TUNE", " Off ")
    assert not env.tune_enabled()
    monkeypatch.setenv("IOSPARSE_TUNE", "1")
    assert env.tune_enabled()
    monkeypatch.setenv("IOSPARSE_GPU_STRATEGY", "LEVEL")
    assert env.gpu_strategy() == "level"
    monkeypatch.setenv("IOSPARSE_GPU_STRATEGY", "fast")
    with pytest.raises(ValueError, match="IOSPARSE_GPU_STRATEGY"):
        env.gpu_strategy()
    monkeypatch.setenv("IOSPARSE_GPU_BT", "16")
    assert env.positive_int("IOSPARSE_GPU_BT") == 16
    for bad in ("0", "-4", "sixteen"):
        monkeypatch.setenv("IOSPARSE_GPU_BT", bad)
        with pytest.raises(ValueError, match="IOSPARSE_GPU_BT must be a positive integer"):
            env.positive_int("IOSPARSE_GPU_BT")
