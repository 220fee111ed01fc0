"""Checks that a converted model is the original model, for any model: the chains found independently
of convert(), one training step compared in float64, and the names and checkpoints.

chains(): which BN -> (ReLU) -> conv chains a model has, found by following tensors through a
TorchFunctionMode while the model runs (F.batch_norm -> a ReLU -> F.conv2d; nn.Module calls go through
those functions too), not by reading fx graphs as convert() does. A chain counts where the batch norm's
output is read only by one ReLU and that ReLU's output only by convolutions, or where the batch norm's
output is read only by convolutions (no activation between, as PyramidNet's units start).
"""
from __future__ import annotations

import copy
import importlib
import os
import pickle
import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

def import_third_party(*names):
    """The named modules, imported the way the CPU wheel allows (torchvision's registry wheel links CUDA
    libraries the CPU torch lacks, so its unguarded fake registrations for detection ops fail in
    torchvision/_meta_registrations.py: an empty module stands in for that one first). Skips the calling
    test module when one is missing, unless FUSED_RESNET_REQUIRE_THIRD_PARTY=1 (CI) makes that a failure."""
    import pytest

    if "torchvision" not in sys.modules:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        return [importlib.import_module(n) for n in names]
    except ImportError as e:  # pragma: no cover - depends on the machine
        if os.environ.get("FUSED_RESNET_REQUIRE_THIRD_PARTY") == "1":
            raise
        pytest.skip(f"{', '.join(names)} not importable here ({e})", allow_module_level=True)


_RELU = {F.relu, torch.relu, torch.relu_, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_CONV = {F.conv2d, torch.conv2d}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
        torch.Tensor.add_}


