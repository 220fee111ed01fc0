"""The fused op registered with torch.library, with fake implementations and autograd.

The ops, one name family:
  fused_resnet::batch_stats                 per-channel (mean, biased var) of x
  fused_resnet::bn_finalize                 [5, C] BN finalize (+ running-buffer update) for the kernels
  fused_resnet::bn_relu_conv2d              y = conv(act(x*scale+shift)) + bias + residual [+ stats of y];
                                            act is ReLU, or the identity with relu=False (BN -> conv)
  fused_resnet::bn_relu_conv2d_pair         (y, y2): two convs of one relu(bn(x)) (a projection block's
                                            conv1 and shortcut), one autograd node
  fused_resnet::bn_relu_conv2d_backward     (dx, dW, dgamma, dbeta[, dW2]) from dL/dy (and dL/dy2),
                                            recomputing relu(bn(x))

The BN statistics enter the conv op as detached inputs with a flag `batch_stats` saying whether they
are x's own batch statistics; its backward then applies the full BN-backward formula, so the
statistics need no autograd node of their own and the op stays a plain functional (non-mutating) op
that torch.compile treats as one opaque node. Running-buffer updates happen outside, in functional.py.

Each op takes a `backend` string ("reference", "triton" or "cuda") and runs that implementation.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

from . import _deferred, _sync
from ._layout import memory_format_of

# out_stats value of the eager path's chained layers: the statistics partials are handed to the next BN's
# finalize instead of merged here (_deferred.py). Never reaches a registered op (functional.py decides).
DEFER = "defer"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _affine(mean, invstd, gamma, beta):
    """Per-channel scale/shift so that bn(x) = x*scale + shift (accumulation dtype)."""
    scale = invstd * gamma.to(invstd.dtype) if gamma is not None else invstd.clone()
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(invstd.dtype)
    return scale.contiguous(), shift.contiguous()


def _empty(like):
    return like.new_empty((0,))


# A BN's prologue (scale, beta) comes as the finalize kernel's [2, C] rows when traced (the registered ops' schema),
# and on the eager path as the pair of rows (scale, beta), split once by the caller: each tensor view is a
# dispatcher call (~1 us), and every launcher and the backward want the rows apart.
def _pack_prologue(prologue):
    """The three saved-tensor slots of a prologue (save_for_backward takes tensors, not a pair)."""
    if prologue is None or isinstance(prologue, Tensor):
        return prologue, None, None
    return None, prologue[0], prologue[1]


def _unpack_prologue(whole, scale, beta):
    return whole if scale is None else (scale, beta)


# ---------------------------------------------------------------- reference implementations
# Plain PyTorch, used for CPU tensors and where Triton cannot run. Padding is applied explicitly so
# that asymmetric ("same") padding and any requested output size are honoured exactly.

def _pad_for(h, w, weight, stride, padding, dilation, out_size):
    kh, kw = weight.shape[2], weight.shape[3]
    need_h = (out_size[0] - 1) * stride[0] + dilation[0] * (kh - 1) + 1
    need_w = (out_size[1] - 1) * stride[1] + dilation[1] * (kw - 1) + 1
    return (padding[1], need_w - w - padding[1], padding[0], need_h - h - padding[0])


def _ref_conv(a, weight, stride, padding, dilation, out_size, groups):
    a = F.pad(a, _pad_for(a.shape[2], a.shape[3], weight, stride, padding, dilation, out_size))
    return F.conv2d(a, weight, None, stride, 0, dilation, groups)


def _ref_preact(x, mean, invstd, gamma, beta, relu=True):
    c = x.shape[1]
    scale, shift = _affine(mean, invstd, gamma, beta)
    a = x.to(scale.dtype) * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
    return (torch.relu(a) if relu else a).to(x.dtype)


def _ref_forward(x, weight, bias, gamma, beta, mean, invstd, residual, stride, padding, dilation,
                 out_size, groups, relu=True):
    y = _ref_conv(_ref_preact(x, mean, invstd, gamma, beta, relu), weight, stride, padding, dilation,
                  out_size, groups)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return y


def _ref_conv_grads(grad_y, a, weight, stride, padding, dilation, groups, need_ga, need_dw):
    """(ga, dW) of conv(a) (None where not needed), the padding applied explicitly as in forward."""
    pads = _pad_for(a.shape[2], a.shape[3], weight, stride, padding, dilation, grad_y.shape[2:])
    ga, dw, _ = torch.ops.aten.convolution_backward(
        grad_y, F.pad(a, pads), weight, None, list(stride), [0, 0], list(dilation), False, [0, 0], groups,
        [need_ga, need_dw, False])
    if need_ga:
        ga = F.pad(ga, [-p for p in pads])  # adjoint of the padding: crop what was padded
    return ga, (dw if need_dw else None)


def _ref_backward(grad_y, x, weight, gamma, beta, mean, invstd, batch_stats, eps, stride, padding,
                  dilation, groups, needs, sync=None, others=(), relu=True):
    """The DESIGN.md backward formulas in PyTorch ops, recomputing a from x (a is never stored).

    Autograd is off inside a custom op's implementation, so this spells the math out: conv backward
    (aten.convolution_backward) for ga and dW, then the ReLU mask and BN backward by hand. others: more
    convs of the same a, (grad_y, weight, stride, padding, dilation, need_dW) each, their ga added to
    this one's (in x's dtype, as eager's autograd sums them) before the mask. Returns (dx, dW, dgamma,
    dbeta, [dW of each of others]).
    """
    acc = _acc(x.dtype)
    c = x.shape[1]
    need_dx, need_dw, need_dg, need_db = needs
    scale, shift = _affine(mean, invstd, gamma, beta)
    xf = x.to(acc)
    pre = xf * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
    a = (torch.relu(pre) if relu else pre).to(x.dtype)
    need_ga = need_dx or need_dg or need_db
    ga, dw = _ref_conv_grads(grad_y, a, weight, stride, padding, dilation, groups, need_ga, need_dw)
    other_dws = []
    for gy2, w2, stride2, padding2, dilation2, need_dw2 in others:
        ga2, dw2 = _ref_conv_grads(gy2, a, w2, stride2, padding2, dilation2, 1, need_ga, need_dw2)
        ga = ga + ga2 if need_ga else None
        other_dws.append(dw2)
    dx = dgamma = dbeta = None
    if need_ga:
        gm = ga.to(acc) * (pre > 0) if relu else ga.to(acc)
        xhat = (xf - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
        s1 = gm.sum((0, 2, 3))
        s2 = (gm * xhat).sum((0, 2, 3))
        dgamma = s2 if need_dg else None
        dbeta = s1 if need_db else None
        if need_dx:
            if batch_stats:
                m = x.numel() // c
                if sync is not None:  # the process group's sums and count; dgamma/dbeta stay local
                    s1, s2, m = sync(s1, s2, m)
                k = invstd * gamma.to(acc) if gamma is not None else invstd
                dx = k.view(1, c, 1, 1) * (gm - (s1 / m).view(1, c, 1, 1) - xhat * (s2 / m).view(1, c, 1, 1))
            else:
                dx = gm * scale.view(1, c, 1, 1)
    return dx, dw, dgamma, dbeta, other_dws


# ---------------------------------------------------------------- kernel backends (triton, cuda)
# Both expose the same launchers (channel_stats, conv_forward, conv_dgrad_bn, conv_wgrad), so one
# glue path serves both; `kb` is the backend's launcher module.

_KB: dict = {}  # backend name -> its launcher module, once imported


def _kernels(backend: str):
    kb = _KB.get(backend)
    if kb is not None:
        return kb
    # Imported lazily: importing fused_resnet must need neither triton nor the compiled extension.
    if backend == "cuda":
        from . import cuda as kb
    else:
        from . import triton as kb
    _KB[backend] = kb
    return kb


def _bn_prologue(mean, invstd, gamma, beta):
    """Per-channel (scale, beta) so that bn(x) = (x - mean)*scale + beta (accumulation dtype). The
    kernels subtract the mean before scaling, as eager does: a constant channel then gives exactly
    beta, where x*scale + shift keeps a rounding residual that flips the ReLU mask."""
    scale = invstd * gamma.to(invstd.dtype) if gamma is not None else invstd
    beta = beta.to(invstd.dtype) if beta is not None else torch.zeros_like(invstd)
    return scale.contiguous(), beta.contiguous()


def _kernel_forward(kb, x, weight, bias, gamma, beta, mean, invstd, residual, stride, padding, dilation,
                    out_size, out_stats, prologue=None, relu=True):
    scale, beta = prologue if prologue is not None else _bn_prologue(mean, invstd, gamma, beta)
    y = _output(x, weight.shape[0], out_size)
    stats = kb.conv_forward(x, weight, bias, mean, scale, beta, residual, y, stride, padding, dilation,
                            out_stats=_launcher_stats(out_stats), relu=relu)
    return y, _stats_of(stats, out_stats, weight.shape[0], x)


def _output(x, k, out_size):
    """An uninitialized conv output [N, k, *out_size] in x's dtype, device and memory format (memory_format_of): the
    strides torch.empty(..., memory_format=) gives, by x.new_empty_strided (~1 us less a call)."""
    oh, ow = out_size
    if memory_format_of(x) is torch.channels_last:
        return x.new_empty_strided((x.shape[0], k, oh, ow), (oh * ow * k, 1, ow * k, k))
    return x.new_empty_strided((x.shape[0], k, oh, ow), (k * oh * ow, oh * ow, ow, 1))


def _launcher_stats(out_stats):
    return "partials" if out_stats == DEFER else out_stats


def _stats_of(stats, out_stats, k, x):
    """A launcher's statistics as the op returns them: when deferred (the eager path's chains), empty
    (mean, var) tensors with the partials stashed for the next BN's finalize to merge (_deferred.py)."""
    if out_stats != DEFER or stats is None:
        return stats
    m, v = (torch.empty(k, dtype=_acc(x.dtype), device=x.device) for _ in range(2))
    _deferred.stash(m, stats)
    return m, v


