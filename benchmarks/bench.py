"""Benchmark harness: fused vs eager per layer shape, medians over warmed-up runs, one JSON per run.

    python benchmarks/bench.py --out benchmarks/results [--quick]

Each row carries the device name, torch/triton versions and the git commit, so a number can always be
traced to what produced it. Needs a CUDA GPU (timings on the CPU interpreter would mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch


def _commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON result file")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU; none is visible here. Nothing was measured.", file=sys.stderr)
        return 2
    import triton
    from tqdm import tqdm

    from fused_resnet import _bench

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), commit=_commit(),
                backend=args.backend, tf32=torch.backends.cudnn.allow_tf32,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    reps = 10 if args.quick else 50
    rows = []
    jobs = [(l, d, tr, cl) for l in _bench.GPU_LAYERS for d in (torch.bfloat16, torch.float32)
            for tr in (False, True) for cl in (True, False)]
    for layer, dtype, training, cl in tqdm(jobs, desc="bench"):
        t = _bench.make_inputs(layer, dtype, "cuda", channels_last=cl)
        fe = _bench.step_fn(_bench.eager, t, layer, training, backward=training)
        ff = _bench.step_fn(lambda d, l, tr: _bench.fused(d, l, tr, args.backend), t, layer, training,
                            backward=training)
        te, tf = _bench.time_cuda(fe, reps=reps), _bench.time_cuda(ff, reps=reps)
        me, mf = _bench.peak_memory_mb(fe), _bench.peak_memory_mb(ff)
        flop = layer.flops() * (3 if training else 1)
        rows.append(dict(dataclasses.asdict(layer), dtype=str(dtype).replace("torch.", ""),
                         mode="train" if training else "eval", layout="nhwc" if cl else "nchw",
                         eager_ms=te, fused_ms=tf, speedup=te / tf, eager_peak_mib=me, fused_peak_mib=mf,
                         fused_tflops=flop / tf / 1e9))
        print(f"{layer.name:32s} {rows[-1]['dtype']:8s} {rows[-1]['mode']:5s} {rows[-1]['layout']}  "
              f"eager {te:8.3f} ms  fused {tf:8.3f} ms  {te / tf:5.2f}x  mem {me:7.0f} -> {mf:7.0f} MiB")
    os.makedirs(args.out, exist_ok=True)
    name = f"{meta['device'].replace(' ', '_')}_{meta['commit']}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
