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


def _run(fn, t, dtype, training, amp, x_dtype, dt64=False):
    """One forward+backward. Weights, bias and BN parameters are float32 leaves (master weights); x and
    the residual are leaves in x_dtype (the activations a network feeds the layer). The float64 oracle
    takes the same x values (rounded to x_dtype first). Returns y, grads, running buffers."""
    wcast = (lambda v: v.double()) if dt64 else (lambda v: v.clone())
    xcast = (lambda v: v.to(x_dtype).double()) if dt64 else (lambda v: v.to(x_dtype, copy=True))
    leaves = {k: (xcast if k in ("x", "res") else wcast)(t[k]).requires_grad_()
              for k in ("x", "w", "bias", "gamma", "beta", "res")}
    rm, rv = wcast(t["rm"]), wcast(t["rv"])
    ctx = torch.autocast(t["x"].device.type, dtype=dtype) if amp else torch.autocast(t["x"].device.type, enabled=False)
    with ctx:
        y = fn(leaves["x"], leaves["w"], leaves["bias"], bn_weight=leaves["gamma"], bn_bias=leaves["beta"],
               running_mean=rm, running_var=rv, training=training, padding=1, residual=leaves["res"])
    y.backward(t["gy"].to(y.dtype))
    return y, {k: v.grad for k, v in leaves.items()}, (rm, rv)


def _err(a, ref):
    """Relative error: max-abs difference over the reference's max-abs."""
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _compare(fused, eager, oracle, dtype):
    """Every output and gradient: fused error within 4x eager's (same autocast) plus a dtype floor."""
    (y, grads, _), (y_e, grads_e, _), (y64, grads64, _) = fused, eager, oracle
    pairs = [("y", y, y_e, y64)] + [(f"grad {k}", grads[k], grads_e[k], grads64[k]) for k in grads]
    for what, a, e, ref in pairs:
        err, err_e = _err(a, ref), _err(e, ref)
        assert err <= 4 * err_e + FLOOR[dtype], f"{what} ({dtype}): {err:.2e} vs eager {err_e:.2e}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_op_matches_eager_autocast(backend, device, training):
    """Activations in the autocast dtype (what a network under autocast feeds every fused layer)."""
    for dtype in _amp_dtypes(device):
        t = _inputs(device, seed=torch.randint(0, 2 ** 31, ()).item())
        fused = lambda *a, **k: fused_resnet.bn_relu_conv2d(*a, backend=backend, **k)  # noqa: E731
        runs = [_run(fn, t, dtype, training, amp, dtype, dt64) for fn, amp, dt64 in
                ((fused, True, False), (reference.bn_relu_conv2d, True, False), (reference.bn_relu_conv2d, False, True))]
        y, grads, (rm, rv) = runs[0]
        assert y.dtype == dtype  # autocast's conv dtype, as eager
        for k, g in grads.items():
            assert g.dtype == (dtype if k in ("x", "res") else torch.float32), f"{k}: {g.dtype}"
        assert rm.dtype == rv.dtype == torch.float32
        _compare(*runs, dtype)
        rm_e, rv_e = runs[1][2]
        torch.testing.assert_close(rm, rm_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rv, rv_e, rtol=1e-4, atol=1e-5)


def test_autocast_float32_activations(backend, device):
    """A float32 x (e.g. images fed straight to a fused first layer) is rounded to the autocast dtype
    before the BN -- the kernels read it in that dtype -- where eager normalizes in float32 and rounds
    after. So the documented meaning is: exactly the op on x.to(autocast dtype), with x's gradient
    returned in float32. (Against eager itself the two differ wherever a pre-activation lies within that
    rounding of zero: the ReLU mask flips there, which moves BN-parameter gradients by several percent on
    a small batch; the activations-in-autocast-dtype test above is the parity check.)"""
    for dtype in _amp_dtypes(device):
        t = _inputs(device, seed=torch.randint(0, 2 ** 31, ()).item())
        fused = lambda *a, **k: fused_resnet.bn_relu_conv2d(*a, backend=backend, **k)  # noqa: E731
        y, grads, (rm, rv) = _run(fused, t, dtype, True, True, torch.float32)
        low = dict(t, x=t["x"].to(dtype).float())  # the same values, pre-rounded
        y2, grads2, (rm2, rv2) = _run(fused, low, dtype, True, True, torch.float32)
        assert y.dtype == dtype and grads["x"].dtype == torch.float32
        torch.testing.assert_close(y, y2, rtol=0, atol=0)
        for k in grads:
            torch.testing.assert_close(grads[k], grads2[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close((rm, rv), (rm2, rv2), rtol=0, atol=0)


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