def _kernel_forward_pair(kb, x, weight, bias, weight2, bias2, gamma, beta, mean, invstd, stride, padding, dilation,
                         out_size, stride2, padding2, dilation2, out_size2, out_stats, prologue=None, relu=True):
    """(y, y2, mean_y, var_y) of the pair op from ONE conv launch (bn_relu_conv2d_pair)."""
    scale, beta = prologue if prologue is not None else _bn_prologue(mean, invstd, gamma, beta)
    y = _output(x, weight.shape[0], out_size)
    y2 = _output(x, weight2.shape[0], out_size2)
    stats = kb.conv_forward_pair(x, weight, weight2, bias, bias2, mean, scale, beta, y, y2, stride, padding, dilation,
                                 stride2, padding2, dilation2, out_stats=_launcher_stats(out_stats), relu=relu)
    stats = _stats_of(stats, out_stats, weight.shape[0], x)
    if stats is None:
        return y, y2, _empty(mean), _empty(mean)
    return y, y2, stats[0], stats[1]


# ---------------------------------------------------------------- the registered ops

def _batch_stats_impl(x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of x over N, H, W, in float32 (float64 for float64 x)."""
    if backend in ("triton", "cuda"):
        return _kernels(backend).channel_stats(x)
    xf = x.to(_acc(x.dtype))
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
    # Welford's mean is exact for a constant channel (eager's zeros after BN depend on it) but turns
    # an inf into NaN, where eager's BatchNorm gives an inf mean (and running_mean): take the plain
    # mean there.
    plain = xf.mean(dim=(0, 2, 3))
    return torch.where(mean.isnan() & plain.isinf(), plain, mean), var


batch_stats_op = torch.library.custom_op("fused_resnet::batch_stats", _batch_stats_impl, mutates_args=())


@batch_stats_op.register_fake
def _(x, backend):
    c = x.shape[1]
    return x.new_empty((c,), dtype=_acc(x.dtype)), x.new_empty((c,), dtype=_acc(x.dtype))


def _bn_finalize_impl(
    x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
    from_x: bool, momentum: float, eps: float, count: int, backend: str,
) -> Tensor:
    """[5, C] (mean, var, invstd, scale, beta) of the BN before a fused conv, in the accumulation
    dtype: from x's own batch statistics (from_x) or from (mean, var); given running buffers, updates
    them in place (nn.BatchNorm2d's EMA, unbiased variance with `count`). Triton and CUDA: one or two
    launches (statistics partials, then one finalize kernel)."""
    return _finalize(_kernels(backend), x, mean, var, bn_weight, bn_bias, running_mean, running_var, from_x, momentum,
                     eps, count)


def _finalize(kb, x, mean, var, bn_weight, bn_bias, running_mean, running_var, from_x, momentum, eps, count,
              num_batches_tracked=None):
    """_bn_finalize_impl's launches; the eager path also hands over the BN's num_batches_tracked, which the
    finalize then counts in the same launch (the registered op leaves counting to its caller)."""
    partials = kb.stats_partials(x) if from_x else None
    return kb.bn_finalize(x.shape[1], _acc(x.dtype), partials=partials, x=x if from_x else None,
                          mean=None if from_x else mean, var=None if from_x else var, gamma=bn_weight, beta=bn_bias,
                          running_mean=running_mean, running_var=running_var, momentum=momentum, eps=eps, count=count,
                          num_batches_tracked=num_batches_tracked)


bn_finalize_op = torch.library.custom_op("fused_resnet::bn_finalize", _bn_finalize_impl,
                                        mutates_args=("running_mean", "running_var"))


@bn_finalize_op.register_fake
def _(x, mean, var, bn_weight, bn_bias, running_mean, running_var, from_x, momentum, eps, count, backend):
    return x.new_empty((5, x.shape[1]), dtype=_acc(x.dtype))


def _conv_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, residual: Optional[Tensor],
    batch_stats: bool, eps: float, stride: List[int], padding: List[int], dilation: List[int],
    out_size: List[int], groups: int, out_stats: bool, backend: str, sync_group: int = 0,
    prologue: Optional[Tensor] = None, relu: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean_y, var_y); the last two are per-channel statistics of y when out_stats,
    else empty. They are for the next BN's forward and carry no gradient. prologue: [2, C] (scale,
    beta) of the BN affine when already computed (bn_finalize), else derived from the arguments."""
    y, stats = _conv_run(x, weight, bias, bn_weight, bn_bias, mean, invstd, residual, batch_stats, eps, stride, padding,
                         dilation, out_size, groups, out_stats, backend, sync_group, prologue, relu)
    if stats is None:
        return y, _empty(mean), _empty(mean)
    return y, stats[0], stats[1]


def _conv_run(x, weight, bias, bn_weight, bn_bias, mean, invstd, residual, batch_stats, eps, stride, padding, dilation,
              out_size, groups, out_stats, backend, sync_group=0, prologue=None, relu=True):
    """_conv_impl's (y, (mean_y, var_y) or None): the eager path takes it without the empty placeholders."""
    if backend in ("triton", "cuda"):
        return _kernel_forward(_kernels(backend), x, weight, bias, bn_weight, bn_bias, mean, invstd, residual,
                               stride, padding, dilation, out_size, out_stats, prologue, relu)
    y = _ref_forward(x, weight, bias, bn_weight, bn_bias, mean, invstd, residual, stride,
                     padding, dilation, out_size, groups, relu)
    y = y.contiguous(memory_format=memory_format_of(x))
    if not out_stats:
        return y, None
    var, mu = torch.var_mean(y.to(_acc(y.dtype)), dim=(0, 2, 3), unbiased=False)
    return y, (mu, var)


bn_relu_conv2d_op = torch.library.custom_op("fused_resnet::bn_relu_conv2d", _conv_impl, mutates_args=())


@bn_relu_conv2d_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, mean, invstd, residual, batch_stats, eps, stride, padding,
      dilation, out_size, groups, out_stats, backend, sync_group=0, prologue=None, relu=True):
    y = torch.empty((x.shape[0], weight.shape[0], *out_size), dtype=x.dtype, device=x.device,
                    memory_format=memory_format_of(x))
    k = weight.shape[0] if out_stats else 0
    return y, mean.new_empty((k,)), mean.new_empty((k,))


def _conv_backward_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    mean: Tensor, invstd: Tensor, batch_stats: bool, eps: float, stride: List[int], padding: List[int],
    dilation: List[int], groups: int, needs: List[bool], backend: str, sync_group: int = 0,
    prologue: Optional[Tensor] = None, grad_y2: Optional[Tensor] = None, weight2: Optional[Tensor] = None,
    stride2: Optional[List[int]] = None, padding2: Optional[List[int]] = None, dilation2: Optional[List[int]] = None,
    relu: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW, dgamma, dbeta, dW2); an entry whose `needs` flag (the first four; a fifth for dW2) is False
    comes back empty. sync_group (an id from _sync.group_id): dx uses the process group's BN-backward sums.
    grad_y2/weight2/stride2/padding2/dilation2: a second conv (groups 1) of the same relu(bn(x)) -- a
    projection block's shortcut -- whose gradient joins this one's before the ReLU mask, so the BN backward
    runs once (the bn_relu_conv2d_pair op's backward)."""
    grads = _conv_grads(grad_y, x, weight, bn_weight, bn_bias, mean, invstd, batch_stats, eps, stride, padding,
                        dilation, groups, needs, backend, sync_group, prologue, grad_y2, weight2, stride2, padding2,
                        dilation2, relu)
    return tuple(_empty(x) if g is None else g for g in grads)


def _conv_grads(grad_y, x, weight, bn_weight, bn_bias, mean, invstd, batch_stats, eps, stride, padding, dilation,
                groups, needs, backend, sync_group=0, prologue=None, grad_y2=None, weight2=None, stride2=None,
                padding2=None, dilation2=None, relu=True):
    """_conv_backward_impl's gradients, None where not needed (the eager path takes them so)."""
    n = len(needs)
    need_w2 = needs[4] if n > 4 else False
    sync = _sync.sum_reducer(sync_group) if (sync_group and batch_stats and needs[0]) else None
    needs = [needs[0], needs[1], needs[2] and bn_weight is not None, needs[3] and bn_bias is not None]
    others = () if weight2 is None else ((grad_y2, weight2, stride2, padding2, dilation2, need_w2),)
    if backend in ("triton", "cuda"):
        scale, beta = prologue if prologue is not None else _bn_prologue(mean, invstd, bn_weight, bn_bias)
        # Every reduction finishes in the backend's kernels: four launches at most (plus three per other
        # consumer: raw dgrad, wgrad, its column sums), no ATen tail.
        grads = _kernels(backend).conv_backward(grad_y, x, weight, mean, scale, beta, invstd, bn_weight, batch_stats,
                                                needs, stride, padding, dilation, sync=sync, others=others, relu=relu)
    else:
        grads = _ref_backward(grad_y, x, weight, bn_weight, bn_bias, mean, invstd, batch_stats, eps,
                              stride, padding, dilation, groups, needs, sync, others, relu)
    dx, dw, dg, db = grads[0], grads[1], grads[2], grads[3]
    dw2 = grads[4][0] if others else None
    # each in its input's dtype and layout
    return (None if dx is None else _like(dx, x), None if dw is None else _like(dw, weight),
            None if dg is None else _like(dg, bn_weight), None if db is None else _like(db, bn_bias),
            None if dw2 is None else _like(dw2, weight2))


def _like(g, ref):
    """A gradient in its input's dtype and (dense) layout."""
    if g.dtype != ref.dtype:
        g = g.to(ref.dtype)
    if g.dim() != 4:
        return g if g.is_contiguous() else g.contiguous()
    if g.stride() != ref.stride():  # equal strides (same shape): already ref's (dense) layout
        g = g.contiguous(memory_format=memory_format_of(ref))
    return g


bn_relu_conv2d_backward_op = torch.library.custom_op("fused_resnet::bn_relu_conv2d_backward", _conv_backward_impl,
                                                     mutates_args=())


@bn_relu_conv2d_backward_op.register_fake
def _(grad_y, x, weight, bn_weight, bn_bias, mean, invstd, batch_stats, eps, stride, padding, dilation,
      groups, needs, backend, sync_group=0, prologue=None, grad_y2=None, weight2=None, stride2=None, padding2=None,
      dilation2=None, relu=True):
    def like(t, need):
        if not need or t is None:
            return x.new_empty((0,))
        return torch.empty_like(t, memory_format=memory_format_of(t)) if t.dim() == 4 else torch.empty_like(t)

    needs = list(needs) + [False] * (5 - len(needs))
    return (like(x, needs[0]), like(weight, needs[1]), like(bn_weight, needs[2]), like(bn_bias, needs[3]),
            like(weight2, needs[4]))


def _pair_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], weight2: Tensor, bias2: Optional[Tensor],
    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, batch_stats: bool,
    eps: float, stride: List[int], padding: List[int], dilation: List[int], out_size: List[int],
    stride2: List[int], padding2: List[int], dilation2: List[int], out_size2: List[int], out_stats: bool,
    backend: str, sync_group: int = 0, prologue: Optional[Tensor] = None, relu: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two convs (groups 1, no residual) of one relu(bn(x)): (y, y2, mean_y, var_y), the statistics of y
    as bn_relu_conv2d's. A projection block's conv1 and shortcut: one autograd node, so the backward sums
    the two convs' gradients before the ReLU mask and runs the BN backward once, as eager does.
    A kernel backend with `conv_forward_pair` runs both convs in one launch (x read once, the BN prologue
    applied once per tile); otherwise two conv launches share the finalized BN."""
    if backend in ("triton", "cuda"):
        kb = _kernels(backend)
        if hasattr(kb, "conv_forward_pair"):
            return _kernel_forward_pair(kb, x, weight, bias, weight2, bias2, bn_weight, bn_bias, mean, invstd,
                                        stride, padding, dilation, out_size, stride2, padding2, dilation2,
                                        out_size2, out_stats, prologue, relu)
    y, mean_y, var_y = _conv_impl(x, weight, bias, bn_weight, bn_bias, mean, invstd, None, batch_stats, eps,
                                  stride, padding, dilation, out_size, 1, out_stats, backend, sync_group, prologue,
                                  relu)
    y2, _, _ = _conv_impl(x, weight2, bias2, bn_weight, bn_bias, mean, invstd, None, batch_stats, eps, stride2,
                          padding2, dilation2, out_size2, 1, False, backend, sync_group, prologue, relu)
    return y, y2, mean_y, var_y


bn_relu_conv2d_pair_op = torch.library.custom_op("fused_resnet::bn_relu_conv2d_pair", _pair_impl, mutates_args=())


@bn_relu_conv2d_pair_op.register_fake
def _(x, weight, bias, weight2, bias2, bn_weight, bn_bias, mean, invstd, batch_stats, eps, stride, padding,
      dilation, out_size, stride2, padding2, dilation2, out_size2, out_stats, backend, sync_group=0, prologue=None,
      relu=True):
    fmt = memory_format_of(x)
    y = torch.empty((x.shape[0], weight.shape[0], *out_size), dtype=x.dtype, device=x.device, memory_format=fmt)
    y2 = torch.empty((x.shape[0], weight2.shape[0], *out_size2), dtype=x.dtype, device=x.device, memory_format=fmt)
    k = weight.shape[0] if out_stats else 0
    return y, y2, mean.new_empty((k,)), mean.new_empty((k,))


# ---------------------------------------------------------------- autograd

def _with_defaults(args):
    """The conv op's 20 arguments, with the trailing defaults (sync_group, prologue, relu) a caller left out."""
    return args if len(args) == 20 else tuple(args) + (0, None, True)[len(args) - 17:]


