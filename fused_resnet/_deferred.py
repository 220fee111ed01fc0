"""Output statistics whose merge waits for the BN that reads them.

In training a fused conv's epilogue leaves per-tile partial statistics of its output; the next fused
layer's BN turns them into (mean, var) and then into its scale, shift and running-buffer update. Merged
eagerly that is two launches (the merge, then the finalize); handed over as partials, the finalize kernel
merges them itself (it already does so for a statistics pass): one launch per link of the chain, in
every pre- and post-activation block in training.

Only the eager path defers (torch.compile sees plain (mean, var) tensors), and only for the library's own
blocks, which pass the statistics straight to the next layer; what they return to a caller is resolved.
"""
from __future__ import annotations

import threading

_stash = threading.local()


def stash(mean, partials):
    """Called by the op layer: mean's (still unmerged) partials, for functional.py to pick up at once."""
    _stash.last = (mean.data_ptr(), partials)


def take(mean):
    """The partials stashed for mean by the op that just returned it, else None."""
    last, _stash.last = getattr(_stash, "last", None), None
    if last is None or mean is None or last[0] != mean.data_ptr():
        return None
    return last[1]


class PendingStats:
    """(mean, var) of a conv's output whose partials are merged by their consumer's finalize launch, or on
    first access by anyone else. Not a tuple: C-level readers of a tuple (torch.stack(stats)) would see the
    unmerged tensors; this one is read only through Python (iteration, indexing), which merges first. The
    library's public functions never return one (nn.py resolves it at its boundary)."""

    __slots__ = ("_mean", "_var", "partials", "backend")

    def __init__(self, mean, var, partials, backend):
        self._mean, self._var, self.partials, self.backend = mean, var, partials, backend

    def claim(self):
        """For the finalize that merges them itself: (partials, mean, var), or None if already merged. The
        finalize writes the merged moments into mean and var."""
        if self.partials is None:
            return None
        partials, self.partials = self.partials, None
        return partials, self._mean, self._var

    def resolved(self):
        """(mean, var) as a plain tuple, merged (one launch) if nobody has merged them yet."""
        claimed = self.claim()
        if claimed is not None:
            partials, mean, var = claimed
            from ._ops import _kernels

            _kernels(self.backend).bn_finalize(mean.shape[0], mean.dtype, partials=partials, mean=mean, var=var)
        return self._mean, self._var

    def __iter__(self):
        return iter(self.resolved())

    def __getitem__(self, i):
        return self.resolved()[i]

    def __len__(self):
        return 2
