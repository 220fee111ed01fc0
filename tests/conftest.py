"""Test setup: the Triton interpreter and the emulated CUDA build on machines without a GPU, the `gpu`
marker, backend params.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""
import os
import sys

# oneDNN's AMX kernels for bfloat16 convolutions (CPUs with AMX, torch 2.13's CPU build) give wrong results for
# some small shapes: conv2d of a [1, 4, 5, 3] bf16 input with a [1, 4, 1, 3] weight, stride (1, 2), is off by 2.57
# on every call and now and then by 1e17 or NaN (benchmarks/NOTES.md, session 15). The tests' eager reference
# runs such convolutions, so it is capped below AMX (a ceiling: machines without AMX are unaffected). Set before
# torch's first convolution; .ci/run exports it too, for the tests' subprocesses.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # backend="cuda" on CPU tensors through the host build of the CUDA kernels (fused_resnet/_emulated.py;
    # built on first use, 1-3 minutes on 2 cores, announced). Set it to 0 to skip the CUDA backend's tests instead.
    os.environ.setdefault("FUSED_RESNET_CUDA_EMULATED", "1")

# The shared matrix checks fp32 at IEEE float32: the CPU reference has no TF32 (and on a GPU, eager and both
# backends would switch to it together). TF32 is on by default in PyTorch, and the kernels follow it; its
# paths have their own tests with TF32's tolerance (test_cuda_kernels.py).
torch.backends.cudnn.allow_tf32 = False

# Under pytest-xdist (the README's command: one worker per core), each worker gets its share of the cores for
# torch's own threads: two workers of two threads each on two cores would contend (OpenMP's waiting threads).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

import fused_resnet  # noqa: E402

ALL_BACKENDS = ("reference", "triton", "cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    # The emulated CUDA build (first use: a minute or more, often during collection) announces itself on
    # the terminal, past pytest's capture.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        from fused_resnet import _emulated

        def announce(message):
            with capman.global_and_fixture_disabled():
                sys.stderr.write(message + "\n")
                sys.stderr.flush()

        _emulated.announce = announce


def pytest_terminal_summary(terminalreporter):
    """Skips, one line per reason with its count (pytest's -rs prints one line per test)."""
    from collections import Counter

    reasons = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.write_sep("-", "skipped, by reason")
        for reason, n in reasons.most_common():
            terminalreporter.write_line(f"{n:4d} x {reason}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend; one that cannot run here is skipped with the reason available_backends() gives."""
    report = fused_resnet.available_backends()
    if request.param not in report:
        pytest.skip(f"backend {request.param!r} unavailable: {report.unavailable[request.param]}")
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