def _save_conv(ctx, args):
    """What the conv op's backward needs, kept on ctx from its 20 arguments: the registered op's setup_context and the
    eager node's forward both go through here."""
    (x, weight, bias, bn_weight, bn_bias, mean, invstd, residual, batch_stats, eps, stride, padding,
     dilation, out_size, groups, out_stats, backend, sync_group, prologue, relu) = args
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, invstd, *_pack_prologue(prologue))
    ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: no zeros to make for them
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.conv = (batch_stats, eps, stride, padding, dilation, groups, backend, sync_group, relu)


def _setup_context(ctx, inputs, output):
    args = _with_defaults(inputs)
    # the geometry as lists: the backward op's schema (List[int]) takes it from ctx.conv
    _save_conv(ctx, (*args[:10], list(args[10]), list(args[11]), list(args[12]), *args[13:]))


def _conv_node_grads(ctx, grad_y, need_x, need_w, need_bias, need_g, need_b, direct):
    """(dx, dW, dbias, dgamma, dbeta) from what _save_conv kept, None where not needed: the registered op's backward
    through the backward op (which gives empty tensors where not needed), the eager node's directly (_conv_grads)."""
    dx = dw = dgamma = dbeta = None
    if need_x or need_w or need_g or need_b:
        needs = [bool(need_x), bool(need_w), bool(need_g), bool(need_b)]
        x, weight, bn_weight, bn_bias, mean, invstd, *pro = ctx.saved_tensors
        batch_stats, eps, stride, padding, dilation, groups, backend, sync_group, relu = ctx.conv
        grads = (_conv_grads if direct else bn_relu_conv2d_backward_op)(
            grad_y, x, weight, bn_weight, bn_bias, mean, invstd, batch_stats, eps, stride, padding, dilation, groups,
            needs, backend, sync_group, _unpack_prologue(*pro), relu=relu)
        dx, dw, dgamma, dbeta = grads[:4] if direct else (g if need else None for g, need in zip(grads, needs))
    # a gradient asked for implies its input was given (a None input needs none): no other check needed
    dbias = _bias_grad(grad_y, ctx.bias_dtype) if need_bias else None
    return dx, dw, dbias, dgamma, dbeta


