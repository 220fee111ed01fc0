"""`fused-resnet train` end to end on the CPU (reference path): a short --compare run on the real digits
data, its table, JSON and PNG; argument errors before anything runs; DDP under torchrun (2 processes)."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from fused_resnet.train import main as train_main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path; the GPU pass runs train --compare")


def test_train_compare_learns_and_agrees(tmp_path, capsys):
    rc = train_main(["--compare", "--epochs", "6", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "trn loss" in out and "tst acc" in out and "unfused" in out
    table = [line for line in out.splitlines() if "trn loss" in line or line.strip()[:1].isdigit()]
    assert table and max(map(len, table)) <= 100, max(map(len, table))  # no wrapping in a terminal
    doc = json.loads((tmp_path / "train.json").read_text())
    assert (tmp_path / "train.png").stat().st_size > 10_000
    f, u = doc["history"]["fused"], doc["history"]["unfused"]
    assert len(f) == len(u) == 6
    # It learns: loss falls and a held-out accuracy far above chance (10%).
    assert f[-1]["train_loss"] < 0.3 * f[0]["train_loss"]
    assert f[-1]["test_acc"] > 0.9 and u[-1]["test_acc"] > 0.9
    # Same initial weights and batches: the first steps are the same computation, so the first epoch's
    # training loss agrees closely; the end agrees within a few test images.
    assert abs(f[0]["train_loss"] - u[0]["train_loss"]) < 0.05 * u[0]["train_loss"]
    assert doc["summary"]["final_test_acc_gap"] <= 0.03


def test_train_rejects_bad_arguments(tmp_path, capsys):
    assert train_main(["--epochs", "0", "--batch-size", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--epochs must be at least 1" in err and "--batch-size must be at least 2" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_train_under_torchrun_ddp(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "fused_resnet", "train",
                        "--epochs", "2", "--batch-size", "32", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "DistributedDataParallel over 2 processes" in r.stdout
    doc = json.loads((tmp_path / "train.json").read_text())
    assert doc["world_size"] == 2 and doc["history"]["fused"][-1]["test_acc"] > 0.5
