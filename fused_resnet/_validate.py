"""Argument checks for bn_relu_conv2d: everything is checked before any kernel runs or buffer changes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import CHOICES
from . import _plan

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple
    padding: tuple  # top, left (bottom/right follow from out_size)
    dilation: tuple
    out_size: tuple
    groups: int


def _pair(name, v, minimum):
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if any(i < minimum for i in v):
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(v)}")
    return tuple(v)


def _check_tensor(name, t, *, dim=None, numel=None, dtype=None, device=None, floats=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floats and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if numel is not None and (t.dim() != 1 or t.numel() != numel):
        raise ValueError(f"{name} must have shape ({numel},) to match the {numel} input channels, "
                         f"got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must share a device")
    if dtype is not None and t.dtype not in dtype:
        want = " or ".join(str(d) for d in dtype)
        raise TypeError(f"{name} has dtype {t.dtype}, expected {want} (x is {dtype[0]})")


def output_size(in_hw, kernel, stride, padding, dilation):
    """(OH, OW) of a convolution; padding is a (top, left) pair or 'same' (output = input size)."""
    if padding == "same":
        return tuple(in_hw)
    return tuple((size + 2 * p - d * (kk - 1) - 1) // s + 1
                 for size, p, d, kk, s in zip(in_hw, padding, dilation, kernel, stride))


def validate_bn(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, who=""):
    """The batch norm's arguments for a checked 4-D x (every fused op that starts with a BN); `who` prefixes
    the names in the messages (a second BN of one op)."""
    dev, dt, c = x.device, x.dtype, x.shape[1]
    # BN tensors may be float32 for a half/bfloat16 x, as nn.BatchNorm2d under autocast keeps them.
    bn_dtypes = (dt, torch.float32) if dt in (torch.float16, torch.bfloat16) else (dt,)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _check_tensor(who + name, t, numel=c, device=dev, dtype=bn_dtypes)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        # Eager's rule and error type (native_batch_norm "is not differentiable with respect to argument
        # 'running_mean'"): running statistics are buffers; under no_grad eager accepts them, and so do we.
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{who}{name} requires grad, but running statistics are not differentiable (eager "
                               f"batch_norm refuses this too): pass a buffer, or {name}.detach()")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{who}running_mean and {who}running_var must be given together (or both None)")
    if not isinstance(training, bool):
        raise TypeError(f"{who}training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError(f"{who}training=False (eval mode) needs running_mean and running_var; "
                         "pass them, or use training=True for batch statistics")
    if training and x.numel() // c == 1:  # eager's rule: n = 0 is an empty batch, not one value
        raise ValueError(f"{who}training mode needs more than 1 value per channel for batch statistics, "
                         f"got x of shape {tuple(x.shape)}")
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"{who}momentum must be a float, got {momentum!r}")
    # eps = 0 is legal (eager accepts it: a constant channel then gives inf/NaN, as there); a negative
    # or non-finite eps is refused rather than silently producing NaN.
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"{who}eps must be a finite float >= 0, got {eps!r}")
    if training and eps == 0:  # eager's rule, with its words: batch statistics of a constant channel need eps
        raise ValueError(f"{who}batch_norm eps must be positive during training, but got {eps!r}")


def validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
             stride, padding, dilation, groups, residual, backend) -> ConvGeometry:
    # Memoized per tensor metadata and static arguments (_plan.py): a miss runs everything below, so a bad
    # call raises on every call; traced calls always run everything.
    key = _plan.validate_key(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                             eps, stride, padding, dilation, groups, residual, backend)
    if key is not None:
        hit, key = _plan.lookup(_plan.VALIDATED, key)
        if hit is not None:
            _plan.hits += 1
            return hit
    if key is not None:
        _plan.in_miss = True
        try:
            geo = validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                           stride, padding, dilation, groups, residual, backend)
        finally:
            _plan.in_miss = False
        return _plan.remember(_plan.VALIDATED, key, geo)
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(CHOICES)}")
    _check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    dev, dt = x.device, x.dtype
    _check_tensor("weight", weight, dim=4, device=dev, dtype=(dt,))
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    n, c, h, w = x.shape
    k, cg, kh, kw = weight.shape
    if c % groups or k % groups:
        raise ValueError(f"in_channels ({c}) and out_channels ({k}) must be divisible by groups ({groups})")
    if cg * groups != c:
        raise ValueError(f"x has {c} channels but weight expects {cg * groups} "
                         f"(weight shape {tuple(weight.shape)}, groups={groups})")
    # An empty batch (n = 0) is legal, as in eager: the result is empty (functional.py runs it eagerly).
    if min(c, h, w, k, kh, kw) == 0:
        raise ValueError(f"empty tensors are not supported: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, device=dev, dtype=(dt,))
        if bias.dim() != 1 or bias.numel() != k:
            raise ValueError(f"bias must have shape ({k},) to match the {k} output channels, got {tuple(bias.shape)}")
    validate_bn(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)

    st = _pair("stride", stride, 1)
    dil = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":
            if st != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={st}")
            # PyTorch puts the odd extra pixel on the bottom/right; out_size below keeps that.
            pad = (dil[0] * (kh - 1) // 2, dil[1] * (kw - 1) // 2)
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        pad = _pair("padding", padding, 0)
    out = output_size((h, w), (kh, kw), st, "same" if padding == "same" else pad, dil)
    if min(out) < 1:
        raise ValueError(f"output would be empty: input {h}x{w}, kernel {kh}x{kw}, stride {st}, padding {pad}, "
                         f"dilation {dil} give {out[0]}x{out[1]}")
    if residual is not None:
        _check_tensor("residual", residual, device=dev, dtype=(dt,))
        if tuple(residual.shape) != (n, k, *out):
            raise ValueError(f"residual must have the output's shape {(n, k, *out)}, got {tuple(residual.shape)}")
    return ConvGeometry(st, pad, dil, out, groups)


def validate_bn_add(x, shortcut, backend):
    """x and the shortcut of act(bn(x) + shortcut): 4-D, the same shape, dtype and device (eager's add would
    broadcast or promote; the fused op takes what a ResNet block has). The BNs are checked by validate_bn."""
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(CHOICES)}")
    _check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if min(x.shape[1:]) == 0:
        raise ValueError(f"empty tensors are not supported: x {tuple(x.shape)}")
    _check_tensor("shortcut", shortcut, device=x.device, dtype=(x.dtype,))
    if shortcut.shape != x.shape:
        raise ValueError(f"shortcut must have x's shape {tuple(x.shape)}, got {tuple(shortcut.shape)}")