def _backward(ctx, grad_y, grad_mean, grad_var):
    if grad_y is None:  # only the (gradient-free) statistics outputs were used
        return (None,) * 20
    ni = ctx.needs_input_grad
    dx, dw, dbias, dgamma, dbeta = _conv_node_grads(ctx, grad_y, ni[0], ni[1], ni[2], ni[3], ni[4], False)
    return (dx, dw, dbias, dgamma, dbeta, None, None, grad_y if ni[7] else None) + (None,) * 12


def _bias_grad(grad_y, dtype):
    return grad_y.sum((0, 2, 3), dtype=_acc(grad_y.dtype)).to(dtype)


torch.library.register_autograd("fused_resnet::bn_relu_conv2d", _backward, setup_context=_setup_context)

_PAIR_ARGS = 24


def _pair_setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + (0, None, True)[len(inputs) - (_PAIR_ARGS - 3):]  # trailing defaults left out
    (x, weight, bias, weight2, bias2, bn_weight, bn_bias, mean, invstd, batch_stats, eps, stride, padding,
     dilation, out_size, stride2, padding2, dilation2, out_size2, out_stats, backend, sync_group, prologue,
     relu) = inputs
    ctx.save_for_backward(x, weight, weight2, bn_weight, bn_bias, mean, invstd, *_pack_prologue(prologue))
    ctx.set_materialize_grads(False)
    ctx.bias_dtypes = (bias.dtype if bias is not None else None, bias2.dtype if bias2 is not None else None)
    ctx.conv = (batch_stats, eps, list(stride), list(padding), list(dilation), list(stride2), list(padding2),
                list(dilation2), backend, sync_group, relu)
    ctx.out_sizes = (list(out_size), list(out_size2))


