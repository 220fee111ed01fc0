"""The host path's memo (fused_resnet/_plan.py, issue 30: validate and resolve memoized): one module called
with changing shapes, dtypes, layouts and modes gives eager's results every time, and the memo never turns a
bad call into a good one."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_resnet
from fused_resnet import _plan
from fused_resnet.nn import PreActBlock

KERNEL_BACKENDS = ("triton", "cuda")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    report = fused_resnet.available_backends()
    if request.param not in report:
        pytest.skip(f"backend {request.param!r} unavailable: {report.unavailable[request.param]}")
    return request.param


# (batch, height, width, dtype, layout, training, grad): each call changes something the memo keys on
CALLS = [
    (2, 6, 5, torch.float32, "nchw", True, True),
    (2, 6, 5, torch.float32, "nchw", True, True),  # a repeat: the memo's hit
    (3, 6, 5, torch.float32, "nchw", True, True),  # batch size
    (3, 7, 4, torch.float32, "nchw", True, True),  # spatial size
    (3, 7, 4, torch.float32, "channels_last", True, True),  # layout
    (3, 7, 4, torch.float32, "view", True, True),  # a non-contiguous view
    (2, 5, 5, torch.float64, "nchw", True, True),  # dtype
    (2, 5, 5, torch.float64, "nchw", False, True),  # eval
    (2, 5, 5, torch.float32, "channels_last", False, True),
    (2, 5, 5, torch.float32, "channels_last", False, False),  # eval under no_grad: no autograd node
    (2, 5, 5, torch.float32, "channels_last", True, True),  # back to training
]


def _input(n, h, w, dtype, layout, c, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "view":  # every other column of a wider tensor: strides no layout has
        return torch.randn(n, c, h, 2 * w, generator=g).to(dtype)[..., ::2]
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def test_one_layer_through_changing_calls(kernel_backend):
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ebn, econv = copy.deepcopy(bn), copy.deepcopy(conv)
    layer = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend=kernel_backend)
    hits = _plan.hits
    for i, (n, h, w, dtype, layout, training, grad) in enumerate(CALLS):
        for m in (layer, ebn, econv):
            m.to(dtype).train(training)
        with torch.no_grad():  # each call compares one update (earlier float32 rounding would linger in float64)
            ebn.running_mean.copy_(bn.running_mean)
            ebn.running_var.copy_(bn.running_var)
        x = _input(n, h, w, dtype, layout, 3, i)
        r = _input(n, h, w, dtype, "nchw", 4, 100 + i)
        g = _input(n, h, w, dtype, layout, 4, 200 + i)
        xf, xe = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        if layout == "view":
            xf = x.detach().requires_grad_(grad)  # keep the view's strides
            xe = x.detach().clone().requires_grad_(grad)
        for p in list(layer.parameters()) + list(ebn.parameters()) + list(econv.parameters()):
            p.grad = None
        with torch.set_grad_enabled(grad):
            y = layer(xf, r)
            ye = econv(F.relu(ebn(xe))) + r
        assert y.dtype == ye.dtype and y.shape == ye.shape, i
        torch.testing.assert_close(y, ye, **_tol(dtype), msg=f"call {i}: output")
        assert y.requires_grad == grad, i
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last), i
        torch.testing.assert_close(bn.running_mean, ebn.running_mean, **_tol(dtype), msg=f"call {i}: running_mean")
        torch.testing.assert_close(bn.running_var, ebn.running_var, **_tol(dtype), msg=f"call {i}: running_var")
        if grad:
            y.backward(g)
            ye.backward(g)
            for a, b, name in ((xf.grad, xe.grad, "dx"), (conv.weight.grad, econv.weight.grad, "dW"),
                               (conv.bias.grad, econv.bias.grad, "dbias"), (bn.weight.grad, ebn.weight.grad, "dgamma"),
                               (bn.bias.grad, ebn.bias.grad, "dbeta")):
                torch.testing.assert_close(a, b, **_tol(dtype), msg=f"call {i}: {name}")
    assert _plan.hits > hits  # the repeated call found its answer in the memo


def test_block_through_changing_calls(kernel_backend):
    """A projection block (the pair op) and its identity sibling, batch and layout changing between calls."""
    torch.manual_seed(1)
    for in_planes, planes, stride in ((4, 4, 1), (4, 8, 2)):
        eager = PreActBlock(in_planes, planes, stride, fused=False)
        fused = PreActBlock(in_planes, planes, stride, backend=kernel_backend)
        fused.load_state_dict(eager.state_dict())
        for i, (n, layout, training) in enumerate([(2, "nchw", True), (3, "channels_last", True), (2, "nchw", False),
                                                   (3, "view", True)]):
            eager.train(training)
            fused.train(training)
            x = _input(n, 6, 6, torch.float32, layout, in_planes, 300 + i)
            xf = x.detach().requires_grad_()
            xe = x.detach().clone().requires_grad_()
            y, ye = fused(xf), eager(xe)
            torch.testing.assert_close(y, ye, rtol=2e-4, atol=2e-4)
            g = torch.randn_like(ye)
            y.backward(g)
            ye.backward(g)
            torch.testing.assert_close(xf.grad, xe.grad, rtol=2e-4, atol=2e-4)
            for (name, p), pe in zip(fused.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, pe.grad, rtol=2e-4, atol=2e-4, msg=name)
                p.grad = pe.grad = None
            for (name, b), be in zip(fused.named_buffers(), eager.buffers()):
                torch.testing.assert_close(b, be, rtol=2e-4, atol=2e-4, msg=name)


def _args(**kw):
    torch.manual_seed(2)
    a = dict(bn_weight=torch.ones(3), bn_bias=torch.zeros(3), running_mean=torch.zeros(3), running_var=torch.ones(3),
             training=True, stride=1, padding=1, backend="triton")
    a.update(kw)
    return a


def test_memo_never_skips_a_check():
    """Each bad call right after the same call made good: the memo must not answer for it."""
    if "triton" not in fused_resnet.available_backends():
        pytest.skip("triton unavailable")
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    good = _args()
    fused_resnet.bn_relu_conv2d(x, w, **good)
    fused_resnet.bn_relu_conv2d(x, w, **good)
    bad = {
        "bool stride": (dict(stride=(True, 1)), TypeError),
        "bool padding": (dict(padding=True), TypeError),
        "bool training": (dict(training=1), TypeError),
        "bool momentum": (dict(momentum=True), TypeError),
        "running buffer requiring grad": (dict(running_mean=torch.zeros(3, requires_grad=True)), RuntimeError),
        "wrong dtype": (dict(bn_weight=torch.ones(3, dtype=torch.float64)), TypeError),
        "unknown backend": (dict(backend="tritonn"), ValueError),
        "eps 0 in training": (dict(eps=0.0), ValueError),
    }
    for name, (change, error) in bad.items():
        with pytest.raises(error):
            fused_resnet.bn_relu_conv2d(x, w, **_args(**change))
        fused_resnet.bn_relu_conv2d(x, w, **good)  # and the good call still passes
    with pytest.raises(ValueError):  # a residual of the wrong shape, after one of the right shape
        fused_resnet.bn_relu_conv2d(x, w, residual=torch.randn(2, 4, 5, 5), **good)
        fused_resnet.bn_relu_conv2d(x, w, residual=torch.randn(2, 4, 5, 4), **good)
    # running buffers requiring grad are legal under no_grad (eager's rule), refused again with grad on
    rm = torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        fused_resnet.bn_relu_conv2d(x, w, **_args(running_mean=rm))
    with pytest.raises(RuntimeError):
        fused_resnet.bn_relu_conv2d(x, w, **_args(running_mean=rm))


def test_unhashable_argument_is_checked_not_memoized():
    """An argument the memo's key cannot hash (here a dict as padding) gets validate's full check and its error, on
    every call, and leaves no entry behind; a list (hashable as its elements) is a legal stride."""
    if "triton" not in fused_resnet.available_backends():
        pytest.skip("triton unavailable")
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    size = len(_plan.VALIDATED)
    for _ in range(2):
        with pytest.raises((TypeError, ValueError), match="padding"):
            fused_resnet.bn_relu_conv2d(x, w, **_args(padding={"h": 1}))
    assert len(_plan.VALIDATED) == size
    y = fused_resnet.bn_relu_conv2d(x, w, **_args(stride=[1, 1]))
    torch.testing.assert_close(y, fused_resnet.bn_relu_conv2d(x, w, **_args(stride=(1, 1))))


def test_dx_finished_in_place_is_exact():
    """The one-consumer backward finishes dx over its ga*m buffer in place: dx must equal the reference's on fresh
    data (train mode, NCHW and channels_last), where an aliasing error would mix the two."""
    if "triton" not in fused_resnet.available_backends():
        pytest.skip("triton unavailable")
    for layout in ("nchw", "channels_last"):
        x = _input(3, 5, 5, torch.float64, layout, 6, 11)
        w = torch.randn(4, 6, 3, 3, dtype=torch.float64)
        g = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        gamma, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
        grads = []
        for backend in ("triton", "reference"):
            xx = x.detach().clone().requires_grad_()
            fused_resnet.bn_relu_conv2d(xx, w, bn_weight=gamma, bn_bias=beta, training=True, padding=1,
                                        backend=backend).backward(g)
            grads.append(xx.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


def test_bn_add_memo_never_skips_a_check():
    """bn_add_relu's checks are memoized too (_plan.bn_add_key): each bad call right after the good one raises."""
    if "triton" not in fused_resnet.available_backends():
        pytest.skip("triton unavailable")
    torch.manual_seed(4)
    z, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def bn(**kw):
        a = dict(bn_weight=torch.rand(3) + 0.5, bn_bias=torch.randn(3), running_mean=torch.zeros(3),
                 running_var=torch.ones(3), training=True)
        a.update(kw)
        return a

    def call(shortcut=s, shortcut_bn="good", **kw):
        sbn = bn() if shortcut_bn == "good" else shortcut_bn
        return fused_resnet.bn_add_relu(z, shortcut, backend=kw.pop("backend", "triton"), shortcut_bn=sbn,
                                        **bn(**kw))

    call()
    hits = _plan.hits
    call()
    assert _plan.hits > hits  # the repeat found its answer in the memo
    bad = {
        "bool training": (dict(training=1), TypeError),
        "bool momentum": (dict(momentum=True), TypeError),
        "wrong bn dtype": (dict(bn_weight=torch.ones(3, dtype=torch.float64)), TypeError),
        "running buffer requiring grad": (dict(running_mean=torch.zeros(3, requires_grad=True)), RuntimeError),
        "unknown backend": (dict(backend="tritonn"), ValueError),
        "shortcut of another shape": (dict(shortcut=torch.randn(2, 3, 4, 5)), ValueError),
        "shortcut of another dtype": (dict(shortcut=s.double()), TypeError),
        "shortcut BN of the wrong size": (dict(shortcut_bn=bn(bn_weight=torch.ones(4))), ValueError),
        "shortcut BN eps 0 in training": (dict(shortcut_bn=bn(eps=0.0)), ValueError),
    }
    for name, (change, error) in bad.items():
        with pytest.raises(error):
            call(**change)
        call()  # and the good call still passes
    assert torch.isfinite(call(shortcut_bn=None)).all()  # an identity shortcut keys apart from the BN one


