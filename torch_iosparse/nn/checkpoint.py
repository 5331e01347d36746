"""The way back from a sparsified model, and checkpoints that rebuild one.

- :func:`densify` returns the model as it was before :func:`~torch_iosparse.sparsify`: every network built
  by sparsify becomes the ``nn.Linear`` layers it replaced (with the network's current weights and the
  pruned weights as zeros), every :class:`~torch_iosparse.nn.chains.FusedInto` the activation it stood for,
  so the state-dict keys are the original architecture's (a pruned or torch.ao-parametrized layer comes
  back as a plain Linear: ``weight``, not ``weight_orig`` / ``weight_mask``).
- :func:`save` writes the sparse state dict together with the network boundaries (which module paths
  each network replaced) and the sparsify options; :func:`load` rebuilds the same networks in a freshly
  built model of the original architecture (a factory or an instance) and loads the state: no re-planning,
  no pruning of the fresh model needed. Files are written atomically and read with
  ``torch.load(weights_only=True)``.

A Hugging Face model round-trips through its own format densely: ``densify(model).save_pretrained(dir)``,
then ``sparsify(AutoModel.from_pretrained(dir), config)`` (the zeros define the same networks; plans come
from the plan cache).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .chains import ChainEnd, FusedChain, FusedInto, _parent_and_name, is_linear
from ..files import atomic_write
from .module import IOSparseNetwork
from .sparsify import _deepcopy

FORMAT = "torch_iosparse.sparse_checkpoint"
VERSION = 1

# IOSparseConfig fields that matter when a network is rebuilt from its state (the plan is in the state)
_REBUILD_OPTIONS = ("strategy", "batch_tile", "cache", "cache_dir", "tune")


class CheckpointError(ValueError):
    """A file that is not a torch_iosparse checkpoint, or one that does not fit the model."""


# ---------------------------------------------------------------------- finding what sparsify built
def _networks(model: nn.Module):
    """``(path, network)`` of every IOSparseNetwork, ``(path, FusedInto)`` of every pass-through, and the
    ``(module, hook id, ChainEnd)`` of every chain-end hook."""
    nets, fused, ends = [], [], []
    for path, m in model.named_modules():
        if isinstance(m, IOSparseNetwork):
            nets.append((path, m))
        elif isinstance(m, FusedInto):
            fused.append((path, m))
        for hid, hook in list(m._forward_hooks.items()):
            if isinstance(hook, ChainEnd):
                ends.append((path, m, hid, hook))
    return nets, fused, ends


def _dense_linears(net: IOSparseNetwork, record: Optional[FusedChain], path: str) -> List[nn.Linear]:
    """The network's layers as ``nn.Linear`` modules shaped like the layers it replaced."""
    layers = [m for m in net.to_dense() if isinstance(m, nn.Linear)]
    specs = record.linears if record is not None else [(x.in_features, x.out_features, True) for x in layers]
    if len(specs) != len(layers):
        raise ValueError(f"the IOSparseNetwork at {path or '(root)'} has {len(layers)} layers but replaced "
                         f"{len(specs)} Linear layers")
    out = []
    for k, ((n_in, n_out, has_bias), dense) in enumerate(zip(specs, layers)):
        if (dense.in_features, dense.out_features) != (n_in, n_out):
            raise ValueError(f"layer {k} of the IOSparseNetwork at {path or '(root)'} is {dense.in_features} -> "
                             f"{dense.out_features}, but the Linear it replaced was {n_in} -> {n_out}")
        w = dense.weight
        lin = nn.Linear(n_in, n_out, bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if has_bias and dense.bias is not None:
                lin.bias.copy_(dense.bias)
            elif has_bias:
                lin.bias.zero_()
            elif dense.bias is not None and bool(dense.bias.any()):
                raise ValueError(
                    f"layer {k} of the IOSparseNetwork at {path or '(root)'} has nonzero biases, but the Linear it "
                    "replaced had bias=False (the biases of a chain that mixes layers with and without bias were "
                    "trained): densify cannot return that layer without changing the architecture; sparsify with "
                    "IOSparseConfig(train_bias=False) to keep such biases at zero")
        lin.weight.requires_grad_(net.weight.requires_grad)
        if lin.bias is not None:
            lin.bias.requires_grad_(net.weight.requires_grad)
        lin.train(net.training)
        out.append(lin)
    return out


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every network that sparsify built turned back into the layers it replaced
    (see the module docstring); the original is untouched. An IOSparseNetwork that sparsify did not build
    (``IOSparseNetwork(dag)`` placed by hand) becomes its dense twin (``to_dense()``: a Linear, or a
    Sequential of Linears and activations); a general DAG network (no layers) is an error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify takes an nn.Module, got {type(model).__name__}")
    model = _deepcopy(model)
    nets, fused, ends = _networks(model)
    by_chain: Dict[int, List[nn.Linear]] = {}
    replacements = []  # (path, module); the root last
    for path, net in nets:
        record = getattr(net, "sparsify_record", None)
        if record is None:
            dense = net.to_dense()
            layers = [m for m in dense if isinstance(m, nn.Linear)]
            replacements.append((path, layers[0] if len(dense) == 1 else dense))
            continue
        linears = _dense_linears(net, record, path)
        by_chain[id(record)] = linears
        replacements.append((path, linears[0]))
    for path, f in fused:
        linears = by_chain.get(id(f.chain))
        if linears is None:
            raise ValueError(f"{path} is a FusedInto of the network {f.chain.name!r}, which is not in this model")
        replacements.append((path, linears[f.linear_index] if f.linear_index is not None else f.original))
    for _, m, hid, _ in ends:
        del m._forward_hooks[hid]
    root = model
    for path, new in replacements:
        if path == "":
            root = new
        else:
            parent, name = _parent_and_name(model, path)
            setattr(parent, name, new)
    return root


# ---------------------------------------------------------------------- save / load
def _plain_config(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The options as values torch.load(weights_only=True) reads back (a dtype as its name)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, torch.dtype):
            v = str(v)
        elif k == "plan_kwargs":
            v = _plain_config(v, where)
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            raise TypeError(f"cannot save the sparsify option {k}={v!r} of the network at {where}: "
                            "only None, bool, int, float, str and dtypes are stored")
        out[k] = v
    return out


def _describe(model: nn.Module) -> List[Dict[str, Any]]:
    nets, fused, ends = _networks(model)
    members: Dict[int, List] = {}
    for path, f in fused:
        members.setdefault(id(f.chain), []).append((f.position, path, f))
    scopes = {id(hook.chain): path for path, _, _, hook in ends}
    out = []
    for path, net in nets:
        record = getattr(net, "sparsify_record", None)
        entry: Dict[str, Any] = {
            "path": path, "train_bias": isinstance(net.bias, nn.Parameter),
            "requires_grad": bool(net.weight.requires_grad),
        }
        if record is not None:
            entry["linears"] = [list(x) for x in record.linears]
            entry["name"] = record.name
            entry["config"] = _plain_config(record.config, path or "(root)")
            entry["members"] = [{"path": p, "kind": "linear" if f.linear_index is not None else "activation",
                                 "was": f.was} for _, p, f in sorted(members.get(id(record), []),
                                                                     key=lambda t: t[0])]
            entry["scope"] = scopes.get(id(record))
        out.append(entry)
    return out


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model``'s state dict with the networks' boundaries and sparsify options to ``path``
    (atomically); :func:`load` rebuilds the model from a freshly built one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save takes an nn.Module, got {type(model).__name__}")
    payload = {"format": FORMAT, "version": VERSION, "networks": _describe(model),
               "state_dict": dict(model.state_dict())}
    atomic_write(path, lambda f: torch.save(payload, f))


def _read(path) -> Dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable torch_iosparse checkpoint: torch.load("
                              f"weights_only=True) fails ({type(e).__name__}: {first[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a torch_iosparse checkpoint (no {FORMAT!r} marker); a plain state dict "
            "loads with model.load_state_dict(torch.load(path, weights_only=True))")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{os.fspath(path)!r} is a torch_iosparse checkpoint of version "
                              f"{payload.get('version')!r}; this version reads version {VERSION}")
    nets, state = payload.get("networks"), payload.get("state_dict")
    if not isinstance(nets, list) or not all(isinstance(n, dict) and isinstance(n.get("path"), str) for n in nets) \
            or not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{os.fspath(path)!r} is a corrupt torch_iosparse checkpoint (networks or state dict "
                              "malformed)")
    return payload


