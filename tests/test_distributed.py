"""Synchronized batch statistics under DistributedDataParallel: 2 processes, gloo, CPU tensors.

nn.SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"), so on the
CPU the oracle is what nn.SyncBatchNorm computes by definition: plain BatchNorm over the concatenated
global batch in one process, with the loss DDP optimizes (the mean over ranks of each rank's mean loss:
DDP averages gradients). Ranks get unequal batch sizes so the count weighting is exercised. float64
everywhere, so the comparison is tight. The GPU test compares against nn.SyncBatchNorm itself.
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet import models
from fused_resnet.nn import FusedBNReLUConv2d, PreActBlock

SPLIT = (3, 5)  # per-rank batch sizes
TOL = dict(rtol=1e-9, atol=1e-10)  # float64 on both sides; only summation order differs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(kind, fused, backend):
    torch.manual_seed(0)
    if kind == "model":  # one block per stage: stride-2 projection shortcuts and the final plain BN
        m = models.PreActResNet(PreActBlock, (1, 1, 1), (4, 6, 8), "cifar", 5, fused=fused, backend=backend)
    else:
        m = FusedBNReLUConv2d(3, 4, 3, padding=1, backend=backend) if fused else nn.Sequential(
            nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1, bias=False))
    for mod in m.modules():  # non-trivial affine parameters
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m.double()


def _data(kind):
    g = torch.Generator().manual_seed(1)
    n = sum(SPLIT)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + 0.5
    target = torch.randint(0, 5, (n,), generator=g) if kind == "model" else torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    return x, target


def _loss(kind, out, target):
    return F.cross_entropy(out, target) if kind == "model" else ((out - target) ** 2).mean()


def _params(m):
    return dict(m.named_parameters())


def _init(rank, world, port):
    # A bounded timeout: a rank that dies leaves the other waiting at most this long, not gloo's 30 minutes.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _finish():
    """Both ranks meet before either tears gloo down: a rank that destroys its group and exits while the
    other is still tearing its own connections down can make gloo's transport thread abort that process
    ("terminate called without an active exception", SIGABRT; seen once in CI, layer-reference case)."""
    dist.barrier()


def _worker(rank, world, port, kind, backend, out_dir):
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    _init(rank, world, port)
    try:
        model = fused_resnet.convert_sync_batchnorm(_build(kind, True, backend))
        ddp = nn.parallel.DistributedDataParallel(model)
        x, target = _data(kind)
        lo = sum(SPLIT[:rank])
        xs = x[lo:lo + SPLIT[rank]].clone().requires_grad_()
        out = ddp(xs)
        _loss(kind, out, target[lo:lo + SPLIT[rank]]).backward()
        res = {"out": out.detach(), "dx": xs.grad, "grads": {k: p.grad for k, p in model.named_parameters()},
               "buffers": {k: b.clone() for k, b in model.named_buffers()}}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.step()
        model.eval()
        res["eval_out"] = model(x).detach()  # after a step: every rank holds the same weights and buffers
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        _finish()
    finally:
        dist.destroy_process_group()


def _oracle(kind):
    model = _build(kind, False, "reference")
    x, target = _data(kind)
    x = x.clone().requires_grad_()
    out = model(x)
    # The loss DDP optimizes: each rank's mean loss, averaged over ranks (gradients are averaged).
    bounds = [0, SPLIT[0], sum(SPLIT)]
    loss = sum(_loss(kind, out[a:b], target[a:b]) for a, b in zip(bounds, bounds[1:])) / len(SPLIT)
    loss.backward()
    # dx on a rank is d(its own loss)/dx through the global statistics; the oracle's dx carries the
    # 1/world factor of the averaged loss, undone here.
    res = {"out": out.detach(), "dx": x.grad * len(SPLIT),
           "grads": {k: p.grad for k, p in model.named_parameters()},
           "buffers": {k: b.clone() for k, b in model.named_buffers()}}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    model.eval()
    res["eval_out"] = model(x.detach()).detach()
    return res


@pytest.mark.parametrize("kind,backend", [("model", "reference"), ("layer", "reference"), ("layer", "triton")])
def test_ddp_sync_stats_matches_global_batchnorm(kind, backend, tmp_path):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the Triton case runs CPU tensors in the interpreter; on a GPU the nn.SyncBatchNorm test covers it")
    mp.spawn(_worker, args=(len(SPLIT), _free_port(), kind, backend, str(tmp_path)), nprocs=len(SPLIT), join=True)
    want = _oracle(kind)
    names = {"0.weight": "bn.weight", "0.bias": "bn.bias", "2.weight": "conv.weight", "0.running_mean": "bn.running_mean",
             "0.running_var": "bn.running_var", "0.num_batches_tracked": "bn.num_batches_tracked"}
    lo = 0
    for rank, n in enumerate(SPLIT):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["out"], want["out"][lo:lo + n], **TOL)
        torch.testing.assert_close(got["dx"], want["dx"][lo:lo + n], **TOL)
        for k, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][names.get(k, k)], g, **TOL, msg=lambda m, k=k: f"grad {k}: {m}")
        for k, b in want["buffers"].items():
            torch.testing.assert_close(got["buffers"][names.get(k, k)], b, **TOL, msg=lambda m, k=k: f"buffer {k}: {m}")
        torch.testing.assert_close(got["eval_out"], want["eval_out"], **TOL)
        lo += n


def test_sync_is_a_noop_without_a_process_group():
    """Not initialized: SyncBatchNorm2d and sync_stats behave exactly as plain BatchNorm."""
    plain = _build("model", True, "reference")
    synced = fused_resnet.convert_sync_batchnorm(_build("model", True, "reference"))
    x, _ = _data("model")
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert set(synced.state_dict()) == set(plain.state_dict())


def test_convert_sync_batchnorm_shares_tensors():
    m = _build("model", True, "reference")
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    out = fused_resnet.convert_sync_batchnorm(m)
    assert out is m
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert bns and all(isinstance(b, fused_resnet.SyncBatchNorm2d) for b in bns)
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == before
    # A BN shared by several fused convs (convert() of a DenseNet-style model) stays one module.
    bn = nn.BatchNorm2d(3)
    a = FusedBNReLUConv2d.from_modules(bn, nn.Conv2d(3, 4, 1))
    b = FusedBNReLUConv2d.from_modules(bn, nn.Conv2d(3, 2, 1))
    pair = fused_resnet.convert_sync_batchnorm(nn.ModuleList([a, b]))
    assert pair[0].bn is pair[1].bn and isinstance(pair[0].bn, fused_resnet.SyncBatchNorm2d)


def _gpu_worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        x, target = _data("model")
        lo = sum(SPLIT[:rank])
        res = {}
        for name, convert in (("fused", fused_resnet.convert_sync_batchnorm),
                              ("torch", nn.SyncBatchNorm.convert_sync_batchnorm)):
            model = convert(_build("model", name == "fused", "auto").float().cuda())
            ddp = nn.parallel.DistributedDataParallel(model)
            out = ddp(x[lo:lo + SPLIT[rank]].float().cuda())
            _loss("model", out, target[lo:lo + SPLIT[rank]].cuda()).backward()
            res[name] = {"out": out.detach().cpu(), **{k: p.grad.cpu() for k, p in model.named_parameters()}}
        torch.save(res, os.path.join(out_dir, f"gpu{rank}.pt"))
        _finish()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_ddp_against_nn_syncbatchnorm_on_gpu(tmp_path):
    """Both processes share the one GPU; gloo carries the CUDA tensors."""
    mp.spawn(_gpu_worker, args=(len(SPLIT), _free_port(), str(tmp_path)), nprocs=len(SPLIT), join=True)
    for rank in range(len(SPLIT)):
        got = torch.load(tmp_path / f"gpu{rank}.pt")
        for k, v in got["torch"].items():
            torch.testing.assert_close(got["fused"][k], v, rtol=2e-3, atol=2e-4, msg=lambda m, k=k: f"{k}: {m}")
