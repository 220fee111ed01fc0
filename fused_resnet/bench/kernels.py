"""Static kernel report: every Triton launch a training step makes, compiled for a GPU that is not here.

For each benchmark layer case the real launchers (fused_resnet.triton) run on meta tensors; each
launch (`kernel.run(..., grid=, warmup=False)`, which `kernel[grid](...)` calls too) is turned into a
compile-only warm-up for the chosen target (sm_90 / sm_80) through a stand-in driver, so the grid, config
and specialization are exactly what a GPU run would use. The cubin is then read with the cuobjdump that
ships in Triton's wheel (registers, stack = spills, shared memory) and the PTX says which MMA instruction
the conv kernels use (wgmma on sm_90, mma.sync on sm_80). Bytes and FLOPs per launch are the floor: every
tensor the kernel touches read or written once.

Must run in a process where triton was imported with TRITON_INTERPRET unset (the interpreter replaces
the kernels at import); `fused-resnet kernels` and the test run it in a subprocess with it unset.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

from .cases import CIFAR_LAYERS, R50_LAYERS, Case
from .nolaunch_driver import ASSUMED_SMS, NoLaunchDriver

# H100 figures measured on the GPU machines (shared/ENVIRONMENT.md): device copy bandwidth and dense
# bf16 matmul rate. The prediction assumes a fused kernel reaches 70% of the first and, for the
# conv kernels, 50% of the second (Triton implicit GEMM with a register-operand prologue; cuDNN's
# own kernels reach more), plus 3 us of launch and tail per kernel. A guess to be checked by the GPU
# pass, not a measurement.
H100_COPY_BYTES_PER_S = 3.0e12
H100_BF16_FLOP_PER_S = 800e12
PREDICT_BW_FRACTION, PREDICT_MMA_FRACTION, PREDICT_LAUNCH_US = 0.7, 0.5, 3.0


def floor_us(bytes_: int, flops: int) -> float:
    return 1e6 * max(bytes_ / H100_COPY_BYTES_PER_S, flops / H100_BF16_FLOP_PER_S)


def predicted_us(bytes_: int, flops: int) -> float:
    return PREDICT_LAUNCH_US + 1e6 * max(bytes_ / (PREDICT_BW_FRACTION * H100_COPY_BYTES_PER_S),
                                         flops / (PREDICT_MMA_FRACTION * H100_BF16_FLOP_PER_S))


@dataclass
class Launch:
    case: str
    dtype: str
    layout: str
    arch: int
    phase: str  # "forward" | "backward"
    kernel: str
    grid: tuple
    config: str
    num_warps: int
    num_stages: int
    registers: int
    stack: int  # bytes per thread; > 0 means spills
    shared: int  # bytes per CTA (static + dynamic)
    mma: str  # "wgmma" | "mma.sync" | "fma" | "none"
    bytes: int
    flops: int


class _CompileOnlyDriver(NoLaunchDriver):
    """The no-launch driver as the report uses it: it only compiles (warm-ups), one "device" per target, meta
    tensors."""

    def __init__(self, arch: int):
        super().__init__(arch)
        self.arch = arch

    def get_current_device(self):
        return self.arch  # the JIT caches compiled kernels per device: one "device" per target

    def get_active_torch_device(self):
        return torch.device("meta")


@contextlib.contextmanager
def capture(arch: int, sink: list):
    """Within: Triton launches compile for sm_<arch> and append (name, grid, compiled kernel) to sink."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the kernel report compiles real kernels: run it with TRITON_INTERPRET unset")
    original = JITFunction.run  # the launchers call kernel.run(..., grid=, warmup=False), as kernel[grid](...) does

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        # the launchers pass constexprs by position (triton/_common.launch_args): named here for the config column
        named = {self.arg_names[i]: args[i] for i in self.constexprs if i < len(args)}
        sink.append((self.fn.__name__, tuple(grid), kernel, args, {**named, **kwargs}))
        return kernel

    from ..triton import _common, _launch  # noqa: F401  (_launch keeps Triton's own JITFunction.run: imported first)

    _common.ASSUMED_GPU = (arch, ASSUMED_SMS[arch])
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original
        driver._active = None  # no GPU driver to fall back to here; the next use re-detects
        _common.ASSUMED_GPU = None
        del triton


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_RES = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """{function: (registers, stack, static shared)} from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return {m.group(1): tuple(int(m.group(i)) for i in (2, 3, 4)) for m in _RES.finditer(out)}


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    if re.search(r"\bfma\.rn\.f(32|64)", ptx) and "dot" in ptx:
        return "fma"
    return "none"


def _tensors(args):
    seen, out = set(), []
    for a in args:
        if isinstance(a, torch.Tensor) and id(a) not in seen and a.numel() > 1:
            seen.add(id(a))
            out.append(a)
    return out


def _floor_bytes(args) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(args))


def _in_place_bytes(name, args) -> int:
    """The write of an output passed as one of its own inputs, which _tensors counts once (as a stand-in): the
    one-consumer backward finishes dx over ga*m in place (gm is argument 0, dx argument 2)."""
    if name == "_bn_backward_finish_kernel" and args[0] is args[2]:
        return args[0].numel() * args[0].element_size()
    return 0


def case_tensors(case: Case, dtype: torch.dtype, channels_last: bool):
    """Meta tensors for one layer case, in the layout given."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(case.n, case.c, case.h, case.h, **meta).contiguous(memory_format=fmt)
    w = torch.empty(case.k, case.c, case.kernel, case.kernel, **meta).contiguous(memory_format=fmt)
    oh = case.out_h
    res = torch.empty(case.n, case.k, oh, oh, **meta).contiguous(memory_format=fmt) if case.residual else None
    gy = torch.empty(case.n, case.k, oh, oh, **meta).contiguous(memory_format=fmt)
    return x, w, res, gy


