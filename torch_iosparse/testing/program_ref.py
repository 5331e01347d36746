"""Helpers for the program and GPU tests: compiled programs and an independent executor of the format.

``compile_program`` is ``torch_iosparse.compile.program.compile_plan`` (the one program format of both
backends); ``trace_program`` builds the same format straight from the event trace in plain Python
(docs/program-format.md), written independently, as a cross-check of it. ``run_program`` executes a program
op by op in PyTorch, the literal meaning of the format.
"""
from __future__ import annotations

import numpy as np
import torch

from torch_iosparse.abi import Opcode
from torch_iosparse.compile.program import compile_plan
from torch_iosparse.cost import iomodel
from torch_iosparse.cost.iomodel import normalize_memory

LOAD, FMA, FINISH, STORE = (int(op) for op in (Opcode.LOAD, Opcode.FMA, Opcode.FINISH, Opcode.STORE))


def trace_program(dag, plan) -> dict:
    """The compiled program of docs/program-format.md as a dict of numpy arrays, from iomodel.simulate's trace."""
    io, ev = iomodel.simulate(dag, plan.order, plan.memory, record=True)
    ev = ev.numpy()
    n_in = dag.n_inputs
    pos_of = {int(v): i for i, v in enumerate(plan.order)}
    row_of = {u: u for u in range(n_in)}
    next_row = n_in
    ops, op_pos = [], []
    cur = -1
    peak = 0
    for op, a, b, slot in ev.tolist():
        name = iomodel.OPS[op]
        peak = max(peak, slot + 1)
        if name == "init":
            cur = pos_of[a]
            continue
        if name == "load":
            ops.append((LOAD, row_of[a], slot))
        elif name == "fma":
            u, v = a, b
            lo, hi = dag.in_ptr[v], dag.in_ptr[v + 1]
            edge = lo + int(np.searchsorted(dag.in_src[lo:hi], u))
            ops.append((FMA, slot, edge))
        elif name == "finish":
            ops.append((FINISH, slot, -1))
        elif name == "store":
            if a not in row_of:
                row_of[a] = next_row
                next_row += 1
            ops.append((STORE, slot, row_of[a]))
        else:
            continue
        op_pos.append(cur)
    n_c = dag.n_computed
    op_ptr = np.zeros(n_c + 1, dtype=np.int64)
    op_ptr[1:] = np.cumsum(np.bincount(np.asarray(op_pos, dtype=np.int64), minlength=n_c))
    order = np.asarray(plan.order, dtype=np.int64)
    acts = [dag.activation_of(int(v)) for v in order]
    M = normalize_memory(plan.memory)
    return dict(
        n_inputs=n_in, n_outputs=dag.n_outputs, n_computed=n_c, memory=M if M is not None else peak,
        n_slow=next_row, neuron=order, act_code=np.array([a.code for a in acts], dtype=np.int8),
        act_lo=np.array([a.lo for a in acts], dtype=np.float32), act_hi=np.array([a.hi for a in acts], dtype=np.float32),
        op_ptr=op_ptr, ops=np.asarray(ops, dtype=np.int32).reshape(-1, 3),
        output_rows=np.array([row_of[int(o)] for o in dag.outputs], dtype=np.int64), io=io)


def compile_program(dag, plan):
    """The program both backends execute: program.compile_plan."""
    return compile_plan(dag, plan)


def field(program, name):
    return program[name] if isinstance(program, dict) else getattr(program, name)


def run_program(program, x, weight, bias) -> torch.Tensor:
    """Execute a program op by op in float64 (the literal semantics of the format)."""
    B = x.shape[0]
    n_in = int(field(program, "n_inputs"))
    slow = torch.full((int(field(program, "n_slow")), B), float("nan"), dtype=torch.float64)
    slow[:n_in] = x.t().double()
    slots = torch.full((int(field(program, "memory")), B), float("nan"), dtype=torch.float64)
    ops = np.asarray(torch.as_tensor(field(program, "ops")).reshape(-1, 3))
    op_ptr = np.asarray(torch.as_tensor(field(program, "op_ptr")))
    neuron = np.asarray(torch.as_tensor(field(program, "neuron")))
    codes = np.asarray(torch.as_tensor(field(program, "act_code")))
    lo = np.asarray(torch.as_tensor(field(program, "act_lo")))
    hi = np.asarray(torch.as_tensor(field(program, "act_hi")))
    from torch_iosparse.graph.activations import KINDS, Activation
    w, b = weight.double(), bias.double()
    for i in range(len(neuron)):
        acc = b[int(neuron[i])].expand(B).clone()
        for code, a, bb in ops[op_ptr[i]:op_ptr[i + 1]].tolist():
            if code == LOAD:
                slots[bb] = slow[a]
            elif code == FMA:
                acc = acc + w[bb] * slots[a]
            elif code == FINISH:
                act = Activation(KINDS[int(codes[i])], float(lo[i]), float(hi[i]))
                slots[a] = act.apply(acc)
            elif code == STORE:
                slow[bb] = slots[a]
            else:
                raise AssertionError(code)
    rows = torch.as_tensor(np.asarray(torch.as_tensor(field(program, "output_rows")), dtype=np.int64))
    return slow[rows].t()
