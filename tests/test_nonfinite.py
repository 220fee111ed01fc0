"""Eager's exact semantics for non-finite and degenerate inputs, in every backend: NaN and inf reach the
outputs, gradients and running statistics exactly where eager's do, and a constant channel (zero
variance: a dead feature map) gives eager's exact zeros in dx, not a rounding residual."""
import pytest
import torch
import torch.nn as nn

import fused_resnet

# numpy under Triton's CPU interpreter warns on NaN/inf arithmetic, which is what these tests feed it
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _pair(c, k, training, device, seed):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c).to(device).train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=False).to(device)
    return bn, conv


def _run(bn, conv, x, backend, activation="relu"):
    """(y, dx, dW, dgamma, running_mean, running_var) of eager (backend None) or the fused layer."""
    import copy

    bn, conv = copy.deepcopy(bn), copy.deepcopy(conv)
    x = x.detach().clone().requires_grad_(True)
    if backend is None:
        a = bn(x)
        y = conv(torch.relu(a) if activation == "relu" else a)
    elif activation == "relu":
        y = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend=backend)(x)
    else:
        y = fused_resnet.bn_relu_conv2d(
            x, conv.weight, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
            running_var=bn.running_var, training=bn.training, momentum=bn.momentum, eps=bn.eps, padding=1,
            backend=backend, activation=activation)
    g = torch.ones_like(y)
    dx, dw, dg = torch.autograd.grad(y, (x, conv.weight, bn.weight), g)
    return y, dx, dw, dg, bn.running_mean, bn.running_var


def _same_nonfinite(a, b, what):
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN pattern differs ({a.isnan().sum()} vs {b.isnan().sum()})"
    assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), f"{what}: inf pattern"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_nonfinite_input_matches_eager(backend, device, value, training, activation):
    bn, conv = _pair(3, 4, training, device, seed=1)
    x = torch.randn(2, 3, 5, 5, device=device)
    x[1, 0, 2, 3] = value
    want = _run(bn, conv, x, None, activation)
    got = _run(bn, conv, x, backend, activation)
    for name, a, b in zip(("y", "dx", "dW", "dgamma", "running_mean", "running_var"), got, want):
        _same_nonfinite(a.float(), b.float(), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_constant_channel_gives_eagers_zeros(backend, device, dtype, training):
    """Channel 1 constant with beta 0: BN output exactly 0 there, so the ReLU mask is off and dx of that
    channel is exactly 0, as eager's in float32 and bfloat16 (and cuDNN's). Eager's CPU float16
    BatchNorm is the exception: its variance of a constant float16 channel is not exactly 0, the mask
    flips on at random and its dx there is noise; the fused op gives the exact zeros in every dtype."""
    bn, conv = _pair(3, 4, training, device, seed=2)
    with torch.no_grad():
        bn.bias[1] = 0.0
        if not training:  # the running mean is the constant, so eval normalizes it to exactly 0 too
            bn.running_mean[1] = torch.tensor(0.7, dtype=dtype).item()
    x = torch.randn(2, 3, 5, 5, device=device)
    x[:, 1] = 0.7
    x = x.to(dtype)
    bn, conv = bn.to(dtype) if dtype == torch.float32 else bn, conv.to(dtype)
    y_want, dx_want, *_ = _run(bn, conv, x, None)
    y_got, dx_got, *_ = _run(bn, conv, x, backend)
    assert (dx_got[:, 1] == 0).all(), dx_got[:, 1].abs().max()
    if not (dtype == torch.float16 and device.type == "cpu"):
        assert (dx_want[:, 1] == 0).all()
