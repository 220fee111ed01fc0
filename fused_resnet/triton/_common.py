"""What every Triton launcher shares: interpreter detection, dtype mapping, the MMA helper, tile sizes."""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from .._layout import memory_format_of
from . import configs
from ._launch import bind


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    # Read on first use, not at import: tests set TRITON_INTERPRET before importing triton, and
    # triton decides at kernel definition (our import) whether kernels are interpreted.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side helpers in plain Python: triton.cdiv / next_power_of_2 are constexpr functions whose
# host calls cost microseconds each, dozens of times per layer.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


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
    return max(lo, min(hi, next_pow2(max(int(n), 1))))


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time across every column tile:
    programs running together share their input rows and weight columns in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


def conv_config(kernel: str, m: int, n: int, k: int, taps: int, x: torch.Tensor) -> dict:
    """Launch config for one conv kernel ("fwd", "dgrad", "wgrad") at GEMM size m x n, reduction k per
    tap: the tuned table's entry for this GPU and shape when it has one, else the heuristic."""
    if configs._forced:  # the tuning sweep: decided afresh at every launch
        return configs.lookup(kernel, m, n, k, taps, x) or heuristic_config(kernel, m, n, k, x)
    # Memoized per shape, dtype, layout and device: a step's launches would otherwise rebuild the table key
    # and the heuristic every time (host time that a small layer's launches cannot hide).
    # An answer holds while the table it came from is the one loaded (configs.write and a test's
    # cache_clear load another).
    key = (kernel, m, n, k, taps, x.dtype, x.device, x.dim() == 4 and x.stride(1) == 1,
           memory_format_of(x) == torch.channels_last, ASSUMED_GPU, interpreting())
    table = configs._table()
    hit = configs.memo.get(key)
    if hit is None or hit[0] is not table:
        hit = configs.memo[key] = (table, configs.lookup(kernel, m, n, k, taps, x) or heuristic_config(kernel, m, n, k, x))
    return dict(hit[1])


def launch_plan(memo: dict, key, build, *args):
    """A launcher's per-shape plan (grid, integer arguments, constexprs, scratch shapes: everything it derives
    from shapes, strides, dtypes and flags), built by build(*args) on a miss and kept in memo under key.
    A plan's first element is the tuned table it was built against: one built against another table is
    rebuilt. While the tuning sweep forces configs, every launch builds afresh and nothing is kept.
    Issue 30: this Python ran at every launch, 8-15 us each, where the kernels of a CIFAR layer run 5-30 us."""
    plan = memo.get(key)
    if plan is not None and plan[0] is configs._table() and not configs._forced:  # a forced config: its own plan
        return plan
    plan = build(*args)
    if not configs._forced:
        if len(memo) >= PLAN_ENTRIES:  # a process that keeps changing shapes starts over, not grows
            memo.clear()
        memo[key] = plan
    return plan


PLAN_ENTRIES = 1024


# Scratch and outputs are allocated as torch.empty(*shape, ...): sizes as separate ints parse ~0.8 us faster than a
# tuple (issue 30).
# Launchers launch through their plan's bound launch (plan_launch), which falls back to kernel.run(*args, grid=grid,
# warmup=False, **options): what kernel[grid](...) calls (Triton 3.x), without the proxy lambda that __getitem__
# makes at every launch (~0.5 us of host time a launch; issue 30).


def plan_launch(kernel, grid, kw: dict, ints=()):
    """A plan's launch of kernel on grid with the keyword arguments kw (constexprs and options) and the plan's
    runtime integers `ints` (the parameters just before the constexprs): `launch(*head)` launches
    kernel(*head, *ints, *constexprs), as kernel.run(..., grid=grid, warmup=False, **options) would, through the
    plan's own direct launch (_launch.bind: the signature of what the plan fixes is not rebuilt per launch)."""
    consts, opts = launch_args(kernel, kw)
    return bind(kernel, grid, (*ints, *consts), opts)


def launch_args(kernel, kw: dict):
    """A plan's (constexpr values in the kernel's parameter order, launch options) from the keyword arguments
    of a launch, for kernel.run(*runtime, *constexprs, grid=grid, warmup=False, **options). Triton binds constexprs by
    position as by name; passed positionally, a launch copies two dicts of a dozen entries fewer (2.7 -> 1.35 us a
    launch with the launch itself stubbed, benchmarks/host_overhead.py). The constexprs must be the kernel's
    last parameters, every one of them given."""
    params = list(inspect.signature(kernel.fn).parameters.values())
    names = [p.name for p in params if "constexpr" in str(p.annotation)]
    if [p.name for p in params[len(params) - len(names):]] != names or any(n not in kw for n in names):
        raise TypeError(f"{kernel.fn.__name__}: constexprs {names} must close its parameters and all be given")
    return tuple(kw[n] for n in names), {k: v for k, v in kw.items() if k not in names}


def plan_env():
    """What every conv plan depends on besides its arguments: the fp32 precision switch (fp32_precision) and the
    assumed GPU. The switch read directly: torch.backends.cudnn.allow_tf32's property costs 0.4 us a read."""
    return _allow_tf32(), ASSUMED_GPU


_allow_tf32 = getattr(torch._C, "_get_cudnn_allow_tf32", None) or (lambda: torch.backends.cudnn.allow_tf32)


def heuristic_config(kernel: str, m: int, n: int, k: int, x: torch.Tensor) -> dict:
    """Tiles by shape class. Chosen with the static kernel report (`fused-resnet kernels`): no
    register spills for bf16/fp16 on sm_90 and sm_80 at the benchmark shapes in either layout
    (benchmarks/NOTES.md has the before/after). tl.dot needs every tile dimension >= 16."""
    dtype = x.dtype
    if interpreting():
        # The interpreter runs each program as numpy calls: fewer, larger tiles are faster, and
        # test shapes are tiny, so one size serves.
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=8, GROUP_M=8, num_warps=4, num_stages=2)
    half = dtype in (torch.float16, torch.bfloat16)
    nhwc = x.dim() == 4 and x.stride(1) == 1
    # Without unit stride along channels every element is its own 2-byte load with its own address
    # (no cp.async, no vector load): NCHW needs narrower reduction slices and one stage fewer to stay
    # spill-free.
    block_n = pow2_at_least(n, 16, 128 if nhwc else 64)
    block_k = pow2_at_least(k, 16, 64 if half and nhwc else 32)
    block_m = 128 if m >= 128 * 64 and nhwc else 64
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=num_warps,
                num_stages=3 if nhwc else 2)


# (compute capability as 90 / 80, SM count): set by the static kernel report (bench/kernels.py),
# which picks configs and sizes grids for a GPU that is not here.
ASSUMED_GPU = None


def arch_of(device: torch.device):
    """90 for sm_90 and so on; None where there is no GPU to ask (CPU tensors, the interpreter)."""
    if ASSUMED_GPU is not None:
        return ASSUMED_GPU[0]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def num_sms(device: torch.device) -> int:
    if ASSUMED_GPU is not None:
        return ASSUMED_GPU[1]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
