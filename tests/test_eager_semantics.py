"""Edge cases where the fused op does what eager PyTorch does: an empty batch (N = 0), running buffers that
require grad, and meta tensors (shape-only runs)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet import models
from fused_resnet.functional import bn_relu_conv2d_with_stats


def _eager_and_fused(momentum, training, seed=0):
    torch.manual_seed(seed)
    bn, conv = nn.BatchNorm2d(3, momentum=momentum), nn.Conv2d(3, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 1.5), bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn.num_batches_tracked.fill_(3)
    eager = nn.Sequential(bn, nn.ReLU(), conv).train(training)
    twin = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
    twin.load_state_dict(eager.state_dict())
    return eager, twin.train(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.5, None], ids=["ema", "cumulative"])
def test_empty_batch_matches_eager(backend, training, momentum):
    eager, twin = _eager_and_fused(momentum, training)
    fused = fused_resnet.FusedBNReLUConv2d.from_modules(twin[0], twin[2], backend=backend)
    outs = []
    for model in (eager, fused):
        x = torch.randn(0, 3, 5, 5, requires_grad=True)
        y = model(x)
        y.sum().backward()
        outs.append((y, x.grad))
    (ye, gxe), (yf, gxf) = outs
    assert yf.shape == ye.shape == (0, 4, 5, 5) and gxf.shape == gxe.shape == (0, 3, 5, 5)
    # Buffers (running statistics unchanged, num_batches_tracked counted as eager counts it) and every
    # parameter gradient (zeros: a sum over no values) as eager leaves them.
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
        assert b.grad is not None and torch.equal(a.grad, b.grad), name
    assert eager[0].num_batches_tracked.item() == (4 if training else 3)


def test_empty_batch_functional_residual_pair_and_stats(backend):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w, w2 = torch.randn(5, 3, 3, 3, requires_grad=True), torch.randn(6, 3, 1, 1, requires_grad=True)
    res = torch.randn(0, 5, 4, 4, requires_grad=True)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, var = bn_relu_conv2d_with_stats(
        x, w, running_mean=rm, running_var=rv, training=True, padding=1, residual=res, backend=backend,
        out_stats=True)
    assert y.shape == (0, 5, 4, 4) and mean.shape == var.shape == (5,)
    y.sum().backward()
    assert res.grad.shape == res.shape and torch.equal(w.grad, torch.zeros_like(w))
    y1, y2 = fused_resnet.bn_relu_conv2d_pair(x, w, w2, running_mean=rm, running_var=rv, training=True,
                                              padding=1, stride2=2, backend=backend)
    assert y1.shape == (0, 5, 4, 4) and y2.shape == (0, 6, 2, 2)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_empty_batch_through_a_model():
    torch.manual_seed(0)
    fused = models.preact_resnet20(num_classes=3, backend="reference")
    plain = models.preact_resnet20(num_classes=3, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(0, 3, 8, 8)
    assert fused(x).shape == plain(x).shape == (0, 3)
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_buffer_requiring_grad_raises_like_eager(which, training):
    kw = dict(running_mean=torch.zeros(3), running_var=torch.ones(3))
    kw[which].requires_grad_()
    x, w = torch.randn(2, 3, 4, 4), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=which):  # eager's error type, naming the same argument
        F.batch_norm(x, kw["running_mean"], kw["running_var"], training=training)
    with pytest.raises(RuntimeError, match=f"{which} requires grad"):
        fused_resnet.bn_relu_conv2d(x, w, training=training, padding=1, **kw)
    with torch.no_grad():  # eager accepts it without autograd, and so does the fused op
        F.batch_norm(x, kw["running_mean"].clone(), kw["running_var"].clone(), training=training)
        fused_resnet.bn_relu_conv2d(x, w, training=training, padding=1, **kw)


def test_meta_tensors_propagate_shapes_like_eager():
    """A shape-only run, whichever backend was named: no kernel runs on tensors without data."""
    for backend in ("auto", "reference", "triton", "cuda"):
        fused = models.preact_resnet20(num_classes=7, backend=backend).to("meta")
        plain = models.preact_resnet20(num_classes=7, fused=False).to("meta")
        for training in (True, False):
            x = torch.empty(2, 3, 8, 8, device="meta").contiguous(memory_format=torch.channels_last)
            y, want = fused.train(training)(x), plain.train(training)(x)
            assert y.device.type == "meta" and y.shape == want.shape == (2, 7)
        x = torch.empty(2, 3, 5, 5, device="meta", requires_grad=True)
        y = fused_resnet.bn_relu_conv2d(
            x.contiguous(memory_format=torch.channels_last), torch.empty(4, 3, 3, 3, device="meta"),
            running_mean=torch.zeros(3, device="meta"), running_var=torch.ones(3, device="meta"),
            training=True, stride=2, padding=1, backend=backend)
        assert y.shape == (2, 4, 3, 3) and y.is_contiguous(memory_format=torch.channels_last)
        y.sum().backward()
        assert x.grad.shape == x.shape and x.grad.device.type == "meta"


def test_eager_bf16_conv_reference_is_right_here():
    """The eager convolutions the tests compare against must be right: oneDNN's AMX bf16 kernels (AMX CPUs, torch
    2.13's CPU build) get this one wrong by ~2.6 (conftest.py caps oneDNN below AMX; this fails without the cap)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 3, generator=g).bfloat16().relu()
    w = torch.randn(1, 4, 1, 3, generator=g).bfloat16()
    exact = torch.nn.functional.conv2d(x.double(), w.double(), stride=(1, 2))
    y = torch.nn.functional.conv2d(x, w, stride=(1, 2)).double()
    # bf16 output rounding: 2^-8 relative, a few of them for the 12-term sum
    assert (y - exact).abs().max() <= 2 ** -6 * exact.abs().max() + 1e-3
