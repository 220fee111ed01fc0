"""torch.library registration: torch.compile traces through the fused op with no graph break, and
torch.library.opcheck validates the ops' schemas, fake implementations and autograd."""
import pytest
import torch

import fused_resnet
from fused_resnet import _ops


class PreActLayer(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.backend = backend

    def forward(self, x, residual):
        return fused_resnet.bn_relu_conv2d(
            x, self.conv.weight, bn_weight=self.bn.weight, bn_bias=self.bn.bias,
            running_mean=self.bn.running_mean, running_var=self.bn.running_var,
            training=self.training, residual=residual, padding=1, backend=self.backend)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(training):
    torch._dynamo.reset()
    model = PreActLayer("reference").train(training)
    compiled_model = PreActLayer("reference").train(training)
    compiled_model.load_state_dict(model.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    r = torch.randn(2, 4, 6, 6)
    y1 = model(x, r)
    y2 = compiled(x, r)  # fullgraph=True raises on any graph break
    torch.testing.assert_close(y1, y2)
    g1, = torch.autograd.grad(y1.sum(), x)
    g2, = torch.autograd.grad(y2.sum(), x)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(model.bn.running_mean, compiled_model.bn.running_mean)


def test_torch_compile_inductor_cpu():
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    model = PreActLayer("reference").eval()
    compiled = torch.compile(model, fullgraph=True)
    x, r = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    try:
        got = compiled(x, r)
    except Exception as e:  # Inductor needs a C++ toolchain at run time; say so rather than pass
        pytest.skip(f"inductor could not build on this machine: {type(e).__name__}: {e}"[:300])
    torch.testing.assert_close(got, model(x, r))


def _op_args(backend, training, device):
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    g = (torch.rand(3, device=device) + 0.5).requires_grad_()
    be = torch.randn(3, device=device, requires_grad=True)
    mean = torch.randn(3, device=device) * 0.1
    invstd = torch.rand(3, device=device) + 0.5
    r = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    return (x, w, b, g, be, mean, invstd, r, training, 1e-5, [1, 1], [1, 1], [1, 1], [5, 5], 1, True, backend)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_conv_op(backend, device, training):
    torch.library.opcheck(_ops.bn_relu_conv2d_op, _op_args(backend, training, device))


def test_opcheck_backward_and_stats_ops(backend, device):
    x = torch.randn(2, 3, 5, 5, device=device)
    torch.library.opcheck(_ops.batch_stats_op, (x, backend))
    w = torch.randn(4, 3, 3, 3, device=device)
    gy = torch.randn(2, 4, 5, 5, device=device)
    args = (gy, x, w, torch.rand(3, device=device) + 0.5, torch.randn(3, device=device),
            torch.randn(3, device=device) * 0.1, torch.rand(3, device=device) + 0.5, True, 1e-5,
            [1, 1], [1, 1], [1, 1], 1, [True, True, True, False], backend)
    torch.library.opcheck(_ops.bn_relu_conv2d_backward_op, args)


@pytest.mark.parametrize("from_x", [True, False], ids=["from-x", "from-moments"])
def test_opcheck_finalize_op(device, from_x):
    """The Triton backend's finalize op, which updates the running buffers in place (mutates_args)."""
    import fused_resnet

    if "triton" not in fused_resnet.available_backends():
        pytest.skip("needs the Triton backend")
    x = torch.randn(2, 3, 5, 5, device=device)
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    args = (x, None if from_x else mean, None if from_x else var, torch.rand(3, device=device) + 0.5,
            torch.randn(3, device=device), torch.zeros(3, device=device), torch.ones(3, device=device),
            from_x, 0.1, 1e-5, 50, "triton")
    torch.library.opcheck(_ops.bn_finalize_op, args)


def test_eager_fast_path_matches_the_registered_op(backend, device):
    """Outside torch.compile the conv runs through a plain autograd.Function over the same code: same
    outputs and gradients as the registered op's own autograd."""
    args = _op_args(backend, True, device)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    y1 = _ops.bn_relu_conv2d_op(*args)[0]
    g1 = torch.autograd.grad(y1.sum(), leaves)
    y2 = _ops.bn_relu_conv2d(*args)[0]
    g2 = torch.autograd.grad(y2.sum(), leaves)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_projection_block():
    """A projection block (conv1 and shortcut: the pair op) traces with no graph break; same outputs and
    gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    block = fused_resnet.PreActBlock(3, 4, 2, backend="reference").train()
    twin = fused_resnet.PreActBlock(3, 4, 2, backend="reference").train()
    twin.load_state_dict(block.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y1, y2 = block(x), compiled(x)
    torch.testing.assert_close(y1, y2)
    g1, = torch.autograd.grad(y1.square().sum(), x)
    g2, = torch.autograd.grad(y2.square().sum(), x)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(block.bn1.running_mean, twin.bn1.running_mean)
