"""Mixed precision: under torch.autocast the fused op runs in the dtype autocast gives the conv, keeps BN
parameters, statistics and running buffers in float32, and trains with torch.amp.GradScaler.

On the CPU, autocast applies to the reference backend and to Triton in its interpreter; on a GPU the
same tests run the GPU backends. Tolerance: the fused result's error against a float64 run must be within
4x that of eager PyTorch under the same autocast, plus a floor of a few units of the low-precision dtype
(relative to the output's magnitude) where eager happens to be exact.
"""
import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import models, reference

FLOOR = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _amp_dtypes(device):
    out = []
    for dt in (torch.bfloat16, torch.float16):
        try:
            with torch.autocast(device.type, dtype=dt):
                pass
            out.append(dt)
        except (RuntimeError, ValueError):  # fp16 autocast is not on every CPU build
            pass
    return out


def _inputs(device, seed):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(2, 5, 6, 6, generator=g) * 2 + 0.3, w=torch.randn(7, 5, 3, 3, generator=g) / 6,
             bias=torch.randn(7, generator=g), gamma=torch.rand(5, generator=g) + 0.5, beta=torch.randn(5, generator=g),
             rm=torch.randn(5, generator=g) * 0.1, rv=torch.rand(5, generator=g) + 0.5,
             res=torch.randn(2, 7, 6, 6, generator=g), gy=torch.randn(2, 7, 6, 6, generator=g))
    return {k: v.to(device) for k, v in t.items()}


def _run(fn, t, dtype, training, amp, dt64=False):
    """One forward+backward; leaves in float32 (float64 for the oracle). Returns outputs, grads, buffers."""
    cast = (lambda v: v.double()) if dt64 else (lambda v: v.clone())
    leaves = {k: cast(t[k]).requires_grad_() for k in ("x", "w", "bias", "gamma", "beta", "res")}
    rm, rv = cast(t["rm"]), cast(t["rv"])
    ctx = torch.autocast(t["x"].device.type, dtype=dtype) if amp else torch.autocast(t["x"].device.type, enabled=False)
    with ctx:
        y = fn(leaves["x"], leaves["w"], leaves["bias"], bn_weight=leaves["gamma"], bn_bias=leaves["beta"],
               running_mean=rm, running_var=rv, training=training, padding=1, residual=leaves["res"])
    y.backward(t["gy"].to(y.dtype))
    return y, {k: v.grad for k, v in leaves.items()}, (rm, rv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_op_matches_eager_autocast(backend, device, training):
    for dtype in _amp_dtypes(device):
        t = _inputs(device, seed=hash((backend, training, str(dtype))) % 1000)
        fused = lambda *a, **k: fused_resnet.bn_relu_conv2d(*a, backend=backend, **k)  # noqa: E731
        y, grads, (rm, rv) = _run(fused, t, dtype, training, amp=True)
        y_e, grads_e, (rm_e, rv_e) = _run(reference.bn_relu_conv2d, t, dtype, training, amp=True)
        y64, grads64, (rm64, rv64) = _run(reference.bn_relu_conv2d, t, dtype, training, amp=False, dt64=True)
        # autocast's conv dtype, as eager: the residual add happens in the epilogue in that dtype too.
        assert y.dtype == dtype
        for k, g in grads.items():
            assert g.dtype == torch.float32, f"{k}: gradients reach the float32 leaves in float32"
        assert rm.dtype == rv.dtype == torch.float32

        def close(a, e, ref, what):
            scale = ref.abs().max().item() or 1.0
            err = (a.double() - ref).abs().max().item() / scale
            err_e = (e.double() - ref).abs().max().item() / scale
            assert err <= 4 * err_e + FLOOR[dtype], f"{what} ({dtype}): {err:.2e} vs eager {err_e:.2e}"

        close(y, y_e, y64, "y")
        for k in grads:
            close(grads[k], grads_e[k], grads64[k], f"grad {k}")
        # The statistics are taken from x in the autocast dtype: within its rounding of eager's float32 ones.
        torch.testing.assert_close(rm, rm_e, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(rv, rv_e, rtol=2e-2, atol=1e-2)


def test_autocast_never_casts_float64(device):
    t = _inputs(device, seed=3)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = fused_resnet.bn_relu_conv2d(t["x"].double(), t["w"].double(), running_mean=t["rm"].double(),
                                        running_var=t["rv"].double(), padding=1)
    assert y.dtype == torch.float64


def _digits_like_batch(device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_model_trains_with_autocast_and_gradscaler(device, amp_dtype):
    """A few AMP+GradScaler steps of the fused model track the unfused one from the same weights;
    parameters and BN buffers stay float32 throughout."""
    if amp_dtype not in _amp_dtypes(device):
        pytest.skip(f"autocast {amp_dtype} unavailable on {device.type}")
    backend = "auto" if device.type == "cuda" else "reference"
    torch.manual_seed(0)
    nets = {f: models.preact_resnet20(fused=f, backend=backend, in_channels=1).to(device) for f in (True, False)}
    nets[True].load_state_dict(nets[False].state_dict())
    losses = {}
    for fused, net in nets.items():
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
        losses[fused] = []
        for step in range(4):
            x, yl = _digits_like_batch(device, step)
            with torch.autocast(device.type, dtype=amp_dtype):
                loss = F.cross_entropy(net(x).float(), yl)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses[fused].append(loss.item())
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert all(b.dtype in (torch.float32, torch.int64) for b in net.buffers())
        assert all(torch.isfinite(p).all() for p in net.parameters())
    # Same weights, same data: the curves differ only by low-precision rounding.
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 0.05 * max(1.0, abs(b)), (losses[True], losses[False])
