"""torch_iosparse: I/O-efficient inference of sparse (pruned) neural networks.

Implements the model of Gleinig, Ben-Nun & Hoefler, *A Theory of I/O-Efficient Sparse Neural Network
Inference* (2023): a network is a DAG of neurons computed in a fast memory of M slots; we count and
minimise the transfers (I/Os) between fast and slow memory. See docs/theory.md.

Public API (README.md): SparseDAG, count_io, lower_bound, upper_bound, plan / Plan, generate.*,
IOSparseNetwork, sparsify / sparsify_ (FusedInto: the pass-throughs of fused layers), densify, save / load
(sparse checkpoints), explain, sparsify_report, save_plans / apply_plans (plan folders), tune (measured
strategy choice, torch_iosparse.backends.cpu.tuning). The pipeline and the folder of each step:
docs/architecture.md.
"""
import sys as _sys

import torch as _torch

from . import graph, cost, planning, compile, ops, backends, nn, tools  # noqa: F401  (the pipeline, in order)
from .graph import generate
from .graph.activations import Activation
from .graph.dag import GraphError, SparseDAG
from .cost.iomodel import (OPS, Event, IOCount, count_io, lower_bound, normalize_memory, simulate, simulate_reference,
                           topological_order, trace, upper_bound)
from .planning import (Plan, PlanError, all_topological_orders, brute_force_optimum, cache, methods, plan,
                       register_method)
from .backends.cpu import tuning
from .backends.cpu.tuning import tune
from .nn import distributed
from .nn.module import IOSparseNetwork, MaskUpdate, remap_optimizer_state_, update_masks_
from .nn.sparsify import IOSparseConfig, sparsify, sparsify_
from .nn.chains import FusedInto
from .nn.checkpoint import densify, load, save
from .nn.distributed import build_replicated, pipeline_forward, sharded_forward
from .tools.explain import apply_plans, explain, plot_io_vs_memory, save_plans, sparsify_report

# A pickled object (``torch.save(model)`` of a whole model, a pickled SparseDAG or Plan) names each class by
# the module path it had when it was written: these one-word paths resolve to the modules that define the
# classes, so such files load.
for _name, _module in {"activations": graph.activations, "dag": graph.dag, "generate": graph.generate,
                       "iomodel": cost.iomodel, "planner": planning.heuristics, "cache": planning.cache,
                       "program": compile.program, "hardware": backends.cpu.hardware,
                       "strategy": backends.cpu.strategy, "tuning": backends.cpu.tuning, "module": nn.module,
                       "chains": nn.chains, "sparsify": nn.sparsify, "checkpoint": nn.checkpoint,
                       "distributed": nn.distributed, "explain": tools.explain}.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)

if _torch.cuda.is_available():  # Triton kernels for iosparse::dag_forward / dag_backward on CUDA
    try:
        from .backends.cuda import gpu  # noqa: F401
    except ImportError:  # no Triton: CUDA tensors run the op's PyTorch reference kernels
        pass

__version__ = "0.1.0"

__all__ = [
    "distributed", "build_replicated", "sharded_forward", "pipeline_forward",
    "Activation", "GraphError", "SparseDAG", "IOCount", "Event", "OPS", "count_io", "lower_bound", "upper_bound",
    "simulate", "simulate_reference", "trace", "topological_order", "normalize_memory",
    "Plan", "PlanError", "plan", "methods", "register_method", "brute_force_optimum", "all_topological_orders",
    "generate", "ops", "IOSparseNetwork", "IOSparseConfig", "sparsify", "sparsify_", "explain", "plot_io_vs_memory",
    "sparsify_report", "save_plans", "apply_plans", "cache",
    "tune", "tuning", "FusedInto", "densify", "save", "load", "MaskUpdate", "remap_optimizer_state_",
    "update_masks_",
]
