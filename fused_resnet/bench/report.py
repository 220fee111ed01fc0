"""Results files and what is made from them: the JSON of a run, benchmarks/RESULTS.md and a PNG chart.

RESULTS.md holds, per device (its newest results file): the speedup of the best fused provider over the
best eager layout and over the best torch.compile mode, per case, mode and dtype; peak-memory ratios;
and where each target of the benchmarks issue stands.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from collections import defaultdict

EAGER = ("eager", "eager_cl")
COMPILE = ("compile", "compile_max")
FUSED = ("triton", "cuda")


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def results_name(env: dict) -> str:
    return f"{slug(env['device'])}-{env['date'].replace('-', '')}-{env['commit']}.json"


def write_results(path: str, env: dict, records: list, meta: dict):
    doc = {**env, "records": records, "meta": meta}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def _groups(records):
    """{(case, kind, mode, dtype): {provider: record}}"""
    out = defaultdict(dict)
    for r in records:
        out[(r["case"], r["kind"], r["mode"], r["dtype"])][r["provider"]] = r
    return out


def _best(by_provider, names):
    rs = [by_provider[n] for n in names if n in by_provider]
    return min(rs, key=lambda r: r["median_ms"]) if rs else None


def _geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def comparisons(records):
    """One row per (case, mode, dtype): best fused vs best eager / best compile, memory ratio."""
    rows = []
    for (case, kind, mode, dtype), byp in _groups(records).items():
        f, e, c = _best(byp, FUSED), _best(byp, EAGER), _best(byp, COMPILE)
        fg, eg = _best(byp, [p + "+graph" for p in FUSED]), _best(byp, [p + "+graph" for p in EAGER])
        mem = None
        if f and e and f["peak_mem_mb"] and e["peak_mem_mb"]:
            mem = f["peak_mem_mb"] / min(byp[p]["peak_mem_mb"] for p in EAGER if p in byp and byp[p]["peak_mem_mb"])
        rows.append({"case": case, "kind": kind, "mode": mode, "dtype": dtype, "fused": f, "eager": e,
                     "compile": c, "compile_max": byp.get("compile_max"), "eager_cl": byp.get("eager_cl"),
                     "vs_eager": e["median_ms"] / f["median_ms"] if f and e else None,
                     "vs_compile": c["median_ms"] / f["median_ms"] if f and c else None,
                     "vs_eager_graphs": eg["median_ms"] / fg["median_ms"] if fg and eg else None,
                     "mem_ratio": mem})
    return rows


def targets(doc):
    """[(target, measured, holds)] for the issue's targets, from bf16 records of one run."""
    rows = [r for r in comparisons(doc["records"]) if r["dtype"] == "bf16"]
    out = []

    def add(name, value, ok, fmt="{:.2f}x"):
        out.append((name, "not measured" if value is None else fmt.format(value),
                    None if value is None else ok(value)))

    for mode, need in (("training", 1.3), ("inference", 1.5)):
        sel = [r for r in rows if r["mode"] == mode and r["kind"] in ("layer", "block")]
        g = _geomean([r["vs_eager"] for r in sel])
        add(f"{mode}: fused >= {need}x best eager (geomean, layers+blocks)", g, lambda v, n=need: v >= n)
        cm = _geomean([r["compile_max"]["median_ms"] / r["fused"]["median_ms"] for r in sel
                       if r["compile_max"] and r["fused"]])
        add(f"{mode}: fused ahead of compile_max (geomean speedup > 1)", cm, lambda v: v > 1.0)
    mem = _geomean([r["mem_ratio"] for r in rows if r["mode"] == "training" and r["kind"] in ("layer", "block")])
    add("training: fused peak memory <= 0.6x eager (geomean)", mem, lambda v: v <= 0.6)
    peaks = doc.get("meta", {}).get("peaks", {}).get("bf16")
    pct = []
    for r in rows:
        f = r["fused"]
        if r["mode"] != "inference" or r["kind"] != "layer" or f is None or f["pct_of_roofline"] is None or not peaks:
            continue
        if _is_memory_bound(f, peaks):
            pct.append(f["pct_of_roofline"])
    add("inference: memory-bound layer cases >= 70% of roofline (worst case)", min(pct) if pct else None,
        lambda v: v >= 70, "{:.0f}%")
    for model, need in (("preact_resnet50", 1.2), ("preact_resnet110", 1.5)):
        sel = [r for r in rows if r["kind"] == "model" and r["mode"] == "training" and r["case"].startswith(model)]
        v = None
        if sel and sel[0]["fused"] and sel[0]["eager_cl"]:
            v = sel[0]["fused"]["images_per_s"] / sel[0]["eager_cl"]["images_per_s"]
        add(f"{model} training images/s >= {need}x eager channels_last AMP", v, lambda x, n=need: x >= n)
    return out


