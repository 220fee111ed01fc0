"""Fused modules, blocks and models vs their plain-PyTorch twins: eval outputs, SGD training steps
(outputs, parameters, running stats), state_dict round trips, parameter counts."""
import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import models


def _assert_same_state(a: nn.Module, b: nn.Module, rtol=1e-4, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def _train_steps(model, xs, steps=2, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outs = []
    for x in xs[:steps]:
        opt.zero_grad()
        y = model(x)
        y.square().mean().backward()
        opt.step()
        outs.append(y.detach())
    return outs


def _twins(make_fused, make_plain, device):
    plain = make_plain().to(device)
    fused = make_fused().to(device)
    fused.load_state_dict(plain.state_dict(), strict=True)
    return fused, plain


@pytest.mark.parametrize("kind,in_planes,planes,stride", [
    ("basic", 4, 4, 1), ("basic", 4, 6, 2), ("bottleneck", 8, 2, 1), ("bottleneck", 4, 3, 2)])
def test_block_parity_eval_and_training(backend, device, kind, in_planes, planes, stride):
    cls = fused_resnet.PreActBlock if kind == "basic" else fused_resnet.PreActBottleneck
    torch.manual_seed(0)
    fused, plain = _twins(lambda: cls(in_planes, planes, stride, backend=backend),
                          lambda: cls(in_planes, planes, stride, fused=False), device)
    assert (fused.shortcut is None) == (stride == 1 and in_planes == planes * cls.expansion)
    xs = [torch.randn(2, in_planes, 6, 5, device=device) for _ in range(2)]
    of, op = _train_steps(fused, xs), _train_steps(plain, xs)
    for a, b in zip(of, op):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    _assert_same_state(fused, plain)
    assert fused.bn1.num_batches_tracked.item() == plain.bn1.num_batches_tracked.item() == 2
    fused.eval(), plain.eval()
    x = torch.randn(2, in_planes, 6, 5, device=device)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)


def test_block_state_dict_keys():
    b = fused_resnet.PreActBlock(4, 8, 2)
    assert {k.split(".")[0] for k in b.state_dict()} == {"bn1", "conv1", "bn2", "conv2", "shortcut"}
    assert isinstance(b.shortcut, nn.Conv2d) and b.shortcut.kernel_size == (1, 1) and b.shortcut.bias is None
    bb = fused_resnet.PreActBottleneck(16, 4, 2)
    assert bb.conv2.stride == (2, 2) and bb.conv1.stride == (1, 1) and bb.shortcut.stride == (2, 2)
    assert {k.split(".")[0] for k in bb.state_dict()} == {"bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "shortcut"}
    assert fused_resnet.PreActBottleneck(16, 4, 1).shortcut is None
    assert fused_resnet.PreActBlock(4, 4).shortcut is None


def test_fused_module_and_from_modules(backend, device):
    torch.manual_seed(1)
    m = fused_resnet.FusedBNReLUConv2d(3, 5, 3, padding=1, bias=True, backend=backend).to(device)
    x, r = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 5, 5, 5, device=device)
    bn, conv = copy.deepcopy(m.bn), copy.deepcopy(m.conv)
    torch.testing.assert_close(m(x, r), conv(torch.relu(bn(x))) + r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bn.running_mean, bn.running_mean)
    wrapped = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend=backend)
    assert wrapped.bn is bn and wrapped.conv is conv
    assert set(m.state_dict()) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                   "bn.num_batches_tracked", "conv.weight", "conv.bias"}
    with pytest.raises(ValueError, match="padding_mode"):
        fused_resnet.FusedBNReLUConv2d.from_modules(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match="features"):
        fused_resnet.FusedBNReLUConv2d.from_modules(nn.BatchNorm2d(2), nn.Conv2d(3, 4, 3))


def test_batchnorm_momentum_none_and_no_tracking(backend, device):
    for kwargs in ({"momentum": None}, {"track_running_stats": False}, {"affine": False}):
        torch.manual_seed(2)
        bn, conv = nn.BatchNorm2d(3, **kwargs).to(device), nn.Conv2d(3, 4, 1).to(device)
        m = fused_resnet.FusedBNReLUConv2d.from_modules(copy.deepcopy(bn), copy.deepcopy(conv), backend=backend)
        for _ in range(2):
            x = torch.randn(2, 3, 4, 4, device=device)
            torch.testing.assert_close(m(x), conv(torch.relu(bn(x))), rtol=1e-4, atol=1e-4)
        _assert_same_state(m.bn, bn)


EXPECTED_PARAMS = {  # conv + linear weights, as He et al. count them (BN adds 8k / 24k / 149k)
    "preact_resnet110": 1.7e6, "preact_resnet164": 1.7e6, "preact_resnet1001": 10.2e6}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_cifar_parameter_counts_match_paper(name):
    m = getattr(models, name)(fused=False)
    n = sum(p.numel() for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)) for p in mod.parameters())
    assert round(n / 1e5) == round(EXPECTED_PARAMS[name] / 1e5), n


@pytest.mark.parametrize("name", ["preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
                                  "preact_resnet152", "preact_resnet20", "preact_resnet32", "preact_resnet44",
                                  "preact_resnet56", "preact_resnet1001"])
def test_state_dict_round_trip(name):
    a = getattr(models, name)(fused=True)
    b = getattr(models, name)(fused=False)
    b.load_state_dict(a.state_dict(), strict=True)
    a.load_state_dict(b.state_dict(), strict=True)


def test_imagenet_model_layout():
    m = models.preact_resnet50(fused=False)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2) and isinstance(m.maxpool, nn.MaxPool2d)
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert m.linear.in_features == 2048 and m.linear.out_features == 1000
    assert 25.4e6 < sum(p.numel() for p in m.parameters()) < 25.7e6  # torchvision's resnet50: 25.56M


@pytest.mark.parametrize("name,hw", [("preact_resnet20", 8), ("preact_resnet18", 64)])
def test_model_parity_eval_and_training(backend, device, name, hw):
    if name == "preact_resnet18" and device.type == "cpu" and backend != "reference":
        pytest.skip("an ImageNet-stem model is too slow for the CPU interpreter; runs on a GPU")
    torch.manual_seed(3)
    fused, plain = _twins(lambda: getattr(models, name)(num_classes=5, backend=backend),
                          lambda: getattr(models, name)(num_classes=5, fused=False), device)
    xs = [torch.randn(2, 3, hw, hw, device=device) for _ in range(2)]
    of, op = _train_steps(fused, xs, lr=0.05), _train_steps(plain, xs, lr=0.05)
    for a, b in zip(of, op):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    _assert_same_state(fused, plain, rtol=1e-3, atol=1e-4)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(xs[0]), plain(xs[0]), rtol=1e-3, atol=1e-4)
