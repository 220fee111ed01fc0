"""Tuning sweep of the Triton conv kernels' configs at the benchmark layer shapes (GPU pass, stage 4).

For each layer case and each conv kernel (fwd, dgrad, wgrad), every config of a small space is forced
on that kernel's launcher, compiled on this GPU, and dropped if it spills (the static report's rule);
the rest are timed (median of warmed-up runs, triton.testing.do_bench) against the heuristic's config.
A config that beats the heuristic by more than `min_gain` goes into fused_resnet/triton/configs.json
under this GPU's architecture, with both timings, for the launchers to read.
"""
from __future__ import annotations

import itertools

import torch

from .cases import Case

# Small on purpose: the GPU pass has minutes, and each config costs a compile (a second or two).
# Per kernel: tile shapes x (reduction slice, warps, stages) pairs that the static report found
# spill-free for bf16 channels_last at the benchmark shapes on sm_90.
_TILES = dict(BLOCK_M=[64, 128], BLOCK_N=[32, 64, 128])
_DEPTH = [dict(BLOCK_K=64, num_warps=8, num_stages=3), dict(BLOCK_K=32, num_warps=4, num_stages=4)]
SPACE = {k: dict(_TILES, depth=_DEPTH) for k in ("fwd", "dgrad", "wgrad")}


def candidates(kernel: str, gemm_n: int, gemm_m: int):
    """Configs of SPACE[kernel] that fit the GEMM (no tile wider than twice the dimension it covers)."""
    space = SPACE[kernel]
    names = list(space)
    for values in itertools.product(*space.values()):
        cfg = dict(GROUP_M=8)
        for name, value in zip(names, values):
            cfg.update(value if name == "depth" else {name: value})
        if cfg["BLOCK_N"] > max(16, 2 * gemm_n) or cfg["BLOCK_M"] > max(16, 2 * gemm_m):
            continue
        if cfg["BLOCK_M"] * cfg["BLOCK_N"] > 128 * 64 and cfg["num_warps"] < 8:
            continue  # 128x128 on 4 warps: 255 registers and 128-296 bytes of spills (static report)
        yield cfg


def _layer_call(case: Case, kernel: str, dtype, channels_last: bool, device):
    """A closure running one launcher of the case (with its tiny torch-side tails) on fresh random data."""
    from .. import _ops
    from .. import triton as kb
    from ..triton import dgrad, wgrad

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.n, case.c, case.h, case.h, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(case.k, case.c, case.kernel, case.kernel, device=device, generator=g) * 0.1).to(dtype)
    w = w.contiguous(memory_format=fmt)
    oh = case.out_h
    gy = torch.randn(case.n, case.k, oh, oh, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)
    res = torch.randn_like(gy) if case.residual else None
    mean, var = kb.channel_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = torch.rand(case.c, device=device, generator=g) + 0.5
    beta = torch.randn(case.c, device=device, generator=g)
    geo = ([case.stride] * 2, [case.padding] * 2, [1, 1])
    scale, beta = _ops._bn_prologue(mean, invstd, gamma, beta)
    if kernel == "fwd":
        y = torch.empty_like(gy)
        return lambda: kb.conv_forward(x, w, None, mean, scale, beta, res, y, *geo)
    if kernel == "dgrad":
        return lambda: dgrad.conv_dgrad(gy, x, w, mean, scale, beta, invstd, True, True, *geo)
    dw = torch.empty_like(w)
    return lambda: wgrad.conv_wgrad_partial(gy, x, dw, mean, scale, beta, *geo)


def _gemm_dims(case: Case, kernel: str):
    """(m, n) of the kernel's GEMM, the dimensions its BLOCK_M / BLOCK_N tile."""
    if kernel == "fwd":
        return case.n * case.out_h ** 2, case.k
    if kernel == "dgrad":
        return case.n * case.h ** 2 // case.stride ** 2, case.c
    return case.c, case.k


def _spills(fn) -> int:
    """Spill bytes of the Triton kernels one call of fn launches (compiled for this GPU)."""
    from triton.runtime.jit import JITFunction

    from ..triton import _launch  # noqa: F401  (it keeps Triton's own JITFunction.run: before it is replaced here)

    seen = []
    original = JITFunction.run  # what the launchers call (kernel.run(..., grid=, warmup=False)), and kernel[grid] too

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen.append(kernel)
        return kernel

    JITFunction.run = run
    try:
        fn()
    finally:
        JITFunction.run = original
    return max((getattr(k, "n_spills", 0) or 0) for k in seen) if seen else 0


def sweep(cases, dtype=torch.bfloat16, channels_last=True, kernels=("fwd", "dgrad", "wgrad"), min_gain=0.03,
          device="cuda", progress=None, timer=None, time_budget=None):
    """Returns ({table key: entry} for the configs that beat the heuristic, a log of every trial).
    `timer(fn) -> ms`; the default is triton.testing.do_bench's median. After `time_budget` seconds no
    new (case, kernel) is started; the skipped ones are logged as such."""
    import time

    from ..triton import configs

    t0 = time.monotonic()

    if timer is None:
        from triton.testing import do_bench

        timer = lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median")  # noqa: E731
    winners, log = {}, []
    jobs = [(c, k) for c in cases for k in kernels]
    for case, kernel in (progress(jobs) if progress else jobs):
        if time_budget is not None and time.monotonic() - t0 > time_budget:
            log.append((case.name, kernel, None, "not run: time budget spent"))
            continue
        fn = _layer_call(case, kernel, dtype, channels_last, torch.device(device))
        with configs.forced(kernel, None):
            base_us = 1e3 * timer(fn)
        key = configs.requested[kernel]
        m, n = _gemm_dims(case, kernel)
        best = (base_us, None)
        for cfg in candidates(kernel, n, m):
            with configs.forced(kernel, cfg):
                try:
                    if _spills(fn):
                        log.append((case.name, kernel, cfg, "spills"))
                        continue
                    us = 1e3 * timer(fn)
                except Exception as e:  # out of shared memory / resources for this tile: not a candidate
                    log.append((case.name, kernel, cfg, f"failed: {type(e).__name__}: {e}"[:200]))
                    continue
            log.append((case.name, kernel, cfg, us))
            if us < best[0]:
                best = (us, cfg)
        if best[1] is not None and best[0] < (1 - min_gain) * base_us:
            winners[key] = dict(best[1], us=round(best[0], 2), heuristic_us=round(base_us, 2), case=case.name)
    return winners, log
