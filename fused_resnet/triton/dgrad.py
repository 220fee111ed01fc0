"""Backward w.r.t. the input: conv dgrad with the ReLU mask and the BN-backward reductions in its epilogue.

GEMM view: rows = input pixels (N*H*W), columns = input channels, reduction = output channels,
looped once per filter tap. For tap (r, s) the input pixel h receives from output row
oh = (h + pad - r*dil) / stride when that divides exactly and lands inside [0, OH).

Epilogue, per element: ga (the conv-transpose result) is masked by the recomputed ReLU mask
m = (x*scale + shift > 0), and the per-channel sums S1 = Σ ga·m, S2 = Σ ga·m·x̂ are reduced per tile
(DESIGN.md). With running statistics, dx = ga·m·scale is final right here. With batch statistics dx
needs the global S1, S2, so the epilogue stores ga·m (accumulation dtype) and `bn_backward_finish`
turns it into dx in place of a second conv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import memory_format_of
from ._common import acc_dtype, dot_mode, fp32_precision, gemm_tiles, interpreting, mma, tl_dtype


@triton.jit
def _conv_dgrad_kernel(
    g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, out_ptr, part_ptr,
    N, C, H, W, K, OH, OW,
    sgn, sgc, sgh, sgw,
    swk, swc, swr, sws,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    BATCH_STATS: tl.constexpr, NEED_SUMS: tl.constexpr,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_c = offs_c < C
    w = offs_m % W
    t = offs_m // W
    h = t % H
    nb = t // H
    g_base = nb.to(tl.int64) * sgn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for rs in range(0, KH * KW):
        r = rs // KW
        s = rs % KW
        th = h + pad_h - r * dil_h
        tw = w + pad_w - s * dil_w
        # Clamp before dividing: negative th is masked anyway, and this keeps the division exact.
        thc = tl.maximum(th, 0)
        twc = tl.maximum(tw, 0)
        oh = thc // stride_h
        ow = twc // stride_w
        valid = (mask_m & (th >= 0) & (tw >= 0) & (oh * stride_h == thc) & (ow * stride_w == twc)
                 & (oh < OH) & (ow < OW))
        g_row = g_base + oh * sgh + ow * sgw
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            gt = tl.load(g_ptr + g_row[:, None] + offs_k[None, :] * sgc,
                         mask=valid[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_k[:, None] * swk + offs_c[None, :] * swc + r * swr + s * sws,
                         mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            acc = mma(acc, gt, wt, IN_DTYPE, DOT_MODE, PRECISION)

    emask = mask_m[:, None] & mask_c[None, :]
    xt = tl.load(x_ptr + (nb.to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc,
                 mask=emask, other=0.0).to(ACC)
    sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    gm = tl.where(emask & (xt * sc[None, :] + sh[None, :] > 0), acc, 0.0)
    if NEED_SUMS:
        mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        istd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        xhat = (xt - mu[None, :]) * istd[None, :]
        num_m = tl.num_programs(0)
        tl.store(part_ptr + pid_m * C + offs_c, tl.sum(gm, axis=0), mask=mask_c)
        tl.store(part_ptr + (num_m + pid_m) * C + offs_c, tl.sum(gm * xhat, axis=0), mask=mask_c)
    o_off = (nb.to(tl.int64) * son + h * soh + w * sow)[:, None] + offs_c[None, :] * soc
    if BATCH_STATS:
        tl.store(out_ptr + o_off, gm, mask=emask)
    else:
        tl.store(out_ptr + o_off, (gm * sc[None, :]).to(out_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _bn_backward_finish_kernel(
    gm_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, gamma_ptr, s1_ptr, s2_ptr,
    N, C, H, W, inv_count,
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
    gm = tl.load(gm_ptr + (nb * sgn + h * sgh + w * sgw)[:, None] + offs_c[None, :] * sgc, mask=mask, other=0.0)
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


def conv_dgrad_bn(grad_y, x, weight, scale, shift, mean, invstd, gamma, batch_stats, need_sums,
                  stride, padding, dilation, sync=None):
    """Returns (dx, S1, S2); S1/S2 (= dbeta, dgamma) are None unless need_sums or batch_stats.
    sync(s1, s2, count) -> (s1, s2, count) makes the dx finish use process-group-wide sums (the
    returned S1/S2 stay local, as nn.SyncBatchNorm's weight/bias gradients do)."""
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    m = n * h * w
    acc = acc_dtype(x.dtype)
    need_sums = need_sums or batch_stats
    cfg = gemm_tiles(m, c, k, x.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(m, bm), triton.cdiv(c, bn))
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    out = torch.empty_like(x, dtype=acc, memory_format=memory_format_of(x)) if batch_stats else dx
    part = torch.empty((2, grid[0], c) if need_sums else (1,), dtype=acc, device=x.device)
    _conv_dgrad_kernel[grid](
        grad_y, weight, x, scale, shift, mean, invstd, out, part,
        n, c, h, w, k, oh, ow,
        *grad_y.stride(), *weight.stride(), *x.stride(), *out.stride(),
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        BATCH_STATS=batch_stats, NEED_SUMS=need_sums,
        IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc), DOT_MODE=dot_mode(x.dtype),
        PRECISION=fp32_precision(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not need_sums:
        return dx, None, None
    s1, s2 = part[0].sum(0), part[1].sum(0)  # separate tensors: op outputs may not alias
    if batch_stats:
        block_c = 16 if interpreting() else min(64, triton.next_power_of_2(c))
        block_m = 64 if interpreting() else max(32, 4096 // block_c)
        fgrid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
        fs1, fs2, count = sync(s1, s2, m) if sync is not None else (s1, s2, m)
        _bn_backward_finish_kernel[fgrid](
            out, x, dx, mean, invstd, gamma if gamma is not None else mean, fs1, fs2,
            n, c, h, w, 1.0 / count,
            *out.stride(), *x.stride(), *dx.stride(),
            HAS_GAMMA=gamma is not None, ACC=tl_dtype(acc), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
        )
    return dx, s1, s2
