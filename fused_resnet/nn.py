"""Fused modules: FusedBNReLUConv2d and the pre-activation blocks.

Parameters and buffers live in ordinary nn.BatchNorm2d / nn.Conv2d submodules, so state_dicts are the
unfused modules' and weights move both ways. The fused forward never calls those submodules: it hands
their tensors to the fused op.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .backends import CHOICES
from .functional import conv_call, pair_call
from .sync_bn import SyncBatchNorm2d


def _check_pair(bn, conv):
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected (nn.BatchNorm2d, nn.Conv2d), got ({type(bn).__name__}, {type(conv).__name__})")
    if conv.padding_mode != "zeros":
        raise ValueError(f"only padding_mode='zeros' convolutions can be fused, got {conv.padding_mode!r}")
    if bn.num_features != conv.in_channels:
        raise ValueError(f"BatchNorm2d has {bn.num_features} features but the conv expects "
                         f"{conv.in_channels} input channels")


def _check_backend(backend):
    """At construction, so a typo fails where it is made, not at the first forward."""
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(CHOICES)}")
    return backend


def _tensors(bn):
    """(weight, bias, running_mean, running_var, num_batches_tracked) of bn. A plain nn.BatchNorm2d's come from
    its parameter and buffer dicts (nn.Module.__getattr__ costs ~0.3 us a name, seven names a call; issue 30);
    any other class's by attribute, which a subclass or a parametrization (a generated subclass) may define
    otherwise."""
    if type(bn) is nn.BatchNorm2d:
        p, b = bn._parameters, bn._buffers
        # all five where nn.BatchNorm2d registers them: pruning (weight -> weight_orig + a plain attribute), old
        # weight-norm hooks or a user's `del bn.bias; bn.bias = t` move a name out of the dicts, onto the instance
        if "weight" in p and "bias" in p and "running_mean" in b and "running_var" in b and "num_batches_tracked" in b:
            return p["weight"], p["bias"], b["running_mean"], b["running_var"], b["num_batches_tracked"]
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, getattr(bn, "num_batches_tracked", None)


def _momentum(bn, update_running_stats, num_batches_tracked=None):
    """(the EMA factor, whether this call updates bn's running buffers), as nn.BatchNorm2d.forward."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    tracking = bn.training and bn.track_running_stats and update_running_stats
    if tracking and num_batches_tracked is not None and bn.momentum is None:
        factor = 1.0 / float(num_batches_tracked + 1)  # eager reads the counter on the host too
    return factor, tracking


def _conv_tensors(conv):
    """(weight, bias) of conv: a plain nn.Conv2d's from its parameter dict (as _tensors reads a BN's), any other
    class's by attribute."""
    if type(conv) is nn.Conv2d:
        p = conv._parameters
        if "weight" in p and "bias" in p:
            return p["weight"], p["bias"]
    return conv.weight, conv.bias


def _bn_values(bn, update_running_stats, input_stats, out_stats):
    """The functional API's BN arguments for bn in BN_ARGUMENTS' order, and the num_batches_tracked this call counts
    (None when it updates no buffers), as nn.BatchNorm2d.forward decides them."""
    weight, bias, running_mean, running_var, counter = _tensors(bn)
    factor, tracking = _momentum(bn, update_running_stats, counter)
    # process_group only matters to a synchronized BN; a plain one has none (getattr's miss raises and
    # catches an AttributeError inside nn.Module.__getattr__: microseconds per call)
    sync = isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm))
    use_batch_stats = bn.training or (running_mean is None and running_var is None)
    keep_buffers = (not bn.training or bn.track_running_stats) and (update_running_stats or not use_batch_stats)
    return (weight, bias, running_mean if keep_buffers else None, running_var if keep_buffers else None,
            use_batch_stats, factor, bn.eps, input_stats if use_batch_stats else None, out_stats and use_batch_stats,
            sync, getattr(bn, "process_group", None) if sync else None), counter if tracking else None


