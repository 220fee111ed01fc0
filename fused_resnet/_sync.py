"""Synchronized batch statistics across a process group, with nn.SyncBatchNorm's semantics.

Forward: every rank's per-channel (count, mean, biased var) is all-gathered and merged (Chan's formula,
float64), so each rank normalizes with the statistics of the global batch and updates its running
variance with the global count. Backward: the per-channel sums S1 = sum(g), S2 = sum(g * xhat) that the
dx formula needs are all-reduced (with the counts); the BN weight/bias gradients stay local, and
DistributedDataParallel averages them like any other parameter gradient -- as nn.SyncBatchNorm does.

The ops (torch.library) cannot take a ProcessGroup argument, so groups are registered here and ops
carry a small integer: 0 means "no synchronization".
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._partials import merge_moments

_GROUPS: list = []  # index + 1 is the id an op carries


def group_id(process_group=None) -> int:
    """The id to hand to the ops for synchronizing over process_group (None: the default group), or 0
    when there is nothing to synchronize with (not initialized, or a group of one), as nn.SyncBatchNorm."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    if dist.get_world_size(process_group) <= 1:
        return 0
    for i, g in enumerate(_GROUPS):
        if g is process_group:
            return i + 1
    _GROUPS.append(process_group)
    return len(_GROUPS)


def _group(gid: int):
    return _GROUPS[gid - 1]


def gather_stats(mean, var, count: int, gid: int):
    """(global mean, global biased var, global count) from every rank's local ones."""
    group = _group(gid)
    c = mean.numel()
    local = torch.cat([mean.new_tensor([float(count)], dtype=torch.float64), mean.double(), var.double()])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    allp = torch.stack(parts)
    n, means, vars_ = allp[:, 0], allp[:, 1:1 + c], allp[:, 1 + c:]
    gmean, gvar = merge_moments(n, means, n[:, None] * vars_)
    return gmean.to(mean.dtype), gvar.to(var.dtype), int(n.sum().item())


def sum_reducer(gid: int):
    """A callable (s1, s2, count) -> (group-wide s1, s2, count) for the dx finish, or None for gid 0."""
    if not gid:
        return None
    group = _group(gid)

    def reduce(s1, s2, count):
        buf = torch.cat([s1.double(), s2.double(), s1.new_tensor([float(count)], dtype=torch.float64)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        c = s1.numel()
        return buf[:c].to(s1.dtype), buf[c:2 * c].to(s2.dtype), int(buf[-1].item())

    return reduce
