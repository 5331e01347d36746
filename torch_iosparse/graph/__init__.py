"""The network as a graph: :mod:`.dag` (SparseDAG: the CSR structure, levels, and the reference evaluator
``forward_reference``), :mod:`.activations` (the activation functions by code), :mod:`.generate`
(network generators: I/O-optimal networks, RadiX-Nets, layered masks)."""
from . import activations, dag, generate
from .activations import Activation
from .dag import GraphError, SparseDAG

__all__ = ["Activation", "GraphError", "SparseDAG", "activations", "dag", "generate"]
