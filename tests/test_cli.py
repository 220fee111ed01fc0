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


# ---- One convention for every subcommand: an error is one line on stderr, exit code 2, no traceback. ----

import os  # noqa: E402

import torch  # noqa: E402

from fused_resnet import _cli, _emulated  # noqa: E402


def _run(*args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "fused_resnet", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def _one_line_error(proc, prog, *needles):
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("cmd", ["check", "bench", "train", "kernels"])
def test_bad_option_is_one_line_exit_2(cmd):
    _one_line_error(_run(cmd, "--no-such-option"), f"fused-resnet {cmd}", "unrecognized arguments: --no-such-option")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_triton_without_gpu_or_interpreter_is_one_line_exit_2(tmp_path):
    proc = _run("train", "--backend", "triton", "--out", str(tmp_path / "o"), env={"TRITON_INTERPRET": "0"})
    _one_line_error(proc, "fused-resnet train", "--backend triton", "TRITON_INTERPRET=1")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("cmd", ["check", "train"])
def test_device_cuda_without_gpu_is_the_same_error_everywhere(cmd):
    _one_line_error(_run(cmd, "--device", "cuda"), f"fused-resnet {cmd}", "--device cuda: no CUDA GPU is visible")


def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(capsys):
    def boom(argv):
        raise OSError("disk full\nsecond line")

    assert _cli.run_command(boom, ["--x"], "fused-resnet demo") == 2
    err = capsys.readouterr().err
    assert err == "fused-resnet demo: error: OSError: disk full [...] (--debug shows the traceback)\n"
    assert _cli.run_command(boom, ["--debug"], "fused-resnet demo") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("fused-resnet demo: error: OSError: disk full [...]\n")
    seen = []
    assert _cli.run_command(lambda argv: seen.append(argv) or 0, ["a", "--debug", "b"], "p") == 0
    assert seen == [["a", "b"]]  # --debug is the convention's, not the subcommand's


def test_progress_when_piped_prints_a_line_per_percent(capsys):
    bar = _cli.LineProgress(250, desc="epoch 1/1", min_interval=0)
    for _ in range(250):
        bar.update()
    lines = capsys.readouterr().out.splitlines()
    # The first step (the run has started), then one line per percent, the last at 100%.
    assert len(lines) == 101 and lines[0].startswith("  epoch 1/1: 1/250 (0%") and "3/250 (1%" in lines[1]
    assert "250/250 (100%" in lines[-1]
    bar = _cli.LineProgress(10, min_interval=3600)  # throttled: only the last step
    for _ in range(10):
        bar.update()
    assert capsys.readouterr().out.splitlines() == ["  10/10 (100%, 0 s)"]


def test_train_piped_shows_progress_on_stderr(tmp_path):
    proc = _run("train", "--epochs", "1", "--batch-size", "128", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1/1: 11/11 (100%" in proc.stderr, proc.stderr[-2000:]


def test_emulated_build_announces_itself(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    said = []
    monkeypatch.setattr(_emulated, "announce", said.append)
    monkeypatch.setattr(_emulated, "build_dir", lambda tsan=False: tmp_path / "emu")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: "built")
    assert _emulated.load.__wrapped__() == "built"
    assert len(said) == 2 and "building the emulated CUDA kernels" in said[0] and "built in" in said[1]
    (tmp_path / "emu" / "fused_resnet_emulated_x.so").write_text("")
    said.clear()
    _emulated.load.__wrapped__()
    assert said == []  # already built: silent
