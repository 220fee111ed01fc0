"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks"), and the
post-activation ResNets (He et al. 2015) at the end of this file.

fused=True runs every BN->ReLU->Conv through the fused op and passes each block's output statistics
(from its last conv's epilogue) to the next block's bn1; fused=False runs the same modules in plain
PyTorch. Both have the same state_dict keys, so weights move both ways with strict loading.

Every factory also takes in_channels (default 3) and sync_stats (default False: True makes every BN a
SyncBatchNorm2d, for DistributedDataParallel training with process-group-wide batch statistics).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .nn import PreActBlock, PreActBottleneck, _check_backend
from .nn_postact import PostActBlock, PostActBottleneck
from .sync_bn import convert_sync_batchnorm


class PreActResNet(nn.Module):
    def __init__(self, block, num_blocks, planes, stem, num_classes, fused=True, backend="auto", in_channels=3,
                 sync_stats=False):
        super().__init__()
        self.fused, self.backend = fused, _check_backend(backend)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
            self.maxpool = None
        in_planes = self.conv1.out_channels
        for i, (p, n) in enumerate(zip(planes, num_blocks)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, p, stride if j == 0 else 1, backend=backend, fused=fused))
                in_planes = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(planes)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if sync_stats:  # every BN, fused or not, uses the process group's batch statistics in training
            convert_sync_batchnorm(self)

    def blocks(self):
        for i in range(self.num_stages):
            yield from getattr(self, f"layer{i + 1}")

    def forward(self, x):
        x = self.conv1(x)
        if self.maxpool is not None:
            x = self.maxpool(x)
        blocks = list(self.blocks())
        stats = None
        for i, blk in enumerate(blocks):
            if self.fused:
                # The last block's statistics would feed the plain final BN, which computes its own.
                x, stats = blk._forward_chain(x, stats, want_stats=i < len(blocks) - 1)
            else:
                x = blk(x)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


def _imagenet(block, layers, num_classes, fused, backend, **kw):
    return PreActResNet(block, layers, (64, 128, 256, 512), "imagenet", num_classes, fused, backend, **kw)


def _cifar(block, depth, per_block_layers, num_classes, fused, backend, **kw):
    n = (depth - 2) // per_block_layers
    return PreActResNet(block, (n, n, n), (16, 32, 64), "cifar", num_classes, fused, backend, **kw)


def preact_resnet18(num_classes=1000, fused=True, backend="auto", **kw):
    return _imagenet(PreActBlock, (2, 2, 2, 2), num_classes, fused, backend, **kw)


def preact_resnet34(num_classes=1000, fused=True, backend="auto", **kw):
    return _imagenet(PreActBlock, (3, 4, 6, 3), num_classes, fused, backend, **kw)


def preact_resnet50(num_classes=1000, fused=True, backend="auto", **kw):
    return _imagenet(PreActBottleneck, (3, 4, 6, 3), num_classes, fused, backend, **kw)


def preact_resnet101(num_classes=1000, fused=True, backend="auto", **kw):
    return _imagenet(PreActBottleneck, (3, 4, 23, 3), num_classes, fused, backend, **kw)


def preact_resnet152(num_classes=1000, fused=True, backend="auto", **kw):
    return _imagenet(PreActBottleneck, (3, 8, 36, 3), num_classes, fused, backend, **kw)


def preact_resnet20(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar(PreActBlock, 20, 6, num_classes, fused, backend, **kw)


def preact_resnet32(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar(PreActBlock, 32, 6, num_classes, fused, backend, **kw)


def preact_resnet44(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar(PreActBlock, 44, 6, num_classes, fused, backend, **kw)


def preact_resnet56(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar(PreActBlock, 56, 6, num_classes, fused, backend, **kw)


def preact_resnet110(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar(PreActBlock, 110, 6, num_classes, fused, backend, **kw)


def preact_resnet164(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar(PreActBottleneck, 164, 9, num_classes, fused, backend, **kw)


def preact_resnet1001(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar(PreActBottleneck, 1001, 9, num_classes, fused, backend, **kw)


# ----------------------------------------------------------------------------------------------------
# Post-activation ResNets (He et al. 2015, "Deep Residual Learning for Image Recognition"): the original
# ResNet, with torchvision's module names (conv1, bn1, layer1..4, fc; blocks as in nn_postact.py), so a
# torchvision checkpoint loads into the ImageNet nets as it is. The stem's BN -> ReLU -> max-pool stays
# eager (its ReLU output feeds a max-pool, not a conv). The CIFAR nets (16/32/64 channels, 6n+2 layers)
# use projection shortcuts (a 1x1 conv and BN, the paper's option B) where the shape changes.


class ResNet(nn.Module):
    def __init__(self, block, layers, planes=(64, 128, 256, 512), stem="imagenet", num_classes=1000, fused=True,
                 backend="auto", in_channels=3, sync_stats=False, width_per_group=64):
        super().__init__()
        self.fused, self.backend = fused, _check_backend(backend)
        width0 = 64 if stem == "imagenet" else 16
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width0, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        in_planes = width0
        for i, (p, n) in enumerate(zip(planes, layers)):
            blocks = []
            for j in range(n):
                width = p * width_per_group // 64 if block is PostActBottleneck else None
                blocks.append(block(in_planes, p, (1 if i == 0 else 2) if j == 0 else 1, backend=backend,
                                    fused=fused, width=width))
                in_planes = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if sync_stats:
            convert_sync_batchnorm(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes=1000, fused=True, backend="auto", **kw):
    return ResNet(PostActBlock, (2, 2, 2, 2), num_classes=num_classes, fused=fused, backend=backend, **kw)


def resnet34(num_classes=1000, fused=True, backend="auto", **kw):
    return ResNet(PostActBlock, (3, 4, 6, 3), num_classes=num_classes, fused=fused, backend=backend, **kw)


def resnet50(num_classes=1000, fused=True, backend="auto", **kw):
    return ResNet(PostActBottleneck, (3, 4, 6, 3), num_classes=num_classes, fused=fused, backend=backend, **kw)


def resnet101(num_classes=1000, fused=True, backend="auto", **kw):
    return ResNet(PostActBottleneck, (3, 4, 23, 3), num_classes=num_classes, fused=fused, backend=backend, **kw)


def resnet152(num_classes=1000, fused=True, backend="auto", **kw):
    return ResNet(PostActBottleneck, (3, 8, 36, 3), num_classes=num_classes, fused=fused, backend=backend, **kw)


def wide_resnet50_2(num_classes=1000, fused=True, backend="auto", **kw):
    return ResNet(PostActBottleneck, (3, 4, 6, 3), num_classes=num_classes, fused=fused, backend=backend,
                  width_per_group=128, **kw)


def _cifar_postact(depth, num_classes, fused, backend, **kw):
    n = (depth - 2) // 6
    return ResNet(PostActBlock, (n, n, n), (16, 32, 64), "cifar", num_classes, fused, backend, **kw)


def resnet20(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar_postact(20, num_classes, fused, backend, **kw)


def resnet32(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar_postact(32, num_classes, fused, backend, **kw)


def resnet44(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar_postact(44, num_classes, fused, backend, **kw)


def resnet56(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar_postact(56, num_classes, fused, backend, **kw)


def resnet110(num_classes=10, fused=True, backend="auto", **kw):
    return _cifar_postact(110, num_classes, fused, backend, **kw)
