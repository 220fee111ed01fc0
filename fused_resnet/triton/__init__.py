"""Triton backend: the launchers the op layer calls. Kernels live one job per file beside this one."""
from .dgrad import conv_dgrad_bn
from .forward import conv_forward
from .stats import channel_stats
from .wgrad import conv_wgrad

__all__ = ["channel_stats", "conv_forward", "conv_dgrad_bn", "conv_wgrad"]
