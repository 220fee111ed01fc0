"""Shared by the parity tests: random cases, running an implementation, tolerances from the oracle.

Tolerance rule (flash-attention's): the backend's error against a float64 run of the reference must
be within a small multiple of the reference's own error at the test dtype, plus a floor of a few
units in the last place of the dtype (relative to the output's magnitude) for outputs where the
reference happens to be exact.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import fused_resnet
from fused_resnet import reference

# Units in the last place, relative to the largest magnitude of the quantity compared. fp32 outputs
# sum up to C*kh*kw products, so a few hundred ulps of headroom covers differing summation orders.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MULTIPLE = 4.0


@dataclass(frozen=True)
class Case:
    n: int = 2
    c: int = 3
    h: int = 6
    w: int = 5
    k: int = 4
    kernel: tuple = (3, 3)
    stride: object = 1
    padding: object = 1
    dilation: object = 1
    bias: bool = True
    residual: bool = False
    training: bool = True
    channels_last: bool = False
    affine: bool = True
    noncontiguous: bool = False
    mean_shift: float = 0.0
    activation: str = "relu"

    def out_size(self):
        def one(size, k, s, p, d):
            return (size + 2 * p - d * (k - 1) - 1) // s + 1
        if self.padding == "same":
            return self.h, self.w
        s, d = _pair(self.stride), _pair(self.dilation)
        p = (0, 0) if self.padding == "valid" else _pair(self.padding)
        return one(self.h, self.kernel[0], s[0], p[0], d[0]), one(self.w, self.kernel[1], s[1], p[1], d[1])


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def make_inputs(case: Case, seed: int, device):
    """Fresh float64 master tensors for one check (callers cast them)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(device)

    oh, ow = case.out_size()
    t = dict(
        x=rnd(case.n, case.c, case.h, case.w, offset=case.mean_shift) ,
        weight=rnd(case.k, case.c, *case.kernel, scale=(case.c * case.kernel[0] * case.kernel[1]) ** -0.5),
        bias=rnd(case.k, scale=0.5) if case.bias else None,
        bn_weight=(torch.rand(case.c, generator=g, dtype=torch.float64) + 0.5).to(device) if case.affine else None,
        bn_bias=rnd(case.c, scale=0.5) if case.affine else None,
        running_mean=rnd(case.c, scale=0.2, offset=case.mean_shift),
        running_var=(torch.rand(case.c, generator=g, dtype=torch.float64) + 0.5).to(device),
        residual=rnd(case.n, case.k, oh, ow) if case.residual else None,
        grad=rnd(case.n, case.k, oh, ow),
    )
    return t


def cast(t: dict, dtype, case: Case):
    out = {}
    for name, v in t.items():
        if v is None:
            out[name] = None
            continue
        v = v.to(dtype)
        if v.dim() == 4 and case.channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        if name == "x" and case.noncontiguous:
            # A strided view of a bigger tensor: every other column of a wider buffer.
            wide = torch.zeros(*v.shape[:3], v.shape[3] * 2, dtype=dtype, device=v.device)
            wide[..., ::2] = v
            v = wide[..., ::2]
        out[name] = v
    return out


DIFFERENTIABLE = ("x", "weight", "bias", "bn_weight", "bn_bias", "residual")


def run(fn, t: dict, case: Case, **extra):
    """Forward + backward of fn on copies of t; returns outputs, gradients and running buffers."""
    leaves = {k: (t[k].detach().clone().requires_grad_() if t[k] is not None else None)
              for k in DIFFERENTIABLE}
    if case.noncontiguous and leaves["x"] is not None:
        leaves["x"] = t["x"].detach().requires_grad_()  # keep the strided view as it is
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], bn_weight=leaves["bn_weight"],
           bn_bias=leaves["bn_bias"], running_mean=rm, running_var=rv, training=case.training,
           stride=case.stride, padding=case.padding, dilation=case.dilation,
           residual=leaves["residual"], activation=case.activation, **extra)
    wants = [k for k in DIFFERENTIABLE if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in wants], t["grad"])
    res = {"y": y.detach()}
    res.update({"d" + k: g for k, g in zip(wants, grads)})
    if case.training:
        res["running_mean"], res["running_var"] = rm, rv
    return res


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_oracle(case: Case, dtype, backend, device, seed):
    """Run backend and reference at dtype and the reference at float64; assert the tolerance rule."""
    master = make_inputs(case, seed, device)
    low = cast(master, dtype, case)
    exact = cast({k: (v.to(dtype).double() if v is not None else None) for k, v in master.items()},
                 torch.float64, replace(case, noncontiguous=False))
    got = run(fused_resnet.bn_relu_conv2d, low, case, backend=backend)
    ref = run(reference.bn_relu_conv2d, low, case)
    oracle = run(reference.bn_relu_conv2d, exact, case)
    assert got.keys() == oracle.keys()
    if dtype != torch.float64:
        assert got["y"].dtype == dtype
    x = low["x"]
    if not (x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
        # The output keeps x's layout, as F.conv2d's does (x with C=1 or 1x1 pixels is both: no rule).
        want_cl = case.channels_last and not case.noncontiguous
        assert got["y"].is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    for name, want in oracle.items():
        scale = want.double().abs().max().item() + 1e-30
        e_got = max_err(got[name], want)
        e_ref = max_err(ref[name], want)
        tol = MULTIPLE * e_ref + FLOOR[dtype] * scale
        assert e_got <= tol, (f"{name}: backend {backend} error {e_got:.3e} > tol {tol:.3e} "
                              f"(reference error {e_ref:.3e}, |max| {scale:.3e}) for {case}, {dtype}")
