"""A Triton driver for a machine without a GPU that compiles for a chosen target and launches nothing.

With it (and TRITON_INTERPRET unset), our Triton launchers run on CPU tensors exactly as on a GPU up to the launch
itself: JITFunction.run binds, specializes and looks up (compiling for sm_<arch> with the wheel's ptxas on a miss),
the direct launch (triton/_launch.py) finds its kernel, and the launcher that Triton builds for a compiled kernel is
a recorder that returns at once. What the host does per launch is then measurable here
(benchmarks/host_overhead.py --jit), and what each launch would have handed the GPU can be compared
(tests/test_direct_launch.py). Nothing runs: outputs stay uninitialized.
"""
from __future__ import annotations

import contextlib

import torch

ASSUMED_SMS = {90: 132, 80: 108}  # H100 SXM / A100: what the launchers size split-K grids for


class Launch:
    """What a launch handed the launcher: grid, stream, the kernel's function handle, its arguments."""
    __slots__ = ("grid", "stream", "function", "args")

    def __init__(self, grid, stream, function, args):
        self.grid, self.stream, self.function, self.args = grid, stream, function, args


class _Utils:
    def __init__(self, sms: int):
        self.functions, self.sms = 0, sms

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): a distinct handle per loaded kernel
        self.functions += 1
        return object(), self.functions, 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": self.sms, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def unload_module(self, module):
        pass


class NoLaunchDriver:
    """Triton's driver interface as JITFunction.run and CompiledKernel use it; `record` (a list, or None) receives a
    Launch per launch."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(ASSUMED_SMS[arch])
        self.record = None
        self.launches = 0

    @staticmethod
    def is_active():
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def launcher_cls(self, src, metadata):
        driver = self

        def launch(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
                   *args):
            # the hooks as Triton's launcher calls them, around the launch
            if enter_hook is not None:
                enter_hook(launch_metadata)
            driver.launches += 1
            if driver.record is not None:
                driver.record.append(Launch((grid_x, grid_y, grid_z), stream, function, args))
            if exit_hook is not None:
                exit_hook(launch_metadata)
        return launch


@contextlib.contextmanager
def installed(arch: int = 90):
    """Within: Triton's active driver is a NoLaunchDriver (yielded), and the "triton" backend accepts CPU tensors
    without the interpreter. The kernels must have been defined with TRITON_INTERPRET unset."""
    from triton.runtime import driver

    from .. import _plan, backends
    from ..triton import _common

    if _common.interpreting():
        raise RuntimeError("the no-launch driver runs compiled kernels: TRITON_INTERPRET must be unset")
    fake = NoLaunchDriver(arch)
    status = backends._triton_status
    backends._triton_status = lambda: (True, True, "")
    _plan.clear()
    _common.ASSUMED_GPU = (arch, ASSUMED_SMS[arch])
    driver.set_active(fake)
    try:
        yield fake
    finally:
        driver._active = None  # the next use re-detects
        _common.ASSUMED_GPU = None
        backends._triton_status = status
        _plan.clear()
