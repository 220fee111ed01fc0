"""The CUDA backend's packaging contract on machines that cannot build it, and its launcher checks.

Its numerics are covered by the shared parity/gradcheck matrix (the `backend` fixture includes "cuda"),
which runs wherever the extension is built and a GPU is visible.
"""
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fused_resnet

ROOT = Path(__file__).resolve().parents[1]
HAS_EXT = importlib.util.find_spec("fused_resnet._C") is not None
cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only install path")


@pytest.mark.skipif(HAS_EXT, reason="the extension is built here")
def test_missing_extension_is_reported_and_raises(monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_CUDA_EMULATED", "0")
    report = fused_resnet.available_backends()
    assert "cuda" not in report
    assert report.unavailable["cuda"].startswith("extension not built")
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: extension not built"):
        fused_resnet.bn_relu_conv2d(x, w, running_mean=torch.zeros(3), running_var=torch.ones(3),
                                    training=False, padding=1, backend="cuda")
    # "auto" still works and picks what can run.
    y = fused_resnet.bn_relu_conv2d(x, w, running_mean=torch.zeros(3), running_var=torch.ones(3),
                                    training=False, padding=1)
    assert y.shape == (2, 4, 5, 5)


@cpu_torch
def test_wheel_without_cuda_is_pure_python(tmp_path):
    """`pip install` on a CPU torch: one line saying why, and a wheel holding the whole Python package."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True, timeout=600, env=dict(os.environ, FUSED_RESNET_CUDA="auto"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "installing without the CUDA extension (torch" in out.stdout + out.stderr
    wheels = list(tmp_path.glob("fused_resnet-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fused_resnet/cuda.py" in names and "fused_resnet/triton/forward.py" in names
    assert not [n for n in names if n.startswith("fused_resnet/_C")]
    assert wheels[0].name.endswith("-none-any.whl")
    assert "fused_resnet/triton/configs.json" in names  # the tuned-config table travels with the package
    # the commit it was built from, for results files and train.json after a regular install
    info = zipfile.ZipFile(wheels[0]).read("fused_resnet/_build_info.py").decode()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert f"COMMIT = '{head.stdout.strip()}" in info


@cpu_torch
def test_forced_cuda_build_fails_clearly():
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, FUSED_RESNET_CUDA="1"))
    assert out.returncode != 0
    assert "FUSED_RESNET_CUDA=1 but the CUDA extension cannot build" in out.stderr


def test_setup_and_cmake_share_one_source_list():
    """setup.py and CMakeLists.txt both read csrc/SOURCES, and it names every kernel file there is."""
    listed = {l.strip() for l in (ROOT / "csrc/SOURCES").read_text().splitlines() if l.strip() and l[0] != "#"}
    on_disk = {str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*.cu")}
    assert listed == on_disk
    assert "csrc/SOURCES" in (ROOT / "CMakeLists.txt").read_text()
    assert '"SOURCES"' in (ROOT / "setup.py").read_text()


def test_kernels_include_no_pytorch_headers():
    for path in list((ROOT / "csrc/kernels").iterdir()) + list((ROOT / "csrc/include").rglob("*.h")):
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/", '"torch/', '"ATen/', '"c10/'):
            assert banned not in text, f"{path} includes a PyTorch header ({banned})"


def test_cuda_launchers_have_the_triton_interface():
    """The op layer drives both kernel backends through one interface; the CUDA launchers (importable
    without _C: the extension loads lazily) must offer all of it with the same parameters. Their numerics
    run through the whole matrix in the emulated build (the `backend` fixture's "cuda")."""
    import inspect

    import fused_resnet.cuda as cuda_launchers
    import fused_resnet.triton as triton_launchers
    from fused_resnet.triton import finalize

    names = ("stats_partials", "bn_finalize", "channel_stats", "conv_forward", "conv_backward", "bn_add_relu_forward",
             "bn_add_relu_backward")
    for name in names:
        want = inspect.signature(getattr(triton_launchers, name)).parameters
        assert list(inspect.signature(getattr(cuda_launchers, name)).parameters) == list(want), name
    assert list(inspect.signature(cuda_launchers.moments).parameters) == list(
        inspect.signature(finalize.moments).parameters)


def test_repo_root_import_trap_is_explained(tmp_path, monkeypatch):
    """Imported from a tree without _C while an installed copy has it (running from the repository root
    after `pip install .`): the reason says so and names both places, instead of 'not built'."""
    from fused_resnet import backends

    installed = tmp_path / "site" / "fused_resnet"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(ROOT), str(tmp_path / "site")])
    if importlib.util.find_spec("fused_resnet._C") is not None:
        pytest.skip("this checkout has the extension built")
    ok, why = backends._cuda_status()
    assert not ok and "shadows the install" in why and str(installed) in why and "-e ." in why
