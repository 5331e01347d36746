"""The differentiable op: ``ops.dag_forward(x, weight, bias, net.buffers, net.meta)`` evaluates a network
prepared by :func:`torch_iosparse.compile.prepare.prepare`. See docs/program-format.md ("The op") and
docs/cpu-kernel.md.

The op is ``torch.ops.iosparse.dag_forward(x, weight, bias, net: Tensor[], config: int[])`` with a C++
CPU kernel (kernels/cpu/), a fake kernel (torch.compile / export), autograd through
``torch.ops.iosparse.dag_backward`` and pure-PyTorch reference kernels for every other device
(``CompositeExplicitAutograd``, :mod:`torch_iosparse.ops.reference`): a GPU backend overrides them with
``torch.library.register_kernel("iosparse::dag_forward", "cuda", fn)``.
"""
from __future__ import annotations

from typing import Dict, Union

import torch

from .. import _native
from ..abi import NET_KEYS, NetIndex
from ..compile.prepare import _op_args
from .reference import _reference_levels, differentiable_backward, reference_backward, reference_forward


def dag_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, buffers: Dict[str, torch.Tensor],
                meta: Dict[str, Union[int, float]]) -> torch.Tensor:
    """Evaluate the prepared network: ``x`` [B, n_inputs] -> [B, n_outputs] (differentiable w.r.t. x,
    weight (edge weights in dag in-edge order) and bias (one per neuron)). Any float dtype: float16 and
    bfloat16 on CPU are computed in float32 and the result cast back."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    net, config = _op_args(buffers, meta)
    _check_same_device(x, weight, bias, net[:1])  # all buffers move together: the first stands for them
    _native.ops()
    if x.device.type == "cpu" and x.dtype in _CPU_UPCAST:
        # The C++ CPU kernel takes float32/float64: run float16/bfloat16 in float32 and cast back (plain
        # differentiable casts, so torch.compile(fullgraph=True) and export see no graph break).
        if weight.dtype != x.dtype or bias.dtype != x.dtype:  # the same rule as the kernel's, before casting
            raise TypeError(f"iosparse: weight ({weight.dtype}) and bias ({bias.dtype}) must have the input's "
                            f"dtype {x.dtype}")
        y = torch.ops.iosparse.dag_forward(x.float(), weight.float(), bias.float(), net, config)
        return y.to(x.dtype)
    if _functorch_active():
        return _DagForwardFunction.apply(x, weight, bias, tuple(config), *net)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)) \
            and not torch.compiler.is_compiling():
        # No graph to record: dispatch below autograd, skipping the Python autograd kernel that
        # torch.library.register_autograd runs on every call (~20 us, a tenth of a small network's call).
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.iosparse.dag_forward(x, weight, bias, net, config)
    return torch.ops.iosparse.dag_forward(x, weight, bias, net, config)


_CPU_UPCAST = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------- autograd, torch.func, autocast
def _backward_of(grad_y, x, weight, bias, net, config):
    """The op's backward: the native kernel, or, while a graph of the gradients is being recorded
    (``create_graph=True``: double backward), the differentiable reference."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, weight, bias)):
        return differentiable_backward(grad_y, x, weight, bias, net, config)
    return torch.ops.iosparse.dag_backward(grad_y.contiguous(), x, weight, bias, net, config)


def _functorch_active() -> bool:
    # Not while torch.compile / export traces: dynamo wraps the interpreter-stack query in a grad-mode
    # region (the op would then sit inside a wrap_with_set_grad_enabled submodule of the exported graph).
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


