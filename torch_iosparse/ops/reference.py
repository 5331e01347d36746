"""Pure-PyTorch reference kernels of ``iosparse::dag_forward`` and ``iosparse::dag_backward``: the one
reference of the op (the oracle the C++ and Triton kernels are tested against, the kernel of every device
without its own, and what the CUDA backend runs for its backward and for float64)."""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..abi import ActCode, NetIndex
from ..graph import activations

def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32 (more exact, and torch's sparse CSR kernels lack them on CPU)."""
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


# Below this many multiply-adds per level (edges x batch) a gather + index_add beats building a CSR matrix
# (tensor construction and library-call overhead dominate small levels).
SPARSE_MM_MIN_WORK = 1 << 18


def _use_sparse_mm(edges: int, batch: int) -> bool:
    return edges * batch >= SPARSE_MM_MIN_WORK


def _per_code(fn, z: torch.Tensor, code: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``fn(code, rows of z, lo, hi)`` (activations.forward or .gradient) for every activation code present,
    rows of ``z`` [k, B] grouped by their code [k]; (lo, hi) per row from ``param`` [k, 2]."""
    out = torch.empty_like(z)
    for c in torch.unique(code).tolist():
        if not 0 <= c < len(ActCode):
            raise ValueError(f"iosparse: network buffers are corrupt or belong to another network (unknown "
                             f"activation code {c}; codes are 0..{len(ActCode) - 1})")
        rows = (code == c).nonzero(as_tuple=True)[0]
        p = param[rows].to(z.dtype)
        out[rows] = fn(c, z[rows], p[:, :1], p[:, 1:])
    return out


def _act_apply(z: torch.Tensor, code: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Activation per row of ``z`` [k, B] with per-row code [k] and (lo, hi) [k, 2] (activations.forward)."""
    return _per_code(activations.forward, z, code, param)


def _act_grad(z: torch.Tensor, code: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """d act / d z per row of ``z`` (activations.gradient)."""
    return _per_code(activations.gradient, z, code, param)


def _level_edges(in_ptr: torch.Tensor, in_src: torch.Tensor, neurons: torch.Tensor, n: int):
    """The in-edges of a level's ``neurons``: (edge ids, local row of their target, source neuron), sorted
    by (row, source) so that they are also the CSR layout of the level's [len(neurons), n] weight matrix."""
    starts, ends = in_ptr[neurons], in_ptr[neurons + 1]
    counts = ends - starts
    local = torch.repeat_interleave(torch.arange(neurons.numel(), device=neurons.device), counts)
    offs = torch.cumsum(counts, 0) - counts
    edges = torch.repeat_interleave(starts - offs, counts) + torch.arange(int(counts.sum()), device=neurons.device)
    src = in_src[edges].to(torch.int64)
    order = torch.argsort(local * n + src)  # sorted columns inside each row (local is already sorted)
    crow = torch.zeros(neurons.numel() + 1, dtype=torch.int64, device=neurons.device)
    crow[1:] = torch.cumsum(counts, 0)
    return edges[order], local, src[order], crow


def _level_matrix(crow: torch.Tensor, src: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """A level's weights as a CSR matrix [its neurons, all n neurons] (built valid by _level_edges)."""
    return torch.sparse_csr_tensor(crow, src, values, size=(crow.numel() - 1, n), check_invariants=False)


_LEVEL_CACHE: "WeakIdKeyDictionary" = None  # level_neuron tensor -> (key, per-level index tensors)


def _levels_of(net: Sequence[torch.Tensor], n: int):
    """Per level: (neurons, edges, local, src, crow) index tensors on the buffers' device. Cached per
    ``level_neuron`` buffer (weakly; rebuilt when a structure buffer was replaced or written in place), so
    training steps on a device without a kernel (and the CUDA backward) do not rebuild them."""
    global _LEVEL_CACHE
    from torch.utils.weak import WeakIdKeyDictionary
    if _LEVEL_CACHE is None:
        _LEVEL_CACHE = WeakIdKeyDictionary()
    in_ptr, in_src = net[NetIndex.IN_PTR], net[NetIndex.IN_SRC]
    level_ptr, level_neuron = net[NetIndex.LEVEL_PTR], net[NetIndex.LEVEL_NEURON]
    try:
        key = tuple((t.data_ptr(), t._version) for t in (in_ptr, in_src, level_ptr, level_neuron)) + (n,)
    except RuntimeError:  # inference tensors have no version counter: do not cache
        key = None
    hit = _LEVEL_CACHE.get(level_neuron) if key is not None else None
    if hit is not None and hit[0] == key:
        return hit[1]
    lp = level_ptr.tolist()
    levels = []
    for l in range(len(lp) - 1):
        neurons = level_neuron[lp[l]:lp[l + 1]].clone()  # not a view: the cache must not keep its key alive
        levels.append((neurons, *_level_edges(in_ptr, in_src, neurons, n)))
    if key is not None:
        _LEVEL_CACHE[level_neuron] = (key, levels)
    return levels


def _reference_levels(x, weight, bias, net: Sequence[torch.Tensor], config: Sequence[int], keep_pre: bool,
                      differentiable: bool = False):
    """Forward level by level in the compute dtype: (values [n, B], pre-activations or None, per-level
    index tensors, w, compute dtype). Big levels run as one CSR matmul, small ones as gathers;
    ``differentiable``: gathers only (ops that autograd differentiates twice), for double backward."""
    n_in, n = config[0], config[1]
    act_code, act_param = net[NetIndex.ACT_CODE], net[NetIndex.ACT_PARAM]
    B = x.shape[0]
    cdt = _compute_dtype(x.dtype)
    w, b = weight.to(cdt), bias.to(cdt)
    vals = torch.zeros(n, B, dtype=cdt, device=x.device)
    pre = torch.zeros(n, B, dtype=cdt, device=x.device) if keep_pre else None
    vals[:n_in] = x.t().to(cdt)
    per_level = _levels_of(net, n)
    for neurons, edges, local, src, crow in per_level:
        acc = b[neurons].unsqueeze(1).expand(-1, B).clone()
        if edges.numel() and not differentiable and _use_sparse_mm(edges.numel(), B):
            acc += torch.sparse.mm(_level_matrix(crow, src, w[edges], n), vals)
        elif edges.numel():
            acc = acc.index_add(0, local, vals[src] * w[edges].unsqueeze(1))
        if keep_pre:
            pre[neurons] = acc
        vals[neurons] = _act_apply(acc, act_code[neurons], act_param.view(-1, 2)[neurons])
    return vals, pre, per_level, w, cdt


def reference_forward(x, weight, bias, net: List[torch.Tensor], config: List[int]) -> torch.Tensor:
    """Pure-PyTorch kernel of ``iosparse::dag_forward`` (level by level; float16/bfloat16 accumulate in
    float32); any device."""
    vals, _, _, _, _ = _reference_levels(x, weight, bias, net, config, keep_pre=False)
    return vals[net[NetIndex.OUTPUTS]].t().to(x.dtype).contiguous()


def differentiable_backward(grad_y, x, weight, bias, net: List[torch.Tensor], config: List[int]):
    """(grad_x, grad_weight, grad_bias) as a graph autograd can differentiate again (double backward:
    gradient penalties, Hessian-vector products): the reference forward rebuilt from differentiable
    gathers, then torch.autograd.grad with create_graph=True. A gradient is None where its input does not
    require one."""
    with torch.enable_grad():
        inputs = [t for t in (x, weight, bias) if t.requires_grad]
        if not inputs:
            return None, None, None
        vals, _, _, _, _ = _reference_levels(x, weight, bias, net, config, keep_pre=False, differentiable=True)
        y = vals[net[NetIndex.OUTPUTS]].t().to(x.dtype)
        grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True, allow_unused=True))
        return tuple(next(grads) if t.requires_grad else None for t in (x, weight, bias))


def reference_backward(grad_y, x, weight, bias, net: List[torch.Tensor], config: List[int]):
    """Pure-PyTorch kernel of ``iosparse::dag_backward``: (grad_x, grad_weight, grad_bias), computed
    explicitly (it runs below the autograd key): recompute the pre-activations, then walk the transposed
    DAG level by level (W^T g for the values, a sampled product g x^T for the weights)."""
    n_in, n = config[0], config[1]
    vals, pre, per_level, w, cdt = _reference_levels(x, weight, bias, net, config, keep_pre=True)
    act_code, act_param = net[NetIndex.ACT_CODE], net[NetIndex.ACT_PARAM].view(-1, 2)
    outputs = net[NetIndex.OUTPUTS]
    B = x.shape[0]
    G = torch.zeros_like(vals)
    G.index_add_(0, outputs, grad_y.t().to(cdt))
    gw = torch.zeros(weight.shape, dtype=cdt, device=x.device)
    gb = torch.zeros(bias.shape, dtype=cdt, device=x.device)
    for neurons, edges, local, src, crow in reversed(per_level):
        dz = G[neurons] * _act_grad(pre[neurons], act_code[neurons], act_param[neurons])
        gb[neurons] = dz.sum(1)
        if edges.numel() and _use_sparse_mm(edges.numel(), B):
            G += torch.sparse.mm(_level_matrix(crow, src, w[edges], n).t(), dz)
            pattern = _level_matrix(crow, src, torch.ones_like(w[edges]), n)
            gw[edges] = torch.sparse.sampled_addmm(pattern, dz, vals.t(), beta=0.0).values()
        elif edges.numel():
            gw[edges] = (dz[local] * vals[src]).sum(1)
            G.index_add_(0, src, w[edges].unsqueeze(1) * dz[local])
    return G[:n_in].t().to(x.dtype).contiguous(), gw.to(weight.dtype), gb.to(bias.dtype)

