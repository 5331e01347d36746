"""The differentiable op iosparse::dag_forward (torch_iosparse/ops/, kernels/cpu/):
forward == dag.forward_reference for every strategy, dtype, activation and memory size; autograd ==
numerical and == the dense model's gradients on the nonzero pattern; opcheck; torch.compile; clear errors.
The sample tests run every network of torch_iosparse.testing.sample_inputs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_iosparse import SparseDAG, ops, plan
from torch_iosparse.planning import PlanError
from torch_iosparse.testing.checks import run, run_under_isa, tol
from torch_iosparse.testing.networks import ALL_ACTIVATIONS, pruned_mlp, radix_like, random_dags, sample_inputs

BATCHES = [0, 1, 3, 17, 64, 1000]


pytestmark = pytest.mark.usefixtures("poison_buffers")  # conftest: outputs filled with NaN before each call


@given(dag=random_dags(), memory=st.sampled_from([2, 3, 5, 16, None, "auto"]),
       batch=st.sampled_from(BATCHES), dtype=st.sampled_from([torch.float32, torch.float64]),
       strategy=st.sampled_from(["program", "level", "auto"]), batch_tile=st.sampled_from([8, 16, 64, 128]))
@settings(max_examples=60)
def test_forward_matches_reference(dag, memory, batch, dtype, strategy, batch_tile):
    net = ops.prepare(dag, memory=memory, strategy=strategy, batch_tile=batch_tile, dtype=dtype)
    x = torch.randn(batch, dag.n_inputs, dtype=dtype) * 2
    got = run(net, x, dag)
    assert got.shape == (batch, dag.n_outputs) and got.dtype == dtype
    want = SparseDAG.forward_reference(dag, x.double()).to(dtype)
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("act", ALL_ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", ["program", "level", "dense"])
def test_every_activation(act, dtype, strategy):
    model = pruned_mlp([12, 20, 20, 7], 0.4, [act], seed=3)
    dag = SparseDAG.from_module(model)
    net = ops.prepare(dag, memory=4, strategy=strategy, batch_tile=16)  # M=4: spills on every layer
    assert net.program.io.stores > dag.n_outputs
    x = torch.randn(37, 12, dtype=torch.float64) * 3  # wide range: both clamp bounds, both tanh tails
    want = model(x).detach().to(dtype)
    torch.testing.assert_close(run(net, x.to(dtype), dag), want, **tol(dtype))


@pytest.mark.parametrize("batch", BATCHES)
def test_strategies_agree_on_layered_net(batch):
    model = pruned_mlp([30, 40, 25, 10], 0.3, [ALL_ACTIVATIONS[1], ALL_ACTIVATIONS[3]], seed=1)
    dag = SparseDAG.from_module(model)
    x = torch.randn(batch, 30, dtype=torch.float64)
    want = model(x).detach()
    for strategy in ("program", "level", "dense", "auto"):
        for memory in (3, 40, None):
            net = ops.prepare(dag, memory=memory, strategy=strategy, dtype=torch.float64)
            torch.testing.assert_close(run(net, x, dag), want, **tol(torch.float64))


def test_non_contiguous_and_transposed_inputs():
    dag = SparseDAG.from_module(pruned_mlp([16, 24, 8], 0.5, [ALL_ACTIVATIONS[5]], dtype=torch.float32))
    for strategy in ("program", "level", "dense"):
        net = ops.prepare(dag, memory=5, strategy=strategy)
        xt = torch.randn(16, 70).t()                    # transposed
        xs = torch.randn(70, 32)[:, ::2]                # strided columns
        xe = torch.randn(1, 16).expand(70, 16)          # stride-0 rows
        for x in (xt, xs, xe):
            assert not x.is_contiguous()
            torch.testing.assert_close(run(net, x, dag), dag.forward_reference(x.contiguous()), **tol(torch.float32))


@given(dag=random_dags(max_inputs=4, max_computed=7), strategy=st.sampled_from(["program", "level", "panel", "block"]),
       batch=st.sampled_from([1, 3, 10]))
@settings(max_examples=40)
def test_gradcheck_float64(dag, strategy, batch):
    net = ops.prepare(dag, memory=3, strategy=strategy, dtype=torch.float64)
    x = torch.randn(batch, dag.n_inputs, dtype=torch.float64, requires_grad=True)
    w = dag.weight.clone().requires_grad_()
    b = dag.bias.clone().requires_grad_()
    # hardtanh/relu kinks: keep pre-activations away from them is not possible for random DAGs, so use
    # gradcheck's default eps and compare where the function is smooth almost surely (random inputs).
    assert torch.autograd.gradcheck(lambda x_, w_, b_: ops.dag_forward(x_, w_, b_, net.buffers, net.meta),
                                    (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("strategy", ["program", "level", "dense"])
def test_grads_equal_dense_model_on_pattern(strategy):
    torch.manual_seed(0)
    model = pruned_mlp([10, 14, 9, 5], 0.35, [ALL_ACTIVATIONS[4], ALL_ACTIVATIONS[6]], seed=5)
    dag = SparseDAG.from_module(model)
    net = ops.prepare(dag, memory=3, strategy=strategy, dtype=torch.float64)
    x = torch.randn(33, 10, dtype=torch.float64)
    target = torch.randn(33, 5, dtype=torch.float64)
    # dense model
    xd = x.clone().requires_grad_()
    ((model(xd) - target) ** 2).sum().backward()
    # op
    xo = x.clone().requires_grad_()
    w = dag.weight.clone().requires_grad_()
    b = dag.bias.clone().requires_grad_()
    ((ops.dag_forward(xo, w, b, net.buffers, net.meta) - target) ** 2).sum().backward()
    torch.testing.assert_close(xo.grad, xd.grad)
    src, dst = dag.edges()
    off = np.cumsum([0] + dag.layer_sizes)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for k, lin in enumerate(linears):
        sel = (dst >= off[k + 1]) & (dst < off[k + 2])
        rows, cols = dst[sel] - off[k + 1], src[sel] - off[k]
        torch.testing.assert_close(w.grad[torch.from_numpy(np.flatnonzero(sel))], lin.weight.grad[rows, cols])
        torch.testing.assert_close(b.grad[off[k + 1]:off[k + 2]], lin.bias.grad)
    assert torch.all(b.grad[: dag.n_inputs] == 0)


SAMPLES = sample_inputs("cpu", torch.float64)
SAMPLE_IDS = [s.name for s in SAMPLES]


def strategies_of(sample):
    return ("program", "level", "panel", "block") + (("dense",) if sample.layered else ())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_forward_on_samples(index, dtype):
    """Every sample network, every strategy it can run, == dag.forward_reference."""
    s = sample_inputs("cpu", dtype)[index]
    want = s.dag.forward_reference(s.x.double()).to(dtype)
    for strategy in strategies_of(s):
        net = ops.prepare(s.dag, memory=3, strategy=strategy, dtype=dtype)
        torch.testing.assert_close(ops.dag_forward(s.x, s.weight, s.bias, net.buffers, net.meta), want, **tol(dtype))


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_gradcheck_on_samples(index):
    s = sample_inputs("cpu", torch.float64, requires_grad=True)[index]
    x = s.x[:3].detach().requires_grad_()  # a few rows keep the numerical Jacobian cheap
    for strategy in strategies_of(s):
        net = ops.prepare(s.dag, memory=3, strategy=strategy, dtype=torch.float64)

        def f(x_, w_, b_):
            # gradcheck perturbs single weights through .data, which the panel path's weight cache cannot
            # notice (docs/cpu-kernel.md, "Weight cache"): drop the cache before every evaluation.
            ops.clear_panel_weight_cache()
            return ops.dag_forward(x_, w_, b_, net.buffers, net.meta)

        assert torch.autograd.gradcheck(f, (x, s.weight, s.bias), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_opcheck(index, dtype):
    s = sample_inputs("cpu", dtype, requires_grad=True)[index]
    for strategy in ("program", "level", "panel", "block"):
        net = ops.prepare(s.dag, memory=2, strategy=strategy)
        net_list, config = ops._op_args(net.buffers, net.meta)
        torch.library.opcheck(torch.ops.iosparse.dag_forward.default, (s.x, s.weight, s.bias, net_list, config))
        gy = torch.randn(s.x.shape[0], s.dag.n_outputs, dtype=dtype)
        torch.library.opcheck(torch.ops.iosparse.dag_backward.default,
                              (gy, s.x.detach(), s.weight.detach(), s.bias.detach(), net_list, config))


def test_reference_kernels_match_cpu_kernels():
    """The pure-PyTorch kernels other devices use equal the C++ kernels (forward and backward)."""
    dag = SparseDAG.from_module(pruned_mlp([9, 11, 6], 0.5, [ALL_ACTIVATIONS[2], ALL_ACTIVATIONS[3]]))
    net = ops.prepare(dag, memory=3, dtype=torch.float64)
    net_list, config = ops._op_args(net.buffers, net.meta)
    x = torch.randn(13, 9, dtype=torch.float64)
    gy = torch.randn(13, dag.n_outputs, dtype=torch.float64)
    torch.testing.assert_close(ops.reference_forward(x, dag.weight, dag.bias, net_list, config),
                               torch.ops.iosparse.dag_forward(x, dag.weight, dag.bias, net_list, config))
    for a, b in zip(ops.reference_backward(gy, x, dag.weight, dag.bias, net_list, config),
                    torch.ops.iosparse.dag_backward(gy, x, dag.weight, dag.bias, net_list, config)):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_dynamic():
    dag = SparseDAG.from_module(pruned_mlp([8, 12, 4], 0.5, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, memory=4)
    w, b = dag.weight.clone().requires_grad_(), dag.bias.clone().requires_grad_()
    fn = torch.compile(lambda x: ops.dag_forward(x, w, b, net.buffers, net.meta).relu().sum(), fullgraph=True,
                       dynamic=True)
    for batch in (3, 9):
        x = torch.randn(batch, 8, requires_grad=True)
        fn(x).backward()
        x2 = x.detach().clone().requires_grad_()
        dag.forward_reference(x2).relu().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, **tol(torch.float32))


def test_nan_passes_through_like_dense():
    model = pruned_mlp([6, 8, 3], 0.5, [ALL_ACTIVATIONS[1]], dtype=torch.float32)
    dag = SparseDAG.from_module(model)
    x = torch.randn(20, 6)
    x[3, 2] = float("nan")
    x[7] = float("nan")
    want = model(x).detach()
    for strategy in ("program", "level", "dense"):
        got = run(ops.prepare(dag, memory=3, strategy=strategy), x, dag)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), strategy
        torch.testing.assert_close(got[~torch.isnan(want)], want[~torch.isnan(want)], **tol(torch.float32))


def test_bad_inputs_raise_clear_errors():
    dag = SparseDAG.from_module(pruned_mlp([6, 8, 3], 0.5, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, memory=3)
    w, b = dag.weight, dag.bias
    with pytest.raises(ValueError, match=r"shape \[batch, 6\]"):
        ops.dag_forward(torch.randn(4, 5), w, b, net.buffers, net.meta)
    with pytest.raises(ValueError, match=r"shape \[batch, 6\]"):
        ops.dag_forward(torch.randn(6), w, b, net.buffers, net.meta)
    with pytest.raises(TypeError, match="floating-point"):
        ops.dag_forward(torch.ones(4, 6, dtype=torch.int64), w, b, net.buffers, net.meta)
    net_list, config = ops._op_args(net.buffers, net.meta)
    with pytest.raises(TypeError, match="float32 and float64"):  # the C++ kernel itself
        torch.ops.iosparse.dag_forward(torch.randn(4, 6).half(), w.half(), b.half(), net_list, config)
    x16 = torch.randn(4, 6).half()  # ops.dag_forward runs half precision through it in float32
    y16 = ops.dag_forward(x16, w.half(), b.half(), net.buffers, net.meta)
    assert y16.dtype == torch.float16
    with pytest.raises(TypeError, match="input's dtype"):
        ops.dag_forward(x16, w, b, net.buffers, net.meta)
    torch.testing.assert_close(y16, ops.dag_forward(x16.float(), w.half().float(), b.half().float(), net.buffers,
                                                    net.meta).half())
    with pytest.raises(TypeError, match="input's dtype"):
        ops.dag_forward(torch.randn(4, 6, dtype=torch.float64), w, b, net.buffers, net.meta)
    with pytest.raises(ValueError, match="one entry per edge"):
        ops.dag_forward(torch.randn(4, 6), w[:-1], b, net.buffers, net.meta)
    with pytest.raises(ValueError, match="device"):
        ops.dag_forward(torch.randn(4, 6, device="meta"), w, b, net.buffers, net.meta)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.dag_forward(np.zeros((4, 6)), w, b, net.buffers, net.meta)
    with pytest.raises(KeyError, match="prepare"):
        ops.dag_forward(torch.randn(4, 6), w, b, {}, net.meta)
    # a plan of another network
    other = SparseDAG.from_module(pruned_mlp([6, 8, 3], 0.5, [ALL_ACTIVATIONS[1]], seed=9, dtype=torch.float32))
    with pytest.raises(PlanError, match="another network"):
        ops.prepare(dag, plan(other, 3))
    # buffers of another network with this network's weights
    net_other = ops.prepare(other, memory=3)
    if other.n_edges != dag.n_edges:
        with pytest.raises(ValueError, match="edge"):
            ops.dag_forward(torch.randn(4, 6), w, b, net_other.buffers, net_other.meta)
    with pytest.raises(ValueError, match="strategy"):
        ops.prepare(dag, strategy="fastest")
    bad_meta = dict(net.meta, n_neurons=net.meta["n_neurons"] + 1)
    with pytest.raises(ValueError, match="bias|elements"):
        ops.dag_forward(torch.randn(4, 6), w, b, net.buffers, bad_meta)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_vector_isa_fallbacks(isa):
    """The AVX2 and plain x86-64 code paths (chosen at run time) compute the same as the reference."""
    code = (
        "import torch\n"
        "from torch_iosparse import SparseDAG, ops\n"
        "torch.manual_seed(0)\n"
        "src = torch.randint(0, 20, (300,)); dst = torch.randint(20, 60, (300,))\n"
        "keep = src < dst\n"
        "dag = SparseDAG.from_edges(20, src[keep], dst[keep], torch.randn(int(keep.sum())).double(), n_neurons=60,"
        " activation='tanh')\n"
        "for dt in (torch.float32, torch.float64):\n"
        "    net = ops.prepare(dag, memory=6, strategy='program')\n"
        "    x = torch.randn(100, 20, dtype=dt)\n"
        "    y = ops.dag_forward(x, dag.weight.to(dt), dag.bias.to(dt), net.buffers, net.meta)\n"
        "    torch.testing.assert_close(y, dag.forward_reference(x.double()).to(dt), rtol=2e-4, atol=2e-4)\n"
        "print('ok')\n")
    run_under_isa(isa, code)


@given(memory=st.sampled_from([3, 6, 9, 20, None]), method=st.sampled_from(["level_grouped", "two_optimal"]),
       group_size=st.integers(1, 4), batch=st.sampled_from([1, 17, 64, 130]),
       dtype=st.sampled_from([torch.float32, torch.float64]), batch_tile=st.sampled_from([16, 64, 128]))
@settings(max_examples=30)
def test_grouped_execution_on_shared_sources(memory, method, group_size, batch, dtype, batch_tile):
    dag = radix_like(16, 4, 4)
    net = ops.prepare(dag, plan(dag, memory, method), strategy="program", group_size=group_size,
                      batch_tile=batch_tile)
    groups = net.buffers["prog_group_ptr"]
    if method == "level_grouped" and group_size > 1 and memory is None:
        assert groups.numel() - 1 < dag.n_computed  # some neurons really are grouped
    assert int(torch.diff(groups).max()) <= group_size
    x = torch.randn(batch, 16, dtype=dtype)
    torch.testing.assert_close(run(net, x, dag), dag.forward_reference(x.double()).to(dtype), **tol(dtype))


@pytest.mark.parametrize("strategy", ["dense", "program", "level"])
def test_layered_net_with_scrambled_numbering(strategy):
    """A layered DAG whose neuron ids are not grouped by layer still takes (and passes) the dense path."""
    rng = np.random.default_rng(4)
    sizes = [5, 7, 6, 3]
    off = np.cumsum([0] + sizes)
    src, dst = [], []
    for k in range(3):
        for v in range(sizes[k + 1]):
            for u in range(sizes[k]):
                if rng.random() < 0.6:
                    src.append(off[k] + u)
                    dst.append(off[k + 1] + v)
    perm = np.concatenate([np.arange(5), 5 + rng.permutation(off[-1] - 5)])  # scramble computed ids
    src, dst = perm[np.array(src)], perm[np.array(dst)]
    outputs = perm[off[3]:off[4]]
    dag = SparseDAG.from_edges(5, src, dst, rng.standard_normal(len(src)), rng.standard_normal(off[-1]),
                               outputs=outputs, activation="tanh", dtype=torch.float64)
    net = ops.prepare(dag, memory=4, strategy=strategy)
    assert net.meta["layered"] == 1
    x = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(run(net, x, dag), dag.forward_reference(x))


def test_corrupt_buffers_raise_instead_of_crashing():
    dag = SparseDAG.from_module(pruned_mlp([6, 8, 3], 0.5, [ALL_ACTIVATIONS[1]], dtype=torch.float32))
    net = ops.prepare(dag, memory=3, strategy="program")
    x = torch.randn(4, 6)
    for key, col, value in (("prog_ops", 1, 10**6), ("prog_ops", 2, -5), ("prog_ops", 0, 9)):
        bufs = dict(net.buffers)
        bufs[key] = bufs[key].clone()
        bufs[key][1, col] = value
        with pytest.raises(ValueError, match="corrupt"):
            ops.dag_forward(x, dag.weight, dag.bias, bufs, net.meta)
    bufs = dict(net.buffers, in_src=net.buffers["in_src"].clone())
    bufs["in_src"][0] = 10**6
    with pytest.raises(ValueError, match="corrupt"):
        ops.dag_forward(x, dag.weight, dag.bias, bufs, net.meta)
    # an in-place change after a successful call is noticed too (version counter)
    ok = dict(net.buffers, prog_output_rows=net.buffers["prog_output_rows"].clone())
    ops.dag_forward(x, dag.weight, dag.bias, ok, net.meta)
    ok["prog_output_rows"][0] = 10**6
    with pytest.raises(ValueError, match="corrupt"):
        ops.dag_forward(x, dag.weight, dag.bias, ok, net.meta)


def test_torch_export_with_dynamic_batch():
    model = pruned_mlp([6, 5, 3], 0.8, [ALL_ACTIVATIONS[1]], dtype=torch.float32)
    dag = SparseDAG.from_module(model)
    net = ops.prepare(dag, memory=3)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(dag.weight.clone())
            self.b = nn.Parameter(dag.bias.clone())
            for k, v in net.buffers.items():
                self.register_buffer(k, v)

        def forward(self, x):
            return ops.dag_forward(x, self.w, self.b, {k: getattr(self, k) for k in net.buffers}, net.meta)

    ep = torch.export.export(Wrapped(), (torch.randn(4, 6),), dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    x = torch.randn(7, 6)
    torch.testing.assert_close(ep.module()(x), model(x).detach(), **tol(torch.float32))
