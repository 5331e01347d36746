"""External anchors for benchmarks/cpu_speed.py: SparseProp (in the project venv, optional) and DeepSparse
(in its own venv, benchmarks/.deepsparse-venv, run through subprocess).

Both are optional. Every wrapper here is checked against the reference before cpu_speed.py times it:
SparseProp in-process (``check_close``), DeepSparse inside ``deepsparse_runner.py`` against the output
of the dense PyTorch model on the same input. ``tests/benchmarks/test_anchors.py`` covers the wrappers on
tiny nets (skipping what is not installed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from importlib import metadata
from typing import Dict, List, Optional

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DEEPSPARSE_VENV = os.path.join(HERE, ".deepsparse-venv")
DEEPSPARSE_PYTHON = os.path.join(DEEPSPARSE_VENV, "bin", "python")
DEEPSPARSE_RUNNER = os.path.join(HERE, "deepsparse_runner.py")
DEEPSPARSE_ABSENT = "DeepSparse absent: run bash benchmarks/deepsparse_venv.sh"
ONNX_OPSET = 17  # onnx 1.14 (DeepSparse 1.8's pin) reads opsets <= 19; torch 2.13 defaults to 20
# SparseProp's from_dense goes through a dense weight; above this many bytes per layer we build its CSR
# fields directly (the same fields to_csr_2d makes, exact int32 index arrays).
SPARSEPROP_DENSE_LIMIT = 256 << 20


# ---------------------------------------------------------------------- the machine
# The CPU model string every table names (the one the tuning cache keys its entries by).
from torch_iosparse.backends.cpu.hardware import cpu_model  # noqa: E402


def openmp_runtimes() -> List[str]:
    """Distinct OpenMP runtime libraries mapped into this process (Linux; [] elsewhere)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                base = os.path.basename(path)
                if base.startswith(("libgomp", "libiomp", "libomp")):
                    libs.add(os.path.realpath(path))
    except OSError:
        pass
    return sorted(libs)


def version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------- a DAG as a chain of layers
class Layer:
    """One sparse layer of a chain: ``act(x @ W.T + b)`` with W [n_out, n_in] in scipy CSR."""

    def __init__(self, W: sp.csr_matrix, b: torch.Tensor, act):
        self.W, self.b, self.act = W, b, act
        self.out_index: Optional[torch.Tensor] = None  # last layer: the outputs' rows, None when all in order


def layer_chain(dag) -> Optional[List[Layer]]:
    """The DAG as a chain of layers when it is one: inputs are the first n_inputs neurons (level 0), every
    edge into level L comes from level L-1, one activation per level, the outputs lie in the last level.
    None otherwise (skip edges: the deep generator nets). Pruned MLPs and RadiX-Nets are chains."""
    lv = dag.levels()
    depth = int(lv.max()) if lv.size else 0
    if depth < 1 or not np.array_equal(np.flatnonzero(lv == 0), np.arange(dag.n_inputs)):
        return None
    src, dst = dag.edges()
    if np.any(lv[src] != lv[dst] - 1):
        return None
    outputs = np.asarray(dag.outputs, dtype=np.int64)
    if outputs.size == 0 or np.any(lv[outputs] != depth):
        return None
    w = dag.weight.detach().numpy().astype(np.float32)
    pos = np.empty(dag.n_neurons, dtype=np.int64)
    level_neurons = [np.flatnonzero(lv == L) for L in range(depth + 1)]
    for neurons in level_neurons:
        pos[neurons] = np.arange(neurons.size)
    order = np.argsort(lv[dst], kind="stable")
    bounds = np.searchsorted(lv[dst][order], np.arange(1, depth + 2))
    layers = []
    for L in range(1, depth + 1):
        neurons = level_neurons[L]
        acts = np.unique(dag.act_index[neurons])
        if acts.size != 1:
            return None
        e = order[bounds[L - 1]:bounds[L]]
        W = sp.csr_matrix((w[e], (pos[dst[e]], pos[src[e]])), shape=(neurons.size, level_neurons[L - 1].size),
                          dtype=np.float32)
        W.sum_duplicates()
        W.sort_indices()
        layers.append(Layer(W, dag.bias[torch.from_numpy(neurons)].detach().clone().float(),
                            dag.activations[int(acts[0])]))
    last = pos[outputs]
    layers[-1].out_index = None if np.array_equal(last, np.arange(level_neurons[-1].size)) else torch.from_numpy(last)
    return layers


def dense_sequential(dag) -> Optional[nn.Sequential]:
    """The masked dense ``nn.Sequential`` (zeros in the weights) of a layered DAG, for the ONNX export."""
    if dag.layer_sizes is None:
        return None
    mods = []
    for W, b, act in dag.to_dense_layers():
        lin = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        mods += [lin, act.to_module()]
    return nn.Sequential(*mods).eval()


def check_close(got: torch.Tensor, ref: torch.Tensor, rtol=1e-3, atol=1e-3) -> Optional[str]:
    """None when close; otherwise why not (the caller does not time an anchor that fails)."""
    if got.shape != ref.shape:
        return f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if not torch.allclose(got, ref, rtol=rtol, atol=atol):
        return f"max abs difference {(got - ref).abs().max().item():.3g} (rtol={rtol}, atol={atol})"
    return None


# ---------------------------------------------------------------------- SparseProp
def sparseprop_available() -> bool:
    try:
        import sparseprop.modules  # noqa: F401
        return True
    except Exception:  # noqa: BLE001  (ImportError, or a build of its extension that does not load)
        return False


def sparseprop_status() -> str:
    if not sparseprop_available():
        return "SparseProp absent (pip install -r benchmarks/requirements.txt)"
    return f"sparseprop {version('sparseprop') or '?'}"


