"""Checks shared by the op and kernel tests: tolerances per dtype, running a prepared network, and running
code in a fresh interpreter with the kernel's ISA forced."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from torch_iosparse import ops


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def cast(dag, dtype):
    return dag.weight.to(dtype), dag.bias.to(dtype)


def run(net, x, dag):
    w, b = cast(dag, x.dtype)
    return ops.dag_forward(x, w, b, net.buffers, net.meta)


def run_under_isa(isa: str, code: str, **more_env: str):
    """Run ``code`` in a fresh interpreter with the kernel's ISA forced (IOSPARSE_ISA; "" keeps the
    detected one), outputs poisoned and ``more_env`` set; it must print 'ok'."""
    env = dict(os.environ, IOSPARSE_ISA=isa, IOSPARSE_POISON="1", **more_env)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
