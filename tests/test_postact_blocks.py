"""Post-activation blocks and ResNets (torchvision's layout): fused vs fused=False on the same modules, every
backend; state_dict keys equal torchvision's; activation bytes kept for backward; device ops vs eager."""
import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import models
from fused_resnet.bench.launches import count_device_ops

from model_checks import import_third_party


def _pair(cls, in_planes, planes, stride, backend, seed):
    torch.manual_seed(seed)
    fused = cls(in_planes, planes, stride, backend=backend)
    for m in fused.modules():  # non-trivial affine and running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    plain = copy.deepcopy(fused)
    plain.fused = False
    return fused, plain


def _step(block, x, g):
    x = x.detach().clone().requires_grad_()
    y = block(x)
    y.backward(g)
    grads = {n: p.grad for n, p in block.named_parameters()}
    return y.detach(), x.grad, grads, {k: v.clone() for k, v in block.state_dict().items()}


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_matches_eager_float64(backend, kind, shortcut, training):
    """float64: what the fused block computes equals torchvision's forward on the same modules -- output,
    input gradient, every parameter gradient, running buffers and num_batches_tracked after the step."""
    cls = fused_resnet.PostActBottleneck if kind == "bottleneck" else fused_resnet.PostActBlock
    planes = 2 if kind == "bottleneck" else 8
    stride, in_planes = (2, 8) if shortcut == "projection" else (1, planes * cls.expansion)
    fused, plain = _pair(cls, in_planes, planes, stride, backend, seed=3)
    assert (fused.downsample is not None) == (shortcut == "projection")
    fused, plain = fused.double().train(training), plain.double().train(training)
    x = torch.randn(2, in_planes, 6, 6, dtype=torch.float64)
    out = (2, planes * cls.expansion, 6 // stride, 6 // stride)
    g = torch.randn(*out, dtype=torch.float64)
    got, want = _step(fused, x, g), _step(plain, x, g)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-9, atol=1e-9, msg=name)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bottleneck_float32_and_layouts(backend, channels_last):
    fused, plain = _pair(fused_resnet.PostActBottleneck, 8, 4, 2, backend, seed=4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused, plain = fused.to(memory_format=fmt), plain.to(memory_format=fmt)
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=fmt)
    g = torch.randn(2, 16, 4, 4).contiguous(memory_format=fmt)
    got, want = _step(fused, x, g), _step(plain, x, g)
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-3, atol=1e-3, msg=name)


def test_state_dict_keys_are_torchvisions():
    tv, = import_third_party("torchvision")
    for name in ("resnet18", "resnet50", "wide_resnet50_2"):
        ours = getattr(models, name)(num_classes=10)
        theirs = getattr(tv.models, name)(num_classes=10)
        assert list(ours.state_dict()) == list(theirs.state_dict()), name
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}, name
        ours.load_state_dict(theirs.state_dict())  # strict


def test_torchvision_weights_compute_the_same():
    """A torchvision resnet18's weights in our fused resnet18 (reference backend, float64): the same
    logits and gradients in train and eval."""
    tv, = import_third_party("torchvision")
    torch.manual_seed(5)
    theirs = tv.models.resnet18(num_classes=7).double()
    ours = models.resnet18(num_classes=7, backend="reference").double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        ya, yb = theirs(x), ours(x)
        torch.testing.assert_close(yb, ya, rtol=1e-9, atol=1e-9)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        for (n, p), q in zip(theirs.named_parameters(), ours.parameters()):
            # float64, different summation orders: relative to the gradient's own size
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9 * p.grad.abs().max().item(), msg=n)
        theirs.zero_grad(), ours.zero_grad()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-9, atol=1e-9, msg=k)


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet110"])
def test_cifar_parameter_counts_match_paper(name):
    """He et al. 2015, Table 6 (with projection shortcuts where the shape changes: a few thousand more
    parameters than option A's 0.27M/0.85M/1.7M)."""
    n = sum(p.numel() for p in getattr(models, name)().parameters())
    paper = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.7e6}[name]
    assert abs(n - paper) / paper < 0.05, n


