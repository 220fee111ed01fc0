"""`fused-resnet bench` / `python -m fused_resnet.bench`: throughput and memory of fused vs unfused.

On a GPU: the preset's cases x modes x dtypes x providers, a results file
benchmarks/results/<device>-<date>-<commit>.json, RESULTS.md and a chart regenerated from it.
Without a GPU: the same harness at interpreter-sized shapes, printed only (CPU figures are not GPU
figures and are never written into benchmarks/results/; --json writes them elsewhere).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .. import _cli


def _csv(choices):
    def parse(s):
        vals = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {s!r})")
        return vals
    return parse


def build_parser(prog="fused-resnet bench"):
    from .providers import PROVIDERS
    from .run import DTYPES, MODES

    p = _cli.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a subset of cases, fewer repetitions, no compile_max (default)")
    g.add_argument("--full", action="store_true", help="every case and provider (compile_max autotunes: slow)")
    p.add_argument("--providers", type=_csv(PROVIDERS), help="comma list (default: all for the preset)")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES))
    p.add_argument("--dtypes", type=_csv(tuple(DTYPES)), help="comma list (default bf16,fp16,fp32; CPU: fp32)")
    p.add_argument("--kinds", type=_csv(("layer", "block", "model")),
                   help="comma list of layer, block, model (default: all three; on the CPU layer,block)")
    p.add_argument("--reps", type=int, help="timed repetitions per measurement (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default 5; on the CPU 1)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop starting new measurements after this long; the rest are listed as not run")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="GPU runs: folder for the results JSON (RESULTS.md goes to its parent)")
    p.add_argument("--json", help="also write the JSON here (the only way a CPU run is written)")
    p.add_argument("--report-only", action="store_true", help="regenerate RESULTS.md from --out, measure nothing")
    p.add_argument("--graphs", action="store_true",
                   help="GPU: also time every provider (eager too) as CUDA-graph replay, '<provider>+graph', so "
                        "launch overhead is visible and the comparison without it is fair")
    return p


def _table(records, gpu=True):
    """The run's records; off the GPU without the peak-memory and roofline columns, which mean nothing
    there (memory is not tracked; a CPU against an H100's roofline)."""
    from .._table import format_table as table

    rows = [[r["case"], r["mode"], r["dtype"], r["provider"], r["layout"], f"{r['median_ms']:.3f}",
             f"{r['images_per_s']:.4g}"]
            + (["–" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
                "–" if r["pct_of_roofline"] is None else f"{r['pct_of_roofline']:.3g}%"] if gpu else [])
            for r in records]
    headers = ["case", "mode", "dtype", "provider", "layout", "median ms", "img/s"]
    return table(rows, headers + (["peak MiB", "roofline"] if gpu else []))


# Seconds per interpreted training step of the Triton provider at the tiny CPU shapes, measured on the
# 2-core development machines (inference is about a third of it): the CPU run's up-front estimate.
CPU_TRITON_STEP_S = {"layer": 0.6, "block": 2.0, "model": 30.0}


def cpu_estimate_s(cases, providers, modes, warmup, reps):
    steps = warmup + reps + 1  # + the first step, which also compiles nothing but allocates
    per_mode = {"training": 1.0, "inference": 0.35}
    t = sum(CPU_TRITON_STEP_S[c.kind] * per_mode[m] * steps for c in cases for m in modes
            for p in providers if p == "triton")
    return t + 0.5 * len(cases) * len(modes) * len(providers)  # building each case's modules and inputs


class LineProgress:
    """Progress for a run whose output is not a terminal (tqdm draws nothing there): one line each."""

    def __init__(self, total):
        self.total, self.n, self.t0 = total, 0, time.monotonic()

    def set_postfix_str(self, s):
        self.current = s

    def update(self, n=1):
        self.n += n
        print(f"  [{self.n}/{self.total}, {time.monotonic() - self.t0:.0f}s] {getattr(self, 'current', '')}",
              flush=True)

    def write(self, s):
        print(s, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None, prog="fused-resnet bench"):
    args = build_parser(prog).parse_args(argv)
    # The same resolution as every subcommand (on the CPU: the Triton interpreter on, before triton loads).
    gpu = _cli.resolve_device("auto").type == "cuda"
    from . import cases as C
    from . import report
    from .run import environment, provider_status, run

    results_dir = args.out
    results_md = os.path.join(os.path.dirname(os.path.abspath(results_dir)), "RESULTS.md")
    if args.report_only:
        print(f"wrote {report.regenerate(results_dir, results_md)}")
        return 0
    if args.reps is not None and args.reps < 1:
        return _cli.fail(prog, "--reps must be at least 1")
    if args.time_budget is not None and args.time_budget <= 0:
        return _cli.fail(prog, "--time-budget must be positive")
    if args.graphs and not gpu:
        return _cli.fail(prog, "--graphs needs a CUDA GPU (CUDA graphs capture GPU work); none is visible")
    from tqdm import tqdm

    full = args.full
    device = torch.device("cuda" if gpu else "cpu")
    kinds = args.kinds or (["layer", "block", "model"] if gpu else ["layer", "block"])
    cases = C.preset("full" if full else "quick", tuple(kinds))
    providers = args.providers or [p for p in ("eager", "eager_cl", "compile", "compile_max", "triton", "cuda")
                                   if (full or p != "compile_max") and (gpu or not p.startswith("compile"))]
    dtypes = args.dtypes or (["bf16", "fp16", "fp32"] if gpu else ["fp32"])
    reps = args.reps or (50 if full else 20)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if not gpu:
        cases = [C.tiny(c) for c in cases]
        reps = args.reps or 2
        print("NOTE: no CUDA GPU visible. Running the harness on the CPU at interpreter-sized shapes; these are "
              "CPU figures (Triton runs in its interpreter), NOT GPU figures, and are not written to "
              f"{results_dir}.")
        if not args.kinds:
            print("  Model cases left out (an interpreted training step takes ~30 s): --kinds model adds them.")
        if not args.providers:
            print("  torch.compile providers left out (inductor builds C++ per case, minutes each): "
                  "--providers adds them.")
    providers, skipped = provider_status(providers, device)
    for p, why in skipped.items():
        print(f"provider {p} skipped: {why}")
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | commit {env['commit']}")
    total = len(cases) * len(args.modes) * len(dtypes) * len(providers) * (2 if args.graphs else 1)
    if not gpu:
        print(f"{total} measurements; estimated {cpu_estimate_s(cases, providers, args.modes, warmup, reps):.0f} s "
              "on a 2-core CPU", flush=True)
    bar = tqdm(total=total, desc="bench") if sys.stderr.isatty() else LineProgress(total)
    with bar:
        deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
        partial = None
        if gpu:  # the results file is rewritten after every measurement: a run killed midway keeps what it measured
            def partial(records, peaks):
                meta = {"peaks": peaks, "preset": "full" if full else "quick", "reps": reps, "warmup": warmup,
                        "gpu": gpu, "cuda_graphs": args.graphs, "not_run": [], "partial": True}
                report.write_results(os.path.join(results_dir, report.results_name(env)), env, records, meta)
        records, peaks, not_run = run(cases, providers, args.modes, dtypes, device, warmup, reps,
                                      progress=bar, log=bar.write, deadline=deadline, graphs=args.graphs,
                                      on_record=partial)
    if not gpu:  # said again where the figures are, not only at the top of a long run
        print("CPU figures at interpreter-sized shapes (Triton in its interpreter): NOT GPU figures.")
    print(_table(records, gpu))
    if not_run:
        print(f"time budget of {args.time_budget:g}s spent: {len(not_run)} of {total} measurements not run "
              f"(listed in the results' meta.not_run)")
    meta = {"peaks": peaks, "preset": "full" if full else "quick", "reps": reps, "warmup": warmup,
            "gpu": gpu, "cuda_graphs": args.graphs, "not_run": not_run}
    if gpu:
        path = report.write_results(os.path.join(results_dir, report.results_name(env)), env, records, meta)
        print(f"wrote {path}")
        print(f"wrote {report.regenerate(results_dir, results_md)}")
    if args.json:
        if not gpu and os.path.abspath(args.json).startswith(os.path.abspath(results_dir) + os.sep):
            return _cli.fail(prog, f"refusing to write a CPU run into {results_dir}")
        print(f"wrote {report.write_results(args.json, env, records, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_command(lambda argv: main(argv, prog="python -m fused_resnet.bench"), sys.argv[1:],
                              "python -m fused_resnet.bench"))
