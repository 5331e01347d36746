"""Tools around a model: :mod:`.explain` (tables, plots, plan folders), :mod:`.cli` (``python -m
torch_iosparse``), :mod:`.demo` (``python -m torch_iosparse.tools.demo``, ``make demo``) and :mod:`.sdgc`
(the Sparse DNN Graph Challenge runner). Only :mod:`.explain` is imported with the package."""
from . import explain

__all__ = ["explain"]
