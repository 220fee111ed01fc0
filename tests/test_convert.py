"""convert() on hand-written models: what it fuses, that no BatchNorm runs on its own afterwards, and
that eval outputs and training steps (outputs, gradients, running stats) match the original."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet.convert import _fused_bn_act_conv_pair, fused_calls


def _pair_calls(model):
    """The fused pair calls in a converted model's graphs (one BN feeding two convs)."""
    return sum(n.target is _fused_bn_act_conv_pair for m in model.modules() if hasattr(m, "_graphs")
               for n in m._graphs[True].graph.nodes)


class HandWrittenPreAct(nn.Module):
    """The common hand-written PreActBlock: F.relu in forward, projection on the pre-activation."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False)) if stride != 1 else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + sc


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = HandWrittenPreAct(4, 4, 1)
        self.block2 = HandWrittenPreAct(4, 6, 2)
        self.head = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.Conv2d(6, 5, 1, bias=True),
                                  nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


def _count_bn_calls(model, x):
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d)]
    model(x)
    for h in hooks:
        h.remove()
    return len(calls)


def test_convert_fuses_and_reports(backend, device):
    torch.manual_seed(0)
    model = Net().to(device)
    conv = fused_resnet.convert(model, backend=backend)
    fused = [e for e in conv.fusion_report if e.fused]
    skipped = [e for e in conv.fusion_report if not e.fused]
    # block1: bn1->conv1, bn2->conv2 (+residual); block2: bn1->{conv1, shortcut}, bn2->conv2; head: one.
    assert len(fused) == 6, "\n".join(map(str, conv.fusion_report))
    assert sum("residual add in the epilogue" in e.why for e in fused) == 2
    # block2's bn1 feeds conv1 and the shortcut: one pair op, so its backward runs once (as eager's)
    assert _pair_calls(conv) == 1
    assert fused_calls(conv) == 5
    assert sum("one op with" in e.why for e in fused) == 2
    assert any("head.3" in e.where for e in skipped)  # the BN followed by pooling stays as it is
    x = torch.randn(2, 3, 6, 6, device=device)
    assert _count_bn_calls(conv, x) == 1  # only the head's unfused BN runs on its own
    assert _count_bn_calls(model, x) == 6  # the original is untouched (inplace=False)


def _tagged_state(model):
    """State of every module carrying a `_tag` (its name in the original), keyed like a state_dict."""
    out = {}
    for m in model.modules():
        tag = getattr(m, "_tag", None)
        if tag is not None:
            for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                out[f"{tag}.{k}" if tag else k] = v
    return out


def test_converted_model_matches_original(backend, device):
    torch.manual_seed(1)
    model = Net().to(device)
    for name, m in model.named_modules():
        m._tag = name  # convert() shares modules, so the tags show where each tensor came from
    conv = fused_resnet.convert(model, backend=backend)
    xs = [torch.randn(2, 3, 6, 6, device=device) for _ in range(2)]
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(conv.parameters(), lr=0.1)
    for x in xs:
        ya, yb = model(x), conv(x)
        torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
        opt_a.zero_grad(), opt_b.zero_grad()
        ya.square().sum().backward(), yb.square().sum().backward()
        sa, sb = _tagged_state(model), _tagged_state(conv)
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], nn.Parameter):
                torch.testing.assert_close(sb[k].grad, sa[k].grad, rtol=1e-4, atol=1e-5, msg=lambda s: f"d{k}: {s}")
        opt_a.step(), opt_b.step()
    sa, sb = _tagged_state(model), _tagged_state(conv)
    for k in sa:  # parameters after the steps, running stats, num_batches_tracked
        torch.testing.assert_close(sb[k].float(), sa[k].float(), rtol=1e-4, atol=1e-5, msg=lambda s: f"{k}: {s}")
    model.eval(), conv.eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-4, atol=1e-5)


def test_convert_inplace_and_bad_input():
    model = Net()
    out = fused_resnet.convert(model, inplace=True)
    assert fused_calls(out) == 5
    assert out.block1 is model.block1 and out.head is model.head  # the same modules, converted in place
    with pytest.raises(TypeError, match="nn.Module"):
        fused_resnet.convert(lambda x: x)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_resnet.convert(Net(), backend="fast")


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: fx fails there, so the children are converted."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def test_untraceable_top_level_converts_children():
    torch.manual_seed(2)
    model = Untraceable()
    conv = fused_resnet.convert(model)
    assert any("not traceable" in e.why for e in conv.fusion_report)
    assert sum(e.fused for e in conv.fusion_report) == 1
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), model(x), rtol=1e-4, atol=1e-5)


def test_our_models_are_left_alone():
    m = fused_resnet.models.preact_resnet20().eval()
    conv = fused_resnet.convert(m)
    assert not any(e.fused for e in conv.fusion_report)  # blocks are fused already; the head BN feeds a pool
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv(x), m(x))


class EdgeNet(nn.Module):
    """A BN with eps=0, a grouped conv after BN -> ReLU, and a ReLU output that a pool also reads."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4, eps=0.0)
        self.conv0 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv0(F.relu(self.bn0(x)))
        x = self.grouped(F.relu(self.bn1(x)))
        a = F.relu(self.bn2(x))
        return self.conv2(a) + F.adaptive_avg_pool2d(a, 1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter, on eps=0 math
def test_converted_model_runs_wherever_the_original_runs(backend, device):
    """eps=0 is fused (eager accepts it in eval and refuses it in training, and so does the converted
    model); a grouped conv is left to eager with the reason in the report, under every backend; the
    report names the pool that reads a ReLU output, in words."""
    torch.manual_seed(5)
    model = EdgeNet().to(device)
    conv = fused_resnet.convert(model, backend=backend)
    report = {e.where: e for e in conv.fusion_report}
    assert report["bn0 -> conv0"].fused
    assert not report["bn1"].fused and "groups=2" in report["bn1"].why
    why = report["bn2"].why
    assert "adaptive_avg_pool2d()" in why and "besides the conv" in why and "%" not in why
    x = torch.randn(2, 4, 6, 6, device=device)
    for m in (model, conv):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            m.train()(x)
    model.bn0.eps = conv.bn0.eps = 1e-5
    for training in (True, False):
        model.train(training), conv.train(training)
        torch.testing.assert_close(conv(x), model(x), rtol=1e-4, atol=1e-5)
    model.bn0.eps = conv.bn0.eps = 0.0
    model.eval(), conv.eval()
    torch.testing.assert_close(conv(x), model(x), rtol=1e-4, atol=1e-5)
    got, want = conv.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    # eager's BatchNorm bumps num_batches_tracked before F.batch_norm refuses eps=0; the fused layer
    # validates first and changes nothing on a refused call
    assert got["bn0.num_batches_tracked"] == want["bn0.num_batches_tracked"] - 1
    for k in set(want) - {"bn0.num_batches_tracked"}:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_every_report_reason_is_readable():
    """No raw fx node dumps, nothing cut mid-word: each reason is a sentence about modules."""
    conv = fused_resnet.convert(Net(), backend="reference")
    for e in conv.fusion_report:
        assert "%" not in e.why and "call_function" not in e.why and "num_users" not in e.why, e.why
