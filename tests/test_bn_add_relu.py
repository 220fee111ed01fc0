"""bn_add_relu (the end of a post-activation block): every backend against the plain-PyTorch reference --
forward, every gradient, running buffers; gradcheck; NaN/inf; bad input; empty batch.

Tolerances follow helpers.py's rule: a backend's error against a float64 run of the reference within a
small multiple of the reference's own error at the test dtype, plus a floor of a few ulps. bf16 masks
can flip where bn(z) + s rounds to within an ulp of zero (eager's CPU batch norm forms x*a + b, the
kernels (x - mean)*scale + beta): the reference flips against float64 there too, so its own error
covers it."""
import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet.functional import bn_add_relu

from helpers import FLOOR, MULTIPLE, max_err

N, C, H, W = 3, 5, 4, 6


def _inputs(seed, shortcut_bn, shape=(N, C, H, W)):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset

    t = dict(x=rnd(n, c, h, w, scale=2.0, offset=0.5), shortcut=rnd(n, c, h, w), grad=rnd(n, c, h, w),
             bn_weight=rnd(c), bn_bias=rnd(c), running_mean=rnd(c), running_var=rnd(c).abs() + 0.5)
    if shortcut_bn:
        t.update(s_weight=rnd(c), s_bias=rnd(c), s_running_mean=rnd(c), s_running_var=rnd(c).abs() + 0.5)
    return t


def _cast(t, dtype, layout):
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for k, v in t.items():
        if v.dim() == 4:
            v = v.to(dtype)
            if layout == "nhwc":
                v = v.contiguous(memory_format=torch.channels_last)
            elif layout == "strided":  # a view: every other column of a wider tensor
                v = torch.cat([v, v], dim=3)[..., ::2]
        else:
            v = v.to(bn_dtype)
        out[k] = v
    return out


_GRADS = ("x", "shortcut", "bn_weight", "bn_bias", "s_weight", "s_bias")


def _run(fn, t, training, activation, **extra):
    leaves = {k: t[k].detach().clone().requires_grad_() if k in t else None for k in _GRADS}
    if "x" in leaves and t["x"].dim() == 4 and not t["x"].is_contiguous() and \
            not t["x"].is_contiguous(memory_format=torch.channels_last):
        leaves["x"] = t["x"].detach().requires_grad_()  # keep the strided view
    bufs = {k: t[k].clone() for k in ("running_mean", "running_var", "s_running_mean", "s_running_var") if k in t}
    sbn = None
    if leaves["s_weight"] is not None:
        sbn = dict(bn_weight=leaves["s_weight"], bn_bias=leaves["s_bias"], running_mean=bufs["s_running_mean"],
                   running_var=bufs["s_running_var"], training=training, momentum=0.2, eps=1e-4)
    y = fn(leaves["x"], leaves["shortcut"], bn_weight=leaves["bn_weight"], bn_bias=leaves["bn_bias"],
           running_mean=bufs["running_mean"], running_var=bufs["running_var"], training=training, momentum=0.1,
           eps=1e-5, shortcut_bn=sbn, activation=activation, **extra)
    wants = [k for k in _GRADS if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in wants], t["grad"].to(y.dtype))
    res = {"y": y.detach(), **{"d" + k: g for k, g in zip(wants, grads)}}
    if training:
        res.update(bufs)
    return res


def _check(backend, dtype, layout, training, shortcut_bn, activation, seed):
    master = _inputs(seed, shortcut_bn)
    low = _cast(master, dtype, layout)
    exact = _cast({k: v.to(dtype).double() if v.dim() == 4 else v for k, v in master.items()}, torch.float64, "nchw")
    got = _run(bn_add_relu, low, training, activation, backend=backend)
    ref = _run(reference.bn_add_relu, low, training, activation)
    oracle = _run(reference.bn_add_relu, exact, training, activation)
    assert got.keys() == oracle.keys()
    assert got["y"].dtype == dtype
    if layout == "nhwc":
        assert got["y"].is_contiguous(memory_format=torch.channels_last)
        assert got["dx"].is_contiguous(memory_format=torch.channels_last)
    for name, want in oracle.items():
        scale = want.double().abs().max().item() + 1e-30
        e_got, e_ref = max_err(got[name], want), max_err(ref[name], want)
        tol = MULTIPLE * e_ref + FLOOR[dtype] * scale
        assert e_got <= tol, (f"{name}: {backend} error {e_got:.3e} > tol {tol:.3e} (reference {e_ref:.3e}) "
                              f"{dtype} {layout} training={training} shortcut_bn={shortcut_bn} {activation}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shortcut_bn", [False, True], ids=["identity", "projection"])
def test_matrix(backend, dtype, training, shortcut_bn):
    layout = ("nchw", "nhwc", "strided")[(hash((str(dtype), training, shortcut_bn))) % 3]
    for layout in (layout, "nhwc") if layout != "nhwc" else (layout,):
        _check(backend, dtype, layout, training, shortcut_bn, "relu", seed=7 + training + 2 * shortcut_bn)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_identity_activation(backend, training):
    _check(backend, torch.float32, "nchw", training, True, "identity", seed=31 + training)


