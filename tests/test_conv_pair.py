"""bn_relu_conv2d_pair: two convs of one relu(bn(x)) (a projection block's conv1 and shortcut) in one op
whose backward sums the two gradients of the activation before the ReLU mask and runs the BN backward
once -- against the eager composition (fused_resnet.reference.bn_relu_conv2d_pair), every backend.

Tolerances: helpers' rule (the backend's error against a float64 run of the reference within a small
multiple of the reference's own error at the test dtype, plus a floor of a few ulps)."""
import copy

import pytest
import torch
import torch.nn as nn

import fused_resnet
from fused_resnet import _ops, reference

from helpers import FLOOR, MULTIPLE, max_err

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf cases under the interpreter

LEAVES = ("x", "weight", "weight2", "bias", "bias2", "bn_weight", "bn_bias")

# (kernel, stride, padding) of conv1 and of the second conv: a basic block's first conv with its 1x1
# stride-2 shortcut; a bottleneck's 1x1 conv1 with a 1x1 shortcut that changes channels; a 5x5 beside
# a 3x3 dilated one (the general kernels).
GEOMETRIES = {
    "3x3s2+1x1s2": (((3, 3), 2, 1, 1), ((1, 1), 2, 0, 1)),
    "1x1+1x1": (((1, 1), 1, 0, 1), ((1, 1), 1, 0, 1)),
    "5x5+3x3d2": (((5, 5), 1, 2, 1), ((3, 3), 1, 2, 2)),
    # a bottleneck's stride-1 1x1 conv1 beside its stride-2 1x1 shortcut: output grids and stride phases
    # differ (the one-launch forward's second program range; the backward's two-launch dgrad fallback)
    "1x1+1x1s2": (((1, 1), 1, 0, 1), ((1, 1), 2, 0, 1)),
}


