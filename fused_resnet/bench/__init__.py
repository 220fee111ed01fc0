"""Benchmark harness (`fused-resnet bench`): cases, providers, timing, roofline, results and reports."""
