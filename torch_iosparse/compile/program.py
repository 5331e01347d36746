"""Compile a :class:`~torch_iosparse.planning.Plan` into a *Program*: the flat op stream a kernel executes.

The program is derived from the exact event trace of the I/O simulator (``iomodel.simulate(...,
record=True)``), so the memory traffic a kernel performs when it runs the program IS the plan's I/O count:
one ``LOAD`` per simulated load, one ``STORE`` per simulated store, one ``FMA`` per edge. The format is
specified in docs/program-format.md; :func:`interpret` is the pure-PyTorch reference executor.

Compilation is vectorised numpy over the event array (no Python loop per edge or event), so networks
with 10^7 edges compile in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..abi import OPCODE_NAMES, Opcode
from ..cost import iomodel
from ..cost.iomodel import IOCount
from ..graph import activations
from ..graph.dag import SparseDAG
from ..planning import Plan

# Opcodes of Program.ops (torch_iosparse.abi.Opcode), as plain ints for the numpy code below.
LOAD, FMA, FINISH, STORE = (int(op) for op in (Opcode.LOAD, Opcode.FMA, Opcode.FINISH, Opcode.STORE))

# Event codes of iomodel.OPS
_EV = {name: i for i, name in enumerate(iomodel.OPS)}


@dataclass
class Program:
    """A compiled plan (see docs/program-format.md).

    Attributes:
        n_inputs, n_outputs, n_computed: sizes of the network.
        memory: M, the number of fast-memory slots the op stream uses (for an unbounded plan, the
            peak number of slots the schedule occupies; never more than ``n_neurons + 1``).
        n_slow: rows of the slow buffer: inputs (rows ``0..n_inputs-1``), then every value the
            schedule stores (spilled intermediates and outputs), in order of their first store.
        neuron: int64 [n_computed], the neuron computed at plan position ``i``.
        act_code: int8 [n_computed] activation code (:class:`torch_iosparse.abi.ActCode`) of that neuron;
            act_lo / act_hi: float64 [n_computed] its clamp bounds (hardtanh only; float64 so that
            float64 runs clamp exactly where the reference does).
        op_ptr: int64 [n_computed + 1]; the ops of position ``i`` are ``ops[op_ptr[i]:op_ptr[i+1]]``.
        ops: int32 [K, 3] rows ``(opcode, a, b)``, opcodes :class:`torch_iosparse.abi.Opcode`. Every position
            starts with the implicit ``acc = bias[neuron[i]]``.
        output_rows: int64 [n_outputs], the slow row of each output, in ``dag.outputs`` order.
        io: the IOCount of the plan (== the op counts, checked at compile time).
        dag_hash: structure hash of the network it was compiled for.
    """

    n_inputs: int
    n_outputs: int
    n_computed: int
    memory: int
    n_slow: int
    neuron: np.ndarray
    act_code: np.ndarray
    act_lo: np.ndarray
    act_hi: np.ndarray
    op_ptr: np.ndarray
    ops: np.ndarray
    output_rows: np.ndarray
    io: IOCount
    dag_hash: str

    @property
    def n_ops(self) -> int:
        return int(self.ops.shape[0])

    def op_counts(self) -> dict:
        """``{"LOAD": k, "FMA": k, "FINISH": k, "STORE": k}`` counted from the op stream."""
        c = np.bincount(self.ops[:, 0], minlength=5) if self.n_ops else np.zeros(5, dtype=np.int64)
        return {name: int(c[code]) for code, name in OPCODE_NAMES.items()}

    def fma_edges(self) -> np.ndarray:
        """The edge index (into ``dag.weight``) of every FMA, in stream order (int64)."""
        return self.ops[self.ops[:, 0] == FMA, 2].astype(np.int64)

    def describe(self, limit: int = 40) -> str:
        """Human-readable listing of the first ``limit`` positions (for docs and debugging)."""
        lines = [f"Program: {self.n_computed} positions, M={self.memory} slots, {self.n_slow} slow rows, "
                 f"{self.n_ops} ops, io={self.io}"]
        for i in range(min(self.n_computed, limit)):
            lines.append(f"position {i}: neuron {int(self.neuron[i])}  acc = bias")
            for code, a, b in self.ops[self.op_ptr[i]:self.op_ptr[i + 1]].tolist():
                if code == LOAD:
                    lines.append(f"    LOAD   slot[{b}] = slow[{a}]")
                elif code == FMA:
                    lines.append(f"    FMA    acc += w[{b}] * slot[{a}]")
                elif code == FINISH:
                    lines.append(f"    FINISH slot[{a}] = act(acc)")
                else:
                    lines.append(f"    STORE  slow[{b}] = slot[{a}]")
        return "\n".join(lines)


def compile_plan(dag: SparseDAG, plan: Plan) -> Program:
    """Turn ``plan`` (made for ``dag``) into a :class:`Program` whose LOAD/STORE counts equal ``plan.io``.

    Raises :class:`~torch_iosparse.planning.PlanError` when the plan belongs to another network.
    """
    if not isinstance(dag, SparseDAG):
        raise TypeError(f"compile_plan takes a SparseDAG, got {type(dag).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"compile_plan takes a Plan, got {type(plan).__name__}")
    plan.check_dag(dag)
    io, events_t = iomodel.simulate(dag, plan.order, plan.memory, record=True)
    if io != plan.io:
        raise ValueError(f"the plan's recorded I/O {plan.io} differs from a fresh simulation {io}; "
                         "the plan is stale or corrupt")
    ev = events_t.numpy()
    op, a, b, slot = ev[:, 0], ev[:, 1].astype(np.int64), ev[:, 2].astype(np.int64), ev[:, 3]
    n_in, n_comp = dag.n_inputs, dag.n_computed

    # Plan position of each event: the number of INITs at or before it, minus one (stores of an
    # eviction that happen before an INIT belong to the previous position, after its FINISH).
    is_init = op == _EV["init"]
    position = np.cumsum(is_init) - 1
    neuron = a[is_init]
    if neuron.size != n_comp:
        raise AssertionError("simulator trace has the wrong number of INIT events")

    # Slow rows: inputs are 0..n_in-1; every stored neuron gets the next row at its (only) store.
    is_store = op == _EV["store"]
    stored = a[is_store]
    if np.unique(stored).size != stored.size:
        raise AssertionError("a value was stored twice; the simulator contract says at most once")
    slow_row = np.full(dag.n_neurons, -1, dtype=np.int64)
    slow_row[:n_in] = np.arange(n_in)
    slow_row[stored] = n_in + np.arange(stored.size)
    n_slow = n_in + stored.size

    keep = (op == _EV["load"]) | (op == _EV["fma"]) | (op == _EV["finish"]) | is_store
    k_op, k_a, k_b, k_slot, k_pos = op[keep], a[keep], b[keep], slot[keep], position[keep]
    ops = np.empty((k_op.size, 3), dtype=np.int64)
    # LOAD (slow_row, slot)
    sel = k_op == _EV["load"]
    ops[sel, 0], ops[sel, 1], ops[sel, 2] = LOAD, slow_row[k_a[sel]], k_slot[sel]
    if (slow_row[k_a[sel]] < 0).any():
        raise AssertionError("a value is loaded before it was ever stored")
    # FMA (slot, edge): the simulator walks each neuron's in-edges in CSR order, so the FMAs of the
    # whole trace are the concatenation of the in-edge ranges of the neurons in plan order.
    sel = k_op == _EV["fma"]
    starts = dag.in_ptr[neuron]
    counts = dag.in_ptr[neuron + 1] - starts
    edges = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    if edges.size != int(sel.sum()):
        raise AssertionError("simulator trace has the wrong number of FMA events")
    if edges.size and not np.array_equal(np.asarray(dag.in_src, dtype=np.int64)[edges], k_a[sel]):
        raise AssertionError("FMA events do not follow the in-edge CSR order")
    ops[sel, 0], ops[sel, 1], ops[sel, 2] = FMA, k_slot[sel], edges
    sel = k_op == _EV["finish"]
    ops[sel, 0], ops[sel, 1], ops[sel, 2] = FINISH, k_slot[sel], -1
    sel = k_op == _EV["store"]
    ops[sel, 0], ops[sel, 1], ops[sel, 2] = STORE, k_slot[sel], slow_row[k_a[sel]]

    op_ptr = np.zeros(n_comp + 1, dtype=np.int64)
    op_ptr[1:] = np.cumsum(np.bincount(k_pos, minlength=n_comp))
    peak = int(slot.max()) + 1 if slot.size else 1
    # A schedule never holds more than every neuron plus the partial sum at once, so a larger M changes
    # nothing but the size of the kernel's slot buffer (M = 2**62 would overflow it): cap it there.
    memory = peak if plan.memory is None else min(int(plan.memory), dag.n_neurons + 1)
    if peak > memory:
        raise AssertionError(f"the schedule uses {peak} slots but M is {memory}")

    out_rows = slow_row[np.asarray(dag.outputs, dtype=np.int64)]
    if (out_rows < 0).any():
        raise AssertionError("an output never reached slow memory")
    act_table_code = np.array([act.code for act in dag.activations], dtype=np.int8)
    act_table_lo = np.array([act.lo for act in dag.activations], dtype=np.float64)
    act_table_hi = np.array([act.hi for act in dag.activations], dtype=np.float64)
    ai = np.asarray(dag.act_index, dtype=np.int64)[neuron]

    prog = Program(
        n_inputs=n_in, n_outputs=dag.n_outputs, n_computed=n_comp, memory=int(memory), n_slow=int(n_slow),
        neuron=neuron.astype(np.int64), act_code=act_table_code[ai], act_lo=act_table_lo[ai],
        act_hi=act_table_hi[ai], op_ptr=op_ptr, ops=ops.astype(np.int32), output_rows=out_rows, io=io,
        dag_hash=dag.structure_hash())
    counts_ = prog.op_counts()
    if counts_["LOAD"] != io.loads or counts_["STORE"] != io.stores or counts_["FMA"] != io.weights:
        raise AssertionError(f"compiled op counts {counts_} disagree with the plan's I/O {io}")
    return prog


# ---------------------------------------------------------------------- reference interpreter
def interpret(program: Program, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              *, poison: float = float("nan")) -> torch.Tensor:
    """Pure-PyTorch executor of ``program`` (one Python step per op; small networks only).

    ``x``: [batch, n_inputs]; ``weight``: edge weights in in-edge order; ``bias``: per neuron.
    Slots and slow rows start filled with ``poison`` so reading a value that was never written shows up
    as NaN in the result. Returns [batch, n_outputs] in ``x.dtype``.
    """
    dt = x.dtype
    batch = x.shape[0]
    slots = torch.full((program.memory, batch), poison, dtype=dt)
    slow = torch.full((program.n_slow, batch), poison, dtype=dt)
    slow[: program.n_inputs] = x.t()
    w = weight.to(dt)
    bvec = bias.to(dt)
    for i in range(program.n_computed):
        acc = bvec[int(program.neuron[i])].expand(batch).clone()
        for code, a, b in program.ops[program.op_ptr[i]:program.op_ptr[i + 1]].tolist():
            if code == LOAD:
                slots[b] = slow[a]
            elif code == FMA:
                acc = acc + w[b] * slots[a]
            elif code == FINISH:
                slots[a] = activations.forward(int(program.act_code[i]), acc, float(program.act_lo[i]),
                                               float(program.act_hi[i]))
            elif code == STORE:
                slow[b] = slots[a]
            else:
                raise ValueError(f"bad opcode {code} at position {i}")
    return slow[torch.from_numpy(program.output_rows)].t().contiguous()


def program_tensors(program: Program) -> dict:
    """The program's arrays as torch tensors (the names ops.prepare uses as buffers)."""
    return {
        "prog_neuron": torch.from_numpy(np.ascontiguousarray(program.neuron, dtype=np.int64)),
        "prog_op_ptr": torch.from_numpy(np.ascontiguousarray(program.op_ptr, dtype=np.int64)),
        "prog_ops": torch.from_numpy(np.ascontiguousarray(program.ops, dtype=np.int32)),
        "prog_output_rows": torch.from_numpy(np.ascontiguousarray(program.output_rows, dtype=np.int64)),
    }



