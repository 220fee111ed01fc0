"""fused_resnet::bn_add_relu, the end of a post-activation block, registered like the conv ops (_ops.py).

  fused_resnet::bn_add_relu            y = act(bn(z) + t), t = s or bn_s(s)   (torchvision's
                                       relu(bn3(conv3(.)) + shortcut), the shortcut bn_d(conv_d(x)) or x)
  fused_resnet::bn_add_relu_backward   (dz, ds, dgamma, dbeta, dgamma_s, dbeta_s), recomputing the mask

As with the conv op, the BN statistics enter as detached inputs with a flag saying whether they are the
batch's own (the backward then applies the full BN-backward formula); running buffers are updated
outside, in functional.py. Nothing but z and s is saved for backward: not the BN outputs, not y.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._layout import memory_format_of
from ._ops import (_acc, _applier, _bn_prologue, _empty, _kernels, _needs_autograd, _pack_prologue, _traced,
                   _unpack_prologue)


def _affine_of(mean, invstd, gamma, beta, prologue):
    """(scale, beta) of a BN: the finalize kernel's rows when given ([2, C], or the pair), else from the statistics."""
    if prologue is not None:
        return prologue[0], prologue[1]
    return _bn_prologue(mean, invstd, gamma, beta)


def _ref_pre(z, s, mean, scale, beta, s_mean, s_scale, s_beta):
    """Eager's values op for op: each BN output rounded to the dtype, their sum formed wider and rounded."""
    acc = _acc(z.dtype)

    def bn(v, mu, sc, be):
        view = (1, -1, 1, 1)
        return ((v.to(acc) - mu.view(view)) * sc.view(view) + be.view(view)).to(z.dtype)

    t = bn(s, s_mean, s_scale, s_beta) if s_mean is not None else s
    return (bn(z, mean, scale, beta).to(acc) + t.to(acc)).to(z.dtype)


def _bn_add_relu_impl(
    z: Tensor, s: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    prologue: Optional[Tensor], batch_stats: bool, s_mean: Optional[Tensor], s_invstd: Optional[Tensor],
    s_weight: Optional[Tensor], s_bias: Optional[Tensor], s_prologue: Optional[Tensor], s_batch_stats: bool,
    relu: bool, backend: str,
) -> Tensor:
    """act(bn(z) + t), t = s or bn_s(s) (s_mean given); in z's dtype and memory format."""
    scale, beta = _affine_of(mean, invstd, bn_weight, bn_bias, prologue)
    s_scale = s_beta = None
    if s_mean is not None:
        s_scale, s_beta = _affine_of(s_mean, s_invstd, s_weight, s_bias, s_prologue)
    if backend in ("triton", "cuda"):
        y = torch.empty_like(z, memory_format=memory_format_of(z))
        _kernels(backend).bn_add_relu_forward(z, mean, scale, beta, s, s_mean, s_scale, s_beta, y, relu=relu)
        return y
    pre = _ref_pre(z, s, mean, scale, beta, s_mean, s_scale, s_beta)
    return (torch.relu(pre) if relu else pre).contiguous(memory_format=memory_format_of(z))


bn_add_relu_op = torch.library.custom_op("fused_resnet::bn_add_relu", _bn_add_relu_impl, mutates_args=())


@bn_add_relu_op.register_fake
def _(z, s, mean, invstd, bn_weight, bn_bias, prologue, batch_stats, s_mean, s_invstd, s_weight, s_bias,
      s_prologue, s_batch_stats, relu, backend):
    return torch.empty_like(z, memory_format=memory_format_of(z))


def _ref_backward(g, z, s, mean, invstd, gamma, scale, beta, batch_stats, s_mean, s_invstd, s_gamma, s_scale,
                  s_beta, s_batch_stats, relu, need_dz, need_ds, need_sums):
    """The kernels' contract (fused_resnet/triton/postact.py) in PyTorch ops: (dz, ds, [3, C] sums)."""
    acc = _acc(z.dtype)
    view = (1, -1, 1, 1)
    gm = g.to(acc)
    if relu:
        # torch's ReLU backward: zero where the output is <= 0 (a NaN output passes its gradient)
        gm = torch.where(_ref_pre(z, s, mean, scale, beta, s_mean, s_scale, s_beta) <= 0, 0.0, gm)
    sbn = s_mean is not None
    m = z.numel() // z.shape[1]
    xhat = (z.to(acc) - mean.view(view)) * invstd.view(view)
    s1, s2 = gm.sum((0, 2, 3)), (gm * xhat).sum((0, 2, 3))
    shat = (s.to(acc) - s_mean.view(view)) * s_invstd.view(view) if sbn else None
    s2s = (gm * shat).sum((0, 2, 3)) if sbn else torch.zeros_like(s1)

    def bn_backward(v_hat, inv, gam, sc, batch, s2_):
        if batch:
            k = inv * gam.to(acc) if gam is not None else inv
            return k.view(view) * (gm - (s1 / m).view(view) - v_hat * (s2_ / m).view(view))
        return gm * sc.view(view)

    dz = bn_backward(xhat, invstd, gamma, scale, batch_stats, s2) if need_dz else None
    ds = None
    if need_ds:
        ds = bn_backward(shat, s_invstd, s_gamma, s_scale, s_batch_stats, s2s) if sbn else gm
    return dz, ds, (torch.stack([s1, s2, s2s]) if need_sums else None)


