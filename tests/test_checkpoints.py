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


def test_convert_keeps_the_original_checkpoint_keys(tmp_path):
    """convert() rewires BN/conv modules into fused layers (one BN shared by conv1 and the projection
    shortcut, names nested in Sequentials), yet state_dict() keeps the original model's keys and
    load_state_dict() takes them, strictly, in both directions; a converted model also pickles whole."""
    from test_convert import Net

    torch.manual_seed(0)
    plain = Net().double()
    converted = fused_resnet.convert(plain, backend="reference")  # a deep copy
    assert sum(e.fused for e in converted.fusion_report) >= 4
    assert sorted(converted.state_dict()) == sorted(plain.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        loss = converted(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(converted.state_dict(), tmp_path / "converted.pt")

    fresh = Net().double()  # other weights until loaded
    fresh.load_state_dict(torch.load(tmp_path / "converted.pt"), strict=True)
    back = fused_resnet.convert(Net().double(), backend="reference")
    back.load_state_dict(fresh.state_dict(), strict=True)
    for m in (converted, fresh, back):
        m.eval()
    torch.testing.assert_close(fresh(x), converted(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(back(x), converted(x), rtol=1e-10, atol=1e-12)
    torch.save(converted, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(whole(x), converted(x), rtol=0, atol=0)
