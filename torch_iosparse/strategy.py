"""Automatic choice between the three forward strategies of iosparse::dag_forward (placeholder model,
refined below)."""
from __future__ import annotations

NEVER = 2**62


def configure(net, dag, calibrate: bool = False) -> None:
    """Set net.meta['level_max_batch'] / ['dense_min_batch'] (the batch thresholds the kernel uses)."""
    bt = int(net.meta["batch_tile"])
    net.meta["level_max_batch"] = max(1, bt // 2)
    net.meta["dense_min_batch"] = NEVER
