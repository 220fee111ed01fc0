"""Merging per-tile partial statistics from any backend's kernels into per-channel results (torch only)."""
from __future__ import annotations

import torch


def merge_partials(part: torch.Tensor, total: int, block_m: int, pivot=None):
    """Chan's merge of per-tile (mean, M2) rows into per-channel (mean, biased var).

    part: [2, tiles, C] -- row-tile i covers min(block_m, total - i*block_m) elements of each channel.
    Tile means are relative to `pivot` (per channel) when one is given.
    The merge runs in float64: it touches tiles x C numbers, nothing next to the tensor itself.
    """
    tiles = part.shape[1]
    counts = torch.full((tiles,), float(block_m), dtype=torch.float64, device=part.device)
    counts[-1] = float(total - (tiles - 1) * block_m)
    mean, var = merge_moments(counts, part[0], part[1])
    if pivot is not None:
        mean = mean + pivot.double()
    return mean, var


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Chan's formula: groups g of counts[g] elements with per-channel means[g] and M2s m2s[g] ([G, C])
    -> per-channel (mean, biased var) of their union, in float64. Used for the tiles of one tensor and
    for the ranks of a process group (_sync.py)."""
    counts = counts.double()[:, None]
    means, m2s = means.double(), m2s.double()
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total
