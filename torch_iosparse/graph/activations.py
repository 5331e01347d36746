"""Element-wise activations a neuron can apply after its weighted sum (σ_v in docs/theory.md).

An activation is a ``(kind, lo, hi)`` triple, where ``lo``/``hi`` only matter for ``hardtanh`` (a
clamp). Kernels receive the integer code of the kind (:class:`torch_iosparse.abi.ActCode`).

:func:`forward` and :func:`gradient` are the one PyTorch definition of every activation's math: the
reference evaluator (:meth:`Activation.apply`, ``SparseDAG.forward_reference``), the op's reference
kernels (torch_iosparse/ops/reference.py) and the program interpreter (torch_iosparse/compile/program.py) all
call them.
The device kernels carry their own copies (kernels/cpu/activation.h, the Triton ``_activate`` in
torch_iosparse/backends/cuda/triton_kernels.py, kernels/cuda/iosparse_forward.cu) and are tested against these.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

from ..abi import ACTIVATION_KINDS as KINDS, ActCode

#: ``{kind: code}``, e.g. ``CODE["relu"] == 1`` (the codes are :class:`torch_iosparse.abi.ActCode`).
CODE = {a.kind: int(a) for a in ActCode}

_ALIASES = {
    "linear": "identity", "none": "identity", "id": "identity",
    "gelu_erf": "gelu", "clamp": "hardtanh",
}


class Activation(NamedTuple):
    """One activation function. ``lo``/``hi`` are the clamp bounds of ``hardtanh``."""

    kind: str
    lo: float = -math.inf
    hi: float = math.inf

    @property
    def code(self) -> int:
        return CODE[self.kind]

    def __str__(self) -> str:
        if self.kind == "hardtanh":
            return f"hardtanh({self.lo:g},{self.hi:g})"
        return self.kind

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Reference (pure PyTorch) evaluation, the oracle every kernel is compared with (:func:`forward`)."""
        return forward(self.code, x, self.lo, self.hi)

    def grad(self, z: torch.Tensor) -> torch.Tensor:
        """d act / d z at pre-activations ``z`` (:func:`gradient`)."""
        return gradient(self.code, z, self.lo, self.hi)

    def to_module(self) -> torch.nn.Module:
        k = self.kind
        if k == "identity":
            return torch.nn.Identity()
        if k == "relu":
            return torch.nn.ReLU()
        if k == "hardtanh":
            return torch.nn.Hardtanh(self.lo, self.hi)
        if k == "gelu":
            return torch.nn.GELU()
        if k == "gelu_tanh":
            return torch.nn.GELU(approximate="tanh")
        if k == "tanh":
            return torch.nn.Tanh()
        return torch.nn.Sigmoid()


IDENTITY = Activation("identity")

Bound = Union[float, torch.Tensor]


def forward(code: int, z: torch.Tensor, lo: Bound = -math.inf, hi: Bound = math.inf) -> torch.Tensor:
    """Activation ``code`` (:class:`~torch_iosparse.abi.ActCode`) of ``z``, with PyTorch's formulas.

    ``lo`` / ``hi`` are the clamp bounds of hardtanh: floats, or tensors that broadcast against ``z``
    (per-row bounds ``[k, 1]`` for ``z`` of shape ``[k, B]``). NaN passes through every activation.
    ValueError for an unknown code."""
    if code == ActCode.IDENTITY:
        return z
    if code == ActCode.RELU:
        return torch.relu(z)
    if code == ActCode.HARDTANH:
        return torch.clamp(z, lo, hi)
    if code == ActCode.GELU:
        return F.gelu(z)
    if code == ActCode.GELU_TANH:
        return F.gelu(z, approximate="tanh")
    if code == ActCode.TANH:
        return torch.tanh(z)
    if code == ActCode.SIGMOID:
        return torch.sigmoid(z)
    raise _unknown(code)


def gradient(code: int, z: torch.Tensor, lo: Bound = -math.inf, hi: Bound = math.inf) -> torch.Tensor:
    """d act / d z of activation ``code`` at pre-activations ``z``, written out (it also runs where autograd
    does not: below the autograd key, in the op's reference backward). PyTorch's conventions: relu'(0) = 0,
    hardtanh' = 0 at its bounds. ``lo`` / ``hi`` as in :func:`forward`."""
    if code == ActCode.IDENTITY:
        return torch.ones_like(z)
    if code == ActCode.RELU:
        return (z > 0).to(z.dtype)
    if code == ActCode.HARDTANH:
        return ((z > lo) & (z < hi)).to(z.dtype)
    if code == ActCode.GELU:
        return 0.5 * (1 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if code == ActCode.GELU_TANH:
        k, a = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k * (z + a * z ** 3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * a * z * z)
    if code == ActCode.TANH:
        return 1 - torch.tanh(z) ** 2
    if code == ActCode.SIGMOID:
        s = torch.sigmoid(z)
        return s * (1 - s)
    raise _unknown(code)


def _unknown(code) -> ValueError:
    return ValueError(f"unknown activation code {code}; codes are 0..{len(KINDS) - 1} ({', '.join(KINDS)})")

_CALL = re.compile(r"^\s*([a-z_0-9]+)\s*(?:\(\s*([^,()]+)\s*,\s*([^,()]+)\s*\))?\s*$")


def parse(spec: Union[str, Activation, None]) -> Activation:
    """Turn ``"relu"``, ``"gelu_tanh"``, ``"hardtanh(0,32)"``, ``"relu6"``, ``None`` … into an Activation."""
    if spec is None:
        return IDENTITY
    if isinstance(spec, Activation):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"activation must be a name like 'relu' or an Activation, got {type(spec).__name__}")
    m = _CALL.match(spec.lower())
    if not m:
        raise ValueError(f"cannot parse activation {spec!r}; expected one of {', '.join(KINDS)} "
                         "or 'hardtanh(lo,hi)'")
    name = _ALIASES.get(m.group(1), m.group(1))
    if name == "relu6":
        return Activation("hardtanh", 0.0, 6.0)
    if name not in CODE:
        raise ValueError(f"unsupported activation {spec!r}; supported: {', '.join(KINDS)}, relu6, "
                         "hardtanh(lo,hi)")
    if name == "hardtanh":
        lo, hi = (-1.0, 1.0) if m.group(2) is None else (float(m.group(2)), float(m.group(3)))
        if not lo <= hi:
            raise ValueError(f"hardtanh needs lo <= hi, got ({lo}, {hi})")
        return Activation("hardtanh", lo, hi)
    if m.group(2) is not None:
        raise ValueError(f"activation {name!r} takes no parameters (got {spec!r})")
    return Activation(name)


def from_module(mod: torch.nn.Module) -> Union[Activation, None]:
    """The Activation equivalent to an activation module, or None if the module is not one we support."""
    if isinstance(mod, torch.nn.Identity):
        return IDENTITY
    if isinstance(mod, torch.nn.ReLU6):
        return Activation("hardtanh", 0.0, 6.0)
    if isinstance(mod, torch.nn.ReLU):
        return Activation("relu")
    if isinstance(mod, torch.nn.Hardtanh):
        return Activation("hardtanh", float(mod.min_val), float(mod.max_val))
    if isinstance(mod, torch.nn.GELU):
        return Activation("gelu_tanh" if mod.approximate == "tanh" else "gelu")
    if isinstance(mod, torch.nn.Tanh):
        return Activation("tanh")
    if isinstance(mod, torch.nn.Sigmoid):
        return Activation("sigmoid")
    return None
