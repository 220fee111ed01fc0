"""Plain-text tables for the command line (check, bench, kernels): one home for the printer."""
from __future__ import annotations


def format_table(rows, headers) -> str:
    """Left-aligned columns, each as wide as its widest cell, with a dashed rule under the headers."""
    widths = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)
