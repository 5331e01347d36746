"""The op's ABI on the Python side: every number and order that Python and the kernels must agree on.

``torch.ops.iosparse.dag_forward(x, weight, bias, net: Tensor[], config: int[])`` takes its network as
a list of tensors and a list of ints in fixed orders, and those tensors hold integer codes. This module
is the one Python definition of all of them; every other module imports them from here.

========================  ====================================  ===========================================
what                      here                                  C++ / CUDA counterpart
========================  ====================================  ===========================================
program opcodes           :class:`Opcode`                       ``enum Opcode`` (kernels/cpu/net.h),
                                                                ``enum Opcode`` (kernels/cuda/*.cu)
strategy codes            :class:`Strategy`,                    ``enum Strategy`` (kernels/cpu/net.h)
                          :data:`STRATEGY_CODES`
activation codes          :class:`ActCode`,                     ``enum ActCode`` (kernels/cpu/activation.h),
                          :data:`ACTIVATION_KINDS`              ``enum Act`` (kernels/cuda/*.cu)
order of ``net``          :data:`NET_KEYS`, :data:`NET_DTYPES`  ``enum NetIndex`` (kernels/cpu/net.h), the
                                                                ``check_buffer`` calls of validate.cpp
order of ``config``       :data:`CONFIG_KEYS`                   ``enum ConfigIndex`` (kernels/cpu/net.h)
========================  ====================================  ===========================================

tests/test_abi.py parses those C++ definitions and checks that they agree with this module. Codes are
stored in saved networks (state dicts, plan files): append new members, never renumber.

The math of each activation lives in one place per language: :func:`torch_iosparse.graph.activations.forward`
and :func:`torch_iosparse.graph.activations.gradient` (PyTorch: the reference evaluator, the reference kernels
of the op and the program interpreter all call them); ``act_scalar`` / ``act_grad_scalar`` in
kernels/cpu/activation.h (CPU kernels); ``_activate`` in torch_iosparse/backends/cuda/triton_kernels.py (Triton) and
``activate`` in kernels/cuda/iosparse_forward.cu (CUDA C++), which are device code and cannot share the
Python definition. The kernels are tested against the Python definition.
"""
from __future__ import annotations

from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Mapping, Tuple

import torch


class _DocumentedIntEnum(IntEnum):
    """An IntEnum whose members are declared as ``NAME = value, "docstring"``."""

    def __new__(cls, value: int, doc: str):
        member = int.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member


class Opcode(_DocumentedIntEnum):
    """Opcodes of a compiled program's op stream (``Program.ops[:, 0]``; docs/program-format.md).

    Every plan position starts with the implicit ``acc = bias[neuron]``; its ops are rows
    ``(opcode, a, b)``."""

    LOAD = 1, "(slow_row, slot): slots[slot] = slow[slow_row], a copy from slow into fast memory."
    FMA = 2, "(slot, edge): acc += weight[edge] * slots[slot]; edge indexes the in-edge CSR order."
    FINISH = 3, "(slot, -1): slots[slot] = act(acc), the neuron's value enters fast memory."
    STORE = 4, "(slot, slow_row): slow[slow_row] = slots[slot], a copy into slow memory."


#: ``{code: name}`` of the opcodes, e.g. ``{1: "LOAD", ...}``.
OPCODE_NAMES: Mapping[int, str] = MappingProxyType({int(op): op.name for op in Opcode})


