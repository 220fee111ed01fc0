"""Output statistics whose merge waits for the BN that reads them.

In training a fused conv's epilogue leaves per-tile partial statistics of its output; the next fused
layer's BN turns them into (mean, var) and then into its scale, shift and running-buffer update. Merged
eagerly that is two launches (the merge, then the finalize); handed over as partials, the finalize kernel
merges them itself (it already does so for a statistics pass): one launch per link of the chain, in
every pre- and post-activation block in training.

Only the eager path defers (torch.compile sees plain (mean, var) tensors), and only for the library's own
blocks, which pass the statistics straight to the next layer. A PendingStats is a (mean, var) tuple: any
other reader that indexes or unpacks it gets them merged first (one launch, as without deferral).
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


class PendingStats(tuple):
    """(mean, var) of a conv's output whose partials are merged by their consumer's finalize launch, or
    on first access by anyone else."""

    def __new__(cls, mean, var, partials, backend):
        self = super().__new__(cls, (mean, var))
        self.partials, self.backend = partials, backend
        return self

    def claim(self):
        """For the finalize that merges them itself: (partials, mean, var), or None if already merged. The
        finalize writes the merged moments into mean and var (so the tuple is complete afterwards)."""
        if self.partials is None:
            return None
        partials, self.partials = self.partials, None
        mean, var = tuple.__getitem__(self, 0), tuple.__getitem__(self, 1)
        return partials, mean, var

    def _resolve(self):
        claimed = self.claim()
        if claimed is not None:
            partials, mean, var = claimed
            from ._ops import _kernels

            _kernels(self.backend).bn_finalize(mean.shape[0], mean.dtype, partials=partials, mean=mean, var=var)

    def __getitem__(self, i):
        self._resolve()
        return tuple.__getitem__(self, i)

    def __iter__(self):
        self._resolve()
        return tuple.__iter__(self)

    def __reduce__(self):
        return (tuple, (tuple(self),))
