"""The direct launch of compiled Triton kernels (fused_resnet/triton/_launch.py, issue 30): the same launches as
JITFunction.run's, the kernel Triton itself picks, across shapes, dtypes, layouts and alignments, and out of the
way of whoever replaces JITFunction.run. Compiled kernels need TRITON_INTERPRET unset, so the checks run in a
subprocess (tests/direct_launch_check.py) through a driver that compiles for sm_90 and launches nothing."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSED_RESNET_CUDA_EMULATED"] = "0"
    env.update(extra)
    return env


def test_direct_launches_match_jit_launches():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "direct_launch_check.py")], capture_output=True,
                          text=True, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    passed = [line for line in proc.stdout.splitlines() if line.startswith("ok: ")]
    # argument kinds (a kernel's launch, a plan's), 8 scenarios x (training, eval), the changing module, launch
    # hooks, the launch counter
    assert len(passed) == 21, proc.stdout


def test_switch_off_by_environment():
    code = "import fused_resnet.triton._launch as l; print(l.enabled)"
    out = {v: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=_env(FUSED_RESNET_TRITON_DIRECT=v), timeout=300).stdout.strip() for v in ("0", "1")}
    assert out == {"0": "False", "1": "True"}


def test_interpreted_kernels_are_left_alone():
    # this process interprets (conftest): the interpreter's kernels keep their own run, untouched
    from triton.runtime.interpreter import InterpretedFunction

    from fused_resnet.triton import forward

    kernel = forward._conv_fwd_kernel
    assert type(kernel) is InterpretedFunction and "run" not in vars(kernel)