def _inputs(geometry, c, k, k2, seed, device, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    (ks, _, _, _), (ks2, _, _, _) = geometry
    return dict(
        x=rnd(2, c, 7, 6) + 0.3,
        weight=rnd(k, c, *ks, scale=(c * ks[0] * ks[1]) ** -0.5),
        weight2=rnd(k2, c, *ks2, scale=(c * ks2[0] * ks2[1]) ** -0.5),
        bias=rnd(k, scale=0.5) if bias else None,
        bias2=rnd(k2, scale=0.5) if bias else None,
        bn_weight=(torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device),
        bn_bias=rnd(c, scale=0.5),
        running_mean=rnd(c, scale=0.2),
        running_var=(torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device),
    )


def _cast(t, dtype, channels_last):
    out = {}
    for name, v in t.items():
        if v is not None:
            v = v.to(dtype)
            if v.dim() == 4 and channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
        out[name] = v
    return out


def _run(fn, t, geometry, training, seed, **extra):
    """Outputs, gradients of every leaf (for random output gradients) and the running buffers."""
    (_, s, p, d), (_, s2, p2, d2) = geometry
    leaves = {n: (t[n].detach().clone().requires_grad_() if t[n] is not None else None) for n in LEAVES}
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    y, y2 = fn(leaves["x"], leaves["weight"], leaves["weight2"], leaves["bias"], leaves["bias2"],
               bn_weight=leaves["bn_weight"], bn_bias=leaves["bn_bias"], running_mean=rm, running_var=rv,
               training=training, stride=s, padding=p, dilation=d, stride2=s2, padding2=p2, dilation2=d2, **extra)
    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    gy2 = torch.randn(y2.shape, generator=g, dtype=torch.float64).to(y2)
    names = [n for n in LEAVES if leaves[n] is not None]
    grads = torch.autograd.grad((y, y2), [leaves[n] for n in names], (gy, gy2))
    res = {"y": y.detach(), "y2": y2.detach(), "running_mean": rm, "running_var": rv}
    res.update({"d" + n: gr for n, gr in zip(names, grads)})
    return res


def _check(backend, device, dtype, geometry, training, channels_last, seed, c=8, k=16, k2=8):
    master = _inputs(geometry, c, k, k2, seed, device)
    low = _cast(master, dtype, channels_last)
    exact = _cast({n: (v.to(dtype).double() if v is not None else None) for n, v in master.items()},
                  torch.float64, False)
    got = _run(fused_resnet.bn_relu_conv2d_pair, low, geometry, training, seed, backend=backend)
    ref = _run(reference.bn_relu_conv2d_pair, low, geometry, training, seed)
    oracle = _run(reference.bn_relu_conv2d_pair, exact, geometry, training, seed)
    assert got.keys() == oracle.keys()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got["y"].is_contiguous(memory_format=fmt) and got["y2"].is_contiguous(memory_format=fmt)
    for name, want in oracle.items():
        scale = want.double().abs().max().item() + 1e-30
        e_got, e_ref = max_err(got[name], want), max_err(ref[name], want)
        tol = MULTIPLE * e_ref + FLOOR[dtype] * scale
        assert e_got <= tol, f"{name}: {backend} error {e_got:.3e} > {tol:.3e} (reference {e_ref:.3e}), {dtype}"


@pytest.mark.parametrize("geometry,training", [("3x3s2+1x1s2", True), ("3x3s2+1x1s2", False), ("1x1+1x1", True),
                                               ("5x5+3x3d2", True), ("1x1+1x1s2", True), ("1x1+1x1s2", False)],
                         ids=lambda v: v if isinstance(v, str) else
                         ("train" if v else "eval"))
def test_pair_matches_eager_float32(backend, device, geometry, training):
    _check(backend, device, torch.float32, GEOMETRIES[geometry], training, False, seed=11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)  # fp16: the bf16 code paths
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", ["3x3s2+1x1s2", "1x1+1x1s2"])
def test_pair_matches_eager_dtypes(backend, device, dtype, channels_last, geometry):
    """channels_last with C, K % 8 == 0 in fp16/bf16: the CUDA backend's tensor-core dgrad (raw and
    addend epilogues) and wgrad; the one-kernel pair forward and dgrad (3x3s2+1x1s2) and the forward's
    separate program ranges with the two-launch dgrad (1x1+1x1s2)."""
    _check(backend, device, dtype, GEOMETRIES[geometry], True, channels_last, seed=12)


@pytest.mark.parametrize("geometry", ["3x3s2+1x1s2", "1x1+1x1s2"])
def test_pair_gradcheck(backend, device, geometry, training=True):
    """float64, every differentiable input, both biases; conv1 3x3 stride 2 beside a 1x1 stride-2 shortcut
    (the one-kernel dgrad), and a stride-1 1x1 beside a stride-2 one (the two-launch dgrad).
    Training (the full BN backward); eval's dx = gm*scale is in the parity cases above."""
    (ks, s, p, _), (ks2, s2, _, _) = GEOMETRIES[geometry]
    t = _inputs(GEOMETRIES[geometry], 3, 4, 2, seed=13, device=device)
    inputs = [t[n].requires_grad_() for n in LEAVES]

    def fn(x, weight, weight2, bias, bias2, gamma, beta):
        return fused_resnet.bn_relu_conv2d_pair(
            x, weight, weight2, bias, bias2, bn_weight=gamma, bn_bias=beta, running_mean=t["running_mean"].clone(),
            running_var=t["running_var"].clone(), training=training, stride=s, padding=p, stride2=s2,
            backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("used", ["y", "y2"])
def test_one_output_unused(backend, device, used):
    """A loss of one output only: the other's gradient is zero, as eager's."""
    t = _inputs(GEOMETRIES["3x3s2+1x1s2"], 3, 4, 2, seed=14, device=device)
    grads = []
    for fn, extra in ((fused_resnet.bn_relu_conv2d_pair, dict(backend=backend)), (reference.bn_relu_conv2d_pair, {})):
        x, w, w2 = (t[n].clone().requires_grad_() for n in ("x", "weight", "weight2"))
        y, y2 = fn(x, w, w2, bn_weight=t["bn_weight"], bn_bias=t["bn_bias"], running_mean=t["running_mean"].clone(),
                   running_var=t["running_var"].clone(), training=True, stride=2, padding=1, stride2=2, **extra)
        out = y if used == "y" else y2
        grads.append(torch.autograd.grad(out.sum(), (x, w, w2), allow_unused=True, materialize_grads=True))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("geometry", ["3x3s2+1x1s2", "1x1+1x1s2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_input_matches_eager(backend, device, value, geometry):
    """NaN and inf reach the outputs, gradients and running statistics where eager's do (the one-kernel
    pair and the two-launch dgrad fallback)."""
    t = _cast(_inputs(GEOMETRIES[geometry], 3, 4, 2, seed=15, device=device), torch.float32, False)
    t["x"][1, 0, 2, 3] = value
    got = _run(fused_resnet.bn_relu_conv2d_pair, t, GEOMETRIES[geometry], True, 15, backend=backend)
    want = _run(reference.bn_relu_conv2d_pair, t, GEOMETRIES[geometry], True, 15)
    for name in want:
        a, b = got[name].float(), want[name].float()
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN pattern differs"
        assert torch.equal(a.isinf(), b.isinf()), f"{name}: inf pattern differs"


@pytest.mark.parametrize("case,match", [
    ("weight2 channels", r"the second conv \(weight2.*x has 3 channels but weight expects 2"),
    ("weight2 dtype", r"the second conv \(weight2"),
    ("stride2 zero", r"the second conv \(weight2.*stride"),
])
def test_bad_second_conv_raises_before_anything_runs(device, case, match):
    t = _inputs(GEOMETRIES["3x3s2+1x1s2"], 3, 4, 2, seed=16, device=device)
    w2, stride2 = t["weight2"], 2
    if case == "weight2 channels":
        w2 = torch.randn(4, 2, 1, 1, dtype=torch.float64, device=device)
    elif case == "weight2 dtype":
        w2 = w2.float()
    else:
        stride2 = 0
    rm = t["running_mean"].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        fused_resnet.bn_relu_conv2d_pair(t["x"], t["weight"], w2, running_mean=rm, running_var=t["running_var"],
                                         training=True, stride=2, padding=1, stride2=stride2)
    assert torch.equal(rm, t["running_mean"])  # nothing half-changed


def test_block_runs_bn1_once_with_the_pair(backend, device):
    """A projection block's training step: outputs, every gradient and bn1's buffers (updated once) as
    the unfused block's, in float64."""
    torch.manual_seed(17)
    fused = fused_resnet.PreActBlock(4, 6, 2, backend=backend).double().to(device).train()
    plain = fused_resnet.PreActBlock(4, 6, 2, fused=False).double().to(device).train()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, device=device)
    outs = []
    for m in (fused, plain):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y))
        outs.append([y, xi.grad] + [p.grad for p in m.parameters()] + [b for b in m.buffers()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert int(fused.bn1.num_batches_tracked) == 1


def test_opcheck_pair_op(backend, device):
    t = _inputs(GEOMETRIES["3x3s2+1x1s2"], 3, 4, 2, seed=18, device=device)
    x, w, w2, b, b2, g, be = (t[n].float().requires_grad_() for n in LEAVES)
    mean, invstd = t["running_mean"].float(), t["running_var"].float().rsqrt()
    for training in (True, False):
        args = (x, w, b, w2, b2, g, be, mean, invstd, training, 1e-5, [2, 2], [1, 1], [1, 1], [4, 3],
                [2, 2], [0, 0], [1, 1], [4, 3], True, backend)
        if training:  # (eval differs only in the backward's BN formula, which the comparison below runs)
            torch.library.opcheck(_ops.bn_relu_conv2d_pair_op, args)
        leaves = [x, w, b, w2, b2, g, be]
        y1 = _ops.bn_relu_conv2d_pair_op(*args)
        got1 = torch.autograd.grad(y1[0].sum() + 2 * y1[1].sum(), leaves)
        y2 = _ops.bn_relu_conv2d_pair(*args)  # the eager fast path: same code, plain autograd.Function
        got2 = torch.autograd.grad(y2[0].sum() + 2 * y2[1].sum(), leaves)
        for a, c in zip(got1 + tuple(y1), got2 + tuple(y2)):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
    gy, gy2 = torch.randn(2, 4, 4, 3, device=device), torch.randn(2, 2, 4, 3, device=device)
    bargs = (gy, x.detach(), w.detach(), g.detach(), be.detach(), mean, invstd, True, 1e-5, [2, 2], [1, 1], [1, 1],
             1, [True, True, True, True, True], backend, 0, None, gy2, w2.detach(), [2, 2], [0, 0], [1, 1])
    torch.library.opcheck(_ops.bn_relu_conv2d_backward_op, bargs)


def test_weights_only_gradients(backend, device):
    """x and the BN affine frozen (no dx, no BN sums: the backward runs only the two wgrads), float64."""
    t = _inputs(GEOMETRIES["3x3s2+1x1s2"], 8, 16, 8, seed=19, device=device)
    grads = []
    for fn, extra in ((fused_resnet.bn_relu_conv2d_pair, dict(backend=backend)), (reference.bn_relu_conv2d_pair, {})):
        w, w2 = t["weight"].clone().requires_grad_(), t["weight2"].clone().requires_grad_()
        y, y2 = fn(t["x"], w, w2, bn_weight=t["bn_weight"], bn_bias=t["bn_bias"],
                   running_mean=t["running_mean"].clone(), running_var=t["running_var"].clone(), training=True,
                   stride=2, padding=1, stride2=2, **extra)
        grads.append(torch.autograd.grad(y.sum() + 2 * y2.sum(), (w, w2)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# Issue 30: which launches a pair runs. The forward is one conv launch where the two output grids coincide
# (both convs' column tiles in one grid), else the two convs' own; the dgrad (Triton) is one kernel reducing over
# both convs where their strides agree, else the raw dgrad of the shortcut plus conv1's dgrad with it as addend
# (CUDA: always that, no pair dgrad yet). Per backend: (forward conv kernels, dgrad kernels) by geometry.
PAIR_LAUNCHES = {
    "triton": {"3x3s2+1x1s2": ({"triton.conv_fwd_pair_kernel": 1}, {"triton.conv_dgrad_pair_kernel": 1}),
               "1x1+1x1": ({"triton.conv_fwd_pair_kernel": 1}, {"triton.conv_dgrad_pair_kernel": 1}),
               "5x5+3x3d2": ({"triton.conv_fwd_pair_kernel": 1}, {"triton.conv_dgrad_pair_kernel": 1}),
               "1x1+1x1s2": ({"triton.conv_fwd_kernel": 2}, {"triton.conv_dgrad_kernel": 2})},
    "cuda": {"3x3s2+1x1s2": ({"cuda.conv_forward_pair": 1}, {"cuda.conv_dgrad": 2}),
             "1x1+1x1": ({"cuda.conv_forward_pair": 1}, {"cuda.conv_dgrad": 2}),
             "5x5+3x3d2": ({"cuda.conv_forward_pair": 1}, {"cuda.conv_dgrad": 2}),
             "1x1+1x1s2": ({"cuda.conv_forward": 2}, {"cuda.conv_dgrad": 2})},
}


def test_pair_forward_separate_program_ranges(device, monkeypatch):
    """Triton's one-launch forward for output grids that differ (off by default: pair.SEPARATE_RANGES), still
    exact: the bottleneck's stride-1 conv1 beside its stride-2 shortcut, float32 and bf16 channels_last."""
    if "triton" not in fused_resnet.available_backends():
        pytest.skip("needs the Triton backend")
    from fused_resnet.triton import pair

    monkeypatch.setattr(pair, "SEPARATE_RANGES", True)
    _check("triton", device, torch.float32, GEOMETRIES["1x1+1x1s2"], True, False, seed=21)
    _check("triton", device, torch.bfloat16, GEOMETRIES["1x1+1x1s2"], True, True, seed=22)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_pair_launches(backend, device, geometry):
    """One forward conv launch for the pair (x read once where the output grids coincide), one dgrad where
    the strides agree; everything else as before (two wgrads, their column sums, one finish)."""
    if backend not in PAIR_LAUNCHES:
        pytest.skip(f"no pair kernels in the {backend} backend")
    from fused_resnet.bench.launches import count_device_ops

    want_fwd, want_dgrad = PAIR_LAUNCHES[backend][geometry]
    t = _cast(_inputs(GEOMETRIES[geometry], 8, 16, 8, seed=20, device=device), torch.float32, False)
    (_, s, p, d), (_, s2, p2, d2) = GEOMETRIES[geometry]
    x = t["x"].requires_grad_()
    with count_device_ops() as fwd:
        y, y2 = fused_resnet.bn_relu_conv2d_pair(
            x, t["weight"], t["weight2"], bn_weight=t["bn_weight"], bn_bias=t["bn_bias"],
            running_mean=t["running_mean"], running_var=t["running_var"], training=True, stride=s, padding=p,
            dilation=d, stride2=s2, padding2=p2, dilation2=d2, backend=backend)
    gy, gy2 = torch.ones_like(y), torch.ones_like(y2)
    with count_device_ops() as bwd:
        torch.autograd.backward((y, y2), (gy, gy2))
    convs = {k: v for k, v in fwd.ops.items() if "conv" in k}
    dgrads = {k: v for k, v in bwd.ops.items() if "dgrad" in k}
    assert convs == want_fwd, dict(fwd.ops)
    assert dgrads == want_dgrad, dict(bwd.ops)


@pytest.mark.parametrize("consumers", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_one_call_backward_is_the_python_path_bit_for_bit(consumers, dtype):
    """The CUDA backend's backward in one call into the extension (a layer, or a projection block's conv1 and
    shortcut: csrc/binding.cpp conv_backward) against cuda.py's launcher-by-launcher path, which a process-group
    reducer forces (here one that changes nothing): the same kernels, so every output bit for bit."""
    if "cuda" not in fused_resnet.available_backends():
        pytest.skip("the CUDA backend (or its emulated build) is not available")
    from fused_resnet import cuda

    g = torch.Generator().manual_seed(7)
    acc = torch.float32
    for cl, batch_stats, needs, need_dw2, relu, s2 in [
            (False, True, [1, 1, 1, 1], True, True, 2), (True, True, [1, 1, 1, 1], False, True, 1),
            (True, False, [1, 1, 0, 0], True, False, 2), (False, True, [1, 0, 0, 0], True, True, 1),
            (True, True, [0, 1, 1, 1], True, True, 2), (False, False, [0, 0, 1, 1], False, False, 1)]:
        x = torch.randn(2, 8, 6, 6, generator=g).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(16, 8, 3, 3, generator=g).to(dtype)
        oh = (6 + 2 - 3) // s2 + 1
        gy = torch.randn(2, 16, oh, oh, generator=g).to(dtype)
        mean, beta = torch.randn(8, generator=g), torch.randn(8, generator=g)
        invstd, gamma = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5
        others = ()
        if consumers == 2:
            w2 = torch.randn(16, 8, 1, 1, generator=g).to(dtype)
            gy2 = torch.randn(2, 16, (6 - 1) // s2 + 1, (6 - 1) // s2 + 1, generator=g).to(dtype)
            others = ((gy2, w2, (s2, s2), (0, 0), (1, 1), need_dw2),)
        args = (gy, x, w, mean.to(acc), (invstd * gamma).to(acc), beta.to(acc), invstd.to(acc), gamma.to(acc),
                batch_stats, [bool(v) for v in needs], (s2, s2), (1, 1), (1, 1))
        one = cuda.conv_backward(*args, sync=None, others=others, relu=relu)
        python = cuda.conv_backward(*args, sync=lambda s1, s2_, m: (s1, s2_, m), others=others, relu=relu)
        for a, b in zip([*one[:4], *one[4]], [*python[:4], *python[4]]):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.stride() == b.stride() and torch.equal(a, b)
