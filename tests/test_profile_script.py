"""The GPU pass's per-kernel profile (`python -m fused_resnet.bench.profile`), its plumbing run on the CPU at
interpreter sizes so that a GPU session is not spent on its bugs (CPU operator times: never figures)."""
import json

import pytest
import torch

from fused_resnet.bench import profile


@pytest.mark.parametrize("name,want", [
    ("_conv_fwd_kernel", "forward"), ("_conv_dgrad_kernel", "dgrad"), ("_conv_wgrad_kernel", "wgrad"),
    ("void fused_resnet::detail::conv_forward_mma_kernel<__nv_bfloat16, 128, 64, 8>(ConvForwardParams)", "forward"),
    ("conv_dgrad_mma_kernel", "dgrad"), ("conv_wgrad_mma_kernel", "wgrad"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "forward"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "dgrad"),
    ("sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "wgrad"),
    ("_channel_stats_kernel", None), ("_bn_finalize_kernel", None), ("batch_stats_kernel", None),
    ("void at::native::batch_norm_collect_statistics_channels_last_kernel", None),
])
def test_kernel_roles(name, want):
    assert profile.role(name) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU pass runs it for real")
def test_profile_plumbing_on_the_cpu(tmp_path, capsys):
    assert profile.main(["--out", str(tmp_path), "--tiny", "--cases", "cifar-s1-c16-32px",
                         "--providers", "eager_cl,triton", "--reps", "1", "--warmup", "1"]) == 0
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["gpu"] is False and doc["peaks"]["hbm_gbps"] > 0
    (case,) = doc["cases"]
    assert case["case"] == "tiny-cifar-s1-c16-32px" and set(case["providers"]) == {"eager_cl", "triton"}
    for entry in case["providers"].values():
        assert entry["kernels"] and entry["summary"]["total_us"] > 0
        assert entry["summary"]["total_us"] == pytest.approx(sum(r["us"] for r in entry["kernels"]))
    text = (tmp_path / "profile.md").read_text()
    assert text.startswith("**CPU run at interpreter sizes") and "| tiny-cifar-s1-c16-32px | triton |" in text


def test_profile_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        profile.main(["--out", str(tmp_path), "--tiny", "--cases", "no-such-case"])
    assert "unknown layer case 'no-such-case'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile.main(["--out", str(tmp_path), "--tiny", "--providers", "eager_cl,bogus"])
    assert "unknown providers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            profile.main(["--out", str(tmp_path)])
        assert "--tiny runs the plumbing on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "profile.json").exists()


def test_kernel_times_from_device_events():
    """The GPU path's aggregation, on stand-in events: per-kernel device time and launches per step; CPU-side
    events (operators, their own device totals) are not counted again."""
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name="k_a", device_type=cuda, device_time_total=10.0),
              SimpleNamespace(name="k_a", device_type=cuda, device_time_total=14.0),
              SimpleNamespace(name="k_b", device_type=cuda, device_time_total=3.0),
              SimpleNamespace(name="aten::conv", device_type=cpu, device_time_total=27.0)]
    prof = SimpleNamespace(events=lambda: events)
    got = profile.kernel_times(prof, torch.device("cuda"), reps=2)
    assert got == {"k_a": (12.0, 1.0), "k_b": (1.5, 0.5)}
