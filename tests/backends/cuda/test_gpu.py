"""torch_iosparse.backends.cuda.gpu without a GPU: the op's device-agnostic reference forward/backward (ops.reference_*,
what the CUDA backward and float64 forward run), the op adapter called directly on CPU tensors under the
Triton interpreter, the CUDA registration, its fake kernel with device='cuda' fake tensors, and a small compile/export test."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch._subclasses.fake_tensor import FakeTensorMode

import torch_iosparse as tis
from torch_iosparse import ops
from torch_iosparse.backends.cuda import gpu

from torch_iosparse.testing.networks import random_dag


def structure(dag):
    """The op's (net, config) arguments for ``dag`` (what ops.reference_forward/backward take)."""
    net = ops.prepare(dag, memory=None, strategy="program")
    return ops._op_args(net.buffers, net.meta)


@given(seed=st.integers(0, 10**6), batch=st.sampled_from([1, 4, 9]))
@settings(max_examples=15)
def test_reference_forward_and_backward_match_autograd_of_forward_reference(seed, batch):
    dag = random_dag(seed, 4, 15)
    s = structure(dag)
    x = torch.randn(batch, dag.n_inputs, requires_grad=True)
    w = dag.weight.clone().requires_grad_()
    b = dag.bias.clone().requires_grad_()
    dag.weight, dag.bias = w, b  # forward_reference reads them: autograd flows into w and b
    y_ref = dag.forward_reference(x)
    torch.testing.assert_close(ops.reference_forward(x.detach(), w.detach(), b.detach(), *s), y_ref.detach())
    gy = torch.randn_like(y_ref)
    gx, gw, gb = torch.autograd.grad(y_ref, [x, w, b], gy)
    rx, rw, rb = gpu.reference_backward_from_buffers(gy, x.detach(), w.detach(), b.detach(), *s)
    gb = gb.clone()
    gb[: dag.n_inputs] = 0  # inputs have no bias
    for got, want in ((rx, gx), (rw, gw), (rb, gb)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reference_handles_non_topological_numbering():
    # neuron 4 reads 5: the numbering is not topological
    dag = tis.SparseDAG.from_edges(2, [0, 1, 5, 0], [5, 5, 4, 4], torch.tensor([1.0, -2.0, 0.5, 3.0]),
                                   torch.tensor([0, 0, 0.1, 0, -0.2, 0.3]), n_neurons=6, outputs=[4],
                                   activation="tanh")
    x = torch.randn(3, 2)
    torch.testing.assert_close(ops.reference_forward(x, dag.weight, dag.bias, *structure(dag)),
                               dag.forward_reference(x))


def test_reference_level_index_cache_follows_the_buffers():
    dag = random_dag(3, 4, 12)
    net, config = structure(dag)
    levels = ops._levels_of(net, dag.n_neurons)
    assert ops._levels_of(net, dag.n_neurons) is levels  # cached per buffer
    net[6].add_(0)  # an in-place write to level_neuron (e.g. load_state_dict) bumps its version: rebuilt
    assert ops._levels_of(net, dag.n_neurons) is not levels
    x = torch.randn(3, dag.n_inputs)
    torch.testing.assert_close(ops.reference_forward(x, dag.weight, dag.bias, net, config), dag.forward_reference(x))


# ---------------------------------------------------------------------------------------------- registration


def prepared(dag, memory, strategy="program"):
    net = ops.prepare(dag, tis.plan(dag, memory), strategy=strategy)
    return ops._op_args(net.buffers, net.meta)


def test_cuda_kernels_are_registered():
    assert gpu.registered() == "iosparse::dag_forward"
    for name in ("iosparse::dag_forward", "iosparse::dag_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
    dump = torch._C._dispatch_dump("iosparse::dag_forward")
    assert "CUDA" in dump and "CPU" in dump
    assert gpu.register() == "iosparse::dag_forward"  # idempotent


def test_buffer_positions_match_ops():
    for idx, name in [(gpu.NET_IN_PTR, "in_ptr"), (gpu.NET_IN_SRC, "in_src"), (gpu.NET_ACT_CODE, "act_code"),
                      (gpu.NET_ACT_PARAM, "act_param"), (gpu.NET_OUTPUTS, "outputs"),
                      (gpu.NET_PROG_NEURON, "prog_neuron"), (gpu.NET_PROG_OP_PTR, "prog_op_ptr"),
                      (gpu.NET_PROG_OPS, "prog_ops"), (gpu.NET_PROG_OUTPUT_ROWS, "prog_output_rows"),
                      (gpu.NET_LEVEL_PTR, "level_ptr"), (gpu.NET_LEVEL_NEURON, "level_neuron")]:
        assert ops.NET_KEYS[idx] == name
    for idx, name in [(gpu.CFG_N_INPUTS, "n_inputs"), (gpu.CFG_N_NEURONS, "n_neurons"),
                      (gpu.CFG_N_OUTPUTS, "n_outputs"), (gpu.CFG_MEMORY, "memory"), (gpu.CFG_N_SLOW, "n_slow"),
                      (gpu.CFG_STRATEGY, "strategy")]:
        assert ops.CONFIG_KEYS[idx] == name
    assert (gpu.STRATEGY_AUTO, gpu.STRATEGY_PROGRAM, gpu.STRATEGY_LEVEL, gpu.STRATEGY_DENSE) == tuple(
        ops.STRATEGIES[k] for k in ("auto", "program", "level", "dense"))


def test_choose_gpu_path(monkeypatch):
    monkeypatch.delenv("IOSPARSE_GPU_STRATEGY", raising=False)
    assert gpu.choose_gpu_path(1, gpu.STRATEGY_PROGRAM, "cpu") == "program"
    assert gpu.choose_gpu_path(10**6, gpu.STRATEGY_LEVEL, "cpu") == "level"
    assert gpu.choose_gpu_path(10**6, gpu.STRATEGY_DENSE, "cpu") == "level"
    assert gpu.choose_gpu_path(10**6, gpu.STRATEGY_PANEL, "cpu") == "level"
    assert gpu.STRATEGY_PANEL == ops.STRATEGIES["panel"] and gpu.STRATEGY_LEVEL == ops.STRATEGIES["level"]
    # auto: the level kernel at every batch size (the plan executor measured 25-100x slower on an H100)
    assert gpu.choose_gpu_path(1, gpu.STRATEGY_AUTO, "cpu") == "level"
    assert gpu.choose_gpu_path(10**6, gpu.STRATEGY_AUTO, "cpu") == "level"
    monkeypatch.setenv("IOSPARSE_GPU_STRATEGY", "program")
    assert gpu.choose_gpu_path(1, gpu.STRATEGY_AUTO, "cpu") == "program"
    assert gpu.choose_gpu_path(1, gpu.STRATEGY_LEVEL, "cpu") == "level"  # an explicit strategy wins
    monkeypatch.setenv("IOSPARSE_GPU_STRATEGY", "fast")
    with pytest.raises(ValueError, match="IOSPARSE_GPU_STRATEGY"):
        gpu.choose_gpu_path(1, gpu.STRATEGY_AUTO, "cpu")


@pytest.mark.parametrize("strategy", ["level", "auto"])
def test_cuda_forward_adapter_level_path(strategy, monkeypatch):
    monkeypatch.delenv("IOSPARSE_GPU_STRATEGY", raising=False)
    dag = random_dag(13, 5, 14)
    net, config = prepared(dag, 3, strategy)
    x = torch.randn(6, dag.n_inputs)  # auto: the level kernel
    lp = gpu.level_program_from_buffers(net, config)
    assert gpu.level_program_from_buffers(net, config) is lp  # cached
    y = gpu.triton_forward_from_buffers(x, dag.weight, dag.bias, net, config)
    torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-4, atol=1e-5)


@given(seed=st.integers(0, 10**6), memory=st.sampled_from([2, 4, None]), batch=st.sampled_from([1, 6, 17]))
@settings(max_examples=10)
def test_cuda_forward_adapter_equals_cpu_op(seed, memory, batch):
    """The function registered as the CUDA kernel, called on CPU tensors under the interpreter, equals
    the CPU op and forward_reference (same buffers, same program)."""
    dag = random_dag(seed, 5, 14)
    net, config = prepared(dag, memory)
    x = torch.randn(batch, dag.n_inputs)
    y = gpu.triton_forward_from_buffers(x, dag.weight, dag.bias, net, config)
    torch.testing.assert_close(y, torch.ops.iosparse.dag_forward(x, dag.weight, dag.bias, net, config),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, dag.forward_reference(x), rtol=1e-4, atol=1e-5)


def test_cuda_forward_adapter_fp16_and_fp64_and_cache():
    dag = random_dag(21, 4, 12)
    net, config = prepared(dag, 3)
    x = torch.randn(9, 4)
    ref = dag.forward_reference(x)
    y16 = gpu.triton_forward_from_buffers(x.half(), dag.weight.half(), dag.bias.half(), net, config)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), ref, rtol=1e-2, atol=1e-2)
    y64 = gpu.triton_forward_from_buffers(x.double(), dag.weight.double(), dag.bias.double(), net, config)
    torch.testing.assert_close(y64, dag.forward_reference(x.double()))
    kp = gpu.kernel_program_from_buffers(net, config)
    assert gpu.kernel_program_from_buffers(net, config) is kp  # cached
    net[gpu.NET_PROG_OPS].add_(0)  # an in-place write bumps the version: re-encoded
    assert gpu.kernel_program_from_buffers(net, config) is not kp


