"""What every Triton launcher shares: interpreter detection, dtype mapping, the MMA helper, tile sizes."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    # Read at call time: tests set TRITON_INTERPRET before importing triton, but a user may not.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# DOT_MODE values handed to the kernels (constexpr).
DOT_NATIVE = 0  # tl.dot on operands in the tensor's dtype (fp16/bf16/fp32 on a GPU)
DOT_UPCAST = 1  # round operands to the tensor's dtype, then tl.dot in fp32: the interpreter's bf16/fp16
#                 tl.dot returns garbage (ENVIRONMENT.md), fp32 on already-rounded operands is exact
DOT_FMA = 2  # broadcast-multiply-sum: fp64 (gradcheck) where tensor cores have no fp64 tl.dot path


_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: float32 for every floating type but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float64:
        return DOT_FMA
    if interpreting() and dtype in (torch.float16, torch.bfloat16):
        return DOT_UPCAST
    return DOT_NATIVE


def fp32_precision() -> str:
    # Follow PyTorch's own switch for convolutions, so "fp32" means what it means for nn.Conv2d.
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


@triton.jit
def mma(acc, a, b, IN_DTYPE: tl.constexpr, DOT_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b, with a/b rounded to IN_DTYPE first (the activation is rounded like eager's)."""
    if DOT_MODE == 0:
        acc = tl.dot(a.to(IN_DTYPE), b.to(IN_DTYPE), acc, input_precision=PRECISION)
    elif DOT_MODE == 1:
        acc = tl.dot(a.to(IN_DTYPE).to(tl.float32), b.to(IN_DTYPE).to(tl.float32), acc)
    else:
        acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    return acc


def pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def gemm_tiles(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Tile sizes for an implicit GEMM with output m x n and reduction k (per filter tap).

    Heuristic, not autotuned yet (tuning awaits GPU measurements, see benchmarks/NOTES.md).
    tl.dot needs every tile dimension >= 16.
    """
    if interpreting():
        # The interpreter runs each program as numpy calls: fewer, larger tiles are faster, and
        # test shapes are tiny, so one size serves.
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=8, num_warps=4, num_stages=2)
    block_n = pow2_at_least(n, 16, 128)
    block_k = pow2_at_least(k, 16, 64 if dtype in (torch.float16, torch.bfloat16) else 32)
    block_m = 128 if m >= 128 * 64 else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=3)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