def conv_flops(case: Case) -> int:
    return 2 * case.n * case.out_h ** 2 * case.k * case.c * case.kernel ** 2


def record_case(case: Case, dtype: torch.dtype, channels_last: bool, arch: int) -> list:
    """Compile every launch of one training step (forward + backward) of a layer case."""
    from .. import _ops
    from .. import triton as kb

    x, w, res, gy = case_tensors(case, dtype, channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c = case.c
    gamma = torch.empty(c, device="meta", dtype=torch.float32)
    beta = torch.empty_like(gamma)
    geo = dict(stride=[case.stride] * 2, padding=[case.padding] * 2, dilation=[1, 1])
    rows = []
    for phase in ("forward", "backward"):
        sink = []
        with capture(arch, sink):
            if phase == "forward":  # as functional._with_finalize_kernel runs it
                rm, rv = torch.empty_like(gamma), torch.empty_like(gamma)
                counter = torch.empty((), device="meta", dtype=torch.long)  # num_batches_tracked, counted here
                fin = kb.bn_finalize(c, acc, partials=kb.stats_partials(x), x=x, gamma=gamma, beta=beta,
                                     running_mean=rm, running_var=rv, momentum=0.1,
                                     count=case.n * case.h * case.h, num_batches_tracked=counter)
                _ops._kernel_forward(kb, x, w, None, gamma, beta, fin[0], fin[2], res, geo["stride"],
                                     geo["padding"], geo["dilation"], [case.out_h] * 2, False, fin[3:5])
            else:
                mean = torch.empty(c, device="meta", dtype=acc)
                invstd = torch.empty_like(mean)
                scale, shift = _ops._bn_prologue(mean, invstd, gamma, beta)
                kb.conv_backward(gy, x, w, mean, scale, shift, invstd, gamma, True, [True, True, True, True],
                                 geo["stride"], geo["padding"], geo["dilation"])
        for name, grid, kernel, args, kwargs in sink:
            regs, stack, shared = resource_usage(kernel.asm["cubin"]).get(kernel.name, (0, 0, 0))
            cfg = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k == "SPLIT"}
            is_conv = name.startswith("_conv")
            rows.append(Launch(
                case=case.name, dtype=str(dtype).replace("torch.", ""), layout="nhwc" if channels_last else "nchw",
                arch=arch, phase=phase, kernel=name.lstrip("_").replace("_kernel", ""), grid=grid,
                config=" ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in cfg.items()),
                num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                registers=regs, stack=stack, shared=max(shared, kernel.metadata.shared),
                mma=mma_kind(kernel.asm["ptx"]) if is_conv else "none",
                bytes=_floor_bytes(a for a in args if not (name == "_bn_finalize_kernel" and
                                                          isinstance(a, torch.Tensor) and a.dim() == 4))
                + _in_place_bytes(name, args),
                flops=conv_flops(case) if is_conv else 0))
    return rows


def report(cases, dtypes, layouts, archs, progress=None) -> list:
    rows = []
    jobs = [(c, d, l, a) for a in archs for d in dtypes for l in layouts for c in cases]
    for case, dtype, layout, arch in (progress(jobs) if progress else jobs):
        rows += record_case(case, dtype, layout == "nhwc", arch)
    return rows


def spills(rows, dtypes=("bfloat16", "float16")) -> list:
    return [r for r in rows if r.stack > 0 and r.dtype in dtypes]


def table(rows) -> str:
    from .._table import format_table

    headers = ["case", "dtype", "layout", "sm", "phase", "kernel", "grid", "config", "warps", "stages",
               "regs", "stack", "smem KiB", "mma", "MB", "GFLOP"]
    body = [[r.case, r.dtype, r.layout, r.arch, r.phase, r.kernel, "x".join(map(str, r.grid)), r.config,
             r.num_warps, r.num_stages, r.registers, r.stack, f"{r.shared / 1024:.0f}", r.mma,
             f"{r.bytes / 1e6:.1f}", f"{r.flops / 1e9:.1f}"] for r in rows]
    return format_table(body, headers)


