"""The whole backward of the fused layer in four launches at most (eager's BN -> ReLU -> conv needs as
many): dgrad (+ BN-backward partials), wgrad (split-K slabs), column_sums (S1/S2 and the slabs, one
launch) and, with batch statistics, bn_backward_finish."""
from __future__ import annotations

import torch

from .._layout import memory_format_of
from ._common import acc_dtype, configs, launch_plan, plan_env
from .dgrad import bn_backward_finish, conv_dgrad, dgrad_launch, dgrad_plan, finish_launch, finish_plan
from .finalize import column_sums, column_sums_launch, column_sums_plan
from .pair import conv_dgrad_pair, dgrad_pair_applies
from .wgrad import conv_wgrad_partial, wgrad_launch, wgrad_plan


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
    if not others:
        return _one_consumer(grad_y, x, weight, mean, scale, beta, invstd, gamma, batch_stats, need_dx, need_dw,
                             need_dg, need_db, need_sums, stride, padding, dilation, sync, relu)
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


_PLANS: dict = {}  # _one_consumer's plans: its launches' plans under one key (_common.launch_plan)


def _one_consumer_plan(grad_y, x, weight, stride, padding, dilation, batch_stats, need_dx, need_dw, need_sums, relu,
                       has_gamma):
    """(table, memory format of dx, dgrad, wgrad, column_sums and finish plans; None for a launch not made). Built
    on tensors of the outputs' shapes and layouts, as the call then allocates them."""
    fmt = memory_format_of(x)
    out = torch.empty_like(x, memory_format=fmt)
    dplan = wplan = fplan = None
    if need_dx or need_sums:
        dplan = dgrad_plan(grad_y, x, weight, out, stride, padding, dilation, batch_stats, need_sums, False, False,
                           relu)
    b_len = 0
    if need_dw:
        wplan = wgrad_plan(grad_y, x, torch.empty_like(weight), stride, padding, dilation, relu)
        b_len = wplan[2][1] if wplan[2] is not None else 0
    splan = column_sums_plan(2 * x.shape[1] if need_sums else 0, b_len, acc_dtype(x.dtype))
    if batch_stats:
        fplan = finish_plan(out, x, out, has_gamma)
    return configs._table(), fmt, dplan, wplan, splan, fplan


def _one_consumer(grad_y, x, weight, mean, scale, beta, invstd, gamma, batch_stats, need_dx, need_dw, need_dg,
                  need_db, need_sums, stride, padding, dilation, sync, relu):
    """conv_backward of a layer whose activation has one consumer: the same launches, their plans found under one
    key (issue 30: each launcher's own key and lookup cost the host ~2 us a launch)."""
    key = (grad_y.shape, grad_y.stride(), x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(),
           *stride, *padding, *dilation, batch_stats, need_dx, need_dw, need_sums, relu, gamma is None, *plan_env())
    _, fmt, dplan, wplan, splan, fplan = launch_plan(
        _PLANS, key, _one_consumer_plan, grad_y, x, weight, stride, padding, dilation, batch_stats, need_dx, need_dw,
        need_sums, relu, gamma is not None)
    out = part = None
    if dplan is not None:
        # dx, or ga*m in the input dtype: eager's ReLU backward output, half the bytes of a float32 buffer
        out = torch.empty_like(x, memory_format=fmt)
        part = dgrad_launch(dplan, grad_y, x, weight, mean, scale, beta, invstd, out)
    dw = slabs = None
    if wplan is not None:
        dw = torch.empty_like(weight)
        slabs = wgrad_launch(wplan, grad_y, x, dw, mean, scale, beta)
    s1 = s2 = None
    c = x.shape[1]
    if need_sums:
        s1 = torch.empty(c, dtype=acc_dtype(x.dtype), device=x.device)
        s2 = torch.empty_like(s1)
    if part is not None or slabs is not None:
        column_sums_launch(splan, part if need_sums else None, (s1, s2), slabs, dw,
                           (part.shape[0], 2 * c) if need_sums else None)
    dx = None
    if batch_stats:
        m = x.numel() // c
        fs1, fs2, count = sync(s1, s2, m) if sync is not None else (s1, s2, m)
        # dx over ga*m in place: each element is read, then written, by the same program (one x-sized buffer and
        # one allocation fewer)
        dx = out
        finish_launch(fplan, out, x, dx, mean, invstd, gamma, fs1, fs2, count)
    elif need_dx:
        dx = out
    return dx, dw, (s2 if need_dg else None), (s1 if need_db else None), []
