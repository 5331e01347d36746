"""The raw op and the kernels against hostile and unlucky inputs: forged sizes and buffers raise clear errors
(never a crash or a read out of bounds), non-finite inputs give the reference's answer on every path, and a
failed allocation leaves the kernel usable."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_iosparse as tis
from torch_iosparse import SparseDAG, ops

STRATEGIES = ["program", "level", "panel", "block", "dense"]


def small_mlp(seed=0, widths=(12, 20, 16, 6), density=0.4):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(b, a, generator=g) < density)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def prepared(strategy, memory=4, seed=0):
    dag = SparseDAG.from_module(small_mlp(seed))
    return dag, ops.prepare(dag, memory=memory, strategy=strategy, batch_tile=16)


def call(dag, net, x, buffers=None, meta=None):
    return ops.dag_forward(x, dag.weight, dag.bias, buffers or net.buffers, meta or net.meta)


# ---------------------------------------------------------------------- 1: huge M
@pytest.mark.parametrize("memory", [2**62, 2**40, 10**9])
def test_huge_memory_runs_like_unbounded(memory):
    model = small_mlp()
    net = tis.IOSparseNetwork(model, memory=memory, strategy="program", cache=False)
    x = torch.randn(5, 12)
    torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)
    assert net.memory == memory  # the plan keeps the user's M; the kernel's slot buffer is capped
    assert net._op_meta["memory"] <= net.to_dag().n_neurons + 1


def test_memory_beyond_int64_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 2\\*\\*62"):
        tis.IOSparseNetwork(small_mlp(), memory=10**30, cache=False)


@pytest.mark.parametrize("key,value", [("memory", 2**62), ("memory", 0), ("n_slow", 2**62), ("n_slow", -1),
                                       ("n_neurons", 2**40), ("batch_tile", 0), ("n_inputs", 0)])
def test_forged_config_sizes_raise(key, value):
    dag, net = prepared("program")
    meta = dict(net.meta, **{key: value})
    with pytest.raises((ValueError, RuntimeError)):
        call(dag, net, torch.randn(3, 12), meta=meta)
    torch.testing.assert_close(call(dag, net, torch.randn(3, 12)).shape, torch.Size([3, 6]))


def test_forged_state_dict_memory_loads_and_runs():
    model = small_mlp()
    net = tis.IOSparseNetwork(model, memory=8, cache=False, strategy="program")
    state = net.state_dict()
    state["plan_memory"] = torch.tensor(2**62)
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = tis.IOSparseNetwork.from_state_dict(torch.load(buf, weights_only=True), strategy="program")
    x = torch.randn(4, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- 2: a failed allocation
@pytest.mark.skipif(os.environ.get("IOSPARSE_SANITIZED") == "1",
                    reason="AddressSanitizer reserves terabytes of address space: RLIMIT_AS cannot cap it")
def test_failed_allocation_leaves_the_kernel_usable():
    # In a child with a capped address space: a call whose scratch cannot be allocated raises; the next
    # call on the same thread (smaller) must still work.
    code = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        from torch_iosparse import SparseDAG, ops
        n_in = 60000
        dag = SparseDAG.from_edges(n_in, list(range(n_in)), [n_in + i % 4 for i in range(n_in)])
        net = ops.prepare(dag, memory=None, strategy="program", batch_tile=64)
        small = torch.randn(2, n_in)
        ops.dag_forward(small, dag.weight, dag.bias, net.buffers, net.meta)   # warm: small scratch
        big = torch.randn(64, n_in)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (8 << 20), hard))
        try:
            ops.dag_forward(big, dag.weight, dag.bias, net.buffers, net.meta)
            print("no-failure")
        except (RuntimeError, MemoryError) as e:
            print("raised", "out of memory" in str(e))
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        y = ops.dag_forward(small, dag.weight, dag.bias, net.buffers, net.meta)
        want = dag.forward_reference(small)
        print("ok", bool(torch.allclose(y, want, atol=1e-4)))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["raised", "True", "ok", "True"], r.stdout


# ---------------------------------------------------------------------- 4: the validation memo
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_writes_behind_the_version_counter_never_read_out_of_bounds(strategy):
    dag, net = prepared(strategy)
    x = torch.randn(5, 12)
    good = call(dag, net, x)
    bufs = {k: v.clone() for k, v in net.buffers.items()}
    call(dag, net, x, buffers=bufs)  # validated and memoised
    for key in ("in_src", "prog_ops", "panel_src", "panel_edge", "panel_target", "block_seg", "block_edge"):
        t = bufs[key]
        if t.numel() == 0:
            continue
        saved = t.clone()
        t.numpy().reshape(-1)[:] = 2**30  # through numpy: no version bump
        try:
            call(dag, net, x, buffers=bufs)  # may not read these buffers on this path; must not crash
        except ValueError as e:
            assert "behind PyTorch's back" in str(e) or "corrupt" in str(e)
        t.copy_(saved)
    torch.testing.assert_close(call(dag, net, x, buffers=bufs), good)


def test_corrupt_buffer_at_a_freed_valid_buffers_address_is_validated():
    dag, net = prepared("level")
    x = torch.randn(3, 12)
    for _ in range(20):  # the allocator hands freed blocks back: try to land at the old address
        bufs = dict(net.buffers, in_src=net.buffers["in_src"].clone())
        call(dag, net, x, buffers=bufs)
        addr = bufs["in_src"].data_ptr()
        del bufs["in_src"]
        bad = torch.full_like(net.buffers["in_src"], 10**6)
        bufs["in_src"] = bad
        with pytest.raises(ValueError, match="corrupt|behind"):
            call(dag, net, x, buffers=bufs)
        if bad.data_ptr() == addr:
            break


def test_inference_tensors_run_and_are_guarded():
    with torch.inference_mode():
        dag, net = prepared("level")
        x = torch.randn(4, 12)
        torch.testing.assert_close(call(dag, net, x), dag.forward_reference(x), rtol=1e-5, atol=1e-5)
        net.buffers["in_src"].fill_(10**6)  # an in-place write to an inference tensor: no version counter
        with pytest.raises(ValueError):
            call(dag, net, x)


# ---------------------------------------------------------------------- 5: the raw op
@pytest.mark.parametrize("mutate", [
    lambda b: b["prog_op_ptr"].__setitem__(0, -5),
    lambda b: b.__setitem__("level_ptr", torch.zeros(0, dtype=torch.int64)),
    lambda b: b["level_ptr"].__setitem__(0, -3),
    lambda b: b.__setitem__("dense_index", torch.zeros(0, dtype=torch.int64)),
    lambda b: b.__setitem__("dense_edge_ptr", torch.zeros(1, dtype=torch.int64).expand(b["dense_edge_ptr"].numel())),
    lambda b: b.__setitem__("dense_out_pos", b["dense_out_pos"].to(torch.int32)),
    lambda b: b.__setitem__("dense_edge", b["dense_edge"].flip(0)),
    lambda b: b.__setitem__("prog_output_rows", torch.zeros_like(b["prog_output_rows"]) + 12),
    lambda b: b["act_code"].__setitem__(3 + 12, 9),
    lambda b: b["act_code"].__setitem__(12, -1),
], ids=["op_ptr0", "level_ptr_empty", "level_ptr0", "dense_empty", "dense_zero_stride", "dense_dtype",
        "dense_edge_permuted", "output_row_unwritten", "act_code_9", "act_code_neg"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_raw_op_rejects_forged_buffers(mutate, strategy):
    dag, net = prepared(strategy)
    bufs = {k: v.clone() for k, v in net.buffers.items()}
    mutate(bufs)
    with pytest.raises((ValueError, RuntimeError, TypeError, IndexError)):
        call(dag, net, torch.randn(3, 12), buffers=bufs)


def test_grouped_positions_must_share_sources():
    # A wide layer whose neurons all read the same sources: the program groups them.
    n_in = 8
    src = [u for v in range(4) for u in range(n_in)]
    dst = [n_in + v for v in range(4) for _ in range(n_in)]
    dag = SparseDAG.from_edges(n_in, src, dst, torch.randn(len(src)).tolist())
    net = ops.prepare(dag, memory=None, strategy="program", batch_tile=16)
    assert (np.diff(net.buffers["prog_group_ptr"].numpy()) > 1).any()
    x = torch.randn(3, n_in, dtype=dag.weight.dtype)
    torch.testing.assert_close(call(dag, net, x), dag.forward_reference(x), rtol=1e-5, atol=1e-5)
    bufs = {k: v.clone() for k, v in net.buffers.items()}
    bufs["in_src"][n_in + 2] = 0  # a member now reads another source
    with pytest.raises(ValueError, match="grouped|FMA"):
        call(dag, net, x, buffers=bufs)


# ---------------------------------------------------------------------- 6: non-finite inputs
@given(seed=st.integers(0, 2**16), batch=st.sampled_from([1, 5, 64, 130]),
       value=st.sampled_from([float("inf"), -float("inf"), float("nan")]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=30)
def test_non_finite_inputs_match_the_reference_on_every_path(seed, batch, value, dtype):
    rng = np.random.default_rng(seed)
    model = small_mlp(seed, widths=(24, 40, 10), density=0.2)
    dag = SparseDAG.from_module(model.to(dtype), dtype=dtype)
    x = torch.randn(batch, 24, dtype=dtype)
    x[rng.integers(0, batch), rng.integers(0, 24)] = value
    want = dag.forward_reference(x)
    for strategy in STRATEGIES:
        net = ops.prepare(dag, memory=8, strategy=strategy, batch_tile=16, dtype=dtype)
        got = ops.dag_forward(x, dag.weight.to(dtype), dag.bias.to(dtype), net.buffers, net.meta)
        assert torch.equal(got.isnan(), want.isnan()), strategy
        fin = want.isfinite()
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)


def test_one_inf_sample_alone_or_in_a_batch_gives_the_same_nans():
    dag = SparseDAG.from_module(small_mlp(1, widths=(24, 40, 10), density=0.2))
    x = torch.randn(64, 24)
    x[0, 3] = float("inf")
    for strategy in STRATEGIES:
        net = ops.prepare(dag, memory=8, strategy=strategy, batch_tile=16)
        alone = call(dag, net, x[:1])
        batch = call(dag, net, x)
        assert torch.equal(alone.isnan(), batch[:1].isnan()), strategy
        assert not batch[1:].isnan().any(), strategy


# ---------------------------------------------------------------------- 7: meta device
@pytest.mark.parametrize("what", ["weight", "buffer"])
def test_meta_argument_with_a_cpu_input_raises(what):
    dag, net = prepared("level")
    x = torch.randn(3, 12)
    w, b = dag.weight, dag.bias
    bufs = dict(net.buffers)
    if what == "weight":
        w = w.to("meta")
    else:
        bufs["level_ptr"] = bufs["level_ptr"].to("meta")
    with pytest.raises(ValueError, match="meta"):
        ops.dag_forward(x, w, b, bufs, net.meta)


def test_all_meta_still_propagates_shapes():
    dag, net = prepared("level")
    bufs = {k: v.to("meta") for k, v in net.buffers.items()}
    y = ops.dag_forward(torch.randn(3, 12, device="meta"), dag.weight.to("meta"), dag.bias.to("meta"), bufs, net.meta)
    assert y.shape == (3, 6) and y.device.type == "meta"


# ---------------------------------------------------------------------- 8: unknown activation codes
def test_reference_kernel_rejects_unknown_activation_codes():
    dag, net = prepared("level")
    bufs = {k: v.clone() for k, v in net.buffers.items()}
    bufs["act_code"][20] = 7
    net_list, config = ops._op_args(bufs, net.meta)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.reference_forward(torch.randn(2, 12), dag.weight, dag.bias, net_list, config)
