"""sparsify: swap every pruned ``nn.Linear`` chain of a model for an :class:`IOSparseNetwork`.

A *chain* is a maximal run ``Linear, [activation], Linear, [activation], …`` of consecutive children of
an ``nn.Sequential`` in which every Linear is eligible (sparse enough, accepted by ``filter_fn``, weight
not shared, no user hooks) and every activation is one the kernels support (ReLU, ReLU6, GELU, Tanh,
Sigmoid, Hardtanh, Identity). Anything else (Dropout, LayerNorm, LeakyReLU, a dense Linear …) is a
boundary: it is left in place and ends the chain. A chain replaces its first module; the other modules
of the chain become ``nn.Identity`` so the indices (and state_dict keys) of untouched siblings do not
move. An eligible ``nn.Linear`` that is a plain attribute of any other module (e.g. ``linear1`` of
``nn.TransformerEncoderLayer``) is a chain of one.

A Linear pruned by ``torch.ao.pruning`` (a ``torch.nn.utils.parametrize`` parametrization with a ``mask``
on ``weight``, before ``squash_mask``) counts as pruned through that mask and is converted with its
effective weight. Options: :class:`IOSparseConfig` (or its fields as keywords); ``filter_fn(module, fqn)``
in torchao's order.

Never touched: subclasses of ``nn.Linear`` (other than parametrized ones) and the insides of ``nn.MultiheadAttention`` (they read
``.weight`` directly instead of calling ``forward``), modules registered under several parents, and
already converted networks — so ``sparsify`` is idempotent.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from . import activations as acts
from .dag import prune_mask
from .module import IOSparseNetwork

FilterFn = Callable[[nn.Module, str], bool]  # torchao's order: filter_fn(module, fqn)


@dataclasses.dataclass
class IOSparseConfig:
    """Every option of :func:`sparsify_` / :func:`sparsify` (torchao style: ``sparsify_(model, config)``).

    ``min_sparsity`` and ``verbose`` belong to the model walk; the others are passed to each
    :class:`IOSparseNetwork` (``plan_kwargs``: extra keywords of the planning method, e.g. ``iterations``).
    """
    memory: Any = "auto"
    method: str = "two_optimal"
    strategy: str = "auto"
    batch_tile: Optional[int] = None
    cache: bool = True
    cache_dir: Optional[str] = None
    tune: Optional[bool] = None
    seed: int = 0
    time_budget: Optional[float] = None
    train_bias: Optional[bool] = None
    dtype: Optional[torch.dtype] = None
    min_sparsity: float = 0.5
    verbose: bool = False
    plan_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def network_kwargs(self) -> Dict[str, Any]:
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in ("min_sparsity", "verbose", "plan_kwargs")}
        kw.update(self.plan_kwargs)
        return kw


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(IOSparseConfig)} - {"plan_kwargs"}


def _resolve_config(config: Optional[IOSparseConfig], kwargs: Dict[str, Any]) -> IOSparseConfig:
    """``config`` or the keywords (sugar: ``sparsify_(m, memory=64) == sparsify_(m, IOSparseConfig(memory=64))``);
    a keyword that disagrees with a given config is an error."""
    if config is None:
        known = {k: v for k, v in kwargs.items() if k in _CONFIG_FIELDS}
        extra = {k: v for k, v in kwargs.items() if k not in _CONFIG_FIELDS}
        return IOSparseConfig(**known, plan_kwargs=extra)
    if not isinstance(config, IOSparseConfig):
        raise TypeError(f"config must be an IOSparseConfig, got {type(config).__name__}")
    conflicts = []
    for k, v in kwargs.items():
        have = getattr(config, k) if k in _CONFIG_FIELDS else config.plan_kwargs.get(k, _MISSING)
        if have is _MISSING or not _same(have, v):
            conflicts.append(f"{k}={v!r} (config has {'nothing' if have is _MISSING else repr(have)})")
    if conflicts:
        raise ValueError("pass the options either in config=IOSparseConfig(...) or as keywords, not both: "
                         + ", ".join(conflicts) + "; use dataclasses.replace(config, ...) to change a config")
    return config


_MISSING = object()


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors
        return a is b


_NAME_PARAMS = {"name", "fqn", "qualified_name", "qualname", "path", "key", "prefix", "n", "nm", "s"}
_MODULE_PARAMS = {"module", "mod", "m", "lin", "linear", "layer", "submodule", "l"}


def _filter_order_message(filter_fn, why: str) -> str:
    return (f"filter_fn {getattr(filter_fn, '__qualname__', filter_fn)!r} {why}. filter_fn is called as "
            "filter_fn(module, fqn) -> bool (torchao's order, module first, then its qualified name); "
            "a filter written for the old order (fqn, module) must swap its parameters, e.g. "
            "lambda module, fqn: fqn != 'head'")


def _check_filter_signature(filter_fn) -> None:
    try:
        params = [p for p in inspect.signature(filter_fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # builtins, some callables: no signature
        return
    if len(params) >= 2:
        first, second = params[0].name.lower(), params[1].name.lower()
        if first in _NAME_PARAMS or second in _MODULE_PARAMS:
            raise ValueError(_filter_order_message(
                filter_fn, f"takes its parameters as ({params[0].name}, {params[1].name}), which looks like "
                           "the old (fqn, module) order"))


def _is_linear(m: nn.Module) -> bool:
    """A plain ``nn.Linear``, or one whose parameters are parametrized (``torch.nn.utils.parametrize``,
    e.g. torch.ao.pruning's FakeSparsity mask): parametrize swaps the class for a direct subclass."""
    t = type(m)
    if t is nn.Linear:
        return True
    return parametrize.is_parametrized(m) and t.__bases__ == (nn.Linear,)


def _weight_param(m: nn.Linear) -> torch.Tensor:
    """The leaf tensor behind a (pruned or parametrized) layer's weight."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return getattr(m, "weight_orig", m.weight)


def linear_sparsity(lin: nn.Linear) -> float:
    """Fraction of weights that are pruned: masked out by ``torch.nn.utils.prune`` (or by a parametrization
    with a ``mask``, as torch.ao.pruning's FakeSparsity), else exactly zero."""
    mask = prune_mask(lin)
    with torch.no_grad():
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
        if not _is_linear(m):
            return False
        w = _weight_param(m)
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
        if self.filter_fn is not None and not self._accepts(m, name):
            self.skipped.append((name, "rejected by filter_fn"))
            return False
        return True

    def _accepts(self, m: nn.Module, name: str) -> bool:
        try:
            ok = self.filter_fn(m, name)
        except (TypeError, AttributeError) as e:  # e.g. string methods called on the module
            raise ValueError(_filter_order_message(
                self.filter_fn, f"raised {type(e).__name__}: {e} when called as filter_fn(module, {name!r})")) from e
        return bool(ok)


def find_chains(model: nn.Module, *, min_sparsity: float = 0.5, filter_fn: Optional[FilterFn] = None):
    """The chains :func:`sparsify_` would convert: a list of ``(parent, parent_name, [child names])``."""
    if filter_fn is not None:
        _check_filter_signature(filter_fn)
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
            if name not in in_chain and not _is_linear(m):
                out.extend(_find(m, full(name), scan))
        return out
    for name, m in children:
        if _is_linear(m):
            if scan.eligible(full(name), m):
                out.append((parent, prefix, [name]))
        else:
            out.extend(_find(m, full(name), scan))
    return out


def _keep_off_transformer_fastpath(module, args):
    return None


def _convert(mods: List[nn.Module], cfg: IOSparseConfig, parent: Optional[nn.Module]) -> IOSparseNetwork:
    """One IOSparseNetwork for a chain of modules, on the first layer's device, in its training mode."""
    ref = _weight_param(mods[0])  # a pruned or parametrized layer's weight is derived
    src = mods[0] if len(mods) == 1 else nn.Sequential(*mods)
    net = IOSparseNetwork(src, **cfg.network_kwargs())
    net = net.to(device=ref.device)
    net.requires_grad_(ref.requires_grad)
    net.train(mods[0].training)
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        # Their inference fast path reads linear1/linear2.weight as dense matrices; any forward
        # hook inside the layer turns that path off, so the converted layers are called instead.
        net.register_forward_pre_hook(_keep_off_transformer_fastpath)
    return net


def sparsify_(model: nn.Module, config: Optional[IOSparseConfig] = None, filter_fn: Optional[FilterFn] = None,
              **kwargs) -> nn.Module:
    """Convert ``model`` in place (see the module docstring) and return it.

    Args:
        config: an :class:`IOSparseConfig` (torchao convention); or give its fields as keywords
            (``sparsify_(m, memory=64)`` is ``sparsify_(m, config=IOSparseConfig(memory=64))``; unknown
            keywords go to the planner through ``plan_kwargs``). Both at once must agree.
        filter_fn: ``filter_fn(module, fqn) -> bool`` (torchao's order) to choose layers by name or shape.
            A filter in the old ``(fqn, module)`` order is rejected with a ValueError.
    """
    cfg = _resolve_config(config, kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, IOSparseNetwork):
        return model
    if _is_linear(model):  # a bare Linear has no parent to swap it in
        raise TypeError("sparsify_ cannot replace the root module in place; use sparsify(linear) or "
                        "IOSparseNetwork(linear)")
    chains, skipped = find_chains(model, min_sparsity=cfg.min_sparsity, filter_fn=filter_fn)
    for parent, prefix, names in chains:
        mods = [getattr(parent, n) for n in names]
        net = _convert(mods, cfg, parent)
        setattr(parent, names[0], net)
        for n in names[1:]:
            setattr(parent, n, nn.Identity())
        if cfg.verbose:
            where = ".".join(filter(None, [prefix, "[" + ",".join(names) + "]"]))
            print(f"sparsify: {where} -> {net.extra_repr()}")
    if cfg.verbose:
        for name, why in skipped:
            print(f"sparsify: kept {name} ({why})")
    return model


def sparsify(model: nn.Module, config: Optional[IOSparseConfig] = None, filter_fn: Optional[FilterFn] = None,
             **kwargs) -> nn.Module:
    """A converted copy of ``model`` (the original is untouched); same arguments as :func:`sparsify_`.
    A bare ``nn.Linear`` goes through the same checks (min_sparsity, filter_fn with fqn ``""``, shared
    weights, hooks) and options (strategy, verbose, …) as the layers of a model."""
    cfg = _resolve_config(config, kwargs)
    if _is_linear(model):
        if filter_fn is not None:
            _check_filter_signature(filter_fn)
        copied = _deepcopy(model)
        scan = _Scan(copied, cfg.min_sparsity, filter_fn)
        if not scan.eligible("", copied):
            if cfg.verbose:
                for name, why in scan.skipped:
                    print(f"sparsify: kept {name or '(root)'} ({why})")
            return copied
        net = _convert([copied], cfg, None)
        if cfg.verbose:
            print(f"sparsify: (root) -> {net.extra_repr()}")
        return net
    return sparsify_(_deepcopy(model), cfg, filter_fn)


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
