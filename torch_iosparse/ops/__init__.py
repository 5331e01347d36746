"""The differentiable op ``torch.ops.iosparse.dag_forward`` and its Python face.

``ops.prepare(dag, plan)`` compiles a network once (:mod:`torch_iosparse.compile.prepare`);
``ops.dag_forward(x, weight, bias, net.buffers, net.meta)`` evaluates it (:mod:`.registry`: schemas' Python
side, fake kernels, autograd, vmap, autocast); :mod:`.reference` holds the pure-PyTorch reference kernels.
The argument orders and strategy codes come from :mod:`torch_iosparse.abi`.
"""
from ..abi import BLOCK_KEYS, CONFIG_KEYS, NET_DTYPES, NET_KEYS, NEVER, PANEL_KEYS
from ..abi import STRATEGY_CODES as STRATEGIES
from ..compile.prepare import (BLOCK_CHUNK_EDGES, PANEL_MAX_ROWS, PANEL_MIN_EFFICIENCY, PANEL_SCAN_LIMIT,
                               CompiledNetwork, _empty_buffers, _op_args, block_buffers, clear_panel_weight_cache,
                               panel_buffers, panel_weight_cache_size, prepare, structure_buffers)
from . import reference, registry
from .reference import (SPARSE_MM_MIN_WORK, _levels_of, _reference_levels, differentiable_backward,
                        reference_backward, reference_forward)
from .registry import dag_forward

__all__ = [
    "BLOCK_KEYS", "CONFIG_KEYS", "NET_DTYPES", "NET_KEYS", "NEVER", "PANEL_KEYS", "STRATEGIES",
    "BLOCK_CHUNK_EDGES", "PANEL_MAX_ROWS", "PANEL_MIN_EFFICIENCY", "PANEL_SCAN_LIMIT",
    "CompiledNetwork", "block_buffers", "clear_panel_weight_cache", "panel_buffers", "panel_weight_cache_size",
    "prepare", "structure_buffers", "dag_forward", "differentiable_backward", "reference_backward",
    "reference_forward",
]