def _is_memory_bound(rec, peaks):
    """Bytes-time is the larger side of the roofline on this device's measured peaks. Recovered from the
    record's own figures: the roofline time equals the bytes-time exactly then (3% slack: rounding)."""
    seconds = rec["median_ms"] * 1e-3
    bytes_time = rec["achieved_gbps"] * seconds / peaks["hbm_gbps"]
    ideal = rec["pct_of_roofline"] / 100 * seconds
    return ideal > 0 and abs(ideal - bytes_time) <= 0.03 * ideal


def _fmt(v, spec="{:.2f}"):
    return "–" if v is None else spec.format(v)


def device_section(doc, chart=None):
    lines = [f"## {doc['device']}", "",
             f"torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}, commit `{doc['commit']}`, "
             f"run {doc['date']}."]
    if not doc.get("meta", {}).get("gpu", True):
        lines.append("**CPU run at interpreter-sized shapes: these are not GPU figures.**")
    peaks = doc.get("meta", {}).get("peaks", {})
    if peaks:
        lines.append("Measured in the same run: " + "; ".join(
            f"{d}: {p['hbm_gbps']:.4g} GB/s copy, {p['matmul_tflops']:.4g} TFLOP/s matmul" for d, p in peaks.items()))
    not_run = doc.get("meta", {}).get("not_run") or []
    if not_run:
        lines.append(f"**{len(not_run)} measurements were not run (time budget spent)**: "
                     + ", ".join(not_run[:20]) + (" ..." if len(not_run) > 20 else ""))
    lines += ["", "### Targets (bf16, geometric means over the cases of this run)", "",
              "| target | measured | holds |", "| --- | --- | --- |"]
    for name, val, ok in targets(doc):
        lines.append(f"| {name} | {val} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
    rows = sorted(comparisons(doc["records"]), key=lambda r: (r["kind"], r["case"], r["mode"], r["dtype"]))
    graphs = any(r["vs_eager_graphs"] is not None for r in rows)
    lines += ["", "### Per case", "",
              "speedup = best eager (NCHW or channels_last) time / best fused (triton or cuda) time; "
              "vs compile = best torch.compile mode / best fused; memory = fused peak / eager peak"
              + ("; graphs = the same speedup with every provider replayed from a CUDA graph (no launch "
                 "overhead on either side)." if graphs else "."), "",
              "| case | mode | dtype | best fused | ms | speedup vs eager | vs compile | memory | % roofline |"
              + (" graphs |" if graphs else ""),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if graphs else "")]
    for r in rows:
        f = r["fused"]
        lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {f['provider'] if f else '–'} | "
                     f"{_fmt(f and f['median_ms'], '{:.4g}')} | {_fmt(r['vs_eager'], '{:.3g}x')} | "
                     f"{_fmt(r['vs_compile'], '{:.3g}x')} | {_fmt(r['mem_ratio'])} | "
                     f"{_fmt(f and f['pct_of_roofline'], '{:.0f}%')} |"
                     + (f" {_fmt(r['vs_eager_graphs'], '{:.3g}x')} |" if graphs else ""))
    if chart:
        lines += ["", f"![speedups]({chart})"]
    return "\n".join(lines) + "\n"


def chart(doc, path):
    """Bar chart of the bf16 speedups (best fused over best eager) per case, both modes. None when
    matplotlib is missing (said so by the caller)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in comparisons(doc["records"]) if r["vs_eager"] is not None]
    dtype = "bf16" if any(r["dtype"] == "bf16" for r in rows) else (rows[0]["dtype"] if rows else "bf16")
    rows = [r for r in rows if r["dtype"] == dtype]
    cases = sorted({r["case"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(cases) + 1.5))
    for j, mode in enumerate(("inference", "training")):
        vals = {r["case"]: r["vs_eager"] for r in rows if r["mode"] == mode}
        ys = [i + 0.4 * j for i in range(len(cases))]
        ax.barh(ys, [vals.get(c, 0) for c in cases], height=0.4, label=mode)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([i + 0.2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_xlabel(f"speedup of best fused over best eager ({dtype}; >1 is faster)")
    ax.set_title(f"{doc['device']} — commit {doc['commit']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def regenerate(results_dir: str, out_md: str):
    """RESULTS.md from the newest results file of each device in results_dir (and a chart per file)."""
    newest = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if "records" not in doc:
            continue
        key = doc["device"]
        if key not in newest or (doc["date"], path) > (newest[key][0]["date"], newest[key][1]):
            newest[key] = (doc, path)
    parts = ["# Benchmark results", "",
             "Generated by `fused-resnet bench` from the JSON files in `benchmarks/results/` (newest per device). "
             "Every figure below was measured; nothing is estimated.", ""]
    if not newest:
        parts.append("No GPU results yet: no run has been made on a GPU. See benchmarks/NOTES.md.\n")
    for doc, path in newest.values():
        png = os.path.splitext(path)[0] + ".png"
        made = chart(doc, png)
        rel = os.path.relpath(made, os.path.dirname(os.path.abspath(out_md))) if made else None
        parts.append(device_section(doc, rel))
    with open(out_md, "w") as f:
        f.write("\n".join(parts))
    return out_md
