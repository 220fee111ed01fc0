"""The fused op in plain PyTorch: the oracle every backend is tested against.

This is deliberately the unfused, eager composition (BN, ReLU, Conv, Add as separate ops) so that it
shares no code with the kernels it checks. Autograd differentiates it; nothing here is clever.
"""
from __future__ import annotations

import torch.nn.functional as F


def _act(a, activation):
    return F.relu(a) if activation == "relu" else a


def bn_relu_conv2d(
    x,
    weight,
    bias=None,
    *,
    bn_weight=None,
    bn_bias=None,
    running_mean=None,
    running_var=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    residual=None,
    activation="relu",
):
    a = _act(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps), activation)
    y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
    return y if residual is None else y + residual


def bn_relu_conv2d_pair(
    x,
    weight,
    weight2,
    bias=None,
    bias2=None,
    *,
    bn_weight=None,
    bn_bias=None,
    running_mean=None,
    running_var=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    stride=1,
    padding=0,
    dilation=1,
    stride2=1,
    padding2=0,
    dilation2=1,
    activation="relu",
):
    a = _act(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps), activation)
    return (F.conv2d(a, weight, bias, stride, padding, dilation),
            F.conv2d(a, weight2, bias2, stride2, padding2, dilation2))


def bn_add_relu(x, shortcut, *, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, training=False,
                momentum=0.1, eps=1e-5, shortcut_bn=None, activation="relu"):
    """act(batch_norm(x) + shortcut), the shortcut through its own batch_norm when shortcut_bn (a dict of
    bn_weight, bn_bias, running_mean, running_var, training, momentum, eps) is given."""
    y = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if shortcut_bn is not None:
        b = shortcut_bn
        shortcut = F.batch_norm(shortcut, b.get("running_mean"), b.get("running_var"), b.get("bn_weight"),
                                b.get("bn_bias"), b.get("training", False), b.get("momentum", 0.1), b.get("eps", 1e-5))
    return _act(y + shortcut, activation)
