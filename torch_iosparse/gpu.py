"""CUDA backend of the ``iosparse`` op: registers the Triton launcher (torch_iosparse.triton_kernels)
as the CUDA kernel of the op that torch_iosparse.ops defines, and a device-agnostic PyTorch backward.

Importing this module registers the kernels (idempotent). Kernels live in triton_kernels.py; this file
only adapts the op's arguments (the program tensors of ``ops.prepare``) to the launcher, with a cache of
the re-encoded device program per network.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import activations as acts
from . import triton_kernels as tk
from .dag import _levels

__all__ = ["kernel_program_from_buffers", "reference_backward", "reference_backward_from_buffers", "reference_forward",
           "register", "registered", "triton_forward_from_buffers"]


# ---------------------------------------------------------------------------------------------- reference
_LEVEL_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _level_structure(in_ptr: torch.Tensor, in_src: torch.Tensor, n_inputs: int):
    """Level-order numbering of the neurons (inputs first) and, per level, the edges into it.
    Cached per ``in_ptr`` tensor (weakly), re-built when either tensor was changed in place."""
    key = (in_ptr._version, in_src._version, in_src.data_ptr(), in_src.numel(), int(n_inputs), str(in_ptr.device))
    hit = _LEVEL_CACHE.get(in_ptr)
    if hit is not None and hit[0] == key:
        return hit[1]
    ptr = in_ptr.detach().cpu().numpy().astype(np.int64)
    src = in_src.detach().cpu().numpy().astype(np.int64)
    n = ptr.size - 1
    dst = np.repeat(np.arange(n), np.diff(ptr))
    out_order = np.argsort(src, kind="stable")
    out_ptr = np.zeros(n + 1, dtype=np.int64)
    out_ptr[1:] = np.cumsum(np.bincount(src, minlength=n)) if src.size else 0
    depth = _levels(n, int(n_inputs), ptr, out_ptr, dst[out_order])  # GraphError on a cycle
    levels = []
    for L in range(1, int(depth.max(initial=0)) + 1):
        neurons = np.flatnonzero(depth == L)
        starts, ends = ptr[neurons], ptr[neurons + 1]
        counts = ends - starts
        edges = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        local = np.repeat(np.arange(neurons.size), counts)
        dev = in_ptr.device
        levels.append(tuple(torch.from_numpy(a).to(dev) for a in (neurons, edges, src[edges], local)))
    _LEVEL_CACHE[in_ptr] = (key, levels)
    return levels


def _apply_codes(z: torch.Tensor, code: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Activation per row of ``z`` ([n, B]) by activation code (differentiable, any device)."""
    out = z
    for k, kind in enumerate(acts.KINDS):
        sel = code == k
        if kind == "identity" or not bool(sel.any()):
            continue
        if kind == "hardtanh":
            a = torch.minimum(torch.maximum(z, lo[:, None].to(z.dtype)), hi[:, None].to(z.dtype))
        else:
            a = acts.Activation(kind).apply(z)
        out = torch.where(sel[:, None], a, out)
    return out


def reference_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, in_ptr: torch.Tensor,
                      in_src: torch.Tensor, act_code: torch.Tensor, act_lo: torch.Tensor, act_hi: torch.Tensor,
                      outputs: torch.Tensor, n_inputs: int) -> torch.Tensor:
    """Differentiable pure-PyTorch evaluation from the structure tensors, level by level, on x's device
    (float32 accumulation). ``act_*`` are per neuron. This is the CUDA backward's forward: autograd
    through it gives the gradients w.r.t. x, weight and bias."""
    levels = _level_structure(in_ptr, in_src, n_inputs)
    dev, B = x.device, x.shape[0]
    n = in_ptr.numel() - 1
    w = weight.to(torch.float32)
    b = bias.to(torch.float32)
    code = act_code.to(dev, torch.int64)
    lo, hi = act_lo.to(dev, torch.float32), act_hi.to(dev, torch.float32)
    # values of the neurons computed so far, gathered through a position map (no in-place writes)
    pos = torch.full((n,), -1, dtype=torch.int64, device=dev)
    pos[:n_inputs] = torch.arange(n_inputs, device=dev)
    vals = x.to(torch.float32).t()
    count = n_inputs
    for neurons, edges, srcs, local in levels:
        neurons, edges, srcs, local = (t.to(dev) for t in (neurons, edges, srcs, local))
        contrib = vals[pos[srcs]] * w[edges][:, None]
        z = b[neurons][:, None].expand(-1, B).index_add(0, local, contrib)
        vals = torch.cat([vals, _apply_codes(z, code[neurons], lo[neurons], hi[neurons])])
        pos[neurons] = torch.arange(count, count + neurons.numel(), device=dev)
        count += neurons.numel()
    return vals[pos[outputs.to(dev, torch.int64)]].t().to(x.dtype)


