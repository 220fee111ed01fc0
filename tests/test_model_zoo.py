"""convert() on a model zoo nobody here wrote: pytorchcv's CIFAR families, pre-activation and not --
plain, squeeze-excitation and attention pre-activation ResNets, PyramidNet (BN -> conv units), a
binarized wide ResNet (its conv weights computed in forward through a custom autograd Function), a
masked-weight DenseNet (functional F.conv2d), shake-drop and shake-shake units (random draws in forward),
RoR, stochastic depth, DenseNet-BC.

For each: the fused chains are exactly the ones found independently by following tensors through a
TorchFunctionMode (model_checks.chains), every BatchNorm is named once in the report, and over a
training step in float64 (train and eval) the outputs, input and parameter gradients and the state after
an SGD step equal the original's; names, module paths and checkpoints are the original's.

pytorchcv is pure Python; `.ci/run` installs it with --no-deps (pinned there). It imports torchvision,
which the CPU wheel needs shimmed (tests/test_third_party.py's docstring says why).
FUSED_RESNET_REQUIRE_THIRD_PARTY=1 (set by CI) turns a missing zoo into a failure instead of a skip.
"""
import copy

import pytest
import torch
from torch import nn

import fused_resnet
from model_checks import assert_converted_is_original, assert_same, chains, fused_chains, import_third_party

(get_model,) = (m.get_model for m in import_third_party("pytorchcv.model_provider"))

BN = nn.modules.batchnorm._BatchNorm



def _small(module, factory, **kw):
    """A family's smaller member, built by its own factory (the registered ones are slow in float64)."""
    def build():
        import importlib
        return getattr(importlib.import_module(f"pytorchcv.models.{module}"), factory)(num_classes=10, **kw)
    return build


# name -> (how to build it, how many chains it has: the independent count must agree, so a change in
# the zoo or in convert() shows here)
ZOO = {
    "preresnet20_cifar10": (None, 20),
    "sepreresnet20_cifar10": (None, 20),
    "diapreresnet20_cifar10": (None, 20),
    "pyramidnet20_a48": (_small("pyramidnet_cifar", "get_pyramidnet_cifar", blocks=20, alpha=48,
                                bottleneck=False), 27),
    "pyramidnet38_a48_bottleneck": (_small("pyramidnet_cifar", "get_pyramidnet_cifar", blocks=38, alpha=48,
                                           bottleneck=True), 48),
    "wrn20_1_1bit": (_small("wrn1bit_cifar", "get_wrn1bit_cifar", blocks=20, width_factor=1), 19),
    "xdensenet40_2_k24_bc_cifar10": (None, 38),
    "shakedropresnet20_cifar10": (None, 11),
    "shakeshakeresnet20_2x16d_cifar10": (None, 18),
    "resdropresnet20_cifar10": (None, 9),
    "ror3_56_cifar10": (None, 54),
}


# Post-activation ends the independent search finds and convert() leaves, with the reason: the unit's
# forward differs between train() and eval() (a shake or a random drop in training only), so convert()
# converts its children one by one, and the unit's own add -> ReLU is in none of them.
MODE_DEPENDENT_UNIT_ENDS = {"shakeshakeresnet20_2x16d_cifar10": ".identity_branch.bn",
                            "resdropresnet20_cifar10": ".identity_conv.bn"}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_converts_to_itself(name):
    torch.manual_seed(0)
    build, count = ZOO[name]
    model = (build() if build else get_model(name, pretrained=False)).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    conv = fused_resnet.convert(model, backend="reference")
    assert_same(model.state_dict(), before, "original after convert()", tol=0)

    want = chains(copy.deepcopy(model), x)
    if name in MODE_DEPENDENT_UNIT_ENDS:
        for key in [k for k in want if k[0].endswith(MODE_DEPENDENT_UNIT_ENDS[name]) and k[1].startswith("add")]:
            del want[key]
    got = fused_chains(conv.fusion_report)
    assert got == want, (sorted((want - got).elements()), sorted((got - want).elements()))
    assert sum(want.values()) == count
    bn_names = {n for n, m in model.named_modules() if isinstance(m, BN)}
    skipped = [e.where for e in conv.fusion_report if not e.fused and e.where in bn_names]
    assert len(skipped) == len(set(skipped)), "a BatchNorm reported twice"
    fused_bns = {bn for bn, _ in got}
    assert bn_names <= fused_bns | set(skipped), sorted(bn_names - fused_bns - set(skipped))

    assert_converted_is_original(model, conv, x, name)
