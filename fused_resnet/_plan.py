"""Per-call host work that depends only on shapes, dtypes, devices and static arguments, done once per key.

At CIFAR widths a fused layer's kernels run for 5-30 us each on a GPU, so the host's Python per call
decides a step's time as much as the kernels do (issue 30, benchmarks/host_overhead.py). Validating the
arguments (`_validate.validate`, ~20 us) and resolving the backend (`backends.resolve`, which asks importlib
and the environment, ~10-40 us) give the same answer for every call with the same tensor metadata and static
arguments: `checked()` memoizes (geometry, backend) on a tuple of exactly what the two read, and runs them in
full on a miss, so a bad argument still raises its error (before any kernel runs) on every call.

What the key holds, and why it is enough:
- each tensor argument's type, shape, dtype and device (None for an absent one); the running buffers'
  requires_grad and whether grad mode is on (validate refuses running buffers that require grad);
- each static argument with its type (and its elements' types for a sequence), so that a bool, which
  hashes and compares equal to an int, never hits an entry made for an int;
- the two environment variables that resolve() reads (TRITON_INTERPRET, FUSED_RESNET_CUDA_EMULATED).
Traced calls (torch.compile, fake/functional tensors) never use the memo: validate and resolve run as
before, and the memo's dict is never touched while compiling.
"""
from __future__ import annotations

import os

import torch

from ._validate import validate
from .backends import resolve

_MEMO: dict = {}
MAX_ENTRIES = 1024  # a process that keeps changing shapes starts over rather than growing without bound
_ENV = ("TRITON_INTERPRET", "FUSED_RESNET_CUDA_EMULATED")
hits = misses = 0  # for tests: how often checked() found its answer in the memo


def _meta(t):
    if t is None:
        return None
    return type(t), t.shape, t.dtype, t.device


def _static(v):
    t = type(v)
    if t is tuple or t is list:
        return t, tuple(v), tuple(map(type, v))
    return t, v


if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict):
    # os.environ.get encodes the name and decodes the value (~1 us each); its backing dict is the same state
    # (os.environ[...] = and monkeypatch.setenv write through to it)
    _ENV_DATA = os.environ._data
    _ENV_KEYS = tuple(os.fsencode(n) for n in _ENV)

    def _env():
        return _ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1])
else:
    def _env():
        return os.environ.get(_ENV[0]), os.environ.get(_ENV[1])


def checked(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
            padding, dilation, groups, residual, backend, traced):
    """(validate(...), resolve(backend, x.device, geometry.groups)), from the memo when the same metadata
    and static arguments were seen before. traced: the call is being traced (no memo)."""
    global hits, misses
    if traced:
        geo = validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                       stride, padding, dilation, groups, residual, backend)
        return geo, resolve(backend, x.device, geo.groups)
    try:
        key = (type(x), x.shape, x.dtype, x.device, type(weight), weight.shape, weight.dtype, weight.device,
               _meta(bias), _meta(bn_weight), _meta(bn_bias), _meta(running_mean), _meta(running_var),
               _meta(residual), running_mean.requires_grad if running_mean is not None else None,
               running_var.requires_grad if running_var is not None else None, torch.is_grad_enabled(),
               type(training), training, type(momentum), momentum, type(eps), eps, _static(stride),
               _static(padding), _static(dilation), type(groups), groups, backend, _env())
        hit = _MEMO.get(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable argument: validate says what is wrong
        key = hit = None
    if hit is not None:
        hits += 1
        return hit
    misses += 1
    geo = validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                   stride, padding, dilation, groups, residual, backend)
    result = (geo, resolve(backend, x.device, geo.groups))
    if key is not None:
        if len(_MEMO) >= MAX_ENTRIES:
            _MEMO.clear()
        _MEMO[key] = result
    return result


def clear():
    _MEMO.clear()