def _activation_derivative(z: torch.Tensor, code: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """d act(z) / dz per row of ``z`` ([n, B]) by activation code (the derivatives PyTorch's autograd
    uses for Activation.apply: clamp passes the gradient on [lo, hi])."""
    d = torch.ones_like(z)
    for k, kind in enumerate(acts.KINDS):
        sel = code == k
        if kind == "identity" or not bool(sel.any()):
            continue
        if kind == "relu":
            dk = (z > 0).to(z.dtype)
        elif kind == "hardtanh":
            dk = ((z >= lo[:, None]) & (z <= hi[:, None])).to(z.dtype)
        elif kind == "gelu":
            dk = 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
        elif kind == "gelu_tanh":
            c = 0.7978845608028654
            t = torch.tanh(c * (z + 0.044715 * z ** 3))
            dk = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
        elif kind == "tanh":
            dk = 1 - torch.tanh(z) ** 2
        else:  # sigmoid
            sg = torch.sigmoid(z)
            dk = sg * (1 - sg)
        d = torch.where(sel[:, None], dk, d)
    return d


def reference_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       in_ptr: torch.Tensor, in_src: torch.Tensor, act_code: torch.Tensor, act_lo: torch.Tensor,
                       act_hi: torch.Tensor, outputs: torch.Tensor, n_inputs: int):
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`reference_forward`, computed explicitly
    (no autograd: it runs inside a dispatcher kernel, below the autograd key) in float32 on x's device:
    recompute the pre-activations level by level, then walk the levels backwards (transposed DAG)."""
    levels = _level_structure(in_ptr, in_src, n_inputs)
    dev, B = x.device, x.shape[0]
    n = in_ptr.numel() - 1
    w = weight.to(torch.float32)
    b = bias.to(torch.float32)
    code = act_code.to(dev, torch.int64)
    lo, hi = act_lo.to(dev, torch.float32), act_hi.to(dev, torch.float32)
    vals = torch.zeros(n, B, dtype=torch.float32, device=dev)
    vals[:n_inputs] = x.to(torch.float32).t()
    pre = []
    for neurons, edges, srcs, local in levels:
        neurons, edges, srcs, local = (t.to(dev) for t in (neurons, edges, srcs, local))
        z = b[neurons][:, None].expand(-1, B).index_add(0, local, vals[srcs] * w[edges][:, None])
        pre.append(z)
        vals[neurons] = _apply_codes(z, code[neurons], lo[neurons], hi[neurons])
    g = torch.zeros(n, B, dtype=torch.float32, device=dev)
    g.index_add_(0, outputs.to(dev, torch.int64), grad_y.to(torch.float32).t())
    gw = torch.zeros(weight.numel(), dtype=torch.float32, device=dev)
    gb = torch.zeros(n, dtype=torch.float32, device=dev)
    for (neurons, edges, srcs, local), z in zip(reversed(levels), reversed(pre)):
        neurons, edges, srcs, local = (t.to(dev) for t in (neurons, edges, srcs, local))
        gz = g[neurons] * _activation_derivative(z, code[neurons], lo[neurons], hi[neurons])
        gb[neurons] = gz.sum(1)
        gze = gz[local]
        gw[edges] = (gze * vals[srcs]).sum(1)
        g.index_add_(0, srcs, gze * w[edges][:, None])
    return g[:n_inputs].t().to(x.dtype), gw.to(weight.dtype), gb.to(bias.dtype)


# ---------------------------------------------------------------------------------------------- op adapter
# Positions in the op's ``Tensor[] net`` and ``int[] config`` (kernels/cpu/dag_kernel.cpp, ops.NET_KEYS and
# ops.CONFIG_KEYS; checked against ops.py by the tests).
NET_IN_PTR, NET_IN_SRC, NET_ACT_CODE, NET_ACT_PARAM, NET_OUTPUTS = 0, 1, 2, 3, 4
NET_PROG_NEURON, NET_PROG_OP_PTR, NET_PROG_OPS, NET_PROG_OUTPUT_ROWS = 7, 8, 9, 10
CFG_N_INPUTS, CFG_N_NEURONS, CFG_N_OUTPUTS, CFG_MEMORY, CFG_N_SLOW = 0, 1, 2, 3, 4

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


def triton_forward_from_buffers(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                net: Sequence[torch.Tensor], config: Sequence[int]) -> torch.Tensor:
    """The CUDA kernel of ``iosparse::dag_forward``: the Triton launcher on the op's arguments.

    float32 / float16 / bfloat16 inputs run the Triton kernel (float32 accumulation); float64 (which
    the kernel does not support) runs :func:`reference_forward` on the device. Also callable on CPU
    tensors under TRITON_INTERPRET=1 (that is how the tests exercise it)."""
    if x.dtype == torch.float64:
        return reference_forward(x, weight, bias, net[NET_IN_PTR], net[NET_IN_SRC], net[NET_ACT_CODE],
                                 net[NET_ACT_PARAM][:, 0], net[NET_ACT_PARAM][:, 1], net[NET_OUTPUTS],
                                 int(config[CFG_N_INPUTS]))
    kp = kernel_program_from_buffers(net, config)
    return tk.forward(x, weight, bias, kp)


def reference_backward_from_buffers(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                    net: Sequence[torch.Tensor], config: Sequence[int]):
    """The CUDA kernel of ``iosparse::dag_backward``: :func:`reference_backward` (PyTorch ops on the
    device, not a Triton kernel)."""
    if grad_y.dim() != 2 or grad_y.shape[0] != x.shape[0] or grad_y.shape[1] != int(config[CFG_N_OUTPUTS]):
        raise ValueError(f"iosparse: grad_output must have shape [{x.shape[0]}, {int(config[CFG_N_OUTPUTS])}], "
                         f"got {list(grad_y.shape)}")
    return reference_backward(grad_y, x, weight, bias, net[NET_IN_PTR], net[NET_IN_SRC], net[NET_ACT_CODE],
                              net[NET_ACT_PARAM][:, 0], net[NET_ACT_PARAM][:, 1], net[NET_OUTPUTS],
                              int(config[CFG_N_INPUTS]))


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
    from . import ops  # noqa: F401  (defines the ops, fake kernels and autograd; loads the native library)
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
