"""CUDA backend: thin launchers over the compiled extension fused_resnet._C (csrc/).

Same functions and signatures as the Triton launchers (fused_resnet/triton/__init__.py), so the op
layer treats the two backends alike: statistics partials and their merge in one finalize kernel, the
conv, and a backward of four launches at most (dgrad, wgrad, one column-sum launch, the BN-backward
finish) -- no ATen tails; the post-activation block end (bn_add_relu_forward: one launch;
bn_add_relu_backward: two at most). Outputs are allocated here; the kernels fill them.
"""
from __future__ import annotations

import torch

from ._layout import memory_format_of


def _ext(like):
    """The compiled kernels for like's device: fused_resnet._C for CUDA tensors, the emulated host build
    (fused_resnet/_emulated.py, FUSED_RESNET_CUDA_EMULATED=1) for CPU tensors. Kept per device type once
    loaded: a function-level import costs a launch ~1 us (issue 30)."""
    kind = like.device.type
    ext = _EXTS.get(kind)
    if ext is None:
        if kind == "cpu":
            from . import _emulated

            ext = _emulated.load()
        else:
            from . import _C  # imported lazily: backends.py reports why when it is missing

            ext = _C
        _EXTS[kind] = ext
    return ext


_EXTS: dict = {}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tf32():
    """fp32 convolutions on TF32 tensor cores where PyTorch's own switch for them allows it, so that "fp32"
    means what it means for nn.Conv2d (the Triton backend reads the same switch)."""
    return bool(_allow_tf32())


# read directly: torch.backends.cudnn.allow_tf32's property costs 0.4 us a read (triton/_common.plan_env)
_allow_tf32 = getattr(torch._C, "_get_cudnn_allow_tf32", None) or (lambda: torch.backends.cudnn.allow_tf32)


def stats_partials(x):
    """Per-tile (mean - pivot, M2) of x per channel: ([2, tiles, C], rows per tile, total rows), for
    bn_finalize (the pivot is x[0, c, 0, 0], read by both kernels from x itself)."""
    ext = _ext(x)
    n, _, h, w = x.shape
    return ext.batch_stats(x), ext.STATS_ROWS, n * h * w


def bn_finalize(c, acc, *, partials=None, x=None, mean=None, var=None, gamma=None, beta=None,
                running_mean=None, running_var=None, momentum=0.0, eps=1e-5, count=None, num_batches_tracked=None):
    """[5, C] (mean, var, invstd, scale, beta) in `acc`, one launch: from `partials` (x supplies the pivot;
    mean/var given too receive the merged moments) or from (mean, var); running buffers updated in
    place. Same contract as fused_resnet.triton.finalize.bn_finalize (num_batches_tracked: incremented by the
    same launch)."""
    like = partials[0] if partials is not None else mean
    ext = _ext(like)
    part, tile_rows, total = partials if partials is not None else (None, 1, 1)
    update = running_mean is not None
    unbiased = (count / (count - 1)) if update and count and count > 1 else float("inf")
    x_dtype = x.dtype if x is not None else acc
    from_partials = partials is not None
    out = ext.bn_finalize(part, tile_rows, total, x, None if from_partials else mean,
                          None if from_partials else var, mean if from_partials else None,
                          var if from_partials else None, gamma, beta, running_mean, running_var,
                          float(momentum), float(eps), float(unbiased), c, x_dtype, num_batches_tracked)
    return out


def moments(partials, acc, x=None):
    """(mean, biased var) per channel, separate tensors, merged from per-tile partials in one launch."""
    c = partials[0].shape[2]
    mean = torch.empty(c, dtype=acc, device=partials[0].device)
    var = torch.empty_like(mean)
    bn_finalize(c, acc, partials=partials, x=x, mean=mean, var=var)
    return mean, var


def channel_stats(x):
    """(mean, biased var) per channel of x [N, C, H, W], in float32 (float64 for float64 input): two
    launches, the tile partials and their merge."""
    return moments(stats_partials(x), _acc(x.dtype), x)


