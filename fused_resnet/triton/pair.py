"""Two convs of one relu(bn(x)) -- a projection block's conv1 and its shortcut -- as one forward kernel and
one dgrad kernel (issue 30).

Forward (`conv_forward_pair`, one launch for every pair): the GEMM's columns are both convs' output
channels, [0, K1) -> y and [K1, K1 + K2) -> y2, in column tiles that each belong to one conv (a conv's last
tile is masked at its own K, never shared). A tile iterates its own conv's taps with its own stride, padding
and dilation, so a 1x1 shortcut beside a 3x3 conv1 costs its own FLOPs only (its one tap is the 3x3's centre
tap, the x rows conv1's tiles of the same row tile load too). Where the two output grids coincide (a basic
block's 3x3/s + 1x1/s; a bottleneck's stride-1 entry block) the row tiles are shared: program ids are
swizzled GROUP_M row tiles at a time across the column tiles of BOTH convs, so the programs that read one
tile of x run together and x comes from HBM once for the two convs (the L2 serves the other reads, as it does
for a single conv's column tiles). Where they differ (a bottleneck's stride-s shortcut beside its stride-1
conv1) the two convs keep their own launches (forward.py): one launch holding conv1's programs, then the
shortcut's (SEPARATE_RANGES) would read x's bytes as two launches do (the shortcut reads 1/s^2 of x) and
spilled on sm_80 at 128x128 tiles. The statistics epilogue (the next BN's partials) runs in y's tiles only. Each
output element is computed exactly as the single-conv kernel (forward.py) computes it: same tap order,
same BLOCK_K slices, same prologue and rounding.

Dgrad (`conv_dgrad_pair`, pairs with equal strides): the reduction of each input-pixel tile runs over both
convs' (grad, weight) contributions -- conv1's taps of the tile's stride phase, then the shortcut's -- into
ONE float32 accumulator, rounded once to x's dtype, then the ReLU mask and the BN-backward partials as
dgrad.py's epilogue. The two-launch path (a raw dgrad of the shortcut written to memory, read back as
conv1's addend) rounded each conv's ga to x's dtype and their sum again, as eager's autograd does; the one
accumulator rounds once, so its ga is at least as close to the exact sum (the parity tests' float64 rule).
Pairs with different strides (a bottleneck's stride-s shortcut beside a stride-1 conv1: the stride phases
differ) keep the two-launch path (backward.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._layout import memory_format_of
from . import configs
from ._common import (acc_dtype, cdiv, conv_config, dot_mode, fp32_precision, launch_plan, mma, plan_env, plan_launch,
                      swizzle, tl_dtype)
from ._launch import direct_launch
from .dgrad import _first_tap
from .finalize import moments
from .forward import bn_act, conv_forward
from .stats import _tile_mean_m2


# Output grids that differ take the two single-conv launches; True puts them into the pair kernel's second
# program range instead (one launch, same bytes; kept compiled and tested, off for its sm_80 spill).
SEPARATE_RANGES = False


@triton.jit
def _pick(second, a, b):
    """b for the second conv's programs, a for the first's (scalars)."""
    return tl.where(second, b, a)


@direct_launch
@triton.jit
def _conv_fwd_pair_kernel(
    x_ptr, w_ptr, w2_ptr, bias_ptr, bias2_ptr, y_ptr, y2_ptr, mean_ptr, scale_ptr, beta_ptr, part_ptr,
    N, C, H, W,
    K1, OH1, OW1, KH1, KW1, sh1, sw1, ph1, pw1, dh1, dw1,
    K2, OH2, OW2, KH2, KW2, sh2, sw2, ph2, pw2, dh2, dw2,
    sxn, sxc, sxh, sxw,
    swk1, swc1, swr1, sws1,
    swk2, swc2, swr2, sws2,
    syn1, syc1, syh1, syw1,
    syn2, syc2, syh2, syw2,
    SHARED_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, OUT_STATS: tl.constexpr,
    RELU: tl.constexpr, IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    M1 = N * OH1 * OW1
    M2 = N * OH2 * OW2
    tiles_m1 = tl.cdiv(M1, BLOCK_M)
    tiles_n1 = tl.cdiv(K1, BLOCK_N)
    tiles_n2 = tl.cdiv(K2, BLOCK_N)
    pid = tl.program_id(0)
    if SHARED_M:  # one row tiling: GROUP_M row tiles at a time across both convs' column tiles
        pid_m, pid_n = swizzle(pid, tiles_m1, tiles_n1 + tiles_n2, GROUP_M)
        second = pid_n >= tiles_n1
        pid_n = tl.where(second, pid_n - tiles_n1, pid_n)
    else:  # conv1's programs, then the shortcut's
        second = pid >= tiles_m1 * tiles_n1
        sub = tl.where(second, pid - tiles_m1 * tiles_n1, pid)
        tiles_m2 = tl.cdiv(M2, BLOCK_M)
        # (each swizzle kept within its own range: the one not taken must not divide by zero)
        pm1, pn1 = swizzle(tl.minimum(sub, tiles_m1 * tiles_n1 - 1), tiles_m1, tiles_n1, GROUP_M)
        pm2, pn2 = swizzle(tl.minimum(sub, tiles_m2 * tiles_n2 - 1), tiles_m2, tiles_n2, GROUP_M)
        pid_m = tl.where(second, pm2, pm1)
        pid_n = tl.where(second, pn2, pn1)
    # This program's conv (scalars): from here on the body is forward.py's.
    M = _pick(second, M1, M2)
    K = _pick(second, K1, K2)
    OH = _pick(second, OH1, OH2)
    OW = _pick(second, OW1, OW2)
    KH = _pick(second, KH1, KH2)
    KW = _pick(second, KW1, KW2)
    stride_h = _pick(second, sh1, sh2)
    stride_w = _pick(second, sw1, sw2)
    pad_h = _pick(second, ph1, ph2)
    pad_w = _pick(second, pw1, pw2)
    dil_h = _pick(second, dh1, dh2)
    dil_w = _pick(second, dw1, dw2)
    swk = _pick(second, swk1, swk2)
    swc = _pick(second, swc1, swc2)
    swr = _pick(second, swr1, swr2)
    sws = _pick(second, sws1, sws2)
    syn = _pick(second, syn1, syn2)
    syc = _pick(second, syc1, syc2)
    syh = _pick(second, syh1, syh2)
    syw = _pick(second, syw1, syw2)
    w_base = tl.where(second, w2_ptr, w_ptr)
    y_base = tl.where(second, y2_ptr, y_ptr)

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
        wt = tl.load(w_base + w_col[None, :] + (offs_c * swc + r * swr + s * sws)[:, None],
                     mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        be = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
        a = tl.where(amask, bn_act(xt, mu, sc, be, ACC, RELU), 0.0)
        acc = mma(acc, a, wt, IN_DTYPE, DOT_MODE, PRECISION)

    omask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS or HAS_BIAS2:
        b_base = tl.where(second, bias2_ptr, bias_ptr)
        has = _pick(second, HAS_BIAS, HAS_BIAS2)
        acc += tl.load(b_base + offs_n, mask=mask_n & has, other=0.0).to(ACC)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    y_off = (nb.to(tl.int64) * syn + oh * syh + ow * syw)[:, None] + offs_n[None, :] * syc
    tl.store(y_base + y_off, out, mask=omask)
    if OUT_STATS:
        if not second:  # statistics of y (the next BN's input) only
            cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
            mean, m2 = _tile_mean_m2(out.to(ACC), omask, cnt)
            tl.store(part_ptr + pid_m * K + offs_n, mean, mask=mask_n)
            tl.store(part_ptr + (tiles_m1 + pid_m) * K + offs_n, m2, mask=mask_n)


_FWD_PLANS: dict = {}  # conv_forward_pair's launch plans (_common.launch_plan)


def _forward_pair_plan(x, weight, weight2, y, y2, stride, padding, dilation, stride2, padding2, dilation2, out_stats,
                       relu, has_bias, has_bias2):
    n, c, h, w = x.shape
    k1, _, kh1, kw1 = weight.shape
    k2, _, kh2, kw2 = weight2.shape
    oh1, ow1 = y.shape[2], y.shape[3]
    oh2, ow2 = y2.shape[2], y2.shape[3]
    m1, m2 = n * oh1 * ow1, n * oh2 * ow2
    shared_m = (oh1, ow1) == (oh2, ow2)
    # Columns tile at the narrower conv's width, so neither conv's tiles multiply absent channels.
    cfg = conv_config("fwd_pair", m1, min(k1, k2), c, kh1 * kw1, x)
    if cfg["BLOCK_M"] * cfg["BLOCK_N"] >= 128 * 128 and not configs._forced:
        # The per-program choice of conv keeps its geometry in registers: at 128x128 with 64-channel slices the
        # pair spilled 96 B on sm_80 (ResNet-34's 128 -> 256 projection); 32-channel slices: 255 registers, none.
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles_m1 = cdiv(m1, bm)
    if shared_m:
        grid = (tiles_m1 * (cdiv(k1, bn) + cdiv(k2, bn)),)
    else:
        grid = (tiles_m1 * cdiv(k1, bn) + cdiv(m2, bm) * cdiv(k2, bn),)
    acc = acc_dtype(x.dtype)
    ints = (n, c, h, w,
            k1, oh1, ow1, kh1, kw1, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            k2, oh2, ow2, kh2, kw2, stride2[0], stride2[1], padding2[0], padding2[1], dilation2[0], dilation2[1],
            *x.stride(), *weight.stride(), *weight2.stride(), *y.stride(), *y2.stride())
    kw_args = dict(SHARED_M=shared_m, HAS_BIAS=has_bias, HAS_BIAS2=has_bias2, OUT_STATS=bool(out_stats),
                   RELU=bool(relu), IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc), DOT_MODE=dot_mode(x.dtype),
                   PRECISION=fp32_precision(), **cfg)
    return (configs._table(), plan_launch(_conv_fwd_pair_kernel, grid, kw_args, ints),
            ((2, tiles_m1, k1) if out_stats else None), acc, bm, m1)


def conv_forward_pair(x, weight, weight2, bias, bias2, mean, scale, beta, y, y2, stride, padding, dilation,
                      stride2, padding2, dilation2, out_stats=False, relu=True):
    """y <- conv2d(a, weight) + bias and y2 <- conv2d(a, weight2) + bias2 for a = relu((x - mean)*scale + beta),
    in ONE launch where the two output grids coincide (into the preallocated y, y2), else forward.py's two
    launches (unless SEPARATE_RANGES). Returns per-channel (mean, biased var) of
    y when out_stats, else None."""
    if (y.shape[2], y.shape[3]) != (y2.shape[2], y2.shape[3]) and not SEPARATE_RANGES:
        # Output grids differ (a bottleneck's stride-s shortcut beside its stride-1 conv1): the convs' own
        # launches. One launch with the two program ranges (SHARED_M=False below) reads x's bytes as two
        # launches do and spilled 56 B on sm_80 at 128x128 tiles (benchmarks/NOTES.md, issue 30).
        conv_forward(x, weight2, bias2, mean, scale, beta, None, y2, stride2, padding2, dilation2, relu=relu)
        return conv_forward(x, weight, bias, mean, scale, beta, None, y, stride, padding, dilation,
                            out_stats=out_stats, relu=relu)
    key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight2.shape, weight2.stride(),
           y.shape, y.stride(), y2.shape, y2.stride(), *stride, *padding, *dilation, *stride2, *padding2, *dilation2,
           out_stats, relu, bias is None, bias2 is None, SEPARATE_RANGES, *plan_env())
    _, launch, part_shape, acc, bm, m1 = launch_plan(
        _FWD_PLANS, key, _forward_pair_plan, x, weight, weight2, y, y2, stride, padding, dilation, stride2, padding2,
        dilation2, out_stats, relu, bias is not None, bias2 is not None)
    # without statistics the kernel never touches part: scale (the same dtype) stands in
    part = torch.empty(*part_shape, dtype=acc, device=x.device) if part_shape is not None else scale
    # A missing bias's pointer stands in with the other's (the kernel selects between the two pointers, which
    # must then have one element type; HAS_BIAS / HAS_BIAS2 keep it from being read).
    b1 = bias if bias is not None else (bias2 if bias2 is not None else scale)
    b2 = bias2 if bias2 is not None else b1
    launch(x, weight, weight2, b1, b2, y, y2, mean, scale, beta, part)
    if not out_stats:
        return None
    if out_stats == "partials":  # merged later, by the finalize of the BN that reads y (_deferred.py)
        return part, bm, m1
    return moments((part, bm, m1), acc)


@triton.jit
def _phase_taps(acc, g_ptr, w_ptr, sgn, sgc, sgh, sgw, swk, swc, swr, sws, nb, i, j, mask_m, offs_c, mask_c,
                ph, pw, K, OH, OW, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
                IN_DTYPE: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """acc += one conv's share of a stride phase's input-pixel tile: dgrad.py's main loop, the taps of the
    phase only, one flattened (tap, output-channel block) loop."""
    g_row = nb.to(tl.int64) * sgn + i * sgh + j * sgw
    w_col = offs_c * swc
    r0 = _first_tap(ph, pad_h, stride_h, dil_h, step_h, KH)
    s0 = _first_tap(pw, pad_w, stride_w, dil_w, step_w, KW)
    taps_w = tl.cdiv(KW - s0, step_w)
    k_blocks = tl.cdiv(K, BLOCK_K)
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
    return acc


@direct_launch
@triton.jit
def _conv_dgrad_pair_kernel(
    g_ptr, w_ptr, g2_ptr, w2_ptr, x_ptr, mean_ptr, scale_ptr, beta_ptr, invstd_ptr, out_ptr, part_ptr,
    N, C, H, W, stride_h, stride_w,
    K1, OH1, OW1, KH1, KW1, ph1, pw1, dh1, dw1, step_h1, step_w1,
    K2, OH2, OW2, KH2, KW2, ph2, pw2, dh2, dw2, step_h2, step_w2,
    sgn1, sgc1, sgh1, sgw1,
    sgn2, sgc2, sgh2, sgw2,
    swk1, swc1, swr1, sws1,
    swk2, swc2, swr2, sws2,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    BATCH_STATS: tl.constexpr, NEED_SUMS: tl.constexpr, RELU: tl.constexpr,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Programs: [phase][row tile x column tile], as dgrad.py's kernel.
    tiles_m = tl.cdiv(N * tl.cdiv(H, stride_h) * tl.cdiv(W, stride_w), BLOCK_M)
    tiles_n = tl.cdiv(C, BLOCK_N)
    pid = tl.program_id(0)
    phase = pid // (tiles_m * tiles_n)
    pid_m, pid_n = swizzle(pid - phase * tiles_m * tiles_n, tiles_m, tiles_n, GROUP_M)
    ph = phase // stride_w
    pw = phase - ph * stride_w
    hp = tl.cdiv(H - ph, stride_h)
    wp = tl.cdiv(W - pw, stride_w)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N * hp * wp
    mask_c = offs_c < C
    j = offs_m % tl.maximum(wp, 1)
    t = offs_m // tl.maximum(wp, 1)
    i = t % tl.maximum(hp, 1)
    nb = t // tl.maximum(hp, 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc = _phase_taps(acc, g_ptr, w_ptr, sgn1, sgc1, sgh1, sgw1, swk1, swc1, swr1, sws1, nb, i, j, mask_m, offs_c,
                      mask_c, ph, pw, K1, OH1, OW1, KH1, KW1, stride_h, stride_w, ph1, pw1, dh1, dw1, step_h1,
                      step_w1, IN_DTYPE, DOT_MODE, PRECISION, BLOCK_K)
    acc = _phase_taps(acc, g2_ptr, w2_ptr, sgn2, sgc2, sgh2, sgw2, swk2, swc2, swr2, sws2, nb, i, j, mask_m,
                      offs_c, mask_c, ph, pw, K2, OH2, OW2, KH2, KW2, stride_h, stride_w, ph2, pw2, dh2, dw2,
                      step_h2, step_w2, IN_DTYPE, DOT_MODE, PRECISION, BLOCK_K)

    # dgrad.py's epilogue
    h = ph + stride_h * i
    w = pw + stride_w * j
    emask = mask_m[:, None] & mask_c[None, :]
    o_off = (nb.to(tl.int64) * son + h * soh + w * sow)[:, None] + offs_c[None, :] * soc
    ga = acc.to(IN_DTYPE).to(ACC)
    xt = tl.load(x_ptr + (nb.to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc,
                 mask=emask, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    be = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0)
    pre = (xt - mu[None, :]) * sc[None, :] + be[None, :]
    if RELU:
        gm = tl.where(emask & ~(pre <= 0), ga, 0.0)
    else:
        gm = tl.where(emask, ga, 0.0)
    if NEED_SUMS:
        istd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        xhat = (xt - mu[None, :]) * istd[None, :]
        row = phase * tiles_m + pid_m
        tl.store(part_ptr + row * 2 * C + offs_c, tl.sum(gm, axis=0), mask=mask_c)
        tl.store(part_ptr + row * 2 * C + C + offs_c, tl.sum(gm * xhat, axis=0), mask=mask_c)
    if BATCH_STATS:
        tl.store(out_ptr + o_off, gm.to(out_ptr.dtype.element_ty), mask=emask)
    else:
        tl.store(out_ptr + o_off, (gm * sc[None, :]).to(out_ptr.dtype.element_ty), mask=emask)


def dgrad_pair_applies(stride, stride2) -> bool:
    """The one-kernel dgrad needs both convs on the same stride phases."""
    return list(stride) == list(stride2)


_DGRAD_PLANS: dict = {}  # conv_dgrad_pair's launch plans


def _dgrad_pair_plan(grad_y, weight, grad_y2, weight2, x, out, need_sums, batch_stats, stride, padding, dilation,
                     padding2, dilation2, relu):
    n, c, h, w = x.shape
    k1, _, kh1, kw1 = weight.shape
    k2, _, kh2, kw2 = weight2.shape
    phases = stride[0] * stride[1]
    m_phase = n * cdiv(h, stride[0]) * cdiv(w, stride[1])
    taps = cdiv(kh1, stride[0]) * cdiv(kw1, stride[1]) + cdiv(kh2, stride[0]) * cdiv(kw2, stride[1])
    cfg = conv_config("dgrad_pair", m_phase, c, min(k1, k2), taps, x)
    tiles_m = cdiv(m_phase, cfg["BLOCK_M"])

    def step(s, d):
        return s // math.gcd(s, d)

    ints = (n, c, h, w, stride[0], stride[1],
            k1, grad_y.shape[2], grad_y.shape[3], kh1, kw1, padding[0], padding[1], dilation[0], dilation[1],
            step(stride[0], dilation[0]), step(stride[1], dilation[1]),
            k2, grad_y2.shape[2], grad_y2.shape[3], kh2, kw2, padding2[0], padding2[1], dilation2[0], dilation2[1],
            step(stride[0], dilation2[0]), step(stride[1], dilation2[1]),
            *grad_y.stride(), *grad_y2.stride(), *weight.stride(), *weight2.stride(), *x.stride(), *out.stride())
    kw_args = dict(BATCH_STATS=batch_stats, NEED_SUMS=need_sums, RELU=bool(relu),
                   IN_DTYPE=tl_dtype(x.dtype), ACC=tl_dtype(acc_dtype(x.dtype)), DOT_MODE=dot_mode(x.dtype),
                   PRECISION=fp32_precision(), **cfg)
    part_shape = (phases * tiles_m, 2, c) if need_sums else None
    return (configs._table(), plan_launch(_conv_dgrad_pair_kernel, (phases * tiles_m * cdiv(c, cfg["BLOCK_N"]),),
                                          kw_args, ints), part_shape)


def conv_dgrad_pair(grad_y, weight, grad_y2, weight2, x, mean, scale, beta, invstd, batch_stats, need_sums, stride,
                    padding, dilation, padding2, dilation2, relu=True):
    """dgrad.conv_dgrad's (out, part) for the sum of two convs' gradients of one activation (same stride), in
    one launch: out is dx (running statistics) or ga*m in x's dtype (batch statistics), part the per-tile
    BN-backward partials [rows, 2, C] when need_sums."""
    need_sums = need_sums or batch_stats
    out = torch.empty_like(x, memory_format=memory_format_of(x))
    key = (grad_y.shape, grad_y.stride(), grad_y2.shape, grad_y2.stride(), weight.shape, weight.stride(),
           weight2.shape, weight2.stride(), x.shape, x.stride(), x.dtype, x.device, out.stride(), need_sums,
           batch_stats, *stride, *padding, *dilation, *padding2, *dilation2, relu, *plan_env())
    _, launch, part_shape = launch_plan(
        _DGRAD_PLANS, key, _dgrad_pair_plan, grad_y, weight, grad_y2, weight2, x, out, need_sums, batch_stats, stride,
        padding, dilation, padding2, dilation2, relu)
    part = torch.empty(*part_shape, dtype=acc_dtype(x.dtype), device=x.device) if part_shape is not None else None
    launch(grad_y, weight, grad_y2, weight2, x, mean, scale, beta, invstd, out, part if need_sums else out)
    return out, part
