"""The CPU backend: :mod:`.hardware` (caches, ISA, the tile and fast-memory sizes), :mod:`.strategy`
(the cost model that picks a path per batch size, calibration, the machine profile) and :mod:`.tuning`
(strategy choice by measurement, per machine, on disk)."""
from . import hardware, strategy, tuning

__all__ = ["hardware", "strategy", "tuning"]