def test_memo_follows_the_environment(monkeypatch):
    """resolve()'s answer depends on FUSED_RESNET_CUDA_EMULATED: the memo keys on it."""
    if "cuda" not in fused_resnet.available_backends() or torch.cuda.is_available():
        pytest.skip("needs the emulated CUDA build (CPU only)")
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    fused_resnet.bn_relu_conv2d(x, w, **_args(backend="cuda"))
    monkeypatch.setenv("FUSED_RESNET_CUDA_EMULATED", "0")
    with pytest.raises(RuntimeError, match="not available"):
        fused_resnet.bn_relu_conv2d(x, w, **_args(backend="cuda"))


def test_memo_is_bounded():
    if "triton" not in fused_resnet.available_backends():
        pytest.skip("triton unavailable")
    w = torch.randn(4, 3, 1, 1)
    old = _plan.MAX_ENTRIES
    try:
        _plan.MAX_ENTRIES = 3
        for n in range(1, 8):
            fused_resnet.bn_relu_conv2d(torch.randn(n, 3, 2, 2), w, **_args(padding=0))
            assert len(_plan.VALIDATED) <= 3
    finally:
        _plan.MAX_ENTRIES = old


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_num_batches_tracked_counted_once_per_training_call(backend, momentum):
    """On the eager path of a kernel backend the finalize launch counts num_batches_tracked (eager's add_ is a
    launch of its own); every path counts exactly once per training call, as nn.BatchNorm2d does: a layer, a
    block (its chained BNs take the deferred statistics, the projection its pair op), an empty batch, and
    eval (no count). With momentum=None the cumulative factor reads the counter first."""
    torch.manual_seed(3)
    eager = PreActBlock(4, 8, 2, fused=False)
    fused = PreActBlock(4, 8, 2, backend=backend)
    for m in (eager, fused):
        for bn in (m.bn1, m.bn2):
            bn.momentum = momentum
    fused.load_state_dict(eager.state_dict())
    for i, (n, training) in enumerate([(2, True), (3, True), (0, True), (2, False), (2, True)]):
        eager.train(training)
        fused.train(training)
        x = torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(400 + i))
        torch.testing.assert_close(fused(x), eager(x), rtol=2e-4, atol=2e-4)
        for (name, b), be in zip(fused.named_buffers(), eager.buffers()):
            torch.testing.assert_close(b, be, rtol=2e-4, atol=2e-4, msg=name)
    assert int(fused.bn1.num_batches_tracked) == int(fused.bn2.num_batches_tracked) == 4


