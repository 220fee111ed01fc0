"""Per-kernel device time of a layer's training step (forward + backward), fused (triton, cuda) against
eager channels_last (cuDNN), read from torch.profiler's trace; with the copy bandwidth and matmul rate
measured in the same run, so every kernel's rate is held against what this device showed it can do.

  python -m fused_resnet.bench.profile --out OUT [--cases NAME,...] [--providers eager_cl,triton,cuda]

Writes OUT/profile.json (the device, versions, commit, peaks and one row per kernel) and OUT/profile.md.
Each row: a kernel's device time per step and launches per step; for a convolution's main kernel (its
role -- forward, dgrad, wgrad -- read from the kernel's name) the TFLOP/s its share of the work implies.
Per layer: the step's total device time, its bytes and FLOPs floor (roofline.layer_cost) as achieved
GB/s and % of the roofline. On a CPU the same plumbing runs at interpreter sizes (`--tiny`), profiling
CPU operators instead of kernels: never GPU figures, and the output says so.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict

import torch

from .cases import CIFAR_LAYERS, R50_LAYERS, tiny
from .providers import PROVIDERS, Runner
from .roofline import device_peaks, layer_cost, roofline_fraction
from .run import environment

# The layer cases of the GPU pass's profile (issue 12): ResNet-50 at N=128, CIFAR at N=256.
CASES = ("r50-3x3-c64-56px", "r50-1x1-c256-k64-56px", "r50-1x1-c64-k256-56px", "r50-3x3s2-c128-56px",
         "r50-3x3-c512-7px", "r50-1x1-c2048-k512-7px", "cifar-s1-c16-32px", "cifar-s1-c64-8px")
PROFILED = ("eager_cl", "triton", "cuda")

# A convolution kernel's role from its name: ours (conv_fwd / conv_forward_mma_kernel, conv_dgrad*,
# conv_wgrad*) and cuDNN's / CUTLASS's (fprop, dgrad, wgrad in the kernel name).
_ROLES = (("wgrad", re.compile(r"wgrad", re.I)), ("dgrad", re.compile(r"dgrad", re.I)),
          ("forward", re.compile(r"conv_fwd|conv_forward|fprop|implicit_?gemm|xmma_fwd", re.I)))


def role(kernel: str):
    for name, pattern in _ROLES:
        if pattern.search(kernel):
            return name
    return None


def _case(name: str):
    for c in R50_LAYERS + CIFAR_LAYERS:
        if c.name == name:
            return c
    raise ValueError(f"unknown layer case {name!r}; choose from {', '.join(c.name for c in R50_LAYERS + CIFAR_LAYERS)}")


def kernel_times(prof, device: torch.device, reps: int):
    """{name: (microseconds per step, launches per step)}: GPU kernels on a GPU; on the CPU, the
    operators' own (self) CPU time -- the plumbing only."""
    totals = defaultdict(lambda: [0.0, 0])
    if device.type == "cuda":
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:  # a kernel (or memcpy/memset) on the device
                totals[e.name][0] += e.device_time_total  # its own duration, microseconds
                totals[e.name][1] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                totals[e.key][0] += e.self_cpu_time_total
                totals[e.key][1] += e.count
    return {k: (us / reps, n / reps) for k, (us, n) in totals.items()}


