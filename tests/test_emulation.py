"""The emulation layer under the CUDA backend's CPU runs (csrc/emu, fused_resnet/_emulated.py), checked on
its own: a mistake in an emulated primitive would hide the same mistake in a kernel. Each primitive is
compared with an independent answer (torch's conversions, a float64 matrix product, the failure the CUDA
programming guide defines), and a ThreadSanitizer build shows the kernels race-free -- and that it
would see a race, by dropping one barrier."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_resnet import _emulated

ROOT = Path(__file__).resolve().parents[1]

_ok, _why = _emulated.status()
pytestmark = pytest.mark.skipif(not _ok, reason=f"the emulated CUDA build is not available: {_why}")


@pytest.fixture(scope="module")
def emu():
    return _emulated.load()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_widening_matches_torch_on_every_bit_pattern(emu, dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    got = emu.emu_widen_16(bits, dtype == torch.bfloat16)
    want = bits.view(dtype).float()
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # -0.0 included


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_matches_torch(emu, dtype):
    """Round-to-nearest-even from float32 on random bit patterns (every exponent), on exact ties between
    neighbouring 16-bit values, and on the overflow / subnormal edges."""
    g = torch.Generator().manual_seed(11)
    rand_bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    values = [rand_bits.view(torch.float32)]
    grid = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
    grid = grid[grid.isfinite()].double().sort().values
    mids = ((grid[1:] + grid[:-1]) / 2).float()  # ties are exact in float32 for both formats
    values += [mids, torch.nextafter(mids, torch.full_like(mids, float("inf"))),
               torch.nextafter(mids, torch.full_like(mids, -float("inf")))]
    values.append(torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e30, -1e30, 5.96e-8, 2.98e-8, 2.99e-8,
                                1e-45, float("inf"), -float("inf"), float("nan")]))
    x = torch.cat(values).contiguous()
    got = emu.emu_round_to_16(x, dtype == torch.bfloat16).view(dtype)
    want = x.to(dtype)
    assert torch.equal(got.isnan(), want.isnan())
    keep = ~want.isnan()
    bad = (got.view(torch.int16) != want.view(torch.int16)) & keep
    assert not bad.any(), f"{int(bad.sum())} mismatches, first input {x[bad][:5].tolist()}"


@pytest.mark.parametrize("a_col", [False, True], ids=["A-row", "A-col"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wmma_tile_is_the_matrix_product(emu, dtype, a_col):
    g = torch.Generator().manual_seed(3)
    # small integers: every product and partial sum is exact, so the answer is exact whatever the order
    a = torch.randint(-8, 9, (16, 16), generator=g).float()
    b = torch.randint(-8, 9, (16, 16), generator=g).float()
    assert torch.equal(emu.emu_wmma_product(a, b, dtype == torch.bfloat16, a_col), 2 * a @ b)
    # random values: the operands rounded to dtype, the sums within float32 rounding of float64's
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    ar, br = a.to(dtype).double(), b.to(dtype).double()
    want = 2 * ar @ br
    got = emu.emu_wmma_product(a, b, dtype == torch.bfloat16, a_col).double()
    bound = 2 * (ar.abs() @ br.abs()) * 17 * 2.0**-24
    assert ((got - want).abs() <= bound).all()


def test_unwritten_shared_memory_reads_as_poison(emu):
    assert emu.emu_unwritten_shared(16).isnan().all()


def test_launch_limits_are_cuda_s(emu):
    assert emu.emu_launch_error(1024, 2) == 0
    assert emu.emu_launch_error(1025, 1) == 9  # cudaErrorInvalidConfiguration
    assert emu.emu_launch_error(128, 65536) == 9


def _python(code, env=None, timeout=900):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "FUSED_RESNET_CUDA_EMULATED": "1", **(env or {})})


def test_divergent_barrier_aborts_with_both_sites():
    out = _python("from fused_resnet import _emulated; _emulated.load().emu_divergent_barrier()")
    assert out.returncode != 0
    assert re.search(r"divergent __syncthreads in one block: .*checks\.cpp:\d+ and .*checks\.cpp:\d+", out.stderr)


# One layer's training step through every CUDA kernel (stats, forward with residual and output
# statistics, dgrad with the batch-statistics finish, split-K wgrad) and a pair's (raw dgrad, dgrad with an
# addend), both layouts, a half type and TF32.
_TSAN_CASES = """
import torch, fused_resnet
from fused_resnet.functional import bn_relu_conv2d_with_stats
torch.set_num_threads(1)
torch.backends.cudnn.allow_tf32 = True  # PyTorch's default: fp32 channels_last takes the TF32 mma kernels
# (8 -> 8 channels, channels_last, bf16 or fp32: the mma.sync forward, phase-split dgrad (stride 2 for
# the 1x1) and wgrad; 6 -> 7: the general kernels)
for fmt, dtype, c, k in ((torch.contiguous_format, torch.float32, 6, 7), (torch.channels_last, torch.bfloat16, 6, 7),
                         (torch.channels_last, torch.bfloat16, 8, 8), (torch.channels_last, torch.float32, 8, 8)):
    torch.manual_seed(0)
    x = torch.randn(2, c, 5, 5).to(dtype).to(memory_format=fmt).requires_grad_(True)
    w = torch.randn(k, c, 3, 3).to(dtype).to(memory_format=fmt).requires_grad_(True)
    r = torch.randn(2, k, 5, 5).to(dtype)
    y, mean, var = bn_relu_conv2d_with_stats(x, w, training=True, padding=1, residual=r, backend="cuda",
                                             out_stats=True)
    y.float().square().sum().backward()
    # a projection block's pair: 3x3 and 1x1 at stride 2 (the 1x1's raw dgrad, with tapless phases, then the
    # 3x3's dgrad adding it in place; split-K wgrads)
    w1 = torch.randn(k, c, 1, 1).to(dtype).to(memory_format=fmt).requires_grad_(True)
    y3, y1 = fused_resnet.bn_relu_conv2d_pair(x, w, w1, training=True, stride=2, padding=1, stride2=2, backend="cuda")
    (y3.float().sum() + y1.float().square().sum()).backward()