def _bn_add_relu_backward_impl(
    g: Tensor, z: Tensor, s: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], prologue: Optional[Tensor], batch_stats: bool, s_mean: Optional[Tensor],
    s_invstd: Optional[Tensor], s_weight: Optional[Tensor], s_bias: Optional[Tensor], s_prologue: Optional[Tensor],
    s_batch_stats: bool, relu: bool, needs: List[bool], backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dz, ds, dgamma, dbeta, dgamma_s, dbeta_s); an entry whose `needs` flag is False comes back empty."""
    grads = _bn_add_relu_grads(g, z, s, mean, invstd, bn_weight, bn_bias, prologue, batch_stats, s_mean, s_invstd,
                               s_weight, s_bias, s_prologue, s_batch_stats, relu, needs, backend)
    return tuple(_empty(z) if t is None else t for t in grads)


def _bn_add_relu_grads(g, z, s, mean, invstd, bn_weight, bn_bias, prologue, batch_stats, s_mean, s_invstd, s_weight,
                       s_bias, s_prologue, s_batch_stats, relu, needs, backend):
    """_bn_add_relu_backward_impl's gradients, None where not needed (the eager path takes them so)."""
    need_dz, need_ds, need_g, need_b, need_sg, need_sb = needs
    sbn = s_mean is not None
    need_g, need_b = need_g and bn_weight is not None, need_b and bn_bias is not None
    need_sg, need_sb = need_sg and sbn and s_weight is not None, need_sb and sbn and s_bias is not None
    need_sums = need_g or need_b or need_sg or need_sb
    scale, beta = _affine_of(mean, invstd, bn_weight, bn_bias, prologue)
    s_scale = s_beta = None
    if sbn:
        s_scale, s_beta = _affine_of(s_mean, s_invstd, s_weight, s_bias, s_prologue)
    args = (g, z, mean, scale, beta, invstd, bn_weight, batch_stats, s, s_mean, s_scale, s_beta, s_invstd, s_weight,
            s_batch_stats, need_dz, need_ds, need_sums)
    if backend in ("triton", "cuda"):
        dz, ds, sums = _kernels(backend).bn_add_relu_backward(*args, relu=relu)
    else:
        dz, ds, sums = _ref_backward(g, z, s, mean, invstd, bn_weight, scale, beta, batch_stats, s_mean, s_invstd,
                                     s_weight, s_scale, s_beta, s_batch_stats, relu, need_dz, need_ds, need_sums)
    fmt = memory_format_of(z)
    out = [_as(dz, z.dtype, fmt), _as(ds, s.dtype, fmt)]
    rows = sums.unbind(0) if sums is not None else None  # one view op for the rows used
    for need, row, ref in ((need_g, 1, bn_weight), (need_b, 0, bn_bias), (need_sg, 2, s_weight), (need_sb, 0, s_bias)):
        out.append(_as(rows[row], ref.dtype) if need else None)
    return out


