"""The whole backward of the fused layer in four launches at most (eager's BN -> ReLU -> conv needs as
many): dgrad (+ BN-backward partials), wgrad (split-K slabs), column_sums (S1/S2 and the slabs, one
launch) and, with batch statistics, bn_backward_finish."""
from __future__ import annotations

import torch

from ._common import acc_dtype
from .dgrad import bn_backward_finish, conv_dgrad
from .finalize import column_sums
from .pair import conv_dgrad_pair, dgrad_pair_applies
from .wgrad import conv_wgrad_partial


def conv_backward(grad_y, x, weight, mean, scale, beta, invstd, gamma, batch_stats, needs, stride, padding,
                  dilation, sync=None, others=(), relu=True):
    """(dx, dW, dgamma, dbeta, [dW of each of `others`]), None where `needs` (dx, dW, dgamma, dbeta) says
    no. dW comes in the weight's dtype and layout; dgamma/dbeta in the accumulation dtype. sync(s1, s2,
    count) -> (s1, s2, count) makes dx use process-group-wide sums (dgamma/dbeta stay local).
    others: more consumers of the same activation, (grad_y, weight, stride, padding, dilation, need_dW)
    each: same contract as fused_resnet.cuda.conv_backward (their ga summed in before the mask, one BN
    backward). relu=False: the identity activation (no mask, the activation is the batch norm)."""
    need_dx, need_dw, need_dg, need_db = needs
    batch_stats = batch_stats and need_dx
    need_sums = need_dg or need_db or batch_stats
    c = x.shape[1]
    out = part = None
    if (need_dx or need_sums) and len(others) == 1 and dgrad_pair_applies(stride, others[0][2]):
        # one dgrad reducing over both convs (a projection block's conv1 and shortcut at one stride): pair.py
        gy2, w2, _, padding2, dilation2, _ = others[0]
        out, part = conv_dgrad_pair(grad_y, weight, gy2, w2, x, mean, scale, beta, invstd, batch_stats, need_sums,
                                    stride, padding, dilation, padding2, dilation2, relu=relu)
    elif need_dx or need_sums:
        addend = None
        for gy2, w2, stride2, padding2, dilation2, _ in others:
            addend, _ = conv_dgrad(gy2, x, w2, mean, scale, beta, invstd, False, False, stride2, padding2,
                                   dilation2, addend=addend, raw=True)
        out, part = conv_dgrad(grad_y, x, weight, mean, scale, beta, invstd, batch_stats, need_sums,
                               stride, padding, dilation, addend=addend, relu=relu)
    dw = slabs = None
    if need_dw:
        dw = torch.empty_like(weight)
        slabs = conv_wgrad_partial(grad_y, x, dw, mean, scale, beta, stride, padding, dilation, relu)
    s1 = s2 = None
    if need_sums:
        s1 = torch.empty(c, dtype=acc_dtype(x.dtype), device=x.device)
        s2 = torch.empty_like(s1)
    column_sums(a=part if need_sums else None, a_out=(s1, s2), b=slabs, b_out=dw,
                a_shape=(part.shape[0], 2 * c) if need_sums else None)
    other_dws = []
    for gy2, w2, stride2, padding2, dilation2, need_dw2 in others:
        dw2 = None
        if need_dw2:
            dw2 = torch.empty_like(w2)
            column_sums(b=conv_wgrad_partial(gy2, x, dw2, mean, scale, beta, stride2, padding2, dilation2, relu),
                        b_out=dw2)
        other_dws.append(dw2)
    dx = None
    if batch_stats:
        m = x.numel() // c
        fs1, fs2, count = sync(s1, s2, m) if sync is not None else (s1, s2, m)
        dx = bn_backward_finish(out, x, mean, invstd, gamma, fs1, fs2, count)
    elif need_dx:
        dx = out
    return dx, dw, (s2 if need_dg else None), (s1 if need_db else None), other_dws
