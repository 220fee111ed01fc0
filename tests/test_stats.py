"""Batch statistics: running-buffer updates, the numerically hard case, epilogue output statistics."""
import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet.functional import bn_relu_conv2d_with_stats


def _setup(device, dtype=torch.float32, mean=0.0, std=1.0, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, c, 6, 5, generator=g, dtype=torch.float64) * std + mean).to(device, dtype)
    w = (torch.randn(5, c, 3, 3, generator=g, dtype=torch.float64) * 0.2).to(device, dtype)
    return x, w


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_running_stats_update_like_batchnorm(backend, device, momentum):
    x, w = _setup(device, seed=int(momentum * 10))
    bn = torch.nn.BatchNorm2d(4, momentum=momentum).to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(2):  # two steps: the update compounds as nn.BatchNorm2d's does
        fused_resnet.bn_relu_conv2d(x, w, running_mean=rm, running_var=rv, training=True,
                                    momentum=momentum, padding=1, backend=backend)
        bn.train()(x)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)


def test_eval_mode_leaves_buffers_alone(backend, device):
    x, w = _setup(device, seed=3)
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    fused_resnet.bn_relu_conv2d(x, w, running_mean=rm, running_var=rv, training=False, padding=1,
                                backend=backend)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_training_without_running_buffers(backend, device):
    x, w = _setup(device, seed=4)
    got = fused_resnet.bn_relu_conv2d(x, w, training=True, padding=1, backend=backend)
    want = fused_resnet.reference.bn_relu_conv2d(x, w, training=True, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_large_mean_small_std_statistics(backend, device):
    """DESIGN.md's hard case: mean 1e3, std 1e-2 in float32. Σx²−(Σx)² in float32 would lose the
    variance entirely (1e6 ± 1e-4 has no bits left for it); we must match PyTorch's own batch norm,
    measured against a float64 run."""
    x, w = _setup(device, mean=1e3, std=1e-2, seed=5)
    x64 = x.double()
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm64, rv64 = rm.double(), rv.double()
    rm_t, rv_t = rm.clone(), rv.clone()
    fused_resnet.bn_relu_conv2d(x, w, running_mean=rm, running_var=rv, training=True, momentum=1.0,
                                padding=1, backend=backend)
    F.batch_norm(x64, rm64, rv64, training=True, momentum=1.0)
    F.batch_norm(x, rm_t, rv_t, training=True, momentum=1.0)  # PyTorch's own, float32
    err_ours = ((rv.double() - rv64).abs() / rv64).max().item()
    err_torch = ((rv_t.double() - rv64).abs() / rv64).max().item()
    assert err_ours <= max(4 * err_torch, 1e-4), (err_ours, err_torch)
    # The mean: as close as PyTorch's, or within one float32 ulp at 1e3 (6.1e-5, 0.6% of a std).
    err_mean = (rm.double() - rm64).abs().max().item()
    assert err_mean <= max(4 * (rm_t.double() - rm64).abs().max().item(), 6.2e-5), err_mean
    # And the normalized output itself: the conv of the activation matches the float64 oracle.
    y = fused_resnet.bn_relu_conv2d(x, w, training=True, padding=1, backend=backend)
    y64 = fused_resnet.reference.bn_relu_conv2d(x64, w.double(), training=True, padding=1)
    y_t = fused_resnet.reference.bn_relu_conv2d(x, w, training=True, padding=1)
    assert (y.double() - y64).abs().max() <= 4 * (y_t.double() - y64).abs().max() + 1e-4


def test_batch_stats_op_matches_var_mean(backend, device):
    x = torch.randn(2, 7, 5, 3, device=device) * 3 + 2
    mean, var = torch.ops.fused_resnet.batch_stats(x.contiguous(memory_format=torch.channels_last), backend)
    v, m = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
def test_epilogue_output_statistics(backend, device, residual):
    """out_stats=True returns per-channel (mean, biased var) of y from the conv epilogue."""
    x, w = _setup(device, seed=6)
    r = torch.randn(3, 5, 6, 5, device=device) if residual else None
    y, mean, var = bn_relu_conv2d_with_stats(x, w, training=True, padding=1, residual=r,
                                             backend=backend, out_stats=True)
    v, m = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), v, rtol=1e-5, atol=1e-5)


def test_input_stats_are_used_instead_of_a_pass(backend, device):
    """Given input_stats equal to x's batch statistics, the result equals the self-computed one,
    and the running buffers get the same update."""
    x, w = _setup(device, seed=7)
    v, m = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    rm1, rv1 = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1, _, _ = bn_relu_conv2d_with_stats(x, w, running_mean=rm1, running_var=rv1, training=True,
                                         padding=1, backend=backend, input_stats=(m, v))
    y2 = fused_resnet.bn_relu_conv2d(x, w, running_mean=rm2, running_var=rv2, training=True,
                                     padding=1, backend=backend)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)
