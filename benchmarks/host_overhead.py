"""Host time per layer (forward + backward) with the device work taken away, fused vs eager.

Not a timed test: a measurement for benchmarks/NOTES.md. On the CPU, at a shape so small (1x8x4x4)
that eager's CPU kernels cost next to nothing, so what is timed is dispatch, autograd and Python.
The fused layer's Triton launches are stubbed out (the launchers' own Python -- config lookup,
allocation, grid -- still runs; Triton's per-launch argument handling, ~10-20 us on a GPU, does not).

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py [--reps 300]
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import fused_resnet  # noqa: E402


def _median_us(step, reps):
    for _ in range(20):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for training in (True, False):
        bn, conv = nn.BatchNorm2d(8).train(training), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        x = torch.randn(1, 8, 4, 4, requires_grad=True)
        r = torch.randn(1, 8, 4, 4)
        g = torch.randn(1, 8, 4, 4)

        def eager():
            (conv(torch.relu(bn(x))) + r).backward(g)

        layer = fused_resnet.FusedBNReLUConv2d.from_modules(bn, conv, backend="triton")

        def fused():
            layer(x, r).backward(g)

        e = _median_us(eager, args.reps)
        run = interpreter.InterpretedFunction.run
        interpreter.InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None
        try:
            f = _median_us(fused, args.reps)
        finally:
            interpreter.InterpretedFunction.run = run
        rows.append(("training" if training else "eval", e, f))
    print(f"torch {torch.__version__}, 1 thread, median of {args.reps} forward+backward steps, 1x8x4x4, 3x3, residual")
    print("mode      eager us  fused us (launches stubbed)  ratio")
    for mode, e, f in rows:
        print(f"{mode:8}  {e:8.0f}  {f:8.0f}                     {f / e:5.2f}")


if __name__ == "__main__":
    main()
