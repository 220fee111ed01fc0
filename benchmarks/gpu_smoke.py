"""The GPU pass's smoke parity subset (stage `smoke` of benchmarks/gpu_pass.sh): the fused op against a float64
reference run of the same inputs, before anything is timed.

  python benchmarks/gpu_smoke.py --json OUT.json [--backends triton,cuda] [--dtypes bf16,fp32]
                                 [--layouts nhwc,nchw] [--cases cifar,r50] [--tiny]

Per backend x dtype x layout x case x mode (training: forward + backward of y, dx, dW, dgamma, dbeta;
eval: forward): the largest error relative to the reference's largest magnitude, next to eager PyTorch's
error at the same dtype (the yardstick: a fused error within 4x eager's, or under the dtype's floor,
passes). Cases: a CIFAR layer (16 -> 16 channels, 32 px, residual) and a ResNet-50 layer (3x3, 64 -> 64,
56 px) at small batches, so the whole matrix takes about a minute on a GPU. TF32 is off (fp32 is IEEE).

The first call of each combination is timed apart from the second: on a GPU the difference is mostly
Triton's JIT compile (and the extension's first launch); the JSON's `first_call_s` / `second_call_s` and the
summary's `compile_s` carry it, with the Triton cache folder's entry count before and after.

Rows are written to --json as they finish (a cut run keeps what it did). Exit status 1 on any failure.
--tiny: interpreter-sized shapes on the CPU (Triton interpreter / emulated CUDA build): the plumbing only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# (name, N, C, K, H, kernel, stride, residual); tiny: the same structure at interpreter size
CASES = {"cifar": ("cifar-s1-c16-32px", 8, 16, 16, 32, 3, 1, True),
         "r50": ("r50-3x3-c64-56px", 4, 64, 64, 56, 3, 1, False)}
TINY = {"cifar": ("tiny-cifar-s1-c4-6px", 2, 4, 4, 6, 3, 1, True),
        "r50": ("tiny-r50-3x3-c5-6px", 2, 5, 6, 6, 3, 1, False)}
# Below this relative error a result passes whatever eager's error is (eager's own can be ~0 in fp32).
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _csv(choices):
    def parse(s):
        vals = [v.strip() for v in s.split(",") if v.strip()]
        if not vals or any(v not in choices for v in vals):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {s!r})")
        return vals
    return parse


def _inputs(case, dtype, device, channels_last, seed):
    _, n, c, k, h, ks, stride, residual = case
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    oh = (h + 2 * (ks // 2) - ks) // stride + 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return dict(x=rnd(n, c, h, h).contiguous(memory_format=fmt),
                w=rnd(k, c, ks, ks, scale=(c * ks * ks) ** -0.5).contiguous(memory_format=fmt),
                gamma=(torch.rand(c, generator=g) + 0.5).to(device),
                beta=(torch.randn(c, generator=g) * 0.3).to(device),
                r=rnd(n, k, oh, oh).contiguous(memory_format=fmt) if residual else None,
                gy=rnd(n, k, oh, oh).contiguous(memory_format=fmt))


def _run(impl, t, case, training, backend=None):
    """(outputs as float64): y, and in training dx, dW, dgamma, dbeta."""
    import torch.nn.functional as F

    import fused_resnet
    from fused_resnet import reference

    _, _, c, _, _, ks, stride, _ = case
    leaves = [t[k].detach().clone().requires_grad_(training) for k in ("x", "w", "gamma", "beta")]
    x, w, gamma, beta = leaves
    rm = torch.zeros(c, device=x.device, dtype=gamma.dtype)
    rv = torch.ones(c, device=x.device, dtype=gamma.dtype)
    if impl == "eager":
        y = F.conv2d(F.relu(F.batch_norm(x, rm, rv, gamma, beta, training, 0.1, 1e-5)), w, None, stride, ks // 2)
        y = y if t["r"] is None else y + t["r"]
    else:
        fn = fused_resnet.bn_relu_conv2d if impl == "fused" else reference.bn_relu_conv2d
        kw = {"backend": backend} if impl == "fused" else {}
        y = fn(x, w, None, stride=stride, padding=ks // 2, residual=t["r"], bn_weight=gamma, bn_bias=beta,
               running_mean=rm, running_var=rv, training=training, **kw)
    if not training:
        return [y.detach().double()]
    torch.autograd.backward(y, t["gy"])
    return [y.detach().double()] + [v.grad.double() for v in leaves]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_entries():
    d = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return len(os.listdir(d))
    except OSError:
        return 0


def one(backend, dname, layout, case, training, device, seed=0):
    dtype = DTYPES[dname]
    t = _inputs(case, dtype, device, layout == "nhwc", seed)
    t64 = {k: (v.double() if v is not None else None) for k, v in t.items()}
    want = _run("reference", t64, case, training)
    base = _run("eager", t, case, training)
    _sync(device)
    t0 = time.perf_counter()
    got = _run("fused", t, case, training, backend)
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    got2 = _run("fused", t, case, training, backend)
    _sync(device)
    second = time.perf_counter() - t0
    names = ("y", "dx", "dw", "dgamma", "dbeta")
    errs, eager, bad = {}, {}, []
    for name, a, a2, e, b in zip(names, got, got2, base, want):
        errs[name], eager[name] = _rel(a, b), _rel(e, b)
        limit = max(FLOOR[dtype], 4 * eager[name])
        if not errs[name] <= limit:  # NaN fails
            bad.append(f"{name} {errs[name]:.2e} > {limit:.1e}")
        if not torch.equal(a, a2) and not _rel(a2, b) <= limit:
            bad.append(f"{name} second call {_rel(a2, b):.2e} > {limit:.1e}")
    return {"backend": backend, "dtype": dname, "layout": layout, "case": case[0],
            "mode": "training" if training else "eval", "err": errs, "eager_err": eager,
            "first_call_s": round(first, 4), "second_call_s": round(second, 4), "ok": not bad, "why": "; ".join(bad)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_smoke.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="write the rows here (rewritten after every row)")
    p.add_argument("--backends", type=_csv(("triton", "cuda")), default=["triton", "cuda"])
    p.add_argument("--dtypes", type=_csv(tuple(DTYPES)), default=["bf16", "fp32"])
    p.add_argument("--layouts", type=_csv(("nhwc", "nchw")), default=["nhwc", "nchw"])
    p.add_argument("--cases", type=_csv(tuple(CASES)), default=list(CASES))
    p.add_argument("--modes", type=_csv(("training", "eval")), default=["training", "eval"])
    p.add_argument("--tiny", action="store_true", help="interpreter-sized shapes on the CPU (plumbing only)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        p.error("no CUDA GPU here: the real shapes need one (--tiny runs the plumbing on the CPU)")
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if gpu else "cpu")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    import fused_resnet

    report = fused_resnet.available_backends()
    table = TINY if args.tiny else CASES
    doc = {"gpu": gpu, "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
           "rows": [], "skipped": {}, "triton_cache_entries_before": _cache_entries()}

    def write():
        rows = doc["rows"]
        doc["summary"] = {"rows": len(rows), "failed": sum(not r["ok"] for r in rows),
                          "first_call_s": round(sum(r["first_call_s"] for r in rows), 2),
                          "second_call_s": round(sum(r["second_call_s"] for r in rows), 2),
                          "compile_s": round(sum(max(0.0, r["first_call_s"] - r["second_call_s"])
                                                 for r in rows if r["backend"] == "triton"), 2),
                          "triton_cache_entries_after": _cache_entries()}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.json)

    for backend in args.backends:
        if backend not in report:
            doc["skipped"][backend] = report.unavailable.get(backend, "unavailable")
            print(f"{backend}: skipped ({doc['skipped'][backend]})", flush=True)
            continue
        for dname in args.dtypes:
            for layout in args.layouts:
                for cname in args.cases:
                    for mode in args.modes:
                        try:
                            row = one(backend, dname, layout, table[cname], mode == "training", device)
                        except Exception as e:  # noqa: BLE001 - one broken combination must not hide the rest
                            row = {"backend": backend, "dtype": dname, "layout": layout, "case": table[cname][0],
                                   "mode": mode, "err": {}, "eager_err": {}, "first_call_s": 0.0,
                                   "second_call_s": 0.0, "ok": False, "why": f"{type(e).__name__}: {str(e)[:300]}"}
                        doc["rows"].append(row)
                        write()
                        worst = max(row["err"].values(), default=float("nan"))
                        print(f"{backend} {dname} {layout} {row['case']} {mode}: "
                              f"{'ok' if row['ok'] else 'FAIL ' + row['why']} (max rel err {worst:.1e}; first call "
                              f"{row['first_call_s']:.2f}s, second {row['second_call_s']:.3f}s)", flush=True)
    write()
    s = doc["summary"]
    print(f"smoke: {s['rows'] - s['failed']}/{s['rows']} ok; first calls {s['first_call_s']}s, Triton compile "
          f"(first - second call) {s['compile_s']}s; skipped: {doc['skipped'] or 'none'}")
    return 1 if s["failed"] or not s["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
