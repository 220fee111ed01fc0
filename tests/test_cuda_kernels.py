"""The CUDA kernels' tensor-core paths against float64, called through the binding, at geometries the
module-level matrix does not reach: stride 3, dilation together with stride, stride-phases that no tap
reaches, 5x5 filters. Runs on the emulated build (CPU tensors) and, where fused_resnet._C and a GPU are
here, on the GPU.

The inputs are bf16/fp16 values, so every product is exact in float32 and the only error is float32
accumulation; the tolerance is a multiple of torch's own float32 error on the same problem against the
float64 answer (the reference's error), plus a floor at float32 rounding of the result."""
import importlib
import importlib.util

import pytest
import torch

from fused_resnet import _emulated

GEOMETRIES = [  # (stride, dilation, padding, filter)
    (1, 1, 1, 3), (2, 1, 1, 3), (2, 2, 2, 3), (3, 2, 1, 3), (3, 1, 2, 5), (2, 1, 0, 1), (2, 3, 3, 3),
]


def _targets():
    out = []
    if _emulated.status()[0]:
        out.append(pytest.param((_emulated.load, "cpu"), id="emulated"))
    if importlib.util.find_spec("fused_resnet._C") is not None and torch.cuda.is_available():
        out.append(pytest.param((lambda: importlib.import_module("fused_resnet._C"), "cuda"), id="gpu"))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no built CUDA kernels here"))]


@pytest.fixture(params=_targets())
def ext(request):
    load, device = request.param
    return load(), device


