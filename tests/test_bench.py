"""The benchmark harness end to end on the CPU (tiny shapes, interpreter): the results format the issue
fixes, that a CPU run never lands in benchmarks/results, the report, and the roofline/target arithmetic."""
import json
import math
import os

import pytest
import torch

from fused_resnet.bench import cases as C
from fused_resnet.bench import report
from fused_resnet.bench.__main__ import main as bench_main
from fused_resnet.bench.roofline import layer_cost, roofline_fraction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_KEYS = {"device", "torch", "triton", "cuda", "commit", "date", "records"}
RECORD_KEYS = {"case", "kind", "mode", "dtype", "layout", "provider", "median_ms", "p20_ms", "p80_ms",
               "images_per_s", "peak_mem_mb", "achieved_gbps", "pct_of_roofline", "graph"}
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU harness checks; the GPU pass runs the real one")


def _listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One tiny CPU run of every kind, both modes, with the providers that run here."""
    tmp = tmp_path_factory.mktemp("bench")
    before = _listing(os.path.join(REPO, "benchmarks", "results"))
    out = tmp / "results"
    rc = bench_main(["--quick", "--providers", "eager,eager_cl,triton", "--reps", "2", "--warmup", "1",
                     "--kinds", "layer,block", "--out", str(out), "--json", str(tmp / "cpu.json")])
    assert rc == 0
    rc = bench_main(["--providers", "eager,eager_cl", "--reps", "1", "--warmup", "0", "--kinds", "model",
                     "--out", str(out), "--json", str(tmp / "cpu-model.json")])
    assert rc == 0
    assert not out.exists(), "a CPU run must not write into the results folder"
    assert _listing(os.path.join(REPO, "benchmarks", "results")) == before
    docs = [json.loads((tmp / n).read_text()) for n in ("cpu.json", "cpu-model.json")]
    return tmp, docs


def test_results_format(cpu_run):
    _, docs = cpu_run
    for doc in docs:
        assert TOP_KEYS <= set(doc)
        assert doc["meta"]["gpu"] is False
        assert doc["device"].startswith("CPU")
        assert doc["date"].count("-") == 2 and len(doc["commit"]) >= 7
        for r in doc["records"]:
            assert set(r) == RECORD_KEYS
            assert r["kind"] in ("layer", "block", "model") and r["mode"] in ("training", "inference")
            assert r["dtype"] == "fp32" and r["layout"] in ("nchw", "channels_last")
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["median_ms"] > 0
            assert math.isclose(r["images_per_s"], C.tiny(_case(r["case"])).n / (r["median_ms"] * 1e-3), rel_tol=1e-4)
            assert r["kind"] != "layer" or r["achieved_gbps"] > 0
            assert r["peak_mem_mb"] is None  # not tracked off the GPU, so not reported
            assert (r["pct_of_roofline"] is not None) == (r["kind"] == "layer")
    layer = docs[0]["records"]
    got = {(r["case"], r["mode"], r["provider"]) for r in layer}
    want = {(C.tiny(c).name, m, p) for c in C.preset("quick", ("layer", "block"))
            for m in ("inference", "training") for p in ("eager", "eager_cl", "triton")}
    assert got == want, "every (case, mode, provider) of the run has exactly one record"
    assert {r["case"] for r in docs[1]["records"]} == {"tiny-preact_resnet20-8px"}


def _case(name):
    return next(c for c in C.FULL + C.MODELS if C.tiny(c).name == name)


def test_cpu_json_refused_inside_results(tmp_path, capsys):
    out = tmp_path / "results"
    rc = bench_main(["--providers", "eager", "--kinds", "layer", "--modes", "inference", "--reps", "1",
                     "--warmup", "0", "--out", str(out), "--json", str(out / "x.json")])
    assert rc == 2 and "refusing" in capsys.readouterr().err
    assert not (out / "x.json").exists()


def test_bad_arguments_fail_before_measuring(capsys):
    with pytest.raises(SystemExit):
        bench_main(["--providers", "eager,nope"])
    assert "choose from" in capsys.readouterr().err
    assert bench_main(["--reps", "0", "--providers", "eager"]) == 2


def test_time_budget_lists_what_was_not_run(tmp_path):
    rc = bench_main(["--providers", "eager", "--kinds", "layer", "--modes", "inference", "--reps", "1",
                     "--warmup", "0", "--time-budget", "1e-9", "--out", str(tmp_path / "r"),
                     "--json", str(tmp_path / "b.json")])
    doc = json.loads((tmp_path / "b.json").read_text())
    assert rc == 0 and doc["records"] == []
    assert len(doc["meta"]["not_run"]) == len(C.preset("quick", ("layer",)))
    assert "not run (time budget spent)" in report.device_section(doc)


def test_report_from_a_run(cpu_run, tmp_path):
    tmp, docs = cpu_run
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu.json").write_text(json.dumps(docs[0]))
    md = report.regenerate(str(results), str(tmp_path / "RESULTS.md"))
    text = open(md).read()
    assert "not GPU figures" in text and "| target | measured | holds |" in text
    assert (results / "cpu.png").stat().st_size > 1000
    for r in report.comparisons(docs[0]["records"]):
        assert f"| {r['case']} | {r['mode']} | fp32 | triton |" in text
        assert math.isclose(r["vs_eager"], min(r["eager"]["median_ms"], r["eager_cl"]["median_ms"])
                            / r["fused"]["median_ms"])


def test_empty_results_say_so(tmp_path):
    (tmp_path / "results").mkdir()
    text = open(report.regenerate(str(tmp_path / "results"), str(tmp_path / "RESULTS.md"))).read()
    assert "No GPU results yet" in text


def test_layer_cost_by_hand():
    case = C.Case("x", "layer", n=2, c=3, k=5, h=8, kernel=3, stride=2, residual=True)
    assert case.out_h == 4
    x, w, y = 2 * 3 * 64, 5 * 3 * 9, 2 * 5 * 16
    nbytes, flops = layer_cost(case, "inference", 2)
    assert nbytes == 2 * (x + w + 2 * y) and flops == 2 * y * 3 * 9
    nbytes, flops = layer_cost(case, "training", 4)
    assert nbytes == 4 * (x + w + 2 * y + x + (y + x + w) + (x + w)) and flops == 3 * 2 * y * 3 * 9
    peaks = {"hbm_gbps": 1000.0, "matmul_tflops": 1e-3}  # 1 GFLOP/s: this tiny case is compute bound
    gbps, pct = roofline_fraction(case, "inference", 2, 1.0, peaks)
    assert math.isclose(gbps, 2 * (x + w + 2 * y) / 1e-3 / 1e9)
    assert math.isclose(pct, 100 * (2 * y * 27 / 1e9) / 1e-3)


def _rec(case, kind, mode, provider, ms, mem=None, n=256):
    return {"case": case, "kind": kind, "mode": mode, "dtype": "bf16", "layout": "channels_last",
            "provider": provider, "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "images_per_s": n / ms * 1e3,
            "peak_mem_mb": mem, "achieved_gbps": None, "pct_of_roofline": None}


def test_targets_arithmetic():
    recs = []
    for case, speed in (("a", 4.0), ("b", 1.0)):  # fused 4x and 1x faster than the best eager: geomean 2x
        for mode in ("training", "inference"):
            recs += [_rec(case, "layer", mode, "eager", 3.0 * speed, 100), _rec(case, "layer", mode, "eager_cl", 1.0 * speed, 50),
                     _rec(case, "layer", mode, "compile_max", 1.0, 80), _rec(case, "layer", mode, "triton", 1.0, 20)]
    recs += [_rec("preact_resnet110-32px", "model", "training", "eager_cl", 2.0),
             _rec("preact_resnet110-32px", "model", "training", "triton", 1.5)]
    got = {name: (val, ok) for name, val, ok in report.targets({"records": recs})}
    assert got["training: fused >= 1.3x best eager (geomean, layers+blocks)"] == ("2.00x", True)
    assert got["inference: fused ahead of compile_max (geomean speedup > 1)"] == ("1.00x", False)
    assert got["training: fused peak memory <= 0.6x eager (geomean)"] == ("0.40x", True)
    assert got["preact_resnet110 training images/s >= 1.5x eager channels_last AMP"] == ("1.33x", False)
    assert got["preact_resnet50 training images/s >= 1.2x eager channels_last AMP"] == ("not measured", None)


def test_graphs_need_a_gpu(capsys):
    assert bench_main(["--graphs", "--providers", "eager", "--kinds", "layer"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_graph_variants_reach_the_records_and_the_report(monkeypatch):
    """--graphs plumbing on the CPU: capture itself needs a GPU, so timing.graphed is replaced by the
    plain step here; what is checked is that every provider gets a '+graph' twin and that the report
    compares fused and eager replays with each other (the GPU pass runs the capture for real)."""
    from fused_resnet.bench import run as R
    from fused_resnet.bench import timing

    monkeypatch.setattr(timing, "graphed", lambda fn, n, device: fn)
    cases = [C.tiny(C.CIFAR_LAYERS[0])]
    records, _, _ = R.run(cases, ["eager_cl", "triton"], ["training"], ["fp32"], torch.device("cpu"), 0, 1,
                          graphs=True)
    assert {(r["provider"], r["graph"]) for r in records} == {
        ("eager_cl", False), ("eager_cl+graph", True), ("triton", False), ("triton+graph", True)}
    (row,) = report.comparisons(records)
    by = {r["provider"]: r for r in records}
    assert math.isclose(row["vs_eager_graphs"], by["eager_cl+graph"]["median_ms"] / by["triton+graph"]["median_ms"])
    doc = {"device": "CPU", "torch": "", "triton": "", "cuda": None, "commit": "x", "date": "2026-11-22",
           "records": records, "meta": {"gpu": False}}
    assert "graphs |" in report.device_section(doc)


def test_cpu_quick_run_is_short_and_says_so(tmp_path, capsys):
    """`fused-resnet bench --quick` with its defaults on a CPU: an up-front estimate of about two minutes
    or less, a progress line per measurement when output is not a terminal, done in about that time,
    and no columns that mean nothing on a CPU."""
    import re
    import time

    t0 = time.monotonic()
    assert bench_main(["--quick", "--json", str(tmp_path / "q.json")]) == 0
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    estimate = float(re.search(r"estimated (\d+) s", out).group(1))
    total = int(re.search(r"(\d+) measurements; estimated", out).group(1))
    assert estimate <= 120 and elapsed <= 180, (estimate, elapsed)
    assert f"[{total}/{total}," in out  # one progress line per measurement
    assert "roofline" not in out and "peak MiB" not in out
