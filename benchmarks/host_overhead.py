"""Host time per step with the device work taken away: fused vs eager, layer, blocks and a network, eval and training.

Not a timed test (pytest does not collect it): a measurement for benchmarks/NOTES.md. On the CPU, at shapes
so small (batch 1, 4x4 pixels) that eager's CPU kernels cost next to nothing, so what is timed is dispatch,
autograd and Python. Two ways to take the fused modules' Triton launches away:
- default: Triton interpreted (TRITON_INTERPRET=1), the interpreter's `run` stubbed out. The launchers' own
  Python (launch plan, allocation) runs; Triton's per-launch handling on a GPU does not.
- --jit: Triton compiled, as on a GPU: kernels compile for sm_90 (the wheel's ptxas) through a driver that
  launches nothing (fused_resnet/bench/nolaunch_driver.py), so JITFunction.run (binding, specialization, cache
  lookup) and the direct launch (fused_resnet/triton/_launch.py) run as on a GPU, up to the launch itself.
  Backend "triton-jit" is the Triton backend with the direct launch off (every launch through JITFunction.run).
`--backends triton,cuda` times the CUDA backend too, through its emulated CPU build (FUSED_RESNET_CUDA_EMULATED,
built on first use): its launchers' Python, the binding's checks and the params structs all run, and the emulated
runtime returns from each launch once its configuration is checked (emu_skip_launches), where a GPU's
cudaLaunchKernel would queue it (a few us, which eager's kernels pay too, and Triton's launcher too).

--device cuda (the GPU pass): the same steps on the GPU with every launch real, eager against each fused
backend; a step's host time is the time to issue it (the stream is synchronized after each step, outside the
timed region, so no launch waits for a full queue).

Eager and fused steps alternate so that both see the same machine state; the ratio is the fused median over the
eager median, within this one run. --burst N runs N steps of a variant in a row (each timed) before the next
variant's: with N = 1 every step follows another variant's, whose code and objects have pushed its own out of the
CPU's caches; in a network the same layer code runs again for the next layer, so N = 10 is closer to what a
model's step pays (the "net" case measures a whole network directly).

Modes: "training" (train(), forward + backward), "eval" (eval(), forward + backward: the case of the first
measurement, issue 13), "inference" (eval() under torch.no_grad(), forward only).

    python benchmarks/host_overhead.py [--reps 300] [--burst 10] [--cases layer,block,proj] [--modes ...] [--split] [--backends triton,cuda]
    python benchmarks/host_overhead.py --jit [--backends triton,triton-jit,cuda]
    python benchmarks/host_overhead.py --device cuda [--backends triton,cuda] [--json PATH]
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

_ON_GPU = "--device=cuda" in sys.argv or any(a == "--device" and b == "cuda" for a, b in zip(sys.argv, sys.argv[1:]))
_JIT = "--jit" in sys.argv
if not _ON_GPU:  # the CPU measurement: launches stubbed
    if _JIT:  # compiled kernels: Triton decides at their definition (our import) whether to interpret them
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FUSED_RESNET_CUDA_EMULATED", "1")  # backend "cuda" through its emulated build
# The fused_resnet of this checkout, not whichever one is installed (an editable install points elsewhere).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet.nn import PreActBlock  # noqa: E402
from fused_resnet.nn_postact import PostActBlock  # noqa: E402

MODES = ("training", "eval", "inference")
CASES = {
    # name: what _build makes of it
    "layer": "FusedBNReLUConv2d 8->8 3x3 + residual, 1x8x4x4",
    "block": "PreActBlock(16, 16), identity shortcut, 1x16x4x4",
    "proj": "PreActBlock(16, 32, stride 2), projection shortcut, 1x16x4x4",
    "postact": "PostActBlock(16, 16) (torchvision's BasicBlock), identity shortcut, 1x16x4x4",
    "net": "preact_resnet20 (9 PreActBlocks, stem, head), 1x3x8x8",
}


def _build(case, backend="triton"):
    backend = "triton" if backend == "triton-jit" else backend
    torch.manual_seed(0)
    if case == "layer":
        bn, conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        fused = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend=backend)

        class Eager(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn, self.conv = bn, conv

            def forward(self, x, r):
                return self.conv(torch.relu(self.bn(x))) + r

        return Eager(), fused, (1, 8, 4, 4), (1, 8, 4, 4)
    if case == "net":
        eager = fused_resnet.models.preact_resnet20(fused=False)
        fused = fused_resnet.models.preact_resnet20(fused=True, backend=backend)
        fused.load_state_dict(eager.state_dict())
        return eager, fused, (1, 3, 8, 8), None
    planes, stride = (32, 2) if case == "proj" else (16, 1)
    block = PostActBlock if case == "postact" else PreActBlock
    eager = block(16, planes, stride, fused=False)
    fused = block(16, planes, stride, backend=backend, fused=True)
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
            if key not in memo:  # (a launcher that returns None is memoized too)
                memo[key] = f(*args, **kw)
            return memo[key]
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


def _without_direct_launch(step):
    """step with every Triton launch through JITFunction.run (backend "triton-jit")."""
    from fused_resnet.triton import _launch

    def run():
        _launch.enabled = False
        try:
            step()
        finally:
            _launch.enabled = True
    return run


def _memoizing(step, memo):
    def run():
        with memo:
            step()
    return run


def measure(case, mode, reps, warmup=20, split=False, backends=("triton",), device="cpu", burst=1):
    """Median host microseconds per step: eager, then each fused backend (then, with split, triton with its
    launchers memoized), all alternating within each repetition; each runs `burst` steps in a row there, each
    timed on its own."""
    built = [_build(case, b) for b in backends]
    eager, _, xs, rs = built[0]
    fused = [f for _, f, _, _ in built]
    for m in (eager, *fused):
        m.to(device).train(mode == "training")
    x = torch.randn(xs, device=device, requires_grad=mode != "inference")
    r = torch.randn(rs, device=device) if rs is not None else None
    with torch.no_grad():
        g = torch.randn_like(eager(x, r) if r is not None else eager(x))
    steps = tuple(_step(m, mode, x, r, g) for m in (eager, *fused))
    steps = (steps[0], *(_without_direct_launch(s) if b == "triton-jit" else s for b, s in zip(backends, steps[1:])))
    if split:
        steps += (_memoizing(steps[1], memoized_launchers()),)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for s in steps:
            s()
            sync()
    times = tuple([] for _ in steps)
    clock = time.perf_counter
    for _ in range(reps):
        for s, t in zip(steps, times):
            for _ in range(burst):
                t0 = clock()
                s()
                t.append(clock() - t0)
                sync()  # outside the timed region: the next step never waits for a full launch queue
    return tuple(1e6 * statistics.median(t) for t in times)


class stubbed_launches:
    """Within: every Triton launch returns at once (the interpreter's run stubbed; with jit, the no-launch driver's
    launcher), and so does every launch of the emulated CUDA build when `cuda` (it is loaded); the launchers' Python
    and the binding still run."""

    def __init__(self, cuda=False, jit=False):
        self.emulated, self.jit, self.driver = None, jit, None
        if cuda:
            from fused_resnet import _emulated

            self.emulated = _emulated.load()

    def __enter__(self):
        if self.jit:
            from fused_resnet.bench.nolaunch_driver import installed

            self.driver = installed()
            self.driver.__enter__()
        else:
            self._run = interpreter.InterpretedFunction.run
            interpreter.InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None
        if self.emulated is not None:
            self.emulated.emu_skip_launches(True)
        return self

    def __exit__(self, *exc):
        if self.jit:
            self.driver.__exit__(*exc)
        else:
            interpreter.InterpretedFunction.run = self._run
        if self.emulated is not None:
            self.emulated.emu_skip_launches(False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--split", action="store_true",
                   help="also time the fused step with the Triton launchers' Python memoized away (glue + autograd)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: Triton interpreted, launches stubbed; cuda: every launch real (the GPU pass)")
    p.add_argument("--backends", default="triton",
                   help="comma-separated fused backends (cuda on the CPU: its emulated build; triton-jit, with --jit "
                        "or --device cuda: Triton without the direct launch)")
    p.add_argument("--jit", action="store_true",
                   help="Triton compiled for sm_90, launches dropped by a no-launch driver, instead of interpreted")
    p.add_argument("--burst", type=int, default=1,
                   help="steps in a row of each variant per repetition, each timed (default 1: strict alternation)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    cases, modes, backends = args.cases.split(","), args.modes.split(","), args.backends.split(",")
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    for b in backends:
        if b not in ("triton", "cuda", "triton-jit") or b == "triton-jit" and not (args.jit or args.device == "cuda"):
            p.error(f"backend {b!r}: triton or cuda (or triton-jit, with --jit or --device cuda)")
    if args.split and (args.device != "cpu" or backends[0] != "triton" or args.jit):
        p.error("--split measures the interpreted Triton launchers: --device cpu, no --jit, triton first")
    if args.jit and args.device != "cpu":
        p.error("--jit is the CPU measurement of compiled Triton launches; --device cuda launches them for real")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible")
    torch.set_num_threads(1)
    import triton

    triton_how = ("Triton compiled for sm_90, JITFunction.run and the direct launch run, the launch dropped"
                  if args.jit else "Triton interpreted, its run stubbed")
    where = (f"CUDA ({torch.cuda.get_device_name()}), every launch real" if args.device == "cuda"
             else f"CPU, 1 thread, launches dropped ({triton_how}" + ("; CUDA emulated)" if "cuda" in backends else ")"))
    names = [*backends] + (["triton, launchers memoized"] if args.split else [])

    def write_json(rows):  # after every row: a run cut short (the GPU pass's deadline) keeps what it measured
        if args.json:
            doc = {"torch": torch.__version__, "triton": triton.__version__, "device": where, "reps": args.reps,
                   "burst": args.burst,
                   "rows": [{"case": c, "mode": m, "eager_us": e, **{f"{n}_us": f for n, f in zip(names, fs)}}
                            for c, m, e, *fs in rows]}
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)

    rows = []
    stub = stubbed_launches("cuda" in backends, args.jit) if args.device == "cpu" else contextlib.nullcontext()
    with stub:
        for case in cases:
            for mode in modes:
                rows.append((case, mode, *measure(case, mode, args.reps, split=args.split, backends=backends,
                                                  device=args.device, burst=args.burst)))
                write_json(rows)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {where}; median of {args.reps} x {args.burst} "
          f"steps each, eager and fused alternating every {args.burst} step(s)")
    print(f"fused_resnet from {os.path.dirname(fused_resnet.__file__)}")
    for c in cases:
        print(f"  {c}: {CASES[c]}")
    cols = [f"fused {b} us | {b} / eager" for b in backends]
    if args.split:
        cols.append("fused, launchers memoized us | that / eager")
    print("| case | mode | eager us | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|---|" * len(cols))
    for case, mode, e, *fs in rows:
        print(f"| {case} | {mode} | {e:.0f} | " + " | ".join(f"{f:.0f} | {f / e:.2f}x" for f in fs) + " |")

if __name__ == "__main__":
    main()
