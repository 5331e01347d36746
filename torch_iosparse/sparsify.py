"""sparsify: swap every pruned ``nn.Linear`` chain of a model for an :class:`IOSparseNetwork`.

A *chain* is a maximal run ``Linear, [activation], Linear, [activation], …`` of consecutive children of
an ``nn.Sequential`` in which every Linear is eligible (sparse enough, accepted by ``filter_fn``, weight
not shared, no user hooks) and every activation is one the kernels support (ReLU, ReLU6, GELU, Tanh,
Sigmoid, Hardtanh, Identity). Anything else (Dropout, LayerNorm, LeakyReLU, a dense Linear …) is a
boundary: it is left in place and ends the chain. A chain replaces its first module; the other modules
of the chain become ``nn.Identity`` so the indices (and state_dict keys) of untouched siblings do not
move. An eligible ``nn.Linear`` that is a plain attribute of any other module (e.g. ``linear1`` of
``nn.TransformerEncoderLayer``) is a chain of one.

Never touched: subclasses of ``nn.Linear`` and the insides of ``nn.MultiheadAttention`` (they read
``.weight`` directly instead of calling ``forward``), modules registered under several parents, and
already converted networks — so ``sparsify`` is idempotent.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

from . import activations as acts
from .module import IOSparseNetwork

FilterFn = Callable[[str, nn.Linear], bool]


def linear_sparsity(lin: nn.Linear) -> float:
    """Fraction of weights that are pruned: masked out by ``torch.nn.utils.prune``, else exactly zero."""
    mask = getattr(lin, "weight_mask", None)
    pattern = (mask != 0) if mask is not None else (lin.weight != 0)
    return 1.0 - float(pattern.sum()) / max(1, pattern.numel())


def _has_user_hooks(m: nn.Module) -> bool:
    pre = [h for h in m._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
    return bool(pre or m._forward_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None))


def _is_activation(m: nn.Module) -> bool:
    return acts.from_module(m) is not None


class _Scan:
    def __init__(self, model: nn.Module, min_sparsity: float, filter_fn: Optional[FilterFn]):
        if not 0.0 <= min_sparsity <= 1.0:
            raise ValueError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")
        self.min_sparsity = min_sparsity
        self.filter_fn = filter_fn
        # Shared weights / shared modules are left alone: converting one use would silently untie them.
        self.param_uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self.module_uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.skipped: List[Tuple[str, str]] = []

    def eligible(self, name: str, m: nn.Module) -> bool:
        if type(m) is not nn.Linear:
            return False
        w = getattr(m, "weight_orig", m.weight)
        if self.param_uses[id(w)] > 1 or self.module_uses[id(m)] > 1:
            self.skipped.append((name, "shared weight or module"))
            return False
        if m.in_features == 0 or m.out_features == 0:  # nothing to compute (IOSparseNetwork rejects it)
            self.skipped.append((name, f"zero-width layer ({m.in_features} -> {m.out_features})"))
            return False
        if _has_user_hooks(m):
            self.skipped.append((name, "has forward hooks"))
            return False
        s = linear_sparsity(m)
        if s < self.min_sparsity:
            self.skipped.append((name, f"sparsity {s:.1%} < min_sparsity {self.min_sparsity:.1%}"))
            return False
        if self.filter_fn is not None and not self.filter_fn(name, m):
            self.skipped.append((name, "rejected by filter_fn"))
            return False
        return True


def find_chains(model: nn.Module, *, min_sparsity: float = 0.5, filter_fn: Optional[FilterFn] = None):
    """The chains :func:`sparsify_` would convert: a list of ``(parent, parent_name, [child names])``."""
    scan = _Scan(model, min_sparsity, filter_fn)
    chains = _find(model, "", scan)
    return chains, list(dict.fromkeys(scan.skipped))


def _find(parent: nn.Module, prefix: str, scan: _Scan):
    out = []
    if isinstance(parent, (IOSparseNetwork, nn.MultiheadAttention)):
        return out
    children = list(parent.named_children())
    full = lambda n: f"{prefix}.{n}" if prefix else n  # noqa: E731
    # Chains only inside a Sequential that runs its children in order (a subclass may override forward).
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        i = 0
        while i < len(children):
            name, m = children[i]
            if not scan.eligible(full(name), m):
                i += 1
                continue
            chain = [name]
            j = i + 1
            activated = False  # the last Linear of the chain already has its (non-identity) activation
            while j < len(children):
                nm, mm = children[j]
                if _is_activation(mm):  # stateless: sharing an activation module is harmless
                    nontrivial = acts.from_module(mm).kind != "identity"
                    # one activation per Linear (Identity modules between do not count): a second one
                    # ends the chain after the first
                    if nontrivial and activated:
                        break
                    activated = activated or nontrivial
                    chain.append(nm)
                    j += 1
                elif scan.eligible(full(nm), mm):
                    chain.append(nm)
                    activated = False
                    j += 1
                else:
                    break
            # trailing Identity modules add nothing; keep them out of the chain
            while len(chain) > 1 and isinstance(dict(children)[chain[-1]], nn.Identity):
                chain.pop()
                j -= 1
            out.append((parent, prefix, chain))
            i = j
        in_chain = {n for p, _, names in out if p is parent for n in names}
        for name, m in children:
            if name not in in_chain and type(m) is not nn.Linear:
                out.extend(_find(m, full(name), scan))
        return out
    for name, m in children:
        if type(m) is nn.Linear:
            if scan.eligible(full(name), m):
                out.append((parent, prefix, [name]))
        else:
            out.extend(_find(m, full(name), scan))
    return out


def _keep_off_transformer_fastpath(module, args):
    return None


def sparsify_(model: nn.Module, *, min_sparsity: float = 0.5, filter_fn: Optional[FilterFn] = None,
              memory="auto", method: str = "two_optimal", verbose: bool = False, **network_kwargs) -> nn.Module:
    """Convert ``model`` in place (see the module docstring) and return it.

    Args:
        min_sparsity: a Linear is converted only if at least this fraction of its weights is pruned.
        filter_fn: ``filter_fn(qualified_name, linear) -> bool`` to choose layers by name or shape.
        memory, method, **network_kwargs: passed to each :class:`IOSparseNetwork`.
        verbose: print what was converted and what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, IOSparseNetwork):
        return model
    chains, skipped = find_chains(model, min_sparsity=min_sparsity, filter_fn=filter_fn)
    if type(model) is nn.Linear:  # a bare Linear has no parent to swap it in
        raise TypeError("sparsify_ cannot replace the root module in place; use sparsify(linear) or "
                        "IOSparseNetwork(linear)")
    for parent, prefix, names in chains:
        mods = [getattr(parent, n) for n in names]
        ref = getattr(mods[0], "weight_orig", mods[0].weight)  # a pruned layer's weight is derived
        net = IOSparseNetwork(nn.Sequential(*mods), memory=memory, method=method, **network_kwargs)
        net = net.to(device=ref.device)
        net.requires_grad_(ref.requires_grad)
        net.train(mods[0].training)
        if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            # Their inference fast path reads linear1/linear2.weight as dense matrices; any forward
            # hook inside the layer turns that path off, so the converted layers are called instead.
            net.register_forward_pre_hook(_keep_off_transformer_fastpath)
        setattr(parent, names[0], net)
        for n in names[1:]:
            setattr(parent, n, nn.Identity())
        if verbose:
            where = ".".join(filter(None, [prefix, "[" + ",".join(names) + "]"]))
            print(f"sparsify: {where} -> {net.extra_repr()}")
    if verbose:
        for name, why in skipped:
            print(f"sparsify: kept {name} ({why})")
    return model


