"""Per-op microbenchmarks (pytest-benchmark): one BN -> ReLU -> Conv(+residual) layer per case, every
provider, inference and training, bf16 on a GPU.

  pytest benchmarks/test_microbench.py                       # on a GPU: the --full layer cases
  pytest benchmarks/test_microbench.py --benchmark-json=out.json

Each round is one step on the next of several rotating input sets, synchronized so the time is the
GPU's. Without a GPU the cases shrink to interpreter size and the figures are CPU figures, useful only
to check that the suite runs. `fused-resnet bench` is the harness that writes results files; this
suite is for quick A/B comparisons of a kernel change (`--benchmark-compare`).
"""
import pytest
import torch

from fused_resnet.backends import available_backends
from fused_resnet.bench import cases as C
from fused_resnet.bench.providers import PROVIDERS, Runner

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
LAYERS = C.preset("full", ("layer",)) if GPU else [C.tiny(c) for c in C.preset("quick", ("layer",))]
DTYPE = torch.bfloat16 if GPU else torch.float32
# compile_max autotunes for minutes per shape: run it with `fused-resnet bench --full`, not here.
BENCH_PROVIDERS = [p for p in PROVIDERS if p != "compile_max" and (GPU or p in ("eager", "eager_cl", "triton"))]


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
@pytest.mark.parametrize("case", LAYERS, ids=lambda c: c.name)
def test_layer(benchmark, case, provider, mode):
    report = available_backends()
    if provider in ("triton", "cuda") and provider not in report:
        pytest.skip(f"{provider}: {report.unavailable[provider]}")
    runner = Runner(case, provider, mode, DTYPE, DEVICE)
    runner.fill_rotation()
    n = len(runner.inputs)
    calls = iter(range(1 << 30))

    def step():
        runner.step(next(calls) % n)
        if GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(case=case.name, provider=provider, mode=mode, dtype=str(DTYPE),
                                layout=runner.layout, device=torch.cuda.get_device_name() if GPU else "cpu")
    benchmark.pedantic(step, rounds=30 if GPU else 2, warmup_rounds=5 if GPU else 1, iterations=1)
