"""The GPU pass's helper scripts, exercised on the CPU so that a GPU session is not spent on their bugs:
benchmarks/sanitize_case.py's checks (Triton in the interpreter), and gpu_pass.sh's shell syntax."""
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _sanitize_case():
    spec = importlib.util.spec_from_file_location("sanitize_case", ROOT / "benchmarks" / "sanitize_case.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU pass runs it for real")
# The pair case once (bf16): its dtypes are tests/test_conv_pair.py's matrix.
@pytest.mark.parametrize("dtype,channels_last,stride,residual,pair", [
    (d, cl, s, r, False) for d in (torch.float32, torch.bfloat16, torch.float64)
    for cl, s, r in ((False, 1, True), (True, 2, False))] + [(torch.bfloat16, True, 2, False, True)])
def test_sanitize_case_passes_on_the_interpreter(dtype, channels_last, stride, residual, pair):
    assert _sanitize_case().one("triton", dtype, channels_last, stride, residual, device="cpu", pair=pair) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU pass runs it for real")
def test_sanitize_case_passes_on_the_emulated_cuda_build():
    """The CUDA backend's sanitizer cases that take the mma.sync kernels (bf16 channels_last, 24 -> 16, and
    64 -> 16 for the forward's wide slices, 16 -> 24 for its half slices); the other cases' shapes are covered by
    the parity matrix."""
    import fused_resnet

    report = fused_resnet.available_backends()
    if "cuda" not in report:
        pytest.skip(f"backend 'cuda' unavailable: {report.unavailable['cuda']}")
    assert _sanitize_case().one("cuda", torch.bfloat16, True, 1, True, device="cpu", c=24, k=16) is None
    assert _sanitize_case().one("cuda", torch.bfloat16, True, 2, False, device="cpu", c=24, k=16, pair=True) is None
    assert _sanitize_case().one("cuda", torch.bfloat16, True, 1, True, device="cpu", c=64, k=16) is None  # wide slices
    assert _sanitize_case().one("cuda", torch.bfloat16, True, 2, False, device="cpu", c=16, k=24) is None  # half slices


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_pass_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_pass.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
