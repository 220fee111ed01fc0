"""The CUDA backend's post-activation block end (csrc/kernels/bn_add_relu.cu), called through its launchers
fused_resnet.cuda.bn_add_relu_forward / bn_add_relu_backward, against a plain-PyTorch oracle of the
formulas: y = act(rnd(rnd(bn(z)) + t)), t = rnd(bn_s(s)) or s, and its backward (gm = g where relu's
backward passes it; S1, S2, S2s; dz, ds with batch or running statistics).

Forward: bitwise equal to eager torch ops in the tensor's dtype (the kernel computes (v - mean)*scale + beta
with every operation rounded, as torch's separate ops do). Backward: the same ReLU mask as that eager
forward (so the oracle's gm is the kernel's), sums and gradients against float64; the tolerance is twice the
error of the same formulas computed with torch in the eager (accumulation) dtype, plus the output dtype's
rounding of each value. Runs on the emulated build (CPU tensors) and, where fused_resnet._C and a GPU are
here, on the GPU."""
import importlib.util

import pytest
import torch

from fused_resnet import _emulated
from fused_resnet import cuda as kb


def _devices():
    out = []
    if _emulated.status()[0]:
        out.append(pytest.param("cpu", id="emulated"))
    if importlib.util.find_spec("fused_resnet._C") is not None and torch.cuda.is_available():
        out.append(pytest.param("cuda", id="gpu"))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no built CUDA kernels here"))]