@pytest.mark.parametrize("shortcut_bn", [False, True], ids=["identity", "projection"])
def test_gradcheck(backend, shortcut_bn):
    # Small: gradcheck runs the op twice per input element (the Triton interpreter at ~10 ms a run)
    t = _inputs(5, shortcut_bn, shape=(2, 3, 2, 3))
    names = [k for k in _GRADS if k in t]

    def f(*args):
        a = dict(zip(names, args))
        sbn = dict(bn_weight=a["s_weight"], bn_bias=a["s_bias"], training=True) if shortcut_bn else None
        return bn_add_relu(a["x"], a["shortcut"], bn_weight=a["bn_weight"], bn_bias=a["bn_bias"], training=True,
                           shortcut_bn=sbn, backend=backend)

    args = [t[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_follow_eager(backend, training):
    """A NaN in x and an inf in the shortcut: where eager's composition gives NaN/inf (forward and every
    gradient), so does the fused op, and the finite values agree."""
    t = _cast(_inputs(3, True), torch.float32, "nchw")
    t["x"][0, 1, 2, 3] = float("nan")
    t["shortcut"][1, 2, 0, 0] = float("inf")
    t["shortcut"][2, 3, 1, 1] = -float("inf")
    got = _run(bn_add_relu, t, training, "relu", backend=backend)
    want = _run(reference.bn_add_relu, t, training, "relu")
    for name, w in want.items():
        g = got[name]
        assert torch.equal(g.isnan(), w.isnan()), name
        assert torch.equal(g.isinf(), w.isinf()), name
        fin = w.isfinite()
        torch.testing.assert_close(g[fin], w[fin], rtol=1e-4, atol=1e-4, msg=name)


def test_bad_input_raises_before_anything_changes(backend):
    t = _cast(_inputs(4, True), torch.float32, "nchw")
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    good = dict(bn_weight=t["bn_weight"], bn_bias=t["bn_bias"], running_mean=t["running_mean"],
                running_var=t["running_var"], training=True, backend=backend)
    cases = [
        (dict(shortcut=t["shortcut"][:, :, :2]), ValueError, "shortcut must have x's shape"),
        (dict(shortcut=t["shortcut"].double()), TypeError, "shortcut has dtype"),
        (dict(shortcut_bn=dict(weight=t["s_weight"])), TypeError, "shortcut_bn must be a dict"),
        (dict(shortcut_bn=dict(bn_weight=t["s_weight"][:3])), ValueError, "shortcut_bn bn_weight"),
        (dict(shortcut_bn=dict(running_mean=t["s_running_mean"])), ValueError, "shortcut_bn running_mean and"),
        (dict(activation="gelu"), ValueError, "activation must be one of"),
        (dict(backend="tritonn"), ValueError, "unknown backend"),
        (dict(bn_weight=t["bn_weight"][:2]), ValueError, "bn_weight must have shape"),
    ]
    for change, err, words in cases:
        kw = dict(good, **{k: v for k, v in change.items() if k != "shortcut"})
        with pytest.raises(err, match=words):
            bn_add_relu(t["x"], change.get("shortcut", t["shortcut"]), **kw)
        assert torch.equal(t["running_mean"], rm) and torch.equal(t["running_var"], rv)


def test_empty_batch_is_eager():
    t = _cast(_inputs(6, False), torch.float32, "nchw")
    x, s = t["x"][:0].requires_grad_(), t["shortcut"][:0]
    rm = t["running_mean"].clone()
    y = bn_add_relu(x, s, bn_weight=t["bn_weight"], bn_bias=t["bn_bias"], running_mean=t["running_mean"],
                    running_var=t["running_var"], training=True)
    assert y.shape == x.shape
    assert torch.equal(t["running_mean"], rm)


def test_registered_op_passes_opcheck():
    t = _cast(_inputs(8, True), torch.float32, "nchw")
    mean, var = (torch.rand(C) for _ in range(2))
    invstd = (var + 1e-5).rsqrt()
    args = (t["x"].requires_grad_(), t["shortcut"].requires_grad_(), mean, invstd,
            t["bn_weight"].requires_grad_(), t["bn_bias"].requires_grad_(), None, True, mean.clone(), invstd.clone(),
            t["s_weight"].requires_grad_(), t["s_bias"].requires_grad_(), None, False, True, "reference")
    torch.library.opcheck(torch.ops.fused_resnet.bn_add_relu.default, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiles_fullgraph(training):
    t = _cast(_inputs(9, True), torch.float32, "nchw")
    kw = dict(bn_weight=t["bn_weight"], bn_bias=t["bn_bias"], running_mean=t["running_mean"].clone(),
              running_var=t["running_var"].clone(), training=training,
              shortcut_bn=dict(bn_weight=t["s_weight"], bn_bias=t["s_bias"], running_mean=t["s_running_mean"],
                               running_var=t["s_running_var"], training=training))
    f = torch.compile(lambda x, s: bn_add_relu(x, s, backend="reference", **kw), fullgraph=True, backend="eager")
    y = f(t["x"], t["shortcut"])
    want = reference.bn_add_relu(t["x"], t["shortcut"], **dict(kw, running_mean=kw["running_mean"].clone(),
                                                                 running_var=kw["running_var"].clone()))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)

