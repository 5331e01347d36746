"""sparsify: swap every pruned ``nn.Linear`` chain of a model for an :class:`IOSparseNetwork`.

A *chain* is a maximal run ``Linear, [activation], Linear, [activation], …`` in the model's dataflow
graph (traced by ``torch.fx``, across module boundaries; :mod:`torch_iosparse.nn.chains`) in which every
Linear is eligible (sparse enough, accepted by ``filter_fn``, weight not shared, no user hooks), every
activation is one the kernels support (ReLU, ReLU6, GELU, Tanh, Sigmoid, Hardtanh, Identity) held by a
module that can be swapped, and no intermediate value has another consumer. Anything else (Dropout,
LayerNorm, LeakyReLU, a dense Linear, a residual use …) is a boundary: it is left in place and ends the
chain. A chain replaces its first Linear; the chain's other modules become
:class:`~torch_iosparse.nn.chains.FusedInto` pass-throughs, so the paths (and state_dict keys) of untouched
modules do not move. Where fx cannot trace a forward, that module's eligible Linear children are
converted one by one (with a warning); an eligible Linear the forward never calls is a chain of one.

A Linear pruned by ``torch.ao.pruning`` (a ``torch.nn.utils.parametrize`` parametrization with a ``mask``
on ``weight``, before ``squash_mask``) counts as pruned through that mask and is converted with its
effective weight. Options: :class:`IOSparseConfig` (or its fields as keywords); ``filter_fn(module, fqn)``
in torchao's order. :func:`torch_iosparse.densify` goes back; :func:`torch_iosparse.save` /
:func:`torch_iosparse.load` keep a sparsified model.

Never touched: subclasses of ``nn.Linear`` (other than parametrized ones), the insides of
``nn.MultiheadAttention`` (they read ``.weight`` directly instead of calling ``forward``), Linears whose
weight a forward reads directly, modules registered under several parents, and already converted
networks — so ``sparsify`` is idempotent.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import sys
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from ..graph import activations as acts
from . import chains as chains_mod
from .chains import Chain, ChainEnd, FusedChain, FusedInto, _parent_and_name, is_linear
from ..graph.dag import prune_mask
from .module import IOSparseNetwork

FilterFn = Callable[[nn.Module, str], bool]  # torchao's order: filter_fn(module, fqn)


@dataclasses.dataclass
class IOSparseConfig:
    """Every option of :func:`sparsify_` / :func:`sparsify` (torchao style: ``sparsify_(model, config)``).

    ``min_sparsity`` and ``verbose`` belong to the model walk; the others are passed to each
    :class:`IOSparseNetwork` (``plan_kwargs``: extra keywords of the planning method, e.g. ``iterations``).
    ``verbose``: True prints each network and a summary (with the layers kept dense); None (default) shows only a
    progress bar over the networks being planned (on a terminal, for more than one); False prints nothing.
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
    verbose: Optional[bool] = None
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


_is_linear = is_linear


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
    """Decides which Linears are eligible and remembers why the others were kept."""

    def __init__(self, model: nn.Module, min_sparsity: float, filter_fn: Optional[FilterFn]):
        if not 0.0 <= min_sparsity <= 1.0:
            raise ValueError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")
        self.min_sparsity = min_sparsity
        self.filter_fn = filter_fn
        # Shared weights / shared modules are left alone: converting one use would silently untie them.
        self.param_uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self.module_uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.skipped: List[Tuple[str, str]] = []
        self._seen: Dict[str, bool] = {}

    def skip(self, name: str, why: str) -> None:
        self.skipped.append((name, why))

    def eligible(self, name: str, m: nn.Module) -> bool:
        if name not in self._seen:
            self._seen[name] = self._eligible(name, m)
        return self._seen[name]

    def _eligible(self, name: str, m: nn.Module) -> bool:
        if not _is_linear(m):
            return False
        w = _weight_param(m)
        if w.is_meta:
            raise ValueError(
                f"{name or 'the model'} has its weights on the meta device: sparsify reads the weights (the zeros "
                "or prune masks define the network), so the model needs real values. Materialize it first, e.g. "
                "model.to_empty(device='cpu') and load_state_dict(...), or torch_iosparse.load(model, path) "
                "for a checkpoint written by torch_iosparse.save")
        if self.param_uses[id(w)] > 1 or self.module_uses[id(m)] > 1:
            self.skip(name, "shared weight or module")
            return False
        if m.in_features == 0 or m.out_features == 0:  # nothing to compute (IOSparseNetwork rejects it)
            self.skip(name, f"zero-width layer ({m.in_features} -> {m.out_features})")
            return False
        if _has_user_hooks(m):
            self.skip(name, "has forward hooks")
            return False
        s = linear_sparsity(m)
        if s < self.min_sparsity:
            self.skip(name, f"sparsity {s:.1%} < min_sparsity {self.min_sparsity:.1%}")
            return False
        if self.filter_fn is not None and not self._accepts(m, name):
            self.skip(name, "rejected by filter_fn")
            return False
        return True

    def _accepts(self, m: nn.Module, name: str) -> bool:
        try:
            ok = self.filter_fn(m, name)
        except (TypeError, AttributeError) as e:  # e.g. string methods called on the module
            raise ValueError(_filter_order_message(
                self.filter_fn, f"raised {type(e).__name__}: {e} when called as filter_fn(module, {name!r})")) from e
        return bool(ok)


