"""What the CPU offers the kernel: cache sizes, vector width, cores; and the batch tile / fast-memory
size derived from them (docs/cpu-kernel.md, "Choosing BT and M").

Everything is detected once (``/sys/devices/system/cpu/cpu0/cache`` first, ``os.sysconf`` second,
conservative defaults last) and can be overridden with the environment variables
``IOSPARSE_L1_BYTES``, ``IOSPARSE_L2_BYTES``, ``IOSPARSE_L3_BYTES`` (torch_iosparse.env) or by the arguments of
:func:`batch_tile` / :func:`fast_memory_slots` (and ``ops.prepare(memory=, batch_tile=)``).
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ... import env

_SYS_CACHE = "/sys/devices/system/cpu/cpu0/cache"

# The kernel keeps ACCUMULATOR_VECTORS vector registers of partial sums per neuron (the rest of the
# register file holds the operand being multiplied and the broadcast weight; 4 keeps enough FMAs in
# flight to cover the FMA latency on current x86 cores).
ACCUMULATOR_VECTORS = 4
# Share of the per-core L2 given to the M slots (the rest holds the streamed ops and weights, the
# activation being written and the input tile).
SLOT_CACHE_FRACTION = 0.5
# The block path (kernels/cpu/block.cpp) reads a source block from every row of a chunk with edges into it:
# the block's values for the widest tile (four 64-byte vectors per source) should stay in this share of the
# per-core L2. Blocks hold at most 256 sources (the layout's one-byte offsets).
BLOCK_TILE_BYTES = 4 * 64
BLOCK_CACHE_FRACTION = 0.5
BLOCK_MAX_SOURCES = 256
BLOCK_MIN_SOURCES = 16


@dataclass(frozen=True)
class CpuInfo:
    l1d_bytes: int
    l2_bytes: int        # per core
    l3_bytes: int        # whole socket (shared)
    cores: int           # threads torch will use
    vector_bytes: int    # 64 (AVX-512), 32 (AVX2) or 16 (SSE2)
    isa: str             # "avx512", "avx2" or "generic"
    source: str          # where the cache sizes came from

    def __str__(self) -> str:
        return (f"{self.cores} cores, {self.isa}, L1d {self.l1d_bytes >> 10} KiB, L2 {self.l2_bytes >> 10} KiB/core, "
                f"L3 {self.l3_bytes >> 20} MiB ({self.source})")


def _parse_size(text: str) -> int:
    m = re.match(r"^\s*(\d+)\s*([KMG]?)", text.strip(), re.I)
    if not m:
        raise ValueError(text)
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(m.group(1)) * mult


def _override_size(level: int, text: Optional[str], detected: int) -> int:
    """``IOSPARSE_L{level}_BYTES`` parsed when set, else the detected size."""
    if not text:
        return detected
    try:
        return _parse_size(text)
    except ValueError:
        raise ValueError(f"IOSPARSE_L{level}_BYTES must be a size such as 32K, 2M or 1048576, got {text!r}") from None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _from_sys():
    sizes = {}
    if not os.path.isdir(_SYS_CACHE):
        return sizes
    for entry in sorted(os.listdir(_SYS_CACHE)):
        if not entry.startswith("index"):
            continue
        d = os.path.join(_SYS_CACHE, entry)
        try:
            level = int(_read(os.path.join(d, "level")))
            kind = _read(os.path.join(d, "type")).strip()
            size = _parse_size(_read(os.path.join(d, "size")))
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        sizes[level] = size
    return sizes


def _from_sysconf():
    sizes = {}
    for level, name in ((1, "SC_LEVEL1_DCACHE_SIZE"), (2, "SC_LEVEL2_CACHE_SIZE"), (3, "SC_LEVEL3_CACHE_SIZE")):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if v and v > 0:
            sizes[level] = int(v)
    return sizes


def _isa() -> str:
    try:
        flags = _read("/proc/cpuinfo")
    except OSError:
        return "generic"
    if re.search(r"\bavx512f\b", flags) and re.search(r"\bavx512vl\b", flags):
        return "avx512"
    if re.search(r"\bavx2\b", flags) and re.search(r"\bfma\b", flags):
        return "avx2"
    return "generic"


def cpu_model() -> str:
    """The CPU's model string (/proc/cpuinfo "model name", or its Arm counterparts; else the platform's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=None)
def detect() -> CpuInfo:
    """The machine's caches, vector ISA and core count (cached)."""
    sizes, source = _from_sys(), "sysfs"
    if 2 not in sizes:
        sizes, source = _from_sysconf(), "sysconf"
    if 2 not in sizes:
        source = "defaults"
    l1 = sizes.get(1, 32 << 10)
    l2 = sizes.get(2, 1 << 20)
    l3 = sizes.get(3, 8 << 20)
    override = {level: env.cache_size_override(level) for level in (1, 2, 3)}
    if any(override.values()):
        source += "+env"
    l1, l2, l3 = (_override_size(level, override[level], size) for level, size in ((1, l1), (2, l2), (3, l3)))
    isa = _isa()
    vec = {"avx512": 64, "avx2": 32, "generic": 16}[isa]
    return CpuInfo(l1, l2, l3, torch.get_num_threads(), vec, isa, source)


def batch_tile(dtype: torch.dtype = torch.float32, info: Optional[CpuInfo] = None) -> int:
    """BT, the batch columns one kernel pass carries: ACCUMULATOR_VECTORS vector registers of partial
    sums. AVX-512: 4 x 64 B = 64 float32 / 32 float64 columns."""
    info = info or detect()
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, ACCUMULATOR_VECTORS * info.vector_bytes // itemsize)


def fast_memory_slots(batch_tile_: int, dtype: torch.dtype = torch.float32, info: Optional[CpuInfo] = None,
                      fraction: float = SLOT_CACHE_FRACTION) -> int:
    """M = floor(fraction * L2_per_core / (BT * itemsize)), at least 2: the slots of BT values that fit
    in this core's share of the cache (docs/cpu-kernel.md, "The program path: the cost model on real hardware")."""
    info = info or detect()
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(2, int(fraction * info.l2_bytes) // (int(batch_tile_) * itemsize))


def block_sources(info: Optional[CpuInfo] = None) -> int:
    """Consecutive source neurons per block of the block path: as many as fit, at the widest tile, in
    BLOCK_CACHE_FRACTION of the per-core L2, between BLOCK_MIN_SOURCES and BLOCK_MAX_SOURCES (L2 of
    512 KiB or more: 256; an emulated 32 KiB L2, ``IOSPARSE_L2_BYTES=32K``: 64)."""
    info = info or detect()
    fit = int(BLOCK_CACHE_FRACTION * info.l2_bytes) // BLOCK_TILE_BYTES
    return max(BLOCK_MIN_SOURCES, min(BLOCK_MAX_SOURCES, fit))


def panel_tile(dtype: torch.dtype = torch.float32, max_level_width: int = 0, info: Optional[CpuInfo] = None) -> int:
    """Batch columns per tile of the panel path (kernels/cpu/panel.cpp): two 64-byte vectors per
    value, so 8 rows x 2 accumulator vectors fill 16 registers and every source load feeds 16 FMAs.
    Measured on RadiX-Net layers of width 4096, 16384 and 65536 (B=256, 1 thread): 32 float columns
    1.05-1.2x faster than 16 at every width once sources are prefetched (``max_level_width`` is kept
    for callers and future cache-dependent choices)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * max(1, 64 // itemsize)
