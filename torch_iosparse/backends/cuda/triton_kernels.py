"""Triton executor of a compiled program (docs/program-format.md, docs/gpu.md).

Kernels and launchers only; the registration as the CUDA kernel of the ``iosparse`` op lives in
:mod:`torch_iosparse.backends.cuda.gpu`. Everything here also runs on CPU tensors under ``TRITON_INTERPRET=1`` (the
tests do that), so the kernel is checked against :meth:`SparseDAG.forward_reference` without a GPU.

Execution model (docs/gpu.md):
    * one Triton program per batch tile of ``BT`` columns;
    * the partial sum ``acc[BT]`` of the neuron being computed lives in registers;
    * the ``M`` slots of the fast memory are a per-program scratch ``[M, BT]`` float32 in global memory
      (Triton cannot index shared memory dynamically); it is small and re-touched constantly, so it
      stays in L2 (sizing in :func:`choose_tiling`);
    * the slow memory is a float32 buffer ``[n_slow, B]`` in HBM; input rows are read straight from
      ``x`` and output rows are also written straight into ``y`` (in ``x.dtype``).

The program is re-encoded once (:func:`encode`) into *steps* the kernel can vectorise, without
changing its I/O: a ``LOAD`` immediately followed by the ``FMA`` that reads the loaded slot becomes
one fused entry (the value is used from the register it was loaded into and written to its slot), and
runs of FMA entries are cut into chunks of up to ``K`` entries that are gathered as one ``[K, BT]``
tile. A chunk never touches one slot twice, so gathering all its operands before writing its loads
is exactly the sequential semantics. A ``FINISH`` followed by the ``STORE`` of the same slot is fused
too (the stored value comes from the register), and a FINISH right after the last chunk of its
position rides on that chunk's step. Every step ends with a barrier, because another thread of the
program may read (or overwrite) in the next step what this one wrote (or read).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ... import env
from ...abi import ActCode, Opcode

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None
    tl = None

# Opcodes of the compiled program (torch_iosparse.abi.Opcode), as plain ints for numpy.
LOAD, FMA, FINISH, STORE = (int(op) for op in (Opcode.LOAD, Opcode.FMA, Opcode.FINISH, Opcode.STORE))
# Step kinds of the re-encoded program (this module only).
STEP_CHUNK, STEP_LOAD, STEP_STORE, STEP_FINISH = 0, 1, 2, 3

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_CHUNK = 16
# Source-sharing blocks of the level kernel: neurons per block, distinct sources per gathered chunk, and
# the least reuse (edges per distinct source) for which a segment runs the block kernel.
DEFAULT_BLOCK_ROWS = 32
DEFAULT_BLOCK_CHUNK = 16
BLOCK_MIN_REUSE = 2.0


class ProgramError(ValueError):
    """A compiled program that the kernel cannot execute (malformed ops, slots or rows out of range)."""


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class KernelProgram:
    """A program re-encoded for the Triton kernel (see the module docstring). Tensors live on ``device``.

    steps  int32 [S, 8]  rows (kind, a, b, c, fin_slot, fin_row, fin_col, 0):
        CHUNK  (entry_start, count, -)         entries ent_slot/ent_edge/ent_row[entry_start:+count]
        LOAD   (slow_row, slot, -)             a LOAD whose slot is not read right away
        STORE  (slot, slow_row, out_col)       out_col >= 0 also writes y[:, out_col]
        FINISH (-, -, -)                       a FINISH that could not ride on a chunk
      fin_slot >= 0 (any kind, in practice CHUNK or FINISH): after the step's own work, FINISH into
      fin_slot; fin_row >= 0 fuses the following STORE of that slot (and fin_col >= 0 writes y).
    step_ptr int32 [n_computed + 1]; neuron int32; act_code int32; act_lo/act_hi float32 [n_computed]
    ent_slot, ent_row int32 [E], ent_edge int64 [E]   ent_row >= 0: fused LOAD of that row into ent_slot
    edges_in_order: ent_edge == arange(E) (e.g. layer order): the weights are already in entry order.
        Otherwise the launcher gathers ``weight[ent_edge]`` once per call, so the kernel reads the
        weights of a chunk contiguously instead of through a dependent index load.
    """

    steps: torch.Tensor
    step_ptr: torch.Tensor
    neuron: torch.Tensor
    act_code: torch.Tensor
    act_lo: torch.Tensor
    act_hi: torch.Tensor
    ent_slot: torch.Tensor
    ent_edge: torch.Tensor
    ent_row: torch.Tensor
    n_inputs: int
    n_outputs: int
    n_computed: int
    n_slow: int
    memory: int
    n_edges: int
    n_neurons: int
    chunk: int
    edges_in_order: bool = False

    def to(self, device) -> "KernelProgram":
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return KernelProgram(**kw)

    @property
    def device(self) -> torch.device:
        return self.steps.device


def _np(a, dtype=None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return a if dtype is None else a.astype(dtype, copy=False)


def _field(program, name):
    if isinstance(program, dict):
        return program[name]
    return getattr(program, name)


def encode(program, *, n_edges: int, n_neurons: int, chunk: int = DEFAULT_CHUNK,
           device="cpu") -> KernelProgram:
    """Re-encode a compiled program (a ``program.Program`` or a dict with its fields) for the kernel.

    Vectorised numpy except for FMA chunks in which a slot repeats (only at very small M), which are
    re-split by a short Python loop. Validates every index, so the kernel never reads out of bounds.
    """
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 1, got {chunk}")
    n_inputs = int(_field(program, "n_inputs"))
    n_outputs = int(_field(program, "n_outputs"))
    n_computed = int(_field(program, "n_computed"))
    n_slow = int(_field(program, "n_slow"))
    M = int(_field(program, "memory"))
    neuron = _np(_field(program, "neuron"), np.int64)
    act_code = _np(_field(program, "act_code"), np.int64)
    act_lo = _np(_field(program, "act_lo"), np.float32)
    act_hi = _np(_field(program, "act_hi"), np.float32)
    op_ptr = _np(_field(program, "op_ptr"), np.int64)
    ops = _np(_field(program, "ops"), np.int64).reshape(-1, 3)
    output_rows = _np(_field(program, "output_rows"), np.int64)

    # ---- validation: the kernel trusts these indices
    if M < 1:
        raise ProgramError(f"program memory must be >= 1 slot, got {M}")
    if neuron.shape != (n_computed,) or act_code.shape != (n_computed,):
        raise ProgramError("neuron/act_code must have one entry per computed neuron")
    if op_ptr.shape != (n_computed + 1,) or op_ptr[0] != 0 or op_ptr[-1] != len(ops) or (np.diff(op_ptr) < 0).any():
        raise ProgramError("op_ptr must be non-decreasing from 0 to len(ops) with n_computed + 1 entries")
    if neuron.size and (neuron.min() < 0 or neuron.max() >= n_neurons):
        raise ProgramError(f"program neuron ids outside [0, {n_neurons})")
    if output_rows.shape != (n_outputs,) or (output_rows.size and (output_rows.min() < n_inputs
                                                                   or output_rows.max() >= n_slow)):
        raise ProgramError("output_rows must name n_outputs stored (non-input) slow rows")
    code, a, b = ops[:, 0], ops[:, 1], ops[:, 2]
    if not np.isin(code, (LOAD, FMA, FINISH, STORE)).all():
        raise ProgramError(f"unknown opcode {int(code[~np.isin(code, (LOAD, FMA, FINISH, STORE))][0])}")
    slot_of = np.where(code == LOAD, b, a)
    if ops.size and (slot_of.min() < 0 or slot_of.max() >= M):
        raise ProgramError(f"a slot index lies outside [0, {M})")
    rows = np.concatenate([a[code == LOAD], b[code == STORE]])
    if rows.size and (rows.min() < 0 or rows.max() >= n_slow):
        raise ProgramError(f"a slow row lies outside [0, {n_slow})")
    if (b[code == STORE] < n_inputs).any():
        raise ProgramError("a STORE overwrites an input row")
    edges = b[code == FMA]
    if edges.size and (edges.min() < 0 or edges.max() >= n_edges):
        raise ProgramError(f"an FMA edge lies outside [0, {n_edges})")
    pos = np.repeat(np.arange(n_computed), np.diff(op_ptr))
    fin_count = np.bincount(pos[code == FINISH], minlength=n_computed)
    if (fin_count != 1).any():
        raise ProgramError(f"position {int(np.flatnonzero(fin_count != 1)[0])} must have exactly one FINISH")
    if max(n_slow, n_edges, len(ops)) >= 2**31 - 1:
        raise ProgramError("programs with 2^31 or more rows/edges/ops are not supported by the Triton kernel")

    K = len(ops)
    out_col_of_row = np.full(n_slow, -1, dtype=np.int64)
    out_col_of_row[output_rows] = np.arange(n_outputs)

    # ---- fuse LOAD + the FMA right after it that reads the loaded slot (same position)
    nxt_same = np.zeros(K, dtype=bool)
    if K > 1:
        nxt_same[:-1] = pos[1:] == pos[:-1]
    fused_load = np.zeros(K, dtype=bool)
    if K > 1:
        fused_load[:-1] = (code[:-1] == LOAD) & (code[1:] == FMA) & (a[1:] == b[:-1]) & nxt_same[:-1]
    fma_row = np.full(K, -1, dtype=np.int64)
    fma_row[1:][fused_load[:-1]] = a[:-1][fused_load[:-1]]
    # ---- fuse FINISH + the STORE right after it of the same slot (same position)
    fused_store = np.zeros(K, dtype=bool)  # marks the STORE op that is absorbed
    if K > 1:
        fused_store[1:] = (code[1:] == STORE) & (code[:-1] == FINISH) & (a[1:] == a[:-1]) & nxt_same[:-1]

    keep = ~fused_load & ~fused_store      # ops that remain as items
    is_fma = code == FMA
    # Items: each kept op. FMA items are grouped into runs (consecutive FMA items in one position).
    k_idx = np.flatnonzero(keep)
    k_fma = is_fma[k_idx]
    k_pos = pos[k_idx]
    run_start = np.ones(k_idx.size, dtype=bool)
    if k_idx.size > 1:
        run_start[1:] = ~(k_fma[1:] & k_fma[:-1] & (k_pos[1:] == k_pos[:-1]))
    run_id = np.cumsum(run_start) - 1
    first_of_run = np.flatnonzero(run_start)
    idx_in_run = np.arange(k_idx.size) - first_of_run[run_id]
    # FMA entries in item order
    fma_items = np.flatnonzero(k_fma)
    e_op = k_idx[fma_items]
    ent_slot = a[e_op]
    ent_edge = b[e_op]
    ent_row = fma_row[e_op]
    # chunk boundaries: start of every run, every `chunk` entries, and wherever a slot repeats
    e_idx = idx_in_run[fma_items]
    new_chunk = (e_idx % chunk) == 0
    chunk_id = np.cumsum(new_chunk) - 1
    if ent_slot.size:
        key = chunk_id * M + ent_slot
        uniq, cnt = np.unique(key, return_counts=True)
        bad_chunks = np.unique(uniq[cnt > 1] // M)
        if bad_chunks.size:
            e_start = np.flatnonzero(new_chunk)
            for c in bad_chunks:  # rare (tiny M): re-split sequentially at the first repeated slot
                lo = e_start[c]
                hi = e_start[c + 1] if c + 1 < e_start.size else ent_slot.size
                seen = set()
                for j in range(lo, hi):
                    s = int(ent_slot[j])
                    if s in seen:
                        new_chunk[j] = True
                        seen = set()
                    seen.add(s)
    e_chunk_start = np.flatnonzero(new_chunk)
    e_chunk_count = np.diff(np.append(e_chunk_start, ent_slot.size))

    # ---- steps: one per non-FMA item plus one per chunk, in program order
    # step key: the op index of the first op of the step (fused loads sort by their FMA: same order)
    nf = ~k_fma
    nf_op = k_idx[nf]
    nf_code = code[nf_op]
    st_kind = np.where(nf_code == LOAD, STEP_LOAD, np.where(nf_code == STORE, STEP_STORE, STEP_FINISH))
    st_a = a[nf_op]  # LOAD: slow row; STORE and FINISH: slot
    st_b = np.where(nf_code == LOAD, b[nf_op], np.where(nf_code == STORE, b[nf_op], -1))
    st_c = np.where(nf_code == STORE, out_col_of_row[np.clip(b[nf_op], 0, n_slow - 1)], -1)
    fin = nf_code == FINISH
    fin_fused = np.zeros(nf_op.size, dtype=bool)
    nxt = nf_op + 1
    ok = nxt < K
    fin_fused[ok] = fin[ok] & fused_store[nxt[ok]]
    st_b[fin_fused] = b[nxt[fin_fused]]
    st_c[fin_fused] = out_col_of_row[b[nxt[fin_fused]]]
    ch_op = e_op[e_chunk_start] if e_chunk_start.size else np.zeros(0, dtype=np.int64)
    order_key = np.concatenate([nf_op, ch_op])
    kinds = np.concatenate([st_kind, np.full(ch_op.size, STEP_CHUNK)])
    sa = np.concatenate([st_a, e_chunk_start])
    sb = np.concatenate([st_b, e_chunk_count])
    sc = np.concatenate([st_c, np.full(ch_op.size, -1)])
    srt = np.argsort(order_key, kind="stable")
    kinds, sa, sb, sc = kinds[srt], sa[srt], sb[srt], sc[srt]
    step_pos = pos[order_key[srt]]
    # FINISH fields live in columns 4..6 (slot, store row, output column), so that a FINISH right after
    # the last chunk of its position rides on that chunk's step (one step, one barrier less).
    is_fin = kinds == STEP_FINISH
    fs, fr, fc = np.where(is_fin, sa, -1), np.where(is_fin, sb, -1), np.where(is_fin, sc, -1)
    sa, sb, sc = np.where(is_fin, -1, sa), np.where(is_fin, -1, sb), np.where(is_fin, -1, sc)
    merge = np.zeros(kinds.size, dtype=bool)  # marks the chunk step that absorbs the next FINISH
    if kinds.size > 1:
        merge[:-1] = (kinds[:-1] == STEP_CHUNK) & is_fin[1:] & (step_pos[:-1] == step_pos[1:])
    cand = np.flatnonzero(merge)
    if cand.size:  # never merge when the FINISH slot is one of the chunk's slots (not from the simulator)
        counts = sb[cand]
        chunk_of = np.repeat(np.arange(cand.size), counts)
        ent = np.repeat(sa[cand] - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        clash = np.unique(chunk_of[ent_slot[ent] == fs[cand + 1][chunk_of]])
        merge[cand[clash]] = False
        cand = np.flatnonzero(merge)
        fs[cand], fr[cand], fc[cand] = fs[cand + 1], fr[cand + 1], fc[cand + 1]
    keep_step = np.ones(kinds.size, dtype=bool)
    keep_step[cand + 1] = False
    steps = np.stack([kinds, sa, sb, sc, fs, fr, fc, np.zeros_like(kinds)], axis=1)[keep_step].astype(np.int32)
    step_pos = step_pos[keep_step]
    step_ptr = np.zeros(n_computed + 1, dtype=np.int64)
    step_ptr[1:] = np.cumsum(np.bincount(step_pos, minlength=n_computed))

    i32 = lambda v: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int32)).to(device)  # noqa: E731
    i64 = lambda v: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)).to(device)  # noqa: E731
    f32 = lambda v: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(device)  # noqa: E731
    return KernelProgram(
        steps=i32(steps.reshape(-1, 8)), step_ptr=i32(step_ptr), neuron=i32(neuron), act_code=i32(act_code),
        act_lo=f32(act_lo), act_hi=f32(act_hi), ent_slot=i32(ent_slot), ent_edge=i64(ent_edge),
        ent_row=i32(ent_row), n_inputs=n_inputs, n_outputs=n_outputs, n_computed=n_computed, n_slow=n_slow,
        memory=M, n_edges=int(n_edges), n_neurons=int(n_neurons), chunk=int(chunk),
        edges_in_order=bool(ent_edge.size == n_edges and np.array_equal(ent_edge, np.arange(n_edges))))


# ---------------------------------------------------------------------------------------------- tiling
@dataclass(frozen=True)
class Tiling:
    """Batch tile ``batch_tile`` (columns per program) and the fast-memory size ``memory`` (slots) the
    Triton kernel is sized for on one device, with the numbers they came from."""

    batch_tile: int
    memory: int
    chunk: int
    num_warps: int
    source: str


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def choose_tiling(device=None, batch: int = 1024, *, batch_tile: Optional[int] = None,
                  memory: Optional[int] = None, chunk: Optional[int] = None,
                  l2_fraction: float = 0.5, programs_per_sm: int = 4) -> Tiling:
    """Pick the batch tile BT and the number of slots M for ``device`` (docs/gpu.md).

    BT (CUDA): one program executes the whole plan sequentially for its BT columns, so a program is
    latency-bound and the kernel's speed comes from running many programs at once: BT is the smallest
    power of two that spreads the batch over all SMs, ``pow2_ceil(ceil(batch / SMs))``, capped at 64
    (a 256-byte fp32 slot row, coalesced). BT (CPU, the interpreter): the power of two >= ``batch``
    capped at 64 (fewest programs: the interpreter runs them one after another).

    M (CUDA): the slots of all resident programs must stay in L2, where ``resident`` is the number of
    programs the GPU runs at once (``min(tiles, SMs * programs_per_sm)``):
        M = floor(l2_fraction * L2_bytes / (resident * BT * 4))
    capped by the shared memory of a block (``smem_per_block / (BT * 4)``: what an on-chip CUDA kernel
    could hold) and at least 2. On CPU (the interpreter) M = 64.
    Environment overrides: ``IOSPARSE_GPU_BT``, ``IOSPARSE_GPU_M``; arguments override both.
    """
    if batch_tile is None:
        batch_tile = env.positive_int("IOSPARSE_GPU_BT")
    if memory is None:
        memory = env.positive_int("IOSPARSE_GPU_M")
    batch = max(1, int(batch))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    props = torch.cuda.get_device_properties(dev) if dev.type == "cuda" and torch.cuda.is_available() else None
    if batch_tile is None:
        spread = math.ceil(batch / int(props.multi_processor_count)) if props is not None else batch
        batch_tile = min(64, _pow2_at_least(spread))
    if batch_tile < 1 or batch_tile & (batch_tile - 1):
        raise ValueError(f"batch_tile must be a power of two, got {batch_tile}")
    chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
    num_warps = max(1, min(4, batch_tile * chunk // 256))  # ~8 elements of a [K, BT] tile per thread
    if props is not None:
        p = props
        l2 = int(getattr(p, "L2_cache_size", 0) or 40 * 2**20)
        smem = int(getattr(p, "shared_memory_per_block_optin", 0) or getattr(p, "shared_memory_per_block", 48 * 1024))
        sms = int(p.multi_processor_count)
        tiles = max(1, math.ceil(batch / batch_tile))
        resident = min(tiles, sms * programs_per_sm)
        m_l2 = int(l2_fraction * l2 // (resident * batch_tile * 4))
        m_smem = smem // (batch_tile * 4)
        m_auto = max(2, min(m_l2, m_smem))
        source = (f"{p.name}: L2 {l2 >> 20} MiB, {sms} SMs, smem/block {smem >> 10} KiB, "
                  f"{resident} resident programs")
    else:
        m_auto = 64
        source = "cpu default (Triton interpreter)"
    if memory is None:
        memory = m_auto
    elif memory < 2:
        raise ValueError(f"memory must be >= 2 slots, got {memory}")
    return Tiling(int(batch_tile), int(memory), chunk, num_warps, source)


# ---------------------------------------------------------------------------------------------- kernel
if triton is not None:
    # Activation codes (torch_iosparse.abi.ActCode) as compile-time constants of the kernels.
    _ACT_RELU = tl.constexpr(int(ActCode.RELU))
    _ACT_HARDTANH = tl.constexpr(int(ActCode.HARDTANH))
    _ACT_GELU = tl.constexpr(int(ActCode.GELU))
    _ACT_GELU_TANH = tl.constexpr(int(ActCode.GELU_TANH))
    _ACT_TANH = tl.constexpr(int(ActCode.TANH))
    _ACT_SIGMOID = tl.constexpr(int(ActCode.SIGMOID))

    @triton.jit
    def _tanh(x):
        z = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: never overflows
        t = (1.0 - z) / (1.0 + z)
        return tl.where(x >= 0, t, -t)

    @triton.jit
    def _activate(acc, code, lo, hi):
        # The Triton copy of torch_iosparse.graph.activations.forward (identity: unchanged).
        if code == _ACT_RELU:
            acc = tl.maximum(acc, 0.0)
        elif code == _ACT_HARDTANH:
            acc = tl.minimum(tl.maximum(acc, lo), hi)
        elif code == _ACT_GELU:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif code == _ACT_GELU_TANH:
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (1.0 + _tanh(inner))
        elif code == _ACT_TANH:
            acc = _tanh(acc)
        elif code == _ACT_SIGMOID:
            z = tl.exp(-tl.abs(acc))  # in (0, 1]: never overflows
            acc = tl.where(acc >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
        return acc

    # B and the sizes change per call/network: no recompilation for their divisibility by 16.
    @triton.jit(do_not_specialize=["B", "n_inputs", "n_computed"])
    def _iosparse_forward_kernel(
            x_ptr, y_ptr, w_ptr, b_ptr, slow_ptr, scratch_ptr,
            steps_ptr, step_ptr_ptr, neuron_ptr, act_code_ptr, act_lo_ptr, act_hi_ptr,
            ent_slot_ptr, ent_row_ptr,
            B, n_inputs, n_computed, stride_xb, stride_xf, stride_yb, stride_yf, stride_slow,
            M: tl.constexpr, BT: tl.constexpr, KC: tl.constexpr):
        pid = tl.program_id(0)
        cols = pid * BT + tl.arange(0, BT)
        cmask = cols < B
        cols64 = cols.to(tl.int64)
        scratch = scratch_ptr + pid.to(tl.int64) * (M * BT)
        lanes = tl.arange(0, BT)
        kk = tl.arange(0, KC)
        for i in range(0, n_computed):
            nid = tl.load(neuron_ptr + i)
            acc = tl.zeros([BT], dtype=tl.float32) + tl.load(b_ptr + nid).to(tl.float32)
            s0 = tl.load(step_ptr_ptr + i)
            s1 = tl.load(step_ptr_ptr + i + 1)
            for s in range(s0, s1):
                kind = tl.load(steps_ptr + 8 * s)
                sa = tl.load(steps_ptr + 8 * s + 1)
                sb = tl.load(steps_ptr + 8 * s + 2)
                sc = tl.load(steps_ptr + 8 * s + 3)
                fs = tl.load(steps_ptr + 8 * s + 4)
                fr = tl.load(steps_ptr + 8 * s + 5)
                fc = tl.load(steps_ptr + 8 * s + 6)
                if kind == 0:
                    # CHUNK of sb FMA entries starting at sa: gather [KC, BT], one weighted sum.
                    kmask = kk < sb
                    e = sa + kk
                    slot = tl.load(ent_slot_ptr + e, mask=kmask, other=0)
                    row = tl.load(ent_row_ptr + e, mask=kmask, other=-1)
                    wgt = tl.load(w_ptr + e, mask=kmask, other=0.0).to(tl.float32)  # weights in entry order
                    m2 = kmask[:, None] & cmask[None, :]
                    from_slot = row < 0
                    from_x = (row >= 0) & (row < n_inputs)
                    from_slow = row >= n_inputs
                    row64 = row.to(tl.int64)
                    sptr = scratch + slot[:, None] * BT + lanes[None, :]
                    v = tl.load(sptr, mask=m2 & from_slot[:, None], other=0.0)
                    v += tl.load(x_ptr + cols64[None, :] * stride_xb + row64[:, None] * stride_xf,
                                 mask=m2 & from_x[:, None], other=0.0).to(tl.float32)
                    v += tl.load(slow_ptr + row64[:, None] * stride_slow + cols64[None, :],
                                 mask=m2 & from_slow[:, None], other=0.0)
                    acc += tl.sum(v * wgt[:, None], axis=0)
                    # fused loads also fill their slot (slots within a chunk are distinct)
                    tl.store(sptr, v, mask=m2 & (row >= 0)[:, None])
                elif kind == 1:
                    # LOAD slow row sa into slot sb
                    if sa < n_inputs:
                        v1 = tl.load(x_ptr + cols64 * stride_xb + sa.to(tl.int64) * stride_xf,
                                     mask=cmask, other=0.0).to(tl.float32)
                    else:
                        v1 = tl.load(slow_ptr + sa.to(tl.int64) * stride_slow + cols64, mask=cmask, other=0.0)
                    tl.store(scratch + sb * BT + lanes, v1, mask=cmask)
                elif kind == 2:
                    # STORE slot sa into slow row sb (and output column sc)
                    v2 = tl.load(scratch + sa * BT + lanes, mask=cmask, other=0.0)
                    tl.store(slow_ptr + sb.to(tl.int64) * stride_slow + cols64, v2, mask=cmask)
                    if sc >= 0:
                        tl.store(y_ptr + cols64 * stride_yb + sc.to(tl.int64) * stride_yf,
                                 v2.to(y_ptr.dtype.element_ty), mask=cmask)
                if fs >= 0:
                    # FINISH into slot fs; fused STORE to slow row fr (and output column fc). Its slot is
                    # not one of the chunk's, so no barrier is needed between the two.
                    code = tl.load(act_code_ptr + i)
                    lo = tl.load(act_lo_ptr + i)
                    hi = tl.load(act_hi_ptr + i)
                    acc = _activate(acc, code, lo, hi)
                    tl.store(scratch + fs * BT + lanes, acc, mask=cmask)
                    if fr >= 0:
                        tl.store(slow_ptr + fr.to(tl.int64) * stride_slow + cols64, acc, mask=cmask)
                        if fc >= 0:
                            tl.store(y_ptr + cols64 * stride_yb + fc.to(tl.int64) * stride_yf,
                                     acc.to(y_ptr.dtype.element_ty), mask=cmask)
                # another thread may read (or overwrite) in the next step what this one wrote (or read)
                tl.debug_barrier()


# ---------------------------------------------------------------------------------------------- level kernel
# The small-batch path: one launch per level, one program per (neuron of the level, batch tile). It does
# not follow the plan (every edge reads its source row from the values buffer, like a CSR SpMM per
# level), but it spreads even B = 1 over all SMs. Values are float32 [n_neurons, B] in global memory.
if triton is not None:

    @triton.jit(do_not_specialize=["B", "start"])
    def _iosparse_level_kernel(vals_ptr, w_ptr, b_ptr, in_ptr_ptr, in_src_ptr, level_neuron_ptr,
                               act_code_ptr, act_lo_ptr, act_hi_ptr, start, B, stride_v,
                               BT: tl.constexpr, KC: tl.constexpr):
        v = tl.load(level_neuron_ptr + start + tl.program_id(0)).to(tl.int64)
        cols = tl.program_id(1) * BT + tl.arange(0, BT)
        cmask = cols < B
        e0 = tl.load(in_ptr_ptr + v)
        e1 = tl.load(in_ptr_ptr + v + 1)
        acc2 = tl.zeros([KC, BT], dtype=tl.float32)
        for e in range(e0, e1, KC):
            ee = e + tl.arange(0, KC)
            km = ee < e1
            src = tl.load(in_src_ptr + ee, mask=km, other=0).to(tl.int64)
            wgt = tl.load(w_ptr + ee, mask=km, other=0.0).to(tl.float32)
            xv = tl.load(vals_ptr + src[:, None] * stride_v + cols[None, :], mask=km[:, None] & cmask[None, :],
                         other=0.0)
            acc2 += wgt[:, None] * xv
        acc = tl.sum(acc2, axis=0) + tl.load(b_ptr + v).to(tl.float32)
        acc = _activate(acc, tl.load(act_code_ptr + v), tl.load(act_lo_ptr + v), tl.load(act_hi_ptr + v))
        tl.store(vals_ptr + v * stride_v + cols, acc, mask=cmask)

    # Row-blocked variant: R neurons of one segment (a run of a level with one activation) per program,
    # [R, KC, BT] gathers. At small batches the one-neuron program above does too little work per program
    # (a 32-edge dot product); R rows give each program R * fan_in edges of independent loads in flight.
    @triton.jit(do_not_specialize=["B", "start", "count", "fan", "code"])
    def _iosparse_level_rows_kernel(vals_ptr, w_ptr, b_ptr, in_ptr_ptr, in_src_ptr, level_neuron_ptr,
                                    start, count, B, stride_v, fan, code, lo, hi,
                                    R: tl.constexpr, BT: tl.constexpr, KC: tl.constexpr):
        r = tl.program_id(0) * R + tl.arange(0, R)
        rmask = r < count
        v = tl.load(level_neuron_ptr + start + r, mask=rmask, other=0).to(tl.int64)
        e0 = tl.load(in_ptr_ptr + v, mask=rmask, other=0)
        e1 = tl.load(in_ptr_ptr + v + 1, mask=rmask, other=0)
        cols = tl.program_id(1) * BT + tl.arange(0, BT)
        cmask = cols < B
        acc = tl.zeros([R, BT], dtype=tl.float32)
        for k in range(0, fan, KC):
            ee = e0[:, None] + k + tl.arange(0, KC)[None, :]
            km = ee < e1[:, None]
            src = tl.load(in_src_ptr + ee, mask=km, other=0).to(tl.int64)
            wgt = tl.load(w_ptr + ee, mask=km, other=0.0).to(tl.float32)
            xv = tl.load(vals_ptr + src[:, :, None] * stride_v + cols[None, None, :],
                         mask=km[:, :, None] & cmask[None, None, :], other=0.0)
            acc += tl.sum(wgt[:, :, None] * xv, axis=1)
        acc += tl.load(b_ptr + v, mask=rmask, other=0.0).to(tl.float32)[:, None]
        acc = _activate(acc, code, lo, hi)
        tl.store(vals_ptr + v[:, None] * stride_v + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


    # Source-sharing blocks: R neurons whose in-edges read few distinct sources (neighbours in a
    # RadiX-Net / butterfly layer, after encode_levels' reordering) are computed together. Each distinct
    # source row of the block is gathered ONCE ([UC, BT]) and feeds all R accumulators through the block's
    # dense [R, UC] weight tile (edge ids, -1 where a neuron does not read that source). This is the I/O
    # idea of the paper one level down: a value loaded into fast memory serves every reader in the block.
    @triton.jit(do_not_specialize=["B", "block0", "code"])
    def _iosparse_level_block_kernel(vals_ptr, w_ptr, b_ptr, blk_rows_ptr, blk_uptr_ptr, blk_src_ptr, blk_edge_ptr,
                                     block0, B, stride_v, code, lo, hi,
                                     R: tl.constexpr, BT: tl.constexpr, UC: tl.constexpr, USE_DOT: tl.constexpr):
        blk = block0 + tl.program_id(0)
        rr = tl.arange(0, R)
        v = tl.load(blk_rows_ptr + blk * R + rr)
        rmask = v >= 0
        v = tl.where(rmask, v, 0).to(tl.int64)
        u0 = tl.load(blk_uptr_ptr + blk)
        u1 = tl.load(blk_uptr_ptr + blk + 1)
        width = u1 - u0  # the block's padded union size, a multiple of UC
        cols = tl.program_id(1) * BT + tl.arange(0, BT)
        cmask = cols < B
        acc = tl.zeros([R, BT], dtype=tl.float32)
        for u in range(u0, u1, UC):
            uu = u + tl.arange(0, UC)
            srcs = tl.load(blk_src_ptr + uu)
            smask = srcs >= 0
            xv = tl.load(vals_ptr + tl.where(smask, srcs, 0).to(tl.int64)[:, None] * stride_v + cols[None, :],
                         mask=smask[:, None] & cmask[None, :], other=0.0)
            e = tl.load(blk_edge_ptr + u0 * R + rr[:, None] * width + (uu - u0)[None, :])
            wgt = tl.load(w_ptr + tl.where(e >= 0, e, 0), mask=e >= 0, other=0.0).to(tl.float32)
            if USE_DOT:  # [R, UC] @ [UC, BT] in full fp32 (no tf32 rounding)
                acc += tl.dot(wgt, xv, input_precision="ieee")
            else:
                acc += tl.sum(wgt[:, :, None] * xv[None, :, :], axis=1)
        acc += tl.load(b_ptr + v, mask=rmask, other=0.0).to(tl.float32)[:, None]
        acc = _activate(acc, code, lo, hi)
        tl.store(vals_ptr + v[:, None] * stride_v + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@dataclass
class LevelProgram:
    """Per-level structure for :func:`level_forward` (tensors on ``device``; level bounds on the host)."""

    in_ptr: torch.Tensor        # int64 [n_neurons + 1]
    in_src: torch.Tensor        # int32 [n_edges]
    level_neuron: torch.Tensor  # int32 [n_computed], grouped by level
    act_code: torch.Tensor      # int32 [n_neurons]
    act_lo: torch.Tensor        # float32 [n_neurons]
    act_hi: torch.Tensor
    outputs: torch.Tensor       # int64 [n_outputs]
    level_ptr: tuple            # host ints, len L + 1
    level_fan_in: tuple         # host ints: largest in-degree per level
    segments: tuple             # host (start, count, fan_in, code, lo, hi): runs of a level with one activation
    n_inputs: int
    n_neurons: int
    n_edges: int
    # source-sharing blocks (see _iosparse_level_block_kernel), block_rows neurons each:
    blk_rows: torch.Tensor      # int32 [n_blocks * R] neuron ids, -1 pads the last block
    blk_uptr: torch.Tensor      # int64 [n_blocks + 1] offsets into blk_src (multiples of UC)
    blk_src: torch.Tensor       # int32 distinct sources per block, -1 pads
    blk_edge: torch.Tensor      # int32 per block [R, width] edge ids, -1 where no edge
    seg_blocks: tuple           # host per segment: (first block, n_blocks, reuse = edges / distinct sources)
    block_rows: int
    block_chunk: int

    @property
    def device(self) -> torch.device:
        return self.in_ptr.device


def encode_levels(in_ptr, in_src, level_ptr, level_neuron, act_code, act_lo, act_hi, outputs, n_inputs: int,
                  device="cpu", block_rows: Optional[int] = None, block_chunk: Optional[int] = None) -> LevelProgram:
    """Build a :class:`LevelProgram` from the structure arrays (``ops.prepare``'s buffers or a DAG's).

    Inside a level, neurons are grouped by activation (segments) and ordered so that neurons with
    overlapping sources are neighbours; ``block_rows`` neurons (a power of two, default 32) form one
    source-sharing block whose distinct sources are gathered ``block_chunk`` at a time (default 16)."""
    block_rows = DEFAULT_BLOCK_ROWS if block_rows is None else int(block_rows)
    block_chunk = DEFAULT_BLOCK_CHUNK if block_chunk is None else int(block_chunk)
    for name, val in (("block_rows", block_rows), ("block_chunk", block_chunk)):
        if val < 1 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two, got {val}")
    ptr = _np(in_ptr, np.int64)
    src = _np(in_src, np.int64)
    lp = _np(level_ptr, np.int64)
    ln = _np(level_neuron, np.int64)
    n = ptr.size - 1
    if src.size and (src.min() < 0 or src.max() >= n):
        raise ProgramError("in_src has neuron ids out of range")
    if lp.size < 1 or lp[0] != 0 or lp[-1] != ln.size or (np.diff(lp) < 0).any():
        raise ProgramError("level_ptr must be non-decreasing from 0 to len(level_neuron)")
    if ln.size != n - int(n_inputs) or (ln.size and (ln.min() < n_inputs or ln.max() >= n)):
        raise ProgramError("level_neuron must list every computed neuron")
    codes = _np(act_code, np.int64)
    los, his = _np(act_lo, np.float32), _np(act_hi, np.float32)
    # Inside a level, sort by activation so that each (level, activation) is one contiguous segment.
    level_of = np.repeat(np.arange(lp.size - 1), np.diff(lp))
    ln = ln[np.lexsort((ln, his[ln], los[ln], codes[ln], level_of))]
    deg = np.diff(ptr)[ln]
    fan = tuple(int(deg[a:b].max()) if b > a else 0 for a, b in zip(lp[:-1], lp[1:]))
    segments = []
    if ln.size:
        differs = lambda a: a[1:] != a[:-1]  # noqa: E731  (not np.diff: lo/hi may be +-inf)
        key_change = np.flatnonzero(differs(level_of) | differs(codes[ln]) | differs(los[ln]) | differs(his[ln])) + 1
        bounds = np.concatenate([[0], key_change, [ln.size]])
        seg_fan = np.maximum.reduceat(deg, bounds[:-1])
        for a, b, f in zip(bounds[:-1], bounds[1:], seg_fan):
            v = ln[a]
            segments.append((int(a), int(b - a), int(f), int(codes[v]), float(los[v]), float(his[v])))
    for start, count, *_ in segments:  # neurons that read neighbouring sources next to each other
        seg = ln[start:start + count]
        ln[start:start + count] = seg[_sharing_order(ptr, src, seg)]
    blocks = source_blocks(ptr, src, ln, segments, block_rows, block_chunk)
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a, dtype=dt)).to(device)  # noqa: E731
    return LevelProgram(
        in_ptr=t(ptr, np.int64), in_src=t(src, np.int32), level_neuron=t(ln, np.int32),
        act_code=t(codes, np.int32), act_lo=t(los, np.float32), act_hi=t(his, np.float32),
        outputs=t(_np(outputs), np.int64), level_ptr=tuple(int(a) for a in lp), level_fan_in=fan,
        segments=tuple(segments), n_inputs=int(n_inputs), n_neurons=n, n_edges=int(src.size),
        blk_rows=t(blocks["rows"], np.int32), blk_uptr=t(blocks["uptr"], np.int64), blk_src=t(blocks["src"], np.int32),
        blk_edge=t(blocks["edge"], np.int32), seg_blocks=blocks["seg_blocks"], block_rows=int(block_rows),
        block_chunk=int(block_chunk))


def _segment_edges(ptr: np.ndarray, rows: np.ndarray):
    """(deg, reader, edge ids) of the in-edges of ``rows``, row by row: ``reader`` is the position in
    ``rows`` of each edge's neuron."""
    deg = ptr[rows + 1] - ptr[rows]
    first = np.concatenate([[0], np.cumsum(deg)[:-1]])
    eid = np.repeat(ptr[rows] - first, deg) + np.arange(int(deg.sum()))
    return deg, np.repeat(np.arange(rows.size), deg), eid


