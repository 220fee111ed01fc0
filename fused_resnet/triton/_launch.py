"""Launching our compiled Triton kernels without JITFunction.run's per-call argument handling (issue 30).

JITFunction.run, what `kernel[grid](...)` and `kernel.run(...)` call, binds and specializes every argument (a tensor's
dtype and 16-byte alignment, an int's width and whether it is 1 or a multiple of 16), hashes that with the options
into its cache key and looks the compiled kernel up, every launch: 10-18 us a launch for our kernels' 13-56
parameters, on this project's CPUs (benchmarks/host_overhead.py --jit), where a CIFAR layer's kernels run 5-30 us
on a GPU.

`direct_launch(kernel)` gives one of our @triton.jit kernels a `run` of its own that keeps, per signature, the
CompiledKernel that JITFunction.run returned for it. A signature is everything Triton specializes on, and more:
the current device, the launch options by name, every non-tensor argument's type and (but for floats at runtime
parameters, fp32 whatever their value: Triton does not specialize on them) its value, so ints with their width and
divisibility, each tensor's dtype and 16-byte alignment, and the knobs JITFunction.run puts into the options
(debug, instrumentation mode; Triton 3.9's fpsan casts). The first launch of a signature goes through
JITFunction.run, which compiles or finds the kernel and launches it; later ones launch the same CompiledKernel with
the call JITFunction.run ends with (`compiled.run(grid..., stream, function, packed_metadata, launch_metadata,
enter hook, exit hook, *args)`, identical in Triton 3.6 and 3.9), on the current stream, the launch hooks
honoured (the metadata built whenever either hook chain has a hook).

Our launchers go one step further (session 17): each launch plan (_common.launch_plan: what a launcher derives
once per shape) binds its kernel's launch, `bind(kernel, grid, tail, options)`. The plan's integers, constexprs,
grid and options are then constants of that object, so the signature left to build per launch is that of the
arguments the launcher passes at each call, the head: its tensors' dtypes and alignment, its scalars (typed, and
valued but for runtime floats), with the device and the knobs. That needs no audit of which values a plan's key
fixes: whatever the plan fixes is in the tail, whatever it does not is in the head. A miss goes through the
kernel's run (below) and keeps what came back. In one process, interleaved: a conv kernel's launch 4.2-5.6 us
instead of 8.6-10.4 through its run, the statistics kernels' 3.1-5.4 instead of 5.0-7.1, against 0.3-0.8 us for
the no-launch driver's launcher itself (benchmarks/NOTES.md, session 17).

JITFunction.run is used as it is whenever one of these holds: the kernel is interpreted (TRITON_INTERPRET=1: the
interpreter's kernels are not wrapped at all), FUSED_RESNET_TRITON_DIRECT=0, JITFunction.run has been replaced
(the launch counter, the kernel report and the tuner patch it to see every launch), the kernel has pre-run hooks
or global values to check, Triton 3.9's stages-inspection hook is set, the grid is not a tuple, warmup, or an
argument position holds another kind than at the first launch. Tested against Triton's own choice of compiled
kernel, in Triton 3.6 and 3.9 (tests/test_direct_launch.py, through a driver that compiles for sm_90 and launches
nothing). A second reader checked the signature against both Triton versions' JITFunction.run and specialization
(session 16); its findings (argument types, the exit hook's metadata, option names, 3.9's knobs) are in.
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
# Triton 3.9's knobs that JITFunction.run reads into its key: the fpsan casts (an option; 3.6 has no such knob) and
# the stages-inspection hook (when set, part of the key; 3.6 has the knob but not in its key: a set hook only sends
# launches through JITFunction.run there)
_FPSAN = hasattr(knobs.compilation, "fpsan_homomorphic_casts")
_STAGES = hasattr(knobs.runtime, "add_stages_inspection_hook")

_JIT_RUN = JITFunction.run  # as Triton defines it: a replaced JITFunction.run means someone watches every launch


def _stands_aside(kernel) -> bool:
    """Whether a compiled kernel's launches go through JITFunction.run whatever their arguments: it is replaced,
    the direct launch is off, or the kernel has pre-run hooks, global values to check, or (3.9) a stages hook."""
    return (JITFunction.run is not _JIT_RUN or not enabled or kernel.pre_run_hooks or kernel.used_global_vals
            or _STAGES and knobs.runtime.add_stages_inspection_hook is not None)


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
    __slots__ = ("kernel", "arity", "tensors", "values", "scalars", "types", "compiled")

    def __init__(self, kernel):
        self.kernel = kernel
        self.arity = len(kernel.params)
        self.tensors = None  # argument positions, from the first launch (_positions)
        self.compiled = {}

    def __call__(self, *args, grid, warmup, **options):
        kernel = self.kernel
        run = type(kernel).run
        if warmup or len(args) != self.arity or type(grid) is not tuple or _stands_aside(kernel):
            return run(kernel, *args, grid=grid, warmup=warmup, **options)
        drv = driver.active
        device = drv.get_current_device()
        if self.tensors is None:
            _positions(self, args)
        try:
            tensors = self.tensors(args)
            aligned = not (functools.reduce(operator.or_, map(_ptr, tensors), 0) & 15)
            # Every scalar at a runtime parameter of the type it had at the first launch (True == 1 == 1.0 as values,
            # where Triton tells them apart; constexprs it keys by value, as we do): compared, not hashed; then the
            # values of all but the runtime floats.
            if tuple(map(type, self.scalars(args))) != self.types:
                return run(kernel, *args, grid=grid, warmup=warmup, **options)
            values = self.values(args)
            key = (device, values, tuple(options.items()), tuple(map(_dtype, tensors)),
                   aligned or tuple(not (p & 15) for p in map(_ptr, tensors)), knobs.runtime.debug,
                   knobs.compilation.instrumentation_mode, knobs.compilation.fpsan_homomorphic_casts if _FPSAN else None)
            compiled = self.compiled.get(key)
        except (AttributeError, TypeError):  # not a tensor where the first launch had one; an unhashable value
            return run(kernel, *args, grid=grid, warmup=warmup, **options)
        if compiled is None:
            compiled = run(kernel, *args, grid=grid, warmup=False, **options)  # compiles if need be, and launches
            if hasattr(compiled, "result"):  # a future, where Triton compiles asynchronously
                compiled = compiled.result()
            if type(compiled).__name__ == "CompiledKernel" and getattr(compiled, "function", None) is not None:
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
        # the launch hooks: not built (~0.8 us) while both their chains are empty.
        stream = drv.get_current_stream(device)
        n = len(grid)
        enter, exit_, metadata = _hooks(compiled, grid, stream, args)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                     compiled.packed_metadata, metadata, enter, exit_, *args)
        return compiled


def _positions(run, args):
    """run's getters over a launch's arguments (a _DirectRun's all, a plan's head), from its first launch: tensors;
    non-tensors keyed by value (all but floats at runtime parameters: Triton makes those fp32 whatever their value;
    a constexpr float is part of the kernel); scalars at runtime parameters, and their types."""
    constexpr = [p.is_constexpr for p in run.kernel.params]
    kinds = ["tensor" if isinstance(a, torch.Tensor) else "float" if type(a) is float and not constexpr[i]
             else "value" for i, a in enumerate(args)]
    run.values = _getter(tuple(i for i, k in enumerate(kinds) if k == "value"))
    run.scalars = _getter(tuple(i for i, k in enumerate(kinds) if k != "tensor" and not constexpr[i]))
    run.tensors = _getter(tuple(i for i, k in enumerate(kinds) if k == "tensor"))
    run.types = tuple(map(type, run.scalars(args)))


def _hooks(compiled, grid, stream, args):
    """(enter hook, exit hook, launch metadata) for compiled.run: an empty hook chain is passed as None, which
    Triton's launcher skips (the chain's call would do nothing, ~0.3 us each), and the metadata, which only the
    hooks read, is built (~0.8 us) only for a chain that has hooks."""
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if not getattr(enter, "calls", True):
        enter = None
    if not getattr(exit_, "calls", True):
        exit_ = None
    if enter is None and exit_ is None:
        return None, None, None
    return enter, exit_, compiled.launch_metadata(grid, stream, *args)


def bind(kernel, grid, tail, options):
    """A launcher plan's launch of kernel: `bound(*head)` launches kernel(*head, *tail) on grid with options,
    as kernel.run(*head, *tail, grid=grid, warmup=False, **options) would."""
    return _Bound(kernel, tuple(grid), tuple(tail), dict(options))


class _Bound:
    """The direct launch narrowed to one plan (issue 30): grid, tail (the plan's integers and constexprs) and
    options are constants of the object, so the signature left to key per launch is the head's: its tensors'
    dtypes and 16-byte alignment, its scalars (typed, valued but for runtime floats, as _DirectRun keys them), the
    current device and the knobs. A miss launches through the kernel's run (the direct launch, then JITFunction.run)
    and keeps the kernel that came back; every condition under which _DirectRun steps aside sends the launch there."""
    __slots__ = ("kernel", "grid", "tail", "options", "dims", "tensors", "values", "scalars", "types", "cache")

    def __init__(self, kernel, grid, tail, options):
        self.kernel, self.grid, self.tail, self.options = kernel, grid, tail, options
        n = len(grid)
        self.dims = (grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1)
        self.tensors = None
        self.cache = {}

    def __call__(self, *head):
        kernel = self.kernel
        if type(kernel) is not JITFunction or _stands_aside(kernel):  # interpreted, or JITFunction.run's to make
            return self._through_run(head)
        drv = driver.active
        device = drv.get_current_device()
        if self.tensors is None:
            _positions(self, head)  # the head's positions are the kernel's first parameters
        try:
            tensors = self.tensors(head)
            ptrs = tuple(map(_ptr, tensors))
            if self.types and tuple(map(type, self.scalars(head))) != self.types:
                return self._through_run(head)
            key = (device, not (functools.reduce(operator.or_, ptrs, 0) & 15) or tuple(not (p & 15) for p in ptrs),
                   tuple(map(_dtype, tensors)), self.values(head), knobs.runtime.debug,
                   knobs.compilation.instrumentation_mode, knobs.compilation.fpsan_homomorphic_casts if _FPSAN else None)
            entry = self.cache.get(key)
        except (AttributeError, TypeError):  # not a tensor where the first launch had one; an unhashable value
            return self._through_run(head)
        if entry is None:
            compiled = self._through_run(head)
            if type(compiled).__name__ == "CompiledKernel" and getattr(compiled, "function", None) is not None:
                if len(self.cache) >= SIGNATURES:
                    self.cache.clear()
                self.cache[key] = (compiled, compiled.run, compiled.function, compiled.packed_metadata)
            return compiled
        compiled, run, function, packed = entry
        if verify:
            chosen = _JIT_RUN(kernel, *head, *self.tail, grid=self.grid, warmup=True, **self.options)
            if chosen is not compiled:
                raise AssertionError(f"{kernel.fn.__name__}: the plan's kernel is not the one Triton picks")
        global launches
        launches += 1
        stream = drv.get_current_stream(device)
        runtime = knobs.runtime
        if getattr(runtime.launch_enter_hook, "calls", True) or getattr(runtime.launch_exit_hook, "calls", True):
            enter, exit_, metadata = _hooks(compiled, self.grid, stream, head + self.tail)
            run(*self.dims, stream, function, packed, metadata, enter, exit_, *head, *self.tail)
        else:  # _hooks' answer for two empty chains, without building the arguments twice (~0.2 us a launch)
            run(*self.dims, stream, function, packed, None, None, None, *head, *self.tail)
        return compiled

    def _through_run(self, head):
        """The launch through the kernel's own run: the direct launch, which may leave it to JITFunction.run (or the
        interpreter's run)."""
        return self.kernel.run(*head, *self.tail, grid=self.grid, warmup=False, **self.options)
