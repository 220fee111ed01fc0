"""Forward and every gradient of each backend vs the reference, over a matrix of configurations."""

import pytest
import torch

from helpers import Case, check_against_oracle

# (kernel, stride, padding, dilation): 1x1, 3x3, 7x7 stem-like, strided, dilated, asymmetric kernels,
# string paddings.
GEOMETRIES = [
    ((1, 1), 1, 0, 1),
    ((1, 1), 2, 0, 1),
    ((3, 3), 1, 1, 1),
    ((3, 3), 2, 1, 1),
    ((3, 3), 1, 2, 2),
    ((7, 7), 2, 3, 1),
    ((3, 1), (2, 1), (1, 0), 1),
    ((2, 3), 1, "same", (1, 2)),
    ((3, 3), 1, "valid", 1),
]


def _gid(g):
    return "k{}x{}-s{}-p{}-d{}".format(g[0][0], g[0][1], g[1], g[2], g[3]).replace(" ", "")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_gid)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("extras", [(False, False, False), (True, True, False), (True, False, True)],
                         ids=["plain", "bias+residual", "bias+channels_last"])
def test_matrix_float32(backend, device, geometry, training, extras):
    kernel, stride, padding, dilation = geometry
    bias, residual, channels_last = extras
    case = Case(n=2, c=3, h=9, w=7, k=5, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                bias=bias, residual=residual, training=training, channels_last=channels_last)
    check_against_oracle(case, torch.float32, backend, device, seed=hash((geometry, training, extras)) % 2**31)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("geometry", [((3, 3), 1, 1, 1, True), ((1, 1), 2, 0, 1, False)], ids=["3x3-cl", "1x1s2-nchw"])
def test_identity_activation(backend, device, dtype, training, geometry):
    """activation="identity" (BN -> conv, no ReLU): forward, every gradient and the running statistics."""
    kernel, stride, padding, dilation, channels_last = geometry
    case = Case(n=2, c=5, h=7, w=6, k=6, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                residual=True, training=training, channels_last=channels_last, activation="identity")
    check_against_oracle(case, dtype, backend, device, seed=23 + training + 2 * channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_identity_activation_at_tensor_core_shapes(backend, device, training):
    """Where a ReLU layer would take the CUDA backend's mma.sync kernels (channels_last bf16, C and K
    multiples of 8), the identity activation takes the WMMA kernels (csrc/kernels/mma_tile.cuh says why)."""
    case = Case(n=2, c=16, h=5, w=5, k=16, residual=True, training=training, channels_last=True,
                activation="identity")
    check_against_oracle(case, torch.bfloat16, backend, device, seed=29 + training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dtypes(backend, device, dtype, training, channels_last):
    if dtype == torch.float16 and device.type == "cpu":
        pytest.importorskip("torch").nn.functional.conv2d  # fp16 conv runs on CPU in torch >= 2.1
    case = Case(n=2, c=5, h=7, w=6, k=6, residual=True, training=training, channels_last=channels_last)
    check_against_oracle(case, dtype, backend, device, seed=11 + training + 2 * channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tensor_core_shapes(backend, device, dtype):
    """fp16/bf16 channels_last with C % 8 == 0 (and K % 8 == 0), the shapes the CUDA backend's mma.sync
    paths take (forward: cp.async ring, ldmatrix + BN transform; dgrad: split by stride phase): two row
    tiles, K past one column tile and C past one 32-channel slice (and not a multiple of either); a 3x3 at
    stride 2 on an odd size (phases of different sizes, each reached by its own taps); a 1x1 at stride 2
    (three of its four dgrad phases reached by no tap)."""
    cases = (Case(n=2, c=40, h=6, w=6, k=72, residual=True, training=True, channels_last=True),
             Case(n=2, c=24, h=7, w=7, k=16, stride=2, training=False, channels_last=True),
             Case(n=1, c=16, h=7, w=6, k=24, kernel=(1, 1), stride=2, padding=0, training=True,
                  channels_last=True))
    for i, case in enumerate(cases):
        check_against_oracle(case, dtype, backend, device, seed=31 + i)


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (1, 1, 1, 1), (3, 17, 3, 11), (2, 33, 4, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes_and_channel_counts(backend, device, shape):
    n, c, h, w = shape
    training = n * h * w > 1
    for k, kernel in ((7, (3, 3)), (19, (1, 1))):
        case = Case(n=n, c=c, h=h, w=w, k=k, kernel=kernel, padding=kernel[0] // 2, training=training,
                    residual=True)
        check_against_oracle(case, torch.float32, backend, device, seed=sum(shape) + k)


def test_noncontiguous_input(backend, device):
    for training in (True, False):
        case = Case(noncontiguous=True, training=training, residual=True)
        check_against_oracle(case, torch.float32, backend, device, seed=5 + training)


def test_without_bn_affine(backend, device):
    for training in (True, False):
        case = Case(affine=False, training=training)
        check_against_oracle(case, torch.float32, backend, device, seed=7 + training)
