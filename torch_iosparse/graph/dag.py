"""SparseDAG: the neuron-level graph of a sparse feed-forward network (docs/theory.md, "1. The model").

Neurons are numbered ``0..n_neurons-1``; the first ``n_inputs`` are the inputs. The structure is kept as
two CSR views (in-edges grouped by destination, out-edges grouped by source, both sorted by the other
endpoint), with edge weights aligned to the in-edge CSR. Duplicate edges are merged by summing their
weights: ``w_uv·x_u + w'_uv·x_u = (w_uv + w'_uv)·x_u``, so the function is unchanged.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from . import activations as acts
from .activations import Activation

ActivationSpec = Union[str, Activation, None]


class GraphError(ValueError):
    """A malformed network: bad indices, cycles, inputs with in-edges, bad output sets."""


def _as_numpy(a, name: str, dtype=None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    try:
        a = np.asarray(a)
    except ValueError as e:  # ragged nested lists
        raise GraphError(f"{name} must be a one-dimensional sequence of numbers ({e})") from None
    if a.ndim != 1:
        raise GraphError(f"{name} must be one-dimensional, got shape {tuple(a.shape)}")
    if dtype is not None:
        if a.size and (a.dtype == bool or a.dtype.kind not in "iuf"):
            raise GraphError(f"{name} must hold integers, got dtype {a.dtype}")
        if np.issubdtype(dtype, np.integer) and a.size and not np.issubdtype(a.dtype, np.integer):
            if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
                raise GraphError(f"{name} must hold integers")
        a = a.astype(dtype, copy=False)
    return a


def _as_count(x, name: str) -> int:
    """A whole number (int, numpy integer, integral float or 0-d tensor) as int, else GraphError."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise GraphError(f"{name} must be an integer, got {x!r}")
    if isinstance(x, (float, np.floating)) and not float(x).is_integer():
        raise GraphError(f"{name} must be an integer, got {x!r}")
    return int(x)


def _stable_sort(primary: np.ndarray, secondary: Optional[np.ndarray], n_buckets: int) -> np.ndarray:
    """The stable permutation sorting items by ``(primary, secondary)``, keys in ``[0, n_buckets)``.

    Native O(m + n) bucket sort when the extension is built; numpy's (slower, O(m log m)) otherwise.
    Both give the same permutation (tests check it)."""
    from .. import _native
    if _native.available() and primary.size:
        p = torch.from_numpy(np.ascontiguousarray(primary))
        s = None if secondary is None else torch.from_numpy(np.ascontiguousarray(secondary, dtype=primary.dtype))
        return _native.ops().bucket_sort(p, s, int(n_buckets)).numpy()
    return _stable_sort_numpy(primary, secondary)


def _stable_sort_numpy(primary: np.ndarray, secondary: Optional[np.ndarray]) -> np.ndarray:
    if secondary is None:
        return np.argsort(primary, kind="stable")
    return np.lexsort((secondary, primary))


def prune_mask(lin) -> Optional[torch.Tensor]:
    """The pruning mask of a Linear's weight, or None: ``weight_mask`` of ``torch.nn.utils.prune``, else the
    ``mask`` of its weight parametrizations (``torch.nn.utils.parametrize``, e.g. torch.ao.pruning's
    FakeSparsity before ``squash_mask``; several masks are combined)."""
    mask = getattr(lin, "weight_mask", None)
    if mask is not None:
        return mask
    from torch.nn.utils import parametrize
    if not parametrize.is_parametrized(lin, "weight"):
        return None
    shape = lin.parametrizations.weight.original.shape
    masks = [p.mask for p in lin.parametrizations.weight
             if isinstance(getattr(p, "mask", None), torch.Tensor) and p.mask.shape == shape]
    if not masks:
        return None
    out = masks[0] != 0
    for extra in masks[1:]:
        out = out & (extra != 0)
    return out


def _index_dtype(n: int):
    return np.int32 if n < 2**31 - 1 else np.int64