def _pair_backward(ctx, grad_y, grad_y2, grad_mean, grad_var, direct=False, ni=None):
    """Both convs' gradients into one backward op: their ga summed before the ReLU mask, one BN backward.
    ni: needs_input_grad in the op's argument order."""
    if grad_y is None and grad_y2 is None:
        return (None,) * _PAIR_ARGS
    x, weight, weight2, bn_weight, bn_bias, mean, invstd, *pro = ctx.saved_tensors
    prologue = _unpack_prologue(*pro)
    batch_stats, eps, stride, padding, dilation, stride2, padding2, dilation2, backend, sync_group, relu = ctx.conv
    # An unused output's gradient is zero: made here, as autograd would have (materialize_grads is off for
    # the statistics outputs).
    grad_y, grad_y2 = (g if g is not None else
                       x.new_zeros((x.shape[0], w.shape[0], *size)).contiguous(memory_format=memory_format_of(x))
                       for g, w, size in ((grad_y, weight, ctx.out_sizes[0]), (grad_y2, weight2, ctx.out_sizes[1])))
    ni = ctx.needs_input_grad if ni is None else ni
    needs = [bool(ni[0]), bool(ni[1]), bool(ni[5]), bool(ni[6]), bool(ni[3])]
    dx = dw = dw2 = dgamma = dbeta = None
    if any(needs):
        grads = (_conv_grads if direct else bn_relu_conv2d_backward_op)(
            grad_y, x, weight, bn_weight, bn_bias, mean, invstd, batch_stats, eps, stride, padding, dilation, 1,
            needs, backend, sync_group, prologue, grad_y2, weight2, stride2, padding2, dilation2, relu)
        dx, dw, dgamma, dbeta, dw2 = (g if need else None for g, need in zip(grads, needs))
        if bn_weight is None:
            dgamma = None
        if bn_bias is None:
            dbeta = None
    db, db2 = ctx.bias_dtypes
    dbias = _bias_grad(grad_y, db) if (db is not None and ni[2]) else None
    dbias2 = _bias_grad(grad_y2, db2) if (db2 is not None and ni[4]) else None
    return (dx, dw, dbias, dw2, dbias2, dgamma, dbeta) + (None,) * (_PAIR_ARGS - 7)


