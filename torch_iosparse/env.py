"""Environment variables: the one module through which the Python side reads them, and the list of every
variable the project reads (Python, the C++ kernels, the build, the tests and the notebooks).

One prefix, ``IOSPARSE_``. ``TORCH_IOSPARSE_CACHE`` is read as an alias of ``IOSPARSE_CACHE_DIR`` (users
set it in their shells and job scripts); the ``IOSPARSE_`` name wins when both are set. Every Python read goes through :func:`get` (or a helper below it), which refuses names that are not
in :data:`VARIABLES`, so a new variable cannot be read without being documented here; tests/test_abi.py
checks that every ``IOSPARSE_`` name in the package, the kernels, the build, the tests and the notebooks is
listed here, and that every listed one is read somewhere. The C++ kernels read theirs with ``std::getenv``
once per process (the first call that needs it); the Python ones are read at the moment they are needed,
so a test may change them with ``monkeypatch.setenv``.

=============================  ==========  ======================  ==================================================
variable                       read by     default                 effect
=============================  ==========  ======================  ==================================================
``IOSPARSE_CACHE_DIR``         Python      ~/.cache/torch_iosparse  folder of the plan cache (planning/cache.py), the
(alias ``TORCH_IOSPARSE_CACHE``)                                   tuning measurements and machine profile
                                                                   (backends/cpu/) and the on-demand CUDA C++ build
                                                                   (gpu.build_cuda_cxx); ``""``, ``0``, ``off``,
                                                                   ``none`` or ``false`` disables the plan and tuning
                                                                   caches (the CUDA build then goes to the temporary
                                                                   folder)
``IOSPARSE_TUNE``              Python      1                       ``0``, ``off``, ``false``, ``no``, ``none``: prepare() does
                                                                   not measure strategies per batch-size bucket; the
                                                                   cost model alone decides (tuning.enabled)
``IOSPARSE_ISA``               C++,        (detected)              ``generic`` or ``avx2``: the CPU kernels use that
                               Python                              variant even where a wider one is supported (tests
                                                                   of the fallbacks, kernels/cpu/variants.cpp); part
                                                                   of the machine key of tuning entries and profiles
``IOSPARSE_L1_BYTES``,         Python      (detected)              cache sizes hardware.detect() reports instead of
``IOSPARSE_L2_BYTES``,                                             the detected ones (``32K``, ``1M``, ``1048576``):
``IOSPARSE_L3_BYTES``                                              they size BT, M, the panel tile and the blocks
``IOSPARSE_WORKERS``           C++         omp                     ``pool``: the CPU kernels run their chunks on the
                                                                   private chunk pool instead of torch's OpenMP
                                                                   threads (kernels/cpu/runtime.cpp; a forked child
                                                                   always uses the pool)
``IOSPARSE_POISON``            C++         0                       ``1``: every output and scratch buffer is filled
                                                                   with NaN before a CPU kernel runs, so a value read
                                                                   before it is written shows up (tests)
``IOSPARSE_PANEL_WEIGHT_CACHE``  C++       1                       ``0``: the panel and block paths gather their
                                                                   path-ordered weights on every call instead of
                                                                   caching them (kernels/cpu/ordered_weights.cpp)
``IOSPARSE_LEVEL_CHUNK``       C++         32768                   multiply-adds per chunk of the level path
``IOSPARSE_LEVEL_SERIAL``      C++         65536                   least multiply-adds per forward for which the
                                                                   level path wakes helper threads
``IOSPARSE_BACKWARD_TILE``     C++         4                       ``1``, ``2`` or ``4``: the widest column tile (in
                                                                   64-byte vectors) of the block path's backward
                                                                   (kernels/cpu/block_backward.cpp)
``IOSPARSE_GPU_STRATEGY``      Python      (level)                 ``program`` or ``level``: what the ``auto``
                                                                   strategy runs on CUDA (gpu.choose_gpu_path)
``IOSPARSE_GPU_BT``,           Python      (from the device)       batch tile and slot count of the Triton plan
``IOSPARSE_GPU_M``                                                 executor (triton_kernels.choose_tiling)
``IOSPARSE_SANITIZE``          build       0                       ``1``: setup.py builds with AddressSanitizer and
                                                                   UBSan (scripts/asan_test.sh)
``IOSPARSE_SANITIZED``         tests       0                       ``1``: set by scripts/asan_test.sh; tests that
                                                                   cannot run under the sanitizer skip
``IOSPARSE_FUZZ_CASES``,       tests       1000, 2026              number of cases and seed of tests/ops/test_fuzz.py
``IOSPARSE_FUZZ_SEED``
``IOSPARSE_NB_FAST``           notebooks   0                       ``1``: the notebooks run at small sizes (set by
                                                                   tests/notebooks/test_module_notebooks.py)
=============================  ==========  ======================  ==================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, older names still read (``aliases``), who reads it (``python``,
    ``c++``, ``build``, ``tests``, ``notebooks``), its default and what it does."""

    name: str
    readers: Tuple[str, ...]
    default: str
    effect: str
    aliases: Tuple[str, ...] = ()


_OFF = ("0", "off", "false", "no", "none")