class SparseDAG:
    """A sparse feed-forward network as a DAG of neurons.

    Build it with :meth:`from_edges` (any DAG, skip edges allowed) or :meth:`from_module` (an
    ``nn.Sequential`` of pruned ``nn.Linear`` layers and activation modules).

    Attributes (read-only by convention):
        n_inputs, n_neurons, n_edges, n_outputs
        in_ptr, in_src: CSR of in-edges (``in_src[in_ptr[v]:in_ptr[v+1]]`` are v's sources, ascending)
        out_ptr, out_dst, out_edge: CSR of out-edges; ``out_edge`` maps to the in-edge index
        weight: float tensor of the edge weights in in-edge order
        bias: float tensor, one per neuron (0 for inputs)
        activations: list of distinct :class:`Activation`; ``act_index[v]`` selects one per neuron
        outputs: int array of output neurons, in the order of ``forward_reference``'s columns
    """

    def __init__(self, n_inputs: int, in_ptr: np.ndarray, in_src: np.ndarray, weight: torch.Tensor,
                 bias: torch.Tensor, activations: List[Activation], act_index: np.ndarray,
                 outputs: np.ndarray, layer_sizes: Optional[List[int]] = None):
        # Internal: use from_edges / from_module, which validate.
        self.n_inputs = int(n_inputs)
        self.n_neurons = int(len(in_ptr) - 1)
        self.in_ptr = in_ptr
        self.in_src = in_src
        self.weight = weight
        self.bias = bias
        self.activations = activations
        self.act_index = act_index
        self.outputs = outputs
        self.layer_sizes = layer_sizes  # set for layered networks (from_module): sizes incl. inputs
        self._build_out_csr()
        self._levels = None
        self._hash = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_edges(cls, n_inputs: int, src, dst, weight=None, bias=None, *, n_neurons: Optional[int] = None,
                   outputs=None, activation: Union[ActivationSpec, Sequence[ActivationSpec]] = "relu",
                   dtype: Optional[torch.dtype] = None) -> "SparseDAG":
        """A DAG from an edge list.

        Args:
            n_inputs: neurons ``0..n_inputs-1`` are the inputs (they take no in-edges).
            src, dst: edge endpoints (``src[k] -> dst[k]``), any integer sequence, array or tensor.
            weight: one weight per edge (default: ones). Duplicate ``(src, dst)`` pairs are merged by
                summing their weights.
            bias: one value per neuron (length ``n_neurons``; entries of inputs are ignored), or None.
            n_neurons: total neuron count (default: ``max(n_inputs, max(src, dst) + 1)``).
            outputs: output neurons in output-column order (default: the non-input sinks, ascending).
            activation: one spec for every computed neuron, or one per neuron (entries of inputs
                ignored). Specs: ``"identity"``, ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"tanh"``,
                ``"sigmoid"``, ``"hardtanh(lo,hi)"``, ``"relu6"`` or an :class:`Activation`.
            dtype: dtype of the stored weights and biases (default: that of ``weight``, else float32).
        """
        n_inputs = _as_count(n_inputs, "n_inputs")
        if n_inputs < 1:
            raise GraphError(f"n_inputs must be >= 1, got {n_inputs}")
        src = _as_numpy(src, "src", np.int64)
        dst = _as_numpy(dst, "dst", np.int64)
        if src.shape != dst.shape:
            raise GraphError(f"src and dst must have the same length, got {src.size} and {dst.size}")
        m = src.size
        if n_neurons is None:
            n_neurons = max(n_inputs, int(src.max()) + 1 if m else 0, int(dst.max()) + 1 if m else 0)
        n = _as_count(n_neurons, "n_neurons")
        if n <= n_inputs:
            raise GraphError(f"n_neurons ({n}) must exceed n_inputs ({n_inputs}): there is nothing to compute")
        if m:
            bad = (src < 0) | (src >= n) | (dst < 0) | (dst >= n)
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise GraphError(f"edge {k} ({int(src[k])} -> {int(dst[k])}) has an index out of range "
                                 f"[0, {n})")
            if (dst < n_inputs).any():
                k = int(np.flatnonzero(dst < n_inputs)[0])
                raise GraphError(f"edge {k} ({int(src[k])} -> {int(dst[k])}) points into input neuron "
                                 f"{int(dst[k])}; inputs are 0..{n_inputs - 1} and take no in-edges")
            if (src == dst).any():
                k = int(np.flatnonzero(src == dst)[0])
                raise GraphError(f"edge {k} is a self-loop on neuron {int(src[k])}: the graph must be acyclic")

        if weight is None:
            w = torch.ones(m, dtype=dtype or torch.float32)
        else:
            w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(np.asarray(weight))
            w = w.detach().cpu()
            if w.dim() != 1:
                raise GraphError(f"weight must be one-dimensional (one value per edge), got shape {tuple(w.shape)}")
            if w.numel() != m:
                raise GraphError(f"weight has {w.numel()} entries for {m} edges")
            if w.is_complex() or w.dtype == torch.bool:
                raise GraphError(f"weight must be real numbers, got dtype {w.dtype}")
            if not w.is_floating_point():
                w = w.to(torch.float32)
            if dtype is not None:
                w = w.to(dtype)
        wdtype = w.dtype

        # Sort edges by (dst, src); merge duplicates by summing.
        idx_t = _index_dtype(n)
        if m > 1:
            ddst = np.diff(dst)
            already = bool(((ddst > 0) | ((ddst == 0) & (np.diff(src) > 0))).all())  # sorted, no duplicates
        else:
            already = True
        if already:
            src_s, dst_s, w_s = src, dst, w.clone()  # clone: never alias the caller's tensor
        else:
            order = _stable_sort(dst, src, n)
            src_s, dst_s = src[order], dst[order]
            w_s = w[torch.from_numpy(order)]
        if not already:
            dup = (src_s[1:] == src_s[:-1]) & (dst_s[1:] == dst_s[:-1])
            if dup.any():
                first = np.concatenate(([True], ~dup))
                group = np.cumsum(first, dtype=np.int64) - 1
                merged = torch.zeros(int(first.sum()), dtype=wdtype)
                merged.index_add_(0, torch.from_numpy(group), w_s)
                src_s, dst_s, w_s = src_s[first], dst_s[first], merged
        in_ptr = np.zeros(n + 1, dtype=np.int64)
        in_ptr[1:] = np.bincount(dst_s, minlength=n)
        np.cumsum(in_ptr, out=in_ptr)

        b = cls._bias_vector(bias, n, n_inputs, wdtype)
        activations, act_index = cls._activation_table(activation, n, n_inputs)

        # Default outputs: non-input sinks.
        outdeg = np.bincount(src_s, minlength=n) if src_s.size else np.zeros(n, dtype=np.int64)
        if outputs is None:
            outputs = np.flatnonzero(outdeg[n_inputs:] == 0) + n_inputs
        else:
            outputs = _as_numpy(outputs, "outputs", np.int64)
            if outputs.size == 0:
                raise GraphError("outputs must name at least one neuron")
            if ((outputs < n_inputs) | (outputs >= n)).any():
                bad = outputs[(outputs < n_inputs) | (outputs >= n)][0]
                raise GraphError(f"output {int(bad)} is not a computed neuron (valid: {n_inputs}..{n - 1})")
            if np.unique(outputs).size != outputs.size:
                raise GraphError("outputs contain duplicates")
        dag = cls(n_inputs, in_ptr, src_s.astype(idx_t), w_s.contiguous(), b, activations, act_index,
                  outputs.astype(idx_t))
        dag._check_acyclic()
        return dag

    @staticmethod
    def _bias_vector(bias, n: int, n_inputs: int, dtype: torch.dtype) -> torch.Tensor:
        if bias is None:
            return torch.zeros(n, dtype=dtype)
        b = bias if isinstance(bias, torch.Tensor) else torch.as_tensor(np.asarray(bias))
        b = b.detach().cpu()
        if b.dim() != 1:
            raise GraphError(f"bias must be one-dimensional (one value per neuron), got shape {tuple(b.shape)}")
        b = b.to(dtype).clone()
        if b.numel() != n:
            raise GraphError(f"bias must have one entry per neuron ({n}), got {b.numel()}")
        b[:n_inputs] = 0
        return b

    @staticmethod
    def _activation_table(activation, n: int, n_inputs: int):
        if activation is None or isinstance(activation, (str, Activation)):
            return [acts.parse(activation)], np.zeros(n, dtype=np.int16)
        try:
            specs = list(activation)
        except TypeError:
            raise TypeError(f"activation must be a name like 'relu', an Activation, or a sequence with one per "
                            f"neuron; got {type(activation).__name__}") from None
        if len(specs) != n:
            raise GraphError(f"activation must be one spec or one per neuron ({n}), got {len(specs)}")
        table: List[Activation] = []
        where = {}
        index = np.zeros(n, dtype=np.int16)
        parsed = {}  # spec -> Activation: parse each distinct spec once (per-neuron lists can be long)
        for v in range(n_inputs, n):
            spec = specs[v]
            try:
                a = parsed[spec]
            except KeyError:
                a = parsed[spec] = acts.parse(spec)
            except TypeError:  # unhashable spec: parse() gives the error message
                a = acts.parse(spec)
            if a not in where:
                if len(table) == np.iinfo(np.int16).max:
                    raise GraphError(f"more than {len(table)} distinct activations")
                where[a] = len(table)
                table.append(a)
            index[v] = where[a]
        return table or [acts.IDENTITY], index

    @classmethod
    def from_module(cls, seq: torch.nn.Module, *, dtype: Optional[torch.dtype] = None) -> "SparseDAG":
        """A layered DAG from an ``nn.Sequential`` of ``nn.Linear`` layers, each optionally followed by
        one supported activation module (ReLU, ReLU6, GELU, Tanh, Sigmoid, Identity, Hardtanh).

        Sparsity comes from a ``torch.nn.utils.prune`` mask (or a parametrization's ``mask``, as
        torch.ao.pruning's FakeSparsity) when the layer has one (so an unpruned weight
        that happens to be zero stays an edge), else from the nonzero weights. Biases are optional.
        """
        from torch import nn

        def flatten(mod):  # nested nn.Sequential containers are flattened
            if isinstance(mod, nn.Sequential):
                for child in mod:
                    yield from flatten(child)
            else:
                yield mod

        if not isinstance(seq, nn.Module):
            raise TypeError(f"from_module takes an nn.Sequential (or one nn.Linear), got {type(seq).__name__}")
        modules = list(flatten(seq))
        layers = []  # (linear, activation)
        for i, mod in enumerate(modules):
            if isinstance(mod, nn.Linear):
                layers.append([mod, acts.IDENTITY])
                continue
            a = acts.from_module(mod)
            if a is None:
                raise GraphError(f"unsupported module at index {i}: {type(mod).__name__} ({mod!r}); "
                                 "from_module takes nn.Linear and the activations ReLU, ReLU6, GELU, Tanh, "
                                 "Sigmoid, Hardtanh, Identity")
            if a.kind == "identity":
                continue
            if not layers:
                raise GraphError(f"activation {type(mod).__name__} at index {i} comes before any nn.Linear")
            if layers[-1][1].kind != "identity":
                raise GraphError(f"two activations in a row at index {i} ({type(mod).__name__} after "
                                 f"{layers[-1][1]}); only one activation per Linear is supported")
            layers[-1][1] = a
        if not layers:
            raise GraphError("the module contains no nn.Linear layer")

        for k, (lin, _) in enumerate(layers):
            if lin.in_features == 0 or lin.out_features == 0:
                what = "inputs (in_features=0)" if lin.in_features == 0 else "outputs (out_features=0)"
                raise GraphError(f"Linear layer {k} ({lin!r}) has no {what}: a sparse network needs at least one "
                                 "neuron in every layer")
        sizes = [layers[0][0].in_features]
        for k, (lin, _) in enumerate(layers):
            if lin.in_features != sizes[-1]:
                raise GraphError(f"Linear layer {k} expects {lin.in_features} inputs but the previous layer "
                                 f"produces {sizes[-1]}")
            sizes.append(lin.out_features)
        offsets = np.cumsum([0] + sizes)
        n = int(offsets[-1])
        first = layers[0][0]
        # with a prune mask, lin.weight keeps its old dtype after .double() until the next forward
        wdtype = dtype or getattr(first, "weight_orig", first.weight).dtype
        srcs, dsts, ws = [], [], []
        bias = torch.zeros(n, dtype=wdtype)
        act_table, act_index = [], np.zeros(n, dtype=np.int16)
        for k, (lin, a) in enumerate(layers):
            with torch.no_grad():
                mask = prune_mask(lin)
                orig = getattr(lin, "weight_orig", None)
                # With a prune mask, lin.weight is only refreshed by a forward pre-hook: recompute it so
                # edits of weight_orig since the last forward are not missed.
                W = (orig * mask if (mask is not None and orig is not None) else lin.weight).detach().cpu()
                pattern = (mask.detach().cpu() != 0) if mask is not None else (W != 0)
                rows, cols = pattern.nonzero(as_tuple=True)  # row-major: sorted by (dst, src)
                srcs.append(cols.numpy() + offsets[k])
                dsts.append(rows.numpy() + offsets[k + 1])
                ws.append(W[rows, cols].to(wdtype))
                if lin.bias is not None:
                    bias[offsets[k + 1]:offsets[k + 2]] = lin.bias.detach().cpu().to(wdtype)
            if a not in act_table:
                act_table.append(a)
            act_index[offsets[k + 1]:offsets[k + 2]] = act_table.index(a)
        src = np.concatenate(srcs)
        dst = np.concatenate(dsts)
        w = torch.cat(ws)
        idx_t = _index_dtype(n)
        in_ptr = np.zeros(n + 1, dtype=np.int64)
        in_ptr[1:] = np.bincount(dst, minlength=n)
        np.cumsum(in_ptr, out=in_ptr)
        outputs = np.arange(offsets[-2], offsets[-1], dtype=idx_t)
        # Layer order is topological and edges come sorted by (dst, src): no re-validation needed.
        return cls(sizes[0], in_ptr, src.astype(idx_t), w.contiguous(), bias, act_table, act_index,
                   outputs, layer_sizes=sizes)

    # ------------------------------------------------------------------ structure
    def _build_out_csr(self):
        n, m = self.n_neurons, self.n_edges
        dst = np.repeat(np.arange(n, dtype=self.in_src.dtype), np.diff(self.in_ptr))
        order = _stable_sort(self.in_src, None, n)  # stable: keeps dst ascending per source
        self.out_ptr = np.zeros(n + 1, dtype=np.int64)
        if m:
            self.out_ptr[1:] = np.bincount(self.in_src, minlength=n)
        np.cumsum(self.out_ptr, out=self.out_ptr)
        self.out_dst = dst[order]
        self.out_edge = order.astype(_index_dtype(max(m, 1)))

    def _check_acyclic(self):
        if self.numbering_is_topological():
            return
        self.levels()  # raises GraphError on a cycle

    def numbering_is_topological(self) -> bool:
        """True when every edge goes from a smaller to a larger neuron id (cached)."""
        if getattr(self, "_topo_numbering", None) is None:
            if self.layer_sizes is not None:
                self._topo_numbering = True
            else:
                dst = np.repeat(np.arange(self.n_neurons, dtype=self.in_src.dtype), np.diff(self.in_ptr))
                self._topo_numbering = bool((self.in_src < dst).all())
        return self._topo_numbering

    @property
    def n_edges(self) -> int:
        return int(self.in_src.size)

    @property
    def n_outputs(self) -> int:
        return int(self.outputs.size)

    @property
    def n_computed(self) -> int:
        return self.n_neurons - self.n_inputs

    def in_degree(self) -> np.ndarray:
        return np.diff(self.in_ptr)

    def out_degree(self) -> np.ndarray:
        return np.diff(self.out_ptr)

    def edges(self):
        """``(src, dst)`` int arrays of all edges, in in-edge order (aligned with ``weight``)."""
        dst = np.repeat(np.arange(self.n_neurons, dtype=np.int64), np.diff(self.in_ptr))
        return self.in_src.astype(np.int64), dst

    def is_output_mask(self) -> np.ndarray:
        mask = np.zeros(self.n_neurons, dtype=bool)
        mask[self.outputs] = True
        return mask

    def activation_of(self, v: int) -> Activation:
        return self.activations[int(self.act_index[v])]

    def structure_hash(self) -> str:
        """SHA-256 of the structure (sizes, edges, outputs) — what a plan depends on, not the weights."""
        if self._hash is None:
            h = hashlib.sha256()
            h.update(np.array([self.n_inputs, self.n_neurons, self.n_edges], dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(self.in_ptr, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(self.in_src, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(self.outputs, dtype=np.int64).tobytes())
            self._hash = h.hexdigest()
        return self._hash

    def levels(self) -> np.ndarray:
        """Depth of each neuron: 0 for inputs, 1 + the largest depth of its sources otherwise (a computed
        neuron without in-edges has depth 1). Raises GraphError on a cycle. O(n + m)."""
        if self._levels is None:
            if self.layer_sizes is not None:
                self._levels = np.repeat(np.arange(len(self.layer_sizes)), self.layer_sizes)
            else:
                self._levels = _levels(self.n_neurons, self.n_inputs, self.in_ptr, self.out_ptr, self.out_dst)
        return self._levels

    _CACHES = ("_native_cache", "_lp", "_lp_acts", "_in_src_t")

    def __getstate__(self):
        # Pickle / deepcopy the network, not the derived caches (they are rebuilt on demand).
        state = dict(self.__dict__)
        for k in self._CACHES:
            state.pop(k, None)
        return state

    def __repr__(self) -> str:
        acts_s = ",".join(str(a) for a in self.activations)
        return (f"SparseDAG(n_inputs={self.n_inputs}, n_neurons={self.n_neurons}, n_edges={self.n_edges}, "
                f"n_outputs={self.n_outputs}, activations=[{acts_s}], dtype={self.weight.dtype})")

    # ------------------------------------------------------------------ evaluation
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate ``x`` ([batch, n_inputs], floating point) with errors that say what was expected."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"input must have shape [batch, {self.n_inputs}] (n_inputs={self.n_inputs}), "
                             f"got {list(x.shape)}")
        return x

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Pure-PyTorch evaluation, level by level: ``[batch, n_inputs] -> [batch, n_outputs]``.

        Each level (neurons of equal depth, :meth:`levels`) is one sparse-CSR × dense product over the
        values computed so far, plus bias, then the activations: the "standard way" baseline and the oracle
        every kernel is compared with. Computes in ``x.dtype`` for float32/float64; half-precision inputs
        are evaluated in float32 and the result cast back (sparse products need float32/64).
        """
        x = self.check_input(x)
        dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        dev = x.device
        batch = x.shape[0]
        vals = torch.zeros(self.n_neurons, batch, dtype=dt, device=dev)  # feature-major
        vals[: self.n_inputs] = x.t().to(dt)
        w = self.weight.to(device=dev, dtype=dt)
        b = self.bias.to(device=dev, dtype=dt)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
            for (neurons, crow, col, edges), groups in zip(self._level_plan(), self._level_activations()):
                neurons_d = neurons.to(dev)
                acc = b[neurons_d].unsqueeze(1).expand(-1, batch)
                if edges.numel() and batch:
                    A = torch.sparse_csr_tensor(crow.to(dev), col.to(dev), w[edges.to(dev)],
                                                size=(neurons.numel(), self.n_neurons),
                                                check_invariants=False)
                    acc = acc + A @ vals
                act = self._apply_activation_groups(acc.contiguous(), groups)
                if torch.is_grad_enabled() and (vals.requires_grad or act.requires_grad):
                    vals = vals.index_copy(0, neurons_d, act)  # out of place: autograd saved vals for A @ vals
                else:
                    vals[neurons_d] = act
        out = vals[torch.from_numpy(self.outputs.astype(np.int64)).to(dev)].t().contiguous()
        return out.to(x.dtype)

    def _level_activations(self):
        """Per level: [(Activation, local row indices or None for all rows)], one entry per kind present."""
        if getattr(self, "_lp_acts", None) is None:
            out = []
            for neurons, _, _, _ in self._level_plan():
                ai = self.act_index[neurons.numpy()]
                kinds = np.unique(ai)
                if kinds.size == 1:
                    out.append([(self.activations[int(kinds[0])], None)])
                else:
                    out.append([(self.activations[int(k)], torch.from_numpy(np.flatnonzero(ai == k))) for k in kinds])
            self._lp_acts = out
        return self._lp_acts

    @staticmethod
    def _apply_activation_groups(acc: torch.Tensor, groups) -> torch.Tensor:
        if len(groups) == 1:
            return groups[0][0].apply(acc)
        out = torch.empty_like(acc)
        for a, rows in groups:
            rows = rows.to(acc.device)
            out[rows] = a.apply(acc[rows])
        return out

    def _level_plan(self):
        """Per level L >= 1: (neurons, CSR row pointers, CSR columns, edge ids) of its in-edges."""
        if getattr(self, "_lp", None) is None:
            lv = self.levels()
            by_level = np.argsort(lv, kind="stable")
            bounds = np.searchsorted(lv[by_level], np.arange(int(lv.max()) + 2))
            plan = []
            for L in range(1, int(lv.max()) + 1):
                neurons = by_level[bounds[L]:bounds[L + 1]].astype(np.int64)
                starts, ends = self.in_ptr[neurons], self.in_ptr[neurons + 1]
                counts = ends - starts
                crow = np.zeros(neurons.size + 1, dtype=np.int64)
                np.cumsum(counts, out=crow[1:])
                edges = np.repeat(starts - crow[:-1], counts) + np.arange(crow[-1])
                col = self.in_src[edges].astype(np.int64)
                plan.append(tuple(torch.from_numpy(a) for a in (neurons, crow, col, edges)))
            self._lp = plan
        return self._lp

    def to_dense_layers(self):
        """For layered DAGs: the list of (dense weight, bias, Activation) per layer."""
        if self.layer_sizes is None:
            raise ValueError("to_dense_layers needs a layered DAG (built by from_module)")
        off = np.cumsum([0] + self.layer_sizes)
        out = []
        src, dst = self.edges()
        for k in range(len(self.layer_sizes) - 1):
            W = torch.zeros(self.layer_sizes[k + 1], self.layer_sizes[k], dtype=self.weight.dtype)
            sel = (dst >= off[k + 1]) & (dst < off[k + 2])
            W[dst[sel] - off[k + 1], src[sel] - off[k]] = self.weight[torch.from_numpy(np.flatnonzero(sel))]
            out.append((W, self.bias[off[k + 1]:off[k + 2]].clone(), self.activation_of(int(off[k + 1]))))
        return out


def _levels(n: int, n_inputs: int, in_ptr: np.ndarray, out_ptr: np.ndarray, out_dst: np.ndarray) -> np.ndarray:
    from .. import _native
    if _native.available():
        t = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (in_ptr, out_ptr, out_dst)]
        try:
            return _native.ops().levels(*t, n_inputs).numpy()
        except (RuntimeError, ValueError) as e:
            raise GraphError(str(e).split("\n")[0]) from None
    return _levels_numpy(n, n_inputs, in_ptr, out_ptr, out_dst)


def _levels_numpy(n: int, n_inputs: int, in_ptr: np.ndarray, out_ptr: np.ndarray, out_dst: np.ndarray) -> np.ndarray:
    # Level-synchronous Kahn: a neuron released in round r has all sources finished by round r-1, one of
    # them exactly then, so its depth is r. Bias-only neurons (no in-edges) are released in round 1. Each
    # round costs O(its edges · log), so deep graphs stay O(m log m) overall.
    indeg = np.diff(in_ptr).astype(np.int64)
    depth = np.full(n, -1, dtype=np.int64)
    depth[:n_inputs] = 0
    bias_only = np.flatnonzero(indeg[n_inputs:] == 0) + n_inputs
    frontier = np.arange(n_inputs)
    level = 0
    while frontier.size:
        starts, ends = out_ptr[frontier], out_ptr[frontier + 1]
        counts = ends - starts
        total = int(counts.sum())
        e = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(total)
        cand, hits = np.unique(out_dst[e], return_counts=True)
        indeg[cand] -= hits
        level += 1
        frontier = cand[indeg[cand] == 0]
        if level == 1:
            frontier = np.union1d(frontier, bias_only)
        depth[frontier] = level
    if (depth < 0).any():
        v = int(np.flatnonzero(depth < 0)[0])
        raise GraphError(f"the graph has a cycle (neuron {v} lies on or after one)")
    return depth