@pytest.mark.parametrize("memory", [2, None])
def test_cuda_backward_adapter_equals_cpu_op(memory):
    dag = random_dag(5, 4, 13)
    net, config = prepared(dag, memory)
    x = torch.randn(7, 4)
    gy = torch.randn(7, dag.n_outputs)
    got = gpu.reference_backward_from_buffers(gy, x, dag.weight, dag.bias, net, config)
    want = torch.ops.iosparse.dag_backward(gy, x, dag.weight, dag.bias, net, config)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        gpu.reference_backward_from_buffers(gy[:, :1], x, dag.weight, dag.bias, net, config)


def test_cuda_forward_adapter_float64_runs_the_op_reference():
    """float64 (no Triton kernel) runs ops.reference_forward: equal to the C++ op in float64."""
    dag = random_dag(6, 4, 13)
    net, config = prepared(dag, 3)
    x = torch.randn(5, 4, dtype=torch.float64)
    w, b = dag.weight.double(), dag.bias.double()
    got = gpu.triton_forward_from_buffers(x, w, b, net, config)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.ops.iosparse.dag_forward(x, w, b, net, config), rtol=1e-12, atol=1e-12)


def _fake_cuda_args(mode, dag, memory, batch):
    net, config = prepared(dag, memory)
    with mode:
        # same shapes and dtypes as the real buffers, on the (fake) GPU. No requires_grad: autograd
        # metadata of a CUDA tensor needs a CUDA device guard, which a CPU-only PyTorch aborts on.
        x = torch.empty(batch, dag.n_inputs, device="cuda")
        w = torch.empty(dag.weight.shape, device="cuda")
        b = torch.empty(dag.bias.shape, device="cuda")
        net_c = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in net]
    return x, w, b, net_c, config


