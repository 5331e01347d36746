"""chains: find a model's pruned ``Linear(+activation)`` chains in its dataflow graph, and the modules that
stand in for the layers a fused chain absorbed.

Discovery (:func:`discover`) traces the model with ``torch.fx`` (a symbolic trace that records every
``nn.Linear`` call and every activation, across module boundaries) and collects maximal chains
``Linear, [activation], Linear, [activation], …`` in which

- every Linear is eligible (sparse enough, accepted by ``filter_fn``, weight not shared, no user hooks)
  and called once per forward;
- every activation is one the kernels support (:mod:`torch_iosparse.graph.activations`) *and can be removed by
  swapping a module*: a call of an activation module (``nn.GELU``, ``nn.ReLU`` …), or a module whose whole
  forward is one supported activation function (Hugging Face's ``intermediate_act_fn``, a
  ``GELUActivation`` that calls ``F.gelu``). A functional call in a parent's forward
  (``F.gelu(self.fc1(x))``) cannot be removed without rewriting that forward: the chain ends before it;
- every intermediate value has no other consumer (a residual branch, a second use, a reshape between two
  layers ends the chain).

A chain's first Linear becomes the :class:`~torch_iosparse.IOSparseNetwork` that computes the whole chain;
the chain's other modules become :class:`FusedInto` pass-throughs (they return their input and name the
network that does their work). The model stays the user's ``nn.Module`` tree: nothing else changes.

Because the fused network runs where the first Linear ran, the model must route data between the chain's
members as it did when traced. A :class:`FusedChain` checks this at run time (in eager mode): every
pass-through must receive exactly the tensor the network returned, and the module whose forward holds the
whole chain (its *scope*) must not return before all pass-throughs ran; anything else raises instead of
computing a wrong result (e.g. a forward whose control flow depends on a flag changed after sparsify).
Tracing is done in training and in eval mode and only chains found in both are fused.

Tracing falls back per module: a submodule whose forward fx cannot trace (data-dependent control flow,
unsupported Python) is kept opaque and searched on its own; a module whose own forward cannot be traced is
searched by the module walk (each eligible Linear child a network of its own, other children searched
recursively), and :func:`discover` returns a note saying so. Skip edges (a residual ``x + f(x)``) are not
fused: the network would have to output the skip input as well, and the following non-linear op
(LayerNorm, …) is not something the kernels compute.
"""
from __future__ import annotations

import dataclasses
import threading
import warnings
from collections import Counter
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..graph import activations as acts
from ..graph.activations import Activation
from .module import IOSparseNetwork


def is_linear(m: nn.Module) -> bool:
    """A plain ``nn.Linear``, or one whose parameters are parametrized (``torch.nn.utils.parametrize``,
    e.g. torch.ao.pruning's FakeSparsity mask): parametrize swaps the class for a direct subclass."""
    t = type(m)
    if t is nn.Linear:
        return True
    return parametrize.is_parametrized(m) and t.__bases__ == (nn.Linear,)


