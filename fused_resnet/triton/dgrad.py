"""Backward w.r.t. the input: conv dgrad with the ReLU mask and the BN-backward reductions in its epilogue.

GEMM view: rows = input pixels, columns = input channels, reduction = (filter tap, output channel) in
ONE flattened loop, so the pipeline prefetches across taps (see forward.py).

Split by stride phase: input pixel h receives from tap r only when (h + pad - r*dil) is a multiple of
the stride. Pixels of one phase (h = ph + stride*i) share the same set of contributing taps, so each
program takes pixels of one phase and loops over that phase's taps only: at stride 2 no MMA multiplies
a masked tap (the unsplit loop spent three quarters of its MMAs on zero rows). Within a phase, tap r
reads output row oh = i + (ph + pad - r*dil) / stride: a per-row base plus a scalar, no division.

Epilogue, per element: ga (the conv-transpose result, rounded to the input dtype as eager's conv
output is) is masked by the recomputed ReLU mask -- kept where NOT (pre <= 0), eager's
threshold_backward rule, so NaN passes as it does there -- and the per-channel sums S1 = sum ga*m,
S2 = sum ga*m*xhat are reduced per tile (DESIGN.md). With running statistics dx = ga*m*scale is final
here. With batch statistics dx needs the global S1, S2: the epilogue stores ga*m in the input dtype
(what eager's ReLU backward hands its BN backward) and `bn_backward_finish` turns it into dx.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._layout import memory_format_of
from . import configs
from ._common import (acc_dtype, cdiv, conv_config, dot_mode, fp32_precision, interpreting, launch_plan, mma, next_pow2,
                      plan_env, plan_launch, swizzle, tl_dtype)
from ._launch import direct_launch


@triton.jit
def _first_tap(phase, pad, stride, dil, step, KSIZE):
    """Smallest tap index r < KSIZE with (phase + pad - r*dil) divisible by stride, or KSIZE if none.
    Candidates repeat with period `step` = stride / gcd(stride, dil), so only r < step is searched."""
    first = KSIZE
    for r in range(0, step):
        # + stride*dil keeps the dividend non-negative (r*dil < stride*dil)
        hit = ((phase + pad + stride * dil - r * dil) % stride) == 0
        first = tl.where(hit & (r < first), r, first)
    return first


@direct_launch
@triton.jit
def _conv_dgrad_kernel(
    g_ptr, w_ptr, x_ptr, mean_ptr, scale_ptr, beta_ptr, invstd_ptr, out_ptr, part_ptr, add_ptr,
    N, C, H, W, K, OH, OW,
    sgn, sgc, sgh, sgw,
    swk, swc, swr, sws,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
    BATCH_STATS: tl.constexpr, NEED_SUMS: tl.constexpr, ADDEND: tl.constexpr, RAW: tl.constexpr,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RELU: tl.constexpr,
):
    # Programs: [phase][row tile x column tile]; every phase gets the tiles of the largest one.
    tiles_m = tl.cdiv(N * tl.cdiv(H, stride_h) * tl.cdiv(W, stride_w), BLOCK_M)
    tiles_n = tl.cdiv(C, BLOCK_N)
    pid = tl.program_id(0)
    phase = pid // (tiles_m * tiles_n)
    pid_m, pid_n = swizzle(pid - phase * tiles_m * tiles_n, tiles_m, tiles_n, GROUP_M)
    ph = phase // stride_w
    pw = phase - ph * stride_w
    hp = tl.cdiv(H - ph, stride_h)  # this phase's rows and columns (0 when the image is smaller)
    wp = tl.cdiv(W - pw, stride_w)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N * hp * wp
    mask_c = offs_c < C
    j = offs_m % tl.maximum(wp, 1)
    t = offs_m // tl.maximum(wp, 1)
    i = t % tl.maximum(hp, 1)
    nb = t // tl.maximum(hp, 1)
    g_row = nb.to(tl.int64) * sgn + i * sgh + j * sgw
    w_col = offs_c * swc

    r0 = _first_tap(ph, pad_h, stride_h, dil_h, step_h, KH)
    s0 = _first_tap(pw, pad_w, stride_w, dil_w, step_w, KW)
    taps_w = tl.cdiv(KW - s0, step_w)
    k_blocks = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for it in range(0, tl.cdiv(KH - r0, step_h) * taps_w * k_blocks):
        tap = it // k_blocks
        k0 = (it - tap * k_blocks) * BLOCK_K
        rj = tap // taps_w
        r = r0 + rj * step_h
        s = s0 + (tap - rj * taps_w) * step_w
        dh = (ph + pad_h - r * dil_h) // stride_h  # exact by construction
        dw = (pw + pad_w - s * dil_w) // stride_w
        valid = mask_m & (i + dh >= 0) & (i + dh < OH) & (j + dw >= 0) & (j + dw < OW)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        gt = tl.load(g_ptr + (g_row + (dh * sgh + dw * sgw))[:, None] + offs_k[None, :] * sgc,
                     mask=valid[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + w_col[None, :] + (offs_k.to(tl.int64) * swk + r * swr + s * sws)[:, None],
                     mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        acc = mma(acc, gt, wt, IN_DTYPE, DOT_MODE, PRECISION)

    h = ph + stride_h * i
    w = pw + stride_w * j
    emask = mask_m[:, None] & mask_c[None, :]
    o_off = (nb.to(tl.int64) * son + h * soh + w * sow)[:, None] + offs_c[None, :] * soc
    ga = acc.to(IN_DTYPE).to(ACC)
    if ADDEND:  # another consumer's share (out's strides), summed as eager's autograd does: both rounded
        ga = (ga + tl.load(add_ptr + o_off, mask=emask, other=0.0).to(ACC)).to(IN_DTYPE).to(ACC)
    if RAW:
        tl.store(out_ptr + o_off, ga.to(out_ptr.dtype.element_ty), mask=emask)
        return
    xt = tl.load(x_ptr + (nb.to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc,
                 mask=emask, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    be = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
    pre = (xt - mu[None, :]) * sc[None, :] + be[None, :]
    if RELU:
        gm = tl.where(emask & ~(pre <= 0), ga, 0.0)
    else:  # activation="identity": no mask
        gm = tl.where(emask, ga, 0.0)
    if NEED_SUMS:
        istd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        xhat = (xt - mu[None, :]) * istd[None, :]
        row = phase * tiles_m + pid_m  # part: [rows, 2, C], column_sums' input
        tl.store(part_ptr + row * 2 * C + offs_c, tl.sum(gm, axis=0), mask=mask_c)
        tl.store(part_ptr + row * 2 * C + C + offs_c, tl.sum(gm * xhat, axis=0), mask=mask_c)
    if BATCH_STATS:
        tl.store(out_ptr + o_off, gm.to(out_ptr.dtype.element_ty), mask=emask)
    else:
        tl.store(out_ptr + o_off, (gm * sc[None, :]).to(out_ptr.dtype.element_ty), mask=emask)


@direct_launch
@triton.jit
def _bn_backward_finish_kernel(
    gm_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, gamma_ptr, s1_ptr, s2_ptr, inv_count,
    N, C, H, W,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    HAS_GAMMA: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = invstd·gamma·(gm − S1/M − x̂·S2/M), elementwise over [pixels, channels] tiles."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < N * H * W)[:, None] & mask_c[None, :]
    w = offs_m % W
    t = offs_m // W
    h = t % H
    nb = (t // H).to(tl.int64)
    gm = tl.load(gm_ptr + (nb * sgn + h * sgh + w * sgw)[:, None] + offs_c[None, :] * sgc, mask=mask,
                 other=0.0).to(ACC)
    xt = tl.load(x_ptr + (nb * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc,
                 mask=mask, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    istd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    s1 = tl.load(s1_ptr + offs_c, mask=mask_c, other=0.0)
    s2 = tl.load(s2_ptr + offs_c, mask=mask_c, other=0.0)
    k = istd
    if HAS_GAMMA:
        k = k * tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    xhat = (xt - mu[None, :]) * istd[None, :]
    dx = k[None, :] * (gm - (s1 * inv_count)[None, :] - xhat * (s2 * inv_count)[None, :])
    tl.store(dx_ptr + (nb * sdn + h * sdh + w * sdw)[:, None] + offs_c[None, :] * sdc,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


_PLANS: dict = {}  # conv_dgrad's launch plans (_common.launch_plan)


def _dgrad_plan(grad_y, x, weight, out, stride, padding, dilation, batch_stats, need_sums, has_addend, raw, relu):
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    phases = stride[0] * stride[1]
    m_phase = n * cdiv(h, stride[0]) * cdiv(w, stride[1])
    cfg = conv_config("dgrad", m_phase, c, k, cdiv(kh, stride[0]) * cdiv(kw, stride[1]), x)
    tiles_m = cdiv(m_phase, cfg["BLOCK_M"])
    ints = (n, c, h, w, k, oh, ow, *grad_y.stride(), *weight.stride(), *x.stride(), *out.stride(),
            kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            stride[0] // math.gcd(stride[0], dilation[0]), stride[1] // math.gcd(stride[1], dilation[1]))
    kw_args = dict(BATCH_STATS=batch_stats, NEED_SUMS=need_sums, ADDEND=has_addend, RAW=raw,
                   IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc_dtype(x.dtype)), DOT_MODE=dot_mode(x.dtype),
                   PRECISION=fp32_precision(), RELU=bool(relu), **cfg)
    part_shape = (phases * tiles_m, 2, c) if need_sums else None
    return (configs._table(), plan_launch(_conv_dgrad_kernel, (phases * tiles_m * cdiv(c, cfg["BLOCK_N"]),), kw_args,
                                          ints), part_shape)


def conv_dgrad(grad_y, x, weight, mean, scale, beta, invstd, batch_stats, need_sums, stride, padding,
               dilation, addend=None, raw=False, relu=True):
    """(out, part): out is dx (running statistics) or ga*m in x's dtype for bn_backward_finish (batch
    statistics); part [rows, 2, C] the per-tile BN-backward partials (S1, S2) when need_sums, else None.
    addend: the other consumers' ga (x's dtype, x's layout), added to this conv's ga first; it is also
    where out goes (each element read, then written, by one program). raw: out is that ga itself, no
    mask and no sums (a first consumer's share, the next call's addend)."""
    if raw and (batch_stats or need_sums):
        raise ValueError("raw dgrad has no BN backward: batch_stats and need_sums must be False")
    need_sums = need_sums or batch_stats
    # dx, or ga*m in the input dtype: eager's ReLU backward output, half the bytes of a float32 buffer
    out = addend if addend is not None else torch.empty_like(x, memory_format=memory_format_of(x))
    plan = dgrad_plan(grad_y, x, weight, out, stride, padding, dilation, batch_stats, need_sums, addend is not None,
                      raw, relu)
    return out, dgrad_launch(plan, grad_y, x, weight, mean, scale, beta, invstd, out)


def dgrad_plan(grad_y, x, weight, out, stride, padding, dilation, batch_stats, need_sums, has_addend, raw, relu):
    """conv_dgrad's launch plan for these tensors' metadata (need_sums already includes batch_stats)."""
    key = (grad_y.shape, grad_y.stride(), x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(),
           out.stride(), *stride, *padding, *dilation, batch_stats, need_sums, has_addend, raw, relu, *plan_env())
    return launch_plan(_PLANS, key, _dgrad_plan, grad_y, x, weight, out, stride, padding, dilation, batch_stats,
                       need_sums, has_addend, raw, relu)


def dgrad_launch(plan, grad_y, x, weight, mean, scale, beta, invstd, out):
    """The dgrad launch of a plan (out: dx, gm, or the addend it accumulates into); returns the partials or None."""
    _, launch, part_shape = plan
    part = torch.empty(*part_shape, dtype=acc_dtype(x.dtype), device=x.device) if part_shape is not None else None
    launch(grad_y, weight, x, mean, scale, beta, invstd, out, part if part is not None else out, out)
    return part


_FINISH_PLANS: dict = {}  # bn_backward_finish's launch plans


def _finish_plan(gm, x, dx, has_gamma):
    n, c, h, w = x.shape
    block_c = 16 if interpreting() else min(64, next_pow2(c))
    block_m = 64 if interpreting() else max(32, 4096 // block_c)
    kw_args = dict(HAS_GAMMA=has_gamma, ACC=tl_dtype(acc_dtype(x.dtype)), BLOCK_M=block_m, BLOCK_C=block_c,
                   num_warps=4)
    return (configs._table(), plan_launch(_bn_backward_finish_kernel, (cdiv(n * h * w, block_m), cdiv(c, block_c)),
                                          kw_args, (n, c, h, w, *gm.stride(), *x.stride(), *dx.stride())))


def bn_backward_finish(gm, x, mean, invstd, gamma, s1, s2, count):
    """dx = invstd*gamma*(gm - S1/M - xhat*S2/M), one elementwise launch."""
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    finish_launch(finish_plan(gm, x, dx, gamma is not None), gm, x, dx, mean, invstd, gamma, s1, s2, count)
    return dx


def finish_plan(gm, x, dx, has_gamma):
    """bn_backward_finish's launch plan for these tensors' metadata."""
    return launch_plan(_FINISH_PLANS, (x.shape, x.stride(), x.dtype, gm.stride(), dx.stride(), has_gamma),
                       _finish_plan, gm, x, dx, has_gamma)


def finish_launch(plan, gm, x, dx, mean, invstd, gamma, s1, s2, count):
    _, launch = plan
    launch(gm, x, dx, mean, invstd, gamma if gamma is not None else mean, s1, s2, 1.0 / count)
