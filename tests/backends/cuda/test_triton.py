"""The Triton executor (torch_iosparse.backends.cuda.triton_kernels) under the Triton interpreter on CPU tensors.

The launcher must equal SparseDAG.forward_reference on random DAGs, for plans with spills (tiny M) and
without, several batch sizes (also not multiples of the batch tile), every activation, fp32 and fp16.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_iosparse as tis
from torch_iosparse import planning
from torch_iosparse.backends.cuda import triton_kernels as tk

from torch_iosparse.testing.networks import ALL_ACTS, random_dag
from torch_iosparse.testing.program_ref import FINISH, FMA, LOAD, STORE, compile_program, field, run_program, trace_program


@planning.register_method("gpu_test_level_reversed")
def _level_reversed(dag, memory, seed=0, time_budget=None, **kw):
    """A topological order unlike the numbering: by level, and inside a level by descending id."""
    comp = np.arange(dag.n_inputs, dag.n_neurons)
    return comp[np.lexsort((-comp, dag.levels()[comp]))]


def encode_for(dag, plan, chunk=16):
    return tk.encode(compile_program(dag, plan), n_edges=dag.n_edges, n_neurons=dag.n_neurons, chunk=chunk)


# ---------------------------------------------------------------------------------------------- program
@given(seed=st.integers(0, 10**6), memory=st.sampled_from([2, 3, 5, None]))
@settings(max_examples=15)
def test_program_matches_io_and_reference(seed, memory):
    """The compiled program's op counts are the plan's I/O and its literal execution is the reference."""
    dag = random_dag(seed, 4, 12)
    plan = tis.plan(dag, memory)
    prog = compile_program(dag, plan)
    ops = np.asarray(torch.as_tensor(field(prog, "ops"))).reshape(-1, 3)
    assert (ops[:, 0] == LOAD).sum() == plan.io.loads
    assert (ops[:, 0] == STORE).sum() == plan.io.stores
    assert (ops[:, 0] == FMA).sum() == dag.n_edges
    assert (ops[:, 0] == FINISH).sum() == dag.n_computed
    x = torch.randn(3, dag.n_inputs, dtype=torch.float64)
    torch.testing.assert_close(run_program(prog, x, dag.weight, dag.bias), dag.forward_reference(x.float()).double(),
                               rtol=1e-5, atol=1e-5)


def test_compile_plan_agrees_with_trace_program():
    """program.compile_plan produces the trace's program (one format, one I/O)."""
    for seed, M in [(0, 2), (1, 3), (2, None)]:
        dag = random_dag(seed, 4, 14)
        plan = tis.plan(dag, M)
        a, b = compile_program(dag, plan), trace_program(dag, plan)
        for name in ("n_inputs", "n_outputs", "n_computed", "memory"):
            assert int(field(a, name)) == int(b[name]), name
        ops_a = np.asarray(torch.as_tensor(field(a, "ops"))).reshape(-1, 3)
        assert (ops_a[:, 0] == b["ops"][:, 0]).all()
        x = torch.randn(4, dag.n_inputs, dtype=torch.float64)
        torch.testing.assert_close(run_program(a, x, dag.weight, dag.bias), run_program(b, x, dag.weight, dag.bias))


# ---------------------------------------------------------------------------------------------- kernel
@given(seed=st.integers(0, 10**6), memory=st.sampled_from([2, 3, 4, 8, None]),
       batch=st.sampled_from([1, 5, 16, 23]), chunk=st.sampled_from([2, 4, 16]),
       skip=st.booleans(), batch_tile=st.sampled_from([None, 8, 16]))
@settings(max_examples=20)
def test_launcher_matches_reference_fp32(seed, memory, batch, chunk, skip, batch_tile):
    dag = random_dag(seed, 5, 14, skip=skip)
    plan = tis.plan(dag, memory)
    kp = encode_for(dag, plan, chunk)
    x = torch.randn(batch, dag.n_inputs, generator=torch.Generator().manual_seed(seed))
    y = tk.forward(x, dag.weight, dag.bias, kp, batch_tile=batch_tile)
    assert y.shape == (batch, dag.n_outputs) and y.dtype == torch.float32
    torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory", [2, 5, None])
