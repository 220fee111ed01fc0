"""Per-channel batch statistics of an NCHW-shaped tensor (any strides), numerically stable.

Each program reduces a tile of pixels x channels to (mean, M2) per channel with a two-pass over the
tile held in registers, after shifting every value by a per-channel pivot (the channel's first
element, so shifted values are of the order of the std). Tiles are merged with Chan's parallel formula in
finalize.bn_finalize. Neither step forms a
float32 Σx² − (Σx)², so inputs with |mean| >> std (DESIGN.md: mean 1e3, std 1e-2) keep their variance.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._common import acc_dtype, cdiv, interpreting, launch_plan, next_pow2, plan_launch
from ._launch import direct_launch


@triton.jit
def _tile_mean_m2(v, mask, cnt):
    """Column-wise (mean, M2) of a [rows, cols] tile whose valid rows number cnt; masked entries ignored."""
    v = tl.where(mask, v, 0.0)
    mean = tl.sum(v, axis=0) / cnt
    d = tl.where(mask, v - mean[None, :], 0.0)
    return mean, tl.sum(d * d, axis=0)


@direct_launch
@triton.jit
def _channel_stats_kernel(
    x_ptr, part_ptr,
    N, C, H, W,
    sxn, sxc, sxh, sxw,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    M = N * H * W
    num_m = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    w = offs_m % W
    t = offs_m // W
    h = t % H
    nb = t // H
    row = nb.to(tl.int64) * sxn + h * sxh + w * sxw
    mask = mask_m[:, None] & mask_c[None, :]
    v = tl.load(x_ptr + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    pivot = tl.load(x_ptr + offs_c * sxc, mask=mask_c, other=0.0).to(ACC)  # x[0, c, 0, 0]
    cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
    # Store the tile mean relative to the pivot: adding the pivot back in float32 here would round
    # each tile mean to the ulp of |mean| and swamp the between-tile part of the variance.
    mean, m2 = _tile_mean_m2(v - pivot[None, :], mask, cnt)
    tl.store(part_ptr + pid_m * C + offs_c, mean, mask=mask_c)
    tl.store(part_ptr + (num_m + pid_m) * C + offs_c, m2, mask=mask_c)


_PLANS: dict = {}  # stats_partials' launch plans (_common.launch_plan)


def _stats_plan(x):
    n, c, h, w = x.shape
    m = n * h * w
    block_c = 16 if interpreting() else min(64, next_pow2(c))
    block_m = 64 if interpreting() else max(32, min(256, 8192 // block_c))
    tiles = cdiv(m, block_m)
    acc = acc_dtype(x.dtype)
    # Strided channels (NCHW) make every element its own load with its own address: twice the threads
    # per tile keeps that within the register file (sm_80 spilled at 4 warps).
    kw_args = dict(ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_M=block_m, BLOCK_C=block_c,
                   num_warps=4 if x.stride(1) == 1 else 8)
    return (configs._table(), plan_launch(_channel_stats_kernel, (tiles, cdiv(c, block_c)), kw_args,
                                          (n, c, h, w, *x.stride())), (2, tiles, c), acc, block_m, m)


def stats_partials(x: torch.Tensor):
    """Per-tile (mean - pivot, M2) of x per channel: ([2, tiles, C], rows per tile, total rows), for
    finalize.bn_finalize (the pivot is x[0, c, 0, 0], read by both kernels from x itself)."""
    _, launch, part_shape, acc, block_m, m = launch_plan(
        _PLANS, (x.shape, x.stride(), x.dtype), _stats_plan, x)
    part = torch.empty(*part_shape, dtype=acc, device=x.device)
    launch(x, part)
    return part, block_m, m


def channel_stats(x: torch.Tensor):
    """(mean, biased var) per channel of x [N, C, H, W], in float32 (float64 for float64 input):
    two launches, the tile partials and their merge."""
    from .finalize import moments

    return moments(stats_partials(x), acc_dtype(x.dtype), x)
