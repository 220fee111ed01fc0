"""Static figures (sm_90 / sm_80, no GPU) of the projection pair's Triton launches (issue 30): registers,
spills, MMA kind of conv_forward_pair / conv_dgrad_pair beside the single-conv kernels they replace, at the
CIFAR and ResNet-50 projection blocks. `python benchmarks/pair_static.py [--arch 90] [--dtype bfloat16]`."""
import argparse
import sys

import torch

from fused_resnet.bench.kernels import capture, mma_kind, resource_usage
from fused_resnet import triton as kb
from fused_resnet.triton.pair import conv_dgrad_pair, conv_forward_pair
from fused_resnet.triton.forward import conv_forward
from fused_resnet.triton.dgrad import conv_dgrad

# name: (N, C, H, K1, k1, stride1, pad1, K2, stride2)
BLOCKS = {
    "cifar-down-c16-32px": (256, 16, 32, 32, 3, 2, 1, 32, 2),
    "r50-stage1-entry-c64-56px": (128, 64, 56, 64, 1, 1, 0, 256, 1),
    "r50-down-c256-56px": (128, 256, 56, 128, 1, 1, 0, 512, 2),
    "r34-down-c128-28px": (128, 128, 28, 256, 3, 2, 1, 256, 2),
}


def launches(blk, dtype):
    n, c, h, k1, ks, s1, p1, k2, s2 = blk
    meta = dict(device="meta", dtype=dtype)
    fmt = torch.channels_last
    x = torch.empty(n, c, h, h, **meta).contiguous(memory_format=fmt)
    w1 = torch.empty(k1, c, ks, ks, **meta).contiguous(memory_format=fmt)
    w2 = torch.empty(k2, c, 1, 1, **meta).contiguous(memory_format=fmt)
    o1 = (h + 2 * p1 - ks) // s1 + 1
    o2 = (h - 1) // s2 + 1
    y1 = torch.empty(n, k1, o1, o1, **meta).contiguous(memory_format=fmt)
    y2 = torch.empty(n, k2, o2, o2, **meta).contiguous(memory_format=fmt)
    v = torch.empty(c, device="meta", dtype=torch.float32)
    g1 = (s1, s1), (p1, p1), (1, 1)
    g2 = (s2, s2), (0, 0), (1, 1)
    yield "fwd two launches", lambda: (conv_forward(x, w1, None, v, v, v, None, y1, *g1, out_stats=True),
                                       conv_forward(x, w2, None, v, v, v, None, y2, *g2))
    if o1 == o2:
        yield "fwd pair", lambda: conv_forward_pair(x, w1, w2, None, None, v, v, v, y1, y2, *g1, *g2, out_stats=True)
    yield "dgrad two launches", lambda: (conv_dgrad(y2, x, w2, v, v, v, v, False, False, *g2, raw=True),
                                         conv_dgrad(y1, x, w1, v, v, v, v, True, True, *g1, addend=x))
    if s1 == s2:
        yield "dgrad pair", lambda: conv_dgrad_pair(y1, w1, y2, w2, x, v, v, v, v, True, True, *g1, g2[1], g2[2])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--blocks", default="", help="comma-separated names of BLOCKS (default: all)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    print("| block | launches | kernel | grid | config | regs | spill B | mma |")
    print("|---|---|---|---|---|---|---|---|")
    only = set(a.blocks.split(",")) if a.blocks else None
    for name, blk in BLOCKS.items():
        if only and name not in only:
            continue
        for what, fn in launches(blk, dtype):
            sink = []
            with capture(a.arch, sink):
                fn()
            for kname, grid, kernel, args, kwargs in sink:
                if kname.startswith("_bn_finalize") or "finalize" in kname:
                    continue
                regs, stack, _ = resource_usage(kernel.asm["cubin"]).get(kernel.name, (0, 0, 0))
                cfg = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in kwargs.items() if k.startswith("BLOCK"))
                print(f"| {name} | {what} | {kname.strip('_')} | {grid[0]} | {cfg} w{kernel.metadata.num_warps}"
                      f" s{kernel.metadata.num_stages} | {regs} | {stack} | {mma_kind(kernel.asm['ptx'])} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