class _Follow(TorchFunctionMode):
    def __init__(self, names):
        super().__init__()
        self.names = names  # id(parameter or buffer) -> its state_dict name
        self.pre, self.act = {}, {}  # (id, version) of a BN output / of its ReLU output -> BN name
        self.readers = {}  # BN name -> readers of its ReLU output: a conv's name, or None for anything else
        self.pre_readers = {}  # BN name -> readers of its own output: "relu", "add", a conv's name, or None
        self.add_of = {}  # BN name -> (id, version) of the add its output goes into
        self.add_readers = {}  # (id, version) of an add of a BN output -> its readers: "relu" or None
        self.keep = []

    @staticmethod
    def key(t):
        return (id(t), t._version)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        in_keys = [self.key(t) for t in ins]
        out = func(*args, **kwargs)
        self.keep += ins + [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if func is F.batch_norm:
            b = args[1] if len(args) > 1 else kwargs.get("running_mean")
            w = args[3] if len(args) > 3 else kwargs.get("weight")
            name = self.names.get(id(b)) or self.names.get(id(w))
            self.pre[self.key(out)] = (name.rsplit(".", 1)[0] if name and "." in name
                                       else f"F.batch_norm({name})" if name else "F.batch_norm()")
            return out
        for k in in_keys:
            if k in self.add_readers:
                self.add_readers[k].append("relu" if func in _RELU else None)
            if k in self.pre:
                bn = self.pre[k]
                if func in _ADD and len(ins) == 2 and not kwargs and not (
                        func in (torch.Tensor.__iadd__, torch.Tensor.add_) and in_keys[0] not in self.pre):
                    # a post-activation block's end (not `t += bn(x)` into a t that no BN made: that writes
                    # into t, and stays eager)
                    self.pre_readers.setdefault(bn, []).append("add")
                    self.add_of[bn] = self.key(out)
                    self.add_readers.setdefault(self.key(out), [])
                elif func in _RELU:
                    self.act[self.key(out)] = bn
                    self.pre_readers.setdefault(bn, []).append("relu")
                elif func in _CONV and k == in_keys[0]:
                    self.pre_readers.setdefault(bn, []).append(self._conv_name(args, kwargs))
                else:
                    self.pre_readers.setdefault(bn, []).append(None)
            if k in self.act:
                bn = self.act[k]
                if func in _CONV and k == in_keys[0]:
                    self.readers.setdefault(bn, []).append(self._conv_name(args, kwargs))
                else:
                    self.readers.setdefault(bn, []).append(None)
        return out

    def _conv_name(self, args, kwargs):
        w = args[1] if len(args) > 1 else kwargs["weight"]
        name = self.names.get(id(w))
        return name.rsplit(".", 1)[0] if name else "computed"


def chains(model: nn.Module, x) -> Counter:
    """Counter of (BN name, conv name or 'computed', or 'add' / 'add -> ReLU' for a post-activation end) over
    the model's fusable chains: those found in both modes (convert() fuses a module whose forward differs
    between the modes only where both have the chain: a shake-shake unit adds its branches in eval only)."""
    return _chains_in(copy.deepcopy(model).train(), x) & _chains_in(copy.deepcopy(model).eval(), x)


def _chains_in(model: nn.Module, x) -> Counter:
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    follow = _Follow(names)
    with torch.no_grad(), follow:
        model(x)
    out = Counter()
    for bn, pre in follow.pre_readers.items():
        if pre == ["relu"]:  # BN -> ReLU -> convs
            readers = follow.readers.get(bn, [])
            if readers and None not in readers:
                out.update((bn, r) for r in readers)
        elif pre == ["add"]:  # BN -> add (-> ReLU): a post-activation block's end (or its shortcut's BN)
            out[(bn, "add -> ReLU" if follow.add_readers[follow.add_of[bn]] == ["relu"] else "add")] += 1
        elif pre and None not in pre and "relu" not in pre and "add" not in pre:  # BN -> convs, no activation
            out.update((bn, r) for r in pre)
    return out


def fused_chains(report) -> Counter:
    """The same Counter from convert()'s report."""
    out = Counter()
    for e in report:
        if e.fused:
            bn, conv = e.where.split(" -> ", 1)
            if conv.startswith("conv2d() of "):
                rest = conv[len("conv2d() of "):]
                conv = rest.rsplit(".", 1)[0] if not rest.startswith("a weight") else "computed"
            out[(bn, conv)] += 1
    return out


def step(model, x, seed):
    """Output, input gradient, parameter gradients (by state_dict name) and, after one SGD step, the
    state_dict."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # dropout / drop-path draw the same masks in both models
    import random

    random.seed(seed)
    y = model(x)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    loss.backward()
    grads = {k: v.grad.clone() for k, v in model.state_dict(keep_vars=True).items()
             if isinstance(v, nn.Parameter) and v.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
                p.grad = None
    return y.detach(), x.grad, grads, {n: b.clone() for n, b in model.state_dict().items()}


def assert_same(a, b, what, tol=1e-9):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k}]", tol)
        return
    if a.dtype in (torch.int64, torch.long):
        assert torch.equal(a, b), what
        return
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


def assert_converted_is_original(model, conv, x, what, tol=1e-9):
    """Names, modules and checkpoints as the original's; the same outputs, gradients and buffers over a
    training step in both modes (float64: tol is float64 rounding through the network)."""
    assert list(conv.state_dict()) == list(model.state_dict()), f"{what}: state_dict keys"
    assert [n for n, _ in conv.named_parameters()] == [n for n, _ in model.named_parameters()], f"{what}: names"
    assert [n for n, _ in conv.named_modules()] == [n for n, _ in model.named_modules()], f"{what}: module paths"
    for mode in (True, False):
        a, b = copy.deepcopy(model).train(mode), copy.deepcopy(conv).train(mode)
        ra, rb = step(a, x, seed=1), step(b, x, seed=1)
        for part, u, v in zip(("output", "dx", "parameter grads", "state after a step"), ra, rb):
            assert_same(u, v, f"{what}, {'train' if mode else 'eval'}: {part}", tol)
    conv.load_state_dict(model.state_dict(), strict=True)
    copy.deepcopy(model).load_state_dict(conv.state_dict(), strict=True)
    try:
        pickle.dumps(model)
    except Exception:  # noqa: BLE001 - an original that does not pickle (lambdas) cannot be asked to
        return
    again = pickle.loads(pickle.dumps(conv)).eval()
    torch.testing.assert_close(again(x), conv.eval()(x), rtol=0, atol=0)
