"""The shared network helpers (torch_iosparse.testing.networks) themselves: random DAGs are valid, the
schedule checker rejects broken traces, and every sample input is a valid network with an input batch."""
import pytest
import torch
from hypothesis import given

import torch_iosparse as tis
from torch_iosparse.testing.networks import check_schedule, dags, sample_inputs


@given(dags())
def test_random_dags_are_valid(dag):
    src, dst = dag.edges()
    assert (dst >= dag.n_inputs).all()
    fan_in = dag.in_degree()[dag.n_inputs:]
    assert fan_in.min() >= 1 and fan_in.max() <= 64
    assert dag.n_outputs >= 1
    lv = dag.levels()
    assert (lv[src] < lv[dst]).all()


def test_check_schedule_rejects_a_broken_trace():
    dag = tis.SparseDAG.from_edges(2, [0, 1, 2], [2, 2, 3])
    events = tis.trace(dag, [2, 3], 2)
    assert check_schedule(dag, events, 2) == tis.count_io(dag, [2, 3], 2)
    broken = [e for e in events if not (e.op == "load" and e.neuron == 1)]
    with pytest.raises(AssertionError):
        check_schedule(dag, broken, 2)
    with pytest.raises(AssertionError):  # more slots than allowed
        check_schedule(dag, events, 1)


def test_sample_inputs_are_valid_networks_with_batches():
    samples = sample_inputs("cpu", torch.float32, requires_grad=True)
    assert len({s.name for s in samples}) == len(samples) >= 5
    for s in samples:
        assert s.x.shape == (s.x.shape[0], s.dag.n_inputs) and s.x.shape[0] > 0 and s.x.dtype == torch.float32
        assert s.weight.shape == (s.dag.n_edges,) and s.bias.shape == (s.dag.n_neurons,)
        assert s.x.requires_grad and s.weight.requires_grad and s.bias.requires_grad
    assert any(s.layered for s in samples) and not all(s.layered for s in samples)
