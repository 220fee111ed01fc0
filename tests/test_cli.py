"""The command line's top level: every subcommand named with one line, `help` works, unknown ones fail."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("arg", ["--help", "-h", "help"])
def test_top_level_help_lists_every_subcommand(arg):
    out = subprocess.run([sys.executable, "-m", "fused_resnet", arg], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("check", "bench", "train", "kernels", "help"):
        assert any(line.strip().startswith(cmd + " ") for line in out.stdout.splitlines()), (cmd, out.stdout)


def test_unknown_command_says_so():
    out = subprocess.run([sys.executable, "-m", "fused_resnet", "nonsense"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "unknown command 'nonsense'" in out.stderr and "kernels" in out.stderr
