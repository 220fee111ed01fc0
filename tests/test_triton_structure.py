"""Structural properties of the Triton kernels, counted in the interpreter: which MMAs they issue."""
import pytest
import torch

import fused_resnet

pytestmark = pytest.mark.skipif("triton" not in fused_resnet.available_backends() or torch.cuda.is_available(),
                                reason="counts MMA calls through the Triton interpreter (CPU only)")


def _count_mma(monkeypatch, module):
    calls = []
    original = module.mma

    def counting(acc, a, b, *args):
        calls.append(a.shape)
        return original(acc, a, b, *args)

    monkeypatch.setattr(module, "mma", counting)
    return calls


@pytest.mark.parametrize("stride,dilation,padding,expected", [
    (2, 1, 1, 9),   # 4 phases with 1x1, 1x2, 2x1, 2x2 taps: 9 MMAs, not 4 phases x 9 taps
    (1, 1, 1, 9),   # one phase, every tap
    (2, 2, 2, 9),   # dilation 2: phase (0, 0) takes all 9 taps, the other three none
])
def test_dgrad_issues_no_mma_on_masked_taps(monkeypatch, stride, dilation, padding, expected):
    from fused_resnet.triton import dgrad

    calls = _count_mma(monkeypatch, dgrad)
    # One row tile and one channel block per phase (interpreter tiles are 32 x 16 x 16).
    n, c, h, k = 1, 4, 5, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, h, h, generator=g)
    w = torch.randn(k, c, 3, 3, generator=g)
    bn = torch.nn.BatchNorm2d(c)
    x.requires_grad_(True)
    y = fused_resnet.bn_relu_conv2d(x, w, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                                    running_var=bn.running_var, training=True, stride=stride, padding=padding,
                                    dilation=dilation, backend="triton")
    gy = torch.randn(y.shape, generator=g)
    calls.clear()
    (dx,) = torch.autograd.grad(y, x, gy)
    assert len(calls) == expected
    # and the result is still right
    xr = x.detach().clone().requires_grad_(True)
    bn2 = torch.nn.BatchNorm2d(c)
    yr = torch.nn.functional.conv2d(torch.relu(bn2(xr)), w, stride=stride, padding=padding, dilation=dilation)
    (dxr,) = torch.autograd.grad(yr, xr, gy)
    torch.testing.assert_close(dx, dxr, rtol=1e-4, atol=1e-5)


def test_forward_reduction_is_one_loop_over_taps_and_channels(monkeypatch):
    """C = 40 with interpreter BLOCK_K = 16: 3 channel blocks x 9 taps = 27 MMAs per output tile."""
    from fused_resnet.triton import forward

    calls = _count_mma(monkeypatch, forward)
    x = torch.randn(1, 40, 4, 4)
    w = torch.randn(8, 40, 3, 3)
    bn = torch.nn.BatchNorm2d(40).eval()
    fused_resnet.bn_relu_conv2d(x, w, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
                                running_var=bn.running_var, padding=1, backend="triton")
    assert len(calls) == 27


def test_tuning_sweep_files_winners_under_the_launchers_keys(monkeypatch, tmp_path):
    """The sweep's mechanics on the CPU (interpreter, tiny case, a stand-in timer that prefers
    BLOCK_K=32): forced configs reach the launchers, winners are filed under the exact key each
    launcher looks up, and the table the launchers read returns them on that GPU arch."""
    import json

    from fused_resnet.bench import tune
    from fused_resnet.bench.cases import Case
    from fused_resnet.triton import _common, configs

    monkeypatch.setattr(tune, "SPACE", {k: dict(BLOCK_M=[16], BLOCK_N=[16], depth=[
        dict(BLOCK_K=16, num_warps=4, num_stages=2), dict(BLOCK_K=32, num_warps=4, num_stages=2)])
        for k in ("fwd", "dgrad", "wgrad")})
    seen = []

    def timer(fn):
        fn()
        cfg = next(iter(configs._forced.values()))
        seen.append(cfg)
        return 1.0 if cfg is None else (0.5 if cfg["BLOCK_K"] == 32 else 2.0)

    case = Case("tiny", "layer", 2, 3, 4, 5, kernel=3, stride=2)
    winners, log = tune.sweep([case], torch.float32, channels_last=True, device="cpu", timer=timer)
    assert len(log) == 6 and None in seen
    assert set(k.split(":")[0] for k in winners) == {"fwd", "dgrad", "wgrad"}
    assert all(e["BLOCK_K"] == 32 and e["us"] == 500.0 and e["heuristic_us"] == 1000.0 for e in winners.values())
    # the dgrad key is the stride phase's GEMM: 2 * 3 * 3 rows, 3 columns, 4 reduction, 2x2 taps
    assert "dgrad:float32:nhwc:18x3x4x4" in winners

    table = tmp_path / "configs.json"
    configs.write(90, winners, str(table))
    monkeypatch.setattr(configs, "TABLE", str(table))
    configs._table.cache_clear()
    monkeypatch.setattr(_common, "ASSUMED_GPU", (90, 132))
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_table", lambda: json.loads(table.read_text())["configs"])
    x = torch.empty(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    assert _common.conv_config("dgrad", 18, 3, 4, 4, x)["BLOCK_K"] == 32
    other = _common.conv_config("dgrad", 18, 3, 4, 9, x)  # a shape the table does not hold: the heuristic
    assert other == _common.heuristic_config("dgrad", 18, 3, 4, x)


def test_spill_check_sees_the_launches_the_launchers_make(monkeypatch):
    """The tuning sweep's spill check (bench.tune._spills) intercepts JITFunction.run, the call every launcher
    makes (kernel.run(..., grid=, warmup=False)); it read nothing while it patched kernel[grid] instead. Here run
    is a stand-in returning a kernel with spills (no GPU to compile for)."""
    from triton.runtime.jit import JITFunction

    from fused_resnet.bench import tune

    class Compiled:
        n_spills = 24

    calls = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        calls.append((grid, warmup))
        return Compiled()

    monkeypatch.setattr(JITFunction, "run", fake_run)
    kernel = JITFunction.__new__(JITFunction)  # a bare instance: only its run is called
    assert tune._spills(lambda: kernel.run(1, grid=(2,), warmup=False)) == 24
    assert calls == [((2,), False)]
    assert JITFunction.run is fake_run  # restored
