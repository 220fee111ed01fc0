"""Host time per step with the device work taken away: fused vs eager, layer and blocks, eval and training.

Not a timed test (pytest does not collect it): a measurement for benchmarks/NOTES.md. On the CPU, at shapes
so small (batch 1, 4x4 pixels) that eager's CPU kernels cost next to nothing, so what is timed is dispatch,
autograd and Python. The fused modules' Triton launches are stubbed out: the launchers' own Python (config
lookup, allocation, grid) still runs; Triton's per-launch argument handling, ~10-20 us a launch on a GPU, does
not (on this machine Triton runs in its interpreter, whose `run` is what the stub replaces). The CUDA backend is
not measured (its launches are pybind calls into the extension, which would have to be stubbed one by one).

Eager and fused steps alternate, one of each per repetition, so that both see the same machine state; the
ratio is the fused median over the eager median, within this one run.

Modes: "training" (train(), forward + backward), "eval" (eval(), forward + backward: the case of the first
measurement, issue 13), "inference" (eval() under torch.no_grad(), forward only).

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py [--reps 300] [--cases layer,block,proj] [--modes ...] [--split]
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
# The fused_resnet of this checkout, not whichever one is installed (an editable install points elsewhere).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet.nn import PreActBlock  # noqa: E402

MODES = ("training", "eval", "inference")
CASES = {
    # name: what _build makes of it
    "layer": "FusedBNReLUConv2d 8->8 3x3 + residual, 1x8x4x4",
    "block": "PreActBlock(16, 16), identity shortcut, 1x16x4x4",
    "proj": "PreActBlock(16, 32, stride 2), projection shortcut, 1x16x4x4",
}


def _build(case):
    torch.manual_seed(0)
    if case == "layer":
        bn, conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        fused = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend="triton")

        class Eager(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn, self.conv = bn, conv

            def forward(self, x, r):
                return self.conv(torch.relu(self.bn(x))) + r

        return Eager(), fused, (1, 8, 4, 4), (1, 8, 4, 4)
    planes, stride = (16, 1) if case == "block" else (32, 2)
    eager = PreActBlock(16, planes, stride, fused=False)
    fused = PreActBlock(16, planes, stride, backend="triton", fused=True)
    fused.load_state_dict(eager.state_dict())
    return eager, fused, (1, 16, 4, 4), None


class memoized_launchers:
    """Within (with --split): the k-th call of each Triton launcher that fused_resnet.triton exports returns
    what the k-th call of the first step returned, without running its Python again (a step makes the same
    calls every time): what is left is the glue (module, functional, op layer) and autograd. The results are
    reused as they are (their values do not matter here, their shapes do); fused minus this is the
    launchers' share."""

    def __init__(self):
        import fused_resnet.triton as kb

        self.kb, self.memo, self.calls = kb, {}, {}
        self.orig = {n: getattr(kb, n) for n in kb.__all__}
        self.fast = {n: self._memoized(n, f) for n, f in self.orig.items()}

    def _memoized(self, name, f):
        memo, calls = self.memo, self.calls

        def launcher(*args, **kw):
            k = calls[name] = calls.get(name, -1) + 1
            key = (name, k)
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = f(*args, **kw)
            return hit
        return launcher

    def __enter__(self):
        self.calls.clear()
        for n, f in self.fast.items():
            setattr(self.kb, n, f)
        return self

    def __exit__(self, *exc):
        for n, f in self.orig.items():
            setattr(self.kb, n, f)


def _step(module, mode, x, r, g):
    args = (x,) if r is None else (x, r)
    if mode == "inference":
        def step():
            with torch.no_grad():
                module(*args)
    else:
        def step():
            module(*args).backward(g)
    return step


def _memoizing(step, memo):
    def run():
        with memo:
            step()
    return run


def measure(case, mode, reps, warmup=20, split=False):
    eager, fused, xs, rs = _build(case)
    for m in (eager, fused):
        m.train(mode == "training")
    x = torch.randn(xs, requires_grad=mode != "inference")
    r = torch.randn(rs) if rs is not None else None
    with torch.no_grad():
        g = torch.randn_like(eager(x, r) if r is not None else eager(x))
    steps = (_step(eager, mode, x, r, g), _step(fused, mode, x, r, g))
    if split:
        steps += (_memoizing(steps[1], memoized_launchers()),)
    for _ in range(warmup):
        for s in steps:
            s()
    times = tuple([] for _ in steps)
    clock = time.perf_counter
    for _ in range(reps):
        for s, t in zip(steps, times):
            t0 = clock()
            s()
            t.append(clock() - t0)
    return tuple(1e6 * statistics.median(t) for t in times)


class stubbed_triton_launches:
    """Within: every Triton launch (the interpreter's run) returns at once; the launchers' Python still runs."""

    def __enter__(self):
        self._run = interpreter.InterpretedFunction.run
        interpreter.InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None
        return self

    def __exit__(self, *exc):
        interpreter.InterpretedFunction.run = self._run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--split", action="store_true",
                   help="also time the fused step with the Triton launchers' Python memoized away (glue + autograd)")
    args = p.parse_args()
    cases, modes = args.cases.split(","), args.modes.split(",")
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    torch.set_num_threads(1)
    rows = []
    with stubbed_triton_launches():
        for case in cases:
            for mode in modes:
                rows.append((case, mode, *measure(case, mode, args.reps, split=args.split)))
    print(f"torch {torch.__version__}, 1 thread, median of {args.reps} steps each, eager and fused alternating; "
          "fused = backend 'triton' with its launches stubbed")
    print(f"fused_resnet from {os.path.dirname(fused_resnet.__file__)}")
    for c in cases:
        print(f"  {c}: {CASES[c]}")
    if args.split:
        print("| case | mode | eager us | fused us | fused / eager | fused, launchers memoized us | that / eager |")
        print("|---|---|---|---|---|---|---|")
        for case, mode, e, f, m in rows:
            print(f"| {case} | {mode} | {e:.0f} | {f:.0f} | {f / e:.2f}x | {m:.0f} | {m / e:.2f}x |")
        return
    print("| case | mode | eager us | fused us | fused / eager |")
    print("|---|---|---|---|---|")
    for case, mode, e, f in rows:
        print(f"| {case} | {mode} | {e:.0f} | {f:.0f} | {f / e:.2f}x |")


if __name__ == "__main__":
    main()
