"""What every `fused-resnet` subcommand shares: errors, device/backend resolution, progress.

- Errors are one line on stderr, `<prog>: error: <what>`, exit code 2, no traceback; `--debug` (anywhere on
  the command line) shows the traceback as well. A self-check that runs but finds a mismatch is not an
  error: `check` exits 1 then.
- Device and backend are resolved the same way everywhere (resolve_device, resolve_backend): `auto` is the
  GPU when one is visible, else the CPU; on the CPU the Triton interpreter is turned on (unless
  TRITON_INTERPRET is already set, e.g. to 0), so `--backend triton` runs there, slowly.
- Progress: a bar on a terminal; otherwise (piped, logged) a line per percent step, at most one every
  few seconds, and always the last -- a long run is never silent.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

DEBUG_HELP = "on an error, also print the traceback (errors are otherwise one line)"


class UsageError(Exception):
    """An error the user can fix (an argument, the machine): reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error convention, and --debug listed in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def error(self, message):
        print(f"{self.prog}: error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(2)


def fail(prog: str, message: str) -> int:
    """Report an error the one-line way; returns the exit code (2)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


def one_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] if isinstance(e, UsageError) else f"{type(e).__name__}: {lines[0]}"
    return text + (" [...]" if len(lines) > 1 else "")


def run_command(func, argv, prog: str) -> int:
    """func(argv) under the convention: exceptions become one line on stderr and exit code 2 (with
    --debug, after their traceback). argparse's own exits (--help: 0, a bad option: 2) pass through."""
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return func(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the convention: every error is one line, exit 2
        if debug:
            traceback.print_exc()
        hint = "" if debug or isinstance(e, UsageError) else " (--debug shows the traceback)"
        return fail(prog, one_line(e) + hint)


def resolve_device(arg: str = "auto"):
    """--device: auto (the GPU when one is visible -- LOCAL_RANK's under torchrun -- else the CPU), cpu,
    cuda or cuda:N. On the CPU, turns the Triton interpreter on before triton is imported (unless
    TRITON_INTERPRET is set already)."""
    import torch

    if arg not in ("auto", "cpu", "cuda") and not (arg.startswith("cuda:") and arg[5:].isdigit()):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {arg!r}")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {arg}: no CUDA GPU is visible")
    if arg == "auto":
        gpu = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
    else:
        device = torch.device(arg)
    if device.type == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def resolve_backend(arg: str, device) -> str:
    """The backend --backend names (auto: backends.resolve's choice) for tensors on device, or a UsageError
    saying why it cannot run here. Announces the slow CPU stand-ins (interpreter, emulated build)."""
    from .backends import CHOICES, resolve

    if arg not in CHOICES:
        raise UsageError(f"--backend must be one of {', '.join(CHOICES)}, got {arg!r}")
    try:
        backend = resolve(arg, device, 1)
    except (RuntimeError, NotImplementedError) as e:
        raise UsageError(f"--backend {arg}: {one_line(e).split(': ', 1)[-1]}") from e
    if device.type == "cpu" and backend == "triton":
        print("fused_resnet: backend triton on the CPU runs in the Triton interpreter (slow, for testing)",
              file=sys.stderr, flush=True)
    elif device.type == "cpu" and backend == "cuda":
        print("fused_resnet: backend cuda on the CPU runs the emulated build of the CUDA kernels (slow, for testing)",
              file=sys.stderr, flush=True)
    return backend


class LineProgress:
    """Progress where tqdm draws nothing (output not a terminal): a line when the run has moved on by at
    least a percent and min_interval seconds since the last line, and always the last step."""

    def __init__(self, total, desc="", min_interval=2.0, stream=None):
        self.total, self.desc, self.n = max(int(total), 0), desc, 0
        self.min_interval, self.stream = min_interval, stream
        self.t0 = self._last_t = time.monotonic()
        self._last_pct, self.current = -1, ""

    def set_postfix_str(self, s, refresh=True):
        self.current = s

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        pct = 100 * self.n // self.total if self.total else 100
        if self.n >= self.total or (pct > self._last_pct and now - self._last_t >= self.min_interval):
            self._last_pct, self._last_t = pct, now
            head = f"{self.desc}: " if self.desc else ""
            tail = f" {self.current}" if self.current else ""
            self.write(f"  {head}{self.n}/{self.total} ({pct}%, {now - self.t0:.0f} s){tail}")

    def write(self, s):
        print(s, file=self.stream or sys.stdout, flush=True)

    def close(self):
        pass

    def __iter__(self):
        raise TypeError("wrap an iterable with progress(iterable=...)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Iterating(LineProgress):
    def __init__(self, iterable, **kw):
        self.iterable = list(iterable)
        super().__init__(len(self.iterable), **kw)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()


def progress(iterable=None, *, total=None, desc="", leave=True, min_interval=2.0, disable=False):
    """tqdm on a terminal; elsewhere LineProgress (on stderr, as tqdm). Use as tqdm: progress(jobs, desc=...)
    to iterate, or progress(total=n, desc=...) with .update(). disable: draw nothing (other ranks)."""
    if sys.stderr.isatty() or disable:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable or None)
    if iterable is not None:
        return _Iterating(iterable, desc=desc, min_interval=min_interval, stream=sys.stderr)
    return LineProgress(total, desc=desc, min_interval=min_interval, stream=sys.stderr)
