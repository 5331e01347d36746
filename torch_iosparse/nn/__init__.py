"""The user-facing modules: :mod:`.module` (IOSparseNetwork, mask updates), :mod:`.chains` and
:mod:`.sparsify` (finding and replacing chains of pruned Linear layers; IOSparseConfig), :mod:`.checkpoint`
(densify, sparse save / load) and :mod:`.distributed` (sharded and pipelined inference, training)."""
from . import chains, checkpoint, distributed, module, sparsify
from .module import IOSparseNetwork
from .sparsify import IOSparseConfig

__all__ = ["IOSparseNetwork", "IOSparseConfig", "chains", "checkpoint", "distributed", "module", "sparsify"]
