"""The self-check of `fused-resnet check`: layer shapes, the eager baseline and parity errors
against a float64 reference run. (Timing lives in fused_resnet/bench/.)"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import reference
from .functional import bn_relu_conv2d


@dataclass(frozen=True)
class Layer:
    name: str
    n: int
    c: int
    k: int
    h: int
    w: int
    kernel: int
    stride: int = 1
    residual: bool = True

    @property
    def padding(self):
        return self.kernel // 2

    def out_hw(self):
        return ((self.h + 2 * self.padding - self.kernel) // self.stride + 1,
                (self.w + 2 * self.padding - self.kernel) // self.stride + 1)

    def flops(self):
        oh, ow = self.out_hw()
        return 2 * self.n * self.k * oh * ow * self.c * self.kernel * self.kernel


# Pre-activation ResNet layers at ImageNet resolution, batch 32 (issue 2's "realistic sizes").
GPU_LAYERS = [
    Layer("stage1 3x3 64->64 56x56", 32, 64, 64, 56, 56, 3),
    Layer("stage2 3x3 128->128 28x28", 32, 128, 128, 28, 28, 3),
    Layer("stage3 3x3 256->256 14x14", 32, 256, 256, 14, 14, 3),
    Layer("bottleneck 1x1 256->64 56x56", 32, 256, 64, 56, 56, 1, residual=False),
    Layer("bottleneck 1x1 64->256 56x56", 32, 64, 256, 56, 56, 1),
    Layer("down 3x3/2 128->256 28x28", 32, 128, 256, 28, 28, 3, stride=2, residual=False),
]

# Interpreter-sized layers for the CPU self-check.
CPU_LAYERS = [
    Layer("3x3 5->6 7x7", 2, 5, 6, 7, 7, 3),
    Layer("1x1 6->4 6x5", 2, 6, 4, 6, 5, 1),
    Layer("3x3/2 3->5 9x9", 1, 3, 5, 9, 9, 3, stride=2, residual=False),
]


def make_inputs(layer: Layer, dtype, device, seed=0, channels_last=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    oh, ow = layer.out_hw()

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return dict(
        x=rnd(layer.n, layer.c, layer.h, layer.w).contiguous(memory_format=fmt),
        weight=rnd(layer.k, layer.c, layer.kernel, layer.kernel,
                   scale=(layer.c * layer.kernel ** 2) ** -0.5).contiguous(memory_format=fmt),
        bn_weight=(torch.rand(layer.c, generator=g) + 0.5).to(device, torch.float32),
        bn_bias=(torch.randn(layer.c, generator=g) * 0.3).to(device, torch.float32),
        running_mean=torch.zeros(layer.c, device=device),
        running_var=torch.ones(layer.c, device=device),
        residual=rnd(layer.n, layer.k, oh, ow).contiguous(memory_format=fmt) if layer.residual else None,
        grad=rnd(layer.n, layer.k, oh, ow).contiguous(memory_format=fmt),
    )


def eager(t, layer, training):
    """The unfused baseline: what a PyTorch pre-activation block runs today."""
    a = F.relu(F.batch_norm(t["x"], t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"],
                            training, 0.1, 1e-5))
    y = F.conv2d(a, t["weight"], None, layer.stride, layer.padding)
    return y if t["residual"] is None else y + t["residual"]


def fused(t, layer, training, backend="auto"):
    return bn_relu_conv2d(t["x"], t["weight"], bn_weight=t["bn_weight"], bn_bias=t["bn_bias"],
                          running_mean=t["running_mean"], running_var=t["running_var"], training=training,
                          stride=layer.stride, padding=layer.padding, residual=t["residual"],
                          backend=backend)


def _oracle(d, layer, training):
    return reference.bn_relu_conv2d(
        d["x"], d["weight"], bn_weight=d["bn_weight"], bn_bias=d["bn_bias"],
        running_mean=d["running_mean"], running_var=d["running_var"], training=training,
        stride=layer.stride, padding=layer.padding, residual=d["residual"])


def _forward_and_dx(impl, t, layer, training):
    x = t["x"].detach().clone().requires_grad_()
    y = impl(dict(t, x=x, running_mean=t["running_mean"].clone(), running_var=t["running_var"].clone()),
             layer, training)
    gx, = torch.autograd.grad(y, x, t["grad"])
    return y.detach().double(), gx.double()


def parity_errors(layer, dtype, device, backend, training, seed=0):
    """Max relative error of output and input gradient vs a float64 reference run, for the fused op
    and for eager PyTorch at the same dtype (the yardstick the fused error is judged by)."""
    t = make_inputs(layer, dtype, device, seed)
    t64 = {k: (v.double() if v is not None else None) for k, v in t.items()}
    want = _forward_and_dx(_oracle, t64, layer, training)
    got = _forward_and_dx(lambda d, l, tr: fused(d, l, tr, backend), t, layer, training)
    base = _forward_and_dx(eager, t, layer, training)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return {"fused_y": rel(got[0], want[0]), "fused_dx": rel(got[1], want[1]),
            "eager_y": rel(base[0], want[0]), "eager_dx": rel(base[1], want[1])}
