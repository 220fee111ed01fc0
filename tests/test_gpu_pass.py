"""benchmarks/gpu_pass.py (the GPU pass's orchestration), on the CPU: the deadline logic with stages that
overrun (one ignoring SIGTERM), the 8 files / 2 levels rule of what the device tool brings back, summary.md
naming every stage, resuming with --stages, the argument checks of the dry run, and the dry run itself."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gp():
    spec = importlib.util.spec_from_file_location("gpu_pass", ROOT / "benchmarks" / "gpu_pass.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_pass"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _files(out):
    return sorted(p.relative_to(out) for p in Path(out).rglob("*") if p.is_file())


def _py(code):
    return [sys.executable, "-c", code]


def test_an_overrunning_stage_is_cut_and_the_pass_ends_in_time(tmp_path, monkeypatch):
    gp = _gp()
    monkeypatch.setattr(gp, "GRACE_S", 1.0)
    out, work = tmp_path / "OUT", tmp_path / "work"
    pidfile = tmp_path / "hog.pid"
    # ignores the polite signal: only the SIGKILL after the grace ends it
    hog = _py(f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    many = _py(f"import os; [os.makedirs({str(out)!r} + '/a/b/c', exist_ok=True)]; "
               f"[open({str(out)!r} + f'/a/b/c/f{{i}}.txt', 'w').write('x') for i in range(6)]; "
               f"[open({str(out)!r} + f'/x{{i}}.txt', 'w').write('x') for i in range(6)]")
    stages = [
        gp.Stage("quick", 1, "returns at once", lambda ctx, share: [gp.Step("q", _py("print('quick')"))], min_s=0.5),
        gp.Stage("hog", 1, "overruns its share", lambda ctx, share: [gp.Step("h", hog)], min_s=0.5),
        gp.Stage("fails", 1, "exits 3", lambda ctx, share: [gp.Step("f", _py("raise SystemExit(3)"))], min_s=0.5),
        gp.Stage("many_files", 1, "leaves 12 files in OUT, some 4 levels down",
                 lambda ctx, share: [gp.Step("m", many)], min_s=0.5),
        gp.Stage("leftover", 0, "weight 0: only what the others left", lambda ctx, share: [gp.Step("l", _py("0"))],
                 min_s=0.5),
        gp.Stage("unselected", 1, "not asked for", lambda ctx, share: [gp.Step("u", _py("0"))]),
    ]
    budget = 12.0
    t0 = time.monotonic()
    res = gp.run_pass(out, stages, budget=budget, selected=["quick", "hog", "fails", "many_files", "leftover"],
                      work=work)
    elapsed = time.monotonic() - t0
    assert elapsed <= budget + 2, elapsed  # the rule is budget + 30 s; this pass must not come near it
    st = res["stages"]
    assert st["quick"]["status"] == "ok"
    assert st["hog"]["status"] == "cut" and st["hog"]["seconds"] < budget
    # its share: a third of what was left (three weighted stages to go), then the grace
    assert st["hog"]["seconds"] <= st["hog"]["share_s"] + gp.GRACE_S + 1
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
    assert st["fails"]["status"] == "failed" and st["fails"]["steps"][0]["rc"] == 3
    assert st["many_files"]["status"] == "ok"
    assert st["unselected"]["status"] == "not selected"
    assert st["leftover"]["status"] in ("ok", "not run (no time left)")
    # what comes back: at most 8 files, at most 2 folders down; the rest went into logs.tar.gz
    files = _files(out)
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    assert {"summary.md", "results.json", "logs.tar.gz"} <= {str(f) for f in files}
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu-pass/extra/a/b/c/f5.txt" in names and "gpu-pass/extra/x0.txt" in names and "gpu-pass/hog.log" in names
    summary = (out / "summary.md").read_text()
    for s in stages:
        assert f"| {s.name} |" in summary
    assert "cut or not run: hog" in summary and "failed: fails" in summary
    assert json.loads((out / "results.json").read_text())["finished"] is True

    # --stages resumes: the earlier call's entries stay, the chosen stage runs again
    out2 = tmp_path / "OUT2"
    res2 = gp.run_pass(out2, stages, budget=5.0, selected=["quick"], work=work, resume=True)
    assert res2["stages"]["quick"]["status"] == "ok" and "earlier_call" not in res2["stages"]["quick"]
    assert res2["stages"]["hog"]["status"] == "cut" and res2["stages"]["hog"]["earlier_call"]
    assert "cut (earlier call)" in (out2 / "summary.md").read_text()


def test_the_budget_holds_when_every_stage_overruns(tmp_path, monkeypatch):
    gp = _gp()
    monkeypatch.setattr(gp, "GRACE_S", 1.0)
    sleeper = lambda ctx, share: [gp.Step("s", _py("import time; time.sleep(600)"))]  # noqa: E731
    stages = [gp.Stage(f"s{i}", w, "sleeps", sleeper, floor_s=f, min_s=0.5)
              for i, (w, f) in enumerate([(1, 0), (5, 6), (1, 0), (0, 0)])]
    t0 = time.monotonic()
    res = gp.run_pass(tmp_path / "OUT", stages, budget=8.0, work=tmp_path / "w")
    assert time.monotonic() - t0 <= 8.0 + 2
    assert [res["stages"][s.name]["status"] for s in stages][:2] == ["cut", "cut"]
    assert res["stages"]["s1"]["share_s"] <= 8.0  # the floor never goes past what is left


@pytest.mark.parametrize("args,rc", [(["--out", "x", "--time-budget", "30"], 0), (["--out", "x", "--bogus"], 2),
                                     (["--time-budget", "30"], 2)])
def test_check_args_fails_on_arguments_the_entry_point_rejects(args, rc):
    r = subprocess.run([sys.executable, "benchmarks/gpu_pass.py", "--check-args", "--", "-m",
                        "fused_resnet.bench.profile"] + args, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == rc, r.stdout + r.stderr
    if rc == 0:
        assert "arguments parse" in r.stdout


def test_dry_run_of_the_whole_pass(tmp_path):
    """Every stage's real command line checked (entry points parse their arguments, pytest's options, a tiny
    CPU run of the smoke script), through gpu_pass.sh as the device call runs it."""
    gp = _gp()
    out = tmp_path / "OUT"
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", "benchmarks/gpu_pass.sh", str(out), "--dry-run", "--budget", "400"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=460)
    res = json.loads((out / "results.json").read_text())
    bad = {n: e for n, e in res["stages"].items() if e["status"] not in ("ok", "dry-ok")}
    if bad:
        with tarfile.open(out / "logs.tar.gz") as tar:
            logs = {m.name: tar.extractfile(m).read().decode()[-1500:] for m in tar.getmembers() if m.name.endswith(".log")}
        pytest.fail(f"{bad}\n{logs}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for s in gp.STAGES:
        assert f"| {s.name} |" in summary
    files = _files(out)
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
