"""The small kernels that finish what the big ones leave in partials: one launch each, no ATen tails.

bn_finalize (forward): per channel, from the per-tile partials of x (Chan's merge in float64, tile
means relative to the pivot x[0, c, 0, 0]) or from given (mean, var) -- batch statistics handed over by
a producer conv, or the running buffers in eval -- computes mean, var, invstd = 1/sqrt(var + eps) and
the prologue's scale = invstd * gamma and beta, and in training updates running_mean / running_var in
place exactly as nn.BatchNorm2d does (EMA with `momentum`, running variance unbiased). Replaces ~30
ATen ops (merge, rsqrt, affine, EMA, casts) with one launch.

column_sums (backward): sums float32 partial rows into their totals for up to two arrays in one
launch: dgrad's per-tile BN-backward partials [rows, 2, C] -> S1 (= dbeta), S2 (= dgamma), and wgrad's
split-K slabs [split, numel] -> dW in the weight's dtype and layout. Fixed summation order:
deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._common import cdiv, interpreting, launch_plan, next_pow2, plan_launch, tl_dtype
from ._launch import direct_launch

FIN_ROWS = 5  # bn_finalize's output rows: mean, var, invstd, scale, beta


@direct_launch
@triton.jit
def _bn_finalize_kernel(
    part_ptr, tiles, tile_rows, total,
    x_ptr, sxc,
    mean_ptr, var_ptr, out_ptr,
    gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr,
    eps, momentum, unbiased, C,
    FROM_PARTIALS: tl.constexpr, HAS_PIVOT: tl.constexpr, WRITE_MOMENTS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if FROM_PARTIALS:
        # Chan's merge of `tiles` groups (all of `tile_rows` elements but the last) in float64: it
        # touches tiles x C numbers, nothing the size of the tensor.
        last = (total - (tiles - 1) * tile_rows).to(tl.float64)
        s = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for t0 in range(0, tiles, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            cnt = tl.where(offs_t == tiles - 1, last, tile_rows.to(tl.float64))
            m = tl.load(part_ptr + offs_t[:, None] * C + offs_c[None, :],
                        mask=(offs_t < tiles)[:, None] & mask_c[None, :], other=0.0).to(tl.float64)
            s += tl.sum(tl.where((offs_t < tiles)[:, None], cnt[:, None] * m, 0.0), axis=0)
        rel = s / total
        q = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for t0 in range(0, tiles, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            cnt = tl.where(offs_t == tiles - 1, last, tile_rows.to(tl.float64))
            mask = (offs_t < tiles)[:, None] & mask_c[None, :]
            m = tl.load(part_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float64)
            m2 = tl.load(part_ptr + (tiles + offs_t)[:, None] * C + offs_c[None, :], mask=mask,
                         other=0.0).to(tl.float64)
            d = m - rel[None, :]
            q += tl.sum(tl.where(mask, m2 + cnt[:, None] * d * d, 0.0), axis=0)
        if HAS_PIVOT:
            rel += tl.load(x_ptr + offs_c * sxc, mask=mask_c, other=0.0).to(tl.float64)
        mean = rel.to(ACC)
        var = (q / total).to(ACC)
        if WRITE_MOMENTS:  # separate tensors for callers whose outputs may not alias
            tl.store(mean_ptr + offs_c, mean, mask=mask_c)
            tl.store(var_ptr + offs_c, var, mask=mask_c)
    else:
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        var = tl.load(var_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_GAMMA:
        scale = invstd * tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    beta = tl.zeros((BLOCK_C,), dtype=ACC)
    if HAS_BETA:
        beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    tl.store(out_ptr + offs_c, mean, mask=mask_c)
    tl.store(out_ptr + C + offs_c, var, mask=mask_c)
    tl.store(out_ptr + 2 * C + offs_c, invstd, mask=mask_c)
    tl.store(out_ptr + 3 * C + offs_c, scale, mask=mask_c)
    tl.store(out_ptr + 4 * C + offs_c, beta, mask=mask_c)
    if UPDATE_RUNNING:
        rm = tl.load(rm_ptr + offs_c, mask=mask_c, other=0.0)
        rv = tl.load(rv_ptr + offs_c, mask=mask_c, other=0.0)
        new_m = rm.to(ACC) * (1 - momentum) + mean * momentum
        new_v = rv.to(ACC) * (1 - momentum) + (var * unbiased) * momentum
        tl.store(rm_ptr + offs_c, new_m.to(rm_ptr.dtype.element_ty), mask=mask_c)
        tl.store(rv_ptr + offs_c, new_v.to(rv_ptr.dtype.element_ty), mask=mask_c)
    if COUNT_BATCH:  # num_batches_tracked += 1, eager's separate add_ (a scalar atomic: one thread of one program)
        if tl.program_id(0) == 0:
            tl.atomic_add(nbt_ptr, 1)


_FIN_PLANS: dict = {}  # bn_finalize's launch plans (_common.launch_plan)


def _finalize_plan(c, acc, from_partials, has_x, write_moments, has_gamma, has_beta, update, count_batch):
    # Few channels per program: the merge reads tiles x C partials, and more programs read them faster.
    block_c = 16 if interpreting() else min(16, next_pow2(c))
    kw_args = dict(FROM_PARTIALS=from_partials, HAS_PIVOT=has_x, WRITE_MOMENTS=write_moments, HAS_GAMMA=has_gamma,
                   HAS_BETA=has_beta, UPDATE_RUNNING=update, COUNT_BATCH=count_batch, ACC=tl_dtype(acc),
                   BLOCK_C=block_c,
                   BLOCK_T=32 if interpreting() else 128, num_warps=4)
    return configs._table(), plan_launch(_bn_finalize_kernel, (cdiv(c, block_c),), kw_args, (c,))


def bn_finalize(c, acc, *, partials=None, x=None, mean=None, var=None, gamma=None, beta=None,
                running_mean=None, running_var=None, momentum=0.0, eps=1e-5, count=None, num_batches_tracked=None):
    """[FIN_ROWS, C] tensor (mean, var, invstd, scale, beta) in `acc`, from `partials` = (part
    [2, tiles, C], rows per tile, total rows; x supplies the pivot; mean/var given too receive the
    merged moments) or from (mean, var). Given running buffers, they are updated in place with
    `momentum` and the count `count` (unbiased); given num_batches_tracked (a BN's int64 counter), it is
    incremented by one in the same launch."""
    from_partials = partials is not None
    update = running_mean is not None
    counted = num_batches_tracked is not None
    _, launch = launch_plan(
        _FIN_PLANS,
        (c, acc, from_partials, x is not None, mean is not None, gamma is not None, beta is not None, update, counted),
        _finalize_plan, c, acc, from_partials, x is not None, from_partials and mean is not None, gamma is not None,
        beta is not None, update, counted)
    part, tile_rows, total = partials if from_partials else (None, 1, 1)
    out = torch.empty(FIN_ROWS, c, dtype=acc, device=(part if from_partials else mean).device)
    if part is None:
        part = out
    dummy = out  # an absent tensor's stand-in (its flag keeps the kernel from reading it)
    launch(
        part, part.shape[1] if from_partials else 1, tile_rows, total,
        x if x is not None else dummy, x.stride(1) if x is not None else 0,
        mean if mean is not None else dummy, var if var is not None else dummy, out,
        gamma if gamma is not None else dummy, beta if beta is not None else dummy,
        running_mean if update else dummy, running_var if update else dummy,
        num_batches_tracked if counted else dummy, float(eps), float(momentum),
        (count / (count - 1)) if update and count and count > 1 else float("inf"))
    return out


def moments(partials, acc, x=None):
    """(mean, biased var) per channel, as separate tensors, merged from per-tile partials (one launch);
    x, when given, supplies the pivot the partials are relative to."""
    c = partials[0].shape[2]
    mean = torch.empty(c, dtype=acc, device=partials[0].device)
    var = torch.empty_like(mean)
    bn_finalize(c, acc, partials=partials, x=x, mean=mean, var=var)
    return mean, var


@triton.jit
def _sum_rows(ptr, rows, length, offs, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """Columns `offs` of a row-major [rows, length] array, summed over its rows in a fixed order."""
    acc = tl.zeros(offs.shape, dtype=ACC)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        v = tl.load(ptr + r[:, None].to(tl.int64) * length + offs[None, :],
                    mask=(r < rows)[:, None] & (offs < length)[None, :], other=0.0)
        acc += tl.sum(v.to(ACC), axis=0)
    return acc


@direct_launch
@triton.jit
def _column_sums_kernel(
    a_ptr, a_rows, a_len, a_out0, a_out1, a_split,
    b_ptr, b_rows, b_len, b_out,
    a_programs,
    HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Programs [0, a_programs) sum the rows of a [a_rows, a_len] (columns < a_split to a_out0, the
    rest to a_out1); the others sum the rows of b [b_rows, b_len] into b_out (cast to its dtype)."""
    pid = tl.program_id(0)
    if pid < a_programs:
        offs_a = pid * BLOCK_L + tl.arange(0, BLOCK_L)
        acc_a = _sum_rows(a_ptr, a_rows, a_len, offs_a, ACC, BLOCK_R)
        lo = offs_a < a_split
        tl.store(a_out0 + offs_a, acc_a.to(a_out0.dtype.element_ty), mask=lo)
        tl.store(a_out1 + (offs_a - a_split), acc_a.to(a_out1.dtype.element_ty), mask=~lo & (offs_a < a_len))
    elif HAS_B:
        offs_b = (pid - a_programs).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        acc_b = _sum_rows(b_ptr, b_rows, b_len, offs_b, ACC, BLOCK_R)
        tl.store(b_out + offs_b, acc_b.to(b_out.dtype.element_ty), mask=offs_b < b_len)


_SUM_PLANS: dict = {}  # column_sums' launch plans (_common.launch_plan)


def _column_sums_plan(a_len, b_len, wide):
    block_l = 64 if interpreting() else 256
    a_programs = cdiv(a_len, block_l)
    programs = a_programs + cdiv(b_len, block_l)
    kw_args = dict(HAS_B=b_len > 0, ACC=tl.float64 if wide else tl.float32, BLOCK_R=8 if interpreting() else 16,
                   BLOCK_L=block_l, num_warps=4)
    return configs._table(), plan_launch(_column_sums_kernel, (programs,), kw_args, (a_programs,))


def column_sums(a=None, a_out=(None, None), b=None, b_out=None, a_shape=None):
    """One launch: a [rows, 2C] -> (a_out[0] [C], a_out[1] [C]) and b [rows, L] -> b_out (L elements,
    dense storage in any layout), summed in float32 (float64 for float64 arrays). a_shape: a's (rows, 2C)
    when a is stored with another shape (dgrad's [rows, 2, C] partials)."""
    dummy = a if a is not None else b
    if dummy is None:
        return
    a_len = (a_shape or a.shape)[1] if a is not None else 0
    b_len = b.shape[1] if b is not None else 0
    column_sums_launch(column_sums_plan(a_len, b_len, dummy.dtype), a, a_out, b, b_out, a_shape)


def column_sums_plan(a_len, b_len, dtype):
    """column_sums' launch plan for rows of a_len (0: no a) and b_len (0: no b) elements of dtype."""
    return launch_plan(_SUM_PLANS, (a_len, b_len, dtype), _column_sums_plan, a_len, b_len, dtype == torch.float64)


def column_sums_launch(plan, a, a_out, b, b_out, a_shape=None):
    _, launch = plan
    if launch.grid[0] == 0:
        return
    a_rows, a_len = (a_shape or a.shape) if a is not None else (0, 0)
    b_rows, b_len = b.shape if b is not None else (0, 0)
    dummy = a if a is not None else b
    o0, o1 = a_out if a is not None else (b_out, b_out)
    launch(dummy if a is None else a, a_rows, a_len, o0, o1, a_len // 2,
           dummy if b is None else b, b_rows, b_len, b_out if b is not None else dummy)
