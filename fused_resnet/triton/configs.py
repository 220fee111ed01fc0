"""Tuned launch configs per GPU architecture and shape, read by the launchers (configs.json beside this).

The table is written by the GPU pass's tuning sweep (`fused-resnet kernels --tune` on a GPU), only from
configs the static kernel report found spill-free; a shape it does not hold gets the heuristic in
_common.heuristic_config. Keys: "<kernel>:<dtype>:<layout>:<m>x<n>x<k>x<taps>" under "sm<arch>".
"""
from __future__ import annotations

import contextlib
import functools
import json
import os

import torch

from .._layout import memory_format_of

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    try:
        with open(TABLE) as f:
            return json.load(f).get("configs", {})
    except FileNotFoundError:
        return {}


def layout_of(x: torch.Tensor) -> str:
    return "nhwc" if memory_format_of(x) == torch.channels_last else "nchw"


def shape_key(kernel: str, dtype: torch.dtype, layout: str, m: int, n: int, k: int, taps: int) -> str:
    return f"{kernel}:{str(dtype).replace('torch.', '')}:{layout}:{m}x{n}x{k}x{taps}"


memo: dict = {}  # _common.conv_config's per-shape answers: key -> (the table they came from, config)
_forced: dict = {}  # kernel -> config (or None: the heuristic), set by forced() for the tuning sweep
requested: dict = {}  # kernel -> the table key of its latest forced launch (the sweep files winners under it)


@contextlib.contextmanager
def forced(kernel: str, config):
    """Within: every launch of `kernel` ("fwd", "dgrad", "wgrad") uses `config`; None = the heuristic."""
    _forced[kernel] = dict(config) if config else None
    try:
        yield
    finally:
        _forced.pop(kernel, None)


def lookup(kernel: str, m: int, n: int, k: int, taps: int, x: torch.Tensor):
    from ._common import arch_of, interpreting

    requested[kernel] = shape_key(kernel, x.dtype, layout_of(x), m, n, k, taps)
    if kernel in _forced:
        return dict(_forced[kernel]) if _forced[kernel] else None

    arch = arch_of(x.device)
    if arch is None or interpreting():
        return None
    entry = _table().get(f"sm{arch}", {}).get(requested[kernel])
    return {key: entry[key] for key in KEYS} if entry else None


def write(arch: int, entries: dict, path: str = TABLE):
    """Merge {shape key: config (+ timings)} into the table for sm_<arch> and save it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    data.setdefault("configs", {}).setdefault(f"sm{arch}", {}).update(entries)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    _table.cache_clear()
