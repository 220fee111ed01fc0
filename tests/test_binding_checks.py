"""The compiled binding (fused_resnet._C) refuses every malformed call with a Python exception naming the
shapes, before any kernel could read out of bounds -- and never crashes the process (an empty filter
once divided by zero). Shape checks run before device checks, so these run without a GPU wherever the
real extension is built (CI builds it in its own venv against the registry's CUDA torch; .ci/run), and
against the emulated build of the same binding.cpp (FUSED_RESNET_CUDA_EMULATED=1), which CI's main run has."""
import importlib.util

import pytest
import torch


def _binding():
    """(module, the device its kernels take, the refusal for another device)."""
    if importlib.util.find_spec("fused_resnet._C") is not None:
        from fused_resnet import _C

        return _C, "must be a CUDA tensor"
    from fused_resnet import _emulated

    ok, why = _emulated.status()
    if not ok:
        pytest.skip(f"neither fused_resnet._C nor the emulated build is here ({why})", allow_module_level=True)
    return _emulated.load(), r"must be a CPU tensor \(emulated build\)"


C, WRONG_DEVICE = _binding()


def _args(n=2, c=3, h=5, k=4, kh=3, dtype=torch.float32):
    x = torch.randn(n, c, h, h, dtype=dtype)
    w = torch.randn(k, c, kh, kh, dtype=dtype)
    y = torch.empty(n, k, h, h, dtype=dtype)
    vec = torch.ones(c)
    return x, w, y, vec


def test_well_formed_call_is_refused_for_its_device_only():
    """A CPU call to the real extension, a meta-tensor call to the emulated one: right shapes, wrong device."""
    x, w, y, vec = _args()
    if C.EMULATED:
        x, w, y = x.to("meta"), w.to("meta"), y.to("meta")
    with pytest.raises(RuntimeError, match=WRONG_DEVICE):
        C.conv_forward(x, w, None, vec, vec, vec, None, y, [1, 1], [1, 1], [1, 1], False, False, True)


def test_strided_input_is_not_mistaken_for_an_aliased_output():
    """A non-contiguous x (a view) was once refused as 'shares memory' (get_overlap_status is 'too hard'
    for any strided view): found when the emulated build first ran the parity matrix."""
    if not C.EMULATED:
        pytest.skip("needs a device the kernels run on: the emulated build")
    x = torch.randn(2, 3, 10, 5)[:, :, ::2]
    w, y, vec = torch.randn(4, 3, 3, 3), torch.empty(2, 4, 5, 5), torch.ones(3)
    C.conv_forward(x, w, None, vec, vec, vec, None, y, [1, 1], [1, 1], [1, 1], False, False, True)
    base = torch.randn(2, 3, 10, 5)  # and a dense y inside a strided x's span is still refused
    y_in_x = base.view(-1)[:150].view(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="y shares memory"):
        C.conv_forward(base[:, :, ::2], torch.randn(3, 3, 1, 1), None, vec, vec, vec, None, y_in_x, [1, 1], [0, 0],
                       [1, 1], False, False, True)


@pytest.mark.parametrize("case,match", [
    ("channels", r"weight of shape \[4, 2, 3, 3\] has 2 input channels, x of shape \[2, 3, 5, 5\] has 3"),
    ("empty filter", "the filter must be at least 1x1, got 0x3"),
    ("y batch", r"y of shape \[1, 4, 5, 5\] must be \[N=2, K=4"),
    ("stride 0", "stride and dilation must be >= 1"),
    ("dilation 0", "stride and dilation must be >= 1"),
    ("y aliases x", "y shares memory with an input"),
    ("y not dense", "y must be dense"),
    ("residual shape", "residual of shape"),
])
def test_conv_forward_refuses(case, match):
    x, w, y, vec = _args(k=3 if case == "y aliases x" else 4)
    stride, dil, res = [1, 1], [1, 1], None
    if case == "channels":
        w = torch.randn(4, 2, 3, 3)
    elif case == "empty filter":
        w = torch.randn(4, 3, 0, 3)
    elif case == "y batch":
        y = torch.empty(1, 4, 5, 5)
    elif case == "stride 0":
        stride = [0, 1]
    elif case == "dilation 0":
        dil = [1, 0]
    elif case == "y aliases x":
        y = x
    elif case == "y not dense":
        y = torch.empty(2, 4, 5, 10)[..., ::2]
    elif case == "residual shape":
        res = torch.randn(2, 4, 4, 5)
    with pytest.raises(RuntimeError, match=match):
        C.conv_forward(x, w, None, vec, vec, vec, res, y, stride, [1, 1], dil, False, False, True)


