"""The end of a post-activation block: y = act(bn(z) + t), t = the shortcut s or bn_s(s), one pass.

torchvision's and timm's ResNets end each block with relu(bn3(conv3(.)) + shortcut), the shortcut being
the block input or bn_d(conv_d(x)). Eager runs the BN (statistics + normalize), the add and the ReLU as
separate passes over the block's largest activation and keeps the BN output and the ReLU output for
backward. Here the BN statistics come from the producer (the fused conv3's epilogue, or a statistics
pass for the shortcut's conv) and one pass writes y; nothing but z and s (which exist anyway) is kept.

Rounding follows eager op for op: each BN output is rounded to the tensor dtype (eager stores it), their
sum is formed in the accumulation dtype and rounded, then the activation (a NaN-propagating ReLU, as
torch.relu; or none). The backward recomputes that same pre-activation, so its mask is eager's.

Backward, with gm = g * mask: S1 = sum gm, S2 = sum gm * xhat(z), S2s = sum gm * xhat(s) per channel,
then dz = invstd*gamma*(gm - S1/M - xhat*S2/M) (batch statistics) or gm*scale (running), and the
shortcut's the same with its own statistics (or gm itself for an identity shortcut). Two launches: a
reduction over a bounded number of row groups (fixed order: deterministic), and the elementwise pass,
whose programs each add up those few partial rows for their channels before their rows -- the partial
sums never need a launch of their own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import memory_format_of
from . import configs
from ._common import acc_dtype, cdiv, interpreting, launch_plan, next_pow2, plan_launch, tl_dtype
from ._launch import direct_launch


@triton.jit
def _rows(offs_m, H, W, sn, sh, sw):
    """Per-row (pixel) offsets of an NCHW-indexed tensor with strides (sn, sh, sw)."""
    w = offs_m % W
    t = offs_m // W
    return (t // H).to(tl.int64) * sn + (t % H) * sh + w * sw


@triton.jit
def _pre(z, mu, sc, be, s, smu, ssc, sbe, DT: tl.constexpr, ACC: tl.constexpr, SHORTCUT_BN: tl.constexpr):
    """rnd(rnd(bn(z)) + t) in ACC, t = rnd(bn_s(s)) or s: what eager's BN, add and ReLU input would hold."""
    b = ((z.to(ACC) - mu[None, :]) * sc[None, :] + be[None, :]).to(DT).to(ACC)
    if SHORTCUT_BN:
        t = ((s.to(ACC) - smu[None, :]) * ssc[None, :] + sbe[None, :]).to(DT).to(ACC)
    else:
        t = s.to(ACC)
    return (b + t).to(DT).to(ACC)


@triton.jit
def _channel(ptr, offs_c, mask_c, ACC: tl.constexpr):
    return tl.load(ptr + offs_c, mask=mask_c, other=0.0).to(ACC)


@direct_launch
@triton.jit
def _bn_add_act_kernel(
    z_ptr, s_ptr, y_ptr, mean_ptr, scale_ptr, beta_ptr, smean_ptr, sscale_ptr, sbeta_ptr,
    N, C, H, W,
    szn, szc, szh, szw, ssn, ssc, ssh, ssw, syn, syc, syh, syw,
    SHORTCUT_BN: tl.constexpr, RELU: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    M = N * H * W
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    z = tl.load(z_ptr + _rows(offs_m, H, W, szn, szh, szw)[:, None] + offs_c[None, :] * szc, mask=mask, other=0.0)
    s = tl.load(s_ptr + _rows(offs_m, H, W, ssn, ssh, ssw)[:, None] + offs_c[None, :] * ssc, mask=mask, other=0.0)
    pre = _pre(z, _channel(mean_ptr, offs_c, mask_c, ACC), _channel(scale_ptr, offs_c, mask_c, ACC),
               _channel(beta_ptr, offs_c, mask_c, ACC), s, _channel(smean_ptr, offs_c, mask_c, ACC),
               _channel(sscale_ptr, offs_c, mask_c, ACC), _channel(sbeta_ptr, offs_c, mask_c, ACC),
               DT, ACC, SHORTCUT_BN)
    if RELU:
        pre = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + _rows(offs_m, H, W, syn, syh, syw)[:, None] + offs_c[None, :] * syc, pre.to(DT), mask=mask)