BN_ARGUMENTS = ("bn_weight", "bn_bias", "running_mean", "running_var", "training", "momentum", "eps", "input_stats",
                "out_stats", "sync_stats", "process_group")


def _bn_arguments(bn, update_running_stats, input_stats, out_stats):
    """_bn_values as the functional API's keyword arguments."""
    values, counter = _bn_values(bn, update_running_stats, input_stats, out_stats)
    return dict(zip(BN_ARGUMENTS, values)), counter


def fused_bn_relu_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d, x, residual=None, *, backend="auto",
                       input_stats=None, out_stats=False, update_running_stats=True, _deferred=False):
    """conv(relu(bn(x))) (+ residual) with nn.BatchNorm2d's exact training/eval semantics.

    Mirrors nn.BatchNorm2d.forward: num_batches_tracked, momentum=None (cumulative average),
    track_running_stats=False. update_running_stats=False lets a second consumer of the same BN use
    batch statistics without updating the buffers a second time. A SyncBatchNorm2d (or nn.SyncBatchNorm)
    bn synchronizes its training statistics over its process group.
    Returns (y, stats_of_y or None). _deferred (the library's blocks, which hand the statistics straight
    to the next fused layer): they may come as a _deferred.PendingStats.
    """
    (bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, input_stats, out_stats, sync,
     group), counter = _bn_values(bn, update_running_stats, input_stats, out_stats)
    weight, bias = _conv_tensors(conv)
    # bn_relu_conv2d_with_stats's body, its arguments by position (20 keyword arguments cost ~2 us a call)
    y, mean, var = conv_call(x, weight, bias, residual, bn_weight, bn_bias, running_mean, running_var, training,
                             momentum, eps, conv.stride, conv.padding, conv.dilation, conv.groups, backend,
                             input_stats, out_stats, sync, group, True, _deferred, counter)
    return y, _stats(mean, var)


def _stats(mean, var):
    """The statistics a fused call hands on: a PendingStats as it is (functional.py returns one in mean's
    place, var None: its merge is left to the next BN's finalize), (mean, var), or None."""
    if mean is None or var is None:
        return mean
    return mean, var


def fused_bn_relu_conv_pair(bn: nn.BatchNorm2d, conv: nn.Conv2d, conv2: nn.Conv2d, x, *, backend="auto",
                            input_stats=None, out_stats=False, _deferred=False):
    """(conv(a), conv2(a), stats of conv(a) or None) for a = relu(bn(x)): one fused op with one autograd
    node (a projection block's conv1 and shortcut), bn's buffers updated once, with fused_bn_relu_conv's
    semantics. Both convs groups=1, padding_mode='zeros'."""
    for c in (conv, conv2):
        _check_pair(bn, c)
        if c.groups != 1:
            raise ValueError(f"a fused conv pair takes groups=1 convolutions, got groups={c.groups}")
    (bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, input_stats, out_stats, sync,
     group), counter = _bn_values(bn, True, input_stats, out_stats)
    weight, bias = _conv_tensors(conv)
    weight2, bias2 = _conv_tensors(conv2)
    y, y2, mean, var = pair_call(x, weight, weight2, bias, bias2, bn_weight, bn_bias, running_mean, running_var,
                                 training, momentum, eps, conv.stride, conv.padding, conv.dilation, conv2.stride,
                                 conv2.padding, conv2.dilation, backend, input_stats, out_stats, sync, group, True,
                                 _deferred, counter)
    return y, y2, _stats(mean, var)


