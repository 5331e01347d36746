"""torch_iosparse: I/O-efficient inference of sparse (pruned) neural networks.

Implements the model of Gleinig, Ben-Nun & Hoefler, *A Theory of I/O-Efficient Sparse Neural Network
Inference* (2023): a network is a DAG of neurons computed in a fast memory of M slots; we count and
minimise the transfers (I/Os) between fast and slow memory. See docs/theory.md.
"""
from .activations import Activation
from .dag import GraphError, SparseDAG
from .iomodel import IOCount, count_io, lower_bound, simulate, simulate_reference, trace, upper_bound
from .planning import Plan, PlanError, brute_force_optimum, plan

__version__ = "0.1.0"

__all__ = [
    "Activation", "GraphError", "SparseDAG", "IOCount", "count_io", "lower_bound", "upper_bound",
    "simulate", "simulate_reference", "trace", "Plan", "PlanError", "plan", "brute_force_optimum",
]
