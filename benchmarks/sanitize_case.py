"""A small case of every kernel of one backend, for compute-sanitizer (memcheck, racecheck):

  compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py --backend cuda

Batch statistics, forward (with and without residual, bias and output statistics), dgrad with the fused
BN-backward sums and the dx finish, and split-K wgrad; in fp32, bf16 (tensor-core path), fp16 and fp64;
NCHW and channels_last; stride 1 and 2; channel counts that are not a multiple of any tile, and for
channels_last fp16/bf16/fp32 also 24 -> 16 channels (the CUDA backend's mma.sync forward, phase-split dgrad
and wgrad: cp.async rings; fp32 through TF32, PyTorch's default torch.backends.cudnn.allow_tf32), 64 -> 16
(the forward's wide slices in dynamic shared memory) and 16 -> 24 (the forward's 32-byte half slices, the
128x16 and 128x32 tiles of forward and dgrad); the pair op
of a projection block (raw dgrad, dgrad with an addend, written in place). Checks
the result against the reference too, so a kernel that reads out of bounds silently still fails here.
"""
import argparse
import sys

import torch

import fused_resnet
from fused_resnet import reference


def one(backend, dtype, channels_last, stride, residual, device="cuda", c=19, k=21, pair=False):
    """None when every output and gradient matches the reference, else what did not. pair: the op of a
    projection block's conv1 and shortcut (bn_relu_conv2d_pair, with a 1x1 second conv of the same stride;
    no residual): its backward's raw dgrad and the dgrad that adds it in."""
    g = torch.Generator(device=device).manual_seed(0)
    n, h = 2, 9  # odd sizes: every tile edge is a partial one
    x = torch.randn(n, c, h, h, device=device, dtype=dtype, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(k, c, 3, 3, device=device, dtype=dtype, generator=g) * (9 * c) ** -0.5)
    if channels_last:  # as in a model converted with .to(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    oh = (h + 2 - 3) // stride + 1
    r = torch.randn(n, k, oh, oh, device=device, dtype=dtype, generator=g) if residual else None
    bn_w = (torch.rand(c, device=device, generator=g) + 0.5).to(dtype if dtype == torch.float64 else torch.float32)
    bn_b = torch.randn(c, device=device, generator=g).to(bn_w.dtype)
    bias = torch.randn(k, device=device, dtype=dtype, generator=g)
    w2 = torch.randn(k + 8, c, 1, 1, device=device, dtype=dtype, generator=g) * c ** -0.5
    if channels_last:
        w2 = w2.contiguous(memory_format=torch.channels_last)
    outs = []
    for impl in (backend, "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bn_w, bn_b) + ((w2,) if pair else ())]
        bn = dict(bn_weight=leaves[2], bn_bias=leaves[3], running_mean=torch.zeros(c, device=device, dtype=bn_w.dtype),
                  running_var=torch.ones(c, device=device, dtype=bn_w.dtype), training=True,
                  **({"backend": backend} if impl == backend else {}))
        if pair:
            fn = fused_resnet.bn_relu_conv2d_pair if impl == backend else reference.bn_relu_conv2d_pair
            ys = fn(leaves[0], leaves[1], leaves[4], bias, stride=stride, padding=1, stride2=stride, **bn)
        else:
            fn = fused_resnet.bn_relu_conv2d if impl == backend else reference.bn_relu_conv2d
            ys = (fn(leaves[0], leaves[1], bias, stride=stride, padding=1, residual=r, **bn),)
        torch.autograd.backward(ys, [torch.ones_like(y) * 0.01 + y.detach() * 0.1 for y in ys])
        outs.append([y.detach().double() for y in ys] + [t.grad.double() for t in leaves])
    if device == "cuda":
        torch.cuda.synchronize()
    tol = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 2e-1}[dtype]
    names = ("y", "y2", "dx", "dw", "dgamma", "dbeta", "dw2") if pair else ("y", "dx", "dw", "dgamma", "dbeta")
    for name, a, b in zip(names, *outs):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        if not err <= tol:
            return f"{name} relative error {err:.2e} > {tol:.0e}"
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["triton", "cuda"], required=True)
    p.add_argument("--quick", action="store_true",
                   help="one small case: bf16 channels_last 24 -> 16, stride 1 with residual (the tensor-core "
                        "kernels of the CUDA backend), the GPU pass's memcheck/racecheck case")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        why = one(args.backend, torch.bfloat16, True, 1, True, c=24, k=16)
        print(f"{args.backend} bfloat16 channels_last s1 C=24 K=16: {'ok' if why is None else 'FAIL ' + why}")
        return 0 if why is None else 1
    bad = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for channels_last in (False, True):
            mma = channels_last and dtype != torch.float64
            for stride, residual, pair in ((1, True, False), (2, False, False), (2, False, True)):
                # 64 -> 16: the CUDA forward's wide 128-byte slices (dynamic shared memory; fp32 from 32 channels);
                # 16 -> 24: its 32-byte half slices (16-bit; fp32's are at 8 channels)
                for c, k in ((19, 21), (24, 16), (64, 16), (16, 24)) if mma else ((19, 21),):
                    why = one(args.backend, dtype, channels_last, stride, residual, c=c, k=k, pair=pair)
                    tag = (f"{args.backend} {str(dtype)[6:]} {'channels_last' if channels_last else 'nchw'} "
                           f"s{stride} C={c} K={k}{' pair (conv1 + 1x1 shortcut)' if pair else ''}")
                    print(f"{tag}: {'ok' if why is None else 'FAIL ' + why}")
                    bad += why is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