def test_launcher_with_an_order_unlike_the_numbering(memory):
    """FMA entries out of edge order: the launcher gathers the weights into entry order."""
    dag = random_dag(31, 5, 16)
    plan = tis.plan(dag, memory, method="gpu_test_level_reversed")
    kp = encode_for(dag, plan)
    assert not kp.edges_in_order
    assert encode_for(dag, tis.plan(dag, memory)).edges_in_order  # the numbering order needs no gather
    x = torch.randn(11, dag.n_inputs)
    torch.testing.assert_close(tk.forward(x, dag.weight, dag.bias, kp), dag.forward_reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory,dtype", [(2, torch.float16), (6, torch.float16), (None, torch.float16),
                                          (3, torch.bfloat16)])
def test_launcher_half_precision_accumulates_in_fp32(memory, dtype):
    dag = random_dag(7, 6, 20)
    plan = tis.plan(dag, memory)
    kp = encode_for(dag, plan)
    x = torch.randn(19, dag.n_inputs).to(dtype)
    w, b = dag.weight.to(dtype), dag.bias.to(dtype)
    y = tk.forward(x, w, b, kp, batch_tile=16)
    assert y.dtype == dtype
    # reference: the same fp16 values, computed in fp32 (intermediates stay fp32 in the kernel)
    ref_dag = tis.SparseDAG.from_edges(dag.n_inputs, *dag.edges(), w.float(), b.float(),
                                       activation=[dag.activation_of(v) for v in range(dag.n_neurons)])
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # one rounding of the output to the dtype
    torch.testing.assert_close(y.float(), ref_dag.forward_reference(x.float()), rtol=tol, atol=tol)


def test_every_activation_and_batch_not_multiple_of_tile():
    for k, act in enumerate(ALL_ACTS):
        dag = random_dag(100 + k, 3, 8, acts=[act])
        x = torch.randn(21, 3) * 2
        y = tk.forward(x, dag.weight, dag.bias, encode_for(dag, tis.plan(dag, 3)), batch_tile=16)
        torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-4, atol=1e-5, msg=f"activation {act}")


def test_layered_pruned_mlp_multiple_tiles():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 8), torch.nn.GELU(),
                              torch.nn.Linear(8, 4))
    with torch.no_grad():
        for m in seq:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_((torch.rand_like(m.weight) < 0.4).float())
    dag = tis.SparseDAG.from_module(seq)
    x = torch.randn(70, 12)
    for memory in (4, None):
        y = tk.forward(x, dag.weight, dag.bias, encode_for(dag, tis.plan(dag, memory)), batch_tile=32)
        torch.testing.assert_close(y, seq(x), rtol=1e-4, atol=1e-5)


def test_non_contiguous_input_and_empty_batch():
    dag = random_dag(3, 4, 9)
    kp = encode_for(dag, tis.plan(dag, 3))
    xt = torch.randn(4, 13).t()  # [13, 4], strides (1, 13)
    torch.testing.assert_close(tk.forward(xt, dag.weight, dag.bias, kp), dag.forward_reference(xt.contiguous()),
                               rtol=1e-4, atol=1e-5)
    assert tk.forward(torch.randn(0, 4), dag.weight, dag.bias, kp).shape == (0, dag.n_outputs)


# ---------------------------------------------------------------------------------------------- encoding
def test_encode_keeps_io_and_fuses():
    dag = random_dag(11, 5, 16)
    plan = tis.plan(dag, 3)
    prog = compile_program(dag, plan)
    kp = tk.encode(prog, n_edges=dag.n_edges, n_neurons=dag.n_neurons, chunk=4)
    steps = kp.steps.numpy()
    fused = int((kp.ent_row.numpy() >= 0).sum())
    lone_loads = int((steps[:, 0] == tk.STEP_LOAD).sum())
    assert fused + lone_loads == plan.io.loads
    fin = steps[:, 4] >= 0  # a FINISH (standalone or riding on a chunk)
    assert int(fin.sum()) == dag.n_computed
    assert int((steps[:, 0] == tk.STEP_STORE).sum() + (steps[fin, 5] >= 0).sum()) == plan.io.stores
    assert ((steps[:, 0] == tk.STEP_CHUNK) & fin).any()  # FINISHes ride on chunks
    assert (steps[steps[:, 0] == tk.STEP_FINISH, 1:4] == -1).all()
    assert kp.ent_slot.numel() == dag.n_edges
    chunks = steps[steps[:, 0] == tk.STEP_CHUNK]
    assert chunks[:, 2].sum() == dag.n_edges and (chunks[:, 2] <= 4).all() and (chunks[:, 2] >= 1).all()
    for start, count in chunks[:, 1:3]:  # a chunk never touches a slot twice
        s = kp.ent_slot.numpy()[start:start + count]
        assert np.unique(s).size == s.size


