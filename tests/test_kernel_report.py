"""The static kernel report (`fused-resnet kernels`): every Triton launch of a training step at the
benchmark layer shapes, compiled for sm_90 and sm_80 on this CPU, must be spill-free in bf16/fp16 in
both layouts and use the tensor-core MMA of its target (wgmma / mma.sync)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _run_report(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "fused_resnet", "kernels", "--quiet", "--check",
                           "--json", str(out), *args], capture_output=True, text=True, env=env, timeout=1500)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_every_bf16_fp16_launch_spill_free_with_tensor_cores(tmp_path):
    # One report per architecture, both at once: each compiles its own kernels (single-threaded), so on
    # CI's 2 cores this takes half the wall time of one report over both (it was CI's slowest test, 5 min).
    runs = {}
    for arch in (90, 80):
        out = tmp_path / f"report{arch}.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        runs[arch] = (subprocess.Popen([sys.executable, "-m", "fused_resnet", "kernels", "--quiet", "--check", "--json",
                                        str(out), "--arch", str(arch)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env), out)
    rows = []
    for arch, (proc, out) in runs.items():
        stdout, stderr = proc.communicate(timeout=1500)
        assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
        rows += json.loads(out.read_text())["launches"]
    kernels = {r["kernel"] for r in rows}
    assert {"channel_stats", "conv_fwd", "conv_dgrad", "bn_backward_finish", "conv_wgrad"} <= kernels
    assert {(r["arch"], r["layout"], r["dtype"]) for r in rows} == {
        (a, l, d) for a in (90, 80) for l in ("nhwc", "nchw") for d in ("bfloat16", "float16")}
    assert all(r["stack"] == 0 for r in rows)
    conv = [r for r in rows if r["kernel"].startswith("conv")]
    assert all(r["mma"] == {90: "wgmma", 80: "mma.sync"}[r["arch"]] for r in conv)
    assert all(r["registers"] > 0 and r["flops"] > 0 and r["bytes"] > 0 for r in conv)
    # the tile config each conv launch compiled with (its constexprs go by position: named by the capture)
    assert all("M=" in r["config"] and "N=" in r["config"] and "K=" in r["config"] for r in conv)


def test_report_rejects_unknown_case(tmp_path):
    proc, _ = _run_report(tmp_path, "--cases", "no-such-layer")
    assert proc.returncode == 2 and "unknown case" in proc.stderr