# ---------------------------------------------------------------------- neuron groups (register reuse)
def group_positions(program: Program, dag: SparseDAG, max_group: int = 4) -> np.ndarray:
    """Partition the plan positions into groups of up to ``max_group`` consecutive positions that the
    kernel computes together, reading each source slot once for the whole group.

    A position j joins the group of the position before it when it reads exactly the same sources from
    exactly the same slots in the same order, performs no LOAD (its sources are all resident) and has
    nothing but FMAs before its FINISH. Then
    every FMA of j can run at the moment the first position of the group runs its FMA with the same
    index, and j's FINISH/STOREs afterwards, in order: the I/O is unchanged (the op stream is the same,
    only FMAs are reordered). Returns ``group_ptr`` (int64 [n_groups + 1]) over positions.
    """
    n = program.n_computed
    ops = program.ops
    pos_of_op = np.repeat(np.arange(n), np.diff(program.op_ptr))
    is_fma = ops[:, 0] == FMA
    fma_pos = pos_of_op[is_fma]
    fma_slot = ops[is_fma, 1].astype(np.int64)
    fma_src = np.asarray(dag.in_src, dtype=np.int64)[ops[is_fma, 2]]
    k = np.bincount(fma_pos, minlength=n)                    # FMAs per position
    first = np.zeros(n + 1, dtype=np.int64)
    first[1:] = np.cumsum(k)
    # A member's ops must be exactly [FMA x k, FINISH, STORE...]: no LOAD at all and nothing but FMAs
    # before its FINISH (the kernel jumps straight to the FINISH of a member).
    op_index = np.arange(ops.shape[0])
    finish_index = np.full(n, -1, dtype=np.int64)
    finish_index[pos_of_op[ops[:, 0] == FINISH]] = op_index[ops[:, 0] == FINISH]
    early = (ops[:, 0] != FMA) & (op_index < finish_index[pos_of_op])
    irregular = np.bincount(pos_of_op[early | (ops[:, 0] == LOAD)], minlength=n)
    # candidate j (>= 1): same FMA count as j-1 and a regular op list
    cand = np.zeros(n, dtype=bool)
    cand[1:] = (k[1:] == k[:-1]) & (irregular[1:] == 0)
    # element-wise comparison of j's FMA t with (j-1)'s FMA t, for candidate positions only
    t = np.arange(fma_pos.size)
    prev_t = t - k[fma_pos]
    ok_t = cand[fma_pos]
    safe = np.where(ok_t, prev_t, 0)
    ok_t &= (fma_slot == fma_slot[safe]) & (fma_src == fma_src[safe])
    mismatch = np.bincount(fma_pos[~ok_t], minlength=n)
    joins = cand & (mismatch == 0)
    # Break chains into groups of at most max_group: a position starts a group unless it joins and
    # the running group is not full.
    starts = []
    size = 0
    # (loop over positions, not edges: n_computed is small next to the edge count)
    for i, j in enumerate(joins.tolist()):
        if j and size < max_group:
            size += 1
        else:
            starts.append(i)
            size = 1
    return np.array(starts + [n], dtype=np.int64)
