"""fused_resnet: fused BN -> ReLU -> Conv2d (+ residual) for pre-activation ResNets."""
from . import reference
from .backends import available_backends
from .functional import bn_relu_conv2d

__version__ = "0.1.0"

__all__ = ["available_backends", "bn_relu_conv2d", "reference", "__version__"]