def conv_forward(x, weight, bias, mean, scale, beta, residual, y, stride, padding, dilation, out_stats=False,
                 relu=True):
    """y <- conv2d(relu((x - mean)*scale + beta), weight) + bias + residual, into the preallocated y
    (without relu: the batch norm alone).

    Returns per-channel (mean, biased var) of y when out_stats, else None.
    """
    ext = _ext(x)
    part, tile_rows = ext.conv_forward(x, weight, bias, mean, scale, beta, residual, y, list(stride),
                                       list(padding), list(dilation), bool(out_stats), _tf32(), bool(relu))
    return _out_stats(part, tile_rows, y, out_stats)


def _out_stats(part, tile_rows, y, out_stats):
    """y's statistics from the forward kernel's partials: None, (mean, var), or (out_stats="partials") the
    partials themselves, merged later by the finalize of the BN that reads y (_deferred.py)."""
    if not out_stats:
        return None
    partials = (part, tile_rows, y.shape[0] * y.shape[2] * y.shape[3])
    if out_stats == "partials":
        return partials
    return moments(partials, _acc(y.dtype))


def conv_forward_pair(x, weight, weight2, bias, bias2, mean, scale, beta, y, y2, stride, padding, dilation, stride2,
                      padding2, dilation2, out_stats=False, relu=True):
    """y <- conv2d(a, weight) + bias and y2 <- conv2d(a, weight2) + bias2 for one a = relu((x - mean)*scale + beta)
    (a projection block's conv1 and shortcut): ONE launch where the two output grids coincide (the blocks of a
    row tile, both convs' columns, read the same rows of x), else (and in fp64, which the pair kernel leaves out)
    the two convs' own launches. Returns y's per-channel (mean, biased var) when out_stats, else None."""
    ext = _ext(x)
    if tuple(y.shape[2:]) == tuple(y2.shape[2:]):
        part, tile_rows = ext.conv_forward_pair(x, weight, weight2, bias, bias2, mean, scale, beta, y, y2,
                                                list(stride), list(padding), list(dilation), list(stride2),
                                                list(padding2), list(dilation2), bool(out_stats), _tf32(), bool(relu))
    else:
        tile_rows = 0
    if tile_rows == 0:  # nothing launched
        conv_forward(x, weight2, bias2, mean, scale, beta, None, y2, stride2, padding2, dilation2, relu=relu)
        return conv_forward(x, weight, bias, mean, scale, beta, None, y, stride, padding, dilation,
                            out_stats=out_stats, relu=relu)
    return _out_stats(part, tile_rows, y, out_stats)


# The emulated build's stand-in SM count: small, so that split-K takes several chunks at test sizes.
EMULATED_SMS = 4


