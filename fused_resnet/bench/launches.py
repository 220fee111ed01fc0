"""Device operations a piece of code issues, counted the way a profiler trace shows them, on any device.

Every ATen op that launches a kernel on a GPU (views and allocations excluded), seen below autograd
with a TorchDispatchMode, plus every Triton kernel launch (on the GPU and under the CPU interpreter) and
every call into the CUDA backend's extension (one kernel launch each; the real `_C` or its emulated
build; ATen ops the binding itself runs are counted as ATen ops).
fused_resnet's own registered ops are not counted themselves: what runs inside them is. Host
synchronizations (a tensor value read by the host: `.item()`, `float(t)`, a copy to the CPU) are listed
separately: one of them is enough to make a step impossible to capture in a CUDA graph.
"""
from __future__ import annotations

import contextlib
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                "set_"}
_SYNCS = {"_local_scalar_dense", "item"}


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class DeviceOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.syncs = Counter()
        self.inside_launch = False  # the CPU interpreter's own copies in and out are not the kernel's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside_launch:
            return func(*args, **kwargs)
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns == "aten" and name in _SYNCS:
            self.syncs[name] += 1
        elif ns == "aten" and name in ("_to_copy", "copy_", "to") and str(kwargs.get("device", "")) == "cpu":
            self.syncs["copy to cpu"] += 1
        elif ns == "aten" and name not in _ALLOCATIONS and not _is_view(func):
            self.ops[f"aten.{name}"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


# The extension's entry points; each launches exactly one kernel.
CUDA_KERNELS = ("batch_stats", "conv_forward", "conv_forward_pair", "conv_dgrad", "bn_backward_finish", "conv_wgrad", "bn_finalize",
                "column_sums")


def _conv_backward_launches(args):
    """How many of each kernel `conv_backward` (the backward of a layer's convs of one activation in one call,
    csrc/binding.cpp) launches, from its arguments (grad_y, weight, x, mean, scale, beta, invstd, gamma, batch_stats,
    need_dx, need_dw, need_sums, stride, padding, dilation, tf32, relu, num_sms, grad_y2, weight2, stride2, padding2,
    dilation2, need_dw2): a second consumer (grad_y2) adds a raw dgrad, and a wgrad and column_sums for its dW."""
    batch_stats, need_dx, need_dw, need_sums = args[8:12]
    second = len(args) > 18 and args[18] is not None
    need_dw2 = second and bool(args[23])
    batch_stats = batch_stats and need_dx
    need_sums = need_sums or batch_stats
    dgrad = need_dx or need_sums
    return {"conv_dgrad": int(dgrad) * (2 if second else 1), "conv_wgrad": int(need_dw) + int(need_dw2),
            "column_sums": int(need_sums or need_dw) + int(need_dw2), "bn_backward_finish": int(batch_stats)}


# Entry points that launch several of the kernels above: how many of each, from the call's arguments.
CUDA_COMPOSITES = {"conv_backward": _conv_backward_launches}


class _CountedExtension:
    """The CUDA extension module with every kernel entry point counted as "cuda.<name>" (a composite entry point
    as each kernel it launches)."""

    def __init__(self, ext, mode):
        self._ext, self._mode = ext, mode

    def __getattr__(self, name):
        attr = getattr(self._ext, name)
        if name in CUDA_COMPOSITES:
            def composite(*args):
                for kernel, launches in CUDA_COMPOSITES[name](args).items():
                    if launches:
                        self._mode.ops[f"cuda.{kernel}"] += launches
                return attr(*args)
            return composite
        if name not in CUDA_KERNELS:
            return attr

        def launch(*args, **kwargs):
            self._mode.ops[f"cuda.{name}"] += 1
            return attr(*args, **kwargs)
        return launch


@contextlib.contextmanager
def count_device_ops():
    """Within: yields a DeviceOps whose .ops counts ATen kernels, Triton launches ("triton.<name>") and
    CUDA-extension launches ("cuda.<name>")."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    from .. import cuda as cuda_launchers
    from ..triton import _launch  # noqa: F401  (it keeps Triton's own JITFunction.run: before it is replaced here)

    mode = DeviceOps()
    real_ext = cuda_launchers._ext
    cuda_launchers._ext = lambda like: _CountedExtension(real_ext(like), mode)
    run_jit, run_interp = JITFunction.run, interpreter.InterpretedFunction.run

    def counted(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            mode.ops[f"triton.{self.fn.__name__.strip('_')}"] += 1
            mode.inside_launch = True
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                mode.inside_launch = False
        return run

    JITFunction.run = counted(run_jit)
    interpreter.InterpretedFunction.run = counted(run_interp)
    try:
        with mode:
            yield mode
    finally:
        JITFunction.run, interpreter.InterpretedFunction.run = run_jit, run_interp
        cuda_launchers._ext = real_ext
