"""Timing and peak memory: warm-up, then the median (and 20th/80th percentiles) of many timed calls,
each on the next of several input sets so caches do not flatter. CUDA events on a GPU, perf_counter
on the CPU."""
from __future__ import annotations

import statistics
import time

import torch


def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(fn, n_inputs: int, device: torch.device, warmup: int = 5, reps: int = 30):
    """fn(i) runs one step on input set i % n_inputs. Returns median/p20/p80 milliseconds."""
    for i in range(warmup):
        fn(i % n_inputs)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(i % n_inputs)
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i % n_inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2),
            "p80_ms": _quantile(times, 0.8)}


def graphed(fn, n_inputs: int, device: torch.device, warmup: int = 3):
    """fn captured in one CUDA graph per input set (warmed up on a side stream first, as capture
    requires); returns replay(i), which re-runs input set i's graph: the same device work with no
    host dispatch and no launch overhead. Raises on anything that cannot be captured (a host sync)."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(warmup):
            fn(i % n_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graphs, pool = [], None
    for i in range(n_inputs):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn(i)
        pool = g.pool()
        graphs.append(g)
    torch.cuda.synchronize(device)
    return lambda i: graphs[i].replay()


def peak_memory_mb(fn, device: torch.device):
    """Peak bytes allocated (MiB) during one step, everything resident included (model, inputs,
    saved activations, gradients); None off the GPU, where PyTorch does not track it."""
    if device.type != "cuda":
        return None
    fn(0)  # lazily created state (optimizer-free grads, compile caches) is not counted as a peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20