def _runs_children_in_order(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _parent_and_name(model: nn.Module, path: str) -> Tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return model.get_submodule(parent), name


# ---------------------------------------------------------------------- run-time record and pass-throughs
def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.jit.is_tracing()


class FusedChain:
    """What one fused chain replaced, shared by its network (a forward hook that notes the network's
    output), its :class:`FusedInto` pass-throughs and its scope's :class:`ChainEnd` hook.

    ``linears``: ``(in_features, out_features, bias)`` of each Linear, in order (for :func:`densify`);
    ``config``: the sparsify options the network was built with (for :func:`torch_iosparse.save`);
    ``name``: the network's qualified name when it was built. The run-time state is per thread and is
    neither copied nor pickled."""

    def __init__(self, name: str, linears: List[Tuple[int, int, bool]], n_passthroughs: int, config: Dict):
        self.name = name
        self.linears = [tuple(x) for x in linears]
        self.n_passthroughs = n_passthroughs
        self.config = dict(config)
        self._state = threading.local()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_state"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state = threading.local()

    # forward hook of the network
    def __call__(self, module, args, output):
        if self.n_passthroughs and not _is_tracing():
            self._state.expected = output
            self._state.position = 0

    def visit(self, position: int, x, who: str) -> None:
        """Called by pass-through ``position`` with its input ``x``."""
        if _is_tracing():
            return
        st = self._state
        expected = getattr(st, "expected", None)
        if expected is None or st.position != position or x is not expected:
            st.expected = None
            raise RuntimeError(
                f"{who} is fused into the IOSparseNetwork {self.name!r}, which computed its work already; it must "
                "receive that network's output directly, but "
                + ("the network did not run first" if expected is None else
                   "it was called out of order" if st.position != position else
                   "it received another tensor")
                + ". The model routes data differently from when sparsify traced it (a flag or an argument that "
                "changes the forward's control flow?); sparsify it in the configuration it runs in, or exclude "
                "these layers with filter_fn")
        st.position += 1
        if st.position == self.n_passthroughs:
            st.expected = None

    def end(self, scope_name: str) -> None:
        if _is_tracing():
            return
        if getattr(self._state, "expected", None) is not None:
            self._state.expected = None
            raise RuntimeError(
                f"{scope_name or 'the model'} returned before the layers fused into the IOSparseNetwork {self.name!r} "
                "ran: the network's output (the whole chain's) would have been used in place of its first layer's. "
                "The model routes data differently from when sparsify traced it; sparsify it in the configuration "
                "it runs in, or exclude these layers with filter_fn")


class ChainEnd:
    """Forward hook on the module whose forward holds a whole fused chain: checks that the chain completed."""

    def __init__(self, chain: FusedChain, scope_name: str):
        self.chain = chain
        self.scope_name = scope_name

    def __call__(self, module, args, output):
        self.chain.end(self.scope_name)


class FusedInto(nn.Identity):
    """Stands where a layer of a fused chain was: returns its input unchanged, because the IOSparseNetwork
    named in its repr computes this layer's work. It has no state; ``torch_iosparse.densify`` puts the
    original layer back (``original`` for an activation; a Linear rebuilt from the network's weights).

    Calling it with anything but that network's output raises (see :class:`FusedChain`)."""

    def __init__(self, chain: FusedChain, position: int, was: str, original: Optional[nn.Module] = None,
                 linear_index: Optional[int] = None):
        super().__init__()
        self.chain = chain
        self.position = position
        self.was = was
        self.linear_index = linear_index
        self.__dict__["_original"] = original  # not a submodule: no state-dict entries, not in the tree

    @property
    def original(self) -> Optional[nn.Module]:
        return self.__dict__["_original"]

    def forward(self, input, *args, **kwargs):
        self.chain.visit(self.position, input, f"{self.was} (now FusedInto)")
        return input

    def extra_repr(self) -> str:
        return f"{self.chain.name!r}, was {self.was}"

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile a sparsified model: {self.was} is fused into the IOSparseNetwork "
            f"{self.chain.name!r}, whose kernel is a custom op with a Python dispatcher. Use torch.compile or "
            "torch.export, or torch_iosparse.densify(model) for a dense TorchScript model")


# ---------------------------------------------------------------------- chains
class Member(NamedTuple):
    path: str          # qualified name of the module to replace
    kind: str          # "linear" | "activation"
    activation: Optional[Activation] = None  # for "activation"


@dataclasses.dataclass
class Chain:
    """One network to build: its members in order and its *scope*, the module whose forward holds the whole
    chain (checked at run time when the chain has more than one member)."""
    members: List[Member]
    scope: str = ""

    @property
    def head(self) -> str:
        return self.members[0].path

    @property
    def paths(self) -> Tuple[str, ...]:
        return tuple(m.path for m in self.members)

    def describe(self) -> str:
        """``prefix.[a,b,c]`` with the members' common parent as prefix (``0`` for a chain of one)."""
        parts = [p.split(".") for p in self.paths]
        common: List[str] = []
        for level in zip(*[p[:-1] for p in parts]):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        if len(parts) == 1:
            common = parts[0][:-1]
        rest = [".".join(p[len(common):]) for p in parts]
        return ".".join(common + ["[" + ",".join(rest) + "]"])


# ---------------------------------------------------------------------- functional activations
def _const(v) -> bool:
    return isinstance(v, (bool, int, float, str)) or v is None


