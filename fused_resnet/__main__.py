"""`fused-resnet` / `python -m fused_resnet`: the subcommands are listed in USAGE below."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ._table import format_table


def check(argv=None):
    p = argparse.ArgumentParser(prog="fused-resnet check", description="Self-check the fused op against a float64 reference.")
    p.add_argument("--quick", action="store_true", help="fewer layers")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to check (default: bfloat16 and float32)")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    if not gpu:
        # The Triton interpreter runs the real kernels on the CPU; must be set before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from tqdm import tqdm

    import fused_resnet
    from fused_resnet import _selfcheck

    print(f"fused_resnet {fused_resnet.__version__}, torch {torch.__version__}")
    print(fused_resnet.available_backends())
    device = torch.device("cuda" if gpu else "cpu")
    backend = "auto" if gpu else ("triton" if "triton" in fused_resnet.available_backends() else "reference")
    layers = _selfcheck.GPU_LAYERS if gpu else _selfcheck.CPU_LAYERS
    if args.quick:
        layers = layers[:2]
    dtypes = [getattr(torch, args.dtype)] if args.dtype else [torch.bfloat16, torch.float32]

    print(f"\nSelf-check on {torch.cuda.get_device_name() if gpu else 'CPU'}, backend={backend}: "
          "max relative error vs a float64 reference, fused and eager at the same dtype")
    rows, ok = [], True
    jobs = [(l, d, tr) for l in layers for d in dtypes for tr in (True, False)]
    for layer, dtype, training in tqdm(jobs, desc="self-check", leave=False, disable=None):
        e = _selfcheck.parity_errors(layer, dtype, device, backend, training)
        # Pass when the fused error is within 4x eager's own (or within a dtype floor where eager is exact).
        floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        good = all(e[f"fused_{q}"] <= 4 * e[f"eager_{q}"] + floor for q in ("y", "dx"))
        ok &= good
        rows.append([layer.name, str(dtype).replace("torch.", ""), "train" if training else "eval",
                     f"{e['fused_y']:.1e}", f"{e['eager_y']:.1e}", f"{e['fused_dx']:.1e}",
                     f"{e['eager_dx']:.1e}", "ok" if good else "FAIL"])
    print(format_table(rows, ["layer", "dtype", "mode", "fused y", "eager y", "fused dx", "eager dx", "check"]))

    print("\nThroughput and memory: `fused-resnet bench --quick` (or --full).")
    return 0 if ok else 1


USAGE = """usage: fused-resnet <command> [options]      (fused-resnet <command> --help for its options)

commands:
  check     self-check the fused op against a float64 reference on this machine's device (default)
  bench     throughput and memory benchmarks: fused vs eager and torch.compile
  train     train a pre-activation ResNet on scikit-learn's digits, fused and unfused side by side
  kernels   static report of every Triton launch compiled for sm_90/sm_80: registers, spills, MMA kind
  help      this list
"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv and not argv[0].startswith("-") and argv[0] not in ("check", "bench", "train", "kernels"):
        print(f"fused-resnet: unknown command {argv[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    if argv and argv[0] == "kernels":
        from .bench.kernels import main as kernels

        return kernels(argv[1:])
    if argv and argv[0] == "bench":
        from .bench.__main__ import main as bench

        return bench(argv[1:])
    if argv and argv[0] == "train":
        from .train import main as train

        return train(argv[1:])
    if argv and argv[0] == "check":
        argv = argv[1:]
    return check(argv)


if __name__ == "__main__":
    sys.exit(main())
