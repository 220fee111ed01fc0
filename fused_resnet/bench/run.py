"""The benchmark run: every (case, mode, dtype, provider) measured in one process, one record each."""
from __future__ import annotations

import datetime
import gc
import os
import platform
import subprocess
import time
import warnings

import torch

from .cases import Case
from .providers import FUSED, Runner
from .roofline import device_peaks, roofline_fraction
from . import timing
from .timing import measure, peak_memory_mb

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("inference", "training")


def commit():
    """The commit of the code that runs: the checkout's, when the package is imported from one (an
    editable install or the source tree), else the one recorded at build time (setup.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        toplevel = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=here, text=True,
                                           stderr=subprocess.DEVNULL).strip()
        mine = os.path.join(toplevel, "fused_resnet", "bench", "run.py")
        if os.path.exists(mine) and os.path.samefile(mine, __file__):  # this file is the checkout's own
            return rev
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        from .._build_info import COMMIT
    except ImportError:
        return "unknown"
    return COMMIT or "unknown"


def environment(device: torch.device):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "commit": commit(), "date": datetime.date.today().isoformat()}


def provider_status(providers, device):
    """(runnable providers, {skipped provider: why}) on this device."""
    from ..backends import available_backends

    report = available_backends()
    ok, skipped = [], {}
    for p in providers:
        if p in FUSED and p not in report:
            skipped[p] = report.unavailable.get(p, "unavailable")
        else:
            ok.append(p)
    return ok, skipped


def run(cases, providers, modes, dtypes, device, warmup, reps, progress=None, log=print, deadline=None,
        graphs=False, on_record=None):
    """Returns (records, peaks, not_run). A provider that fails on a case is logged and left out, not
    guessed; once time.monotonic() passes `deadline`, the remaining measurements are listed in not_run.
    graphs: every provider is also timed as CUDA-graph replay (provider name "<provider>+graph").
    on_record(records, peaks): called after each new record (the GPU pass writes partial results with it)."""
    peaks = {d: device_peaks(device, DTYPES[d]) for d in dtypes}
    records, not_run = [], []
    jobs = [(c, m, d) for d in dtypes for c in cases for m in modes]  # dtype-major: a spent budget cuts the last dtype
    variants = [(p, g) for p in providers for g in ((False, True) if graphs else (False,))]
    for case, mode, dname in jobs:
        for provider, graph in variants:
            if deadline is not None and time.monotonic() > deadline:
                not_run.append(f"{case.name} {mode} {dname} {provider}{'+graph' if graph else ''}")
                if progress is not None:
                    progress.update(1)
                continue
            if progress is not None:
                progress.set_postfix_str(f"{case.name} {mode} {dname} {provider}"[:60])
            try:
                rec = measure_one(case, provider, mode, dname, device, warmup, reps, peaks[dname], graph)
            except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
                log(f"  {case.name} {mode} {dname} {provider}{'+graph' if graph else ''}: FAILED "
                    f"({type(e).__name__}: {str(e)[:200]})")
                rec = None
            if rec is not None:
                records.append(rec)
                if on_record is not None:
                    on_record(records, peaks)
            if progress is not None:
                progress.update(1)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records, peaks, not_run


def _sig(v: float, digits: int = 5) -> float:
    """Rounded to significant digits, not decimals: tiny CPU figures must not round to 0."""
    return float(f"{v:.{digits}g}")


def measure_one(case: Case, provider: str, mode: str, dname: str, device, warmup, reps, peaks, graph=False):
    dtype = DTYPES[dname]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = Runner(case, provider, mode, dtype, device)
        mem = peak_memory_mb(runner.step, device)
        runner.fill_rotation()
        step = timing.graphed(runner.step, len(runner.inputs), device) if graph else runner.step
        t = measure(step, len(runner.inputs), device, warmup=warmup, reps=reps)
    rec = {"case": case.name, "kind": case.kind, "mode": mode, "dtype": dname, "layout": runner.layout,
           "provider": provider + ("+graph" if graph else ""), "graph": graph, **{k: _sig(v) for k, v in t.items()},
           "images_per_s": _sig(case.n / (t["median_ms"] * 1e-3)),
           "peak_mem_mb": None if mem is None else round(mem, 1), "achieved_gbps": None, "pct_of_roofline": None}
    if case.kind == "layer":
        gbps, pct = roofline_fraction(case, mode, torch.empty((), dtype=dtype).element_size(), t["median_ms"], peaks)
        rec["achieved_gbps"], rec["pct_of_roofline"] = _sig(gbps, 4), _sig(pct, 4)
    return rec
