"""Per-call host work that depends only on shapes, dtypes, devices and static arguments, done once per key.

At CIFAR widths a fused layer's kernels run for 5-30 us each on a GPU, so the host's Python per call
decides a step's time as much as the kernels do (issue 30, benchmarks/host_overhead.py). Validating the
arguments (`_validate.validate`, ~20 us) and resolving the backend (`backends.resolve`, which asks importlib
and the environment, ~10-40 us) give the same answer for every call with the same tensor metadata and static
arguments, so each memoizes its answer here, on a tuple of exactly what it reads; a miss runs it in full, so a
bad argument still raises its error (before any kernel runs) on every call, and errors are never memoized.

validate's key (`validate_key`; bn_add_relu's checks: `bn_add_key`, alike): each tensor argument's type, shape, dtype and device (None for an absent one);
the running buffers' requires_grad and whether grad mode is on (validate refuses running buffers that require
grad); each static argument with its type (and its elements' types for a sequence), so that a bool, which
hashes and compares equal to an int, never hits an entry made for an int. resolve's key (`resolve_key`): the
backend, the device, groups and the two environment variables resolve reads (TRITON_INTERPRET,
FUSED_RESNET_CUDA_EMULATED). Traced calls (torch.compile, fake/functional tensors) never use the memo, and
the memo's dicts are never touched while compiling.
"""
from __future__ import annotations

import os

import torch

VALIDATED: dict = {}  # validate_key -> ConvGeometry
BN_ADD_VALIDATED: dict = {}  # bn_add_key -> True: bn_add_relu's checks passed
RESOLVED: dict = {}  # resolve_key -> backend name
MAX_ENTRIES = 1024  # a process that keeps changing shapes starts over rather than growing without bound
_ENV = ("TRITON_INTERPRET", "FUSED_RESNET_CUDA_EMULATED")
hits = 0  # for tests: how often an answer came from the memo
in_miss = False  # set while validate runs in full for a miss (its memo step then stands aside)


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


def traced(x) -> bool:
    """Under torch.compile, or x a fake/functional/subclass tensor (or not a tensor): no memo."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def validate_key(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                 padding, dilation, groups, residual, backend):
    """The memo key of a validate call, or None where there is none (traced, not tensors). Not hashed here: the
    memo's lookup hashes it once (`lookup`), and an unhashable argument there means no key. Built inline (a
    function call per tensor cost ~0.25 us, a layer's key ~4 us; issue 30)."""
    if in_miss or traced(x):
        return None
    try:
        return (type(weight), weight.shape, weight.dtype, weight.device, x.shape, x.dtype, x.device,
                None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device),
                None if bn_weight is None else (type(bn_weight), bn_weight.shape, bn_weight.dtype, bn_weight.device),
                None if bn_bias is None else (type(bn_bias), bn_bias.shape, bn_bias.dtype, bn_bias.device),
                None if running_mean is None else (type(running_mean), running_mean.shape, running_mean.dtype,
                                                   running_mean.device, running_mean.requires_grad),
                None if running_var is None else (type(running_var), running_var.shape, running_var.dtype,
                                                  running_var.device, running_var.requires_grad),
                None if residual is None else (type(residual), residual.shape, residual.dtype, residual.device),
                torch.is_grad_enabled(), type(training), training, type(momentum), momentum, type(eps), eps,
                _static(stride), _static(padding), _static(dilation), type(groups), groups, type(backend), backend)
    except AttributeError:  # not tensors: validate says what is wrong
        return None


def lookup(memo: dict, key):
    """(memo's entry for key or None, key or None where it cannot be hashed): one hash of the key."""
    try:
        return memo.get(key), key
    except TypeError:  # an unhashable argument: no key, validate says what is wrong
        return None, None


def _bn_meta(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
    """What validate_bn reads of one BN's arguments."""
    return (_meta(bn_weight), _meta(bn_bias), _meta(running_mean), _meta(running_var),
            running_mean.requires_grad if running_mean is not None else None,
            running_var.requires_grad if running_var is not None else None,
            type(training), training, type(momentum), momentum, type(eps), eps)


def bn_add_key(x, shortcut, backend, bn, shortcut_bn):
    """The memo key of bn_add_relu's checks (validate_bn_add, then validate_bn of each BN: bn and shortcut_bn
    are their (bn_weight, bn_bias, running_mean, running_var, training, momentum, eps), shortcut_bn None for an
    identity shortcut), or None where there is none."""
    if traced(x):
        return None
    try:
        key = (x.shape, x.dtype, x.device, _meta(shortcut), type(backend), backend, torch.is_grad_enabled(),
               _bn_meta(*bn), None if shortcut_bn is None else _bn_meta(*shortcut_bn))
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def resolve_key(backend, device, groups):
    if torch.compiler.is_compiling():
        return None
    try:
        key = (backend, device, groups, _env())
        hash(key)
    except TypeError:
        return None
    return key


def remember(memo: dict, key, value):
    if len(memo) >= MAX_ENTRIES:
        memo.clear()
    memo[key] = value
    return value


def clear():
    VALIDATED.clear()
    BN_ADD_VALIDATED.clear()
    RESOLVED.clear()
