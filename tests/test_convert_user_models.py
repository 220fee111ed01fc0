"""convert() on models written the way users write them, each one a way a conversion could change what a
model computes or what its parts are called: it must not. Every model here runs in float64 through
model_checks.assert_converted_is_original (outputs, gradients, buffers in train and eval; names,
module paths, strict checkpoints both ways), and the report says what was fused and why not."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet.convert import fused_calls
from model_checks import assert_converted_is_original, chains, fused_chains

X = (2, 4, 6, 6)


def _check(model, fused, x=None):
    torch.manual_seed(0)
    model = model.double()
    x = torch.randn(*X, dtype=torch.float64) if x is None else x
    conv = fused_resnet.convert(model, backend="reference")
    report = {e.where: e for e in conv.fusion_report}
    assert sum(e.fused for e in conv.fusion_report) == fused, "\n".join(map(str, conv.fusion_report))
    assert_converted_is_original(model, conv, x, type(model).__name__)
    return conv, report


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward does more than batch norm."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


class NormReLU(nn.BatchNorm2d):
    """A norm+activation module written by hand (like timm's BatchNormAct2d, not that class)."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(super().forward(x))


class Unit(nn.Module):
    def __init__(self, bn, c=4):
        super().__init__()
        self.bn = bn
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        a = self.bn(x)
        return self.conv(a if isinstance(self.bn, NormReLU) else F.relu(a)) + x


def test_bn_subclass_that_does_more_is_never_fused():
    conv, report = _check(Unit(ScaledBN(4)), fused=0)
    assert "mul()" in report["bn"].why


def test_bn_subclass_that_is_bn_then_relu_is_fused():
    conv, report = _check(Unit(NormReLU(4)), fused=1)
    assert report["bn -> conv"].fused


class Shared(nn.Module):
    """One attention module registered under several names (each unit holds it) and an unused spare."""

    def __init__(self):
        super().__init__()
        gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
        self.units = nn.ModuleList(Unit(nn.BatchNorm2d(4)) for _ in range(3))
        for u in self.units:
            u.gate = gate
        self.spare = nn.Linear(2, 2)

    def forward(self, x):
        for u in self.units:
            x = u(x)
            x = x * u.gate(x)
        return x


def test_modules_under_several_names_keep_every_key():
    model = Shared()
    conv, _ = _check(model, fused=3)
    assert conv.units[2].gate is conv.units[0].gate
    assert len(conv.state_dict()) == len(model.state_dict())


class MaskedConvNet(nn.Module):
    """conv weights computed in forward: masked, standardized, and straight-through binarized."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.w1 = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.register_buffer("mask", (torch.rand(4, 4, 3, 3) > 0.3).float())
        self.w2 = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.w3 = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.b3 = nn.Parameter(torch.randn(4))
        self.sign = SignSTE.apply  # bound before convert() traces (pytorchcv's shake-drop units do this)

    def forward(self, x):
        x = F.conv2d(F.relu(self.bn1(x)), self.w1 * self.mask, padding=1) + x
        w2 = (self.w2 - self.w2.mean((1, 2, 3), keepdim=True)) / (self.w2.std((1, 2, 3), keepdim=True) + 1e-5)
        x = F.conv2d(torch.relu(self.bn2(x)), w2)
        return F.conv2d(self.bn3(x).relu(), self.sign(self.w3), self.b3, 1, 1) + SignSTE.apply(x)


class SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return w.sign()

    @staticmethod
    def backward(ctx, g):
        return g  # straight through: fx would inline forward and lose this


def test_functional_convs_with_weights_computed_in_forward():
    conv, report = _check(MaskedConvNet(), fused=3)
    assert report["bn1 -> conv2d() of a weight computed in forward"].why.startswith("with the residual")


class FunctionalBN(nn.Module):
    """F.batch_norm on the module's own tensors, then ReLU and conv."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.conv = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        a = F.batch_norm(x, self.rm, self.rv, self.weight, self.bias, self.training, 0.2, 1e-4)
        return self.conv(F.relu(a, inplace=True))


def test_functional_batch_norm_is_a_chain_member():
    _check(FunctionalBN(), fused=1)


class StochasticDepth(nn.Module):
    """A unit that skips its body at random with Python's random (fx would freeze one draw)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False))

    def forward(self, x):
        if self.training and random.random() < 0.5:
            return x
        return x + self.body(x)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.units = nn.Sequential(*(StochasticDepth() for _ in range(4)))

    def forward(self, x):
        return self.units(x)


def test_untraceable_units_convert_their_bodies():
    conv, report = _check(Stack(), fused=4)
    assert any("random.random()" in e.why for e in conv.fusion_report)
    # the draws still happen at every call: some steps skip bodies, some do not (seeded in model_checks)
    conv.train()
    outs = {conv(torch.randn(*X, dtype=torch.float64)).abs().sum().item() > 0 for _ in range(3)}
    assert outs


class NoGradInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.stats = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        with torch.no_grad():
            s = self.stats(x)
        return self.body(x) + s


def test_grad_mode_context_is_not_traced_through():
    conv, report = _check(NoGradInside(), fused=1)
    assert "no_grad" in report["<model>"].why


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.bn.register_forward_hook(lambda m, i, o: o * 0.5)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


def test_modules_with_hooks_keep_running_their_hooks():
    conv, report = _check(Hooked(), fused=0)
    assert "hooks" in report["bn"].why


class BNThenConv(nn.Module):
    """PyramidNet's unit start: BN -> conv, no activation between."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_bn_then_conv_is_fused_with_no_activation():
    conv, report = _check(BNThenConv(), fused=1)
    assert report["bn -> conv"].fused


def test_names_and_paths_after_convert():
    """Code that selects parameters by name (weight-decay groups, freezing) and module paths keeps working."""
    from test_convert import Net

    model = Net()
    conv = fused_resnet.convert(model)
    assert fused_calls(conv) == 5
    assert dict(conv.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert conv.block1.bn1.weight.shape == model.block1.bn1.weight.shape
    assert conv.get_submodule("block2.shortcut.0") is not None
    no_decay = [p for n, p in conv.named_parameters() if ".bn" in n]
    assert len(no_decay) == 8


def test_independent_chain_count_matches_on_user_models():
    for model in (Shared(), MaskedConvNet(), FunctionalBN()):
        conv = fused_resnet.convert(model, backend="reference")
        assert fused_chains(conv.fusion_report) == chains(model, torch.randn(*X))


@pytest.mark.parametrize("bad", ["bogus", "", None])
def test_convert_refuses_bad_backend_before_anything(bad):
    model = Net2 = Unit(nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in Net2.state_dict().items()}
    with pytest.raises(ValueError, match="unknown backend"):
        fused_resnet.convert(model, backend=bad, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_model_compiles_fullgraph(training):
    """torch.compile(fullgraph=True) of a converted model (module convs, a pair, functional weights):
    no graph break, the same outputs, gradients and running statistics as the eager original."""
    from test_convert import Net

    torch._dynamo.reset()
    for model in (Net(), MaskedConvNet()):
        model.train(training)
        conv = fused_resnet.convert(model, backend="reference")
        compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
        x = torch.randn(2, 4 if isinstance(model, MaskedConvNet) else 3, 6, 6, requires_grad=True)
        y1, y2 = model(x), compiled(x)
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
        g1, = torch.autograd.grad(y1.square().sum(), x)
        g2, = torch.autograd.grad(y2.square().sum(), x)
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5)
        for (k, a), b in zip(model.state_dict().items(), conv.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------------- post-activation
# BN -> add (-> ReLU): fused where the fused op computes what the graph does, left alone where it cannot.


class PostActEnd(nn.Module):
    """torchvision's block end: out = bn(conv(x)); out += identity (or a downsample BN); relu(out)."""

    def __init__(self, downsample=False, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=momentum)
        self.down = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=momentum)) \
            if downsample else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += self.down(x) if self.down is not None else x
        return self.relu(out)


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_post_activation_end_is_fused(downsample, momentum):
    conv, report = _check(PostActEnd(downsample, momentum), fused=2 if downsample else 1)
    assert report["bn -> add -> ReLU"].fused
    assert fused_chains(conv.fusion_report) == chains(PostActEnd(downsample, momentum).double(),
                                                      torch.randn(*X, dtype=torch.float64))


class AddIntoShortcut(nn.Module):
    """`base += bn(z)` through a view: the write must reach the tensor the view belongs to."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        base = x * 2
        v = base.view(base.shape)
        v += self.bn(self.conv(x))
        return base


def test_in_place_add_into_the_shortcut_is_left_alone():
    conv, report = _check(AddIntoShortcut(), fused=0)
    assert not report["bn"].fused


class SharedBN(nn.Module):
    """One BN on both sides of the add: eager updates its buffers twice, in order."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=None)

    def forward(self, x):
        return F.relu(self.bn(self.a(x)) + self.bn(self.b(x)))


def test_one_bn_on_both_sides_of_the_add_is_left_alone():
    _check(SharedBN(), fused=0)


class MixedDtypeEnd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, a, b):
        out = self.bn(a)
        out += b
        return torch.relu(out)


def test_post_activation_fallback_keeps_the_in_place_adds_dtype():
    """Where the fused op cannot take the inputs (here: a float64 shortcut added in place into a float32 BN
    output), the eager composition runs as the graph wrote it: the in-place add keeps float32."""
    model = MixedDtypeEnd()
    conv = fused_resnet.convert(model, backend="reference")
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    want, got = model(a, b), conv(a, b)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