def _discover(model: nn.Module, min_sparsity: float, filter_fn: Optional[FilterFn]):
    if filter_fn is not None:
        _check_filter_signature(filter_fn)
    scan = _Scan(model, min_sparsity, filter_fn)
    found, notes = chains_mod.discover(model, scan)
    return found, list(dict.fromkeys(scan.skipped)), notes


def find_chains(model: nn.Module, *, min_sparsity: float = 0.5, filter_fn: Optional[FilterFn] = None):
    """The chains :func:`sparsify_` would convert (a list of :class:`torch_iosparse.nn.chains.Chain`: members
    and scope) and the Linears it would keep, as ``(fqn, reason)`` pairs."""
    found, skipped, _ = _discover(model, min_sparsity, filter_fn)
    return found, skipped


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


def _layer_name(m: nn.Module) -> str:
    """``Linear(in_features=…, …)`` (parametrized layers print as the Linear they compute)."""
    name = "Linear" if _is_linear(m) else type(m).__name__
    return f"{name}({m.extra_repr()})"


def _config_record(cfg: IOSparseConfig) -> Dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _apply(model: nn.Module, chain: Chain, cfg: IOSparseConfig) -> IOSparseNetwork:
    """Build the network of ``chain`` and install it with its pass-throughs and run-time checks."""
    mods = []
    for m in chain.members:
        mod = model.get_submodule(m.path)
        mods.append(mod if m.kind == "linear" else m.activation.to_module())
    head_parent, head_name = _parent_and_name(model, chain.head)
    net = _convert(mods, cfg, head_parent)
    linears = [(x.in_features, x.out_features, x.bias is not None) for x in mods if _is_linear(x)]
    record = FusedChain(chain.head, linears, len(chain.members) - 1, _config_record(cfg))
    net.sparsify_record = record  # a plain attribute: no state-dict entry
    if record.n_passthroughs:
        net.register_forward_hook(record)
    setattr(head_parent, head_name, net)
    n_linear = 0
    for pos, m in enumerate(chain.members[1:]):
        parent, name = _parent_and_name(model, m.path)
        old = getattr(parent, name)
        if m.kind == "linear":
            n_linear += 1
            fused = FusedInto(record, pos, _layer_name(old), linear_index=n_linear)
        else:
            fused = FusedInto(record, pos, _layer_name(old), original=old)
        fused.train(old.training)
        setattr(parent, name, fused)
    if record.n_passthroughs:
        model.get_submodule(chain.scope).register_forward_hook(ChainEnd(record, chain.scope))
    return net


def _progress(items: List, cfg: IOSparseConfig):
    """tqdm over the networks being planned: on a terminal, for more than one network, unless verbose=False."""
    show = cfg.verbose is not False and len(items) > 1 and sys.stderr.isatty()
    if not show:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc="sparsify: planning", unit="network", leave=False)


def _old_parameters(model: nn.Module, chains: List[Chain]) -> Dict[int, str]:
    out = {}
    for c in chains:
        for m in c.members:
            for pname, p in model.get_submodule(m.path).named_parameters():
                out[id(p)] = f"{m.path}.{pname}"
    return out