def _bad(prog, **change):
    p = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in prog.items()}
    p.update(change)
    return p


def test_encode_rejects_malformed_programs():
    dag = random_dag(5, 4, 8)
    prog = trace_program(dag, tis.plan(dag, 3))
    kw = dict(n_edges=dag.n_edges, n_neurons=dag.n_neurons)
    ops = prog["ops"]
    bad_code = ops.copy(); bad_code[0, 0] = 9
    bad_slot = ops.copy(); bad_slot[ops[:, 0] == FMA, 1] = 3
    bad_edge = ops.copy(); bad_edge[ops[:, 0] == FMA, 2] = dag.n_edges
    bad_row = ops.copy(); bad_row[ops[:, 0] == LOAD, 1] = prog["n_slow"]
    two_finish = ops.copy(); two_finish[ops[:, 0] == FMA, 0] = FINISH
    cases = {"opcode": dict(ops=bad_code), "slot": dict(ops=bad_slot), "edge": dict(ops=bad_edge),
             "row": dict(ops=bad_row), "FINISH": dict(ops=two_finish),
             "op_ptr": dict(op_ptr=prog["op_ptr"][:-1]), "memory": dict(memory=0),
             "output_rows": dict(output_rows=np.zeros(dag.n_outputs, dtype=np.int64))}
    for word, change in cases.items():
        with pytest.raises(tk.ProgramError, match=word):
            tk.encode(_bad(prog, **change), **kw)
    with pytest.raises(ValueError, match="power of two"):
        tk.encode(prog, chunk=3, **kw)


def test_launcher_rejects_bad_inputs():
    dag = random_dag(6, 4, 8)
    kp = encode_for(dag, tis.plan(dag, None))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        tk.forward(torch.randn(3, 5), dag.weight, dag.bias, kp)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        tk.forward(torch.randn(4), dag.weight, dag.bias, kp)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.forward(x.double(), dag.weight, dag.bias, kp)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.forward(x.long(), dag.weight, dag.bias, kp)
    with pytest.raises(ValueError, match="one per edge"):
        tk.forward(x, dag.weight[:-1], dag.bias, kp)
    with pytest.raises(ValueError, match="one per neuron"):
        tk.forward(x, dag.weight, dag.bias[:-1], kp)
    with pytest.raises(TypeError, match="torch.Tensor"):
        tk.forward(x.numpy(), dag.weight, dag.bias, kp)
    with pytest.raises(ValueError, match="power of two"):
        tk.forward(x, dag.weight, dag.bias, kp, batch_tile=24)
    kp_meta = kp.to("meta")
    with pytest.raises(ValueError, match="one device"):
        tk.forward(x, dag.weight, dag.bias, kp_meta)


# ---------------------------------------------------------------------------------------------- tiling
def test_choose_tiling_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("IOSPARSE_GPU_BT", raising=False)
    monkeypatch.delenv("IOSPARSE_GPU_M", raising=False)
    t = tk.choose_tiling("cpu", 1)
    assert (t.batch_tile, t.memory) == (1, 64) and "cpu" in t.source
    assert tk.choose_tiling("cpu", 5).batch_tile == 8
    assert tk.choose_tiling("cpu", 40).batch_tile == 64
    assert tk.choose_tiling("cpu", 5000).batch_tile == 64
    assert tk.choose_tiling("cpu", 5000, batch_tile=8, memory=7).memory == 7
    monkeypatch.setenv("IOSPARSE_GPU_BT", "32")
    monkeypatch.setenv("IOSPARSE_GPU_M", "9")
    t = tk.choose_tiling("cpu", 1)
    assert (t.batch_tile, t.memory) == (32, 9)
    with pytest.raises(ValueError, match="power of two"):
        tk.choose_tiling("cpu", 4, batch_tile=12)
    with pytest.raises(ValueError, match=">= 2"):
        tk.choose_tiling("cpu", 4, memory=1)