def _as(t, dtype, fmt=None):
    """t in dtype (and dense in memory format fmt), with no op where it already is (each costs a dispatch)."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    if fmt is not None and not t.is_contiguous(memory_format=fmt):
        t = t.contiguous(memory_format=fmt)
    return t


def _registered_backward_impl(g, z, s, *rest):
    """The registered op's outputs may alias neither its inputs nor each other (the affine gradients are
    rows of one [3, C] sums tensor, dbeta and the shortcut's dbeta the same row; the reference's identity
    shortcut gradient can be g itself): copies where they would. The eager path takes them as they are."""
    out, seen = [], {t.untyped_storage().data_ptr() for t in (g, z, s)}
    for t in _bn_add_relu_backward_impl(g, z, s, *rest):
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone(memory_format=memory_format_of(t)) if t.dim() == 4 else t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


# The schema comes from the signature: the wrapper takes the impl's.
_registered_backward_impl.__annotations__ = _bn_add_relu_backward_impl.__annotations__
_registered_backward_impl.__signature__ = inspect.signature(_bn_add_relu_backward_impl)
bn_add_relu_backward_op = torch.library.custom_op("fused_resnet::bn_add_relu_backward", _registered_backward_impl,
                                                  mutates_args=())


@bn_add_relu_backward_op.register_fake
def _(g, z, s, mean, invstd, bn_weight, bn_bias, prologue, batch_stats, s_mean, s_invstd, s_weight, s_bias,
      s_prologue, s_batch_stats, relu, needs, backend):
    def like(t, need):
        if not need or t is None:
            return z.new_empty((0,))
        return torch.empty_like(t, memory_format=memory_format_of(z)) if t.dim() == 4 else torch.empty_like(t)

    sbn = s_mean is not None
    return (like(z, needs[0]), like(s, needs[1]), like(bn_weight, needs[2]), like(bn_bias, needs[3]),
            like(s_weight, needs[4] and sbn), like(s_bias, needs[5] and sbn))


_NARGS = 16


def _setup_context(ctx, inputs, output):
    (z, s, mean, invstd, bn_weight, bn_bias, prologue, batch_stats, s_mean, s_invstd, s_weight, s_bias, s_prologue,
     s_batch_stats, relu, backend) = inputs
    ctx.save_for_backward(z, s, mean, invstd, bn_weight, bn_bias, s_mean, s_invstd, s_weight, s_bias,
                          *_pack_prologue(prologue), *_pack_prologue(s_prologue))
    ctx.flags = (batch_stats, s_batch_stats, relu, backend)


def _backward(ctx, grad_y, direct=False, ni=None):
    """ni: needs_input_grad in the op's argument order (the eager path's node orders its arguments otherwise)."""
    if grad_y is None:
        return (None,) * _NARGS
    z, s, mean, invstd, bn_weight, bn_bias, s_mean, s_invstd, s_weight, s_bias, *pro = ctx.saved_tensors
    prologue, s_prologue = _unpack_prologue(*pro[:3]), _unpack_prologue(*pro[3:])
    batch_stats, s_batch_stats, relu, backend = ctx.flags
    ni = ctx.needs_input_grad if ni is None else ni
    needs = [bool(ni[0]), bool(ni[1]), bool(ni[4]), bool(ni[5]), bool(ni[10]), bool(ni[11])]
    if not any(needs):
        return (None,) * _NARGS
    grads = (_bn_add_relu_grads if direct else bn_add_relu_backward_op)(
        grad_y, z, s, mean, invstd, bn_weight, bn_bias, prologue, batch_stats, s_mean, s_invstd, s_weight, s_bias,
        s_prologue, s_batch_stats, relu, needs, backend)
    dz, ds, dg, db, dsg, dsb = (gr if need else None for gr, need in zip(grads, needs))
    return (dz, ds, None, None, dg, db, None, None, None, None, dsg, dsb, None, None, None, None)


torch.library.register_autograd("fused_resnet::bn_add_relu", _backward, setup_context=_setup_context)


class _FusedBNAddAct(torch.autograd.Function):
    """The same op outside compilation, without torch.library's per-call dispatch; as _ops._FusedConv, only the
    differentiable tensors are apply's own arguments (z, s, bn_weight, bn_bias, s_weight, s_bias), the op's
    whole argument tuple comes as one."""

    @staticmethod
    def forward(ctx, z, s, bn_weight, bn_bias, s_weight, s_bias, args):
        y = _bn_add_relu_impl(*args)
        _setup_context(ctx, args, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        n = ctx.needs_input_grad
        g = _backward(ctx, grad_y, direct=True,
                      ni=(n[0], n[1], False, False, n[2], n[3], False, False, False, False, n[4], n[5]))
        return g[0], g[1], g[4], g[5], g[10], g[11], None


_fused_bn_add_act_apply = _applier(_FusedBNAddAct)


def bn_add_relu(*args):
    """The registered op when traced (torch.compile, opcheck), else the same code directly."""
    if _traced(args[0]):
        return bn_add_relu_op(*args)
    if not _needs_autograd(args[0], args[1], args[4], args[5], args[10], args[11]):  # inference: no node
        return _bn_add_relu_impl(*args)
    return _fused_bn_add_act_apply(args[0], args[1], args[4], args[5], args[10], args[11], args)