def predictions_markdown(rows) -> str:
    """Per layer case and kernel (sm_90, bf16/fp16): the H100 floor and predicted time, as a Markdown table."""
    lines = ["| case | layout | kernel | MB | GFLOP | regs | floor us | predicted us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.arch != 90 or r.dtype not in ("bfloat16", "float16"):
            continue
        lines.append(f"| {r.case} | {r.layout} | {r.kernel} | {r.bytes / 1e6:.1f} | {r.flops / 1e9:.1f} | "
                     f"{r.registers} | {floor_us(r.bytes, r.flops):.0f} | {predicted_us(r.bytes, r.flops):.0f} |")
    return "\n".join(lines)


def to_json(rows, path):
    import triton

    with open(path, "w") as f:
        json.dump({"triton": triton.__version__, "torch": torch.__version__,
                   "launches": [asdict(r) for r in rows]}, f, indent=1)


ALL_CASES = CIFAR_LAYERS + R50_LAYERS


def _cases(p, args):
    if not args.cases:
        return ALL_CASES
    names = args.cases.split(",")
    unknown = sorted(set(names) - {c.name for c in ALL_CASES})
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in ALL_CASES)}")
    return [c for c in ALL_CASES if c.name in names]


def _tune(p, args) -> int:
    if not torch.cuda.is_available():
        p.error("--tune times kernels on a GPU; none is visible here (the static report runs without --tune)")
    from tqdm import tqdm

    from ..triton import configs
    from ..triton._common import arch_of
    from .tune import sweep

    cases = _cases(p, args)
    dtype = getattr(torch, args.dtypes.split(",")[0])
    nhwc = args.layouts.split(",")[0] == "nhwc"
    print(f"Tuning {len(cases)} cases x 3 conv kernels on {torch.cuda.get_device_name()} ({dtype}, "
          f"{'nhwc' if nhwc else 'nchw'}): a few seconds per config", flush=True)
    winners, log = sweep(cases, dtype, nhwc, progress=lambda jobs: tqdm(jobs, desc="tuning", mininterval=5),
                         time_budget=args.time_budget)
    arch = arch_of(torch.device("cuda"))
    configs.write(arch, winners, args.table or configs.TABLE)
    for key, entry in sorted(winners.items()):
        print(f"  {key}: {entry['heuristic_us']:.1f} us -> {entry['us']:.1f} us "
              f"({', '.join(f'{k}={entry[k]}' for k in configs.KEYS)})")
    print(f"{len(winners)} shapes improved by more than 3%; {len(log)} trials; table: {args.table or configs.TABLE}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"winners": winners, "trials": [[str(v) for v in t] for t in log]}, f, indent=1)
    return 0


def main(argv=None) -> int:
    from .._cli import ArgumentParser

    p = ArgumentParser(
        prog="fused-resnet kernels",
        description="Compile every Triton launch of a training step at the benchmark layer shapes for a GPU "
                    "target (no GPU needed) and report registers, spills, shared memory, MMA kind, bytes, FLOPs.")
    p.add_argument("--arch", default="90", help="comma list of targets: 90 (H100), 80 (A100) (default 90)")
    p.add_argument("--dtypes", default="bfloat16,float16", help="comma list (default bfloat16,float16)")
    p.add_argument("--layouts", default="nhwc,nchw", help="comma list of nhwc, nchw (default both)")
    p.add_argument("--cases", help="comma list of case names (default: every layer case)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on any spill in a bf16/fp16 launch, or a conv kernel without tensor-core MMA")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--markdown", help="write the H100 floor/predicted time per case and kernel here (sm_90 rows)")
    p.add_argument("--tune", action="store_true",
                   help="on a GPU: time the conv kernels' spill-free configs at the cases' shapes (first dtype and "
                        "layout given) and write the winners into the tuned-config table the launchers read")
    p.add_argument("--table", help="with --tune: the table to update (default: the installed package's configs.json)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="with --tune: start no new case/kernel after this long")
    args = p.parse_args(argv)
    if args.tune:
        return _tune(p, args)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (the report compiles for real)
    cases = _cases(p, args)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    archs = [int(a) for a in args.arch.split(",")]
    from tqdm import tqdm

    print(f"Compiling {len(cases) * len(dtypes) * len(archs) * len(args.layouts.split(','))} training steps "
          f"(a second or two each on 2 CPU cores; kernels shared between cases compile once)", flush=True)
    rows = report(cases, dtypes, args.layouts.split(","), archs,
                  progress=lambda jobs: tqdm(jobs, desc="compiling", mininterval=5))
    if not args.quiet:
        print(table(rows))
    if args.json:
        to_json(rows, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(predictions_markdown(rows) + "\n")
    bad = spills(rows)
    want = {90: "wgmma", 80: "mma.sync"}
    weak = [r for r in rows if r.kernel.startswith("conv") and r.dtype in ("bfloat16", "float16")
            and want.get(r.arch) and r.mma != want[r.arch]]
    print(f"{len(rows)} launches; bf16/fp16 launches with spills: {len(bad)}; "
          f"conv launches without the expected tensor-core MMA: {len(weak)}; max registers "
          f"{max(r.registers for r in rows)}")
    for r in bad + weak:
        print(f"  {r.case} {r.dtype} {r.layout} sm_{r.arch} {r.kernel}: regs {r.registers}, stack {r.stack}, mma {r.mma}")
    return 1 if args.check and (bad or weak) else 0
