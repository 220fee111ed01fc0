"""pytest-benchmark suite setup: the Triton interpreter when there is no GPU (set before triton loads)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