print("cases done")
"""


def _barrier_line(file, after):
    """Line of the first __syncthreads() following the line containing `after`."""
    lines = (ROOT / "csrc" / "kernels" / file).read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if after in l)
    return next(i + 1 for i in range(start + 1, len(lines)) if "__syncthreads();" in lines[i])


@pytest.fixture(scope="module")
def tsan_env():
    runtime = _emulated.tsan_runtime()
    if runtime is None:
        pytest.skip("the compiler has no ThreadSanitizer runtime (libtsan)")
    code = "from fused_resnet import _emulated; print(_emulated.build(tsan=True))"
    build = _python(code)
    if build.returncode != 0 and "static TLS block" in build.stderr:
        # The build finished; importing the instrumented module into a process not started with the
        # runtime can run out of static TLS (glibc; it depends on what the process loaded before). Import it
        # again with the runtime preloaded, as the runs below have it (the build is done: no compiler runs).
        build = _python(code, {"LD_PRELOAD": runtime})
    assert build.returncode == 0, build.stderr[-3000:]
    return {"LD_PRELOAD": runtime, "OMP_NUM_THREADS": "1",
            "TSAN_OPTIONS": "report_signal_unsafe=0 exitcode=66 halt_on_error=0"}


_RUN_TSAN = ("import fused_resnet._emulated as e; e.load.cache_clear(); m = e.load(tsan=True); "
             "e.load = lambda *a, **k: m\n" + _TSAN_CASES)


def test_thread_sanitizer_finds_no_race_in_the_kernels(tsan_env):
    out = _python(_RUN_TSAN, tsan_env)
    assert "WARNING: ThreadSanitizer" not in out.stderr, out.stderr[-4000:]
    assert out.returncode == 0 and "cases done" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("file,after", [("gemm_tile.cuh", "stash();"),
                                        ("mma_tile.cuh", "cp_async_wait<kMmaStages - 2>();")],
                         ids=["gemm_tile", "mma-ring"])
def test_thread_sanitizer_sees_a_dropped_barrier(tsan_env, file, after):
    """Proof that the check can fail: without the barrier between staging a slice into shared memory
    (stores; cp.async copies landing at the wait) and multiplying it, threads read what others are still
    writing."""
    line = _barrier_line(file, after)
    env = {**tsan_env, "FUSED_RESNET_EMU_DROP_BARRIER": f"{file}:{line}",
           "TSAN_OPTIONS": tsan_env["TSAN_OPTIONS"].replace("halt_on_error=0", "halt_on_error=1")}
    out = _python(_RUN_TSAN, env)  # stops at the first report
    assert "WARNING: ThreadSanitizer: data race" in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("via_ldmatrix", [False, True], ids=["fragment-table", "ldmatrix"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_sync_tile_is_the_matrix_product(emu, dtype, via_ldmatrix):
    """mma.sync m16n8k16 fed two ways: fragments picked from the PTX ISA's table by each lane, and the way
    the kernels load them (ldmatrix.x4 of row-major A, ldmatrix.x2.trans of row-major B). A layout slip
    in the twin of either primitive gives a wrong product."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-8, 9, (16, 16), generator=g).float()
    b = torch.randint(-8, 9, (16, 8), generator=g).float()
    assert torch.equal(emu.emu_mma_product(a, b, dtype == torch.bfloat16, via_ldmatrix), a @ b)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g)
    ar, br = a.to(dtype).double(), b.to(dtype).double()
    got = emu.emu_mma_product(a, b, dtype == torch.bfloat16, via_ldmatrix).double()
    assert ((got - ar @ br).abs() <= (ar.abs() @ br.abs()) * 17 * 2.0**-24).all()


