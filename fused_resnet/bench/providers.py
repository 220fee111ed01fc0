"""Providers: the same case run unfused (eager NCHW / channels_last, torch.compile default and
max-autotune) and fused (triton, cuda), built from the same seeded weights.

Layers and blocks run in the benchmark dtype with BatchNorm parameters and statistics in float32
(how half-precision ResNets are trained); models run under torch.autocast (AMP) with float32
parameters, for every provider alike.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..nn import FusedBNReLUConv2d, PreActBlock, PreActBottleneck
from ..nn_postact import PostActBlock, PostActBottleneck
from .cases import Case

PROVIDERS = ("eager", "eager_cl", "compile", "compile_max", "triton", "cuda")
FUSED = ("triton", "cuda")
LAYOUT = {"eager": "nchw"}  # every other provider runs channels_last
L2_BYTES = 50 * 2 ** 20  # H100 L2


class UnfusedLayer(nn.Module):
    """BN -> ReLU -> Conv (+ residual) as eager PyTorch runs it: four kernels, `a` kept for backward."""

    def __init__(self, bn, conv):
        super().__init__()
        self.bn, self.conv = bn, conv

    def forward(self, x, residual=None):
        y = self.conv(F.relu(self.bn(x)))
        return y if residual is None else y + residual


def _build(case: Case, fused: bool, backend: str):
    torch.manual_seed(0)
    if case.kind == "layer":
        bn = nn.BatchNorm2d(case.c)
        conv = nn.Conv2d(case.c, case.k, case.kernel, case.stride, case.padding, bias=False)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
        return FusedBNReLUConv2d.from_modules(bn, conv, backend=backend) if fused else UnfusedLayer(bn, conv)
    if case.kind == "block":
        cls = {"basic": PreActBlock, "bottleneck": PreActBottleneck, "postact_basic": PostActBlock,
               "postact_bottleneck": PostActBottleneck}[case.block]
        return cls(case.c, case.k, case.stride, backend=backend, fused=fused)
    return getattr(models, case.model)(fused=fused, backend=backend)


def _half_with_fp32_bn(module, dtype):
    module.to(dtype)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.float()
    return module


class Runner:
    """One provider on one case: `step(i)` runs a forward (and backward in training) on input set i."""

    def __init__(self, case: Case, provider: str, mode: str, dtype: torch.dtype, device: torch.device):
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
        self.case, self.mode, self.dtype, self.device = case, mode, dtype, device
        self.training = mode == "training"
        self.layout = LAYOUT.get(provider, "channels_last")
        self.fmt = torch.channels_last if self.layout == "channels_last" else torch.contiguous_format
        fused = provider in FUSED
        module = _build(case, fused, provider if fused else "auto").to(device)
        self.amp = case.kind == "model" and dtype != torch.float32
        if not self.amp:
            module = _half_with_fp32_bn(module, dtype) if dtype != torch.float32 else module
        module = module.to(memory_format=self.fmt).train(self.training)
        if provider == "compile":
            module = torch.compile(module)
        elif provider == "compile_max":
            module = torch.compile(module, mode="max-autotune")
        self.module = module
        self.inputs = []
        self.add_inputs(1)

    def _input_dtype(self):
        return torch.float32 if self.amp else self.dtype

    def add_inputs(self, count: int):
        """Fresh random input sets (never zeros), appended to the rotation."""
        c, h = self.case.c, self.case.h
        for _ in range(count):
            t = {"x": torch.randn(self.case.n, c, h, h, device=self.device, dtype=self._input_dtype())
                 .contiguous(memory_format=self.fmt)}
            if self.case.kind == "layer":
                oh = self.case.out_h
                shape = (self.case.n, self.case.k, oh, oh)
                if self.case.residual:
                    t["residual"] = torch.randn(shape, device=self.device, dtype=self.dtype).contiguous(
                        memory_format=self.fmt)
                t["grad"] = torch.randn(shape, device=self.device, dtype=self.dtype).contiguous(memory_format=self.fmt)
            if self.case.kind == "model":
                t["labels"] = torch.randint(0, self.case.k, (self.case.n,), device=self.device)
            self.inputs.append(t)

    def input_bytes(self):
        return sum(v.numel() * v.element_size() for v in self.inputs[0].values())

    def fill_rotation(self):
        """On a GPU, enough input sets (at most 8) that cycling through them covers twice the L2, so a
        timed step never finds its inputs cached by the previous one."""
        if self.device.type == "cuda":
            self.add_inputs(max(1, min(8, math.ceil(2 * L2_BYTES / self.input_bytes()))) - len(self.inputs))

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, i: int):
        t = self.inputs[i]
        if not self.training:
            with torch.no_grad(), self._autocast():
                return self._forward(t)
        x = t["x"].detach().requires_grad_(self.case.kind != "model")
        with self._autocast():
            out = self._forward(dict(t, x=x))
            if self.case.kind == "model":
                loss = F.cross_entropy(out.float(), t["labels"])
        if self.case.kind == "model":
            loss.backward()
        elif self.case.kind == "layer":
            out.backward(t["grad"])
        else:  # a block: a random upstream gradient, made once per input set
            out.backward(t.setdefault("grad", torch.randn_like(out)))
        for p in self.module.parameters():
            p.grad = None
        return out

    def _forward(self, t):
        if self.case.kind == "layer":
            return self.module(t["x"], t.get("residual"))
        return self.module(t["x"])