class FusedBNReLUConv2d(nn.Module):
    """conv(relu(bn(x))) (+ residual) as one fused op; `.bn` and `.conv` hold the parameters."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, eps=1e-5, momentum=0.1, backend="auto"):
        super().__init__()
        _check_backend(backend)
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.backend = backend
        self.update_running_stats = True

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d, backend="auto"):
        """Wrap existing modules; their parameters and buffers are reused, not copied."""
        _check_pair(bn, conv)
        _check_backend(backend)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bn, self.conv, self.backend = bn, conv, backend
        self.update_running_stats = True
        return self

    def forward(self, x, residual=None):
        return fused_bn_relu_conv(self.bn, self.conv, x, residual, backend=self.backend,
                                  update_running_stats=self.update_running_stats)[0]

    def extra_repr(self):
        return f"backend={self.backend!r}"


class FusedBNReLUConv2dPair(nn.Module):
    """(conv(a), conv2(a)) for a = relu(bn(x)), one fused op (bn_relu_conv2d_pair): a BN with two conv
    consumers, its buffers updated once and its backward run once on the summed gradient. `.bn`, `.conv`,
    `.conv2` hold the parameters (convert() builds it around a model's own modules)."""

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d, conv2: nn.Conv2d, backend="auto"):
        super().__init__()
        _check_backend(backend)
        for c in (conv, conv2):
            _check_pair(bn, c)
        self.bn, self.conv, self.conv2, self.backend = bn, conv, conv2, backend

    def forward(self, x):
        y, y2, _ = fused_bn_relu_conv_pair(self.bn, self.conv, self.conv2, x, backend=self.backend)
        return y, y2

    def extra_repr(self):
        return f"backend={self.backend!r}"


class PreActBlock(nn.Module):
    """Basic pre-activation block (He et al. 2016):
    out = relu(bn1(x)); sc = shortcut(out) or x; return conv2(relu(bn2(conv1(out)))) + sc.

    fused=False runs the same modules in plain PyTorch (identical state_dict).
    """

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, backend="auto", fused=True):
        super().__init__()
        _check_backend(backend)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        out = planes * self.expansion
        self.shortcut = (nn.Conv2d(in_planes, out, 1, stride, bias=False)
                         if stride != 1 or in_planes != out else None)
        self.backend, self.fused = backend, fused

    def _chain(self):
        return [(self.bn1, self.conv1), (self.bn2, self.conv2)]

    def forward(self, x):
        return self._forward_chain(x, None, False)[0]

    def forward_with_stats(self, x, input_stats=None, want_stats=True):
        """Fused path with statistics passed along: input_stats are x's batch statistics (from the
        previous block's last epilogue); returns (out, (mean, var) of out or None)."""
        out, stats = self._forward_chain(x, input_stats, want_stats)
        return out, (tuple(stats) if stats is not None else None)

    def _forward_chain(self, x, input_stats, want_stats):
        """forward_with_stats whose statistics may stay a _deferred.PendingStats (the model hands them to
        the next block's bn1, whose finalize merges them in its own launch)."""
        if not self.fused:
            return self._forward_plain(x), None
        chain = self._chain()
        out, stats, sc, first = x, input_stats, x, 0
        if self.shortcut is not None:
            # Two consumers of bn1: one fused op for both, so its backward runs bn1's once on the summed
            # gradient (as eager does) and its buffers are updated once.
            bn1, conv1 = chain[0]
            out, sc, stats = fused_bn_relu_conv_pair(bn1, conv1, self.shortcut, x, backend=self.backend,
                                                     input_stats=input_stats, out_stats=True, _deferred=True)
            first = 1
        for i, (bn, conv) in enumerate(chain[first:], first):
            last = i == len(chain) - 1
            out, stats = fused_bn_relu_conv(bn, conv, out, sc if last else None, backend=self.backend,
                                            input_stats=stats, out_stats=want_stats or not last, _deferred=True)
        return out, stats

    def _forward_plain(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        for bn, conv in self._chain()[1:]:
            out = conv(F.relu(bn(out)))
        return out + sc


class PreActBottleneck(PreActBlock):
    """Bottleneck pre-activation block: 1x1 -> 3x3 (stride here) -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1, backend="auto", fused=True):
        nn.Module.__init__(self)
        _check_backend(backend)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        out = planes * self.expansion
        self.shortcut = (nn.Conv2d(in_planes, out, 1, stride, bias=False)
                         if stride != 1 or in_planes != out else None)
        self.backend, self.fused = backend, fused

    def _chain(self):
        return [(self.bn1, self.conv1), (self.bn2, self.conv2), (self.bn3, self.conv3)]
