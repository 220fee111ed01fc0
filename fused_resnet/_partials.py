"""Chan's merge of per-group (count, mean, M2) statistics in torch, for the ranks of a process group
(_sync.py); the kernels merge their own tiles in their bn_finalize."""
from __future__ import annotations

import torch


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
