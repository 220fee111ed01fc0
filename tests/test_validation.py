"""Bad input is refused before any kernel runs, with a message naming the problem; buffers untouched."""
import pytest
import torch

import fused_resnet


def _good(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(2, 3, 5, 5, generator=g).to(device, dtype),
        weight=torch.randn(4, 3, 3, 3, generator=g).to(device, dtype),
        bias=torch.randn(4, generator=g).to(device, dtype),
        bn_weight=torch.rand(3, generator=g).to(device, dtype),
        bn_bias=torch.randn(3, generator=g).to(device, dtype),
        running_mean=torch.randn(3, generator=g).to(device, dtype),
        running_var=torch.rand(3, generator=g).to(device, dtype) + 0.5,
        training=True, padding=1,
    )


def _call(kw):
    kw = dict(kw)
    return fused_resnet.bn_relu_conv2d(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), **kw)


CASES = {
    "x rank": (lambda k: k.update(x=k["x"][0]), ValueError, "4-D"),
    "weight rank": (lambda k: k.update(weight=k["weight"][:, :, 0]), ValueError, "weight must be 4-D"),
    "channel mismatch": (lambda k: k.update(weight=torch.randn(4, 2, 3, 3)), ValueError, "x has 3 channels"),
    "bn_weight size": (lambda k: k.update(bn_weight=torch.rand(4)), ValueError, "bn_weight must have shape (3,)"),
    "running_var size": (lambda k: k.update(running_var=torch.rand(2)), ValueError, "running_var must have shape (3,)"),
    "bias size": (lambda k: k.update(bias=torch.rand(3)), ValueError, "bias must have shape (4,)"),
    "residual shape": (lambda k: k.update(residual=torch.randn(2, 4, 4, 5)), ValueError, "residual must have the output's shape (2, 4, 5, 5)"),
    "integer x": (lambda k: k.update(x=torch.ones(2, 3, 5, 5, dtype=torch.int64)), TypeError, "x must be float16"),
    "mixed dtypes": (lambda k: k.update(weight=k["weight"].double()), TypeError, "weight has dtype torch.float64"),
    "mixed residual dtype": (lambda k: k.update(residual=torch.randn(2, 4, 5, 5, dtype=torch.float64)), TypeError, "residual has dtype"),
    "mixed devices": (lambda k: k.update(running_mean=k["running_mean"].to("meta")), ValueError, "running_mean is on meta"),
    "eval without stats": (lambda k: k.update(training=False, running_mean=None, running_var=None), ValueError, "needs running_mean and running_var"),
    "one stat buffer": (lambda k: k.update(running_var=None), ValueError, "must be given together"),
    "unknown backend": (lambda k: k.update(backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
    "bad stride": (lambda k: k.update(stride=0), ValueError, "stride must be >= 1"),
    "bad padding": (lambda k: k.update(padding="full"), ValueError, "padding must be"),
    "same with stride": (lambda k: k.update(padding="same", stride=2), ValueError, "needs stride 1"),
    "empty output": (lambda k: k.update(padding=0, dilation=3), ValueError, "output would be empty"),
    "one value per channel": (lambda k: k.update(x=k["x"][:1, :, :1, :1], padding=1), ValueError, "more than 1 value per channel"),
    "not a tensor": (lambda k: k.update(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
    "bad eps": (lambda k: k.update(eps=-1e-5), ValueError, "eps must be a finite float >= 0"),
    "bad groups": (lambda k: k.update(groups=0), ValueError, "groups must be a positive int"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_before_any_work(device, name):
    mutate, exc, message = CASES[name]
    kw = _good(device)
    rm, rv = kw["running_mean"], kw["running_var"]
    rm0, rv0 = rm.clone(), rv.clone()
    mutate(kw)
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        _call(kw)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "a failed call changed the running stats"


def test_explicit_triton_refuses_groups(device):
    kw = _good(device)
    kw.update(weight=torch.randn(4, 1, 3, 3, device=device), groups=3, backend="triton")
    kw["x"] = torch.randn(2, 3, 5, 5, device=device)
    kw["weight"] = torch.randn(3, 1, 3, 3, device=device)
    kw["bias"] = None
    with pytest.raises(NotImplementedError, match="groups=1 only"):
        _call(kw)


def test_auto_routes_groups_to_reference(device):
    kw = _good(device)
    kw.update(x=torch.randn(2, 4, 5, 5, device=device), weight=torch.randn(6, 2, 3, 3, device=device),
              bias=None, bn_weight=None, bn_bias=None, running_mean=torch.zeros(4, device=device),
              running_var=torch.ones(4, device=device), groups=2)
    got = _call(kw)
    kw2 = {k: v for k, v in kw.items()}
    kw2["running_mean"], kw2["running_var"] = torch.zeros(4, device=device), torch.ones(4, device=device)
    want = fused_resnet.reference.bn_relu_conv2d(kw2.pop("x"), kw2.pop("weight"), kw2.pop("bias"), **kw2)
    torch.testing.assert_close(got, want)


def test_unavailable_backend_says_why():
    report = fused_resnet.available_backends()
    assert "reference" in report
    for name, why in report.unavailable.items():
        assert why
        kw = _good("cpu")
        kw["backend"] = name
        with pytest.raises(RuntimeError, match=f"backend='{name}'"):
            _call(kw)
    assert "reference" in repr(report)


@pytest.mark.parametrize("build", [
    lambda b: fused_resnet.FusedBNReLUConv2d(3, 4, 3, backend=b),
    lambda b: fused_resnet.FusedBNReLUConv2d.from_modules(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3), backend=b),
    lambda b: fused_resnet.FusedBNReLUConv2dPair(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3),
                                                 torch.nn.Conv2d(3, 4, 1), backend=b),
    lambda b: fused_resnet.PreActBlock(3, 4, 2, backend=b),
    lambda b: fused_resnet.PreActBottleneck(8, 2, backend=b),
    lambda b: fused_resnet.models.preact_resnet20(backend=b),
], ids=["layer", "from_modules", "pair", "block", "bottleneck", "model"])
def test_unknown_backend_fails_at_construction(build):
    """A typo in backend= fails where the module is built, not at its first forward."""
    for bad in ("bogus", None):
        with pytest.raises(ValueError, match=f"unknown backend {bad!r}; expected one of auto, reference, triton, cuda"):
            build(bad)
    build("reference")  # a known name builds
