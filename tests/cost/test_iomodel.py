"""The exact I/O simulator: native == pure-Python reference (counts and event traces), every trace is a
valid schedule of the cost model, LB <= count <= UB <= 2 LB, and on tiny DAGs LB <= brute-force optimum
<= two_optimal count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_iosparse as tis
from torch_iosparse import planning
from torch_iosparse.cost import iomodel
from torch_iosparse.testing.networks import MEMORIES, check_schedule, dags, random_edges, random_topological_order

memories = st.sampled_from(MEMORIES)
# the property tests are cheap (ms per example): run more examples than the profile's default
MORE = settings(max_examples=5 * settings.default.max_examples)


@MORE
@given(dags(max_computed=24), memories, st.integers(0, 2**31 - 1))
def test_native_equals_reference_counts_and_traces(dag, memory, seed):
    orders = [tis.plan(dag, memory).order, random_topological_order(dag, np.random.default_rng(seed))]
    for order in orders:
        native_io, native_ev = iomodel.simulate(dag, order, memory, record=True)
        ref_io, ref_ev = tis.simulate_reference(dag, order, memory)
        assert native_io == ref_io
        assert tis.trace(dag, order, memory) == ref_ev
        assert check_schedule(dag, ref_ev, memory) == ref_io
        assert tis.count_io(dag, order, memory) == native_io


@MORE
@given(dags(max_inputs=64, max_computed=40), st.integers(0, 2**31 - 1))
def test_bounds_hold_for_every_memory(dag, seed):
    lb_inf = tis.lower_bound(dag, None)
    order = random_topological_order(dag, np.random.default_rng(seed))
    for memory in MEMORIES:
        lb, ub = tis.lower_bound(dag, memory), tis.upper_bound(dag, memory)
        assert lb == lb_inf
        for io in (tis.plan(dag, memory).io, tis.count_io(dag, order, memory)):
            assert io.weights == dag.n_edges and io.biases == dag.n_computed
            assert lb <= io.total <= ub <= 2 * lb, (memory, io, lb, ub)
    # With unbounded memory nothing is evicted: the count is exactly the lower bound.
    assert tis.count_io(dag, order, None).total == lb_inf == tis.upper_bound(dag, None)


@settings(max_examples=25)
@given(dags(max_inputs=5, max_computed=7, max_fan_in=6), memories)
def test_brute_force_between_lower_bound_and_two_optimal(dag, memory):
    order, best = tis.brute_force_optimum(dag, memory)
    two_opt = tis.plan(dag, memory, "two_optimal").io
    assert tis.lower_bound(dag, memory) <= best.total <= two_opt.total <= tis.upper_bound(dag, memory)
    assert tis.count_io(dag, order, memory) == best
    # brute force really visits every order: none is cheaper than what it returns
    for o in planning.all_topological_orders(dag):
        assert tis.count_io(dag, o, memory).total >= best.total


@pytest.mark.parametrize("seed", [0, 1])
def test_brute_force_with_eight_computed_neurons(seed):
    rng = np.random.default_rng(seed)
    src, dst = random_edges(rng, 4, 8, max_fan_in=3, layered=True, n_layers=3, skip_prob=0.3)
    dag = tis.SparseDAG.from_edges(4, src, dst)
    assert dag.n_computed == 8
    for memory in (2, 3, 4):
        _, best = tis.brute_force_optimum(dag, memory)
        assert tis.lower_bound(dag, memory) <= best.total <= tis.plan(dag, memory).io.total


def test_all_topological_orders_counts_linear_extensions():
    # three independent neurons: 3! orders; a chain: exactly one
    free = tis.SparseDAG.from_edges(1, [0, 0, 0], [1, 2, 3])
    assert len(list(planning.all_topological_orders(free))) == 6
    chain = tis.SparseDAG.from_edges(1, [0, 1, 2], [1, 2, 3])
    assert [o.tolist() for o in planning.all_topological_orders(chain)] == [[1, 2, 3]]
    with pytest.raises(ValueError, match="brute force is limited"):
        tis.brute_force_optimum(tis.SparseDAG.from_edges(1, [0] * 9, list(range(1, 10))), 2)


def test_large_fan_in_layered_and_skip():
    # fan-in 64 and skip edges, beyond what the hypothesis strategy usually reaches
    rng = np.random.default_rng(7)
    src, dst = random_edges(rng, 70, 12, max_fan_in=64, min_fan_in=60, layered=True, n_layers=3, skip_prob=0.3)
    dag = tis.SparseDAG.from_edges(70, src, dst)
    assert dag.in_degree()[70:].max() >= 60
    for memory in MEMORIES:
        order = tis.plan(dag, memory).order
        io, ev = tis.simulate_reference(dag, order, memory)
        assert tis.count_io(dag, order, memory) == io
        assert tis.trace(dag, order, memory) == ev
        assert tis.lower_bound(dag, memory) <= io.total <= tis.upper_bound(dag, memory)


@pytest.mark.parametrize("layered", [True, False])
def test_native_equals_reference_on_medium_graphs(layered):
    rng = np.random.default_rng(11 + layered)
    src, dst = random_edges(rng, 40, 120, max_fan_in=16, layered=layered, n_layers=5, skip_prob=0.25)
    dag = tis.SparseDAG.from_edges(40, src, dst)
    order = random_topological_order(dag, rng)
    for memory in (3, 17):
        io, ev = tis.simulate_reference(dag, order, memory)
        assert tis.count_io(dag, order, memory) == io
        assert tis.trace(dag, order, memory) == ev
        assert check_schedule(dag, ev, memory) == io


def test_worked_example_by_hand():
    # inputs 0,1; h2 = f(x0, x1); h3 = f(h2); y4 = f(x0, h3). With M = 2 the schedule must evict h3 to
    # load x0 for y4 (in-edges are read in ascending source order), then reload it: 1 extra store + load.
    dag = tis.SparseDAG.from_edges(2, [0, 1, 2, 0, 3], [2, 2, 3, 4, 4])
    io = tis.count_io(dag, [2, 3, 4], 2)
    assert io == tis.IOCount(weights=5, biases=3, loads=4, stores=2)
    assert tis.lower_bound(dag, 2) == 5 + 3 + 2 + 1
    # with three slots x0 and h3 stay resident: each input is loaded once, only the output stored (= LB)
    assert tis.count_io(dag, [2, 3, 4], 3) == tis.IOCount(weights=5, biases=3, loads=2, stores=1)
    ops = [(e.op, e.neuron) for e in tis.trace(dag, [2, 3, 4], 2)]
    assert ("store", 3) in ops and ops.count(("load", 0)) == 2


def test_bias_only_neurons_and_unused_inputs():
    # neuron 3 has no in-edges (a constant), input 1 is never read
    dag = tis.SparseDAG.from_edges(2, [0, 3], [2, 4], n_neurons=5, bias=[0, 0, 1, 2, 3])
    for memory in MEMORIES:
        order = tis.plan(dag, memory).order
        io, ev = tis.simulate_reference(dag, order, memory)
        assert tis.count_io(dag, order, memory) == io
        check_schedule(dag, ev, memory)
    assert tis.lower_bound(dag) == 2 + 3 + 1 + 2  # edges + biases + used inputs + outputs (2 and 4)
    y = dag.forward_reference(torch.zeros(1, 2))
    assert y.tolist() == [[1.0, 3.0 + 2.0]]  # relu(1), relu(3 + 2·1)


def test_outputs_that_are_read_later_are_stored_once():
    # 1 is an output and feeds 2; whether or not it is evicted, it is stored exactly once
    dag = tis.SparseDAG.from_edges(1, [0, 0, 1], [1, 2, 2], outputs=[2, 1])
    for memory in MEMORIES:
        io, ev = tis.simulate_reference(dag, [1, 2], memory)
        assert sum(1 for e in ev if e.op == "store" and e.neuron == 1) == 1
        assert tis.count_io(dag, [1, 2], memory) == io
        if memory is None or memory >= 3:  # room for x0, h1 and the partial sum of 2: nothing evicted
            assert io == tis.IOCount(3, 2, 1, 2)


def test_plan_count_matches_count_io_and_order_semantics():
    rng = np.random.default_rng(3)
    src, dst = random_edges(rng, 6, 10, max_fan_in=4, layered=False)
    dag = tis.SparseDAG.from_edges(6, src, dst)
    p = tis.plan(dag, 3)
    assert p.order.tolist() == list(range(6, 16))  # numbering is topological: the plan keeps it
    assert p.io == tis.count_io(dag, p.order, 3) == tis.count_io(dag, p, 3)
    # the inputs may be listed in an order: they are skipped
    assert tis.count_io(dag, np.arange(16), 3) == p.io


def test_native_op_guards_direct_callers():
    dag = tis.SparseDAG.from_edges(1, [0, 1], [1, 2])
    ops = tis._native.ops()
    ip, src, out = (torch.from_numpy(dag.in_ptr.astype(np.int64)), torch.from_numpy(dag.in_src.astype(np.int64)),
                    torch.from_numpy(dag.is_output_mask()))
    with pytest.raises(RuntimeError, match="not topological"):
        ops.simulate(ip, src, torch.tensor([2, 1]), out, 1, 2, False)
    with pytest.raises(RuntimeError, match="twice"):
        ops.simulate(ip, src, torch.tensor([1, 1]), out, 1, 2, False)
    with pytest.raises(RuntimeError, match="memory must be"):
        ops.simulate(ip, src, torch.tensor([1, 2]), out, 1, 1, False)
    counts, _ = ops.simulate(ip, src.int(), torch.tensor([1, 2]), out, 1, 2, False)  # int32 sources work
    assert counts.tolist() == [2, 2, 1, 1]
