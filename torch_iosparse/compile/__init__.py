"""Compile a planned network for the op: :mod:`.program` (the program format, the compiler of a Plan,
the reference interpreter) and :mod:`.prepare` (the op's buffers and meta, the panel / block layouts)."""
from . import prepare, program
from .prepare import CompiledNetwork
from .program import Program, compile_plan
