"""Backward w.r.t. the weight: dW = Σ_pixels g ⊗ a, with a = relu(x*scale+shift) rebuilt in the prologue.

GEMM view per filter tap (r, s): rows = output channels, columns = input channels, reduction = output
pixels (N*OH*OW). The reduction is long and the output small (Cout x Cin), so the pixel range is split
across programs (split-K) to fill the GPU; each split writes its own float32 slab and the slabs are
summed once, which keeps the result deterministic (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, dot_mode, fp32_precision, gemm_tiles, interpreting, mma, num_sms, tl_dtype


@triton.jit
def _conv_wgrad_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, part_ptr,
    N, C, H, W, K, OH, OW, CHUNK, SPLIT,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_z = tl.program_id(2)
    rs = pid_z // SPLIT
    sp = pid_z % SPLIT
    r = rs // KW
    s = rs % KW
    P = N * OH * OW
    offs_k = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_c = offs_c < C
    sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)

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
        gt = tl.load(g_ptr + offs_k[:, None] * sgc + (nb * sgn + oh * sgh + ow * sgw)[None, :],
                     mask=mask_k[:, None] & mask_p[None, :], other=0.0)
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        amask = valid[:, None] & mask_c[None, :]
        xt = tl.load(x_ptr + (nb * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                     mask=amask, other=0.0)
        a = tl.maximum(xt.to(ACC) * sc[None, :] + sh[None, :], 0.0)
        a = tl.where(amask, a, 0.0)
        acc = mma(acc, gt, a, IN_DTYPE, DOT_MODE, PRECISION)

    # part layout: [SPLIT, K, C, KH, KW], contiguous
    kk = KH * KW
    off = ((sp * K + offs_k[:, None]) * C + offs_c[None, :]) * kk + rs
    tl.store(part_ptr + off, acc, mask=mask_k[:, None] & mask_c[None, :])


def conv_wgrad(grad_y, x, weight_shape, scale, shift, stride, padding, dilation):
    n, c, h, w = x.shape
    k, _, kh, kw = weight_shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    p = n * oh * ow
    acc = acc_dtype(x.dtype)
    cfg = gemm_tiles(k, c, p, x.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    base = triton.cdiv(k, bm) * triton.cdiv(c, bn) * kh * kw
    p_blocks = triton.cdiv(p, bk)
    if interpreting():
        split = min(2, p_blocks)  # exercise the split path in CPU tests without multiplying programs
    else:
        split = max(1, min(p_blocks, triton.cdiv(2 * num_sms(x.device), base)))
    chunk = triton.cdiv(p_blocks, split) * bk
    split = triton.cdiv(p, chunk)
    part = torch.empty((split, k, c, kh, kw), dtype=acc, device=x.device)
    grid = (triton.cdiv(k, bm), triton.cdiv(c, bn), kh * kw * split)
    _conv_wgrad_kernel[grid](
        grad_y, x, scale, shift, part,
        n, c, h, w, k, oh, ow, chunk, split,
        *grad_y.stride(), *x.stride(),
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc), DOT_MODE=dot_mode(x.dtype),
        PRECISION=fp32_precision(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part.sum(0) if split > 1 else part[0]
