"""The CUDA backend on a real GPU: the Triton plan executor, the level kernel, the iosparse op (forward,
backward), the module and torch.compile on CUDA tensors, each against the pure-PyTorch reference.

Skipped where torch sees no CUDA device (CI and the development machine have none); run on a lent
H100/H200 with ``TRITON_INTERPRET=0 python -m pytest -q tests/backends/cuda/test_device.py`` (benchmarks/gpu_device_run.sh
does this). The interpreter tests in test_triton.py / test_gpu.py cover the same code on CPU tensors; what
only a GPU shows is compiled-kernel behaviour: barriers between steps (races), many warps per tile, real
fp16/bf16 arithmetic, the CUDA dispatch of the op and its autograd.
"""
import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here (these tests run on a lent GPU)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test the compiled kernels",
                allow_module_level=True)

from torch import nn  # noqa: E402

import torch_iosparse as tis  # noqa: E402
from torch_iosparse import generate, ops  # noqa: E402
from torch_iosparse.backends.cuda import gpu
from torch_iosparse.backends.cuda import triton_kernels as tk  # noqa: E402
from torch_iosparse.compile.program import compile_plan  # noqa: E402

from torch_iosparse.testing.networks import random_dag  # noqa: E402

CUDA = torch.device("cuda")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def reference(dag, x: torch.Tensor) -> torch.Tensor:
    """forward_reference in float64 (it computes in x's dtype, weights upcast) of x as the kernel sees it
    (already rounded to its dtype)."""
    return dag.forward_reference(x.double().cpu())


def test_registered_on_cuda():
    assert gpu.registered() is not None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("memory", [2, 8, None])
@pytest.mark.parametrize("strategy", ["program", "level"])
def test_op_forward_matches_reference(seed, memory, strategy):
    dag = random_dag(seed, 5, 60 + 10 * seed, max_fan_in=6)
    net = ops.prepare(dag, memory=memory, batch_tile=8, strategy=strategy)
    buffers = {k: v.to(CUDA) for k, v in net.buffers.items()}
    for B in (1, 3, 64, 257):
        x = torch.randn(B, dag.n_inputs, generator=torch.Generator().manual_seed(B + seed))
        y = ops.dag_forward(x.to(CUDA), dag.weight.to(CUDA), dag.bias.to(CUDA), buffers, net.meta)
        assert y.device.type == "cuda" and y.shape == (B, dag.n_outputs)
        assert rel_err(y, reference(dag, x)) < TOL[torch.float32], (seed, memory, strategy, B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["program", "level"])
def test_op_forward_half_precision(dtype, strategy):
    dag = random_dag(11, 6, 80, max_fan_in=5)
    net = ops.prepare(dag, memory=4, batch_tile=8, strategy=strategy)
    buffers = {k: v.to(CUDA) for k, v in net.buffers.items()}
    x = torch.randn(70, dag.n_inputs).to(dtype)
    w, b = dag.weight.to(dtype), dag.bias.to(dtype)
    y = ops.dag_forward(x.to(CUDA), w.to(CUDA), b.to(CUDA), buffers, net.meta)
    assert y.dtype == dtype
    d = tis.SparseDAG.from_edges(dag.n_inputs, *dag.edges(), w.float(), b.float(), n_neurons=dag.n_neurons,
                                 outputs=dag.outputs, activation=[dag.activation_of(v) for v in range(dag.n_neurons)])
    assert rel_err(y, reference(d, x.float())) < TOL[dtype]


@pytest.mark.parametrize("num_warps", [1, 4, 8])
@pytest.mark.parametrize("batch_tile", [1, 16, 64])
def test_plan_executor_tiles_and_warps_with_spills(num_warps, batch_tile):
    # Many steps with spills and a wide tile: a missing barrier between steps shows up as a race here.
    dag = generate.radix_net(64, 4, fan_in=8, seed=1)
    plan = tis.plan(dag, 12, method="greedy")
    assert plan.io.stores > dag.n_outputs  # really spills
    kp = tk.encode(compile_plan(dag, plan), n_edges=dag.n_edges, n_neurons=dag.n_neurons, device=CUDA)
    x = torch.rand(300, dag.n_inputs)
    ref = reference(dag, x)
    for _ in range(3):  # races are intermittent: repeat
        y = tk.forward(x.to(CUDA), dag.weight.to(CUDA), dag.bias.to(CUDA), kp, batch_tile=batch_tile,
                       num_warps=num_warps)
        assert rel_err(y, ref) < TOL[torch.float32]