def _num_sms(device):
    if device.type == "cpu":
        return EMULATED_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wgrad_slabs(ext, grad_y, x, dw, mean, scale, beta, stride, padding, dilation, relu=True):
    """Split-K slabs [split, numel(dW)] in dW's layout, summed by column_sums."""
    n, c, _, _ = x.shape
    k, _, kh, kw = dw.shape
    pixels = n * grad_y.shape[2] * grad_y.shape[3]
    tile = ext.WGRAD_CHUNK  # a multiple of every wgrad kernel's pixel step
    blocks = -(-k // ext.TILE_M) * -(-c // ext.TILE_N) * kh * kw
    p_tiles = max(1, -(-pixels // tile))
    # Enough splits to give every SM two blocks, within the grid's z limit.
    split = max(1, min(p_tiles, -(-2 * _num_sms(x.device) // blocks), 65535 // (kh * kw)))
    chunk = -(-p_tiles // split) * tile
    split = max(1, -(-pixels // chunk))
    return ext.conv_wgrad(grad_y, x, dw, mean, scale, beta, list(stride), list(padding), list(dilation), chunk,
                          split, _tf32(), bool(relu))


def conv_backward(grad_y, x, weight, mean, scale, beta, invstd, gamma, batch_stats, needs, stride, padding,
                  dilation, sync=None, others=(), relu=True):
    """(dx, dW, dgamma, dbeta, [dW of each of `others`]), None where `needs` (dx, dW, dgamma, dbeta) says no;
    four launches at most for one consumer: dgrad (+ per-tile BN-backward sums), wgrad (split-K slabs), one
    column_sums for both, and with batch statistics the dx finish. dW in the weight's dtype and layout;
    dgamma/dbeta in the accumulation dtype. sync(s1, s2, count) -> (s1, s2, count) makes dx use
    process-group-wide sums (dgamma/dbeta stay local, as nn.SyncBatchNorm's do).
    others: more consumers of the same activation, (grad_y, weight, stride, padding, dilation, need_dW) each
    (a block's projection shortcut): their ga is summed into this one's before the ReLU mask (one raw
    dgrad each, into the buffer this conv's dgrad then finishes in place), so the BN backward runs once,
    as eager's does on the summed gradient; their dW costs a wgrad and a column_sums each."""
    ext = _ext(x)
    need_dx, need_dw, need_dg, need_db = needs
    batch_stats = batch_stats and need_dx
    need_sums = need_dg or need_db or batch_stats
    if len(others) <= 1 and sync is None:
        # the common cases, a layer and a projection block's conv1 + shortcut: all of it in one call into the
        # extension (issue 30)
        gy2, w2, stride2, padding2, dilation2, need_dw2 = others[0] if others else (None, None, (), (), (), False)
        dx, dw, s1, s2, dw2 = ext.conv_backward(
            grad_y, weight, x, mean, scale, beta, invstd, gamma, batch_stats, need_dx, need_dw, need_sums, list(stride),
            list(padding), list(dilation), _tf32(), bool(relu), _num_sms(x.device), gy2, w2, list(stride2),
            list(padding2), list(dilation2), bool(need_dw2))
        return dx, dw, (s2 if need_dg else None), (s1 if need_db else None), ([dw2] if others else [])
    acc = _acc(x.dtype)
    c = x.shape[1]
    mean, invstd = mean.contiguous(), invstd.contiguous()
    dx = out = part = None
    if need_dx or need_sums:
        dx = torch.empty_like(x, memory_format=memory_format_of(x))
        # gm (batch statistics) in x's dtype: eager's ReLU-backward output, half a float32 buffer's bytes
        out = torch.empty_like(x, memory_format=memory_format_of(x)) if batch_stats else dx
        addend = None
        for gy2, w2, stride2, padding2, dilation2, _ in others:
            ext.conv_dgrad(gy2, w2, x, mean, scale, beta, invstd, out, False, False, list(stride2),
                           list(padding2), list(dilation2), _tf32(), addend, True)
            addend = out
        # The dgrad reads beta for the ReLU mask only: +inf passes every element (identity activation)
        mask_beta = beta if relu else torch.full_like(beta, float("inf"))
        part = ext.conv_dgrad(grad_y, weight, x, mean, scale, mask_beta, invstd, out, batch_stats, need_sums,
                              list(stride), list(padding), list(dilation), _tf32(), addend, False)
    dw = slabs = None
    if need_dw:
        dw = torch.empty_like(weight, memory_format=memory_format_of(weight))
        slabs = _wgrad_slabs(ext, grad_y, x, dw, mean, scale, beta, stride, padding, dilation, relu)
    s1 = s2 = None
    if need_sums:
        s1 = torch.empty(c, dtype=acc, device=x.device)
        s2 = torch.empty_like(s1)
    ext.column_sums(part.view(part.shape[0], 2 * c) if need_sums else None, s1, s2, slabs, dw)
    other_dws = []
    for gy2, w2, stride2, padding2, dilation2, need_dw2 in others:
        dw2 = None
        if need_dw2:
            dw2 = torch.empty_like(w2, memory_format=memory_format_of(w2))
            ext.column_sums(None, None, None,
                            _wgrad_slabs(ext, gy2, x, dw2, mean, scale, beta, stride2, padding2, dilation2, relu),
                            dw2)
        other_dws.append(dw2)
    if batch_stats:
        m = x.numel() // c
        fs1, fs2, count = sync(s1, s2, m) if sync is not None else (s1, s2, m)
        g = gamma.to(acc).contiguous() if gamma is not None else None
        ext.bn_backward_finish(out, x, dx, mean, invstd, g, fs1.contiguous(), fs2.contiguous(), int(count))
    elif not need_dx:
        dx = None
    return dx, dw, (s2 if need_dg else None), (s1 if need_db else None), other_dws


def bn_add_relu_forward(z, mean, scale, beta, s, s_mean, s_scale, s_beta, y, relu=True):
    """y <- act(rnd((z - mean)*scale + beta) + t), t = rnd((s - s_mean)*s_scale + s_beta) when s_mean is not
    None, else t = s: the end of a post-activation block (relu(bn3(z) + shortcut)), one launch.

    z, s, y: [N, C, H, W] of one shape and dtype, any strides (channels_last fastest), y preallocated.
    mean/scale/beta/s_mean/s_scale/s_beta: [C] contiguous in the accumulation dtype (scale = invstd*gamma).
    rnd() rounds to z's dtype (each BN's output is stored in it, as eager's is); the affine is computed as
    written -- subtract, multiply, add, each rounded, no fused multiply-add -- so fp32/fp64 results are
    bitwise torch's (z - mean)*scale + beta; the add in the accumulation dtype, rounded to the dtype; act is
    torch.relu (NaN stays NaN) when relu, else the identity."""
    if s_mean is None:
        s_scale = s_beta = None
    _ext(z).bn_add_relu_forward(z, mean, scale, beta, s, s_mean, s_scale, s_beta, y, bool(relu))


def bn_add_relu_backward(g, z, mean, scale, beta, invstd, gamma, batch_stats,
                         s, s_mean, s_scale, s_beta, s_invstd, s_gamma, s_batch_stats,
                         need_dz, need_ds, need_sums, relu=True):
    """(dz or None, ds or None, sums or None) for bn_add_relu_forward, two launches at most: a reduction into
    per-row-group partials (only when sums are needed: need_sums, or dz/ds with batch statistics), then the
    elementwise pass, which first finishes the sums for its channels in a fixed order (deterministic, no
    atomics) and writes them, then dz / ds. No ATen op besides allocating the outputs.

    pre = rnd(rnd(bn(z)) + t) recomputed as the forward forms it; gm = g where relu's backward passes it
    (threshold_backward's rule, as eager: NOT pre <= 0, so NaN passes), 0 elsewhere; g itself without relu.
    sums [3, C] (acc): S1 = sum gm, S2 = sum gm*(z - mean)*invstd, S2s = sum gm*(s - s_mean)*s_invstd (0 for
    the identity shortcut) over N, H, W: dbeta = S1, dgamma = S2, s_dbeta = S1, s_dgamma = S2s.
    dz: batch_stats: invstd*gamma*(gm - S1/M - xhat*S2/M) (gamma None -> 1), else gm*scale; in z's dtype and
    memory format. ds: gm for the identity shortcut (s_mean None), else as dz with the s statistics and S2s
    (s_batch_stats); in s's memory format."""
    acc = _acc(z.dtype)
    c = z.shape[1]
    bn_s = s_mean is not None
    if not bn_s:
        s_scale = s_beta = s_invstd = s_gamma = None
    dz_batch = bool(need_dz and batch_stats)
    ds_batch = bool(need_ds and bn_s and s_batch_stats)
    reduce = bool(need_sums or dz_batch or ds_batch)
    dz = torch.empty_like(z, memory_format=memory_format_of(z)) if need_dz else None
    ds = torch.empty_like(s, memory_format=memory_format_of(s)) if need_ds else None
    sums = None
    if need_sums:
        # No rows: every sum is 0 (the kernels do not run on an empty tensor).
        sums = (torch.zeros if z.numel() == 0 else torch.empty)((3, c), dtype=acc, device=z.device)
    if dz is not None or ds is not None or sums is not None:
        _ext(z).bn_add_relu_backward(g, z, mean, scale, beta, invstd, gamma, s, s_mean, s_scale, s_beta,
                                     s_invstd, s_gamma, dz, dz_batch, ds, ds_batch, sums, reduce, bool(relu))
    return dz, ds, sums