torch.library.register_autograd("fused_resnet::bn_relu_conv2d_pair", _pair_backward, setup_context=_pair_setup_context)


# ---------------------------------------------------------------- eager fast path
# The registered ops are what torch.compile and opcheck see. Outside compilation the same
# implementations run directly (and the conv through a plain autograd.Function with the same context
# and backward): torch.library's per-call Python dispatch cost several times eager's whole layer
# (benchmarks/NOTES.md, host overhead), for no difference in what runs.

def _traced(x) -> bool:
    """Under torch.compile, or traced with fake/functional tensors (aot_autograd, export, opcheck):
    the registered op must be what runs."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _traced_or_direct(op, impl, x):
    return op if _traced(x) else impl


_C_APPLY = getattr(torch._C, "_FunctionBase", None) and torch._C._FunctionBase.__dict__.get("apply")
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _applier(cls):
    """cls.apply without autograd.Function.apply's Python layer where no functorch transform is active: that layer
    (a setup_context probe, functorch's dead-wrapper unwrapping of each argument; ~3 us a call, issue 30) then
    hands the same arguments to the same C++ apply. The launchers read the tensors of the op's argument tuple,
    which that layer never unwrapped either. Under a transform (vmap, grad, ...) cls.apply runs as it is."""
    if _C_APPLY is None or _functorch_active is None:
        return cls.apply
    fast = _C_APPLY.__get__(None, cls)

    def apply(*args):
        if _functorch_active():
            return cls.apply(*args)
        return fast(*args)
    return apply


class _FusedConv(torch.autograd.Function):
    """The conv op's node on the eager path. Function.apply checks and unwraps each of its arguments (microseconds
    for the op's 20), so only the differentiable tensors are apply's own arguments and the op's whole argument
    tuple comes as one; y alone comes back when no statistics were asked for (no empty placeholders to make)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, args):
        args = _with_defaults(args)
        y, stats = _conv_run(*args)
        _save_conv(ctx, args)
        if stats is None:
            return y
        ctx.mark_non_differentiable(*stats)
        return y, stats[0], stats[1]

    @staticmethod
    def backward(ctx, grad_y, *stats_grads):
        if grad_y is None:  # only the (gradient-free) statistics outputs were used
            return None, None, None, None, None, None, None
        n = ctx.needs_input_grad  # apply's order: x, weight, bias, bn_weight, bn_bias, residual, args
        dx, dw, dbias, dgamma, dbeta = _conv_node_grads(ctx, grad_y, n[0], n[1], n[2], n[3], n[4], True)
        return dx, dw, dbias, dgamma, dbeta, (grad_y if n[5] else None), None