def test_choose_tiling_from_device_properties(monkeypatch):
    """The CUDA branch of the sizing formula, with the properties of an H100 faked."""
    class Props:
        name = "fake H100"
        L2_cache_size = 50 * 2**20
        shared_memory_per_block_optin = 227 * 1024
        multi_processor_count = 132

    monkeypatch.delenv("IOSPARSE_GPU_BT", raising=False)
    monkeypatch.delenv("IOSPARSE_GPU_M", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props())
    t = tk.choose_tiling("cuda", 1 << 20)
    resident = 132 * 4
    assert t.batch_tile == 64
    assert t.memory == min(int(0.5 * 50 * 2**20 // (resident * 64 * 4)), 227 * 1024 // 256)
    mid = tk.choose_tiling("cuda", 1024)  # spread over the SMs: ceil(1024 / 132) = 8 columns per program
    assert mid.batch_tile == 8
    assert mid.memory == min(int(0.5 * 50 * 2**20 // (128 * 8 * 4)), 227 * 1024 // 32)
    small = tk.choose_tiling("cuda", 16, batch_tile=16)  # one program: capped by shared memory per block
    assert small.batch_tile == 16 and small.memory == 227 * 1024 // (16 * 4)


# ---------------------------------------------------------------------------------------------- level kernel
@given(seed=st.integers(0, 10**6), batch=st.sampled_from([1, 3, 17]), batch_tile=st.sampled_from([None, 4]),
       skip=st.booleans(), rows=st.sampled_from([None, 1, 2, 8]))
@settings(max_examples=16)
def test_level_kernel_matches_reference(seed, batch, batch_tile, skip, rows):
    dag = random_dag(seed, 5, 14, skip=skip)
    lp = tk.encode_levels_from_dag(dag)
    x = torch.randn(batch, dag.n_inputs, generator=torch.Generator().manual_seed(seed))
    y = tk.level_forward(x, dag.weight, dag.bias, lp, batch_tile=batch_tile, rows_per_program=rows)
    assert y.is_contiguous()  # the op's fake kernel promises a contiguous output (torch.compile checks it)
    torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-4, atol=1e-5)


@given(seed=st.integers(0, 10**6), skip=st.booleans())
@settings(max_examples=20)
def test_level_segments_partition_levels_by_activation(seed, skip):
    dag = random_dag(seed, 4, 30, skip=skip)
    lp = tk.encode_levels_from_dag(dag)
    ln = lp.level_neuron.numpy()
    levels = dag.levels()
    assert sorted(ln.tolist()) == list(range(dag.n_inputs, dag.n_neurons))
    end = 0
    for start, count, fan, code, lo, hi in lp.segments:
        assert start == end and count > 0  # contiguous, covering, in order
        end = start + count
        seg = ln[start:end]
        assert len(set(levels[seg].tolist())) == 1  # one level
        for a in map(dag.activation_of, seg.tolist()):  # one activation (the segment's scalar arguments)
            assert (a.code, np.float32(a.lo), np.float32(a.hi)) == (code, np.float32(lo), np.float32(hi))
        assert fan == int(np.diff(np.asarray(dag.in_ptr))[seg].max())
    assert end == ln.size
    # segments follow the level order, so every launch reads finished levels only
    starts = [levels[ln[s]] for s, *_ in lp.segments]
    assert starts == sorted(starts)


def test_level_rows_sizing():
    assert tk.level_rows(65536, 32, 1, 1, 132) == (1, 32)  # narrow tiles: one row per program
    assert tk.level_rows(16384, 32, 64, 16, 132) == (8, 32)  # [8, 32, 64] = 16384 gathered values per step
    assert tk.level_rows(16384, 32, 16, 4, 132) == (32, 32)
    assert tk.level_rows(1024, 32, 64, 1, 132) == (4, 32)  # 256 programs: enough for 132 SMs
    assert tk.level_rows(100, 300, 64, 1, 1) == (8, 32)  # fan-in above the chunk: looped in chunks of 32
    assert tk.level_rows(7, 3, 1, 1, 1, rows=4) == (4, 4)
    assert tk.level_rows(64, 8, 16, 1, 132) == (1, 8)  # never fewer programs than SMs when avoidable


def test_level_kernel_wide_fan_in_fp16_and_non_topological_numbering():
    torch.manual_seed(1)
    seq = torch.nn.Sequential(torch.nn.Linear(300, 6), torch.nn.Sigmoid(), torch.nn.Linear(6, 3))  # fan-in 300 > KC
    dag = tis.SparseDAG.from_module(seq)
    x = torch.randn(5, 300)
    y = tk.level_forward(x.half(), dag.weight.half(), dag.bias.half(), tk.encode_levels_from_dag(dag))
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), seq(x.half().float()).detach(), rtol=1e-2, atol=1e-2)
    # neuron 4 reads 5: levels, not the numbering, order the launches
    dag2 = tis.SparseDAG.from_edges(2, [0, 1, 5, 0], [5, 5, 4, 4], torch.tensor([1.0, -2.0, 0.5, 3.0]),
                                    torch.tensor([0, 0, 0.1, 0, -0.2, 0.3]), n_neurons=6, outputs=[4],
                                    activation="gelu")
    x2 = torch.randn(4, 2)
    torch.testing.assert_close(tk.level_forward(x2, dag2.weight, dag2.bias, tk.encode_levels_from_dag(dag2)),
                               dag2.forward_reference(x2))


def test_level_kernel_rejects_bad_inputs():
    dag = random_dag(2, 4, 8)
    lp = tk.encode_levels_from_dag(dag)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        tk.level_forward(torch.randn(2, 3), dag.weight, dag.bias, lp)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.level_forward(torch.randn(2, 4).double(), dag.weight, dag.bias, lp)
    with pytest.raises(ValueError, match="power of two"):
        tk.level_forward(torch.randn(2, 4), dag.weight, dag.bias, lp, batch_tile=3)
    assert tk.level_forward(torch.randn(0, 4), dag.weight, dag.bias, lp).shape == (0, dag.n_outputs)
    ptr, src = dag.in_ptr, dag.in_src
    with pytest.raises(tk.ProgramError, match="level_ptr"):
        tk.encode_levels(ptr, src, [0, 3], np.arange(4, 12), [0] * 12, [0.0] * 12, [0.0] * 12, dag.outputs, 4)
    with pytest.raises(tk.ProgramError, match="every computed neuron"):
        tk.encode_levels(ptr, src, [0, 7], np.arange(4, 11), [0] * 12, [0.0] * 12, [0.0] * 12, dag.outputs, 4)


def test_finish_does_not_ride_on_a_chunk_that_uses_its_slot():
    """A valid (hand-made) program whose FINISH reuses an operand slot of the preceding chunk: the
    FINISH must stay a step of its own (on a GPU the chunk's threads may still read that slot)."""
    dag = tis.SparseDAG.from_edges(2, [0, 1], [2, 2], torch.tensor([2.0, -1.0]), torch.tensor([0, 0, 0.5]),
                                   activation="relu")
    prog = dict(n_inputs=2, n_outputs=1, n_computed=1, memory=2, n_slow=3, neuron=np.array([2]),
                act_code=np.array([1]), act_lo=np.array([0.0]), act_hi=np.array([0.0]), op_ptr=np.array([0, 6]),
                ops=np.array([[LOAD, 0, 1], [FMA, 1, 0], [LOAD, 1, 0], [FMA, 0, 1], [FINISH, 1, -1], [STORE, 1, 2]]),
                output_rows=np.array([2]))
    kp = tk.encode(prog, n_edges=2, n_neurons=3)
    steps = kp.steps.numpy()
    assert steps[:, 0].tolist() == [tk.STEP_CHUNK, tk.STEP_FINISH]
    assert steps[0, 4] == -1 and steps[1, 4:7].tolist() == [1, 2, 0]
    x = torch.randn(5, 2)
    torch.testing.assert_close(tk.forward(x, dag.weight, dag.bias, kp), dag.forward_reference(x))


# ---------------------------------------------------------------------------------------------- source-sharing blocks
@given(seed=st.integers(0, 10**6), batch=st.sampled_from([1, 5, 19]), rows=st.sampled_from([1, 4, 16]),
       chunk=st.sampled_from([2, 16]), blocks=st.sampled_from([True, None]), skip=st.booleans())
@settings(max_examples=16)
def test_level_block_kernel_matches_reference(seed, batch, rows, chunk, blocks, skip):
    dag = random_dag(seed, 5, 24, max_fan_in=6, skip=skip)
    lp = tk.encode_levels(dag.in_ptr, dag.in_src, *_levels(dag), dag.outputs, dag.n_inputs,
                          block_rows=rows, block_chunk=chunk)
    x = torch.randn(batch, dag.n_inputs, generator=torch.Generator().manual_seed(seed))
    y = tk.level_forward(x, dag.weight, dag.bias, lp, blocks=blocks)
    assert y.is_contiguous()
    torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-4, atol=1e-5)