def test_bn_tensors_moved_out_of_their_dicts(backend):
    """The fast read of a plain BatchNorm2d's tensors (nn._tensors) falls back to attributes when a name left the
    parameter dict: pruning (weight -> weight_orig + a plain attribute) and a bias re-set as a plain tensor."""
    from torch.nn.utils import prune

    torch.manual_seed(5)
    block = PreActBlock(4, 4, backend=backend)
    with torch.no_grad():
        block.bn2.weight.uniform_(0.5, 1.5)
    eager = PreActBlock(4, 4, fused=False)
    eager.load_state_dict(block.state_dict())
    for m in (block, eager):  # (a pruned module cannot be deep-copied: its weight is not a leaf)
        prune.l1_unstructured(m.bn2, "weight", amount=0.5)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(block(x), eager(x), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(block.bn2.running_var, eager.bn2.running_var)
    assert block.bn2.num_batches_tracked.item() == eager.bn2.num_batches_tracked.item() == 1

    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)
    del bn.bias
    bn.bias = torch.randn(4)
    ebn = copy.deepcopy(bn)
    y, _ = fused_resnet.nn.fused_bn_relu_conv(bn, conv, x, backend=backend)
    torch.testing.assert_close(y, conv(F.relu(ebn(x))), rtol=2e-4, atol=2e-4)