def test_tf32_rounding(emu):
    """cvt.rna.tf32.f32 twin: the nearest 10-bit-mantissa value, ties away from zero, checked against the
    two TF32 neighbours of each input computed in float64; inf kept, NaN kept a NaN."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-40, 40, (100_000,), generator=g).float())
    lo_bits = x.view(torch.int32) & ~0x1FFF  # toward zero: the low 13 mantissa bits cleared
    ties = (lo_bits | 0x1000).view(torch.float32)  # exactly halfway between two TF32 neighbours
    x = torch.cat([x, ties, torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -3.4e38])])
    got = emu.emu_round_tf32(x).double()
    down = (x.view(torch.int32) & ~0x1FFF).view(torch.float32).double()
    ulp = torch.exp2(torch.floor(torch.log2(down.abs().clamp_min(2.0 ** -126))) - 10)
    up = down + torch.sign(x.double()) * ulp  # the neighbour away from zero
    xd = x.double()
    want = torch.where((xd - down).abs() < (up - xd).abs(), down, up)  # ties go to `up`: away from zero
    want = torch.where(torch.isinf(xd), xd, want)
    finite_want = want.abs() < 2.0 ** 128
    assert torch.equal(got[finite_want], want[finite_want])
    assert torch.isinf(got[~finite_want]).all()  # rounding up past the largest finite value gives inf
    assert emu.emu_round_tf32(torch.tensor([float("nan")])).isnan().all()


@pytest.mark.parametrize("via_ldmatrix", [False, True], ids=["ptx-table", "ldmatrix"])
def test_mma_tf32_tile_is_the_matrix_product(emu, via_ldmatrix):
    """mma.sync m16n8k8 TF32 from cvt.rna.tf32 operands, A fed from the PTX table or through ldmatrix.x4
    (a 32-bit element as two b16 columns): small integers exactly, random values against float64 products
    of the TF32-rounded operands."""
    g = torch.Generator().manual_seed(6)
    a = torch.randint(-8, 9, (16, 8), generator=g).float()
    b = torch.randint(-8, 9, (8, 8), generator=g).float()
    assert torch.equal(emu.emu_mma_tf32_product(a, b, via_ldmatrix), a @ b)
    a, b = torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g)
    ar, br = emu.emu_round_tf32(a).double(), emu.emu_round_tf32(b).double()
    got = emu.emu_mma_tf32_product(a, b, via_ldmatrix).double()
    assert ((got - ar @ br).abs() <= (ar.abs() @ br.abs()) * 9 * 2.0**-24).all()
    assert not torch.equal(ar, a.double())  # the rounding happened


def test_cp_async_lands_only_at_the_wait(emu):
    """Before cp.async.wait_group a thread reads what was there (the poison); after the wait and a
    barrier every thread sees the copies, and a predicated-off copy is 16 zero bytes."""
    src = torch.randn(16)
    before, after = emu.emu_cp_async_stages(src)
    assert before.isnan().all()
    assert torch.equal(after[:12], src[:12]) and torch.equal(after[12:], torch.zeros(4))
