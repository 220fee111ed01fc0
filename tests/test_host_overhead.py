"""benchmarks/host_overhead.py (issue 30's measurement) on the CPU: the emulated CUDA build's launch switch
really skips a launch, and only while it is on; the script measures both kernel backends and prints a ratio
per row; a bad argument is refused before anything is timed."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_resnet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "host_overhead.py"


def _emulated():
    if "cuda" not in fused_resnet.available_backends() or torch.cuda.is_available():
        pytest.skip("needs the emulated CUDA build (CPU only)")
    from fused_resnet import _emulated

    return _emulated.load()


def test_skip_switch_skips_launches_only_while_on():
    ext = _emulated()
    from fused_resnet import cuda, reference

    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    mean, var = torch.randn(4) * 0.1, torch.rand(4) + 0.5
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    invstd = (var + 1e-5).rsqrt()

    def launch():
        y = torch.full((2, 6, 5, 5), float("nan"))  # the kernel writes every element
        cuda.conv_forward(x, w, None, mean, invstd * gamma, beta, None, y, (1, 1), (1, 1), (1, 1))
        return y

    try:
        ext.emu_skip_launches(True)
        skipped = launch()
    finally:
        ext.emu_skip_launches(False)
    assert skipped.isnan().all()  # checked, not run
    ran = launch()
    want = reference.bn_relu_conv2d(x, w, bn_weight=gamma, bn_bias=beta, running_mean=mean, running_var=var,
                                    training=False, padding=1)
    torch.testing.assert_close(ran, want, rtol=1e-4, atol=1e-4)


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_script_measures_both_backends(tmp_path):
    _emulated()
    out = tmp_path / "host.json"
    r = _run("--reps", "3", "--burst", "2", "--cases", "layer,postact,net", "--modes", "inference,training",
             "--backends", "triton,cuda", "--split", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [l for l in r.stdout.splitlines() if l.startswith(("| layer", "| postact", "| net"))]
    assert len(rows) == 6, r.stdout
    for row in rows:  # eager us, then (us, ratio) for triton, cuda and the memoized split
        ratios = re.findall(r"\| ([0-9.]+)x", row)
        assert len(ratios) == 3, row
        assert all(float(v) > 0 for v in ratios), row
    doc = json.loads(out.read_text())
    assert {(d["case"], d["mode"]) for d in doc["rows"]} == {(c, m) for c in ("layer", "postact", "net")
                                                             for m in ("inference", "training")}
    assert all(d["triton_us"] > 0 and d["cuda_us"] > 0 and d["eager_us"] > 0 for d in doc["rows"])
    assert "CUDA emulated" in doc["device"]


def test_script_jit_times_compiled_launches(tmp_path):
    # --jit: kernels compiled for sm_90, JITFunction.run and the direct launch timed, the launch itself dropped
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--jit", "--reps", "3", "--burst", "2", "--cases", "layer",
                        "--modes", "training", "--backends", "triton,triton-jit", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, env=dict(env, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "Triton compiled for sm_90" in doc["device"]
    assert {d["case"] for d in doc["rows"]} == {"layer"}
    assert all(d["triton_us"] > 0 and d["triton-jit_us"] > 0 for d in doc["rows"])


@pytest.mark.parametrize("args", [["--cases", "nope"], ["--modes", "fast"], ["--backends", "cudnn"],
                                  ["--backends", "cuda,triton", "--split"], ["--backends", "triton-jit"],
                                  ["--jit", "--split"], ["--jit", "--device", "cuda"]])
def test_script_refuses_bad_arguments(args):
    r = _run(*args, timeout=120)
    assert r.returncode == 2 and "error" in r.stderr, (r.returncode, r.stderr[-2000:])
