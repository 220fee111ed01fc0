"""Launching our compiled Triton kernels without JITFunction.run's per-call argument handling (issue 30).

JITFunction.run, what `kernel[grid](...)` and `kernel.run(...)` call, binds and specializes every argument (a tensor's
dtype and 16-byte alignment, an int's width and whether it is 1 or a multiple of 16), hashes that with the options
into its cache key and looks the compiled kernel up, every launch: 10-18 us a launch for our kernels' 13-56
parameters, on this project's CPUs (benchmarks/host_overhead.py --jit), where a CIFAR layer's kernels run 5-30 us
on a GPU.

`direct_launch(kernel)` gives one of our @triton.jit kernels a `run` of its own that keeps, per signature, the
CompiledKernel that JITFunction.run returned for it. A signature is everything Triton specializes on, and more:
the current device, the launch options, the value of every argument that is neither a tensor nor a float (ints
and constexprs exactly as given, so width and divisibility included), and each tensor's dtype and 16-byte
alignment. (Python floats are fp32 parameters whatever their value: Triton does not specialize on them.) The first
launch of a signature goes through JITFunction.run, which compiles or finds the kernel and launches it; later ones
launch the same CompiledKernel with the call JITFunction.run ends with (`compiled.run(grid..., stream, function,
packed_metadata, launch_metadata, enter hook, exit hook, *args)`, identical in Triton 3.6 and 3.9), on the
current stream, the launch hooks honoured.

JITFunction.run is used as it is whenever one of these holds: the kernel is interpreted (TRITON_INTERPRET=1: the
interpreter's kernels are not wrapped at all), FUSED_RESNET_TRITON_DIRECT=0, JITFunction.run has been replaced
(the launch counter, the kernel report and the tuner patch it to see every launch), the kernel has pre-run hooks,
the grid is a callable, warmup, or a tensor argument position holds something else. Tested against Triton's own
choice of compiled kernel (tests/test_direct_launch.py, through a driver that compiles for sm_90 and launches
nothing).
"""
from __future__ import annotations

import functools
import operator
import os

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

SIGNATURES = 256  # compiled kernels kept per kernel; a process that keeps changing signatures starts over
enabled = os.environ.get("FUSED_RESNET_TRITON_DIRECT", "1") != "0"
verify = False  # tests: every direct launch also asks JITFunction.run (warmup) which kernel it would launch
launches = 0  # direct launches so far (tests, the benchmark)

_ptr = torch.Tensor.data_ptr
_dtype = operator.attrgetter("dtype")


_JIT_RUN = JITFunction.run  # as Triton defines it: a replaced JITFunction.run means someone watches every launch


def direct_launch(kernel):
    """kernel with the direct launch installed (an interpreted kernel comes back as it is)."""
    if type(kernel) is JITFunction:
        kernel.run = _DirectRun(kernel)
    return kernel


def _getter(positions):
    """args -> tuple of args[i] for i in positions, a tuple for any number of positions."""
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    if not positions:
        return lambda args: ()
    return operator.itemgetter(*positions)


class _DirectRun:
    __slots__ = ("kernel", "arity", "tensors", "values", "compiled")

    def __init__(self, kernel):
        self.kernel = kernel
        self.arity = len(kernel.params)
        self.tensors = self.values = None  # argument positions, from the first launch
        self.compiled = {}

    def __call__(self, *args, grid, warmup, **options):
        kernel = self.kernel
        run = type(kernel).run
        if (warmup or run is not _JIT_RUN or not enabled or kernel.pre_run_hooks or len(args) != self.arity
                or type(grid) is not tuple):
            return run(kernel, *args, grid=grid, warmup=warmup, **options)
        drv = driver.active
        device = drv.get_current_device()
        if self.tensors is None:
            self._positions(args)
        try:
            tensors = self.tensors(args)
            aligned = not (functools.reduce(operator.or_, map(_ptr, tensors), 0) & 15)
            key = (device, self.values(args), tuple(options.values()), tuple(map(_dtype, tensors)),
                   aligned or tuple(not (p & 15) for p in map(_ptr, tensors)),
                   knobs.runtime.debug, knobs.compilation.instrumentation_mode)
            compiled = self.compiled.get(key)
        except (AttributeError, TypeError):  # not a tensor where the first launch had one; an unhashable value
            return run(kernel, *args, grid=grid, warmup=warmup, **options)
        if compiled is None:
            compiled = run(kernel, *args, grid=grid, warmup=False, **options)  # compiles if need be, and launches
            if hasattr(compiled, "result"):  # a future, where Triton compiles asynchronously
                compiled = compiled.result()
            # kept only where every position holds what it held at the first launch (a tensor among the values would
            # be keyed by identity: kept alive, never hit again)
            if (type(compiled).__name__ == "CompiledKernel" and getattr(compiled, "function", None) is not None
                    and not any(isinstance(v, torch.Tensor) for v in self.values(args))):
                if len(self.compiled) >= SIGNATURES:
                    self.compiled.clear()
                self.compiled[key] = compiled
            return compiled
        if verify:
            chosen = run(kernel, *args, grid=grid, warmup=True, **options)
            if chosen is not compiled:
                raise AssertionError(f"{kernel.fn.__name__}: the direct launch's kernel is not the one Triton picks")
        global launches
        launches += 1
        # JITFunction.run's last lines, for the kernel it would have found. The launch metadata is only ever read by
        # the enter hooks: not built (~0.8 us) while their chain is empty.
        stream = drv.get_current_stream(device)
        n = len(grid)
        enter = knobs.runtime.launch_enter_hook
        metadata = compiled.launch_metadata(grid, stream, *args) if getattr(enter, "calls", True) else None
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                     compiled.packed_metadata, metadata, enter, knobs.runtime.launch_exit_hook, *args)
        return compiled

    def _positions(self, args):
        tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        values = tuple(i for i, a in enumerate(args) if not isinstance(a, (torch.Tensor, float)))
        self.tensors, self.values = _getter(tensors), _getter(values)
