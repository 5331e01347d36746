"""Helpers shared by the tests and the benchmarks (not tests themselves; they need hypothesis):
:mod:`.networks` (:func:`sample_inputs`, random and structured networks, a schedule checker, a naive
evaluator), :mod:`.models` (small PyTorch models), :mod:`.checks` (tolerances, running the op, forcing an
ISA), :mod:`.program_ref` (an independent executor of the program format), :mod:`.fuzz_cases` (the op's
bounded fuzzer) and :mod:`.planner_bench` (planner benchmark helpers)."""
from .checks import cast, run, run_under_isa, tol
from .models import nested, pruned_encoder, pruned_sequential
from .networks import (ALL_ACTIVATIONS, MEMORIES, Sample, dags, pruned_mlp, radix_like, random_dag, random_dags,
                       random_topological_order, sample_inputs)