def sparsify(model: nn.Module, **kwargs) -> nn.Module:
    """A converted copy of ``model`` (the original is untouched); same arguments as :func:`sparsify_`."""
    if type(model) is nn.Linear:
        kw = {k: v for k, v in kwargs.items() if k in ("memory", "method")}
        if linear_sparsity(model) < kwargs.get("min_sparsity", 0.5):
            return _deepcopy(model)
        return IOSparseNetwork(model, **kw)
    return sparsify_(_deepcopy(model), **kwargs)


def _deepcopy(model: nn.Module) -> nn.Module:
    # Pruned layers keep ``weight = weight_orig * weight_mask`` as a non-leaf tensor attribute, which
    # deepcopy refuses; the prune hook recomputes it on the next forward, so a detached copy is exact.
    # Copied outside inference mode (and without autograd): under torch.inference_mode() the copies would
    # be inference tensors, so the converted copy could not be trained or updated in place afterwards,
    # unlike the model it was made from (IOSparseNetwork makes its own tensors the same way).
    with torch.inference_mode(False), torch.no_grad():
        memo = {}
        for m in model.modules():
            for v in vars(m).values():
                if isinstance(v, torch.Tensor) and not v.is_leaf:
                    memo[id(v)] = v.detach().clone()
        return copy.deepcopy(model, memo)
