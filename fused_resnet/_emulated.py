"""The CUDA backend's kernels built as host C++ and run on CPU tensors: backend="cuda" without a GPU.

csrc/emu supplies host twins of the CUDA runtime, element types and WMMA (its header says what it models
and what it cannot); the kernel files and the binding are the same sources the GPU build compiles. With
FUSED_RESNET_CUDA_EMULATED=1, `backend="cuda"` takes CPU tensors through this build (built on first use
into build/emulated/, about a minute; `python -m fused_resnet._emulated` builds it up front). It is for
testing -- slow, one host thread per CUDA thread -- and is how CI runs the CUDA matrix. A ThreadSanitizer
variant (`load(tsan=True)`, loaded in a process started with libtsan preloaded) checks the kernels'
barriers.
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ENV = "FUSED_RESNET_CUDA_EMULATED"
ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# -ffp-contract=off: no fused multiply-add the source did not ask for (nvcc does not contract across the
# kernels' __fadd_rn/__fmul_rn either, and the tests compare rounding-sensitive masks with eager's).
_FLAGS = ["-std=c++20", "-O2", "-ffp-contract=off", "-DFUSED_RESNET_EMULATED", "-pthread",
          "-Wall", "-Wno-unknown-pragmas", "-Wno-missing-field-initializers", "-Wno-sign-compare"]
_TSAN_FLAGS = ["-fsanitize=thread", "-g", "-O1"]


def _to_stderr(message: str):
    print(message, file=sys.stderr, flush=True)


# How the build announces itself (a minute or more of silence otherwise); tests/conftest.py points it past
# pytest's output capture, so even `pytest --collect-only` says what it is doing.
announce = _to_stderr


def requested() -> bool:
    return os.environ.get(ENV, "0") == "1"


def _kernel_sources():
    lines = (CSRC / "SOURCES").read_text().splitlines()
    return [CSRC / l.strip() for l in lines if l.strip() and not l.startswith("#")]


def _digest(flags) -> str:
    import torch

    h = hashlib.sha256(" ".join(flags + [torch.__version__]).encode())
    compiled = {".h", ".cuh", ".cu", ".cpp"}  # what the build reads (a README edit does not rebuild)
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file() and (p.suffix in compiled or p.name == "SOURCES")):
        h.update(str(path.relative_to(CSRC)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_dir(tsan: bool = False) -> Path:
    flags = _FLAGS + (_TSAN_FLAGS if tsan else [])
    return ROOT / "build" / "emulated" / (("tsan-" if tsan else "") + _digest(flags))


def missing_reason():
    """Why the emulated build cannot be made here, or None."""
    if not (CSRC / "SOURCES").is_file():
        return f"the emulated build compiles csrc/ from a source checkout; {CSRC} is not there"
    from shutil import which

    if which("c++") is None and which("g++") is None:
        return "no host C++ compiler (c++/g++) on PATH"
    return None


@functools.lru_cache(maxsize=None)
def load(tsan: bool = False, verbose: bool = False):
    """Builds (once per source state) and imports the emulated extension; raises on any failure."""
    from torch.utils import cpp_extension

    why = missing_reason()
    if why:
        raise RuntimeError(why)
    flags = _FLAGS + (_TSAN_FLAGS if tsan else [])
    out = build_dir(tsan)
    out.mkdir(parents=True, exist_ok=True)
    # cpp_extension compiles .cu with nvcc; the kernels enter as host C++ through one wrapper each.
    wrappers = []
    for src in _kernel_sources():
        wrapper = out / (src.stem + ".emu.cpp")
        text = f'#include "{src}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        wrappers.append(str(wrapper))
    fresh = not any(out.glob("fused_resnet_emulated_*.so"))
    if fresh:
        announce(f"fused_resnet: building the emulated CUDA kernels{' (ThreadSanitizer)' if tsan else ''} "
                 f"into {out} (once per source state; 1-3 minutes on 2 cores)")
    t0 = time.monotonic()
    module = cpp_extension.load(
        name=f"fused_resnet_emulated_{out.name.replace('-', '_')}",
        sources=[str(CSRC / "binding.cpp"), str(CSRC / "emu" / "checks.cpp")] + wrappers,
        extra_cflags=flags, extra_ldflags=["-pthread"] + (["-fsanitize=thread"] if tsan else []),
        extra_include_paths=[str(CSRC / "emu"), str(CSRC / "include")],
        build_directory=str(out), verbose=verbose)
    if fresh:
        announce(f"fused_resnet: emulated CUDA kernels built in {time.monotonic() - t0:.0f} s")
    return module


def build(tsan: bool = False, verbose: bool = False) -> Path:
    """Builds the extension and returns its path, without needing to import it: the ThreadSanitizer build
    imports only into a process started with libtsan preloaded (tsan_runtime())."""
    try:
        return Path(load(tsan, verbose).__file__)
    except ImportError:
        built = sorted(build_dir(tsan).glob("fused_resnet_emulated_*.so"))
        if tsan and built:
            return built[0]
        raise


_failure = None  # why the build failed in this process: said once, not retried on every call


def status():
    """(usable, reason): the emulated build loads in this process."""
    global _failure
    if not requested():
        return False, f"{ENV}=1 is not set"
    if _failure is None:
        try:
            load()
            return True, ""
        except Exception as e:  # a compiler error, a missing tool: say which
            text = str(e).strip().splitlines()
            _failure = f"the emulated CUDA build failed: {text[-1] if text else type(e).__name__}"
    return False, _failure


def tsan_runtime():
    """Path of the compiler's libtsan, which a process must preload to import the TSan build; or None."""
    try:
        path = subprocess.run(["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


if __name__ == "__main__":
    path = build(tsan="--tsan" in sys.argv, verbose="-v" in sys.argv)
    print(f"fused_resnet: emulated CUDA build ready: {path}")
