"""CUDA backend of the ``iosparse`` op (docs/gpu.md).

Importing this module registers (idempotently) the CUDA kernels of the ops that torch_iosparse.ops
defines: ``iosparse::dag_forward`` runs a Triton kernel (triton_kernels.py: the plan executor, or the
level kernel for small batches, see :func:`choose_gpu_path`) and ``iosparse::dag_backward`` runs
:func:`torch_iosparse.ops.reference_backward`, the op's device-agnostic PyTorch reference (float64
forwards run ``ops.reference_forward``). This file only adapts the op's arguments (the buffers of
``ops.prepare``) to the launchers, with caches of the re-encoded device programs. It also builds the optional CUDA C++ variant (kernels/cuda, slots in shared memory) on demand
for the benchmark (:class:`CudaCxxForward`).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from ... import env
from ... import ops as ops_mod
from . import triton_kernels as tk
from ...abi import ConfigIndex, NetIndex, Strategy

__all__ = ["CudaCxxForward", "build_cuda_cxx", "choose_gpu_path", "find_nvcc", "kernel_program_from_buffers",
           "level_program_from_buffers", "reference_backward_from_buffers", "register", "registered", "triton_forward_from_buffers"]


# ---------------------------------------------------------------------------------------------- op adapter
# Positions in the op's ``Tensor[] net`` and ``int[] config`` (torch_iosparse.abi).
NET_IN_PTR, NET_IN_SRC, NET_ACT_CODE, NET_ACT_PARAM, NET_OUTPUTS = (
    NetIndex.IN_PTR, NetIndex.IN_SRC, NetIndex.ACT_CODE, NetIndex.ACT_PARAM, NetIndex.OUTPUTS)
NET_LEVEL_PTR, NET_LEVEL_NEURON = NetIndex.LEVEL_PTR, NetIndex.LEVEL_NEURON
NET_PROG_NEURON, NET_PROG_OP_PTR, NET_PROG_OPS, NET_PROG_OUTPUT_ROWS = (
    NetIndex.PROG_NEURON, NetIndex.PROG_OP_PTR, NetIndex.PROG_OPS, NetIndex.PROG_OUTPUT_ROWS)
CFG_N_INPUTS, CFG_N_NEURONS, CFG_N_OUTPUTS, CFG_MEMORY, CFG_N_SLOW, CFG_STRATEGY = (
    ConfigIndex.N_INPUTS, ConfigIndex.N_NEURONS, ConfigIndex.N_OUTPUTS, ConfigIndex.MEMORY, ConfigIndex.N_SLOW,
    ConfigIndex.STRATEGY)

_PROGRAMS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def kernel_program_from_buffers(net: Sequence[torch.Tensor], config: Sequence[int],
                                chunk: int = tk.DEFAULT_CHUNK) -> tk.KernelProgram:
    """The re-encoded program of the op's buffers, on their device; cached per program tensor (and its
    version counter, so buffers overwritten in place, e.g. by load_state_dict, are re-encoded)."""
    ops_t = net[NET_PROG_OPS]
    key = (ops_t._version, net[NET_PROG_OP_PTR]._version, net[NET_PROG_NEURON]._version, net[NET_ACT_CODE]._version,
           net[NET_ACT_PARAM]._version, tuple(int(c) for c in config), int(chunk), str(ops_t.device))
    hit = _PROGRAMS.get(ops_t)
    if hit is not None and hit[0] == key:
        return hit[1]
    n_inputs, n_neurons = int(config[CFG_N_INPUTS]), int(config[CFG_N_NEURONS])
    neuron = net[NET_PROG_NEURON].detach().cpu().numpy().astype(np.int64)
    codes = net[NET_ACT_CODE].detach().cpu().numpy().astype(np.int64)
    params = net[NET_ACT_PARAM].detach().cpu().numpy().reshape(-1, 2)
    if neuron.size and (neuron.min() < 0 or neuron.max() >= codes.size):
        raise tk.ProgramError("program neuron ids outside the activation table")
    program = dict(
        n_inputs=n_inputs, n_outputs=int(config[CFG_N_OUTPUTS]), n_computed=n_neurons - n_inputs,
        memory=int(config[CFG_MEMORY]), n_slow=int(config[CFG_N_SLOW]), neuron=neuron, act_code=codes[neuron],
        act_lo=params[neuron, 0], act_hi=params[neuron, 1], op_ptr=net[NET_PROG_OP_PTR].detach().cpu().numpy(),
        ops=ops_t.detach().cpu().numpy(), output_rows=net[NET_PROG_OUTPUT_ROWS].detach().cpu().numpy())
    kp = tk.encode(program, n_edges=int(net[NET_IN_SRC].numel()), n_neurons=n_neurons, chunk=chunk,
                   device=ops_t.device)
    _PROGRAMS[ops_t] = (key, kp)
    return kp


def level_program_from_buffers(net: Sequence[torch.Tensor], config: Sequence[int]) -> tk.LevelProgram:
    """The level structure of the op's buffers for :func:`triton_kernels.level_forward`, cached like
    :func:`kernel_program_from_buffers`."""
    lvl = net[NET_LEVEL_NEURON]
    key = ("levels", lvl._version, net[NET_LEVEL_PTR]._version, net[NET_IN_SRC]._version, net[NET_ACT_CODE]._version,
           net[NET_ACT_PARAM]._version, tuple(int(c) for c in config), str(lvl.device))
    hit = _PROGRAMS.get(lvl)
    if hit is not None and hit[0] == key:
        return hit[1]
    params = net[NET_ACT_PARAM].detach().cpu().reshape(-1, 2)
    lp = tk.encode_levels(net[NET_IN_PTR], net[NET_IN_SRC], net[NET_LEVEL_PTR], lvl, net[NET_ACT_CODE],
                          params[:, 0], params[:, 1], net[NET_OUTPUTS], int(config[CFG_N_INPUTS]),
                          device=lvl.device)
    _PROGRAMS[lvl] = (key, lp)
    return lp


STRATEGY_AUTO, STRATEGY_PROGRAM, STRATEGY_LEVEL, STRATEGY_DENSE, STRATEGY_PANEL, STRATEGY_BLOCK = (
    s.code for s in (Strategy.AUTO, Strategy.PROGRAM, Strategy.LEVEL, Strategy.DENSE, Strategy.PANEL, Strategy.BLOCK))


def choose_gpu_path(batch: int, strategy: int, device) -> str:
    """``"program"`` (the plan executor) or ``"level"`` (the level kernel) for one CUDA call.

    The op's strategy decides when it is explicit ("program"; "level", "dense", "panel" and "block" run the
    level kernels, whose source-sharing blocks are the GPU twin of the CPU's panels and source blocks). For "auto":
    ``IOSPARSE_GPU_STRATEGY`` (program | level) if set, else the level kernels: on an H100 the plan
    executor (one program per batch tile walking the whole plan, latency-bound) measured 25-100x slower
    than the level kernels at every batch size (benchmarks/RESULTS.md, docs/gpu.md). ``batch`` and
    ``device`` are accepted for a rule per device and batch size; the choice does not depend on them."""
    if strategy == STRATEGY_PROGRAM:
        return "program"
    if strategy in (STRATEGY_LEVEL, STRATEGY_DENSE, STRATEGY_PANEL, STRATEGY_BLOCK):  # CPU twins of the GPU's blocks
        return "level"
    return env.gpu_strategy() or "level"


def triton_forward_from_buffers(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                net: Sequence[torch.Tensor], config: Sequence[int]) -> torch.Tensor:
    """The CUDA kernel of ``iosparse::dag_forward``: a Triton kernel on the op's arguments.

    float32 / float16 / bfloat16 inputs run the plan executor or the level kernel
    (:func:`choose_gpu_path`), both with float32 accumulation; float64 (which the kernels do not
    support) runs the op's reference (:func:`torch_iosparse.ops.reference_forward`) on the device. Also
    callable on CPU tensors under TRITON_INTERPRET=1 (that is how the tests exercise it)."""
    if x.dtype == torch.float64:
        return ops_mod.reference_forward(x, weight, bias, net, config)
    if choose_gpu_path(x.shape[0] if x.dim() else 0, int(config[CFG_STRATEGY]), x.device) == "level":
        return tk.level_forward(x, weight, bias, level_program_from_buffers(net, config))
    return tk.forward(x, weight, bias, kernel_program_from_buffers(net, config))


def reference_backward_from_buffers(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                    net: Sequence[torch.Tensor], config: Sequence[int]):
    """The CUDA kernel of ``iosparse::dag_backward``: :func:`torch_iosparse.ops.reference_backward` (PyTorch
    ops on the device, float32 accumulation for float16/bfloat16; not a Triton kernel)."""
    if grad_y.dim() != 2 or grad_y.shape[0] != x.shape[0] or grad_y.shape[1] != int(config[CFG_N_OUTPUTS]):
        raise ValueError(f"iosparse: grad_output must have shape [{x.shape[0]}, {int(config[CFG_N_OUTPUTS])}], "
                         f"got {list(grad_y.shape)}")
    return ops_mod.reference_backward(grad_y, x, weight, bias, net, config)


# ---------------------------------------------------------------------------------------------- CUDA C++ variant
# kernels/cuda/iosparse_forward.cu: the same program with the M slots in shared memory (one thread per
# column, no barriers). Not part of the op: built on demand with nvcc where torch has CUDA, for the
# benchmark's comparison of on-chip slots against the Triton kernel's L2-resident scratch.
# The source tree is three folders above this file (torch_iosparse/backends/cuda/).
_SOURCE_TREE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
CUDA_SOURCE = os.path.join(_SOURCE_TREE, "kernels", "cuda", "iosparse_forward.cu")
_CUDA_LIBS: dict = {}


def find_nvcc() -> Optional[str]:
    """Path of nvcc ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin) or None."""
    cands = [os.path.join(os.environ[k], "bin", "nvcc") for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in cands if c and os.path.exists(c)), None)


def build_cuda_cxx(arch: Optional[str] = None, cache_dir: Optional[str] = None):
    """Compile kernels/cuda/iosparse_forward.cu into a shared library (cached by source hash and
    architecture, in ``cache_dir``, default the package's cache folder) and load it with ctypes. ``arch`` like ``"90"`` (default: the current GPU's, else 90).
    Raises RuntimeError when nvcc or the source is missing or the compile fails."""
    if not os.path.exists(CUDA_SOURCE):
        raise RuntimeError(f"{CUDA_SOURCE} is missing (the CUDA C++ kernel ships with the source tree only)")
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME); the CUDA C++ kernel needs it to build")
    if arch is None:
        arch = "%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "90"
    with open(CUDA_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    if cache_dir is None:  # the package's cache folder (torch_iosparse.env), else the temporary folder
        from ...planning import cache
        cache_dir = cache.cache_dir() or os.path.join(tempfile.gettempdir(), "torch_iosparse")
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"iosparse_forward_{digest}_sm{arch}.so")
    if out in _CUDA_LIBS:
        return _CUDA_LIBS[out]
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        cmd = [nvcc, f"-arch=sm_{arch}", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
               "-o", tmp, CUDA_SOURCE]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(out)
    fn = lib.iosparse_cuda_forward
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 8
                   + [ctypes.c_int64, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
                   + [ctypes.c_int64] * 4 + [ctypes.c_void_p])
    _CUDA_LIBS[out] = lib
    return lib


_CXX_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class CudaCxxForward:
    """The CUDA C++ executor of a compiled ``program.Program`` on ``device`` (benchmarks; not the op).

    ``y = CudaCxxForward(program, n_edges, "cuda")(x, weight, bias)``; slots live in shared memory, so
    ``memory * batch_tile * 4`` bytes must fit a block's shared memory."""

    def __init__(self, program, n_edges: int, device="cuda", lib=None):
        self.lib = lib if lib is not None else build_cuda_cxx()
        dev = torch.device(device)
        self.n_inputs, self.n_outputs = int(program.n_inputs), int(program.n_outputs)
        self.n_computed, self.n_slow, self.memory = int(program.n_computed), int(program.n_slow), int(program.memory)
        self.n_edges = int(n_edges)
        t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt).to(dev)  # noqa: E731
        self.ops = t(program.ops, torch.int32)
        self.op_ptr = t(program.op_ptr, torch.int64)
        self.neuron = t(program.neuron, torch.int64)
        self.act_code = t(program.act_code, torch.int8)
        self.act_lo = t(program.act_lo, torch.float32)
        self.act_hi = t(program.act_hi, torch.float32)
        out_col = np.full(self.n_slow, -1, dtype=np.int32)
        out_col[np.asarray(program.output_rows, dtype=np.int64)] = np.arange(self.n_outputs, dtype=np.int32)
        self.out_col = t(out_col, torch.int32)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 batch_tile: Optional[int] = None) -> torch.Tensor:
        if x.device.type != "cuda" or x.device != self.ops.device:
            raise ValueError(f"the CUDA C++ kernel needs CUDA tensors on {self.ops.device}, got x on {x.device}")
        if x.dtype not in _CXX_DTYPE:
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"x must have shape [batch, {self.n_inputs}], got {list(x.shape)}")
        if weight.numel() != self.n_edges:
            raise ValueError(f"weight must have {self.n_edges} entries, got {weight.numel()}")
        same = weight.dtype == x.dtype and bias.dtype == x.dtype
        w = (weight if same else weight.float()).contiguous()
        b = (bias if same else bias.float()).contiguous()
        B = x.shape[0]
        y = torch.empty(B, self.n_outputs, dtype=x.dtype, device=x.device)
        if B == 0:
            return y
        props = torch.cuda.get_device_properties(x.device)
        smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
        if batch_tile is None:
            spread = -(-B // int(props.multi_processor_count))
            batch_tile = min(128, max(32, 1 << max(0, (spread - 1).bit_length())))
            while batch_tile > 1 and self.memory * batch_tile * 4 > smem:
                batch_tile //= 2
        if self.memory * batch_tile * 4 > smem:
            raise ValueError(f"{self.memory} slots x {batch_tile} columns x 4 B exceed the {smem} B of shared memory "
                             "per block; plan for fewer slots")
        slow = torch.empty(max(self.n_slow, 1), B, dtype=torch.float32, device=x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        err = self.lib.iosparse_cuda_forward(
            _CXX_DTYPE[x.dtype], x.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(), int(same), slow.data_ptr(),
            self.ops.data_ptr(), self.op_ptr.data_ptr(), self.neuron.data_ptr(), self.act_code.data_ptr(),
            self.act_lo.data_ptr(), self.act_hi.data_ptr(), self.out_col.data_ptr(), B, self.n_inputs,
            self.n_computed, self.memory, int(batch_tile), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            ctypes.c_void_p(stream))
        if err != 0:
            raise RuntimeError(f"iosparse CUDA C++ kernel failed with cudaError {err}")
        return y


# ---------------------------------------------------------------------------------------------- registration
FORWARD_OP = "iosparse::dag_forward"
BACKWARD_OP = "iosparse::dag_backward"
_REGISTERED: Optional[str] = None
_LIB = None


def register() -> str:
    """Register the Triton launcher as the CUDA kernel of ``iosparse::dag_forward`` and the PyTorch
    reference backward as the CUDA kernel of ``iosparse::dag_backward`` (idempotent; done on import).

    The ops, their fake kernels and the autograd formula come from :mod:`torch_iosparse.ops` (the
    native library defines the schemas), so torch.compile, torch.export and opcheck see one op on
    every device. Returns the forward op's name."""
    global _REGISTERED, _LIB
    if _REGISTERED is not None:
        return _REGISTERED
    # torch_iosparse.ops (imported above) defines the ops, fake kernels and autograd; loads the native library
    lib = torch.library.Library("iosparse", "IMPL")  # noqa: TOR901 (ops defined in C++ and ops.py)
    lib.impl("dag_forward", triton_forward_from_buffers, "CUDA")
    lib.impl("dag_backward", reference_backward_from_buffers, "CUDA")
    _LIB = lib
    _REGISTERED = FORWARD_OP
    return _REGISTERED


def registered() -> Optional[str]:
    """The op name whose CUDA kernel this module registered, or None."""
    return _REGISTERED


register()
