"""torch.compile(fullgraph) without graph breaks or recompiles, torch.export round trip, opcheck.

Few and small: each compile costs seconds on the shared CI machine."""
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from torch_iosparse import ops
from torch_iosparse.nn.module import IOSparseNetwork
from torch_iosparse.nn.sparsify import sparsify

from torch_iosparse.testing.models import pruned_sequential


def pruned(seed=0):
    return pruned_sequential((12, 24, 16, 5), 0.8, (nn.GELU, nn.ReLU), seed=seed)


def test_compile_fullgraph_dynamic_no_breaks_no_recompiles():
    torch._dynamo.reset()
    counters.clear()
    model = sparsify(nn.Sequential(pruned(), nn.LayerNorm(5)))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (3, 8, 17, 64):
        x = torch.randn(batch, 12)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every batch size: no recompiles
    # explain agrees: one graph, no breaks
    ex = torch._dynamo.explain(model)(torch.randn(4, 12))
    assert ex.graph_break_count == 0 and ex.graph_count == 1


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    eager = IOSparseNetwork(pruned(1))
    comp_net = IOSparseNetwork(pruned(1))
    compiled = torch.compile(comp_net, fullgraph=True)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    for net, fn in ((eager, eager), (comp_net, compiled)):
        nn.functional.cross_entropy(fn(x), y).backward()
    torch.testing.assert_close(comp_net.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp_net.bias.grad, eager.bias.grad, rtol=1e-5, atol=1e-6)


def test_export_round_trip(tmp_path):
    net = IOSparseNetwork(pruned(2)).eval()
    x = torch.randn(6, 12)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}})
    assert any("iosparse.dag_forward" in str(n.target) for n in ep.graph.nodes)  # the native op, one node
    path = tmp_path / "net.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    for b in (6, 11):
        xb = torch.randn(b, 12)
        torch.testing.assert_close(loaded.module()(xb), net(xb), rtol=1e-5, atol=1e-6)


def test_jit_trace_round_trip(tmp_path):
    """torch.jit.trace records the op (the path rule as a constant, as under torch.compile); the traced
    module runs other batch sizes and survives torch.jit.save / load."""
    model = pruned(3)
    conv = sparsify(model, memory=8)
    traced = torch.jit.trace(conv, torch.randn(5, 12))
    path = tmp_path / "net.ts"
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path))
    for b in (5, 17):
        xb = torch.randn(b, 12)
        torch.testing.assert_close(traced(xb), model(xb), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(xb), model(xb), rtol=1e-5, atol=1e-6)


def test_module_op_passes_opcheck():
    """The single op the module calls, with the module's own arguments (float64, and bfloat16 via the
    float32 upcast in ops.dag_forward)."""
    net = IOSparseNetwork(pruned(3), cache=False).double()
    bufs = {k: getattr(net, "op_" + k) for k in net._op_keys}
    net_list, config = ops._op_args(bufs, net._op_meta)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    w = net.weight.detach().clone().requires_grad_()
    b = nn.functional.pad(net.bias.detach(), (12, 0)).requires_grad_()
    torch.library.opcheck(torch.ops.iosparse.dag_forward.default, (x, w, b, net_list, config))
    g = torch.randn(4, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.iosparse.dag_backward.default, (g, x.detach(), w.detach(), b.detach(),
                                                                    net_list, config))
    torch.autograd.gradcheck(lambda x, w, b: ops.dag_forward(x, w, b, bufs, net._op_meta), (x, w, b))
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    yb = ops.dag_forward(xb, w.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16), bufs, net._op_meta)
    assert yb.dtype == torch.bfloat16
    yb.sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_half_precision_path_compiles_and_exports_too(tmp_path):
    """bfloat16 on CPU (computed by the float32 kernel, cast back): same guarantees, same single op."""
    torch._dynamo.reset()
    counters.clear()
    net = IOSparseNetwork(pruned(4)).to(torch.bfloat16)
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for batch in (2, 7):
        x = torch.randn(batch, 12, dtype=torch.bfloat16, requires_grad=True)
        y = compiled(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, net(x), rtol=1e-2, atol=1e-2)
        y.float().sum().backward()
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    ep = torch.export.export(net.eval(), (torch.randn(3, 12, dtype=torch.bfloat16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    assert any("iosparse.dag_forward" in str(n.target) for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "bf16.pt2")
    xb = torch.randn(5, 12, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.export.load(tmp_path / "bf16.pt2").module()(xb), net(xb))
