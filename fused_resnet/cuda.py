"""CUDA backend: thin launchers over the compiled extension fused_resnet._C (csrc/).

Same functions and signatures as the Triton launchers (fused_resnet/triton/__init__.py), so the op
layer treats the two backends alike. Outputs are allocated here; the kernels fill them and return
per-tile partial statistics, merged by the torch-only helpers in _partials.py.
"""
from __future__ import annotations

import torch

from ._layout import memory_format_of
from ._partials import merge_partials


def _ext(like):
    """The compiled kernels for like's device: fused_resnet._C for CUDA tensors, the emulated host build
    (fused_resnet/_emulated.py, FUSED_RESNET_CUDA_EMULATED=1) for CPU tensors."""
    if like.device.type == "cpu":
        from . import _emulated

        return _emulated.load()
    from . import _C  # imported lazily: backends.py reports why when it is missing

    return _C


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_stats(x):
    """(mean, biased var) per channel of x [N, C, H, W], in float32 (float64 for float64 input)."""
    ext = _ext(x)
    acc = _acc(x.dtype)
    pivot = x[0, :, 0, 0].to(acc).contiguous()  # one sample per channel: the shift for the sums
    part = ext.batch_stats(x, pivot)
    n, _, h, w = x.shape
    mean, var = merge_partials(part, n * h * w, ext.STATS_ROWS, pivot)
    return mean.to(acc), var.to(acc)


def _shift(mean, scale, beta):
    # The CUDA kernels take bn(x) = x*scale + shift, formed without fma contraction (dtype.cuh: bn_affine).
    return (beta - mean * scale).contiguous()


def conv_forward(x, weight, bias, mean, scale, beta, residual, y, stride, padding, dilation, out_stats=False):
    """y <- conv2d(relu((x - mean)*scale + beta), weight) + bias + residual, into the preallocated y.

    Returns per-channel (mean, biased var) of y when out_stats, else None.
    """
    ext = _ext(x)
    shift = _shift(mean, scale, beta)
    part = ext.conv_forward(x, weight, bias, scale, shift, residual, y, list(stride), list(padding),
                            list(dilation), out_stats)
    if not out_stats:
        return None
    mean, var = merge_partials(part, y.shape[0] * y.shape[2] * y.shape[3], ext.TILE_M)
    acc = _acc(x.dtype)
    return mean.to(acc), var.to(acc)


def conv_dgrad_bn(grad_y, x, weight, mean, scale, beta, invstd, gamma, batch_stats, need_sums,
                  stride, padding, dilation, sync=None):
    """Returns (dx, S1, S2); S1/S2 (= dbeta, dgamma) are None unless need_sums or batch_stats.
    sync(s1, s2, count) -> (s1, s2, count) makes the dx finish use process-group-wide sums (the
    returned S1/S2 stay local, as nn.SyncBatchNorm's weight/bias gradients do)."""
    ext = _ext(x)
    acc = _acc(x.dtype)
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    out = torch.empty_like(x, dtype=acc, memory_format=memory_format_of(x)) if batch_stats else dx
    mean, invstd = mean.contiguous(), invstd.contiguous()
    shift = _shift(mean, scale, beta)
    part = ext.conv_dgrad(grad_y, weight, x, scale, shift, mean, invstd, out, batch_stats, need_sums,
                          list(stride), list(padding), list(dilation))
    if not (need_sums or batch_stats):
        return dx, None, None
    s1, s2 = part[0].sum(0), part[1].sum(0)  # separate tensors: op outputs may not alias
    if batch_stats:
        g = gamma.to(acc).contiguous() if gamma is not None else None
        n, _, h, w = x.shape
        fs1, fs2, count = sync(s1, s2, n * h * w) if sync is not None else (s1, s2, n * h * w)
        ext.bn_backward_finish(out, x, dx, mean, invstd, g, fs1.contiguous(), fs2.contiguous(), int(count))
    return dx, s1, s2


# The emulated build's stand-in SM count: small, so that split-K takes several chunks at test sizes.
EMULATED_SMS = 4


def _num_sms(device):
    if device.type == "cpu":
        return EMULATED_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def conv_wgrad(grad_y, x, weight_shape, mean, scale, beta, stride, padding, dilation):
    """dW in the accumulation dtype (the op layer casts it to the weight's dtype)."""
    ext = _ext(x)
    n, c, _, _ = x.shape
    k, _, kh, kw = weight_shape
    pixels = n * grad_y.shape[2] * grad_y.shape[3]
    tile = ext.TILE_K
    blocks = -(-k // ext.TILE_M) * -(-c // ext.TILE_N) * kh * kw
    p_tiles = max(1, -(-pixels // tile))
    # Enough splits to give every SM two blocks, within the grid's z limit.
    split = max(1, min(p_tiles, -(-2 * _num_sms(x.device) // blocks), 65535 // (kh * kw)))
    chunk = -(-p_tiles // split) * tile
    split = max(1, -(-pixels // chunk))
    shift = _shift(mean, scale, beta)
    part = ext.conv_wgrad(grad_y, x, k, kh, kw, scale, shift, list(stride), list(padding), list(dilation),
                          chunk, split)
    return part.sum(0) if split > 1 else part[0]
