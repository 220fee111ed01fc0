"""Triton backend: the launchers the op layer calls. Kernels live one job per file beside this one."""
from .backward import conv_backward
from .finalize import bn_finalize
from .forward import conv_forward
from .pair import conv_forward_pair
from .postact import bn_add_relu_backward, bn_add_relu_forward
from .stats import channel_stats, stats_partials

__all__ = ["bn_add_relu_backward", "bn_add_relu_forward", "bn_finalize", "channel_stats", "conv_backward",
           "conv_forward", "conv_forward_pair", "stats_partials"]
