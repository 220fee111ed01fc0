"""Backward w.r.t. the weight: dW = sum over pixels of a x g, with a = relu(bn(x)) rebuilt in registers.

GEMM view per filter tap (r, s): rows = input channels, columns = output channels, reduction = output
pixels (N*OH*OW); dW^T = a^T @ g, so the rebuilt activation is the register operand of the MMA
(wgmma takes its A operand from registers) and g goes through shared memory untouched: no
register-to-shared store of a waits on the previous MMA. The reduction is long and the output small
(C x K per tap), so the pixel range is split across programs (split-K, sized to give every SM two
programs); each split writes its own float32 slab (laid out like dW) and finalize.column_sums adds
them into dW in one launch, in a fixed order: deterministic, no atomics. With one split the kernel
writes dW itself, in the weight's dtype and layout. Programs are ordered split-major: the ones running together work
on the same pixel chunk for every tap and channel block, so g and x come from L2 after the first read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._common import (acc_dtype, cdiv, conv_config, dot_mode, fp32_precision, interpreting, launch_plan, mma, num_sms,
                      plan_env, plan_launch, tl_dtype)
from ._launch import direct_launch


@direct_launch
@triton.jit
def _conv_wgrad_kernel(
    g_ptr, x_ptr, mean_ptr, scale_ptr, beta_ptr, part_ptr,
    N, C, H, W, K, OH, OW, CHUNK, SPLIT,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    sdk, sdc, sdr, sds,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RELU: tl.constexpr,
):
    tiles_c = tl.cdiv(C, BLOCK_M)
    tiles = tiles_c * tl.cdiv(K, BLOCK_N)
    kk = KH * KW
    pid = tl.program_id(0)
    sp = pid // (kk * tiles)
    rs = (pid // tiles) % kk
    tile = pid % tiles
    pid_c = tile % tiles_c
    pid_k = tile // tiles_c
    r = rs // KW
    s = rs - r * KW
    P = N * OH * OW
    offs_c = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    mask_k = offs_k < K
    mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    be = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
    tap_off = r * dil_h * sxh + s * dil_w * sxw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    p_start = sp * CHUNK
    p_end = tl.minimum(p_start + CHUNK, P)
    for p0 in range(p_start, p_end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        mask_p = offs_p < p_end
        ow = offs_p % OW
        t = offs_p // OW
        oh = t % OH
        nb = (t // OH).to(tl.int64)
        gt = tl.load(g_ptr + (nb * sgn + oh * sgh + ow * sgw)[:, None] + offs_k[None, :] * sgc,
                     mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        amask = mask_c[:, None] & valid[None, :]
        xt = tl.load(x_ptr + offs_c[:, None] * sxc + (nb * sxn + (oh * stride_h - pad_h) * sxh
                                                       + (ow * stride_w - pad_w) * sxw + tap_off)[None, :],
                     mask=amask, other=0.0)
        pre = (xt.to(ACC) - mu[:, None]) * sc[:, None] + be[:, None]
        if RELU:
            pre = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
        a = tl.where(amask, pre, 0.0)
        acc = mma(acc, a, gt, IN_DTYPE, DOT_MODE, PRECISION)

    # part: SPLIT slabs, each laid out like dW (strides sd*); with one split, dW itself. acc is [c, k].
    off = (sp * K * C * kk + offs_k[None, :].to(tl.int64) * sdk + offs_c[:, None] * sdc + r * sdr + s * sds)
    tl.store(part_ptr + off, acc.to(part_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_k[None, :])


_PLANS: dict = {}  # conv_wgrad_partial's launch plans (_common.launch_plan)


def _wgrad_plan(grad_y, x, dw, stride, padding, dilation, relu):
    n, c, h, w = x.shape
    k, _, kh, kw = dw.shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    p = n * oh * ow
    acc = acc_dtype(x.dtype)
    cfg = conv_config("wgrad", c, k, p, kh * kw, x)
    bk = cfg["BLOCK_K"]
    base = cdiv(c, cfg["BLOCK_M"]) * cdiv(k, cfg["BLOCK_N"]) * kh * kw
    p_blocks = cdiv(p, bk)
    if interpreting():
        split = min(2, p_blocks)  # exercise the split path in CPU tests without multiplying programs
    else:
        split = max(1, min(p_blocks, cdiv(2 * num_sms(x.device), base)))
    chunk = cdiv(p_blocks, split) * bk
    split = cdiv(p, chunk)
    ints = (n, c, h, w, k, oh, ow, chunk, split, *grad_y.stride(), *x.stride(), *dw.stride(),
            kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    kw_args = dict(IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc), DOT_MODE=dot_mode(x.dtype),
                   PRECISION=fp32_precision(), RELU=bool(relu), **cfg)
    return (configs._table(), plan_launch(_conv_wgrad_kernel, (base * split,), kw_args, ints),
            ((split, dw.numel()) if split > 1 else None), acc)


def conv_wgrad_partial(grad_y, x, dw, mean, scale, beta, stride, padding, dilation, relu=True):
    """Fills dw (its dtype and layout) directly when one split suffices and returns None; else
    returns the float32 slabs [split, dw.numel()] (each in dw's storage order) to be summed into dw."""
    return wgrad_launch(wgrad_plan(grad_y, x, dw, stride, padding, dilation, relu), grad_y, x, dw, mean, scale, beta)


def wgrad_plan(grad_y, x, dw, stride, padding, dilation, relu):
    """conv_wgrad_partial's launch plan for these tensors' metadata; its [2] is the slabs' shape (None: one split)."""
    key = (grad_y.shape, grad_y.stride(), x.shape, x.stride(), x.dtype, x.device, dw.shape, dw.stride(), *stride,
           *padding, *dilation, relu, *plan_env())
    return launch_plan(_PLANS, key, _wgrad_plan, grad_y, x, dw, stride, padding, dilation, relu)


def wgrad_launch(plan, grad_y, x, dw, mean, scale, beta):
    _, launch, part_shape, acc = plan
    part = torch.empty(*part_shape, dtype=acc, device=x.device) if part_shape is not None else dw
    launch(grad_y, x, mean, scale, beta, part)
    return part if part_shape is not None else None