@triton.jit
def _masked_grad(g_ptr, z_ptr, s_ptr, offs_m, offs_c, mask, mask_c, H, W,
                 sgn, sgc, sgh, sgw, szn, szc, szh, szw, ssn, ssc, ssh, ssw,
                 mean_ptr, scale_ptr, beta_ptr, smean_ptr, sscale_ptr, sbeta_ptr,
                 SHORTCUT_BN: tl.constexpr, RELU: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr):
    """(g * mask, z, s) of one tile in ACC; the mask from the recomputed pre-activation, as torch's ReLU
    backward draws it (zero where the output is <= 0, so a NaN output passes its gradient)."""
    z = tl.load(z_ptr + _rows(offs_m, H, W, szn, szh, szw)[:, None] + offs_c[None, :] * szc, mask=mask, other=0.0)
    s = tl.load(s_ptr + _rows(offs_m, H, W, ssn, ssh, ssw)[:, None] + offs_c[None, :] * ssc, mask=mask, other=0.0)
    g = tl.load(g_ptr + _rows(offs_m, H, W, sgn, sgh, sgw)[:, None] + offs_c[None, :] * sgc, mask=mask,
                other=0.0).to(ACC)
    if RELU:
        pre = _pre(z, _channel(mean_ptr, offs_c, mask_c, ACC), _channel(scale_ptr, offs_c, mask_c, ACC),
                   _channel(beta_ptr, offs_c, mask_c, ACC), s, _channel(smean_ptr, offs_c, mask_c, ACC),
                   _channel(sscale_ptr, offs_c, mask_c, ACC), _channel(sbeta_ptr, offs_c, mask_c, ACC),
                   DT, ACC, SHORTCUT_BN)
        g = tl.where(pre <= 0, 0.0, g)  # ReLU's backward: zero where the output is <= 0 (NaN passes g)
    return tl.where(mask, g, 0.0), z.to(ACC), s.to(ACC)


