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
    means = part[0].double()
    m2s = part[1].double()
    mean = (counts[:, None] * means).sum(0) / total
    m2 = m2s.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
    if pivot is not None:
        mean = mean + pivot.double()
    return mean, m2 / total
