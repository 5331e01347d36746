"""Loads the native extension once; ``ops()`` is ``torch.ops.iosparse``.

Loading the same TORCH_LIBRARY twice kills the process, so the import happens in exactly one place.
"""
from __future__ import annotations

import torch

_loaded = False


def ops():
    global _loaded
    if not _loaded:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.iosparse.*)
        except ImportError as e:
            raise ImportError(
                "torch_iosparse's native extension is not built. From the repository root run "
                "`make build` (or `pip install --no-build-isolation -e .`)." + f" ({e})") from e
        _loaded = True
    return torch.ops.iosparse


def available() -> bool:
    try:
        ops()
        return True
    except ImportError:
        return False