_fused_conv_apply = _applier(_FusedConv)


def batch_stats(x, backend):
    return _traced_or_direct(batch_stats_op, _batch_stats_impl, x)(x, backend)


def bn_finalize(*args):
    return _traced_or_direct(bn_finalize_op, _bn_finalize_impl, args[0])(*args)


def _needs_autograd(*tensors) -> bool:
    """Whether an autograd node is needed: grad mode on and some differentiable input requires grad. Without
    one (inference, no_grad) the implementation runs directly: the same outputs, none requiring grad, as
    autograd.Function.apply would give, without its ~10 us. Under forward-mode AD (a dual level: tangents need
    no requires_grad) or a functorch transform the node's path runs, and it says what it does not support
    (the direct path would drop the batch statistics' tangents without a word)."""
    if _forward_ad._current_level >= 0 or (_functorch_active is not None and _functorch_active()):
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def bn_relu_conv2d(*args):
    """The fused conv op: the registered op when traced, else the same code directly ((y, None, None) when no
    statistics were asked for, where the registered op gives empty tensors)."""
    if _traced(args[0]):
        return bn_relu_conv2d_op(*args)
    return eager_conv(args)


def eager_conv(args):
    """bn_relu_conv2d's untraced half: the op's arguments as one tuple."""
    # differentiable inputs: x, weight, bias, bn_weight, bn_bias, residual
    if not _needs_autograd(args[0], args[1], args[2], args[3], args[4], args[7]):
        y, stats = _conv_run(*args)
    else:
        out = _fused_conv_apply(args[0], args[1], args[2], args[3], args[4], args[7], args)
        if type(out) is not tuple:
            return out, None, None
        return out
    return (y, None, None) if stats is None else (y, stats[0], stats[1])