@pytest.mark.parametrize("case,match", [
    ("grad_y channels", r"grad_y of shape \[2, 5, 5, 5\] must be \[N=2, K=4"),
    ("grad_y batch", r"grad_y of shape \[3, 4, 5, 5\] must be \[N=2, K=4"),
    ("weight channels", "input channels"),
    ("out aliases grad_y", "out shares memory with an input"),
    ("addend shape", r"addend \[2, 3, 5, 4\] .* must have out's shape"),
    ("addend dtype", "must have out's shape, strides and dtype"),
    ("addend strides", "must have out's shape, strides and dtype"),
    ("addend overlaps out", "addend overlaps out without being it"),
    ("raw with sums", "raw dgrad has no BN backward"),
])
def test_conv_dgrad_refuses(case, match):
    x, w, _, vec = _args()
    gy = torch.randn(2, 4, 5, 5)
    out = torch.empty_like(x)
    addend, raw, need_sums = None, False, True
    if case == "addend shape":
        addend = torch.randn(2, 3, 5, 4)
    elif case == "addend dtype":
        addend = torch.randn_like(x, dtype=torch.float64)
    elif case == "addend strides":
        addend = torch.randn_like(x).contiguous(memory_format=torch.channels_last)
    elif case == "addend overlaps out":
        big = torch.randn(2 * x.numel())
        out = big[:x.numel()].view(x.shape)
        addend = big[x.numel() // 2:x.numel() // 2 + x.numel()].view(x.shape)
    elif case == "raw with sums":
        raw = True
    if case == "grad_y channels":
        gy = torch.randn(2, 5, 5, 5)
    elif case == "grad_y batch":
        gy = torch.randn(3, 4, 5, 5)
    elif case == "weight channels":
        w = torch.randn(4, 2, 3, 3)
    elif case == "out aliases grad_y":
        gy = torch.randn(2, 4, 5, 5)
        x = torch.randn(2, 4, 5, 5)
        w = torch.randn(4, 4, 3, 3)
        vec = torch.ones(4)
        out = gy
    with pytest.raises(RuntimeError, match=match):
        C.conv_dgrad(gy, w, x, vec, vec, vec, vec, out, False, need_sums, [1, 1], [1, 1], [1, 1], False, addend, raw)


@pytest.mark.parametrize("case,match", [
    ("empty filter", "the filter must be at least 1x1, got 0x0"),  # once SIGFPE: the process died
    ("chunks miss pixels", "must cover the 50 output pixels"),
    ("grad_y channels", "grad_y of shape"),
    ("stride 0", "stride and dilation must be >= 1"),
])
def test_conv_wgrad_refuses(case, match):
    x, _, _, vec = _args()
    gy = torch.randn(2, 4, 5, 5)
    kh = kw = 3
    chunk, split, k = 32, 2, 4
    if case == "empty filter":
        kh = kw = 0
    elif case == "chunks miss pixels":
        chunk, split = 16, 2
    elif case == "grad_y channels":
        k = 5
    stride = [0, 1] if case == "stride 0" else [1, 1]
    with pytest.raises(RuntimeError, match=match):
        C.conv_wgrad(gy, x, torch.empty(k, 3, kh, kw), vec, vec, vec, stride, [1, 1], [1, 1], chunk, split, False, True)


def test_finish_refuses_aliased_output():
    x = torch.randn(2, 3, 4, 4)
    gm = torch.randn(2, 3, 4, 4)
    vec = torch.ones(3)
    with pytest.raises(RuntimeError, match="dx shares memory with an input"):
        C.bn_backward_finish(gm, x, x, vec, vec, None, vec, vec, 32)


@pytest.mark.parametrize("dtype,channels_last,c,rows,tf32", [
    (torch.bfloat16, True, 16, 128, False), (torch.float16, True, 8, 128, False),  # mma.sync: 128-row tiles
    (torch.float32, True, 12, 128, True),  # TF32 mma.sync: C % 4 == 0 suffices
    (torch.bfloat16, False, 16, 64, False), (torch.bfloat16, True, 12, 64, False),
    (torch.float32, True, 16, 64, False), (torch.float32, True, 14, 64, True), (torch.float64, True, 16, 64, True),
])
def test_forward_path_choice(dtype, channels_last, c, rows, tf32):
    """The tensor-core forward takes dense-NHWC x and W in fp16/bf16 with C % 8 == 0, or in fp32 with
    C % 4 == 0 when TF32 is allowed; the rest take the general kernel. The returned rows per tile say which
    ran (and size the statistics partials)."""
    if not C.EMULATED:
        pytest.skip("needs a device the kernels run on: the emulated build")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c, 5, 5).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(8, c, 3, 3).to(dtype).contiguous(memory_format=fmt)
    y = torch.empty(2, 8, 5, 5, dtype=dtype).contiguous(memory_format=fmt)
    vec = torch.ones(c, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    part, tile_rows = C.conv_forward(x, w, None, vec * 0, vec, vec * 0, None, y, [1, 1], [1, 1], [1, 1], True, tf32, True)
    assert tile_rows == rows and part.shape == (2, 1, 8)


def test_forward_with_misaligned_affine_takes_the_general_kernel():
    """The tensor-core forward copies the BN affine (mean, scale, beta) 16 bytes at a time: a view that is not
    16-byte aligned sends the layer to the general kernel, with the same result."""
    if not C.EMULATED:
        pytest.skip("needs a device the kernels run on: the emulated build")
    fmt = torch.channels_last
    x = torch.randn(2, 16, 5, 5).to(torch.bfloat16).contiguous(memory_format=fmt)
    w = torch.randn(8, 16, 3, 3).to(torch.bfloat16).contiguous(memory_format=fmt)
    mean, scale, beta = torch.randn(16) * 0.1, torch.rand(16) + 0.5, torch.randn(16) * 0.1
    outs = []
    for shift in (0, 1):
        views = []
        for v in (mean, scale, beta):
            buf = torch.empty(17)
            buf[shift:shift + 16] = v
            views.append(buf[shift:shift + 16])
        y = torch.empty(2, 8, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        _, tile_rows = C.conv_forward(x, w, None, *views, None, y, [1, 1], [1, 1], [1, 1], True, False, True)
        outs.append((tile_rows, y.float()))
    assert outs[0][0] == 128 and outs[1][0] == 64  # mma.sync, then the general kernel
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype,channels_last,c,k,tiles,tf32", [
    (torch.bfloat16, True, 16, 8, 4, False), (torch.float16, True, 72, 16, 4, False),  # one tile per phase
    (torch.float32, True, 12, 4, 4, True),  # TF32: multiples of 4 suffice
    (torch.bfloat16, False, 16, 8, 1, False), (torch.bfloat16, True, 16, 12, 1, False),
    (torch.bfloat16, True, 12, 8, 1, False), (torch.float32, True, 16, 8, 1, False),
    (torch.float32, True, 16, 6, 1, True),
])
def test_dgrad_path_choice(dtype, channels_last, c, k, tiles, tf32):
    """The tensor-core dgrad takes dense-NHWC gy and W in fp16/bf16 with K % 8 == 0 and C % 8 == 0, or in
    fp32 with multiples of 4 when TF32 is allowed, and splits the pixels by stride phase (four at stride
    2, a tile each here); the rest take the general kernel (one 64-row tile for these 2x5x5 pixels). The
    partials' rows say which ran."""
    if not C.EMULATED:
        pytest.skip("needs a device the kernels run on: the emulated build")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c, 5, 5).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(k, c, 3, 3).to(dtype).contiguous(memory_format=fmt)
    gy = torch.randn(2, k, 3, 3).to(dtype).contiguous(memory_format=fmt)
    out = torch.empty_like(x)
    vec = torch.ones(c)
    part = C.conv_dgrad(gy, w, x, vec * 0, vec, vec * 0, vec, out, True, True, [2, 2], [1, 1], [1, 1], tf32, None, False)
    assert part.shape == (tiles, 2, c)


