"""Planning: the order in which the computed neurons run, for a fast memory of M slots.

:mod:`.plans` holds :class:`Plan` (and its ``.npz`` file), the method registry behind :func:`plan`, the
2-optimal method and brute force; :mod:`.heuristics` the greedy, annealing and level-grouped orders;
:mod:`.cache` the on-disk plan cache. Every built-in method is registered here, in one place; a method of
your own is registered with :func:`register_method` (docs/extending.md).
"""
from . import heuristics, plans
from .plans import (PLAN_VERSION, Plan, PlanError, all_topological_orders, brute_force_optimum, methods, plan,
                    register_method)

register_method("two_optimal")(plans._two_optimal)
register_method("greedy")(heuristics._greedy)
register_method("anneal")(heuristics._anneal)
register_method("level_grouped")(heuristics._level_grouped)

from . import cache  # noqa: E402  (its cached_plan plans through the registry above)

__all__ = ["Plan", "PlanError", "PLAN_VERSION", "plan", "methods", "register_method", "brute_force_optimum",
           "all_topological_orders", "cache", "heuristics", "plans"]
