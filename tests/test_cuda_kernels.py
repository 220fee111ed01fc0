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


def _out_size(h, w, geometry):
    """(OH, OW) of a conv of geometry (stride, dilation, padding, filter) on an H x W input."""
    stride, dil, pad, ks = geometry
    return tuple((s + 2 * pad - dil * (ks - 1) - 1) // stride + 1 for s in (h, w))


def _maker(g, dtype, device):
    """rnd(*shape): fresh standard-normal values from generator g, in dtype on device, channels_last."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    return rnd


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "s{}d{}p{}k{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dgrad_mma_by_phase(ext, geometry, dtype):
    """gm = conv_transpose(gy, W) rounded to the dtype (as eager's conv backward returns it) and masked by
    the recomputed ReLU (batch statistics), and the per-tile sums S1 = sum gm: every stride phase, with
    its own taps, against float64. 16 -> 24 channels: the 128x16 tile, K ending mid-slice."""
    _check_dgrad(*ext, geometry, dtype, c=16, k=24)


@pytest.mark.parametrize("channels", [(16, 16), (24, 16), (40, 8), (72, 16), (48, 72)],
                         ids=["k16-half-tile128x16", "k16-half-tile128x32", "k8-tile128x64",
                              "k16-half-tile64x128", "k72-tile128x64"])
def test_dgrad_mma_tiles(ext, channels):
    """The other CTA tiles (C = input channels: 128x16, 128x32, 128x64 and 64x128, partial column tiles) and
    the half slices (32 bytes of K per step where K is exactly that: 16 channels)."""
    c, k = channels
    _check_dgrad(*ext, (2, 1, 1, 3), torch.bfloat16, c=c, k=k)


def _check_dgrad(C, device, geometry, dtype, c, k):
    stride, dil, pad, ks = geometry
    g = torch.Generator().manual_seed(hash((geometry, c, k)) % 2 ** 31)
    n, h, w = 2, 7, 6
    oh, ow = _out_size(h, w, (stride, dil, pad, ks))
    rnd = _maker(g, dtype, device)

    x, wt, gy = rnd(n, c, h, w), rnd(k, c, ks, ks), rnd(n, k, oh, ow)
    beta = torch.randn(c, generator=g).to(device)  # mean 0, scale 1: the ReLU passes where x + beta > 0
    zero, one = torch.zeros(c, device=device), torch.ones(c, device=device)
    out = torch.empty_like(x)
    part = C.conv_dgrad(gy, wt, x, zero, one, beta, one, out, True, True, [stride] * 2, [pad] * 2, [dil] * 2, False, None, False)
    rows = 128 if c <= 64 else 64  # the mma path's tiles
    assert part.shape[0] == -(-n * -(-h // stride) * -(-w // stride) // rows) * stride * stride  # phase split ran

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
    in the kernel; split-K in chunks of the launcher's granularity (the slabs summed here), against float64. 24 -> 16
    channels: the 32x32 tile, whose warps split each step's pixels in quarters."""
    _check_wgrad(*ext, geometry, dtype, size, c=24, k=16)


@pytest.mark.parametrize("channels", [(40, 72), (72, 16), (48, 40), (16, 8), (64, 128), (128, 64), (64, 64), (32, 32),
                                      (16, 16)],
                         ids=["k72-tile128x64", "c72-tile64x128", "c48-tile64x64", "c16-tile16x16", "whole128x64",
                              "whole64x128", "whole64x64", "whole32x32", "whole16x16"])
def test_wgrad_mma_tiles(ext, channels):
    """The other CTA tiles, each with a partial tile of channels (64x64: warps split each step in halves;
    16x16: in quarters), and every tile whole (K and C multiples of it: the kernel's one-address-per-pixel
    copies)."""
    c, k = channels
    _check_wgrad(*ext, (2, 1, 1, 3), torch.bfloat16, (7, 6), c=c, k=k)


@pytest.mark.parametrize("geometry", [(2, 1, 1, 3), (3, 2, 1, 3)], ids=["s2d1p1k3", "s3d2p1k3"])
@pytest.mark.parametrize("channels", [(64, 64), (24, 16)], ids=["whole64x64", "partial32x32"])
def test_wgrad_mma_pixel_walk(ext, geometry, channels):
    """Splits of several 64-pixel steps at strides 2 and 3: each thread's pixel walks on by a step's
    pixels with carries out of the output row (into the next row: x moves by stride rows) and out of the
    image, taps in padding on both sides. The other wgrad cases fit a split in one step at these strides."""
    c, k = channels
    _check_wgrad(*ext, geometry, torch.bfloat16, (31, 23), c=c, k=k)


def _check_wgrad(C, device, geometry, dtype, size, c, k):
    stride, dil, pad, ks = geometry
    h, w = size
    g = torch.Generator().manual_seed(hash((geometry, size, c, k)) % 2 ** 31)
    n = 2
    oh, ow = _out_size(h, w, (stride, dil, pad, ks))
    if oh < 1 or ow < 1:
        pytest.skip("no output pixel")
    cl = torch.channels_last

    rnd = _maker(g, dtype, device)

    x, gy = rnd(n, c, h, w), rnd(n, k, oh, ow)
    beta = torch.randn(c, generator=g).to(device)
    zero, one = torch.zeros(c, device=device), torch.ones(c, device=device)
    dw = torch.empty(k, c, ks, ks, dtype=dtype, device=device).contiguous(memory_format=cl)
    pixels = n * oh * ow
    # the launcher's chunk (a multiple of every kernel's pixel step, whose warps may split it in quarters),
    # twice that where there are pixels enough for two steps per split
    chunk = C.WGRAD_CHUNK * (2 if pixels > 2 * C.WGRAD_CHUNK else 1)
    split = -(-pixels // chunk)
    slabs = C.conv_wgrad(gy, x, dw, zero, one, beta, [stride] * 2, [pad] * 2, [dil] * 2, chunk, split, False, True)
    got = slabs.sum(0).as_strided(dw.shape, dw.stride())
    a = (x.float() + beta.view(1, -1, 1, 1)).relu().to(dtype)

    def dweight(t):
        return torch.nn.grad.conv2d_weight(a.to(t), dw.shape, gy.to(t), stride=stride, padding=pad, dilation=dil)

    _check(got, dweight(torch.float64), dweight(torch.float32))


FORWARD_CASES = [  # (dtype, C, K, geometry): every slice width and CTA tile of the forward (conv_forward_mma.cu)
    # the wide 128-byte slice (C a multiple of 64 16-bit / 32 fp32 channels)
    (torch.bfloat16, 64, 24, (1, 1, 1, 3)),  # 128x32 tile, C exactly one slice (its affine held in registers)
    (torch.bfloat16, 64, 40, (2, 1, 1, 3)),  # 128x64
    (torch.bfloat16, 64, 16, (2, 1, 0, 1)),  # 128x16
    (torch.bfloat16, 128, 72, (1, 2, 2, 3)),  # 64x128 tile, two slices per tap, a partial column tile
    (torch.float16, 128, 24, (2, 1, 0, 1)),
    (torch.float32, 32, 72, (1, 1, 1, 3)),  # TF32, C exactly one slice (its affine held in registers)
    (torch.float32, 64, 24, (1, 1, 0, 1)),  # TF32, two slices per tap
    # the narrow 64-byte slice
    (torch.bfloat16, 40, 24, (1, 1, 1, 3)),  # 40 channels end mid-slice
    (torch.float16, 32, 8, (1, 1, 0, 1)),  # 128x16 with 8 of its 16 columns, C exactly one slice
    (torch.bfloat16, 32, 32, (1, 1, 1, 3)),  # 128x32, C exactly one slice (its affine held in registers)
    (torch.bfloat16, 32, 40, (2, 1, 1, 3)),  # 128x64 at C = one slice: its affine per step, from shared memory
    (torch.float32, 16, 24, (2, 1, 1, 3)),  # TF32, 128x32, C exactly one slice
    # the half slice (32 bytes: C is exactly one mma's reduction, CIFAR's 16 channels)
    (torch.bfloat16, 16, 16, (1, 1, 1, 3)),  # 128x16
    (torch.bfloat16, 16, 24, (2, 1, 1, 3)),  # 128x32, a partial column tile
    (torch.bfloat16, 16, 72, (1, 2, 2, 3)),  # 64x128
    (torch.float32, 8, 12, (1, 1, 1, 3)),  # TF32, 128x16
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "{}-c{}-k{}-s{}d{}p{}k{}".format(
    str(c[0]).split(".")[-1], c[1], c[2], *c[3]))
def test_forward_mma_slices(ext, case):
    """y = conv(relu(bn(x)), W) + residual through the forward's tensor-core path with a real BN affine (mean,
    scale, beta per channel), for both slice widths and tiles; y and the residual dense channels_last, so the
    epilogue's 16-byte path runs. The scales are powers of two, so the kernel's
    fma((x - mean), scale, beta) is exactly torch's float32 (x - mean) * scale + beta: the activation is
    rebuilt bit for bit here and only the conv's float32 accumulation is left to the tolerance."""
    C, device = ext
    dtype, c, k, (stride, dil, pad, ks) = case
    g = torch.Generator().manual_seed(hash(("forward", c, k, stride, dil, pad, ks, str(dtype))) % 2 ** 31)
    n, h, w = 2, 7, 6
    oh, ow = _out_size(h, w, (stride, dil, pad, ks))
    cl = torch.channels_last

    rnd = _maker(g, dtype, device)

    x, wt, res = rnd(n, c, h, w), rnd(k, c, ks, ks), rnd(n, k, oh, ow)
    mean = torch.randn(c, generator=g).to(device)
    scale = (2.0 ** torch.randint(-1, 3, (c,), generator=g)).float().to(device)
    beta = torch.randn(c, generator=g).to(device)
    y = torch.empty(n, k, oh, ow, dtype=dtype, device=device).contiguous(memory_format=cl)
    tf32 = dtype == torch.float32
    _, rows = C.conv_forward(x, wt, None, mean, scale, beta, res, y, [stride] * 2, [pad] * 2, [dil] * 2, False,
                             tf32, True)
    assert rows == (128 if k <= 64 else 64)  # the mma path's tiles

    def view(t):
        return t.view(1, -1, 1, 1)

    a = ((x.float() - view(mean)) * view(scale) + view(beta)).relu().to(dtype)
    geo = dict(stride=stride, padding=pad, dilation=dil)
    if tf32:
        def fwd(t):
            return torch.nn.functional.conv2d(_tf32(a).to(t), _tf32(wt).to(t), **geo) + res.to(t)
        rounded = 0.0
    else:
        def fwd(t):
            return torch.nn.functional.conv2d(a.to(t), wt.to(t), **geo) + res.to(t)
        rounded = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    _check(y, fwd(torch.float64), fwd(torch.float32), rounded)


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
    oh, ow = _out_size(h, w, (stride, dil, pad, ks))
    cl = torch.channels_last

    rnd = _maker(g, torch.float32, device)

    x, wt, gy = rnd(n, c, h, w), rnd(k, c, ks, ks), rnd(n, k, oh, ow)
    beta = torch.randn(c, generator=g).to(device)
    zero, one = torch.zeros(c, device=device), torch.ones(c, device=device)
    geo = dict(stride=stride, padding=pad, dilation=dil)
    a = (x + beta.view(1, -1, 1, 1)).relu()  # the activation in float32, as the kernels form it

    y = torch.empty(n, k, oh, ow, device=device).contiguous(memory_format=cl)
    _, rows = C.conv_forward(x, wt, None, zero, one, beta, None, y, [stride] * 2, [pad] * 2, [dil] * 2, False, True, True)
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
    slabs = C.conv_wgrad(gy, x, dw, zero, one, beta, [stride] * 2, [pad] * 2, [dil] * 2, C.WGRAD_CHUNK,
                         -(-n * oh * ow // C.WGRAD_CHUNK), True, True)
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
