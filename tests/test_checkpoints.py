"""Checkpoints move between fused and unfused models in both directions: saved with torch.save after
training steps (weights, BN running statistics, optimizer state), loaded with strict=True, giving the
same eval outputs and continuing training identically."""
import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import models


def _train_steps(net, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    for _ in range(steps):
        x, y = torch.randn(6, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (6,), generator=g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("direction", ["fused_to_unfused", "unfused_to_fused"])
@pytest.mark.parametrize("sync", [False, True], ids=["bn", "syncbn"])
def test_checkpoint_cross_loading(tmp_path, direction, sync):
    src_fused = direction == "fused_to_unfused"
    torch.manual_seed(0)
    src = models.preact_resnet20(fused=src_fused, backend="reference", in_channels=1, sync_stats=sync).double()
    opt = torch.optim.SGD(src.parameters(), lr=0.05, momentum=0.9)
    _train_steps(src, opt, 3, seed=1)
    torch.save({"model": src.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    torch.manual_seed(123)  # different initial weights: everything must come from the file
    dst = models.preact_resnet20(fused=not src_fused, backend="reference", in_channels=1).double()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    dst.load_state_dict(ckpt["model"], strict=True)
    dst_opt = torch.optim.SGD(dst.parameters(), lr=0.05, momentum=0.9)
    dst_opt.load_state_dict(ckpt["opt"])

    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    src.eval(), dst.eval()
    torch.testing.assert_close(dst(x), src(x), rtol=1e-10, atol=1e-10)
    src.train(), dst.train()
    _train_steps(src, opt, 2, seed=2)
    _train_steps(dst, dst_opt, 2, seed=2)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


def test_converted_model_checkpoint_loads_into_original(tmp_path):
    """convert() keeps the original module names (the fused layers reuse the BN/conv modules), so a
    checkpoint of the converted model loads into the plain one."""
    torch.manual_seed(0)
    plain = models.preact_resnet20(fused=False, in_channels=1)
    converted = fused_resnet.convert(plain, backend="reference")
    _train_steps(converted, torch.optim.SGD(converted.parameters(), lr=0.05), 2, seed=3)
    torch.save(converted.state_dict(), tmp_path / "c.pt")
    fresh = models.preact_resnet20(fused=False, in_channels=1)
    missing, unexpected = fresh.load_state_dict(torch.load(tmp_path / "c.pt"), strict=False)
    assert not missing, missing
    x = torch.randn(3, 1, 8, 8)
    converted.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), converted(x), rtol=1e-5, atol=1e-6)
