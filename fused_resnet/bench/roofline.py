"""The least work a layer case must do, and what this device can do, measured in the same run.

Bytes: every tensor the op cannot avoid touching, once (an ideal fused kernel). Inference: read x, W
(+ residual), write y. Training adds the batch-statistics read of x and the backward: read g, x, W,
write dx, dW (the activation is rebuilt from x, never stored). FLOPs: 2*N*K*OH*OW*C*KH*KW forward,
three times that for training (forward, dgrad, wgrad).
"""
from __future__ import annotations

import torch

from .cases import Case
from .timing import measure


def layer_cost(case: Case, mode: str, itemsize: int):
    x = case.n * case.c * case.h * case.h
    y = case.n * case.k * case.out_h * case.out_h
    w = case.k * case.c * case.kernel * case.kernel
    elems = x + w + y + (y if case.residual else 0)
    flops = 2 * y * case.c * case.kernel * case.kernel
    if mode == "training":
        elems += x + (y + x + w) + (x + w)  # stats read; backward reads g, x, W and writes dx, dW
        flops *= 3
    return elems * itemsize, flops


def device_peaks(device: torch.device, dtype: torch.dtype):
    """Measured HBM bandwidth (GB/s, a device copy) and matmul rate (TFLOP/s in dtype) on this device."""
    big = device.type == "cuda"
    n = (1 << 28) if big else (1 << 22)  # bytes per buffer: 256 MiB on a GPU, 4 MiB on a CPU
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = measure(lambda i: dst.copy_(src), 1, device, warmup=3, reps=20)["median_ms"]
    gbps = 2 * n / (t * 1e-3) / 1e9
    m = 8192 if big else 256
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t = measure(lambda i: a @ b, 1, device, warmup=3, reps=20)["median_ms"]
    tflops = 2 * m ** 3 / (t * 1e-3) / 1e12
    return {"hbm_gbps": gbps, "matmul_tflops": tflops}


def roofline_fraction(case: Case, mode: str, itemsize: int, median_ms: float, peaks: dict):
    """(achieved GB/s, % of the roofline time): the roofline time is the larger of bytes / bandwidth
    and FLOPs / matmul rate, so 100% means the op ran as fast as the device allows."""
    nbytes, flops = layer_cost(case, mode, itemsize)
    seconds = median_ms * 1e-3
    ideal = max(nbytes / (peaks["hbm_gbps"] * 1e9), flops / (peaks["matmul_tflops"] * 1e12))
    return nbytes / seconds / 1e9, 100.0 * ideal / seconds
