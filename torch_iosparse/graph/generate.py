"""Network generators: I/O-optimal networks by construction, and GraphChallenge-like RadiX-Nets.

``io_optimal`` / ``io_optimal_masks`` build networks whose 2-optimal plan in their own numbering costs
exactly the lower bound at a given memory. The construction keeps a *live set* below the memory: with
steps ``p = 0..n_computed-1`` (neuron ``n_inputs + p`` is computed at step p), a value is live at p when
it has been loaded or computed before and is read at p or later. If at every step at most ``M - 1``
values are live (one slot holds the partial sum), the simulator never evicts, so every input is loaded
once, nothing but the outputs is ever stored, and each output is stored once: I/O = lower bound.
The generator therefore (1) lays a minimal skeleton (every input read, every computed neuron reads,
every non-output neuron is read) and (2) adds random edges, preferring *free* ones (between a value
already live at a step and the neuron of that step) and otherwise extending a value's live range only
where the live count stays below M - 1. Every result is checked with the exact simulator.

``radix_net`` builds Sparse-DNN-GraphChallenge-like networks offline (RadiX-Net topology) and
``challenge_inputs`` makes inputs from scikit-learn's bundled digits (no download).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .dag import SparseDAG

__all__ = ["io_optimal", "io_optimal_masks", "radix_net", "challenge_inputs", "radix_bias",
           "scipy_reference"]


class _LiveBuilder:
    """Edges plus live ranges per value; ``L[p]`` = live values at step p (see module docstring)."""

    def __init__(self, n_inputs: int, n_neurons: int, memory: int, rng: np.random.Generator):
        self.nI, self.n, self.nC = n_inputs, n_neurons, n_neurons - n_inputs
        self.C = memory - 1
        self.rng = rng
        self.lo = np.full(n_neurons, 1 << 40, dtype=np.int64)  # live range [lo, hi] in steps; empty: lo > hi
        self.hi = np.full(n_neurons, -1, dtype=np.int64)
        self.lo[self.nI:] = np.arange(self.nC) + 1  # a computed value is live from the step after its own
        self.hi[self.nI:] = np.arange(self.nC)      # ... and not at all until someone reads it
        self.L = np.zeros(self.nC, dtype=np.int64)
        self.sources: List[set] = [set() for _ in range(self.nC)]
        self.m = 0

    def step_of(self, v: int) -> int:
        return v - self.nI

    def added_range(self, u: int, p: int):
        lo, hi = self.lo[u], self.hi[u]
        if u < self.nI and lo > hi:
            return p, p
        if p > hi:
            return hi + 1, p
        if p < lo:
            return p, lo - 1
        return None  # free: u is already live at p

    def fits(self, u: int, p: int) -> bool:
        r = self.added_range(u, p)
        return r is None or int(self.L[r[0]:r[1] + 1].max()) + 1 <= self.C

    def add(self, u: int, v: int) -> None:
        p = self.step_of(v)
        r = self.added_range(u, p)
        if r is not None:
            self.L[r[0]:r[1] + 1] += 1
            if u < self.nI and self.lo[u] > self.hi[u]:
                self.lo[u] = self.hi[u] = p
            else:
                self.lo[u] = min(self.lo[u], p)
                self.hi[u] = max(self.hi[u], p)
        self.sources[p].add(u)
        self.m += 1

    def live_at(self, p: int) -> np.ndarray:
        return np.flatnonzero((self.lo <= p) & (self.hi >= p))

    def fill(self, target: int, allowed, what: str) -> None:
        """Add random edges until ``target``; ``allowed(p)`` gives the candidate sources of step p."""
        rng = self.rng
        tries = 0
        budget = 50 * max(target - self.m, 1) + 1000
        while self.m < target and tries < budget:
            tries += 1
            p = int(rng.integers(self.nC))
            cand = allowed(p)
            if cand.size == 0:
                continue
            v = self.nI + p
            live = np.intersect1d(self.live_at(p), cand, assume_unique=False)
            free = [u for u in live.tolist() if u not in self.sources[p]]
            if free:
                self.add(int(free[rng.integers(len(free))]), v)
                continue
            for u in rng.choice(cand, size=min(4, cand.size), replace=False).tolist():
                if u not in self.sources[p] and self.fits(u, p):
                    self.add(int(u), v)
                    break
        if self.m < target:  # random search stalled: sweep every candidate pair once
            for p in rng.permutation(self.nC).tolist():
                for u in rng.permutation(allowed(p)).tolist():
                    if self.m >= target:
                        break
                    if u not in self.sources[p] and self.fits(u, p):
                        self.add(int(u), self.nI + p)
        if self.m < target:
            raise ValueError(f"{what}: only {self.m} of the {target} edges fit while keeping at most "
                             f"memory-1 = {self.C} values live at every step; ask for fewer edges or more memory")

    def edges(self):
        src, dst = [], []
        for p, s in enumerate(self.sources):
            for u in sorted(s):
                src.append(u)
                dst.append(self.nI + p)
        return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def _check_memory(memory) -> int:
    if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)):
        raise TypeError(f"memory must be an integer number of slots, got {memory!r}")
    if memory < 2:
        raise ValueError(f"memory must be >= 2 slots, got {memory}")
    return int(memory)


def _random_weights(rng, src, dst, n):
    indeg = np.bincount(dst, minlength=n)
    w = rng.standard_normal(src.size) / np.sqrt(np.maximum(indeg[dst], 1))
    return torch.from_numpy(w.astype(np.float32))


def _verify(dag: SparseDAG, memory: int, what: str) -> SparseDAG:
    from ..cost.iomodel import count_io, lower_bound, topological_order
    io = count_io(dag, topological_order(dag), memory).total
    if io != lower_bound(dag, memory):
        raise RuntimeError(f"internal error: {what} built a network whose 2-optimal plan costs {io} > "
                           f"lower bound {lower_bound(dag, memory)}")
    return dag


def io_optimal(n_inputs: int, n_outputs: int, n_neurons: int, n_edges: int, memory: int,
               seed: int = 0, activation="relu") -> SparseDAG:
    """A random valid network whose 2-optimal plan in its own numbering costs exactly the lower bound
    at ``memory`` slots.

    Neurons ``0..n_inputs-1`` are the inputs, the last ``n_outputs`` neurons are the outputs, the
    numbering is topological, every input is read, every computed neuron reads at least one value and
    every non-output neuron is read (so each neuron lies on an input-to-output path), and there are
    exactly ``n_edges`` edges. Outputs may feed later outputs (they are stored once, after their last
    read). Raises ValueError naming the violated constraint when the sizes cannot be met:

    * ``n_neurons >= n_inputs + n_outputs``;
    * ``n_edges >= max(n_computed, n_inputs + n_hidden)`` (an in-edge per computed neuron, an out-edge
      per input and hidden neuron);
    * ``n_edges <= sum_p min(memory - 1, n_inputs + p)``: the neuron of step p reads only live values;
    * ``memory >= 1 + ceil((n_inputs - B + n_computed - 1) / n_computed)`` with
      ``B = min(n_outputs, n_inputs) - 1``: the skeleton reads each input once along a chain through
      the computed neurons (broken after up to B outputs), and the inputs must fit beside the chain.
    """
    nI, nO, n, m = int(n_inputs), int(n_outputs), int(n_neurons), int(n_edges)
    M = _check_memory(memory)
    if nI < 1 or nO < 1:
        raise ValueError(f"n_inputs and n_outputs must be >= 1, got {nI} and {nO}")
    if n < nI + nO:
        raise ValueError(f"n_neurons ({n}) must be >= n_inputs + n_outputs = {nI + nO}")
    nC = n - nI
    H = nC - nO
    m_min = max(nC, nI + H)
    if m < m_min:
        raise ValueError(f"n_edges ({m}) must be >= max(n_computed, n_inputs + n_hidden) = {m_min}: every "
                         "computed neuron needs an in-edge and every input and hidden neuron an out-edge")
    B = min(nO, nI) - 1
    need = 1 + -(-(nI - B + nC - 1) // nC)
    if M < need:
        raise ValueError(f"memory ({M}) must be >= 1 + ceil((n_inputs - B + n_computed - 1) / n_computed) = "
                         f"{need} with B = min(n_outputs, n_inputs) - 1 = {B}: io_optimal reads each input "
                         "once beside a chain through the computed neurons and needs room for them")
    C = M - 1
    m_max = int(sum(min(C, nI + p) for p in range(nC)))
    if m > m_max:
        raise ValueError(f"n_edges ({m}) must be <= sum over steps p of min(memory-1, n_inputs+p) = {m_max}: "
                         f"at memory {M} the neuron computed at step p can read at most memory-1 live values")
    rng = np.random.default_rng(seed)
    b = _LiveBuilder(nI, n, M, rng)
    # Skeleton: a chain through the computed neurons, broken before the last B outputs; chain starts
    # (step 0 and the broken outputs) may read C inputs, other steps C - 1.
    broken = set(range(nC - B, nC))
    cap = np.array([C if (p == 0 or p in broken) else C - 1 for p in range(nC)], dtype=np.int64)
    starts = [0] + sorted(broken)
    per_step = np.zeros(nC, dtype=np.int64)
    per_step[starts] = 1  # each chain start reads at least one input
    left = nI - len(starts)
    room = cap - per_step
    while left > 0:  # spread the rest round-robin over random steps with room
        free_steps = np.flatnonzero(room > 0)
        take = rng.permutation(free_steps)[:left]
        per_step[take] += 1
        room[take] -= 1
        left -= take.size
    inputs = rng.permutation(nI)
    k = 0
    for p in range(nC):
        v = nI + p
        if p > 0 and p not in broken:
            b.add(v - 1, v)
        for _ in range(per_step[p]):
            b.add(int(inputs[k]), v)
            k += 1
    assert b.L.max() <= C
    b.fill(m, lambda p: np.arange(nI + p), "io_optimal")
    src, dst = b.edges()
    bias = torch.from_numpy((0.1 * rng.standard_normal(n)).astype(np.float32))
    dag = SparseDAG.from_edges(nI, src, dst, _random_weights(rng, src, dst, n), bias, n_neurons=n,
                               outputs=np.arange(n - nO, n), activation=activation)
    return _verify(dag, M, "io_optimal")


def io_optimal_masks(layer_sizes: Sequence[int], density: float, memory: int, seed: int = 0) -> List[torch.Tensor]:
    """Boolean masks ``[out, in]`` for a stack of ``nn.Linear`` layers whose network, in layer order,
    costs exactly the lower bound at ``memory`` (for ``torch.nn.utils.prune.custom_from_mask``).

    ``density`` is the fraction of nonzero weights over all layers (rounded; at least the skeleton: a
    monotone staircase that gives every neuron an in-edge and every non-output neuron an out-edge). In
    layer order a whole layer is live while the next one is computed, so roughly
    ``memory > max hidden width`` is needed; the exact requirement of the skeleton is in the error.
    """
    sizes = [int(s) for s in layer_sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"layer_sizes needs at least two positive sizes, got {list(layer_sizes)}")
    if not 0 < float(density) <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    M = _check_memory(memory)
    rng = np.random.default_rng(seed)
    off = np.cumsum([0] + sizes)
    n, nI = int(off[-1]), sizes[0]
    layer_of = np.repeat(np.arange(len(sizes)), sizes)
    b = _LiveBuilder(nI, n, M, rng)
    for k in range(len(sizes) - 1):
        a, c = sizes[k], sizes[k + 1]
        pairs = {(j * a // c, j) for j in range(c)} | {(i, i * c // a) for i in range(a)}
        for i, j in sorted(pairs, key=lambda t: (t[1], t[0])):
            b.add(int(off[k] + i), int(off[k + 1] + j))
    peak = int(b.L.max())
    if peak > b.C:
        raise ValueError(f"memory ({M}) must be >= {peak + 1} for layer_sizes {sizes}: in layer order the "
                         f"minimal staircase masks already keep {peak} values live at one step")
    total = sum(sizes[k] * sizes[k + 1] for k in range(len(sizes) - 1))
    target = max(b.m, int(round(float(density) * total)))

    def allowed(p):
        L = layer_of[nI + p]
        return np.arange(off[L - 1], off[L])

    b.fill(target, allowed, "io_optimal_masks")
    src, dst = b.edges()
    dag = SparseDAG.from_edges(nI, src, dst, n_neurons=n, outputs=np.arange(off[-2], off[-1]))
    _verify(dag, M, "io_optimal_masks")
    masks = []
    for k in range(len(sizes) - 1):
        mk = torch.zeros(sizes[k + 1], sizes[k], dtype=torch.bool)
        sel = (dst >= off[k + 1]) & (dst < off[k + 2])
        mk[torch.from_numpy(dst[sel] - off[k + 1]), torch.from_numpy(src[sel] - off[k])] = True
        masks.append(mk)
    return masks


# ---------------------------------------------------------------------- GraphChallenge-like networks
def radix_bias(width: int) -> float:
    """The Sparse DNN Graph Challenge bias for a layer width: -0.30, -0.35, -0.40, -0.45 for 1024,
    4096, 16384, 65536 (i.e. -0.30 - 0.05·log4(width/1024)), extended to other widths by that formula."""
    return -0.30 - 0.05 * math.log(width / 1024, 4)


def radix_net(width: int, depth: int, fan_in: int = 32, seed: int = 0, bias: Optional[float] = None, *,
              layers: Optional[Tuple[int, int]] = None) -> SparseDAG:
    """A RadiX-Net-like sparse DNN (GraphChallenge style), built offline.

    ``depth`` layers of ``width`` neurons after ``width`` inputs. Layer l connects neuron j to
    ``(j + k·s_l) mod width`` for k < fan_in, with strides s_l cycling through the mixed-radix place
    values ``1, fan_in, fan_in², …`` (those with ``s·fan_in <= width``), so that a few layers mix every
    input into every neuron; each layer's targets are relabelled by a seeded permutation. Every
    computed neuron has in-degree exactly ``fan_in`` and every non-output neuron out-degree exactly
    ``fan_in``. Weights are 1/16, biases :func:`radix_bias` (or ``bias``), activation ReLU capped at 32
    (``hardtanh(0,32)``), as in the challenge.

    ``layers=(start, stop)`` builds only layers ``start .. stop-1`` of that network (one stage of a layer
    pipeline, :mod:`torch_iosparse.distributed`): its ``width`` inputs are the activations entering layer
    ``start`` and its outputs those of layer ``stop-1``. The permutations of the layers before ``start``
    are drawn (O(width) each) but their edges are not built, so the stages of a split, chained, are
    exactly the whole network.
    """
    width, depth, fan_in = int(width), int(depth), int(fan_in)
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got {width} and {depth}")
    start, stop = (0, depth) if layers is None else (int(layers[0]), int(layers[1]))
    if not 0 <= start < stop <= depth:
        raise ValueError(f"layers must be (start, stop) with 0 <= start < stop <= depth={depth}, got {layers}")
    if not 1 <= fan_in <= width:
        raise ValueError(f"fan_in must be in [1, width={width}], got {fan_in}")
    strides = [1]
    while fan_in > 1 and strides[-1] * fan_in * fan_in <= width:  # fan_in 1: one stride
        strides.append(strides[-1] * fan_in)
    rng = np.random.default_rng(seed)
    j = np.arange(width)
    k = np.arange(fan_in)
    src, dst = [], []
    for layer in range(stop):
        s = strides[layer % len(strides)]
        perm = rng.permutation(width)
        if layer < start:
            continue
        tgt = perm[(j[:, None] + k[None, :] * s) % width]
        src.append(np.repeat(j, fan_in) + (layer - start) * width)
        dst.append(tgt.reshape(-1) + (layer - start + 1) * width)
    src, dst = np.concatenate(src), np.concatenate(dst)
    n = width * (stop - start + 1)
    b = radix_bias(width) if bias is None else float(bias)
    biases = torch.full((n,), b, dtype=torch.float32)
    return SparseDAG.from_edges(width, src, dst, torch.full((src.size,), 1.0 / 16), biases, n_neurons=n,
                                outputs=np.arange(n - width, n), activation="hardtanh(0,32)")


def challenge_inputs(width: int, n_samples: int = 64, seed: int = 0, threshold: float = 0.5) -> torch.Tensor:
    """Challenge-style binary inputs ``[n_samples, width]`` (float32 0/1) from scikit-learn's bundled
    8x8 digits (no download): each image is upsampled (bilinear) to a square of side ceil(sqrt(width)),
    flattened, cut to ``width`` and binarised at ``threshold`` of the maximum intensity."""
    from sklearn.datasets import load_digits

    if width < 1 or n_samples < 1:
        raise ValueError(f"width and n_samples must be >= 1, got {width} and {n_samples}")
    images = load_digits().images.astype(np.float32) / 16.0  # [1797, 8, 8]
    rng = np.random.default_rng(seed)
    idx = rng.choice(images.shape[0], size=n_samples, replace=n_samples > images.shape[0])
    side = max(1, math.ceil(math.sqrt(width)))
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    x = x.reshape(n_samples, side * side)[:, :width]
    return (x >= threshold).to(torch.float32).contiguous()


def scipy_reference(dag: SparseDAG, x: torch.Tensor) -> torch.Tensor:
    """Layer-by-layer evaluation with scipy.sparse CSR matrices, the way the Graph Challenge reference
    does it (``Y = clamp(Y @ W + b, 0, 32)`` per layer), for layered DAGs such as :func:`radix_net`."""
    import scipy.sparse as sp

    lv = dag.levels()
    x = dag.check_input(x)
    src, dst = dag.edges()
    w = dag.weight.double().numpy()
    bias = dag.bias.double().numpy()
    Y = x.double().numpy()
    pos = np.zeros(dag.n_neurons, dtype=np.int64)
    for L in range(int(lv.max()) + 1):
        nodes = np.flatnonzero(lv == L)
        pos[nodes] = np.arange(nodes.size)
    for L in range(1, int(lv.max()) + 1):
        prev, cur = np.flatnonzero(lv == L - 1), np.flatnonzero(lv == L)
        sel = lv[dst] == L
        if (lv[src[sel]] != L - 1).any():
            raise ValueError("scipy_reference needs a layered DAG (edges only between consecutive levels)")
        W = sp.csr_matrix((w[sel], (pos[src[sel]], pos[dst[sel]])), shape=(prev.size, cur.size))
        Z = np.asarray(W.T.dot(Y.T).T) + bias[cur]
        acts = {dag.activation_of(int(v)) for v in cur}
        if len(acts) != 1:
            raise ValueError("scipy_reference needs one activation per layer")
        Y = acts.pop().apply(torch.from_numpy(Z)).numpy()
    out_pos = pos[dag.outputs]
    if (lv[dag.outputs] != lv.max()).any():
        raise ValueError("scipy_reference needs the outputs in the last layer")
    return torch.from_numpy(Y[:, out_pos]).to(x.dtype)