def _rebuild_options(config: Optional[Dict[str, Any]], entry: Dict[str, Any]) -> Dict[str, Any]:
    kw = {k: config[k] for k in _REBUILD_OPTIONS if config and k in config}
    kw["train_bias"] = bool(entry.get("train_bias", True))
    return kw


def _check_slot(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise CheckpointError(f"the checkpoint has {what} at {path!r}, but the model has no module there: "
                              "load needs a model of the architecture that was saved") from None


def load(model_or_factory: Union[nn.Module, Callable[[], nn.Module]], path: Union[str, os.PathLike], *,
         strict: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save`: ``model_or_factory`` is an instance of the original
    (un-sparsified) architecture or a callable that builds one; its Linear layers at the recorded paths are
    replaced by the saved networks (structure, plan and weights from the file), the fused layers by
    pass-throughs, and then the whole state dict is loaded (``strict`` as in ``load_state_dict``).
    Returns the model (the root itself is replaced when the saved model was a single network)."""
    payload = _read(path)
    model = model_or_factory() if callable(model_or_factory) and not isinstance(model_or_factory, nn.Module) \
        else model_or_factory
    if not isinstance(model, nn.Module):
        raise TypeError(f"load takes an nn.Module or a callable that returns one, got {type(model).__name__}")
    state = payload["state_dict"]
    root = model
    for entry in payload["networks"]:
        p = entry["path"]
        old = _check_slot(model, p, "a network")
        linears = entry.get("linears")
        if linears is not None and not isinstance(old, IOSparseNetwork):
            n_in, n_out, has_bias = linears[0]
            if not is_linear(old) or (old.in_features, old.out_features, old.bias is not None) != (n_in, n_out, has_bias):
                raise CheckpointError(f"the checkpoint's network at {p or '(root)'} replaced a Linear({n_in}, {n_out}, "
                                      f"bias={has_bias}); the model has {old!r} there")
        prefix = p + "." if p else ""
        try:
            net = IOSparseNetwork.from_state_dict(state, prefix, **_rebuild_options(entry.get("config"), entry))
        except Exception as e:
            raise CheckpointError(f"the checkpoint's network at {p or '(root)'} cannot be rebuilt "
                                  f"({type(e).__name__}: {e})") from None
        ref = next(iter(old.parameters()), None)
        if ref is not None:
            net = net.to(device=ref.device)
        net.requires_grad_(bool(entry.get("requires_grad", True)))
        net.train(old.training)
        if linears is not None:
            members = entry.get("members") or []
            config = entry.get("config") or {}
            record = FusedChain(entry.get("name", p), linears, len(members), config)
            net.sparsify_record = record
            if members:
                net.register_forward_hook(record)
            n_linear = 0
            for pos, mem in enumerate(members):
                mp = mem["path"]
                cur = _check_slot(model, mp, "a fused layer")
                if mem["kind"] == "linear":
                    n_linear += 1
                    n_in, n_out, has_bias = linears[n_linear]
                    if not isinstance(cur, FusedInto) and (not is_linear(cur) or (cur.in_features, cur.out_features)
                                                           != (n_in, n_out)):
                        raise CheckpointError(f"the checkpoint fused a Linear({n_in}, {n_out}) at {mp}; the model "
                                              f"has {cur!r} there")
                    fused = FusedInto(record, pos, mem.get("was", "Linear"), linear_index=n_linear)
                else:
                    original = cur.original if isinstance(cur, FusedInto) else cur
                    fused = FusedInto(record, pos, mem.get("was", type(cur).__name__), original=original)
                fused.train(cur.training)
                parent, name = _parent_and_name(model, mp)
                setattr(parent, name, fused)
            if members:
                scope = entry.get("scope") or ""
                _check_slot(model, scope, "a chain scope").register_forward_hook(ChainEnd(record, scope))
        if p == "":
            root = net
        else:
            parent, name = _parent_and_name(model, p)
            setattr(parent, name, net)
    result = root.load_state_dict(state, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        import warnings
        warnings.warn(f"load: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}",
                      stacklevel=2)
    return root
