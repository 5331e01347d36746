"""Program compiler (torch_iosparse/compile/program.py): the reference interpreter of a compiled plan equals
dag.forward_reference, and the op stream's LOAD/STORE/FMA counts equal the plan's I/O."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_iosparse import SparseDAG, plan
from torch_iosparse.planning import Plan, PlanError
from torch_iosparse.compile import program as P
from torch_iosparse.testing.networks import random_dags, random_topological_order


def plan_with_order(dag, order, memory):
    from torch_iosparse.cost.iomodel import count_io
    return Plan(order, memory, count_io(dag, order, memory), "test", dag.structure_hash())


memories = st.sampled_from([2, 3, 4, 6, 10, None])


@given(dag=random_dags(), memory=memories, seed=st.integers(0, 1000), batch=st.sampled_from([0, 1, 3, 5]))
def test_interpreter_matches_reference_and_io(dag, memory, seed, batch):
    order = random_topological_order(dag, np.random.default_rng(seed))
    pl = plan_with_order(dag, order, memory)
    prog = P.compile_plan(dag, pl)
    counts = prog.op_counts()
    assert counts["LOAD"] == pl.io.loads
    assert counts["STORE"] == pl.io.stores
    assert counts["FMA"] == pl.io.weights == dag.n_edges
    assert counts["FINISH"] == dag.n_computed
    assert prog.op_ptr[-1] == prog.n_ops and np.all(np.diff(prog.op_ptr) >= 1)  # every position FINISHes
    if memory is not None:  # M, capped at what a schedule can hold (every neuron + the partial sum)
        assert prog.memory == min(memory, dag.n_neurons + 1)
    slots = np.concatenate([prog.ops[prog.ops[:, 0] == c, 2 if c == P.LOAD else 1] for c in (1, 2, 3, 4)])
    assert slots.size == 0 or (slots.min() >= 0 and slots.max() < prog.memory)
    # every edge exactly once, and each neuron's edges inside its own position
    edges = prog.fma_edges()
    assert np.array_equal(np.sort(edges), np.arange(dag.n_edges))
    src, dst = dag.edges()
    pos_of_op = np.repeat(np.arange(prog.n_computed), np.diff(prog.op_ptr))
    fma_pos = pos_of_op[prog.ops[:, 0] == P.FMA]
    assert np.array_equal(prog.neuron[fma_pos], dst[edges])
    x = torch.randn(batch, dag.n_inputs, dtype=torch.float64)
    got = P.interpret(prog, x, dag.weight, dag.bias)  # slots start as NaN: a stale read shows
    want = dag.forward_reference(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_worked_example_listing():
    dag = SparseDAG.from_edges(2, [0, 1, 2, 2, 3], [2, 2, 3, 4, 4], weight=[1.0, 2, 3, 4, 5])
    prog = P.compile_plan(dag, plan(dag, 2))
    assert prog.io.loads == 3 and prog.io.stores == 2
    # the spilled neuron 3 is stored once and reloaded once; output 4 lands in its own slow row
    assert prog.n_slow == 4
    assert prog.output_rows.tolist() == [3]
    text = prog.describe()
    assert "STORE  slow[2] = slot[1]" in text and "LOAD   slot[0] = slow[2]" in text


def test_unbounded_plan_uses_peak_slots():
    dag = SparseDAG.from_edges(3, [0, 1, 2, 3, 4], [3, 4, 5, 6, 6])
    prog = P.compile_plan(dag, plan(dag, None))
    assert prog.io.stores == dag.n_outputs and prog.io.loads == 3
    used = prog.ops[np.isin(prog.ops[:, 0], [P.FMA, P.FINISH]), 1]
    assert prog.memory == used.max() + 1


def test_plan_of_other_network_is_rejected():
    a = SparseDAG.from_edges(2, [0, 1], [2, 2])
    b = SparseDAG.from_edges(2, [0, 1, 0], [2, 2, 3])
    with pytest.raises(PlanError, match="another network"):
        P.compile_plan(b, plan(a, 2))
    with pytest.raises(TypeError):
        P.compile_plan(a, "not a plan")


def test_compile_large_layered_net():
    # 200k edges through the vectorised compiler (timing belongs in benchmarks, not here).
    rng = np.random.default_rng(0)
    widths = [512] * 5
    src, dst = [], []
    off = np.cumsum([0] + widths)
    for k in range(len(widths) - 1):
        for v in range(widths[k + 1]):
            src.append(rng.choice(widths[k], size=100, replace=False) + off[k])
            dst.append(np.full(100, v + off[k + 1]))
    dag = SparseDAG.from_edges(512, np.concatenate(src), np.concatenate(dst))
    pl = plan(dag, 64)
    prog = P.compile_plan(dag, pl)
    c = prog.op_counts()
    assert c["FMA"] == dag.n_edges and c["LOAD"] == pl.io.loads and c["STORE"] == pl.io.stores
    assert np.array_equal(np.sort(prog.fma_edges()), np.arange(dag.n_edges))