@direct_launch
@triton.jit
def _bn_add_act_reduce_kernel(
    g_ptr, z_ptr, s_ptr, part_ptr,
    mean_ptr, scale_ptr, beta_ptr, invstd_ptr, smean_ptr, sscale_ptr, sbeta_ptr, sinvstd_ptr,
    N, C, H, W, tiles,
    sgn, sgc, sgh, sgw, szn, szc, szh, szw, ssn, ssc, ssh, ssw,
    SHORTCUT_BN: tl.constexpr, RELU: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (r, cb) sums row tiles r, r + R, r + 2R, ... into partial row r of [R, 3, C]."""
    M = N * H * W
    r = tl.program_id(0)
    R = tl.num_programs(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mu = _channel(mean_ptr, offs_c, mask_c, ACC)
    inv = _channel(invstd_ptr, offs_c, mask_c, ACC)
    smu = _channel(smean_ptr, offs_c, mask_c, ACC)
    sinv = _channel(sinvstd_ptr, offs_c, mask_c, ACC)
    s1 = tl.zeros((BLOCK_C,), dtype=ACC)
    s2 = tl.zeros((BLOCK_C,), dtype=ACC)
    s2s = tl.zeros((BLOCK_C,), dtype=ACC)
    for t in range(r, tiles, R):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_c[None, :]
        gm, z, s = _masked_grad(g_ptr, z_ptr, s_ptr, offs_m, offs_c, mask, mask_c, H, W,
                                sgn, sgc, sgh, sgw, szn, szc, szh, szw, ssn, ssc, ssh, ssw,
                                mean_ptr, scale_ptr, beta_ptr, smean_ptr, sscale_ptr, sbeta_ptr,
                                SHORTCUT_BN, RELU, DT, ACC)
        s1 += tl.sum(gm, axis=0)
        s2 += tl.sum(tl.where(mask, gm * ((z - mu[None, :]) * inv[None, :]), 0.0), axis=0)
        if SHORTCUT_BN:
            s2s += tl.sum(tl.where(mask, gm * ((s - smu[None, :]) * sinv[None, :]), 0.0), axis=0)
    base = part_ptr + r.to(tl.int64) * 3 * C + offs_c
    tl.store(base, s1, mask=mask_c)
    tl.store(base + C, s2, mask=mask_c)
    tl.store(base + 2 * C, s2s, mask=mask_c)


@triton.jit
def _bn_backward_of(gm, v, mu, inv, k, sc, s1, s2, M, BATCH: tl.constexpr):
    """dv of one BN from its masked output gradient: the full formula with batch statistics, else gm*scale."""
    if BATCH:
        return k[None, :] * (gm - (s1 / M)[None, :] - (v - mu[None, :]) * inv[None, :] * (s2 / M)[None, :])
    return gm * sc[None, :]


@direct_launch
@triton.jit
def _bn_add_act_backward_kernel(
    g_ptr, z_ptr, s_ptr, dz_ptr, ds_ptr, part_ptr, sums_ptr,
    mean_ptr, scale_ptr, beta_ptr, invstd_ptr, gamma_ptr,
    smean_ptr, sscale_ptr, sbeta_ptr, sinvstd_ptr, sgamma_ptr,
    N, C, H, W, tiles, parts,
    sgn, sgc, sgh, sgw, szn, szc, szh, szw, ssn, ssc, ssh, ssw,
    sdzn, sdzc, sdzh, sdzw, sdsn, sdsc, sdsh, sdsw,
    NEED_DZ: tl.constexpr, NEED_DS: tl.constexpr, HAS_SUMS: tl.constexpr, WRITE_SUMS: tl.constexpr,
    BATCH: tl.constexpr, S_BATCH: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_SGAMMA: tl.constexpr,
    SHORTCUT_BN: tl.constexpr, RELU: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program (r, cb): the partial rows' totals for its channels, then row tiles r, r + R, ..."""
    M = N * H * W
    r = tl.program_id(0)
    R = tl.num_programs(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s1 = tl.zeros((BLOCK_C,), dtype=ACC)
    s2 = tl.zeros((BLOCK_C,), dtype=ACC)
    s2s = tl.zeros((BLOCK_C,), dtype=ACC)
    if HAS_SUMS:
        for p0 in range(0, parts, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = (p < parts)[:, None] & mask_c[None, :]
            row = part_ptr + p[:, None].to(tl.int64) * 3 * C + offs_c[None, :]
            s1 += tl.sum(tl.load(row, mask=pm, other=0.0), axis=0)
            s2 += tl.sum(tl.load(row + C, mask=pm, other=0.0), axis=0)
            s2s += tl.sum(tl.load(row + 2 * C, mask=pm, other=0.0), axis=0)
        if WRITE_SUMS:
            if r == 0:
                tl.store(sums_ptr + offs_c, s1, mask=mask_c)
                tl.store(sums_ptr + C + offs_c, s2, mask=mask_c)
                tl.store(sums_ptr + 2 * C + offs_c, s2s, mask=mask_c)
    mu = _channel(mean_ptr, offs_c, mask_c, ACC)
    inv = _channel(invstd_ptr, offs_c, mask_c, ACC)
    sc = _channel(scale_ptr, offs_c, mask_c, ACC)
    k = inv
    if HAS_GAMMA:
        k = inv * _channel(gamma_ptr, offs_c, mask_c, ACC)
    smu = _channel(smean_ptr, offs_c, mask_c, ACC)
    sinv = _channel(sinvstd_ptr, offs_c, mask_c, ACC)
    s_sc = _channel(sscale_ptr, offs_c, mask_c, ACC)
    sk = sinv
    if HAS_SGAMMA:
        sk = sinv * _channel(sgamma_ptr, offs_c, mask_c, ACC)
    for t in range(r, tiles if (NEED_DZ or NEED_DS) else 0, R):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_c[None, :]
        gm, z, s = _masked_grad(g_ptr, z_ptr, s_ptr, offs_m, offs_c, mask, mask_c, H, W,
                                sgn, sgc, sgh, sgw, szn, szc, szh, szw, ssn, ssc, ssh, ssw,
                                mean_ptr, scale_ptr, beta_ptr, smean_ptr, sscale_ptr, sbeta_ptr,
                                SHORTCUT_BN, RELU, DT, ACC)
        if NEED_DZ:
            dz = _bn_backward_of(gm, z, mu, inv, k, sc, s1, s2, M, BATCH)
            tl.store(dz_ptr + _rows(offs_m, H, W, sdzn, sdzh, sdzw)[:, None] + offs_c[None, :] * sdzc,
                     dz.to(DT), mask=mask)
        if NEED_DS:
            if SHORTCUT_BN:
                ds = _bn_backward_of(gm, s, smu, sinv, sk, s_sc, s1, s2s, M, S_BATCH)
            else:
                ds = gm
            tl.store(ds_ptr + _rows(offs_m, H, W, sdsn, sdsh, sdsw)[:, None] + offs_c[None, :] * sdsc,
                     ds.to(DT), mask=mask)


# Each BN output rounded as eager's: (v - mean) * scale, then + beta, no fused multiply-add (the GPU
# compiler would contract them by default; the interpreter never does, nor does the CUDA kernel).
def _no_fma():
    return {} if interpreting() else {"enable_fp_fusion": False}


def _tiles(z):
    """(BLOCK_M, BLOCK_C, row tiles, channel blocks, warps) for an elementwise pass over z."""
    n, c, h, w = z.shape
    if n * h * w > 2 ** 31 - 1 - 4096:  # the kernels index pixels in 32 bits (the CUDA binding refuses it too)
        raise ValueError(f"bn_add_relu: N*H*W = {n * h * w} pixels is more than the kernels index (2^31 - 4097)")
    m = n * h * w
    block_c = 16 if interpreting() else min(64, next_pow2(c))
    block_m = 32 if interpreting() else max(16, min(256, 8192 // block_c))
    return block_m, block_c, cdiv(m, block_m), cdiv(c, block_c), 4 if z.stride(1) == 1 else 8


def _row_groups(tiles, c_blocks):
    """How many programs share the rows of one channel block in the backward passes: enough to fill a
    GPU (~4 waves of 132 SMs) without making the partial rows every program re-reads many."""
    if interpreting():
        return min(tiles, 3)
    return max(1, min(tiles, 64, cdiv(528, c_blocks)))


_FWD_PLANS: dict = {}  # bn_add_relu_forward's launch plans (_common.launch_plan)
_BWD_PLANS: dict = {}  # bn_add_relu_backward's


def _forward_plan(z, s, y, sbn, relu):
    n, c, h, w = z.shape
    bm, bc, tiles, cbs, warps = _tiles(z)
    kw_args = dict(SHORTCUT_BN=sbn, RELU=bool(relu), DT=tl_dtype(z.dtype), ACC=tl_dtype(acc_dtype(z.dtype)),
                   BLOCK_M=bm, BLOCK_C=bc, num_warps=warps, **_no_fma())
    return configs._table(), plan_launch(_bn_add_act_kernel, (tiles, cbs), kw_args,
                                         (n, c, h, w, *z.stride(), *s.stride(), *y.stride()))


def bn_add_relu_forward(z, mean, scale, beta, s, s_mean, s_scale, s_beta, y, relu=True):
    """y <- act(rnd((z - mean)*scale + beta) + t), t = rnd((s - s_mean)*s_scale + s_beta) when s_mean is
    given, else s. One launch; any strides."""
    sbn = s_mean is not None
    _, launch = launch_plan(
        _FWD_PLANS, (z.shape, z.stride(), z.dtype, s.stride(), y.stride(), sbn, relu), _forward_plan, z, s, y, sbn,
        relu)
    launch(z, s, y, mean, scale, beta, s_mean if sbn else mean, s_scale if sbn else scale, s_beta if sbn else beta)


def _backward_plan(g, z, s, dz_like, ds_like, sbn, relu, need_dz, need_ds, need_sums, batch, s_batch, has_sums,
                   has_gamma, has_sgamma):
    n, c, h, w = z.shape
    bm, bc, tiles, cbs, warps = _tiles(z)
    groups = _row_groups(tiles, cbs)
    common = dict(SHORTCUT_BN=sbn, RELU=bool(relu), DT=tl_dtype(z.dtype), ACC=tl_dtype(acc_dtype(z.dtype)),
                  BLOCK_M=bm, BLOCK_C=bc, num_warps=warps, **_no_fma())
    reduce = plan_launch(_bn_add_act_reduce_kernel, (groups, cbs), common,
                         (n, c, h, w, tiles, *g.stride(), *z.stride(), *s.stride()))
    finish = plan_launch(_bn_add_act_backward_kernel, (groups if (need_dz or need_ds) else 1, cbs), dict(
        NEED_DZ=need_dz, NEED_DS=need_ds, HAS_SUMS=has_sums, WRITE_SUMS=need_sums, BATCH=batch, S_BATCH=s_batch,
        HAS_GAMMA=has_gamma, HAS_SGAMMA=has_sgamma, BLOCK_P=next_pow2(min(groups, 64)), **common),
        (n, c, h, w, tiles, groups if has_sums else 0, *g.stride(), *z.stride(), *s.stride(), *dz_like.stride(),
         *ds_like.stride()))
    return configs._table(), groups, reduce, finish


def bn_add_relu_backward(g, z, mean, scale, beta, invstd, gamma, batch_stats,
                         s, s_mean, s_scale, s_beta, s_invstd, s_gamma, s_batch_stats,
                         need_dz, need_ds, need_sums, relu=True):
    """(dz or None, ds or None, [3, C] sums (S1, S2, S2s) or None): a reduction launch when sums are needed,
    then the elementwise launch, which totals the reduction's partial rows itself."""
    c = z.shape[1]
    acc = acc_dtype(z.dtype)
    sbn = s_mean is not None
    batch = bool(batch_stats) and need_dz
    s_batch = sbn and bool(s_batch_stats) and need_ds
    has_sums = need_sums or batch or s_batch
    has_sgamma = sbn and s_gamma is not None
    dz = torch.empty_like(z, memory_format=memory_format_of(z)) if need_dz else None
    ds = torch.empty_like(s, memory_format=memory_format_of(z)) if need_ds else None
    dz_like, ds_like = (dz if need_dz else z), (ds if need_ds else z)
    key = (z.shape, z.stride(), z.dtype, g.stride(), s.stride(), dz_like.stride(), ds_like.stride(), sbn, relu,
           need_dz, need_ds, need_sums, batch, s_batch, gamma is not None, has_sgamma)
    _, groups, reduce, finish = launch_plan(
        _BWD_PLANS, key, _backward_plan, g, z, s, dz_like, ds_like, sbn, relu, need_dz, need_ds, need_sums, batch,
        s_batch, has_sums, gamma is not None, has_sgamma)
    sp = (s_mean, s_scale, s_beta, s_invstd) if sbn else (mean, scale, beta, invstd)
    part = sums = None
    if has_sums:
        part = torch.empty(groups, 3, c, dtype=acc, device=z.device)
        sums = torch.empty(3, c, dtype=acc, device=z.device) if need_sums else None
        reduce(g, z, s, part, mean, scale, beta, invstd, *sp)
    if need_dz or need_ds or sums is not None:
        # Only the affine gradients wanted: one program per channel block totals the partial rows.
        finish(g, z, s, dz_like, ds_like, part if has_sums else invstd, sums if sums is not None else invstd, mean,
               scale, beta, invstd, gamma if gamma is not None else invstd, *sp[:3], sp[3],
               s_gamma if has_sgamma else invstd)
    return dz, ds, sums