def _warn_stale_optimizers(old: Dict[int, str]) -> None:
    """Warn about live optimizers that hold parameters sparsify_ just replaced: they would go on updating
    tensors the model no longer uses."""
    if not old:
        return
    gc.collect()
    stale = []
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.optim.Optimizer):  # type(): no __class__ lookups on lazy proxies
            held = [old[id(p)] for g in obj.param_groups for p in g["params"] if id(p) in old]
            if held:
                stale.append((obj, held))
    for opt, held in stale:
        warnings.warn(
            f"{type(opt).__name__} optimizer holds {len(held)} parameter(s) of layers that sparsify_ replaced "
            f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): it would train tensors the model no longer "
            "uses. Create the optimizer after sparsify_ (torch.optim.X(model.parameters(), ...))", stacklevel=3)


def sparsify_(model: nn.Module, config: Optional[IOSparseConfig] = None, filter_fn: Optional[FilterFn] = None,
              **kwargs) -> nn.Module:
    """Convert ``model`` in place (see the module docstring) and return it.

    Args:
        config: an :class:`IOSparseConfig` (torchao convention); or give its fields as keywords
            (``sparsify_(m, memory=64)`` is ``sparsify_(m, config=IOSparseConfig(memory=64))``; unknown
            keywords go to the planner through ``plan_kwargs``). Both at once must agree.
        filter_fn: ``filter_fn(module, fqn) -> bool`` (torchao's order) to choose layers by name or shape.
            A filter in the old ``(fqn, module)`` order is rejected with a ValueError.

    An optimizer made before ``sparsify_`` still holds the replaced layers' parameters: a warning names it;
    create optimizers afterwards.
    """
    return _sparsify_in_place(model, _resolve_config(config, kwargs), filter_fn, fresh_copy=False)


def _sparsify_in_place(model: nn.Module, cfg: IOSparseConfig, filter_fn: Optional[FilterFn],
                       fresh_copy: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, IOSparseNetwork):
        return model
    if _is_linear(model):  # a bare Linear has no parent to swap it in
        raise TypeError("sparsify_ cannot replace the root module in place; use sparsify(linear) or "
                        "IOSparseNetwork(linear)")
    chains, skipped, notes = _discover(model, cfg.min_sparsity, filter_fn)
    if notes:
        warnings.warn("sparsify: " + "; ".join(notes), stacklevel=3)
    old = {} if fresh_copy else _old_parameters(model, chains)
    for chain in _progress(chains, cfg):
        net = _apply(model, chain, cfg)
        if cfg.verbose:
            print(f"sparsify: {chain.describe()} -> {net.extra_repr()}")
    if cfg.verbose:
        for note in notes:
            print(f"sparsify: note: {note}")
        _print_report(model, skipped)  # the layers kept dense are folded into the report
    _warn_stale_optimizers(old)
    return model


def _print_report(model: nn.Module, skipped=None) -> None:
    from ..tools.explain import sparsify_report
    print(sparsify_report(model, skipped=skipped))


def sparsify(model: nn.Module, config: Optional[IOSparseConfig] = None, filter_fn: Optional[FilterFn] = None,
             **kwargs) -> nn.Module:
    """A converted copy of ``model`` (the original is untouched); same arguments as :func:`sparsify_`.
    A bare ``nn.Linear`` goes through the same checks (min_sparsity, filter_fn with fqn ``""``, shared
    weights, hooks) and options (strategy, verbose, …) as the layers of a model."""
    cfg = _resolve_config(config, kwargs)
    if _is_linear(model):
        if filter_fn is not None:
            _check_filter_signature(filter_fn)
        scan = _Scan(model, cfg.min_sparsity, filter_fn)
        if not scan.eligible("", model):
            if cfg.verbose:
                for name, why in scan.skipped:
                    print(f"sparsify: kept {name or '(root)'} ({why})")
            return _deepcopy(model)
        copied = _deepcopy(model)
        net = _convert([copied], cfg, None)
        net.sparsify_record = FusedChain("", [(copied.in_features, copied.out_features, copied.bias is not None)],
                                         0, _config_record(cfg))
        if cfg.verbose:
            print(f"sparsify: (root) -> {net.extra_repr()}")
        return net
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify takes an nn.Module, got {type(model).__name__}")
    return _sparsify_in_place(_deepcopy(model), cfg, filter_fn, fresh_copy=True)


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
