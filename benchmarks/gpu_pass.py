"""The GPU pass: everything a GPU can tell us in one call of the device tool, driven by one deadline.

    bash benchmarks/gpu_pass.sh OUT [--budget SECONDS] [--dry-run] [--stages a,b,...]

Stages, in priority order (the most informative first); each gets a share of the time that is left
(its weight over the weights of the stages still to run, at least its floor), and is cut short -- its
process group sent SIGTERM (pytest: SIGINT, so it reports), then SIGKILL 5 s later -- when its share is
spent. A cut stage is "cut", not "failed": what it wrote so far stays (every stage writes its results as
it goes, and the pass rewrites OUT's summary the moment a stage ends).

  env        GPU, driver, clocks, versions, commit (in-process, a few seconds)
  build      pip install --no-build-isolation --no-deps -e . (fused_resnet._C, all cores), then imports it
  smoke      benchmarks/gpu_smoke.py: both backends, bf16/fp32, NHWC/NCHW, CIFAR + ResNet-50 layer, training
             and eval, against a float64 reference; first vs second call (Triton's compile time)
  profile    python -m fused_resnet.bench.profile: per-kernel device time against cuDNN (eager_cl), bf16,
             channels_last, the ResNet-50 and CIFAR layers, with the copy bandwidth / matmul rate measured there
  bench      fused-resnet bench --full --kinds model --graphs: preact_resnet50 (224 px), preact_resnet110
             (32 px), resnet50 (torchvision's post-activation layout, 224 px), bf16, training then inference, eager_cl / triton / cuda / compile, each also graphed
  host       benchmarks/host_overhead.py --device cuda: host time per step (every launch real) of a fused layer,
             blocks and preact_resnet20 against eager, training / eval, both backends, Triton with and without
             its direct launch
  sanitize   compute-sanitizer memcheck of one small case per backend (racecheck if the share allows)
  tests      the test suite (-x), cut at its share
  bench_max  torch.compile max-autotune, merged into the bench results (only with time left over)
  tune       the Triton config sweep into OUT/configs.json (only with time left over)

The pass ends within budget + 30 s whatever its stages do. OUT holds at most 8 files, at most 2 folders
deep: summary.md, results.json, logs.tar.gz (every log and intermediate file), profile.md, the bench
results JSON and chart under OUT/results/, OUT/RESULTS.md, and OUT/configs.json when `tune` ran.
Work files live in build/gpu-pass/ (ignored): `--stages` resumes after a cut on the same warm machine,
keeping the earlier call's entries in results.json and summary.md.

--dry-run (CPU, CI): the same orchestration with every command replaced by a check that it exists and
parses its arguments (the entry point run with argparse stopped right after parsing; pytest
--collect-only; a tiny CPU run of the smoke script), so no GPU session is spent on a typo.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
GRACE_S = 5.0  # between the polite signal and SIGKILL
MIN_STAGE_S = 5.0  # a share smaller than this is not worth starting
MAX_FILES, MAX_DEPTH = 8, 2


def reserve_s(budget: float) -> float:
    """Seconds kept back from the stages for the last stage's grace, collection and the final write."""
    return min(15.0, 2.0 + 0.03 * budget)


@dataclass
class Step:
    name: str
    argv: list
    dry: list | None = None  # the dry-run check; default: derived from argv (see dry_argv)
    min_left_s: float = 0.0  # run only if at least this much of the stage's share is left
    interrupt: int = signal.SIGTERM
    env: dict = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    weight: float
    what: str
    steps: Callable  # (ctx, share_s) -> [Step]
    floor_s: float = 0.0  # a share of at least this (build: nothing later works without it)
    min_s: float = MIN_STAGE_S  # not started with less than this left
    collect: Callable | None = None  # (ctx, entry) -> None, after the stage (dry run too): reads its outputs
    inprocess: Callable | None = None  # (ctx) -> dict: instead of steps


@dataclass
class Ctx:
    out: Path
    work: Path
    dry: bool
    budget: float
    t0: float
    deadline: float  # monotonic: t0 + budget
    results: dict = field(default_factory=dict)

    def left(self):
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------------------------------------- running

