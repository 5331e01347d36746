"""Element-wise activations a neuron can apply after its weighted sum (σ_v in the cost model).

One table serves the DAG, the reference evaluator and the native kernels: an activation is a
``(kind, lo, hi)`` triple, where ``lo``/``hi`` only matter for ``hardtanh`` (a clamp). Native kernels
receive the integer ``code`` of the kind.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

# Codes are part of the native ABI (kernels/*/activation.h): append, never renumber.
KINDS = ("identity", "relu", "hardtanh", "gelu", "gelu_tanh", "tanh", "sigmoid")
CODE = {k: i for i, k in enumerate(KINDS)}

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
        """Reference (pure PyTorch) evaluation, the oracle every kernel is compared with."""
        k = self.kind
        if k == "identity":
            return x
        if k == "relu":
            return torch.relu(x)
        if k == "hardtanh":
            return torch.clamp(x, self.lo, self.hi)
        if k == "gelu":
            return F.gelu(x)
        if k == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if k == "tanh":
            return torch.tanh(x)
        if k == "sigmoid":
            return torch.sigmoid(x)
        raise AssertionError(k)

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