@pytest.mark.parametrize("case,match", [
    ("neither", "needs the partials or"),
    ("partials rows", r"partials of shape \[2, 2, 3\] do not hold 300 rows"),
    ("partials channels", r"partials of shape \[2, 2, 4\]"),
    ("mean without var", "needs the partials or"),
    ("running pair", "running_mean with running_var"),
    ("counter dtype", "num_batches_tracked must be an int64 tensor of one element"),
    ("counter shape", "num_batches_tracked must be an int64 tensor of one element"),
])
def test_bn_finalize_refuses(case, match):
    part = torch.zeros(2, 2, 3)
    vec = torch.ones(3)
    kw = dict(part=part, tile_rows=64, total=100, mean_in=None, var_in=None, rm=None, rv=None)
    if case == "neither":
        kw["part"] = None
    elif case == "partials rows":
        kw["total"] = 300
    elif case == "partials channels":
        kw["part"] = torch.zeros(2, 2, 4)
    elif case == "mean without var":
        kw.update(part=None, mean_in=vec)
    elif case == "running pair":
        kw["rm"] = vec.clone()
    elif case == "counter dtype":
        kw["nbt"] = torch.zeros((), dtype=torch.int32)
    elif case == "counter shape":
        kw["nbt"] = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match=match):
        C.bn_finalize(kw["part"], kw["tile_rows"], kw["total"], None, kw["mean_in"], kw["var_in"], None, None,
                      None, None, kw["rm"], kw["rv"], 0.1, 1e-5, 1.0, 3, torch.float32, kw.get("nbt"))


def test_column_sums_refuses():
    with pytest.raises(RuntimeError, match=r"a must be a contiguous \[rows, 2C\] array"):
        C.column_sums(torch.zeros(4, 5), torch.zeros(2), torch.zeros(3), None, None)
    with pytest.raises(RuntimeError, match="b must be a contiguous"):
        C.column_sums(None, None, None, torch.zeros(4, 6), torch.zeros(7))
    with pytest.raises(RuntimeError, match="b_out shares memory"):
        b = torch.zeros(4, 6)
        C.column_sums(None, None, None, b, b[0])
