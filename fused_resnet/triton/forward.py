"""Forward: implicit-GEMM conv with a BN-affine+ReLU prologue and a bias/residual/statistics epilogue.

GEMM view: rows = output pixels (N*OH*OW), columns = output channels, reduction = (filter tap, input
channel). The reduction is ONE flattened loop over (tap, channel block), so Triton's software pipeline
prefetches the next tap's tiles while the current one multiplies (with nested loops it pipelines only
the inner channel loop, and at C <= BLOCK_K every tap waited for its own loads). Each tap's addresses are
a per-row base computed once plus a scalar offset: no division in the loop.

The prologue turns each loaded x tile into a = relu((x - mean_c) * scale_c + beta_c) in registers
(subtracting the mean first, as eager's BN does, so a constant channel gives exactly beta and the ReLU
mask matches eager's; NaN propagates through the ReLU as torch.relu's does), zeroes it where the tap
falls into padding (the conv pads `a`, not `x`), and rounds it to the input dtype as eager's stored
activation would be. It then is the register operand of the MMA (wgmma on sm_90, mma.sync on sm_80);
the weight tile is the shared-memory operand. The activation never reaches memory.

All tensors are addressed through their strides: channels_last is the fast path (16-byte loads along
channels); NCHW and views run correctly at lower speed (README, "Layouts").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._common import (acc_dtype, cdiv, conv_config, dot_mode, fp32_precision, launch_plan, mma, plan_env, plan_launch,
                      swizzle, tl_dtype)
from ._launch import direct_launch
from .finalize import moments
from .stats import _tile_mean_m2


@triton.jit
def bn_act(xt, mu, sc, be, ACC: tl.constexpr, RELU: tl.constexpr):
    """relu((x - mean) * scale + beta) per channel (columns), NaN-propagating like torch.relu; without
    RELU the batch norm alone (activation="identity")."""
    pre = (xt.to(ACC) - mu[None, :]) * sc[None, :] + be[None, :]
    if RELU:
        pre = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return pre


@direct_launch
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, mean_ptr, scale_ptr, beta_ptr, part_ptr,
    N, C, H, W, K, OH, OW,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_STATS: tl.constexpr, RELU: tl.constexpr,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    M = N * OH * OW
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    nb = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = nb.to(tl.int64) * sxn + ih0 * sxh + iw0 * sxw  # tap (0, 0); tap (r, s) adds a scalar
    w_col = offs_n.to(tl.int64) * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    c_blocks = tl.cdiv(C, BLOCK_K)
    for i in range(0, KH * KW * c_blocks):
        rs = i // c_blocks
        c0 = (i - rs * c_blocks) * BLOCK_K
        r = rs // KW
        s = rs - r * KW
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_c = c0 + tl.arange(0, BLOCK_K)
        mask_c = offs_c < C
        amask = valid[:, None] & mask_c[None, :]
        xt = tl.load(x_ptr + (x_row + (r * dil_h * sxh + s * dil_w * sxw))[:, None] + offs_c[None, :] * sxc,
                     mask=amask, other=0.0)
        wt = tl.load(w_ptr + w_col[None, :] + (offs_c * swc + r * swr + s * sws)[:, None],
                     mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        be = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
        a = tl.where(amask, bn_act(xt, mu, sc, be, ACC, RELU), 0.0)
        acc = mma(acc, a, wt, IN_DTYPE, DOT_MODE, PRECISION)

    omask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    if HAS_RES:
        res = tl.load(
            res_ptr + (nb.to(tl.int64) * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src,
            mask=omask, other=0.0,
        )
        acc += res.to(ACC)
    out = acc.to(y_ptr.dtype.element_ty)
    y_off = (nb.to(tl.int64) * syn + oh * syh + ow * syw)[:, None] + offs_n[None, :] * syc
    tl.store(y_ptr + y_off, out, mask=omask)
    if OUT_STATS:
        # Statistics of y as stored (rounded), which is what the next BN would read.
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        mean, m2 = _tile_mean_m2(out.to(ACC), omask, cnt)
        num_m = tl.cdiv(M, BLOCK_M)
        tl.store(part_ptr + pid_m * K + offs_n, mean, mask=mask_n)
        tl.store(part_ptr + (num_m + pid_m) * K + offs_n, m2, mask=mask_n)


_PLANS: dict = {}  # conv_forward's launch plans (_common.launch_plan)


def _forward_plan(x, weight, res, y, stride, padding, dilation, out_stats, relu, has_bias, has_res):
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    m = n * oh * ow
    cfg = conv_config("fwd", m, k, c, kh * kw, x)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles_m = cdiv(m, bm)
    acc = acc_dtype(x.dtype)
    ints = (n, c, h, w, k, oh, ow, *x.stride(), *weight.stride(), *res.stride(), *y.stride(),
            kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    kw_args = dict(HAS_BIAS=has_bias, HAS_RES=has_res, OUT_STATS=bool(out_stats), RELU=bool(relu),
                   IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc), DOT_MODE=dot_mode(x.dtype),
                   PRECISION=fp32_precision(), **cfg)
    return (configs._table(), plan_launch(_conv_fwd_kernel, (tiles_m * cdiv(k, bn),), kw_args, ints),
            ((2, tiles_m, k) if out_stats else None), acc, bm, m)


def conv_forward(x, weight, bias, mean, scale, beta, residual, y, stride, padding, dilation, out_stats=False,
                 relu=True):
    """y <- conv2d(relu((x - mean)*scale + beta), weight) + bias + residual, into the preallocated y
    (without relu: the batch norm alone).

    Returns per-channel (mean, biased var) of y when out_stats (their partials when out_stats ==
    "partials"), else None.
    """
    res = residual if residual is not None else y
    key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), y.shape, y.stride(),
           res.stride(), *stride, *padding, *dilation, out_stats, relu, bias is None, residual is None, *plan_env())
    _, launch, part_shape, acc, bm, m = launch_plan(
        _PLANS, key, _forward_plan, x, weight, res, y, stride, padding, dilation, out_stats, relu, bias is not None,
        residual is not None)
    # without statistics the kernel never touches part: scale (the same dtype) stands in
    part = torch.empty(*part_shape, dtype=acc, device=x.device) if part_shape is not None else scale
    launch(x, weight, bias if bias is not None else scale, res, y, mean, scale, beta, part)
    if not out_stats:
        return None
    if out_stats == "partials":  # merged later, by the finalize of the BN that reads y (_deferred.py)
        return part, bm, m
    return moments((part, bm, m), acc)