def _arg(node: fx.Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _gelu(node):
    approx = _arg(node, 1, "approximate", "none")
    return Activation("gelu_tanh" if approx == "tanh" else "gelu") if approx in ("none", "tanh") else None


def _hardtanh(node):
    lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi:
        return Activation("hardtanh", float(lo), float(hi))
    return None


def _clamp(node):
    lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi:
        return Activation("hardtanh", float(lo), float(hi))
    return None


_FUNCTIONS = {
    torch.relu: lambda n: Activation("relu"), F.relu: lambda n: Activation("relu"),
    torch.tanh: lambda n: Activation("tanh"), F.tanh: lambda n: Activation("tanh"),
    torch.sigmoid: lambda n: Activation("sigmoid"), F.sigmoid: lambda n: Activation("sigmoid"),
    F.gelu: _gelu, F.hardtanh: _hardtanh, F.relu6: lambda n: Activation("hardtanh", 0.0, 6.0),
    torch.clamp: _clamp,
}
_METHODS = {"relu": lambda n: Activation("relu"), "tanh": lambda n: Activation("tanh"),
            "sigmoid": lambda n: Activation("sigmoid"), "clamp": _clamp}


def _function_activation(node: fx.Node) -> Optional[Activation]:
    if node.op == "call_function":
        parse = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        parse = _METHODS.get(node.target)
    else:
        return None
    if parse is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if not all(_const(a) for a in node.args[1:]) or not all(_const(v) for v in node.kwargs.values()):
        return None
    return parse(node)


# ---------------------------------------------------------------------- tracing
class _Untraceable(Exception):
    pass


class _Tracer(fx.Tracer):
    """fx tracer that records, besides the graph: how often each module path is called, which modules were
    traced through, the module stack of each node, and the modules whose forward produced exactly one node.
    Modules of the classes in ``opaque`` are leaves; a plain ``nn.Sequential`` is traced slot by slot, so a
    module object registered in two slots gets one path per slot."""

    def __init__(self, paths: Dict[int, str], opaque: Set[type]):
        super().__init__()
        self.paths = paths
        self.opaque = opaque
        self.calls: Counter = Counter()
        self.traced: Set[str] = set()
        self.stack: List[str] = []
        self.scope_of: Dict[fx.Node, Tuple[str, ...]] = {}
        self.single_op: Dict[str, Tuple[fx.Node, tuple, object]] = {}
        self._slot: Optional[Tuple[nn.Module, str]] = None
        self._n_nodes = 0
        self._last: Optional[fx.Node] = None

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        self.scope_of[node] = tuple(self.stack)
        self._n_nodes += 1
        self._last = node
        return node

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return self.paths[id(mod)]
        except KeyError:
            raise NameError(f"{type(mod).__name__} is called in forward but is not a submodule") from None

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        if isinstance(m, (IOSparseNetwork, FusedInto)) or is_linear(m) or acts.from_module(m) is not None:
            return True
        if type(m) in self.opaque:
            return True
        return super().is_leaf_module(m, name)

    def call_module(self, m, forward, args, kwargs):
        if self._slot is not None and self._slot[0] is m:
            path = self._slot[1]
        else:
            path = self.path_of_module(m)
        self._slot = None
        self.calls[path] += 1
        if self.is_leaf_module(m, path):
            return self.create_proxy("call_module", path, args, kwargs)
        self.traced.add(path)
        self.stack.append(path)
        before = self._n_nodes
        try:
            if _runs_children_in_order(m) and len(args) == 1 and not kwargs:
                out = args[0]
                for name, child in m._modules.items():
                    self._slot = (child, _join(path, name))
                    out = child(out)
            else:
                out = forward(*args, **kwargs)
        except Exception as e:
            if not hasattr(e, "_tis_failed_in"):
                try:
                    e._tis_failed_in = type(m)  # the innermost module whose forward failed
                except AttributeError:
                    pass
            raise
        finally:
            self.stack.pop()
            self._slot = None
        if self._n_nodes - before == 1:
            self.single_op[path] = (self._last, args, out)
        return out


class _OneInput(nn.Module):
    """Calls the traced root with one input (its other arguments at their defaults), so that the root goes
    through the tracer's ``call_module``: a plain nn.Sequential is traced slot by slot, and a forward that
    takes ``*args, **kwargs`` (a decorated forward) gets a real argument tuple."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.inner = root

    def forward(self, input):
        return self.inner(input)


def _trace(root: nn.Module) -> _Tracer:
    """Trace ``root`` (quietly); classes whose forward fails are made opaque and the trace repeated. The root
    is traced with all of its arguments symbolic, else (for a plain nn.Sequential, first) with one input and
    the other arguments at their defaults. Raises :class:`_Untraceable` when the root's own forward cannot be
    traced either way."""
    paths = {}
    for name, m in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), name)
    attempts = [_OneInput(root)] if _runs_children_in_order(root) else [root, _OneInput(root)]
    first_error = None
    for target in attempts:
        opaque: Set[type] = set()
        while True:
            tracer = _Tracer(paths, opaque)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tracer.trace(target)
                return tracer
            except Exception as e:  # anything the traced code raises on proxies
                failed = getattr(e, "_tis_failed_in", None)
                if failed is None or failed is type(root) or failed in opaque:
                    first_error = first_error or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    break
                opaque.add(failed)
    raise _Untraceable(first_error)


# ---------------------------------------------------------------------- discovery
def _data_input(node: fx.Node):
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


class _Graph:
    """Chains of one traced region (``root`` at ``prefix``)."""

    def __init__(self, root: nn.Module, prefix: str, tracer: _Tracer, scan):
        self.root, self.prefix, self.t, self.scan = root, prefix, tracer, scan
        self.module_uses = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.read_directly = set()  # Linear paths whose parameters the forward reads (F.linear(x, fc.weight))
        for node in tracer.graph.nodes:
            if node.op == "get_attr":
                target = node.target[len("inner."):] if isinstance(tracer.root, _OneInput) else node.target
                if "." in target:
                    self.read_directly.add(target.rpartition(".")[0])
        self.info: Dict[fx.Node, Tuple[Member, Tuple[str, ...]]] = {}
        for node in tracer.graph.nodes:
            got = self._member(node)
            if got is not None:
                self.info[node] = got

    def full(self, path: str) -> str:
        return _join(self.prefix, path)

    def linear_ok(self, path: str) -> bool:
        if any(r == path or r.startswith(path + ".") for r in self.read_directly):
            self.scan.skip(self.full(path), "its weight is read directly by a forward")
            return False
        return self.scan.eligible(self.full(path), self.root.get_submodule(path))

    def _member(self, node: fx.Node) -> Optional[Tuple[Member, Tuple[str, ...]]]:
        """(member, module stack) when ``node`` can be part of a chain."""
        if node.op == "call_module":
            mod = self.root.get_submodule(node.target)
            x = _data_input(node)
            if not isinstance(x, fx.Node) or len(node.args) + len(node.kwargs) != 1:
                return None
            if is_linear(mod):
                return (Member(node.target, "linear"), self.t.scope_of[node]) if self.linear_ok(node.target) else None
            a = acts.from_module(mod)
            if a is not None and self.t.calls[node.target] == 1:
                return Member(node.target, "activation", a), self.t.scope_of[node]
            return None
        a = _function_activation(node)
        stack = self.t.scope_of.get(node, ())
        if a is None or not stack:
            return None  # a functional call in a parent's forward cannot be removed by swapping a module
        owner = stack[-1]
        single = self.t.single_op.get(owner)
        if single is None or single[0] is not node or self.t.calls[owner] != 1:
            return None
        _, args, out = single
        if not (isinstance(out, fx.Proxy) and out.node is node and len(args) == 1
                and isinstance(args[0], fx.Proxy) and args[0].node is node.args[0]):
            return None
        mod = self.root.get_submodule(owner)
        if self.module_uses[id(mod)] > 1 or any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()) \
                or mod._forward_hooks or mod._forward_pre_hooks:
            return None
        return Member(owner, "activation", a), stack[:-1]

    def chains(self) -> List[Chain]:
        used: Set[fx.Node] = set()
        heads: Set[str] = set()  # a Linear called several times is one network of its own
        out: List[Chain] = []
        for node in self.t.graph.nodes:
            got = self.info.get(node)
            if got is None or node in used or got[0].kind != "linear" or got[0].path in heads:
                continue
            heads.add(got[0].path)
            nodes = [node]
            cur, activated = node, False
            # a chain of more than one member needs each module called exactly once per forward
            if self.t.calls[node.target] == 1:
                while True:
                    users = list(cur.users)
                    if len(users) != 1:
                        break
                    nxt = users[0]
                    got_next = self.info.get(nxt)
                    if got_next is None or nxt in used or _data_input(nxt) is not cur:
                        break
                    m = got_next[0]
                    if m.kind == "activation":
                        nontrivial = m.activation.kind != "identity"
                        if nontrivial and activated:
                            break
                        activated = activated or nontrivial
                    else:
                        if self.t.calls[m.path] != 1 or not self._joins(nodes, nxt):
                            break
                        activated = False
                    nodes.append(nxt)
                    cur = nxt
            while len(nodes) > 1 and self.info[nodes[-1]][0].kind == "activation" and \
                    self.info[nodes[-1]][0].activation.kind == "identity":
                nodes.pop()
            used.update(nodes)
            members = [self.info[n][0] for n in nodes]
            stacks = [self.info[n][1] for n in nodes]
            scope: List[str] = []
            for level in zip(*stacks):
                if len(set(level)) != 1:
                    break
                scope.append(level[0])
            out.append(Chain([m._replace(path=self.full(m.path)) for m in members],
                             self.full(scope[-1]) if scope else self.prefix))
        return out

    def _joins(self, nodes: List[fx.Node], nxt: fx.Node) -> bool:
        """The next Linear fits the previous one (width, dtype, device)."""
        prev = next(self.root.get_submodule(n.target) for n in reversed(nodes) if self.info[n][0].kind == "linear")
        new = self.root.get_submodule(nxt.target)
        pw, nw = _weight(prev), _weight(new)
        return prev.out_features == new.in_features and pw.dtype == nw.dtype and pw.device == nw.device


def _weight(m: nn.Linear) -> torch.Tensor:
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return getattr(m, "weight_orig", m.weight)


def _has_linear(m: nn.Module) -> bool:
    return any(is_linear(x) for x in m.modules())


_NEVER_INSIDE = (IOSparseNetwork, FusedInto, nn.MultiheadAttention)


def _discover(module: nn.Module, prefix: str, scan, out: List[Chain], notes: List[str]) -> None:
    if isinstance(module, _NEVER_INSIDE) or is_linear(module) or not _has_linear(module):
        return
    builtin = type(module).__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(module, nn.Sequential)
    no_forward = type(module).forward is nn.Module.forward  # ModuleList, ModuleDict, plain containers
    if not (builtin or no_forward):
        try:
            tracer = _trace(module)
        except _Untraceable as e:
            why = str(e)
        else:
            _from_graph(module, prefix, tracer, scan, out, notes)
            return
    walked = []
    for name, child in module.named_children():
        path = _join(prefix, name)
        if is_linear(child):
            if scan.eligible(path, child):
                out.append(Chain([Member(path, "linear")], prefix))
                walked.append(name)
        else:
            _discover(child, path, scan, out, notes)
    if walked and not (builtin or no_forward):
        notes.append(f"torch.fx cannot trace {type(module).__name__}.forward{' at ' + prefix if prefix else ''} "
                     f"({why}); its Linear layers {', '.join(walked)} are converted one by one, without the "
                     "activations or Linears that follow them")


def _from_graph(root: nn.Module, prefix: str, tracer: _Tracer, scan, out: List[Chain], notes: List[str]) -> None:
    g = _Graph(root, prefix, tracer, scan)
    chains = g.chains()
    out.extend(chains)
    in_chain = {p for c in chains for p in c.paths}

    # traced through, or a container (ModuleList …) of modules traced through
    inside = {".".join(t.split(".")[:k]) for t in tracer.traced for k in range(1, t.count(".") + 2)}

    def visit(mod: nn.Module, path: str) -> None:
        for name, child in mod.named_children():
            p = _join(path, name)
            if is_linear(child):
                full = g.full(p)
                # called Linears are in `chains` when eligible; one never called is a drop-in on its own
                if full not in in_chain and tracer.calls[p] == 0 and g.linear_ok(p):
                    out.append(Chain([Member(full, "linear")], g.full(path)))
            elif p in inside:
                visit(child, p)
            else:
                _discover(child, g.full(p), scan, out, notes)

    visit(root, "")


def discover(model: nn.Module, scan) -> Tuple[List[Chain], List[str]]:
    """The chains of ``model`` (see the module docstring) and notes about modules fx could not trace.
    ``scan`` decides which Linears are eligible (``scan.eligible(fqn, module)``, ``scan.skip(fqn, why)``).

    The model is traced in its training mode and in the other one (every module's flag flipped, then
    restored); a chain found in one mode only is not fused (its Linears become networks of their own)."""
    modes = [(m, m.training) for m in model.modules()]
    results = []
    try:
        for flip in (False, True):
            for m, was in modes:
                m.training = was != flip
            chains: List[Chain] = []
            notes: List[str] = []
            _discover(model, "", scan, chains, notes)
            results.append((chains, notes))
    finally:
        for m, was in modes:
            m.training = was
    (chains, notes), (other, _) = results
    both = {c.paths for c in other}
    final: List[Chain] = []
    for c in chains:
        if len(c.members) == 1 or c.paths in both:
            final.append(c)
        else:
            final.extend(Chain([m], c.scope) for m in c.members if m.kind == "linear")
    return final, list(dict.fromkeys(notes))
