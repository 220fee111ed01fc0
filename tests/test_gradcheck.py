"""float64 torch.autograd.gradcheck of every differentiable input, per backend."""
import pytest
import torch

import fused_resnet


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("geometry", [((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((1, 1), 1, 0, 1), ((3, 2), 1, 2, 2)],
                         ids=["3x3", "3x3s2", "1x1", "3x2d2"])
@pytest.mark.parametrize("fast_mode", [True], ids=["fast"])
def test_gradcheck(backend, device, training, geometry, fast_mode, x_shape=(2, 3, 5, 4), k=4, activation="relu"):
    kernel, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(hash((training, geometry)) % 2**31)

    def t(*shape, positive=False):
        v = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5 if positive else \
            torch.randn(*shape, generator=g, dtype=torch.float64)
        return v.to(device)

    n, c, h, w = x_shape
    x = t(*x_shape)
    weight = t(k, c, *kernel) * 0.5
    bias = t(k)
    gamma, beta = t(c, positive=True), t(c) * 0.3
    rm, rv = t(c) * 0.1, t(c, positive=True)
    oh = (h + 2 * padding - dilation * (kernel[0] - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (kernel[1] - 1) - 1) // stride + 1
    residual = t(n, k, oh, ow)
    inputs = [v.requires_grad_() for v in (x, weight, bias, gamma, beta, residual)]

    def fn(x, weight, bias, gamma, beta, residual):
        # Fresh buffer copies per call: gradcheck calls fn many times and the op updates them.
        return fused_resnet.bn_relu_conv2d(
            x, weight, bias, bn_weight=gamma, bn_bias=beta, running_mean=rm.clone(),
            running_var=rv.clone(), training=training, stride=stride, padding=padding,
            dilation=dilation, residual=residual, backend=backend, activation=activation)

    # ReLU has a kink at 0; random inputs keep every pre-activation well away from it relative
    # to gradcheck's eps=1e-6 perturbations.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_identity_activation(backend, device, training):
    """activation="identity": no mask, so every input's gradient passes (fast mode, a strided 3x3)."""
    test_gradcheck(backend, device, training, ((3, 3), 2, 1, 1), True, activation="identity")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_full_jacobian(backend, device, training):
    """Slow mode (every Jacobian entry) on a tiny case; fast mode above covers the geometries."""
    test_gradcheck(backend, device, training, ((3, 3), 2, 1, 1), False, x_shape=(2, 2, 3, 3), k=2)
