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