class _DagForwardFunction(torch.autograd.Function):
    """The op as an autograd.Function, used only under torch.func transforms (grad, jacrev, vjp, ...):
    PyTorch's autograd registration of custom ops lacks the setup_context those transforms require
    (pytorch/pytorch#168393). The forward and backward are the same as the op's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, config, *net):
        return torch.ops.iosparse.dag_forward(x, weight, bias, list(net), list(config))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, config, *net = inputs
        ctx.save_for_backward(x, weight, bias, *net)
        ctx.config = list(config)

    @staticmethod
    def backward(ctx, grad_y):
        # The transforms track requires_grad at their own levels, so every gradient is computed here, by
        # _DagBackwardFunction (the native kernel; differentiable again for nested grad / jacrev).
        x, weight, bias, *net = ctx.saved_tensors
        gx, gw, gb = _DagBackwardFunction.apply(grad_y.contiguous(), x, weight, bias, tuple(ctx.config), *net)
        return (gx, gw, gb, None) + (None,) * len(net)


class _DagBackwardFunction(torch.autograd.Function):
    """``iosparse::dag_backward`` under torch.func transforms, differentiable once more: nested transforms
    (``grad(grad(f))``, ``jacrev(jacrev(f))``, Hessians) differentiate the backward through the
    differentiable reference (:func:`differentiable_backward`). A third derivative raises instead of
    returning a wrong value (:class:`_NoThirdDerivative`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, x, weight, bias, config, *net):
        return torch.ops.iosparse.dag_backward(grad_y, x, weight, bias, list(net), list(config))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, weight, bias, config, *net = inputs
        ctx.save_for_backward(grad_y, x, weight, bias, *net)
        ctx.config = list(config)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        grad_y, x, weight, bias, *net = ctx.saved_tensors
        config = ctx.config

        def forward(x_, w_, b_):
            vals = _reference_levels(x_, w_, b_, net, config, keep_pre=False, differentiable=True)[0]
            return vals[net[NetIndex.OUTPUTS]].t().to(x_.dtype)

        def backward(gy_, x_, w_, b_):
            return torch.func.vjp(forward, x_, w_, b_)[1](gy_)

        # Inside a transform, gradients are taken with torch.func (requires_grad_ is not available there).
        _, vjp = torch.func.vjp(backward, *_NoThirdDerivative.apply(grad_y, x, weight, bias))
        cotangents = tuple(torch.zeros_like(t) if g is None else g for g, t in zip((ggx, ggw, ggb), (x, weight, bias)))
        return (*vjp(cotangents), None) + (None,) * len(net)