def _sharing_order(ptr: np.ndarray, src: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """An order of ``rows`` (one level segment) that puts neurons with overlapping source sets next to each
    other: by the smallest source s0, as (s0 mod g, s0 div g) where g is the typical gap between a
    neuron's consecutive sources. A RadiX-Net layer of stride g reads {b + d*g}: neurons b, b+g, b+2g...
    share all but one source, and this key makes them neighbours (for g = 1 it is plain s0 order). On
    unstructured sparsity the order is harmless (nothing to share)."""
    deg, row_of, eid = _segment_edges(ptr, rows)
    if rows.size < 2 or not deg.any():
        return np.arange(rows.size)
    es = src[eid]  # the segment's in-edges, row by row (sorted by source inside a row)
    s0 = np.full(rows.size, -1, dtype=np.int64)
    s0[row_of[::-1]] = es[::-1]  # first (smallest) source of each row
    same_row = row_of[1:] == row_of[:-1]
    gaps = np.diff(es)[same_row]
    g = max(1, int(np.median(gaps[gaps > 0]))) if (gaps > 0).any() else 1
    return np.lexsort((s0 // g, s0 % g))


def source_blocks(ptr: np.ndarray, src: np.ndarray, ln: np.ndarray, segments, R: int = DEFAULT_BLOCK_ROWS,
                  UC: int = DEFAULT_BLOCK_CHUNK) -> dict:
    """Cut every segment of ``ln`` into blocks of ``R`` consecutive neurons and list, per block, its
    distinct sources (padded with -1 to a multiple of ``UC``) and the [R, width] matrix of edge ids that
    connect them (-1: no edge). ``reuse`` per segment = edges / distinct sources summed over its blocks:
    how many readers each gathered source row serves. Segments whose edge matrices would hold more than
    4x their edges (little sharing: unstructured sparsity) get no blocks: (first block, 0, reuse)."""
    rows_out, uptr, src_out, edge_out, seg_blocks = [], [0], [], [], []
    n_blocks = 0
    for start, count, *_ in segments:
        seg = ln[start:start + count]
        nb = -(-count // R)
        blk_rows = np.full(nb * R, -1, dtype=np.int64)
        blk_rows[:count] = seg
        deg, pos, eid = _segment_edges(ptr, seg)  # pos: position of each edge's reader in the segment
        m = int(deg.sum())
        es = src[eid]
        blk = pos // R
        key = blk * (ptr.size) + es  # (block, source) pairs
        uniq, inv = np.unique(key, return_inverse=True)
        ublk = uniq // ptr.size
        usz = np.bincount(ublk, minlength=nb)  # distinct sources per block
        width = -(-usz // UC) * UC
        width[width == 0] = UC
        woff = np.concatenate([[0], np.cumsum(width)])
        reuse = float(m / max(1, uniq.size))
        if int(woff[-1]) * R > 4 * max(m, 1):
            seg_blocks.append((n_blocks, 0, reuse))
            continue
        ufirst = np.concatenate([[0], np.cumsum(usz)])
        col = np.arange(uniq.size) - ufirst[ublk]  # column of each distinct source inside its block
        bsrc = np.full(int(woff[-1]), -1, dtype=np.int64)
        bsrc[woff[ublk] + col] = uniq % ptr.size
        bedge = np.full(int(woff[-1]) * R, -1, dtype=np.int64)
        ecol = col[inv]
        bedge[woff[blk] * R + (pos % R) * width[blk] + ecol] = eid
        rows_out.append(blk_rows)
        src_out.append(bsrc)
        edge_out.append(bedge)
        uptr.extend((uptr[-1] + woff[1:]).tolist())
        seg_blocks.append((n_blocks, nb, reuse))
        n_blocks += nb
    cat = lambda a: np.concatenate(a) if a else np.zeros(0, dtype=np.int64)  # noqa: E731
    return dict(rows=cat(rows_out), uptr=np.asarray(uptr, dtype=np.int64), src=cat(src_out), edge=cat(edge_out),
                seg_blocks=tuple(seg_blocks))


def encode_levels_from_dag(dag, device="cpu") -> LevelProgram:
    """:func:`encode_levels` for a SparseDAG (levels from ``dag.levels()``)."""
    lv = dag.levels()
    comp = np.arange(dag.n_inputs, dag.n_neurons)
    ln = comp[np.argsort(lv[comp], kind="stable")]
    lp = np.zeros(int(lv.max()) + 1, dtype=np.int64)
    lp[1:] = np.cumsum(np.bincount(lv[comp] - 1, minlength=int(lv.max())))
    acts = [dag.activation_of(v) for v in range(dag.n_neurons)]
    return encode_levels(dag.in_ptr, dag.in_src, lp, ln, [a.code for a in acts], [a.lo for a in acts],
                         [a.hi for a in acts], dag.outputs, dag.n_inputs, device)


def level_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lp: LevelProgram, *,
                  batch_tile: Optional[int] = None, rows_per_program: Optional[int] = None,
                  blocks: Optional[bool] = None) -> torch.Tensor:
    """Evaluate the network level by level with the Triton level kernels: ``[B, n_inputs] -> [B, n_outputs]``
    in ``x.dtype``, float32 accumulation. One launch per segment (a level's neurons with one activation).

    ``blocks``: run a segment with the source-sharing block kernel (each distinct source of a block of
    neurons gathered once); ``None`` (default) does so where a gathered source serves at least
    ``BLOCK_MIN_REUSE`` edges, ``False`` never, ``True`` wherever blocks were built. Other segments run the row-blocked kernel
    with ``rows_per_program`` neurons per program (a power of two; default :func:`level_rows`);
    ``rows_per_program=1`` with ``blocks`` not True runs the one-neuron kernel, one launch per level."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_common(x, weight, bias, lp.n_inputs, lp.n_edges, lp.n_neurons, lp.device)
    B = x.shape[0]
    if B == 0:
        return torch.empty(0, lp.outputs.numel(), dtype=x.dtype, device=x.device)
    BT = batch_tile or min(64, _pow2_at_least(B))
    if BT < 1 or BT & (BT - 1):
        raise ValueError(f"batch_tile must be a power of two, got {BT}")
    if rows_per_program is not None and (rows_per_program < 1 or rows_per_program & (rows_per_program - 1)):
        raise ValueError(f"rows_per_program must be a power of two, got {rows_per_program}")
    vals = torch.empty(lp.n_neurons, B, dtype=torch.float32, device=x.device)
    vals[: lp.n_inputs] = x.t()
    w = weight.contiguous()
    b = bias.contiguous()
    tiles = triton.cdiv(B, BT)
    if rows_per_program == 1 and not blocks:
        for L in range(len(lp.level_ptr) - 1):
            start, count = lp.level_ptr[L], lp.level_ptr[L + 1] - lp.level_ptr[L]
            if count == 0:
                continue
            KC = max(1, min(_pow2_at_least(max(1, lp.level_fan_in[L])), 128, max(1, 4096 // BT)))
            _iosparse_level_kernel[(count, tiles)](
                vals, w, b, lp.in_ptr, lp.in_src, lp.level_neuron, lp.act_code, lp.act_lo, lp.act_hi,
                start, B, vals.stride(0), BT=BT, KC=KC, num_warps=max(1, min(4, KC * BT // 256)))
    else:
        sms = _sm_count(x.device)
        UC = lp.block_chunk
        use_dot = lp.block_rows >= 16 and UC >= 16 and BT >= 16
        # auto: blocks with the dot form, or one column; on an H100 the [R, UC, BT] broadcast form gave
        # wrong sums at R = 16 with BT >= 16 (a Triton 3.6 miscompile; right at BT = 1 and in the
        # interpreter), so it runs only when forced (blocks=True) and in the interpreter tests
        auto_blocks = use_dot or BT == 1
        block_warps = 4 if use_dot else max(1, min(8, lp.block_rows * UC * BT // 256))
        for (start, count, fan, code, lo, hi), (block0, n_blocks, reuse) in zip(lp.segments, lp.seg_blocks):
            if n_blocks and (blocks or (blocks is None and reuse >= BLOCK_MIN_REUSE and auto_blocks)):
                _iosparse_level_block_kernel[(n_blocks, tiles)](
                    vals, w, b, lp.blk_rows, lp.blk_uptr, lp.blk_src, lp.blk_edge, block0, B, vals.stride(0), code,
                    lo, hi, R=lp.block_rows, BT=BT, UC=UC, USE_DOT=use_dot, num_warps=block_warps)
                continue
            R, KC = level_rows(count, fan, BT, tiles, sms, rows_per_program)
            _iosparse_level_rows_kernel[(triton.cdiv(count, R), tiles)](
                vals, w, b, lp.in_ptr, lp.in_src, lp.level_neuron, start, count, B, vals.stride(0), fan, code,
                lo, hi, R=R, BT=BT, KC=KC, num_warps=max(1, min(8, R * KC * BT // 256)))
    # contiguous [B, n_outputs], as the op's fake kernel promises (torch.compile checks the strides)
    return torch.empty(B, lp.outputs.numel(), dtype=x.dtype, device=x.device).copy_(vals[lp.outputs].t())


def _sm_count(device) -> int:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(dev).multi_processor_count)
    return 1


def level_rows(count: int, fan: int, batch_tile: int, tiles: int, sms: int,
               rows: Optional[int] = None, max_elements: int = 16384) -> tuple:
    """(R, KC) of the row-blocked level kernel for a segment of ``count`` neurons of in-degree <= ``fan``.

    KC = the in-edge chunk: the fan-in rounded up to a power of two, at most 32. R = neurons per program.
    Measured on an H100 (benchmarks/RESULTS.md, radix N = 16384, fan-in 32): with 16- or 64-column
    tiles the most rows that keep a step's gather within ``max_elements`` values ([8, 32, 64] at BT = 64)
    is fastest, 1.5-2x faster than one row, because a program then has R * KC independent row loads in
    flight; narrow tiles (B < 16) are launch-bound and one row per program is as fast as any. R is halved
    while the grid would leave SMs idle."""
    KC = max(1, min(_pow2_at_least(max(1, fan)), 32, max(1, max_elements // batch_tile)))
    if rows is None:
        rows = max(1, max_elements // (KC * batch_tile)) if batch_tile >= 16 else 1
        while rows > 1 and -(-count // rows) * tiles < sms:
            rows //= 2
    return int(rows), int(KC)


# ---------------------------------------------------------------------------------------------- launcher
def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kp: KernelProgram):
    _check_common(x, weight, bias, kp.n_inputs, kp.n_edges, kp.n_neurons, kp.device)


def _check_common(x, weight, bias, n_inputs: int, n_edges: int, n_neurons: int, device):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise TypeError("x, weight and bias must be torch.Tensors")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype not in SUPPORTED_DTYPES or bias.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight and bias must be float32, float16 or bfloat16, got {weight.dtype}, {bias.dtype}")
    if x.dim() != 2 or x.shape[1] != n_inputs:
        raise ValueError(f"x must have shape [batch, {n_inputs}], got {list(x.shape)}")
    if weight.dim() != 1 or weight.numel() != n_edges:
        raise ValueError(f"weight must be 1-D with {n_edges} entries (one per edge), got {list(weight.shape)}")
    if bias.dim() != 1 or bias.numel() != n_neurons:
        raise ValueError(f"bias must be 1-D with {n_neurons} entries (one per neuron), got {list(bias.shape)}")
    devs = {x.device, weight.device, bias.device, torch.device(device)}
    if len(devs) != 1:
        raise ValueError(f"x, weight, bias and the program must be on one device, got {sorted(map(str, devs))}")
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernel runs on CPU tensors only under the interpreter "
                           "(set TRITON_INTERPRET=1 before importing torch_iosparse)")


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kp: KernelProgram, *,
            batch_tile: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """Run the compiled network on ``x`` ([B, n_inputs]) with the Triton kernel: ``[B, n_outputs]`` in
    ``x.dtype`` (float32 accumulation). ``kp`` comes from :func:`encode` on the same device as ``x``.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_inputs(x, weight, bias, kp)
    B = x.shape[0]
    y = torch.empty(B, kp.n_outputs, dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    tiling = choose_tiling(x.device, B, batch_tile=batch_tile, memory=kp.memory, chunk=kp.chunk)
    BT = tiling.batch_tile
    tiles = triton.cdiv(B, BT)
    # slow memory: only the rows past the inputs are stored to (inputs are read from x)
    slow = torch.empty(max(kp.n_slow, 1), B, dtype=torch.float32, device=x.device)
    scratch = torch.empty(tiles * kp.memory * BT, dtype=torch.float32, device=x.device)
    # weights in FMA-entry order: contiguous loads per chunk (a no-op for layer-ordered plans)
    w = weight.contiguous() if kp.edges_in_order else weight[kp.ent_edge]
    b = bias if bias.is_contiguous() else bias.contiguous()
    _iosparse_forward_kernel[(tiles,)](
        x, y, w, b, slow, scratch,
        kp.steps, kp.step_ptr, kp.neuron, kp.act_code, kp.act_lo, kp.act_hi,
        kp.ent_slot, kp.ent_row,
        B, kp.n_inputs, kp.n_computed, x.stride(0), x.stride(1), y.stride(0), y.stride(1), slow.stride(0),
        M=kp.memory, BT=BT, KC=kp.chunk, num_warps=num_warps or tiling.num_warps)
    return y