@pytest.fixture(params=_devices())
def device(request):
    return request.param


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "fp16": torch.float16}
SHAPE = (3, 37, 5, 7)        # C past one 32-channel slice, N*H*W = 105: no tile is whole
BIG = (4, 33, 23, 29)        # N*H*W = 2668: three row groups in the reduction, several blocks per pass


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(t, layout, gen):
    """t ([N, C, H, W], fresh values) as NCHW, channels_last, or a strided view into a larger buffer."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    base = torch.randn(n, 2 * c, h + 1, w + 3, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
    view = base[:, 1::2, 1:, 2:w + 2]
    view.copy_(t)
    return view


def _vec(c, gen, acc, device, lo, hi):
    return (lo + (hi - lo) * torch.rand(c, generator=gen, dtype=torch.float64)).to(acc).to(device)


def _bn_params(c, gen, acc, device, gamma=True):
    mean = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.3 + 0.2).to(acc).to(device)
    invstd = _vec(c, gen, acc, device, 0.5, 1.5)
    g = (torch.randn(c, generator=gen, dtype=torch.float64) + 0.2).to(acc).to(device) if gamma else None
    beta = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(acc).to(device)
    scale = invstd * g if g is not None else invstd.clone()
    return dict(mean=mean, invstd=invstd, gamma=g, beta=beta, scale=scale.contiguous())


def _problem(shape, dtype, layout, bn_shortcut, device, seed, s_layout=None, g_layout=None):
    gen = torch.Generator().manual_seed(seed)
    acc = _acc(dtype)
    n, c, h, w = shape

    def fresh(mult, shift):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * mult + shift).to(dtype).to(device)

    z = _layout(fresh(1.5, 0.3), layout, gen)
    s = _layout(fresh(1.0, -0.2), s_layout or layout, gen)
    g = _layout(fresh(1.0, 0.1), g_layout or layout, gen)
    p = _bn_params(c, gen, acc, device)
    q = _bn_params(c, gen, acc, device) if bn_shortcut else None
    return z, s, g, p, q


def _bn_eager(v, m, scale, beta):
    """(v - mean)*scale + beta with torch ops in the accumulation dtype (each op rounded)."""
    c = v.shape[1]
    acc = m.dtype
    return (v.to(acc) - m.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + beta.view(1, c, 1, 1)


def _eager_pre(z, s, p, q):
    dt, acc = z.dtype, p["mean"].dtype
    a = _bn_eager(z, p["mean"], p["scale"], p["beta"]).to(dt)
    t = _bn_eager(s, q["mean"], q["scale"], q["beta"]).to(dt) if q is not None else s
    return (a.to(acc) + t.to(acc)).to(dt)


def _eager_forward(z, s, p, q, relu):
    pre = _eager_pre(z, s, p, q)
    return torch.relu(pre) if relu else pre


def _forward(z, s, p, q, relu):
    y = torch.empty_like(z)  # z's layout: the shared-strides paths
    if q is None:
        kb.bn_add_relu_forward(z, p["mean"], p["scale"], p["beta"], s, None, None, None, y, relu=relu)
    else:
        kb.bn_add_relu_forward(z, p["mean"], p["scale"], p["beta"], s, q["mean"], q["scale"], q["beta"], y,
                               relu=relu)
    return y


def _backward(g, z, s, p, q, batch_stats, s_batch_stats, need_dz, need_ds, need_sums, relu):
    if q is None:
        q_args = (None, None, None, None, None, False)
    else:
        q_args = (q["mean"], q["scale"], q["beta"], q["invstd"], q["gamma"], s_batch_stats)
    return kb.bn_add_relu_backward(g, z, p["mean"], p["scale"], p["beta"], p["invstd"], p["gamma"], batch_stats,
                                   s, *q_args, need_dz, need_ds, need_sums, relu=relu)


def _oracle_backward(g, z, s, p, q, batch_stats, s_batch_stats, relu, acc):
    """(dz, ds, sums) of the formulas in `acc` (float64: the oracle; the eager dtype: its error bound), from
    the eager forward's mask."""
    pre = _eager_pre(z, s, p, q)
    c = z.shape[1]
    m = z.numel() // c
    gg = g.to(acc)
    gm = torch.where(pre <= 0, torch.zeros_like(gg), gg) if relu else gg
    v = {k: (t.to(acc).view(1, c, 1, 1) if t is not None else None) for k, t in p.items()}
    xh = (z.to(acc) - v["mean"]) * v["invstd"]
    s1 = gm.sum((0, 2, 3))
    s2 = (gm * xh).sum((0, 2, 3))
    if q is not None:
        w = {k: (t.to(acc).view(1, c, 1, 1) if t is not None else None) for k, t in q.items()}
        xs = (s.to(acc) - w["mean"]) * w["invstd"]
        s2s = (gm * xs).sum((0, 2, 3))
    else:
        s2s = torch.zeros_like(s1)

    def grad(xhat, k_batch, k_run, sum2, batch):
        if batch:
            return k_batch * (gm - s1.view(1, c, 1, 1) / m - xhat * (sum2.view(1, c, 1, 1) / m))
        return gm * k_run

    kz = v["invstd"] * v["gamma"] if v["gamma"] is not None else v["invstd"]
    dz = grad(xh, kz, v["scale"], s2, batch_stats)
    if q is None:
        ds = gm
    else:
        ks = w["invstd"] * w["gamma"] if w["gamma"] is not None else w["invstd"]
        ds = grad(xs, ks, w["scale"], s2s, s_batch_stats)
    return dz, ds, torch.stack([s1, s2, s2s])