def _levels(dag):
    """(level_ptr, level_neuron, act_code, act_lo, act_hi) of ``dag`` for tk.encode_levels."""
    lv = dag.levels()
    comp = np.arange(dag.n_inputs, dag.n_neurons)
    ln = comp[np.argsort(lv[comp], kind="stable")]
    lp = np.concatenate([[0], np.cumsum(np.bincount(lv[comp] - 1))])
    acts = [dag.activation_of(v) for v in range(dag.n_neurons)]
    return lp, ln, [a.code for a in acts], [a.lo for a in acts], [a.hi for a in acts]


@given(seed=st.integers(0, 10**6), rows=st.sampled_from([1, 2, 8]), chunk=st.sampled_from([1, 4]))
@settings(max_examples=20)
def test_source_blocks_list_every_edge_once(seed, rows, chunk):
    dag = random_dag(seed, 4, 30, max_fan_in=5)
    lp = tk.encode_levels(dag.in_ptr, dag.in_src, *_levels(dag), dag.outputs, dag.n_inputs,
                          block_rows=rows, block_chunk=chunk)
    ptr, src = np.asarray(dag.in_ptr), np.asarray(dag.in_src)
    dst_of = np.repeat(np.arange(dag.n_neurons), np.diff(ptr))
    brows, uptr = lp.blk_rows.numpy(), lp.blk_uptr.numpy()
    bsrc, bedge = lp.blk_src.numpy(), lp.blk_edge.numpy()
    seen = []
    for (start, count, *_), (b0, nb, reuse) in zip(lp.segments, lp.seg_blocks):
        if nb == 0:
            continue
        assert nb == -(-count // rows)
        assert sorted(brows[b0 * rows:(b0 + nb) * rows][brows[b0 * rows:(b0 + nb) * rows] >= 0].tolist()) == \
            sorted(lp.level_neuron.numpy()[start:start + count].tolist())
        n_distinct = 0
        for b in range(b0, b0 + nb):
            width = uptr[b + 1] - uptr[b]
            assert width % chunk == 0 and width > 0
            cols = bsrc[uptr[b]:uptr[b + 1]]
            n_distinct += int((cols >= 0).sum())
            assert len(set(cols[cols >= 0].tolist())) == int((cols >= 0).sum())  # distinct sources
            mat = bedge[uptr[b] * rows:uptr[b + 1] * rows].reshape(rows, width)
            for r in range(rows):
                for j in range(width):
                    e = mat[r, j]
                    if e >= 0:  # the edge really connects that source to that neuron
                        assert src[e] == cols[j] and dst_of[e] == brows[b * rows + r]
                        seen.append(int(e))
            for r in range(rows):  # ... and every in-edge of the block's neurons is listed
                v = brows[b * rows + r]
                if v >= 0:
                    assert sorted(mat[r][mat[r] >= 0].tolist()) == list(range(ptr[v], ptr[v + 1]))
        m = int(sum(ptr[v + 1] - ptr[v] for v in lp.level_neuron.numpy()[start:start + count]))
        assert reuse == pytest.approx(m / max(1, n_distinct))
    assert len(seen) == len(set(seen))


def test_radix_layers_share_sources_in_blocks():
    # a RadiX-Net layer of stride g reads {b + d*g}: ordered by (s0 mod g, s0 div g), 16 neighbours share
    # all but a few sources, so each gathered source row serves ~10 edges instead of 1
    from torch_iosparse import generate
    dag = generate.radix_net(1024, 2, fan_in=32, seed=0)
    lp = tk.encode_levels_from_dag(dag)
    assert [nb for _, nb, _ in lp.seg_blocks] == [1024 // tk.DEFAULT_BLOCK_ROWS] * 2
    assert all(reuse > 8 for *_, reuse in lp.seg_blocks)
    for batch in (1, 20):  # one column: the broadcast form; 32-column tiles: the [16, 16] @ [16, 32] dot form
        x = torch.rand(batch, dag.n_inputs)
        torch.testing.assert_close(tk.level_forward(x, dag.weight, dag.bias, lp), dag.forward_reference(x),
                                   rtol=1e-4, atol=1e-5)


def test_unstructured_segments_get_no_blocks():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 64)
    torch.nn.utils.prune.random_unstructured(lin, "weight", amount=0.9)
    dag = tis.SparseDAG.from_module(torch.nn.Sequential(lin))
    lp = tk.encode_levels_from_dag(dag)
    (_, nb, reuse), = lp.seg_blocks
    # R rows x ~51 random sources of 512 share some (reuse = edges / distinct sources > 1), but the
    # [R, distinct] edge matrices would hold R / reuse > 4 entries per edge, mostly empty: not built, the
    # row kernel runs
    assert nb == 0 and tk.DEFAULT_BLOCK_ROWS / reuse > 4