def _child_env(ctx, extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if ctx.dry:  # the CPU: Triton's interpreter, and the CUDA kernels' host build for the smoke script's tiny run
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("FUSED_RESNET_CUDA_EMULATED", "1")
    env.update(extra or {})
    return env


def run_step(argv, log_path, stop_at, interrupt=signal.SIGTERM, env=None, hard_stop=None):
    """Run argv in its own process group, output to log_path; at monotonic `stop_at` send it `interrupt`,
    then SIGKILL after GRACE_S (never later than hard_stop). Returns (rc, cut, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(map(str, argv))}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=env, start_new_session=True)
        except OSError as e:
            log.write(f"could not start: {e}\n".encode())
            return 127, False, 0.0
        try:
            rc = proc.wait(timeout=max(0.0, stop_at - time.monotonic()))
            return rc, False, time.monotonic() - t0
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, interrupt)
        grace = GRACE_S if hard_stop is None else max(0.5, min(GRACE_S, hard_stop - time.monotonic()))
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        log.write(f"\n[gpu_pass] cut after {time.monotonic() - t0:.1f}s (its share was spent)\n".encode())
        return proc.returncode, True, time.monotonic() - t0


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)  # the group this pass started for it (start_new_session), and nothing else
    except (ProcessLookupError, PermissionError):
        pass


def dry_argv(step: Step):
    """The dry-run check of a step: its own `dry`, else pytest --collect-only, else the Python entry point
    with argparse stopped right after parsing (--check-args), else that the program exists."""
    if step.dry is not None:
        return step.dry
    argv = [str(a) for a in step.argv]
    if argv[0] == "compute-sanitizer":  # the sanitizer is on the GPU machine only; check what it runs
        inner = argv.index(PY)
        return [PY, __file__, "--check-args", "--require", "compute-sanitizer", "--"] + argv[inner + 1:]
    if argv[0] == PY and argv[1:3] == ["-m", "pytest"]:
        # pytest's options checked on one small test file: collecting the whole suite on a 2-core CPU takes
        # minutes (the GPU run collects it for real)
        return argv[:-1] + ["--collect-only", "tests/test_gpu_pass.py"]
    if argv[0] == PY:
        return [PY, __file__, "--check-args", "--"] + argv[1:]
    return [PY, __file__, "--check-args", "--require", argv[0]]


def check_args(argv):
    """`--check-args [--require PROG] -- (-m MODULE | SCRIPT) ARGS...`: run the entry point until its argparse
    parser has parsed ARGS (bad or missing arguments fail as they would for real), then stop."""
    need = []
    while argv and argv[0] == "--require":
        need.append(argv[1])
        argv = argv[2:]
    for prog in need:
        print(f"{prog}: {shutil.which(prog) or 'not on this machine (the GPU machine has it: KINDS.md)'}")
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        return 0
    import runpy

    class Parsed(BaseException):
        """Not an Exception: the CLI convention (fused_resnet/_cli.py) turns every Exception into an error."""

    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        ns = original(self, args, namespace)
        raise Parsed(ns)

    argparse.ArgumentParser.parse_args = parse_args
    sys.argv = list(argv) if argv[0] != "-m" else [argv[1]] + argv[2:]
    try:
        if argv[0] == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    except Parsed as e:
        print(f"{' '.join(argv)}: arguments parse: {vars(e.args[0])}")
        return 0
    print(f"{' '.join(argv)}: ended without parsing arguments with argparse", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------------ stages

def _env(ctx):
    """The environment: GPU, driver, clocks, versions, commit. Missing tools are noted, not failures."""
    info, lines = {}, []

    def sh(key, argv, timeout=20):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            text = (r.stdout + r.stderr).strip()
        except (OSError, subprocess.SubprocessError) as e:
            text = f"unavailable: {type(e).__name__}: {e}"
        info[key] = text
        lines.append(f"$ {' '.join(argv)}\n{text}\n")

    sh("gpu", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
               "power.draw,power.limit,temperature.gpu,persistence_mode", "--format=csv"])
    sh("clocks", ["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE"])
    sh("versions", [PY, "-c", "import sys, torch, platform; import triton; print('python', platform.python_version(),"
                    " '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', "
                    "torch.backends.cudnn.version(), '| triton', triton.__version__, '| gpu', "
                    "torch.cuda.get_device_name() if torch.cuda.is_available() else None)"], timeout=60)
    sh("commit", ["git", "rev-parse", "--short", "HEAD"])
    sh("status", ["git", "status", "--short", "--untracked-files=no"])
    sh("nvcc", ["nvcc", "--version"])
    sh("sanitizer", ["compute-sanitizer", "--version"])
    info["cpus"] = os.cpu_count()
    (ctx.work / "env.log").write_text("\n".join(lines))
    return info


def _build_steps(ctx, share):
    jobs = str(os.cpu_count() or 2)
    env = {"MAX_JOBS": jobs, "FUSED_RESNET_CUDA": "1",
           "FUSED_RESNET_CUDA_ARCH": os.environ.get("FUSED_RESNET_CUDA_ARCH", "9.0")}
    return [Step("pip", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."], env=env,
                 dry=[PY, "-m", "pip", "--version"]),
            Step("import", [PY, "-c", "import fused_resnet, fused_resnet._C; print(fused_resnet.available_backends())"],
                 dry=[PY, __file__, "--check-args", "--require", "nvcc"])]


def _smoke_steps(ctx, share):
    return [Step("smoke", [PY, "benchmarks/gpu_smoke.py", "--json", ctx.work / "smoke.json"],
                 dry=[PY, "benchmarks/gpu_smoke.py", "--tiny", "--json", ctx.work / "smoke.json", "--dtypes", "fp32",
                      "--layouts", "nhwc", "--cases", "cifar", "--modes", "training"])]


def _collect_smoke(ctx, entry):
    doc = _load(ctx.work / "smoke.json")
    if doc:
        entry["figures"] = {"summary": doc.get("summary"), "skipped": doc.get("skipped"),
                            "triton_cache_entries_before": doc.get("triton_cache_entries_before"),
                            "failed": [r for r in doc.get("rows", []) if not r["ok"]], "rows": doc.get("rows")}


def _profile_steps(ctx, share):
    return [Step("profile", [PY, "-m", "fused_resnet.bench.profile", "--out", ctx.work / "profile",
                             "--time-budget", f"{max(5.0, 0.75 * share - 15):.0f}"])]


def _collect_profile(ctx, entry):
    doc = _load(ctx.work / "profile" / "profile.json")
    if not doc:
        return
    table = {}
    for c in doc.get("cases", []):
        base = c["providers"].get("eager_cl", {}).get("summary", {}).get("total_us")
        for p, d in c["providers"].items():
            s = d["summary"]
            table.setdefault(c["case"], {})[p] = {
                "step_us": s["total_us"], "vs_eager_cl": (base / s["total_us"]) if base and s["total_us"] else None,
                "roofline_pct": s["roofline_pct"], "gbps": s["gbps"],
                "kernels": [{k: r[k] for k in ("kernel", "role", "us", "launches", "tflops")} for r in d["kernels"]]}
    entry["figures"] = {"peaks": doc.get("peaks"), "cases": table, "not_run": doc.get("not_run", []),
                        "skipped": doc.get("skipped")}
    if (ctx.work / "profile" / "profile.md").exists() and not ctx.dry:
        shutil.copy(ctx.work / "profile" / "profile.md", ctx.out / "profile.md")


BENCH = [PY, "-m", "fused_resnet", "bench", "--full", "--kinds", "model", "--graphs", "--dtypes", "bf16",
         "--modes", "training,inference", "--reps", "20", "--warmup", "3"]


def _bench_budget(share):
    # stop starting measurements early enough that the one in flight (a torch.compile of ResNet-50: a minute
    # or more) can end inside the share; the results file is rewritten after each, so a cut keeps them
    return f"{max(5.0, share - max(60.0, 0.35 * share)):.0f}"


def _bench_steps(ctx, share):
    return [Step("bench", BENCH + ["--providers", "eager_cl,triton,cuda,compile", "--time-budget", _bench_budget(share),
                                   "--out", ctx.out / "results"])]


def _host_steps(ctx, share):
    # triton-jit: the Triton backend with every launch through JITFunction.run, beside the direct launch (issue 30);
    # 10 steps in a row per variant (--burst); the network last, the slowest; the JSON is rewritten after each row
    return [Step("host", [PY, "benchmarks/host_overhead.py", "--device", "cuda", "--backends", "triton,triton-jit,cuda",
                          "--cases", "layer,block,proj,postact,net", "--modes", "training,eval", "--reps", "40",
                          "--burst", "10", "--json", ctx.work / "host.json"])]


def _collect_host(ctx, entry):
    doc = _load(ctx.work / "host.json")
    if doc:
        entry["figures"] = doc


def _bench_max_steps(ctx, share):
    return [Step("bench_max", BENCH + ["--providers", "compile_max", "--time-budget", _bench_budget(share),
                                       "--out", ctx.work / "bench_max"])]


def _report(ctx):
    """OUT/RESULTS.md and the chart from OUT/results/*.json (fused-resnet bench --report-only)."""
    if ctx.dry or not list((ctx.out / "results").glob("*.json")):
        return
    run_step([PY, "-m", "fused_resnet", "bench", "--report-only", "--out", ctx.out / "results"],
             ctx.work / "report.log", time.monotonic() + max(1.0, min(60.0, ctx.left() - 3)), env=_child_env(ctx))


def _bench_figures(paths):
    from fused_resnet.bench import report

    records, env = [], {}
    for p in paths:
        doc = _load(p)
        if doc:
            records += doc.get("records", [])
            env = {k: doc.get(k) for k in ("device", "torch", "triton", "cuda", "commit", "date")}
    rows = []
    for r in report.comparisons(records):
        by = {rec["provider"]: rec for rec in records
              if (rec["case"], rec["mode"], rec["dtype"]) == (r["case"], r["mode"], r["dtype"])}
        rows.append({"case": r["case"], "mode": r["mode"], "dtype": r["dtype"],
                     "images_per_s": {p: v["images_per_s"] for p, v in by.items()},
                     "peak_mem_mb": {p: v["peak_mem_mb"] for p, v in by.items()},
                     "vs_eager": r["vs_eager"], "vs_compile": r["vs_compile"],
                     "vs_eager_graphs": r["vs_eager_graphs"], "mem_ratio": r["mem_ratio"]})
    return {"environment": env, "records": len(records), "comparisons": rows}


def _collect_bench(ctx, entry):
    _report(ctx)
    paths = sorted((ctx.out / "results").glob("*.json"))
    if paths:
        entry["figures"] = _bench_figures(paths)
        entry["figures"]["not_run"] = (_load(paths[-1]) or {}).get("meta", {}).get("not_run", [])


def _collect_bench_max(ctx, entry):
    extra = sorted((ctx.work / "bench_max").glob("*.json"))
    mine = sorted((ctx.out / "results").glob("*.json"))
    if not extra:
        return
    add = (_load(extra[-1]) or {}).get("records", [])
    if mine:  # merge into the main results file, so RESULTS.md and the chart show compile_max beside the rest
        doc = _load(mine[-1])
        doc["records"] += add
        mine[-1].write_text(json.dumps(doc, indent=1))
        _report(ctx)
    entry["figures"] = {"records": len(add), "merged_into": mine[-1].name if mine else None}


def _sanitize_steps(ctx, share):
    steps = []
    for tool, need in (("memcheck", 0.0), ("racecheck", 45.0)):
        for backend in ("cuda", "triton"):
            steps.append(Step(f"{tool}-{backend}", ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9",
                                                    PY, "benchmarks/sanitize_case.py", "--backend", backend, "--quick"],
                              min_left_s=need))
    return steps


def _tests_steps(ctx, share):
    return [Step("pytest", [PY, "-m", "pytest", "-x", "-q", "-ra", "-p", "no:cacheprovider", "--durations=15",
                            f"--junitxml={ctx.work / 'tests.xml'}", "tests"], interrupt=signal.SIGINT)]


def _collect_tests(ctx, entry):
    log = ctx.work / "tests.log"
    if log.exists():
        tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        summary = [l for l in tail if (" passed" in l or " failed" in l or " error" in l or "no tests ran" in l
                                       or " tests collected" in l) and ("=" in l or " in " in l)]
        entry["figures"] = {"pytest": summary[-1].strip("= ") if summary else (tail[-1] if tail else "")}


def _tune_steps(ctx, share):
    if not ctx.dry:
        shutil.copy(ROOT / "fused_resnet" / "triton" / "configs.json", ctx.out / "configs.json")
    return [Step("tune", [PY, "-m", "fused_resnet", "kernels", "--tune", "--dtypes", "bfloat16", "--layouts", "nhwc",
                          "--time-budget", f"{max(5.0, 0.7 * share - 10):.0f}", "--table", ctx.out / "configs.json",
                          "--json", ctx.work / "tune.json"])]


def _collect_tune(ctx, entry):
    doc = _load(ctx.work / "tune.json")
    if doc:
        entry["figures"] = {"winners": doc.get("winners"), "trials": len(doc.get("trials", []))}


# Weights: seconds each should take out of the default 480 (bench the most: the headline figures). Stages of
# weight 0 run only on what the others left over (at least min_s).
STAGES = [
    Stage("env", 5, "GPU, driver, clocks, versions, commit", None, inprocess=_env, floor_s=30, min_s=0),
    Stage("build", 70, "fused_resnet._C, editable, all cores", _build_steps, floor_s=240),
    Stage("smoke", 45, "smoke parity: both backends, bf16/fp32, NHWC/NCHW, CIFAR + R50 layer, train + eval",
          _smoke_steps, collect=_collect_smoke),
    Stage("profile", 80, "per-kernel device time vs cuDNN (bf16, channels_last, R50 + CIFAR layers)",
          _profile_steps, min_s=20, collect=_collect_profile),
    Stage("bench", 170, "preact_resnet50/110 + resnet50 images/s + peak memory, bf16, fused vs eager_cl vs compile, +graphs",
          _bench_steps, min_s=30, collect=_collect_bench),
    Stage("host", 30, "host time per step with every launch real, fused vs eager (issue 30), layer and blocks",
          _host_steps, min_s=20, collect=_collect_host),
    Stage("sanitize", 40, "compute-sanitizer memcheck (racecheck if time) of one small case per backend",
          _sanitize_steps, min_s=15),
    Stage("tests", 70, "the test suite on the GPU (-x), cut at its share", _tests_steps, min_s=15,
          collect=_collect_tests),
    Stage("bench_max", 0, "torch.compile max-autotune, merged into the bench results", _bench_max_steps, min_s=120,
          collect=_collect_bench_max),
    Stage("tune", 0, "Triton config sweep into OUT/configs.json", _tune_steps, min_s=60, collect=_collect_tune),
]


# --------------------------------------------------------------------------------------------- the pass

def _load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def run_pass(out, stages=STAGES, budget=480.0, dry=False, selected=None, work=None, resume=False):
    """Run `stages` (those named in `selected`, in the list's order) within `budget` seconds; returns the
    results dict (also OUT/results.json)."""
    t0 = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work else ROOT / "build" / "gpu-pass"
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out=out, work=work, dry=dry, budget=budget, t0=t0, deadline=t0 + budget)
    earlier = (_load(work / "results.json") or {}).get("stages", {}) if resume else {}
    names = [s.name for s in stages]
    chosen = [s for s in stages if selected is None or s.name in selected]
    ctx.results = {"budget_s": budget, "dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "stage_order": names, "stages": {}}
    for s in stages:
        if s.name in earlier:
            ctx.results["stages"][s.name] = dict(earlier[s.name], earlier_call=True)
        elif s not in chosen:
            ctx.results["stages"][s.name] = {"status": "not selected", "what": s.what}
        else:
            ctx.results["stages"][s.name] = {"status": "pending", "what": s.what}
    reserve = reserve_s(budget)
    _finish(ctx)
    for i, stage in enumerate(chosen):
        entry = ctx.results["stages"][stage.name] = {"status": "running", "what": stage.what}
        left = ctx.left() - reserve
        weights = sum(s.weight for s in chosen[i:])
        share = left * stage.weight / weights if weights and stage.weight else left
        share = min(left, max(share, stage.floor_s))
        entry["share_s"] = round(share, 1)
        if share < stage.min_s:
            entry["status"] = "not run (no time left)"
            _finish(ctx)
            continue
        start = time.monotonic()
        stop_at = start + share
        if stage.inprocess is not None:
            try:
                entry["figures"] = stage.inprocess(ctx)
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001
                entry["status"], entry["error"] = "failed", f"{type(e).__name__}: {e}"
        else:
            statuses = []
            for step in stage.steps(ctx, share):
                remaining = stop_at - time.monotonic()
                if step.min_left_s and remaining < step.min_left_s:
                    entry.setdefault("skipped_steps", []).append(step.name)
                    continue
                argv = dry_argv(step) if dry else step.argv
                rc, cut, secs = run_step(argv, work / f"{stage.name}.log", stop_at, step.interrupt,
                                         _child_env(ctx, step.env), hard_stop=ctx.deadline)
                entry.setdefault("steps", []).append({"step": step.name, "rc": rc, "cut": cut, "s": round(secs, 1)})
                statuses.append("cut" if cut else ("ok" if rc == 0 else "failed"))
                if cut:
                    break
            entry["status"] = ("cut" if "cut" in statuses else "failed" if "failed" in statuses else "ok")
            if dry:
                entry["status"] = "dry-" + entry["status"]
        entry["seconds"] = round(time.monotonic() - start, 1)
        if stage.collect is not None:
            try:
                stage.collect(ctx, entry)
            except Exception as e:  # noqa: BLE001 - a stage's figures failing to load must not end the pass
                entry["collect_error"] = f"{type(e).__name__}: {e}"
        _finish(ctx)
    ctx.results["elapsed_s"] = round(time.monotonic() - t0, 1)
    _finish(ctx, final=True)
    return ctx.results


def _finish(ctx, final=False):
    """Rewrite OUT/results.json, OUT/summary.md and OUT/logs.tar.gz, and hold OUT to the 8 files / 2 levels."""
    ctx.results["elapsed_s"] = round(time.monotonic() - ctx.t0, 1)
    ctx.results["finished"] = final
    text = json.dumps(ctx.results, indent=1, default=str)
    (ctx.work / "results.json").write_text(text)
    (ctx.out / "results.json").write_text(text)
    (ctx.out / "summary.md").write_text(summary_markdown(ctx.results))
    enforce_layout(ctx.out, ctx.work)
    with tarfile.open(ctx.out / "logs.tar.gz.tmp", "w:gz") as tar:
        tar.add(ctx.work, arcname="gpu-pass")
    os.replace(ctx.out / "logs.tar.gz.tmp", ctx.out / "logs.tar.gz")


KEEP = ("summary.md", "results.json", "logs.tar.gz", "profile.md", "RESULTS.md", "configs.json")


def enforce_layout(out: Path, work: Path):
    """Move anything in OUT beyond what comes back (at most 8 files, 2 folders deep) into work/extra/, which
    goes into logs.tar.gz: the summary files first, then OUT/results/'s newest JSON and its chart."""
    files = sorted(p for p in out.rglob("*") if p.is_file() or p.is_symlink())
    keep = [out / k for k in KEEP if (out / k).exists()]
    res = sorted((out / "results").glob("*.json"))
    if res:
        keep += [res[-1]] + [p for p in (res[-1].with_suffix(".png"),) if p.exists()]
    keep = keep[:MAX_FILES]
    for p in files:
        if p in keep:
            continue
        dest = work / "extra" / p.relative_to(out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), str(dest))
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()


def _fmt(v, spec="{:.2f}"):
    return "–" if v is None else spec.format(v)


def summary_markdown(res) -> str:
    env = (res["stages"].get("env") or {}).get("figures") or {}
    lines = [f"# GPU pass{' (DRY RUN: no figures)' if res.get('dry_run') else ''}", "",
             f"{(env.get('versions') or 'versions: not read').strip()}; commit {(env.get('commit') or '?').strip()}; "
             f"started {res['started']}; budget {res['budget_s']:g} s, elapsed {res['elapsed_s']:g} s"
             f"{'' if res.get('finished') else ' (still running when written)'}.", "",
             "| stage | status | seconds | share s | what |", "|---|---|---|---|---|"]
    for name in res["stage_order"]:
        e = res["stages"].get(name, {})
        status = e.get("status", "?") + (" (earlier call)" if e.get("earlier_call") else "")
        if e.get("skipped_steps"):
            status += f"; skipped {', '.join(e['skipped_steps'])}"
        lines.append(f"| {name} | {status} | {_fmt(e.get('seconds'), '{:g}')} | {_fmt(e.get('share_s'), '{:g}')} | "
                     f"{e.get('what', '')} |")
    st = res["stages"]
    lines += ["", "## Headlines", ""]
    sm = (st.get("smoke") or {}).get("figures") or {}
    if sm.get("summary"):
        s = sm["summary"]
        lines.append(f"- smoke: {s['rows'] - s['failed']}/{s['rows']} ok; first calls {s['first_call_s']} s, "
                     f"second calls {s['second_call_s']} s; Triton compile (first minus second call, triton rows) "
                     f"{s['compile_s']} s; Triton cache entries {sm.get('triton_cache_entries_before')} -> "
                     f"{s.get('triton_cache_entries_after')}; skipped backends: {sm.get('skipped') or 'none'}")
        for r in sm.get("failed", [])[:10]:
            lines.append(f"  - FAIL {r['backend']} {r['dtype']} {r['layout']} {r['case']} {r['mode']}: {r['why']}")
    pf = (st.get("profile") or {}).get("figures") or {}
    if pf.get("cases"):
        pk = pf.get("peaks") or {}
        lines.append(f"- profile (training step, device time; copy {_fmt(pk.get('hbm_gbps'), '{:.0f}')} GB/s, "
                     f"matmul {_fmt(pk.get('matmul_tflops'), '{:.0f}')} TFLOP/s measured):")
        for case, byp in pf["cases"].items():
            cells = [f"{p} {_fmt(v['step_us'], '{:.0f}')} us ({_fmt(v['vs_eager_cl'])}x)" for p, v in byp.items()]
            lines.append(f"  - {case}: {'; '.join(cells)}")
        if pf.get("not_run"):
            lines.append(f"  - not run (budget): {', '.join(pf['not_run'])}")
    bf = (st.get("bench") or {}).get("figures") or {}
    if bf.get("comparisons"):
        lines.append("- bench (bf16; images/s; fused = best of triton/cuda; memory = fused / best eager peak):")
        for r in bf["comparisons"]:
            ips = ", ".join(f"{p} {v:.4g}" for p, v in sorted(r["images_per_s"].items()))
            lines.append(f"  - {r['case']} {r['mode']}: vs eager {_fmt(r['vs_eager'])}x, vs compile "
                         f"{_fmt(r['vs_compile'])}x, graphed vs graphed eager {_fmt(r['vs_eager_graphs'])}x, memory "
                         f"{_fmt(r['mem_ratio'])}x | {ips}")
        if bf.get("not_run"):
            lines.append(f"  - not run (budget): {len(bf['not_run'])} measurements")
    sn = st.get("sanitize") or {}
    if sn.get("steps"):
        lines.append("- sanitize: " + ", ".join(
            f"{s['step']} {'cut' if s['cut'] else ('dry-ok' if res.get('dry_run') else 'clean') if s['rc'] == 0 else 'ERRORS (rc %d)' % s['rc']}"
            for s in sn["steps"]))
    ts = (st.get("tests") or {}).get("figures") or {}
    if ts.get("pytest"):
        lines.append(f"- tests: {ts['pytest']}")
    tu = (st.get("tune") or {}).get("figures") or {}
    if tu:
        lines.append(f"- tune: {len(tu.get('winners') or {})} shapes improved, {tu.get('trials')} trials")
    cut = [n for n in res["stage_order"] if str(res["stages"].get(n, {}).get("status", "")).endswith("cut")
           or str(res["stages"].get(n, {}).get("status", "")).startswith("not run")]
    failed = [n for n in res["stage_order"] if "failed" in str(res["stages"].get(n, {}).get("status", ""))]
    lines += ["", "## Cut, not run, failed", "",
              f"- cut or not run: {', '.join(cut) or 'nothing'}", f"- failed: {', '.join(failed) or 'nothing'}",
              "", "Every log and intermediate file: logs.tar.gz (gpu-pass/<stage>.log). Every figure: results.json.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check-args"]:
        return check_args(argv[1:])
    p = argparse.ArgumentParser(prog="gpu_pass.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder the device tool brings back ($OUT)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole pass (default 480)")
    p.add_argument("--dry-run", action="store_true", help="check every stage's command without running it (CPU)")
    p.add_argument("--stages", help=f"comma list, run in the pass's order, resuming an earlier call "
                                    f"(default all: {','.join(s.name for s in STAGES)})")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    selected = None
    if args.stages:
        selected = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in selected if s not in [st.name for st in STAGES]]
        if bad:
            p.error(f"unknown stages {bad}; choose from {', '.join(s.name for s in STAGES)}")
    res = run_pass(args.out, STAGES, args.budget, args.dry_run, selected, resume=selected is not None)
    print(Path(args.out, "summary.md").read_text())
    bad = [n for n, e in res["stages"].items() if "failed" in str(e.get("status"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
