"""Forward: implicit-GEMM conv with a BN-affine+ReLU prologue and a bias/residual/statistics epilogue.

GEMM view: rows = output pixels (N*OH*OW), columns = output channels, reduction = input channels,
looped once per filter tap (r, s). The prologue turns each loaded x tile into
a = max(0, x*scale_c + shift_c) in registers, zeroes it where the tap falls into padding (the conv
pads `a`, not `x`), and rounds it to the input dtype as eager's stored activation would be. The
activation never reaches memory. All tensors are addressed through their strides, so NCHW,
channels_last and non-contiguous views need no copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, dot_mode, fp32_precision, gemm_tiles, mma, tl_dtype
from .stats import _tile_mean_m2, merge_partials


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, scale_ptr, shift_ptr, part_ptr,
    N, C, H, W, K, OH, OW,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OUT_STATS: tl.constexpr,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    nb = t // OH
    x_base = nb.to(tl.int64) * sxn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for rs in range(0, KH * KW):
        r = rs // KW
        s = rs % KW
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = x_base + ih * sxh + iw * sxw
        for c0 in range(0, C, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < C
            amask = valid[:, None] & mask_c[None, :]
            xt = tl.load(x_ptr + x_row[:, None] + offs_c[None, :] * sxc, mask=amask, other=0.0)
            sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
            sh = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
            a = tl.maximum(xt.to(ACC) * sc[None, :] + sh[None, :], 0.0)
            a = tl.where(amask, a, 0.0)
            wt = tl.load(
                w_ptr + offs_n[None, :] * swk + offs_c[:, None] * swc + r * swr + s * sws,
                mask=mask_c[:, None] & mask_n[None, :], other=0.0,
            )
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
        num_m = tl.num_programs(0)
        tl.store(part_ptr + pid_m * K + offs_n, mean, mask=mask_n)
        tl.store(part_ptr + (num_m + pid_m) * K + offs_n, m2, mask=mask_n)


def conv_forward(x, weight, bias, scale, shift, residual, y, stride, padding, dilation, out_stats=False):
    """y <- conv2d(relu(x*scale+shift), weight) + bias + residual, written into the preallocated y.

    Returns per-channel (mean, biased var) of y when out_stats, else None.
    """
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    m = n * oh * ow
    cfg = gemm_tiles(m, k, c, x.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bn))
    acc = acc_dtype(x.dtype)
    part = torch.empty((2, grid[0], k) if out_stats else (1,), dtype=acc, device=x.device)
    res = residual if residual is not None else y
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else scale, res, y, scale, shift, part,
        n, c, h, w, k, oh, ow,
        *x.stride(), *weight.stride(), *res.stride(), *y.stride(),
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, OUT_STATS=out_stats,
        IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc), DOT_MODE=dot_mode(x.dtype),
        PRECISION=fp32_precision(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not out_stats:
        return None
    mean, var = merge_partials(part, m, bm)
    return mean.to(acc), var.to(acc)