def _saved_bytes(fn, x):
    """Bytes of the distinct storages autograd keeps for backward that fn makes (not x, not parameters)."""
    seen, keep = set(), {x.untyped_storage().data_ptr()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in keep and not isinstance(t, nn.Parameter) and t.dim() == 4:
            seen.add((ptr, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return sum(b for _, b in seen), y


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_bottleneck_keeps_at_most_0_6x_eager_activation_bytes(shortcut):
    """The tensors a training step keeps for backward, made inside the block (its input is the caller's):
    eager keeps conv1's, bn1's and bn2's outputs and inputs, bn3's input and the block output; the fused
    block keeps z1, z2, z3 (and the downsample conv's output): never a BN or ReLU output."""
    in_planes, stride = (8, 2) if shortcut == "projection" else (16, 1)
    fused, plain = _pair(fused_resnet.PostActBottleneck, in_planes, 4, stride, "reference", seed=6)
    fused.train(), plain.train()
    x = torch.randn(4, in_planes, 16, 16, requires_grad=True)
    eager, _ = _saved_bytes(plain, x)
    ours, _ = _saved_bytes(fused, x)
    assert ours <= 0.6 * eager, (ours, eager, ours / eager)


def _eager_total(counter):
    return counter.total + counter.ops.get("aten.convolution_backward", 0)  # dgrad and wgrad: two kernels


@pytest.mark.parametrize("kernel_backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_issues_no_more_device_ops_than_eager(kernel_backend, kind, shortcut, channels_last):
    report = fused_resnet.available_backends()
    if kernel_backend not in report:
        pytest.skip(f"backend {kernel_backend!r} unavailable: {report.unavailable[kernel_backend]}")
    cls = fused_resnet.PostActBottleneck if kind == "bottleneck" else fused_resnet.PostActBlock
    planes = 2 if kind == "bottleneck" else 8
    stride, in_planes = (2, 8) if shortcut == "projection" else (1, planes * cls.expansion)
    fused, plain = _pair(cls, in_planes, planes, stride, kernel_backend, seed=7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused, plain = fused.to(memory_format=fmt).train(), plain.to(memory_format=fmt).train()
    counts = []
    for block in (plain, fused):
        x = torch.randn(2, in_planes, 6, 6).contiguous(memory_format=fmt).requires_grad_()
        with count_device_ops() as fwd:
            y = block(x)
        g = torch.randn_like(y)
        with count_device_ops() as bwd:
            y.backward(g)
        counts.append((fwd, bwd))
    (ef, eb), (ff, fb) = counts
    assert ff.total <= _eager_total(ef), (dict(ff.ops), dict(ef.ops))
    assert fb.total <= _eager_total(eb), (dict(fb.ops), dict(eb.ops))
    assert not ff.syncs and not fb.syncs


def test_block_under_autocast_runs_as_eager():
    """An identity shortcut stays float32 beside the bf16 conv output under autocast: eager's add promotes,
    and the fused block gives eager's result (the end then runs eager's ops)."""
    fused, plain = _pair(fused_resnet.PostActBlock, 8, 8, 1, "reference", seed=8)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(x), plain(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_a_replaced_downsample_runs_eagers_forward():
    fused, plain = _pair(fused_resnet.PostActBottleneck, 8, 4, 2, "reference", seed=9)
    for m in (fused, plain):
        m.downsample = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_statistics_handed_to_a_caller_are_merged():
    """Statistics a public function returns are plain (mean, var) tensors, merged: never the partials
    the library's own blocks hand from one fused layer to the next."""
    report = fused_resnet.available_backends()
    backend = "triton" if "triton" in report else "reference"
    torch.manual_seed(10)
    bn, conv = nn.BatchNorm2d(4).train(), nn.Conv2d(4, 6, 3, padding=1, bias=False)
    y, stats = fused_resnet.nn.fused_bn_relu_conv(bn, conv, torch.randn(2, 4, 5, 5), backend=backend, out_stats=True)
    assert type(stats) is tuple
    mean, var = torch.stack(stats)
    torch.testing.assert_close(mean, y.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, y.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    block = fused_resnet.PreActBlock(4, 4, backend=backend).train()
    out, stats = block.forward_with_stats(torch.randn(2, 4, 5, 5))
    assert type(stats) is tuple
    torch.testing.assert_close(torch.stack(stats)[0], out.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
