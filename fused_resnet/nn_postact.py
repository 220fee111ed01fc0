"""Post-activation ResNet blocks (He et al. 2015; torchvision's BasicBlock and Bottleneck), fused.

Same modules and names as torchvision's blocks (conv1, bn1, conv2, bn2[, conv3, bn3], downsample =
Sequential(conv, BN)), so state_dicts are torchvision's and its pretrained weights load as they are.
fused=False runs torchvision's forward on the same modules.

Fused forward (training), bottleneck:
    z1 = conv1(x)                                  eager conv (x is a ReLU output: no BN before it)
    z2 = conv2(relu(bn1(z1)))                      fused, z2's batch statistics from its epilogue
    z3 = conv3(relu(bn2(z2)))                      fused, statistics from the epilogue
    y  = relu(bn3(z3) + (bn_d(conv_d(x)) or x))    fused_bn_add_relu: one pass, bn3's statistics given
Backward keeps z1, z2, z3 (and conv_d's output): never a BN or ReLU output, never y's pre-activation.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .functional import BN_KEYWORDS, bn_add_relu
from .nn import _bn_arguments, _check_backend, fused_bn_relu_conv
from .sync_bn import SyncBatchNorm2d


def _bn_only(kw):
    """The BN keyword arguments bn_add_relu takes from _bn_arguments' (no conv, no synchronization)."""
    return {k: kw[k] for k in BN_KEYWORDS}


def _synchronized(*bns):
    """Synchronized BNs run the eager block: bn_add_relu has no process-group statistics yet."""
    return any(isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm2d)) for bn in bns)


def fused_bn_add_relu(bn: nn.BatchNorm2d, z, shortcut, shortcut_bn: nn.BatchNorm2d | None = None, *,
                      backend="auto", input_stats=None, shortcut_stats=None, activation="relu"):
    """act(bn(z) + t), t = shortcut or shortcut_bn(shortcut), with nn.BatchNorm2d's exact semantics for
    both BNs (num_batches_tracked, momentum=None, track_running_stats=False): one fused op. input_stats /
    shortcut_stats: the batch statistics of z / shortcut when a producer conv's epilogue has them."""
    kw, counter = _bn_arguments(bn, True, input_stats, False)
    skw, s_counter = _bn_arguments(shortcut_bn, True, shortcut_stats, False) if shortcut_bn is not None else (None, None)
    return bn_add_relu(z, shortcut, **_bn_only(kw), input_stats=kw["input_stats"], backend=backend,
                       activation=activation, shortcut_bn=_bn_only(skw) if skw else None,
                       shortcut_stats=skw["input_stats"] if skw else None, _num_batches_tracked=counter,
                       _shortcut_num_batches_tracked=s_counter)


def _downsample(in_planes, out_planes, stride):
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class PostActBlock(nn.Module):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut), fused."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, backend="auto", fused=True, width=None):
        super().__init__()
        _check_backend(backend)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)
        self.stride, self.backend, self.fused = stride, backend, fused

    def _inner(self):
        """The BN -> ReLU -> conv chain inside the block (after conv1) and the BN that ends it."""
        return [(self.bn1, self.conv2)], self.bn2

    def _projection(self):
        """(conv, BN) of the downsample shortcut, None for an identity shortcut; False when the downsample
        is something else (a user's replacement: the block then runs eager's forward)."""
        d = self.downsample
        if d is None:
            return None
        if (isinstance(d, nn.Sequential) and len(d) == 2 and type(d[0]).forward is nn.Conv2d.forward
                and type(d[1]).forward is nn.BatchNorm2d.forward and not d._forward_hooks and not d._forward_pre_hooks):
            return d[0], d[1]
        return False

    def forward(self, x):
        chain, last_bn = self._inner()
        proj = self._projection()
        if not self.fused or proj is False or _synchronized(*[bn for bn, _ in chain], last_bn, *(proj or ())):
            return self._forward_plain(x)
        out, stats = self.conv1(x), None
        for bn, conv in chain:
            out, stats = fused_bn_relu_conv(bn, conv, out, backend=self.backend, input_stats=stats, out_stats=True,
                                            _deferred=True)
        shortcut = proj[0](x) if proj else x
        if shortcut.dtype != out.dtype:
            # Under autocast an identity shortcut stays float32 beside a bf16 conv output: eager's add promotes,
            # which the fused op (one dtype) does not do.
            return F.relu(last_bn(out) + (proj[1](shortcut) if proj else shortcut))
        return fused_bn_add_relu(last_bn, out, shortcut, proj[1] if proj else None, backend=self.backend,
                                 input_stats=stats)

    def _forward_plain(self, x):
        out = self.conv1(x)
        chain, last_bn = self._inner()
        for bn, conv in chain:
            out = conv(F.relu(bn(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(last_bn(out) + identity)


class PostActBottleneck(PostActBlock):
    """torchvision's Bottleneck (stride on the 3x3, "ResNet v1.5"): 1x1 -> 3x3 -> 1x1 (x4), fused.
    width: the 3x3's channels (torchvision's planes * base_width / 64; wide_resnet50_2 doubles it)."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1, backend="auto", fused=True, width=None):
        nn.Module.__init__(self)
        _check_backend(backend)
        width = width or planes
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)
        self.stride, self.backend, self.fused = stride, backend, fused

    def _inner(self):
        return [(self.bn1, self.conv2), (self.bn2, self.conv3)], self.bn3
