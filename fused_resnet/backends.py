"""Which backends can run here, why not the others, and which one "auto" picks for a call."""
from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping

import torch

from . import _emulated
from . import _plan

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS


class BackendReport(Mapping):
    """Maps each backend that can run here to where it runs; `.unavailable` maps the rest to why not.

    Iterating, `in` and `list()` see the available backends only, so `"triton" in available_backends()`
    answers the question a caller usually has.
    """

    def __init__(self, available: dict, unavailable: dict):
        self._available = dict(available)
        self.unavailable = dict(unavailable)

    def __getitem__(self, name):
        return self._available[name]

    def __iter__(self):
        return iter(self._available)

    def __len__(self):
        return len(self._available)

    def __repr__(self):
        lines = [f"  {k}: available ({v})" for k, v in self._available.items()]
        lines += [f"  {k}: unavailable ({v})" for k, v in self.unavailable.items()]
        return "fused_resnet backends:\n" + "\n".join(lines)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status():
    """(can run on CUDA tensors, can run on CPU tensors, reason if neither)."""
    if importlib.util.find_spec("triton") is None:
        return False, False, "the triton package is not installed"
    on_cpu = _interpreting()
    on_gpu = torch.cuda.is_available() and not on_cpu
    if on_gpu or on_cpu:
        return on_gpu, on_cpu, ""
    return False, False, "no CUDA GPU visible and TRITON_INTERPRET=1 is not set (CPU interpreter off)"


def _shadowed_install():
    """Another fused_resnet on sys.path that has the built extension, when this one (typically the
    source tree, first on sys.path when running from the repository root) does not; else None."""
    import glob
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        other = os.path.join(os.path.abspath(entry or os.getcwd()), "fused_resnet")
        if os.path.isdir(other) and not os.path.samefile(other, here) and glob.glob(os.path.join(other, "_C*")):
            return other
    return None


def _cuda_status():
    """(available, reason)."""
    if importlib.util.find_spec("fused_resnet._C") is None:
        here = os.path.dirname(os.path.abspath(__file__))
        other = _shadowed_install()
        if other:
            return False, (f"fused_resnet was imported from {here}, which has no extension, and not from the "
                           f"installed copy at {other}, which has it: the current directory shadows the "
                           "install. Run from another directory, or build in place for development with "
                           "`pip install --no-build-isolation -e .`")
        return False, ("extension not built: fused_resnet._C is missing (`pip install --no-build-isolation .` "
                       "builds it where nvcc and a CUDA build of PyTorch exist; FUSED_RESNET_CUDA=1 makes a "
                       "missing toolchain an install error)")
    try:
        from . import _C  # noqa: F401
    except ImportError as e:  # built against another torch/CUDA, or a missing shared library
        return False, f"extension fused_resnet._C is built but does not load: {e}"
    if not torch.cuda.is_available():
        return False, "fused_resnet._C is built but no CUDA GPU is visible"
    return True, ""


def available_backends() -> BackendReport:
    avail, unavail = {"reference": "plain PyTorch, any device"}, {}
    on_gpu, on_cpu, why = _triton_status()
    if on_gpu:
        avail["triton"] = f"CUDA GPU: {torch.cuda.get_device_name()}"
    elif on_cpu:
        avail["triton"] = "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1; slow, for testing)"
    else:
        unavail["triton"] = why
    ok, why = _cuda_status()
    emu_ok, emu_why = _emulated.status() if not ok else (False, "")
    if ok:
        avail["cuda"] = f"CUDA GPU: {torch.cuda.get_device_name()}"
    elif emu_ok:
        avail["cuda"] = ("CPU tensors through the emulated build of the CUDA kernels "
                         "(FUSED_RESNET_CUDA_EMULATED=1; slow, for testing)")
    else:
        unavail["cuda"] = why if not _emulated.requested() else f"{why}; {emu_why}"
    return BackendReport(avail, unavail)


_warned_groups = False
_resolving = False  # set while resolve runs in full for a memo miss


def resolve(backend: str, device: torch.device, groups: int) -> str:
    """The concrete backend for this call, or an error saying why the requested one cannot run it."""
    global _warned_groups, _resolving
    # Memoized per (backend, device, groups, the environment variables read below) (_plan.py): the answer
    # asks importlib and the environment, 10-40 us a call; errors are never memoized.
    key = None if _resolving else _plan.resolve_key(backend, device, groups)
    if key is not None:
        hit = _plan.RESOLVED.get(key)
        if hit is not None:
            _plan.hits += 1
            return hit
        _resolving = True
        try:
            return _plan.remember(_plan.RESOLVED, key, resolve(backend, device, groups))
        finally:
            _resolving = False
    if device.type == "meta":
        # A shape-only run (eager runs on meta tensors too): no kernel can run on tensors without data, so
        # every backend takes the reference path, whose ops propagate shapes and dtypes (and layouts).
        return "reference"
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        if groups != 1:
            if not _warned_groups:
                warnings.warn("fused_resnet: groups != 1 is not fused yet; using the reference backend "
                              "(this warning is shown once)", stacklevel=3)
                _warned_groups = True
            return "reference"
        # Triton first: the CUDA kernels have not yet passed the test matrix on a GPU (README status),
        # so they run only when asked for by name until a GPU pass has validated them.
        if _triton_status()[0]:
            return "triton"
        if _cuda_status()[0]:
            return "cuda"
        return "reference"
    if backend == "reference":
        return backend
    if groups != 1:
        raise NotImplementedError(f"backend={backend!r} supports groups=1 only (got groups={groups}); "
                                  "use backend='auto' or 'reference' for grouped convolutions")
    if backend == "triton":
        on_gpu, on_cpu, why = _triton_status()
        if device.type == "cuda" and on_gpu or device.type == "cpu" and on_cpu:
            return backend
        raise RuntimeError(f"backend='triton' cannot run on {device.type} tensors here: "
                           f"{why or ('CPU tensors need TRITON_INTERPRET=1' if device.type == 'cpu' else 'no CUDA GPU')}")
    ok, why = _cuda_status()
    if ok and device.type == "cuda":
        return backend
    if device.type == "cpu":
        emu_ok, emu_why = _emulated.status()
        if emu_ok:
            return backend
        if _emulated.requested():
            why = emu_why
    raise RuntimeError(f"backend='cuda' is not available: {why or 'it runs on CUDA tensors only'}")
