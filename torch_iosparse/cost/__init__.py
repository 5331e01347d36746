"""The cost model: :mod:`.iomodel` counts the I/Os (loads and stores between fast and slow memory) of an
order exactly (native simulator and a pure-Python reference), and gives the lower and upper bounds."""
from . import iomodel
from .iomodel import (OPS, Event, IOCount, count_io, lower_bound, normalize_memory, simulate, simulate_reference,
                      topological_order, trace, upper_bound)

__all__ = ["OPS", "Event", "IOCount", "count_io", "lower_bound", "normalize_memory", "simulate",
           "simulate_reference", "topological_order", "trace", "upper_bound", "iomodel"]