def _check(got, want, f32, rounded=0.0):
    """|got - want| within 4x torch's float32 error, floored at float32 rounding of the largest value; plus,
    elementwise, `rounded` x |want| where the kernel rounds its float32 result to a 16-bit dtype (half an
    ulp: 2^-8 relative for bf16, 2^-11 for fp16)."""
    scale = want.abs().max().item()
    tol = 4 * (f32.double() - want).abs().max().item() + 2 ** -22 * scale + rounded * want.abs()
    err = (got.double() - want).abs()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), (f"error {err.flatten()[worst]:.3e} > tolerance {tol.flatten()[worst]:.3e} "
                                f"(|max| {scale:.3e})")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "s{}d{}p{}k{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dgrad_mma_by_phase(ext, geometry, dtype):
    """gm = conv_transpose(gy, W) rounded to the dtype (as eager's conv backward returns it) and masked by
    the recomputed ReLU (batch statistics), and the per-tile sums S1 = sum gm: every stride phase, with
    its own taps, against float64."""
    C, device = ext
    stride, dil, pad, ks = geometry
    g = torch.Generator().manual_seed(hash(geometry) % 2 ** 31)
    n, c, k, h, w = 2, 16, 24, 7, 6
    oh = (h + 2 * pad - dil * (ks - 1) - 1) // stride + 1
    ow = (w + 2 * pad - dil * (ks - 1) - 1) // stride + 1
    cl = torch.channels_last

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device).contiguous(memory_format=cl)

    x, wt, gy = rnd(n, c, h, w), rnd(k, c, ks, ks), rnd(n, k, oh, ow)
    beta = torch.randn(c, generator=g).to(device)  # mean 0, scale 1: the ReLU passes where x + beta > 0
    zero, one = torch.zeros(c, device=device), torch.ones(c, device=device)
    out = torch.empty_like(x)
    part = C.conv_dgrad(gy, wt, x, zero, one, beta, one, out, True, True, [stride] * 2, [pad] * 2, [dil] * 2, False, None, False)
    assert part.shape[0] == -(-n * -(-h // stride) * -(-w // stride) // 128) * stride * stride  # phase split ran

    def ga(t):
        return torch.nn.grad.conv2d_input(x.shape, wt.to(t), gy.to(t), stride=stride, padding=pad, dilation=dil)

    mask = (x.double() + beta.double().view(1, -1, 1, 1)) > 0
    want, f32 = ga(torch.float64) * mask, ga(torch.float32) * mask
    half_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    _check(out, want, f32, half_ulp)
    # S1 sums the rounded gm: each term within half an ulp of its float64 value, plus float32 summation.
    s1_err = (part[:, 0].sum(0).double() - want.sum((0, 2, 3))).abs()
    s1_tol = half_ulp * want.abs().sum((0, 2, 3)) + 4 * (f32.sum((0, 2, 3)).double() - want.sum((0, 2, 3))).abs().max()
    assert (s1_err <= s1_tol + 1e-6).all(), (s1_err - s1_tol).max()


@pytest.mark.parametrize("size", [(7, 6), (3, 37)], ids=["narrow", "wide"])  # output rows below / above 32
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "s{}d{}p{}k{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_wgrad_mma_splits(ext, geometry, dtype, size):
    """dW = sum over pixels of gy (x) a, the activation a = relu(x*1 + beta) rounded to the dtype, rebuilt
    in the kernel; split-K in 32-pixel chunks (the slabs summed here), against float64. 16 -> 24
    channels: the 64x64 tile, whose warps split each slice in halves."""
    _check_wgrad(*ext, geometry, dtype, size, c=24, k=16)


@pytest.mark.parametrize("channels", [(40, 72), (72, 16)], ids=["k72-tile128x64", "c72-tile64x128"])
def test_wgrad_mma_tiles(ext, channels):
    """The two other CTA tiles, each with a partial tile of channels."""
    c, k = channels
    _check_wgrad(*ext, (2, 1, 1, 3), torch.bfloat16, (7, 6), c=c, k=k)


def _check_wgrad(C, device, geometry, dtype, size, c, k):
    stride, dil, pad, ks = geometry
    h, w = size
    g = torch.Generator().manual_seed(hash((geometry, size, c, k)) % 2 ** 31)
    n = 2
    oh = (h + 2 * pad - dil * (ks - 1) - 1) // stride + 1
    ow = (w + 2 * pad - dil * (ks - 1) - 1) // stride + 1
    if oh < 1 or ow < 1:
        pytest.skip("no output pixel")
    cl = torch.channels_last

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device).contiguous(memory_format=cl)

    x, gy = rnd(n, c, h, w), rnd(n, k, oh, ow)
    beta = torch.randn(c, generator=g).to(device)
    zero, one = torch.zeros(c, device=device), torch.ones(c, device=device)
    dw = torch.empty(k, c, ks, ks, dtype=dtype, device=device).contiguous(memory_format=cl)
    pixels = n * oh * ow
    split = -(-pixels // 32)
    slabs = C.conv_wgrad(gy, x, dw, zero, one, beta, [stride] * 2, [pad] * 2, [dil] * 2, 32, split, False)
    got = slabs.sum(0).as_strided(dw.shape, dw.stride())
    a = (x.float() + beta.view(1, -1, 1, 1)).relu().to(dtype)

    def dweight(t):
        return torch.nn.grad.conv2d_weight(a.to(t), dw.shape, gy.to(t), stride=stride, padding=pad, dilation=dil)

    _check(got, dweight(torch.float64), dweight(torch.float32))


def _tf32(t):
    """The nearest TF32 value, ties away from zero (cvt.rna.tf32.f32; its twin is checked against float64
    neighbours in test_emulation.py), as float64."""
    return ((t.float().contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32).double()


TF32_GEOMETRIES = [(1, 1, 1, 3), (2, 1, 1, 3), (3, 2, 1, 3), (2, 1, 0, 1)]


@pytest.mark.parametrize("geometry", TF32_GEOMETRIES, ids=lambda g: "s{}d{}p{}k{}".format(*g))
def test_tf32_forward_dgrad_wgrad(ext, geometry):
    """fp32 with TF32 allowed: the three mma kernels round their operands to TF32 (the activation after the
    BN+ReLU, like cuDNN rounding the stored activation) and accumulate in float32. Against float64 on the
    TF32-rounded operands, where the products are exact: only float32 summation error is left."""
    C, device = ext
    stride, dil, pad, ks = geometry
    g = torch.Generator().manual_seed(hash(("tf32", geometry)) % 2 ** 31)
    n, c, k, h, w = 2, 12, 20, 7, 6  # multiples of 4, not of 8: fp32's copies are 4 channels
    oh = (h + 2 * pad - dil * (ks - 1) - 1) // stride + 1
    ow = (w + 2 * pad - dil * (ks - 1) - 1) // stride + 1
    cl = torch.channels_last

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device).contiguous(memory_format=cl)

    x, wt, gy = rnd(n, c, h, w), rnd(k, c, ks, ks), rnd(n, k, oh, ow)
    beta = torch.randn(c, generator=g).to(device)
    zero, one = torch.zeros(c, device=device), torch.ones(c, device=device)
    geo = dict(stride=stride, padding=pad, dilation=dil)
    a = (x + beta.view(1, -1, 1, 1)).relu()  # the activation in float32, as the kernels form it

    y = torch.empty(n, k, oh, ow, device=device).contiguous(memory_format=cl)
    _, rows = C.conv_forward(x, wt, None, zero, one, beta, None, y, [stride] * 2, [pad] * 2, [dil] * 2, False, True)
    assert rows == 128  # the mma path (K <= 64); the general kernel's tiles have 64 rows

    def fwd(t):
        return torch.nn.functional.conv2d(_tf32(a).to(t), _tf32(wt).to(t), **geo)

    _check(y, fwd(torch.float64), fwd(torch.float32))

    out = torch.empty_like(x)
    part = C.conv_dgrad(gy, wt, x, zero, one, beta, one, out, True, True, [stride] * 2, [pad] * 2, [dil] * 2, True, None, False)
    assert part.shape[0] == -(-n * -(-h // stride) * -(-w // stride) // 128) * stride * stride  # phase split ran
    mask = (x.double() + beta.double().view(1, -1, 1, 1)) > 0

    def ga(t):
        return torch.nn.grad.conv2d_input(x.shape, _tf32(wt).to(t), _tf32(gy).to(t), **geo) * mask

    _check(out, ga(torch.float64), ga(torch.float32))

    dw = torch.empty(k, c, ks, ks, device=device).contiguous(memory_format=cl)
    slabs = C.conv_wgrad(gy, x, dw, zero, one, beta, [stride] * 2, [pad] * 2, [dil] * 2, 32, -(-n * oh * ow // 32),
                         True)
    got = slabs.sum(0).as_strided(dw.shape, dw.stride())

    def dweight(t):
        return torch.nn.grad.conv2d_weight(_tf32(a).to(t), dw.shape, _tf32(gy).to(t), **geo)

    _check(got, dweight(torch.float64), dweight(torch.float32))


def test_tf32_layer_follows_allow_tf32(ext):
    """A training step of one fused fp32 channels_last layer on the CUDA backend: with
    torch.backends.cudnn.allow_tf32 (PyTorch's default) the result differs from the IEEE one and stays
    within TF32's error (10 mantissa bits, the fp16 floor of the shared matrix: 4e-3 of the largest value);
    without it, within float32's."""
    import fused_resnet
    from fused_resnet import reference

    _, device = ext
    g = torch.Generator().manual_seed(17)
    cl = torch.channels_last
    x = torch.randn(2, 12, 6, 6, generator=g).to(device).contiguous(memory_format=cl)
    w = (torch.randn(8, 12, 3, 3, generator=g) / 6).to(device).contiguous(memory_format=cl)
    gamma, beta = torch.rand(12, generator=g).to(device) + 0.5, torch.randn(12, generator=g).to(device)
    gy = torch.randn(2, 8, 6, 6, generator=g).to(device).contiguous(memory_format=cl)

    def step(fn, dtype, **kw):
        xs, ws = x.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        y = fn(xs, ws, None, bn_weight=gamma.to(dtype), bn_bias=beta.to(dtype), training=True, padding=1, **kw)
        y.backward(gy.to(dtype))
        return y.detach(), xs.grad, ws.grad

    oracle = step(reference.bn_relu_conv2d, torch.float64)
    ieee = step(fused_resnet.bn_relu_conv2d, torch.float32, backend="cuda")
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        tf32 = step(fused_resnet.bn_relu_conv2d, torch.float32, backend="cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    for name, want, got_ieee, got_tf32 in zip(("y", "dx", "dw"), oracle, ieee, tf32):
        scale = want.abs().max().item()
        assert (got_ieee.double() - want).abs().max() <= 2e-5 * scale, name
        assert (got_tf32.double() - want).abs().max() <= 4e-3 * scale, name
        assert not torch.equal(got_tf32, got_ieee), f"{name}: TF32 did not take effect"
