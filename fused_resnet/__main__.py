"""`fused-resnet` / `python -m fused_resnet`: the subcommands are listed in USAGE below."""
from __future__ import annotations

import sys

import torch

from . import _cli
from ._table import format_table


def check(argv=None):
    p = _cli.ArgumentParser(prog="fused-resnet check", description="Self-check the fused op against a float64 reference.")
    p.add_argument("--quick", action="store_true", help="fewer layers")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to check (default: bfloat16 and float32)")
    p.add_argument("--device", default="auto", help="auto (the GPU when one is visible, else the CPU), cpu or cuda[:N]")
    p.add_argument("--backend", default=None, choices=("auto", "reference", "triton", "cuda"),
                   help="backend to check (default: the fused kernels that run here -- triton, through its "
                        "interpreter on the CPU -- else the reference)")
    args = p.parse_args(argv)

    # The same resolution as every subcommand (_cli): on the CPU the Triton interpreter runs the real kernels.
    device = _cli.resolve_device(args.device)
    gpu = device.type == "cuda"

    import fused_resnet
    from fused_resnet import _selfcheck

    print(f"fused_resnet {fused_resnet.__version__}, torch {torch.__version__}")
    print(fused_resnet.available_backends())
    if args.backend is None:
        args.backend = "auto" if gpu else ("triton" if "triton" in fused_resnet.available_backends() else "reference")
    backend = _cli.resolve_backend(args.backend, device)
    layers = _selfcheck.GPU_LAYERS if gpu else _selfcheck.CPU_LAYERS
    if args.quick:
        layers = layers[:2]
    dtypes = [getattr(torch, args.dtype)] if args.dtype else [torch.bfloat16, torch.float32]

    print(f"\nSelf-check on {torch.cuda.get_device_name(device) if gpu else 'CPU'}, backend={backend}: "
          "max relative error vs a float64 reference, fused and eager at the same dtype")
    rows, ok = [], True
    jobs = [(l, d, tr) for l in layers for d in dtypes for tr in (True, False)]
    for layer, dtype, training in _cli.progress(jobs, desc="self-check", leave=False):
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

Errors are one line on stderr with exit code 2; --debug (with any command) also prints the traceback.
Without a GPU every command runs on the CPU, with the Triton interpreter turned on (TRITON_INTERPRET=1).
"""


def _kernels(argv):
    from .bench.kernels import main as kernels

    return kernels(argv)


def _bench(argv):
    from .bench.__main__ import main as bench

    return bench(argv)


def _train(argv):
    from .train import main as train

    return train(argv)


COMMANDS = {"check": check, "bench": _bench, "train": _train, "kernels": _kernels}


def main(argv=None):
    """Every subcommand under one convention (_cli): errors one line on stderr, exit 2; --debug shows
    the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    rest = [a for a in argv if a != "--debug"]
    if rest and not rest[0].startswith("-") and rest[0] not in COMMANDS:
        return _cli.fail("fused-resnet", f"unknown command {rest[0]!r}; commands: {', '.join(COMMANDS)}, help")
    name = rest[0] if rest and rest[0] in COMMANDS else "check"
    if rest and rest[0] == name:
        argv.remove(name)
    return _cli.run_command(COMMANDS[name], argv, f"fused-resnet {name}")


if __name__ == "__main__":
    sys.exit(main())