def _close(name, got, want64, eager, out_dtype):
    """got (kernel) vs the float64 oracle: NaN where it is NaN, the same infinities, and elsewhere within 2x
    the eager computation's error plus the output dtype's rounding of each value and a floor at the
    accumulation dtype's rounding of the largest value."""
    got = got.double().cpu()
    want = want64.double().cpu()
    eager = eager.double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN positions differ"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), f"{name}: infinities differ"
    fin = torch.isfinite(want)
    if not fin.any():
        return
    g, w, e = got[fin], want[fin], eager[fin]
    e_ok = torch.isfinite(e)
    ref_err = (e[e_ok] - w[e_ok]).abs().max().item() if e_ok.any() else 0.0
    big = w.abs().max().item()
    acc_eps = torch.finfo(_acc(out_dtype)).eps
    tol = 2 * ref_err + torch.finfo(out_dtype).eps * w.abs() + 4 * acc_eps * big + 1e-300
    err = (g - w).abs()
    assert bool((err <= tol).all()), (f"{name}: max error {err.max().item():.3e} over tolerance "
                                      f"(eager's error {ref_err:.3e}, largest value {big:.3e})")


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("bn_shortcut", [False, True], ids=["id_shortcut", "bn_shortcut"])
@pytest.mark.parametrize("layout", ["nchw", "cl", "view"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_forward_bitwise(device, dt, layout, bn_shortcut, relu):
    """Bitwise eager: each BN output rounded to the dtype, their sum in the accumulation dtype rounded, then
    torch.relu -- every dtype, every layout."""
    z, s, _, p, q = _problem(SHAPE, DTYPES[dt], layout, bn_shortcut, device, seed=1)
    y = _forward(z, s, p, q, relu)
    want = _eager_forward(z, s, p, q, relu)
    assert torch.equal(y, want), f"max diff {(y.double() - want.double()).abs().max().item()}"


@pytest.mark.parametrize("layouts", [("cl", "nchw"), ("nchw", "cl"), ("view", "cl")], ids=lambda v: "-".join(v))
@pytest.mark.parametrize("shape", [BIG, (2, 1, 3, 1), (1, 40, 1, 1)], ids=["big", "c1", "hw1"])
def test_forward_mixed_layouts_shapes(device, shape, layouts):
    z, s, _, p, q = _problem(shape, torch.float32, layouts[0], True, device, seed=2, s_layout=layouts[1])
    y = torch.empty_like(s)  # y in s's layout, not z's: a third set of strides
    kb.bn_add_relu_forward(z, p["mean"], p["scale"], p["beta"], s, q["mean"], q["scale"], q["beta"], y)
    assert torch.equal(y, _eager_forward(z, s, p, q, True))


def test_forward_nonfinite(device):
    """NaN in z and +-inf in s follow IEEE as eager: NaN stays NaN through the ReLU, +inf passes, -inf -> 0."""
    for bn_shortcut in (False, True):
        z, s, _, p, q = _problem(SHAPE, torch.float32, "cl", bn_shortcut, device, seed=3)
        z[0, 1, 0, 0] = float("nan")
        s[1, 2, 1, 1] = float("inf")
        s[2, 3, 2, 2] = float("-inf")
        y = _forward(z, s, p, q, True)
        want = _eager_forward(z, s, p, q, True)
        assert torch.isnan(y[0, 1, 0, 0])
        assert torch.equal(torch.isnan(y), torch.isnan(want))
        assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(want))


# ---------------------------------------------------------------- backward

BACKWARD_STATS = [  # (shortcut, batch_stats, s_batch_stats)
    ("id", True, False), ("id", False, False),
    ("bn", True, True), ("bn", True, False), ("bn", False, True), ("bn", False, False),
]


def _check_backward(g, z, s, p, q, batch_stats, s_batch_stats, relu, got, what=("dz", "ds", "sums")):
    dt = z.dtype
    want = _oracle_backward(g, z, s, p, q, batch_stats, s_batch_stats, relu, torch.float64)
    eager = _oracle_backward(g, z, s, p, q, batch_stats, s_batch_stats, relu, _acc(dt))
    for name, gv, wv, ev in zip(("dz", "ds", "sums"), got, want, eager):
        if name not in what:
            continue
        out_dtype = dt if name != "sums" else _acc(dt)
        _close(name, gv, wv, ev.to(out_dtype), out_dtype)


# fp32: every statistics combination with and without the ReLU; bf16 and fp64 (where eager's own error is
# bf16 rounding, or none): each shortcut with batch and running statistics, with the ReLU.
BACKWARD_CASES = (
    [("fp32", st, relu) for st in BACKWARD_STATS for relu in (True, False)]
    + [(dt, st, True) for dt in ("bf16", "fp64") for st in (BACKWARD_STATS[0], BACKWARD_STATS[3], BACKWARD_STATS[4])]
)


@pytest.mark.parametrize("layout", ["nchw", "cl", "view"])
@pytest.mark.parametrize("dt,stats,relu", BACKWARD_CASES,
                         ids=[f"{d}-{st[0]}-bs{int(st[1])}-sbs{int(st[2])}-{'relu' if r else 'identity'}"
                              for d, st, r in BACKWARD_CASES])
def test_backward(device, dt, layout, stats, relu):
    shortcut, batch_stats, s_batch_stats = stats
    z, s, g, p, q = _problem(SHAPE, DTYPES[dt], layout, shortcut == "bn", device, seed=4)
    dz, ds, sums = _backward(g, z, s, p, q, batch_stats, s_batch_stats, True, True, True, relu)
    assert dz.dtype == z.dtype and ds.dtype == s.dtype and sums.dtype == _acc(z.dtype)
    assert sums.shape == (3, z.shape[1])
    if layout == "cl":
        assert dz.is_contiguous(memory_format=torch.channels_last)
        assert ds.is_contiguous(memory_format=torch.channels_last)
    _check_backward(g, z, s, p, q, batch_stats, s_batch_stats, relu, (dz, ds, sums))
    if shortcut == "id":
        assert not sums[2].any()
        if not relu:
            assert torch.equal(ds, g)


@pytest.mark.parametrize("dt,layout", [("fp32", "nchw"), ("fp32", "cl"), ("bf16", "cl"), ("bf16", "mixed")])
def test_backward_many_groups(device, dt, layout):
    """Several row groups in the reduction and several elementwise blocks per channel slice (each finishing
    the sums itself: they must agree), C = 33 (a 32-channel slice and a one-channel one); mixed: z
    channels_last, s NCHW, g a strided view."""
    mixed = layout == "mixed"
    z, s, g, p, q = _problem(BIG, DTYPES[dt], "cl" if mixed else layout, True, device, seed=5,
                             s_layout="nchw" if mixed else None, g_layout="view" if mixed else None)
    got = _backward(g, z, s, p, q, True, True, True, True, True, True)
    _check_backward(g, z, s, p, q, True, True, True, got)
    again = _backward(g, z, s, p, q, True, True, True, True, True, True)
    for a, b in zip(got, again):  # deterministic: fixed summation order, no atomics
        assert torch.equal(a, b)


@pytest.mark.parametrize("flags", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False), (False, True, True), (False, False, False)],
                         ids=lambda f: "".join(n for n, on in zip(("dz", "ds", "sums"), f) if on) or "none")
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_backward_need_flags(device, flags, batch_stats):
    need_dz, need_ds, need_sums = flags
    z, s, g, p, q = _problem(SHAPE, torch.float32, "cl", True, device, seed=6)
    got = _backward(g, z, s, p, q, batch_stats, batch_stats, need_dz, need_ds, need_sums, True)
    for out, need in zip(got, flags):
        assert (out is not None) == need
    full = _backward(g, z, s, p, q, batch_stats, batch_stats, True, True, True, True)
    for out, ref in zip(got, full):
        if out is not None:
            assert torch.equal(out, ref)  # the same sums whichever outputs are asked for