def test_forward_mode_ad_is_refused_not_dropped(backend):
    """Tangents need no requires_grad: the direct (no-node) path would run and drop the batch statistics' part of
    a tangent. Under a dual level every fused op takes its autograd node's path, which refuses forward-mode AD."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(6)
    z, s, w = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3)
    bn = dict(bn_weight=torch.rand(4) + 0.5, bn_bias=torch.randn(4), training=True, backend=backend)
    calls = {
        "bn_add_relu": lambda t: fused_resnet.bn_add_relu(t, s, **bn),
        "bn_relu_conv2d": lambda t: fused_resnet.bn_relu_conv2d(t, w, padding=1, **bn),
    }
    for name, call in calls.items():
        with fwAD.dual_level():
            with pytest.raises((NotImplementedError, RuntimeError)):
                call(fwAD.make_dual(z, torch.randn_like(z)))
        assert call(z).shape[0] == 2, name  # and outside the dual level the call runs


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_conv_output_has_torch_empty_strides(fmt):
    """_ops._output allocates with the strides torch.empty(..., memory_format=memory_format_of(x)) gives, size-1
    and empty dimensions included (where both layouts are contiguous)."""
    from fused_resnet import _ops
    from fused_resnet._layout import memory_format_of

    for shape in [(2, 3, 5, 5), (1, 8, 1, 1), (3, 1, 4, 4), (2, 3, 1, 7), (0, 3, 4, 4)]:
        x = torch.randn(shape).contiguous(memory_format=fmt)
        for k, size in [(4, (5, 5)), (1, (1, 1)), (6, (2, 3)), (3, (1, 1))]:
            y = _ops._output(x, k, size)
            ref = torch.empty((shape[0], k, *size), memory_format=memory_format_of(x))
            assert (y.shape, y.stride(), y.dtype, y.device) == (ref.shape, ref.stride(), ref.dtype, ref.device)


def test_forced_config_never_reuses_a_stored_plan():
    """The tuning sweep forces each candidate config in turn: a plan stored before (same shapes, unforced) must not
    stand in for it, or every candidate would be timed with the old config."""
    from fused_resnet.triton import configs, forward

    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 8, 3, 3)
    c = torch.randn(8)
    y = torch.empty(2, 8, 6, 6)
    forward.conv_forward(x, w, None, c, c.abs(), c, None, y, (1, 1), (1, 1), (1, 1))
    stored = list(forward._PLANS.values())
    assert stored
    seen = []
    real = forward._forward_plan

    def spy(*args):
        plan = real(*args)
        seen.append(plan)
        return plan
    forward._forward_plan = spy
    try:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)
        with configs.forced("fwd", cfg):
            forward.conv_forward(x, w, None, c, c.abs(), c, None, y, (1, 1), (1, 1), (1, 1))
    finally:
        forward._forward_plan = real
    assert len(seen) == 1 and seen[0] not in stored
    assert seen[0][1].tail[-4:] == (16, 16, 16, 1) and seen[0][1].options == dict(num_warps=4, num_stages=1)
