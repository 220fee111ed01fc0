"""fused_resnet: fused BN -> ReLU -> Conv2d (+ residual) for pre-activation ResNets."""
from . import models, reference
from .backends import available_backends
from .convert import convert
from .functional import bn_add_relu, bn_relu_conv2d, bn_relu_conv2d_pair
from .nn import FusedBNReLUConv2d, FusedBNReLUConv2dPair, PreActBlock, PreActBottleneck
from .nn_postact import PostActBlock, PostActBottleneck, fused_bn_add_relu
from .sync_bn import SyncBatchNorm2d, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = ["FusedBNReLUConv2d", "FusedBNReLUConv2dPair", "PostActBlock", "PostActBottleneck", "PreActBlock",
           "PreActBottleneck", "SyncBatchNorm2d", "available_backends", "bn_add_relu", "bn_relu_conv2d",
           "fused_bn_add_relu", "bn_relu_conv2d_pair", "convert", "convert_sync_batchnorm", "models", "reference", "__version__"]