class _NoThirdDerivative(torch.autograd.Function):
    """Identity whose derivative raises: marks the inputs of the op's second derivative, so that a third
    derivative through the op is an error instead of a wrong value."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("iosparse: derivatives of third or higher order through the op are not "
                                  "supported (first and second order are)")


def _in_dim(d, i=None):
    """The batch dim of argument d (element i of a Tensor[] argument)."""
    if isinstance(d, (list, tuple)):
        return d[i] if i is not None and i < len(d) else None
    return d


def _vmap_forward(info, in_dims, x, weight, bias, net, config):
    """vmap of dag_forward. Batched inputs only (the common case): one call on the batches stacked along
    the batch dimension. Batched weights or biases (model ensembles): one call per vmapped element.
    Batched network buffers would be different networks: a clear error."""
    xd, wd, bd, nd = in_dims[0], in_dims[1], in_dims[2], in_dims[3]
    if any(_in_dim(nd, i) is not None for i in range(len(net))):
        raise ValueError("iosparse: vmap over the network buffers is not supported (each vmapped element "
                         "would be another network); vmap over inputs, weights or biases instead")
    if wd is None and bd is None:
        xs = x.movedim(xd, 0)
        V, B = xs.shape[0], xs.shape[1]
        y = torch.ops.iosparse.dag_forward(xs.reshape(V * B, xs.shape[2]), weight, bias, net, config)
        return y.reshape(V, B, y.shape[-1]), 0
    return _vmap_loop(1)(info, in_dims, x, weight, bias, net, config)


def _vmap_loop(n_outputs: int):
    """A vmap rule that calls the op once per vmapped element (any batched tensor argument)."""

    def rule(info, in_dims, *args):
        op = torch.ops.iosparse.dag_forward if n_outputs == 1 else torch.ops.iosparse.dag_backward

        def pick(a, d, i):
            if isinstance(a, (list, tuple)):
                return [pick(t, _in_dim(d, k), i) for k, t in enumerate(a)]
            return a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a

        outs = [op(*(pick(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        if n_outputs == 1:
            return torch.stack(outs), 0
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * n_outputs
    return rule


def _autocast_forward(device: str):
    """Under torch.autocast the op behaves like nn.Linear: inputs, weights and biases cast to the autocast
    dtype, the sums accumulated in float32 (the CPU kernel computes float16 / bfloat16 in float32), the
    result in the autocast dtype; autocast itself is off inside (the dense path's GEMM must not re-cast)."""

    def kernel(x, weight, bias, net, config):
        dt = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            if x.is_floating_point() and x.device.type == device:
                x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
            if x.device.type == "cpu" and x.dtype in _CPU_UPCAST:
                return torch.ops.iosparse.dag_forward(x.float(), weight.float(), bias.float(), net, config).to(x.dtype)
            return torch.ops.iosparse.dag_forward(x, weight, bias, net, config)
    return kernel


# ---------------------------------------------------------------------- registration
_registered = False


def _check_same_device(x, weight, bias, net, *more) -> None:
    """The dispatcher picks the kernel from every tensor argument: one buffer on ``meta`` sends a CPU call to
    the fake kernel, which would return uninitialised memory. The fake kernel therefore accepts a call only
    when every tensor is on the input's device (all on ``meta``, or all fake tensors of one device).
    :func:`dag_forward` checks the same before dispatching, for the weight, the bias and the first buffer."""
    for name, t in (("weight", weight), ("bias", bias), *(("grad_output", g) for g in more),
                    *((f"network buffer {NET_KEYS[i] if i < len(NET_KEYS) else i}", b) for i, b in enumerate(net))):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"iosparse: input is on device {x.device} but {name} is on {t.device}; move the "
                             "network (module.to(device)) or the input")


def _register():
    global _registered
    if _registered:
        return
    _native.ops()  # defines the schemas (C++)

    @torch.library.register_fake("iosparse::dag_forward")
    def _fake_forward(x, weight, bias, net, config):
        _check_same_device(x, weight, bias, net)
        torch._check(x.dim() == 2, lambda: f"iosparse: input must be 2-D [batch, n_inputs], got {x.dim()}-D")
        return x.new_empty((x.shape[0], config[2]))

    @torch.library.register_fake("iosparse::dag_backward")
    def _fake_backward(grad_y, x, weight, bias, net, config):
        _check_same_device(x, weight, bias, net, grad_y)
        return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
                torch.empty_like(bias))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, net, config = inputs
        ctx.save_for_backward(x, weight, bias, *net)
        ctx.config = config

    def _backward(ctx, grad_y):
        x, weight, bias, *net = ctx.saved_tensors
        gx, gw, gb = _backward_of(grad_y, x, weight, bias, net, ctx.config)
        return gx, gw, gb, [None] * len(net), None

    torch.library.register_autograd("iosparse::dag_forward", _backward, setup_context=_setup_context)
    torch.library.register_vmap("iosparse::dag_forward", _vmap_forward)
    torch.library.register_vmap("iosparse::dag_backward", _vmap_loop(3))
    for device in ("cpu", "cuda"):
        torch.library.impl("iosparse::dag_forward", "Autocast" + device.upper(), _autocast_forward(device))

    # Every device without its own kernel runs the pure-PyTorch reference (a GPU backend replaces it with
    # torch.library.register_kernel("iosparse::dag_forward", "cuda", fn)).
    global _lib
    _lib = torch.library.Library("iosparse", "FRAGMENT")
    _lib.impl("dag_forward", reference_forward, "CompositeExplicitAutograd")
    _lib.impl("dag_backward", reference_backward, "CompositeExplicitAutograd")
    _registered = True


_lib = None
_register()