def _sparseprop_layer(layer: Layer):
    from sparseprop.modules import SparseLinear
    n_out, n_in = layer.W.shape
    bias = nn.Parameter(layer.b.clone())
    if n_out * n_in * 4 <= SPARSEPROP_DENSE_LIMIT:
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(layer.W.toarray()))
            lin.bias.copy_(layer.b)
        return SparseLinear.from_dense(lin)  # the library's own constructor
    # Too big to densify (RadiX-Net levels): the fields SparseLinear.__init__ sets, from our CSR.
    mod = SparseLinear.__new__(SparseLinear)
    nn.Module.__init__(mod)
    mod.N, mod.M = n_out, n_in
    mod.W_val = nn.Parameter(torch.from_numpy(layer.W.data.astype(np.float32)))
    mod.W_idx = (torch.from_numpy(layer.W.indptr.astype(np.int32)), torch.from_numpy(layer.W.indices.astype(np.int32)))
    mod.bias = bias
    return mod


class SparsePropChain:
    """SparseProp's ``SparseLinear`` forward, one layer at a time, each followed by its activation.
    SparseProp parallelises with OpenMP; in one process with torch it shares torch's libgomp (one
    runtime, see ``openmp_runtimes``), so torch.set_num_threads sets its threads too."""

    def __init__(self, layers: List[Layer]):
        self.mods = [_sparseprop_layer(layer) for layer in layers]
        self.acts = [layer.act for layer in layers]
        self.out_index = layers[-1].out_index

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for mod, act in zip(self.mods, self.acts):
            x = act.apply(mod(x))
        return x if self.out_index is None else x[:, self.out_index]


def sparseprop_chain(dag) -> Optional[SparsePropChain]:
    """A SparseProp executor of the DAG, or None when SparseProp is absent or the DAG is not a chain."""
    if not sparseprop_available():
        return None
    layers = layer_chain(dag)
    return None if layers is None else SparsePropChain(layers)


# ---------------------------------------------------------------------- DeepSparse
def deepsparse_available() -> bool:
    return os.path.exists(DEEPSPARSE_PYTHON)


def deepsparse_status() -> str:
    if not deepsparse_available():
        return DEEPSPARSE_ABSENT
    r = subprocess.run([DEEPSPARSE_PYTHON, "-c", "import deepsparse; print(deepsparse.__version__)"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, NM_DISABLE_ANALYTICS="1"))
    if r.returncode != 0:
        return f"DeepSparse venv broken ({(r.stderr.strip().splitlines() or ['?'])[-1]}): " \
               "run bash benchmarks/deepsparse_venv.sh --force"
    return f"deepsparse {r.stdout.strip()} (own venv, benchmarks/.deepsparse-venv)"


def export_onnx(model: nn.Module, n_inputs: int, path: str) -> None:
    """torch 2.13's TorchScript exporter (dynamo=False), batch dimension dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2, n_inputs),), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


class DeepSparseResult(dict):
    """{B: seconds or None}, with ``.errors`` {B: message}, ``.note`` (a line for the report) and
    ``.compile_s``."""
    errors: Dict[int, str]
    note: str
    compile_s: Dict[int, float]


def deepsparse_times(dag, xs: Dict[int, torch.Tensor], threads: int, rounds: int,
                     timeout: float = 1800.0) -> DeepSparseResult:
    """Time DeepSparse on the masked dense model of ``dag`` for each batch size in ``xs`` (inputs given,
    so the check runs on the timed input). Empty result, with a note, when DeepSparse cannot run it."""
    res = DeepSparseResult()
    res.errors, res.compile_s, res.note = {}, {}, ""
    if not deepsparse_available():
        res.note = DEEPSPARSE_ABSENT
        return res
    model = dense_sequential(dag)
    if model is None:
        res.note = "DeepSparse: not a layered net (no dense model to export)"
        return res
    with tempfile.TemporaryDirectory(prefix="iosparse-deepsparse-") as tmp:
        onnx_path, check_path = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "check.npz")
        try:
            export_onnx(model, dag.n_inputs, onnx_path)
        except Exception as e:  # noqa: BLE001
            res.note = f"DeepSparse: ONNX export failed ({type(e).__name__}: {e}); pip install -r benchmarks/requirements.txt"
            return res
        with torch.no_grad():
            arrays = {}
            for B, x in xs.items():
                arrays[f"x_{B}"] = x.numpy().astype(np.float32)
                arrays[f"ref_{B}"] = model(x).numpy()
        np.savez(check_path, **arrays)
        cmd = [DEEPSPARSE_PYTHON, DEEPSPARSE_RUNNER, onnx_path, check_path, "--threads", str(threads),
               "--rounds", str(rounds)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               env=dict(os.environ, NM_DISABLE_ANALYTICS="1"))
        except subprocess.TimeoutExpired:
            res.note = f"DeepSparse: runner timed out after {timeout:.0f} s"
            return res
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = " | ".join((r.stderr.strip() or r.stdout.strip()).splitlines()[-3:])
        res.note = f"DeepSparse: runner failed (status {r.returncode}): {tail}"
        return res
    out = json.loads(lines[-1])
    for B, t in out["results"].items():
        res[int(B)] = t
    res.errors = {int(B): m for B, m in out["errors"].items()}
    res.compile_s = {int(B): s for B, s in out["compile_s"].items()}
    res.note = f"deepsparse {out['version']}"
    return res


if __name__ == "__main__":  # python benchmarks/anchors.py: what is installed
    print(cpu_model())
    print(sparseprop_status())
    print(deepsparse_status())
    sys.exit(0)