def test_op_backward_matches_cpu():
    dag = random_dag(5, 6, 50, max_fan_in=5)
    grads = {}
    for dev in ("cpu", "cuda"):
        net = ops.prepare(dag, memory=4, batch_tile=8, strategy="program")
        buffers = {k: v.to(dev) for k, v in net.buffers.items()}
        x = torch.randn(33, dag.n_inputs, generator=torch.Generator().manual_seed(0)).to(dev).requires_grad_()
        w = dag.weight.clone().to(dev).requires_grad_()
        b = dag.bias.clone().to(dev).requires_grad_()
        y = ops.dag_forward(x, w, b, buffers, net.meta)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        grads[dev] = [t.cpu() for t in torch.autograd.grad(y, [x, w, b], gy)]
    for got, want in zip(grads["cuda"], grads["cpu"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_module_on_cuda_forward_backward_and_compile():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    for layer in mlp[::2]:
        nn.utils.prune.l1_unstructured(layer, "weight", amount=0.85)
        nn.utils.prune.remove(layer, "weight")
    net_cpu = tis.IOSparseNetwork(mlp, memory=16)
    net = copy.deepcopy(net_cpu).to(CUDA)
    mlp = mlp.to(CUDA)
    for B in (1, 40, 9000):  # level kernel, level kernel, plan executor (B >= 64 * SMs on an H100)
        x = torch.randn(B, 48, device=CUDA)
        assert rel_err(net(x), mlp(x)) < 1e-4, B
    x = torch.randn(40, 48)
    net(x.to(CUDA)).square().sum().backward()
    net_cpu(x).square().sum().backward()
    for (name, p_gpu), p_cpu in zip(net.named_parameters(), net_cpu.parameters()):
        assert p_gpu.grad is not None and p_gpu.grad.device.type == "cuda", name
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-5)
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.to(CUDA)), net(x.to(CUDA)), rtol=1e-4, atol=1e-5)


def test_cuda_cxx_variant_matches_reference():
    if gpu.find_nvcc() is None:
        pytest.skip("nvcc not found")
    dag = random_dag(7, 5, 70, max_fan_in=5)
    plan = tis.plan(dag, 6)
    fwd = gpu.CudaCxxForward(compile_plan(dag, plan), dag.n_edges, CUDA)
    x = torch.randn(100, dag.n_inputs)
    y = fwd(x.to(CUDA), dag.weight.to(CUDA), dag.bias.to(CUDA))
    assert rel_err(y, reference(dag, x)) < TOL[torch.float32]


@pytest.mark.parametrize("width,depth,fan_in", [(256, 3, 8), (1024, 2, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_level_kernels_on_a_radix_net(dtype, width, depth, fan_in):
    # radix layers share sources: the block kernel runs (reuse > 2); compare the level kernels
    dag = generate.radix_net(width, depth, fan_in=fan_in, seed=2)
    lp = tk.encode_levels_from_dag(dag, CUDA)
    assert all(nb > 0 and reuse > 2 for _, nb, reuse in lp.seg_blocks)
    w, b = dag.weight.to(dtype), dag.bias.to(dtype)
    for B in (1, 70, 300):
        x = torch.rand(B, dag.n_inputs).to(dtype)
        ref = reference(dag, x.float()) if dtype == torch.float32 else None
        # auto (blocks: one column = broadcast form, wide tiles = dot form), rows kernel, one-row kernel
        outs = [tk.level_forward(x.to(CUDA), w.to(CUDA), b.to(CUDA), lp, blocks=blocks, rows_per_program=rows)
                for blocks, rows in ((None, None), (False, None), (False, 1))]
        for y in outs:
            assert y.dtype == dtype and y.is_contiguous()
            if ref is not None:
                assert rel_err(y, ref) < TOL[dtype], B
            else:
                assert rel_err(y, outs[1]) < TOL[dtype], B
