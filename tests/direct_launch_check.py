"""tests/test_direct_launch.py's checks, run as a script with TRITON_INTERPRET unset (kernels compiled for sm_90 by
the no-launch driver, fused_resnet/bench/nolaunch_driver.py). Prints one line per passed check; raises on a
failure.

Every scenario runs the same fused calls twice on equal inputs: once through JITFunction.run alone
(FUSED_RESNET_TRITON_DIRECT off) and once with the direct launch on and its kernels already found. The launcher
must receive the same launches from both: same count, grids, kernels (the loaded function handle), non-tensor
arguments, and tensors alike in dtype, shape, strides and 16-byte alignment. And with `verify` on, every direct
launch asks JITFunction.run which kernel it would have picked for its arguments: the same object.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET unset"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet.bench.launches import count_device_ops  # noqa: E402
from fused_resnet.bench.nolaunch_driver import installed  # noqa: E402
from fused_resnet.nn import PreActBlock  # noqa: E402
from fused_resnet.nn_postact import PostActBlock  # noqa: E402
from fused_resnet.triton import _launch  # noqa: E402

torch.set_num_threads(1)


def _layer(dtype, channels_last, n=2, c=8, hw=6):
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
    m = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend="triton").to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(n, c, hw, hw, dtype=dtype).contiguous(memory_format=fmt)
    return m, (x, r)


def _block(kind, stride=1, planes=16):
    torch.manual_seed(0)
    cls = PostActBlock if kind == "postact" else PreActBlock
    m = cls(16, planes, stride, backend="triton", fused=True)
    return m, (torch.randn(2, 16, 6, 6, requires_grad=True),)


def _misaligned():
    """x a view one float past a 16-byte boundary: its pointer specializes differently."""
    m, (x, r) = _layer(torch.float32, False)
    base = torch.randn(x.numel() + 1)
    xv = base[1:].view_as(x).requires_grad_()
    return m, (xv, r)


SCENARIOS = {
    "layer fp32 NCHW": lambda: _layer(torch.float32, False),
    "layer bf16 channels_last": lambda: _layer(torch.bfloat16, True),
    "layer fp64": lambda: _layer(torch.float64, False),
    "layer, another shape": lambda: _layer(torch.float32, False, n=3, c=8, hw=5),
    "layer, misaligned input": _misaligned,
    "identity block": lambda: _block("preact"),
    "projection block": lambda: _block("preact", stride=2, planes=32),
    "post-activation block": lambda: _block("postact"),
}


def _summary(launch):
    def arg(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0)
        return a
    return launch.grid, launch.function, tuple(arg(a) for a in launch.args)


def _step(m, inputs, mode):
    m.train(mode == "training")
    out = m(*inputs)
    out.backward(torch.ones_like(out))


def _launches(drv, make, mode, direct):
    _launch.enabled = direct
    m, inputs = make()
    _step(m, inputs, mode)  # finds (or compiles) every kernel: the next step's launches are all direct ones
    m, inputs = make()
    drv.record, before = [], _launch.launches
    _step(m, inputs, mode)
    record, drv.record = drv.record, None
    return [_summary(r) for r in record], _launch.launches - before


def _kinds_check():
    """A kernel whose runtime int and float parameters get other Python types between calls (True == 1 == 1.0 as
    values; an int where a float was): Triton specializes each differently, so must the direct launch."""
    import triton
    import triton.language as tl

    @_launch.direct_launch
    @triton.jit
    def scaled(x_ptr, y_ptr, n, f, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs) * f + n, mask=offs < BLOCK)

    x, y = torch.randn(16), torch.empty(16)
    for n, f in [(1, 2.0), (True, 2.0), (1.0, 2.0), (16, 2.0), (16, 3), (1, 2.0), (True, 2.0), (16, 3), (16, 3.0)]:
        for _ in range(2):  # the second call of each is a direct launch where it can be
            scaled.run(x, y, n, f, 16, grid=(1,), warmup=False)
    print("ok: bool, int and float arguments of equal value each launch the kernel Triton picks for them")
    # The same through a plan's launch (_launch.bind), the scalars in its head, the constexpr in its tail: its own
    # signature, keyed apart from the kernel's
    bound = _launch.bind(scaled, (1,), (16,), {})
    for n, f in [(1, 2.0), (True, 2.0), (1.0, 2.0), (16, 2.0), (16, 3), (1, 2.0), (True, 2.0), (16, 3), (16, 3.0)]:
        for _ in range(2):
            before = _launch.launches
            bound(x, y, n, f)
        assert _launch.launches == before + 1 or type(n) is not int or type(f) is not float, (n, f)
    print("ok: the same arguments through a plan's launch: the kernel Triton picks, launched directly")


def main():
    with installed() as drv:
        _launch.verify = True
        _kinds_check()
        _launch.verify = True
        for name, make in SCENARIOS.items():
            for mode in ("training", "eval"):
                jit, jit_direct = _launches(drv, make, mode, False)
                direct, direct_hits = _launches(drv, make, mode, True)
                assert jit_direct == 0, f"{name}, {mode}: {jit_direct} direct launches with the direct launch off"
                assert direct_hits == len(direct) > 0, (name, mode, direct_hits, len(direct))
                assert len(jit) == len(direct), f"{name}, {mode}: {len(jit)} launches through Triton, {len(direct)} direct"
                for i, (a, b) in enumerate(zip(jit, direct)):
                    assert a == b, f"{name}, {mode}: launch {i} differs:\n{a}\n{b}"
                print(f"ok: {name}, {mode}: {len(direct)} launches, each as JITFunction.run launches it")

        # One module, its inputs' shape, dtype and layout changing between calls: every launch still the kernel
        # Triton picks (verify), the earlier signatures still found when they come back.
        _launch.enabled = True
        torch.manual_seed(0)
        bn, conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        m = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend="triton")
        calls = [(torch.float32, torch.contiguous_format, (2, 8, 6, 6)), (torch.float32, torch.channels_last, (2, 8, 6, 6)),
                 (torch.float32, torch.contiguous_format, (4, 8, 3, 7)), (torch.float64, torch.contiguous_format, (2, 8, 6, 6)),
                 (torch.float32, torch.contiguous_format, (2, 8, 6, 6))]
        for dtype, fmt, shape in calls * 2:
            m.to(dtype)
            x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
            r = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
            before = _launch.launches
            _step(m, (x, r), "training")
            assert _launch.launches >= before
        print("ok: one module across shapes, dtypes and layouts: every direct launch the kernel Triton picks")

        # Launch hooks (a profiler's) get what they get through JITFunction.run: the launch metadata, its name
        from triton import knobs

        seen = []

        def hook(metadata):
            seen.append(None if metadata is None else metadata.get()["name"])
        m, inputs = _layer(torch.float32, False)
        for chain in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
            _step(m, inputs, "training")
            if not hasattr(chain, "add"):  # a Triton whose hooks are plain attributes: nothing to chain
                continue
            chain.add(hook)
            try:
                _step(m, inputs, "training")
            finally:
                chain.remove(hook)
            assert len(seen) == 7 and all(isinstance(n, str) for n in seen), seen
            seen.clear()
        print("ok: launch enter and exit hooks see every direct launch's metadata")

        # Whoever replaces JITFunction.run (the launch counter) sees every launch: the direct launch stands aside.
        m, inputs = _layer(torch.float32, False)
        _step(m, inputs, "training")
        before = _launch.launches
        with count_device_ops() as ops:
            _step(m, inputs, "training")
        triton_ops = sum(v for k, v in ops.ops.items() if k.startswith("triton."))
        assert _launch.launches == before and triton_ops == 7, (ops.ops, _launch.launches - before)
        print("ok: a replaced JITFunction.run sees all 7 launches of a training step")


if __name__ == "__main__":
    main()
    sys.exit(0)