class _FusedConvPair(torch.autograd.Function):
    """The pair op's node on the eager path, arguments as _FusedConv's."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight2, bias2, bn_weight, bn_bias, args):
        out = _pair_impl(*args)
        _pair_setup_context(ctx, args, out)
        ctx.mark_non_differentiable(out[2], out[3])
        return out

    @staticmethod
    def backward(ctx, grad_y, grad_y2, grad_mean, grad_var):
        g = _pair_backward(ctx, grad_y, grad_y2, None, None, direct=True, ni=ctx.needs_input_grad)
        return g[0], g[1], g[2], g[3], g[4], g[5], g[6], None


_fused_pair_apply = _applier(_FusedConvPair)


def bn_relu_conv2d_pair(*args):
    """The fused pair op (two convs of one BN+ReLU): the registered op when traced, else the same code."""
    if _traced(args[0]):
        return bn_relu_conv2d_pair_op(*args)
    return eager_pair(args)


def eager_pair(args):
    """bn_relu_conv2d_pair's untraced half: the op's arguments as one tuple."""
    # differentiable inputs: x, weight, bias, weight2, bias2, bn_weight, bn_bias
    if not _needs_autograd(*args[:7]):
        return _pair_impl(*args)
    return _fused_pair_apply(*args[:7], args)
