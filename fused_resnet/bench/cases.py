"""Benchmark cases: pre-activation layers, blocks and whole models at the shapes the issue names, and
post-activation (torchvision-style) blocks and resnet50.

Layer cases are BN -> ReLU -> Conv (+ residual when the block adds one there). `--quick` is a subset
of `--full`; `tiny()` shrinks any preset to interpreter-sized shapes for CPU runs (never GPU figures).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "layer" | "block" | "model"
    n: int  # batch
    c: int = 0  # input channels (layer) / in_planes (block)
    k: int = 0  # output channels (layer) / planes (block)
    h: int = 0  # input size (square)
    kernel: int = 3
    stride: int = 1
    residual: bool = False
    block: str = ""  # "basic" | "bottleneck" (pre-activation) | "postact_basic" | "postact_bottleneck" for blocks
    model: str = ""  # a fused_resnet.models factory name for models

    @property
    def padding(self):
        return self.kernel // 2

    @property
    def out_h(self):
        return (self.h + 2 * self.padding - self.kernel) // self.stride + 1


def _layer(name, n, c, k, h, kernel=3, stride=1, residual=False):
    return Case(name, "layer", n, c, k, h, kernel, stride, residual)


# CIFAR pre-activation ResNet (N=256): 3x3 convs at 16/32/64 channels on 32/16/8 pixels; the second
# conv of each block takes the residual; downsampling convs are stride 2 without one.
CIFAR_LAYERS = [
    _layer("cifar-s1-c16-32px", 256, 16, 16, 32, residual=True),
    _layer("cifar-s1-c32-16px", 256, 32, 32, 16, residual=True),
    _layer("cifar-s1-c64-8px", 256, 64, 64, 8, residual=True),
    _layer("cifar-s2-c16-k32-32px", 256, 16, 32, 32, stride=2),
    _layer("cifar-s2-c32-k64-16px", 256, 32, 64, 16, stride=2),
]

# Pre-activation ResNet-50 bottlenecks (N=128): 1x1 reduce, 3x3, 1x1 expand (+ residual) per stage;
# the stride-2 3x3 and the stride-2 1x1 projection of the first block of a stage.
R50_LAYERS = []
for _h, _w, _in in ((56, 64, 256), (28, 128, 512), (14, 256, 1024), (7, 512, 2048)):
    R50_LAYERS += [
        _layer(f"r50-1x1-c{_in}-k{_w}-{_h}px", 128, _in, _w, _h, kernel=1),
        _layer(f"r50-3x3-c{_w}-{_h}px", 128, _w, _w, _h),
        _layer(f"r50-1x1-c{_w}-k{_in}-{_h}px", 128, _w, _in, _h, kernel=1, residual=True),
    ]
for _h, _w, _in in ((56, 128, 256), (28, 256, 512), (14, 512, 1024)):
    R50_LAYERS += [
        _layer(f"r50-3x3s2-c{_w}-{_h}px", 128, _w, _w, _h, stride=2),
        _layer(f"r50-1x1s2-c{_in}-k{2 * _in}-{_h}px", 128, _in, 2 * _in, _h, kernel=1, stride=2),
    ]

BLOCKS = [
    Case("cifar-block-c16-32px", "block", 256, 16, 16, 32, block="basic"),
    Case("cifar-block-c32-16px", "block", 256, 32, 32, 16, block="basic"),
    Case("cifar-block-c64-8px", "block", 256, 64, 64, 8, block="basic"),
    Case("cifar-block-down-c16-32px", "block", 256, 16, 32, 32, stride=2, block="basic"),
    Case("r50-bottleneck-c256-56px", "block", 128, 256, 64, 56, block="bottleneck"),
    Case("r50-bottleneck-c512-28px", "block", 128, 512, 128, 28, block="bottleneck"),
    Case("r50-bottleneck-c1024-14px", "block", 128, 1024, 256, 14, block="bottleneck"),
    Case("r50-bottleneck-c2048-7px", "block", 128, 2048, 512, 7, block="bottleneck"),
    Case("r50-bottleneck-down-c256-56px", "block", 128, 256, 128, 56, stride=2, block="bottleneck"),
    # Post-activation (torchvision's resnet18/50 blocks): conv -> BN -> ReLU inside, relu(bn(z) + shortcut) at
    # the end; the "down" blocks take the downsample conv + BN shortcut.
    Case("cifar-postact-block-c16-32px", "block", 256, 16, 16, 32, block="postact_basic"),
    Case("cifar-postact-block-down-c16-32px", "block", 256, 16, 32, 32, stride=2, block="postact_basic"),
    Case("r50-postact-bottleneck-c256-56px", "block", 128, 256, 64, 56, block="postact_bottleneck"),
    Case("r50-postact-bottleneck-down-c256-56px", "block", 128, 256, 128, 56, stride=2, block="postact_bottleneck"),
]

MODELS = [
    Case("preact_resnet50-224px", "model", 128, 3, 1000, 224, model="preact_resnet50"),
    Case("preact_resnet110-32px", "model", 256, 3, 10, 32, model="preact_resnet110"),
    Case("resnet50-224px", "model", 128, 3, 1000, 224, model="resnet50"),
]

_BY_NAME = {c.name: c for c in BLOCKS}
QUICK = [CIFAR_LAYERS[0], R50_LAYERS[1], R50_LAYERS[8], BLOCKS[0], BLOCKS[6],
         _BY_NAME["r50-postact-bottleneck-c256-56px"], MODELS[1]]
FULL = CIFAR_LAYERS + R50_LAYERS + BLOCKS + MODELS


def tiny(case: Case) -> Case:
    """The same structure at interpreter size: batch 2, channels / 16 (min 2), 6 pixels; a model case
    becomes ResNet-20 at 8x8 (named so: a tiny figure never carries a real model's name)."""
    if case.kind == "model":
        small = "preact_resnet20" if case.model.startswith("preact") else "resnet20"
        return replace(case, n=2, h=8, model=small, name=f"tiny-{small}-8px", k=10)
    scale = lambda v: max(2, v // 16)  # noqa: E731
    return replace(case, n=2, c=scale(case.c), k=scale(case.k), h=6, name=f"tiny-{case.name}")


def preset(name: str, kinds=("layer", "block", "model")):
    cases = {"quick": QUICK, "full": FULL}[name]
    return [c for c in cases if c.kind in kinds]