VARIABLES: Dict[str, Variable] = {v.name: v for v in (
    Variable("IOSPARSE_CACHE_DIR", ("python",), "~/.cache/torch_iosparse",
             "folder of the plan cache, tuning measurements, machine profile and CUDA C++ build; '', 0, off, "
             "none or false disables the plan and tuning caches", aliases=("TORCH_IOSPARSE_CACHE",)),
    Variable("IOSPARSE_TUNE", ("python",), "1", "0/off/false/no/none: no per-bucket strategy measurements"),
    Variable("IOSPARSE_ISA", ("c++", "python"), "", "generic or avx2: force that CPU kernel variant"),
    Variable("IOSPARSE_L1_BYTES", ("python",), "", "L1d size hardware.detect() reports"),
    Variable("IOSPARSE_L2_BYTES", ("python",), "", "per-core L2 size hardware.detect() reports"),
    Variable("IOSPARSE_L3_BYTES", ("python",), "", "L3 size hardware.detect() reports"),
    Variable("IOSPARSE_WORKERS", ("c++",), "omp", "pool: CPU kernels use the private chunk pool"),
    Variable("IOSPARSE_POISON", ("c++",), "0", "1: fill outputs and scratch with NaN before a CPU kernel"),
    Variable("IOSPARSE_PANEL_WEIGHT_CACHE", ("c++",), "1", "0: no cache of path-ordered weights"),
    Variable("IOSPARSE_LEVEL_CHUNK", ("c++",), "32768", "multiply-adds per chunk of the level path"),
    Variable("IOSPARSE_LEVEL_SERIAL", ("c++",), "65536", "least multiply-adds for which the level path "
                                                          "wakes helper threads"),
    Variable("IOSPARSE_BACKWARD_TILE", ("c++",), "4", "1, 2 or 4: widest tile of the block path's backward"),
    Variable("IOSPARSE_GPU_STRATEGY", ("python",), "", "program or level: what auto runs on CUDA"),
    Variable("IOSPARSE_GPU_BT", ("python",), "", "batch tile of the Triton plan executor"),
    Variable("IOSPARSE_GPU_M", ("python",), "", "slots of the Triton plan executor"),
    Variable("IOSPARSE_SANITIZE", ("build",), "0", "1: setup.py builds with AddressSanitizer and UBSan"),
    Variable("IOSPARSE_SANITIZED", ("tests",), "0", "1: running against the sanitizer build"),
    Variable("IOSPARSE_FUZZ_CASES", ("tests",), "1000", "cases of tests/ops/test_fuzz.py"),
    Variable("IOSPARSE_FUZZ_SEED", ("tests",), "2026", "seed of tests/ops/test_fuzz.py"),
    Variable("IOSPARSE_NB_FAST", ("notebooks",), "0", "1: the notebooks run at small sizes"),
)}

#: Every name the project reads, aliases included.
ALL_NAMES = frozenset(n for v in VARIABLES.values() for n in (v.name, *v.aliases))


def get(name: str) -> Optional[str]:
    """The value of variable ``name`` (or of its first alias that is set), or None when none is set.
    KeyError for a name that is not documented in :data:`VARIABLES`."""
    try:
        var = VARIABLES[name]
    except KeyError:
        raise KeyError(f"{name} is not a documented torch_iosparse environment variable "
                       "(add it to torch_iosparse.env.VARIABLES)") from None
    for n in (var.name, *var.aliases):
        value = os.environ.get(n)
        if value is not None:
            return value
    return None


def cache_dir_setting() -> Optional[str]:
    """The raw cache-folder setting (``IOSPARSE_CACHE_DIR`` or its alias ``TORCH_IOSPARSE_CACHE``), None when
    unset; torch_iosparse.cache.cache_dir interprets it."""
    return get("IOSPARSE_CACHE_DIR")


def is_off(value: Optional[str]) -> bool:
    """Whether a switch's value means off (``0``, ``off``, ``false``, ``no``, ``none``; case and spaces ignored)."""
    return value is not None and value.strip().lower() in _OFF


def tune_enabled() -> bool:
    """False when ``IOSPARSE_TUNE`` switches per-bucket tuning off."""
    return not is_off(get("IOSPARSE_TUNE"))


def isa_override() -> str:
    """``IOSPARSE_ISA`` as set (the C++ kernels interpret it), ``""`` when unset."""
    return get("IOSPARSE_ISA") or ""


def cache_size_override(level: int) -> Optional[str]:
    """``IOSPARSE_L{level}_BYTES`` (a size such as ``32K``), None when unset or empty."""
    return get(f"IOSPARSE_L{int(level)}_BYTES") or None


def gpu_strategy() -> Optional[str]:
    """``IOSPARSE_GPU_STRATEGY`` as ``"program"`` or ``"level"``, None when unset or empty; ValueError for
    anything else."""
    value = (get("IOSPARSE_GPU_STRATEGY") or "").strip().lower()
    if not value:
        return None
    if value not in ("program", "level"):
        raise ValueError(f"IOSPARSE_GPU_STRATEGY must be 'program' or 'level', got {value!r}")
    return value


def positive_int(name: str) -> Optional[int]:
    """Variable ``name`` as an int >= 1 (``IOSPARSE_GPU_BT``, ``IOSPARSE_GPU_M``), None when unset or empty;
    ValueError naming the variable otherwise."""
    value = (get(name) or "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n