def test_fake_kernels_with_cuda_fake_tensors():
    dag = random_dag(8, 4, 10)
    mode = FakeTensorMode()
    x, w, b, net, config = _fake_cuda_args(mode, dag, 3, 6)
    with mode:
        y = torch.ops.iosparse.dag_forward(x, w, b, net, config)
        assert y.shape == (6, dag.n_outputs) and y.device.type == "cuda" and y.dtype == torch.float32
        gx, gw, gb = torch.ops.iosparse.dag_backward(torch.empty_like(y), x, w, b, net, config)
        assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape and gx.device.type == "cuda"
        y16 = torch.ops.iosparse.dag_forward(x.half(), w.half(), b.half(), net, config)
        assert y16.dtype == torch.float16 and y16.device.type == "cuda"


def test_compile_and_export_with_cuda_fake_tensors():
    """torch.compile(fullgraph, dynamic) and torch.export trace the CUDA op through its fake kernel."""
    dag = random_dag(9, 4, 10)
    mode = FakeTensorMode()
    x, w, b, net, config = _fake_cuda_args(mode, dag, 4, 5)

    def f(x, w, b):
        return torch.ops.iosparse.dag_forward(torch.tanh(x), w, b, net, config) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    with mode:
        y = compiled(x, w, b)
        assert y.shape == (5, dag.n_outputs) and y.device.type == "cuda"

    class M(torch.nn.Module):
        def forward(self, x, w, b):
            return f(x, w, b)

    with mode:
        ep = torch.export.export(M(), (x, w, b))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.iosparse.dag_forward.default in targets
