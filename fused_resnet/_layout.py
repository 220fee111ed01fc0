"""Memory-format rule shared by every backend and by the fake (meta) implementations."""
import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plain contiguous), else contiguous.

    This is the rule PyTorch's conv follows for its output (suggest_memory_format), so outputs and
    gradients come back in the layout the caller used.
    """
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
