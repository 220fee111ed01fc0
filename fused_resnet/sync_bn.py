"""Synchronized BatchNorm for fused (and unfused) models: SyncBatchNorm2d and convert_sync_batchnorm.

A SyncBatchNorm2d is an nn.BatchNorm2d (same parameters, buffers and state_dict keys) whose training
statistics are those of the whole process group, with nn.SyncBatchNorm's semantics (_sync.py). Fused
layers read the flag off their BN module, so one conversion covers both the fused BN->ReLU->Conv
chains and the BNs that run on their own (a model's final BN). Unlike nn.SyncBatchNorm it also runs on
CPU tensors (gloo), and fused layers accept nn.SyncBatchNorm modules as well.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _sync


class _SyncBatchNormFn(torch.autograd.Function):
    """BatchNorm over the process group's batch, for a BN that is not fused into a conv."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, gid):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = x.shape[1]
        var, mean = torch.var_mean(x.to(acc), dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
        mean, var, count = _sync.gather_stats(mean, var, x.numel() // c, gid)
        if running_mean is not None:
            from .functional import update_running_stats

            update_running_stats(running_mean, running_var, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
        shape = (1, c) + (1,) * (x.dim() - 2)
        xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.gid = gid
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        c = x.shape[1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        dims = [d for d in range(x.dim()) if d != 1]
        g = grad.to(acc)
        xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        s1, s2 = g.sum(dims), (g * xhat).sum(dims)  # local: the weight/bias gradients stay per rank
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            gs1, gs2, count = _sync.sum_reducer(ctx.gid)(s1, s2, x.numel() // c)
            k = invstd * weight.to(acc) if weight is not None else invstd
            dx = (k.view(shape) * (g - (gs1 / count).view(shape) - xhat * (gs2 / count).view(shape))).to(x.dtype)
        if weight is not None:
            dw, db = s2.to(weight.dtype), s1.to(weight.dtype)
        return dx, dw, db, None, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with process-group-wide training statistics (nn.SyncBatchNorm's semantics).

    Without an initialized process group of more than one process it is exactly nn.BatchNorm2d.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x):
        gid = _sync.group_id(self.process_group) if self.training else 0
        if not gid:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats and self.running_mean is not None
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean if track else None,
                                      self.running_var if track else None, factor, self.eps, gid)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every nn.BatchNorm2d in module becomes a SyncBatchNorm2d over process_group (default: the world),
    sharing its parameters and buffers, like nn.SyncBatchNorm.convert_sync_batchnorm; fused layers then
    synchronize their statistics too. Returns the module (converted in place when it is not itself a BN)."""
    memo = {}

    def swap(bn):
        if id(bn) not in memo:
            new = SyncBatchNorm2d.__new__(SyncBatchNorm2d)
            new.__dict__ = bn.__dict__.copy()  # same Parameter and buffer objects, hooks and flags
            new._parameters, new._buffers, new._modules = bn._parameters, bn._buffers, bn._modules
            new.process_group = process_group
            memo[id(bn)] = new
        return memo[id(bn)]

    def is_plain_bn(m):
        return isinstance(m, nn.BatchNorm2d) and not isinstance(m, SyncBatchNorm2d)

    if is_plain_bn(module):
        return swap(module)
    for parent in module.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and is_plain_bn(child):
                parent._modules[name] = swap(child)
    return module