def test_backward_no_gamma(device):
    """gamma None: the batch-statistics gradient without the affine weight (k = invstd)."""
    z, s, g, p, q = _problem(SHAPE, torch.float32, "nchw", True, device, seed=7)
    p["gamma"] = None
    q["gamma"] = None
    p["scale"] = p["invstd"].clone()
    q["scale"] = q["invstd"].clone()
    got = _backward(g, z, s, p, q, True, True, True, True, True, True)
    _check_backward(g, z, s, p, q, True, True, True, got)


@pytest.mark.parametrize("shortcut", ["id", "bn"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_backward_nonfinite(device, shortcut, batch_stats):
    """NaN in z, +-inf in s: the gradients and sums follow the formulas' IEEE semantics, as eager's: the
    mask passes NaN (threshold_backward: NOT pre <= 0), a NaN xhat makes its channel's S2 (and with batch
    statistics its dz) NaN, 0 * inf in S2s is NaN."""
    z, s, g, p, q = _problem(SHAPE, torch.float32, "cl", shortcut == "bn", device, seed=8)
    z[0, 1, 0, 0] = float("nan")
    s[1, 2, 1, 1] = float("inf")
    s[2, 3, 2, 2] = float("-inf")
    got = _backward(g, z, s, p, q, batch_stats, batch_stats, True, True, True, True)
    _check_backward(g, z, s, p, q, batch_stats, batch_stats, True, got)
    assert torch.isnan(got[2][1, 1]) and torch.isfinite(got[2][0, 1])  # S2 of z's NaN channel; S1 finite


def test_relu_mask_matches_autograd(device):
    """The ReLU mask is autograd's: eager relu(bn(z) + bn_s(s)) in the dtype, backward through torch.relu,
    gives the kernel's gm (seen in ds of the identity shortcut with running statistics), NaN included."""
    z, s, g, p, _ = _problem(SHAPE, torch.bfloat16, "cl", False, device, seed=9)
    z[1, 4, 2, 3] = float("nan")
    pre = _eager_pre(z, s, p, None).detach().requires_grad_(True)
    torch.relu(pre).backward(g)
    _, ds, _ = _backward(g, z, s, p, None, False, False, False, True, False, True)
    assert torch.equal(ds, pre.grad)


def test_empty_batch(device):
    z, s, g, p, q = _problem((0, 5, 3, 3), torch.float32, "cl", True, device, seed=10)
    y = _forward(z, s, p, q, True)
    assert y.shape == z.shape
    dz, ds, sums = _backward(g, z, s, p, q, True, True, True, True, True, True)
    assert dz.shape == z.shape and ds.shape == s.shape and torch.equal(sums, torch.zeros_like(sums))


def test_binding_refuses_malformed_calls(device):
    """Shapes, dtypes and aliasing are checked before any kernel reads: a Python error, no crash."""
    z, s, g, p, q = _problem(SHAPE, torch.float32, "cl", True, device, seed=11)
    ext = kb._ext(z)
    m, sc, b = p["mean"], p["scale"], p["beta"]
    with pytest.raises(RuntimeError, match="must have z's shape"):
        ext.bn_add_relu_forward(z, m, sc, b, s[:, :, :-1], None, None, None, torch.empty_like(z), True)
    with pytest.raises(RuntimeError, match="must have z's shape"):
        ext.bn_add_relu_forward(z, m, sc, b, s.double(), None, None, None, torch.empty_like(z), True)
    with pytest.raises(RuntimeError, match="y shares memory"):
        ext.bn_add_relu_forward(z, m, sc, b, s, None, None, None, z, True)
    with pytest.raises(RuntimeError, match="come together"):
        ext.bn_add_relu_forward(z, m, sc, b, s, q["mean"], None, None, torch.empty_like(z), True)
    with pytest.raises(RuntimeError, match="contiguous vector of 37"):
        ext.bn_add_relu_forward(z, m[:-1], sc, b, s, None, None, None, torch.empty_like(z), True)
    with pytest.raises(RuntimeError, match="need the reduction"):
        ext.bn_add_relu_backward(g, z, m, sc, b, p["invstd"], None, s, None, None, None, None, None,
                                 torch.empty_like(z), True, None, False, None, False, True)
    with pytest.raises(RuntimeError, match="dz shares memory"):
        ext.bn_add_relu_backward(g, z, m, sc, b, p["invstd"], None, s, None, None, None, None, None,
                                 g, False, None, False, None, False, True)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 1, 3, 1), (1, 40, 1, 1), (3, 5, 1, 7), (2, 3, 4, 1)],
                         ids=["c1", "hw1", "h1", "w1"])
def test_backward_degenerate_shapes_fp16(device, shape, layout):
    """Size-1 dimensions (whose strides say nothing about the layout) in fp16, both shortcuts."""
    for bn_shortcut, seed in ((False, 12), (True, 13)):
        z, s, g, p, q = _problem(shape, torch.float16, layout, bn_shortcut, device, seed=seed)
        assert torch.equal(_forward(z, s, p, q, True), _eager_forward(z, s, p, q, True))
        got = _backward(g, z, s, p, q, True, False, True, True, True, True)
        _check_backward(g, z, s, p, q, True, False, True, got)