def profile_one(case, provider: str, dtype: torch.dtype, device: torch.device, warmup: int, reps: int):
    """Rows for one (case, provider): one per kernel, largest first, and the step's total."""
    runner = Runner(case, provider, "training", dtype, device)
    runner.fill_rotation()
    n = len(runner.inputs)
    for i in range(warmup):
        runner.step(i % n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    acts = [torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(reps):
            runner.step(i % n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = kernel_times(prof, device, reps)
    conv_flops = layer_cost(case, "inference", 2)[1]  # one conv's FLOPs: forward, dgrad and wgrad each do this
    rows = []
    for name, (us, launches) in sorted(times.items(), key=lambda kv: -kv[1][0]):
        r = role(name) if device.type == "cuda" else None
        rows.append({"kernel": name, "us": us, "launches": launches, "role": r,
                     "tflops": conv_flops / (us * 1e-6) / 1e12 if r and us > 0 else None})
    return rows


def summarize(case, rows, itemsize: int, peaks: dict):
    total_us = sum(r["us"] for r in rows)
    nbytes, flops = layer_cost(case, "training", itemsize)
    gbps, pct = roofline_fraction(case, "training", itemsize, total_us * 1e-3, peaks) if total_us else (None, None)
    return {"total_us": total_us, "floor_bytes": nbytes, "flops": flops, "gbps": gbps, "roofline_pct": pct}


def markdown(doc) -> str:
    env, peaks = doc["environment"], doc["peaks"]
    lines = []
    if not doc["gpu"]:
        lines.append("**CPU run at interpreter sizes: CPU operator times, not GPU figures.**\n")
    lines.append(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit "
                 f"{env['commit']}, {env['date']}; {doc['dtype']}, channels_last, training step (forward + "
                 f"backward), {doc['reps']} profiled steps after {doc['warmup']} warm-up.")
    lines.append(f"Measured in this run: copy bandwidth {peaks['hbm_gbps']:.0f} GB/s, matmul "
                 f"{peaks['matmul_tflops']:.1f} TFLOP/s.\n")
    lines.append("| case | provider | step us | vs eager_cl | GB/s (floor bytes) | % roofline |")
    lines.append("|---|---|---|---|---|---|")
    for c in doc["cases"]:
        base = c["providers"].get("eager_cl", {}).get("summary", {}).get("total_us")
        for p, d in c["providers"].items():
            s = d["summary"]
            speed = f"{base / s['total_us']:.2f}x" if base and s["total_us"] else "-"
            lines.append(f"| {c['case']} | {p} | {s['total_us']:.1f} | {speed} | {s['gbps']:.0f} | "
                         f"{s['roofline_pct']:.0f}% |")
    lines.append("\nPer kernel (device time per step; TFLOP/s for a convolution's main kernel, one conv's FLOPs):\n")
    lines.append("| case | provider | kernel | role | launches | us | TFLOP/s |")
    lines.append("|---|---|---|---|---|---|---|")
    for c in doc["cases"]:
        for p, d in c["providers"].items():
            for r in d["kernels"]:
                name = r["kernel"] if len(r["kernel"]) <= 70 else r["kernel"][:67] + "..."
                tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
                lines.append(f"| {c['case']} | {p} | `{name}` | {r['role'] or '-'} | {r['launches']:g} | "
                             f"{r['us']:.1f} | {tf} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_resnet.bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for profile.json and profile.md")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of layer case names (default: the GPU pass's)")
    p.add_argument("--providers", default=",".join(PROFILED), help="comma list (default eager_cl,triton,cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="interpreter-sized cases (what a CPU run needs)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new (case, provider) after this long; the rest are listed in not_run. "
                        "profile.json / profile.md are rewritten after every one, so a run cut short keeps them")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be at least 1 and --warmup at least 0")
    if args.time_budget is not None and args.time_budget <= 0:
        p.error("--time-budget must be positive")
    try:
        cases = [_case(c) for c in args.cases.split(",")]
    except ValueError as e:
        p.error(str(e))
    providers = args.providers.split(",")
    bad = [x for x in providers if x not in PROVIDERS]
    if bad:
        p.error(f"unknown providers {bad}")
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        p.error("no CUDA GPU here: the full-size cases need one (--tiny runs the plumbing on the CPU)")
    device = torch.device("cuda" if gpu else "cpu")
    if args.tiny:
        cases = [tiny(c) for c in cases]
    from .run import provider_status

    providers, skipped = provider_status(providers, device)
    for name, why in skipped.items():
        print(f"provider {name} left out: {why}", file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    peaks = device_peaks(device, dtype)
    from tqdm import tqdm

    doc = {"environment": environment(device), "gpu": gpu, "dtype": args.dtype, "warmup": args.warmup,
           "reps": args.reps, "peaks": peaks, "skipped": skipped, "cases": [], "not_run": []}
    jobs = [(c, pr) for c in cases for pr in providers]
    by_case = {}
    os.makedirs(args.out, exist_ok=True)
    t0 = time.monotonic()

    def write():
        doc["cases"] = list(by_case.values())
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(doc, f, indent=1)
        text = markdown(doc)
        with open(os.path.join(args.out, "profile.md"), "w") as f:
            f.write(text)
        return text

    for case, provider in tqdm(jobs, desc="profile", disable=None):
        if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
            doc["not_run"].append(f"{case.name} {provider}")
            continue
        rows = profile_one(case, provider, dtype, device, args.warmup, args.reps)
        entry = by_case.setdefault(case.name, {"case": case.name, "providers": {}})
        entry["providers"][provider] = {"kernels": rows,
                                        "summary": summarize(case, rows, torch.finfo(dtype).bits // 8, peaks)}
        write()
    print(write())
    if doc["not_run"]:
        print(f"time budget of {args.time_budget:g}s spent: not run: {', '.join(doc['not_run'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