class Strategy(str, Enum):
    """The forward strategies of the op (``config[CONFIG_KEYS.index("strategy")]``; docs/cpu-kernel.md).

    A member is its name as a string (``Strategy.PANEL == "panel"``) and carries its integer ``code``.
    On CUDA every strategy but ``program`` runs the level kernels (docs/gpu.md)."""

    code: int

    def __new__(cls, value: str, code: int, doc: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.code = code
        member.__doc__ = doc
        return member

    AUTO = ("auto", 0, "Pick per call from the batch size: dense from dense_min_batch (layered networks), level "
                       "up to level_max_batch, panel from panel_min_batch, block from block_min_batch, else "
                       "program (thresholds set by torch_iosparse.backends.cpu: strategy, tuning).")
    PROGRAM = ("program", 1, "Execute the compiled plan per batch tile of BT columns with M slots in a "
                             "per-core buffer: the memory traffic is the plan's I/O.")
    LEVEL = ("level", 2, "Level by level, chunks of a level's neurons shared by all threads: uses every "
                         "core even at batch 1.")
    DENSE = ("dense", 3, "Layered networks only: per layer the edge weights are scattered into a dense "
                         "matrix and multiplied with a GEMM (low sparsity, large batches).")
    PANEL = ("panel", 4, "Level by level over panels of up to 8 neurons that share sources (the panel "
                         "buffers): each source value loaded once per panel.")
    BLOCK = ("block", 5, "Level by level, each neuron's edges one block of consecutive source neurons at "
                         "a time (the block buffers), so a block's values stay in cache.")

    @classmethod
    def from_code(cls, code: int) -> "Strategy":
        """The strategy with integer ``code``; ValueError for an unknown code."""
        for s in cls:
            if s.code == int(code):
                return s
        raise ValueError(f"unknown strategy code {code}; codes are "
                         + ", ".join(f"{s.code} ({s.value})" for s in cls))

    def __str__(self) -> str:
        return self.value


#: ``{name: code}`` of the strategies, e.g. ``{"auto": 0, "program": 1, ...}`` (read-only; the form
#: ``ops.STRATEGIES`` exposes).
STRATEGY_CODES: Mapping[str, int] = MappingProxyType({s.value: s.code for s in Strategy})


class ActCode(_DocumentedIntEnum):
    """Activation codes of the ``act_code`` buffer (an activation is ``(kind, lo, hi)``; ``lo`` / ``hi``
    matter for ``hardtanh`` only). The formulas are PyTorch's; their Python definition is
    :func:`torch_iosparse.graph.activations.forward` / :func:`~torch_iosparse.graph.activations.gradient`."""

    IDENTITY = 0, "x; gradient 1."
    RELU = 1, "max(x, 0); gradient 1 where x > 0, else 0 (0 at x = 0, as PyTorch)."
    HARDTANH = 2, "clamp(x, lo, hi); gradient 1 strictly inside (lo, hi), else 0."
    GELU = 3, "x/2 (1 + erf(x / sqrt 2)) (torch.nn.GELU())."
    GELU_TANH = 4, "x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (torch.nn.GELU(approximate='tanh'))."
    TANH = 5, "tanh(x); gradient 1 - tanh(x)^2."
    SIGMOID = 6, "1 / (1 + exp(-x)); gradient s (1 - s)."

    @property
    def kind(self) -> str:
        """The activation's name as :func:`torch_iosparse.graph.activations.parse` accepts it."""
        return self.name.lower()


#: Activation names in code order (``ACTIVATION_KINDS[code]``).
ACTIVATION_KINDS: Tuple[str, ...] = tuple(a.kind for a in ActCode)

#: Order of the ``Tensor[] net`` argument (docs/program-format.md has the meaning of each).
NET_KEYS: Tuple[str, ...] = (
    "in_ptr", "in_src", "act_code", "act_param", "outputs", "level_ptr", "level_neuron",
    "prog_neuron", "prog_op_ptr", "prog_ops", "prog_output_rows",
    "dense_index", "dense_edge", "dense_edge_ptr", "dense_out_pos", "prog_group_ptr",
    "panel_ptr", "panel_src", "panel_row_ptr", "panel_target", "panel_edge_ptr", "panel_edge",
    "block_chunk_seg", "block_chunk_row", "block_chunk_edge", "block_seg", "block_local", "block_edge")
#: The dtype of each ``net`` buffer (the CPU kernel rejects any other).
NET_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    **{k: torch.int64 for k in NET_KEYS},
    "in_src": torch.int32, "act_code": torch.int8, "act_param": torch.float64, "prog_ops": torch.int32,
    "panel_src": torch.int32, "panel_edge": torch.int32, "block_seg": torch.int32, "block_local": torch.uint8,
    "block_edge": torch.int32})
#: The panel buffers (CPU panel path) and the block buffers (CPU block path): optional, may be empty.
PANEL_KEYS: Tuple[str, ...] = NET_KEYS[NET_KEYS.index("panel_ptr"):NET_KEYS.index("panel_edge") + 1]
BLOCK_KEYS: Tuple[str, ...] = NET_KEYS[NET_KEYS.index("block_chunk_seg"):]
#: Position of each ``net`` buffer, e.g. ``NetIndex.PROG_OPS == 9``.
NetIndex = IntEnum("NetIndex", [(k.upper(), i) for i, k in enumerate(NET_KEYS)], module=__name__)

#: Order of the ``int[] config`` argument.
CONFIG_KEYS: Tuple[str, ...] = (
    "n_inputs", "n_neurons", "n_outputs", "memory", "n_slow", "batch_tile", "strategy",
    "level_max_batch", "dense_min_batch", "layered", "panel_min_batch", "panel_tile", "block_min_batch",
    "block_backward_min_batch")
#: Position of each ``config`` entry, e.g. ``ConfigIndex.STRATEGY == 6``.
ConfigIndex = IntEnum("ConfigIndex", [(k.upper(), i) for i, k in enumerate(CONFIG_KEYS)], module=__name__)

#: A batch threshold that is never reached (``config`` entries ``*_min_batch``).
NEVER = 2**62
