"""convert() on models nobody here wrote: timm's ResNetV2 (BatchNormAct2d, drop-path) and ResNet
(drop-block, Identity placeholders), torchvision's ResNet and DenseNet (dropout) -- through their own
model classes, at small configurations so the CPU can run them.

For each: converted in train mode and in eval mode, then run in both; outputs, input and parameter
gradients and the running statistics after an SGD step match the original (float64, reference backend;
one model through the Triton interpreter too); state_dicts load strictly both ways; convert() leaves
the original untouched; every BatchNorm appears once in the report; and every BN -> ReLU -> conv chain
-- counted independently of convert(), by following tensors through forward hooks -- is fused.

How they load on the CPU wheel (test-only): torchvision's registry wheel links CUDA libraries the CPU
torch lacks, so its C++ ops do not load and `import torchvision` fails in
torchvision/_meta_registrations.py (fake kernels for detection ops like nms, registered unguarded);
replacing only that module with an empty one first makes torchvision and timm import. .ci/run installs
them (pinned there, with why); FUSED_RESNET_REQUIRE_THIRD_PARTY=1 (set by CI) turns a missing one into
a failure instead of a skip.
"""
import copy

import pytest
import torch
from torch import nn

import fused_resnet
from model_checks import assert_same as _assert_same, chains, fused_chains, import_third_party, step as _step

timm, torchvision = import_third_party("timm", "torchvision")

from timm.layers import BatchNormAct2d, create_conv2d  # noqa: E402
from timm.models.resnetv2 import ResNetV2  # noqa: E402
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

BN = nn.modules.batchnorm._BatchNorm


def _models():
    return {
        "timm-resnetv2": lambda: ResNetV2(layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_chs=8,
                                          conv_layer=create_conv2d, norm_layer=BatchNormAct2d, num_classes=5),
        "timm-resnetv2d-droppath": lambda: ResNetV2(layers=[2, 1], channels=(8, 16), stem_chs=8, stem_type="deep",
                                                    avg_down=True, conv_layer=create_conv2d,
                                                    norm_layer=BatchNormAct2d, num_classes=5, drop_path_rate=0.3),
        "timm-resnet-dropblock": lambda: timm.models.resnet.ResNet(
            timm.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, drop_block_rate=0.2, drop_path_rate=0.1,
            stem_width=16),
        "torchvision-resnet-basic": lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5),
        "torchvision-resnet-bottleneck": lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16),
        "torchvision-densenet-dropout": lambda: torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2),
                                                                             num_init_features=8, bn_size=2,
                                                                             drop_rate=0.2, num_classes=5),
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("converted_in", ["train", "eval"])
def test_converted_third_party_model_matches_everywhere(name, converted_in):
    torch.manual_seed(0)
    model = _models()[name]().double().train(converted_in == "train")
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    conv = fused_resnet.convert(model, backend="reference")
    # the original is untouched: parameters, buffers (counters included) and mode
    _assert_same(model.state_dict(), before, "original after convert()", tol=0)
    assert model.training == (converted_in == "train")

    # every BatchNorm named once in the report; every fusable chain fused
    bn_names = {n for n, m in model.named_modules() if isinstance(m, BN)}
    reported = [e.where.split(" -> ")[0] for e in conv.fusion_report if " -> " not in e.where or e.fused]
    assert set(reported) >= bn_names
    skipped_bns = [e.where for e in conv.fusion_report if not e.fused and e.where in bn_names]
    assert len(skipped_bns) == len(set(skipped_bns)), "a BatchNorm reported twice"
    # The chains found independently, by following tensors (model_checks.chains), in both modes: modules
    # whose forward changes with the mode (torchvision's dense layer with drop_rate > 0 calls
    # F.dropout(training=self.training)) are fused once per mode (convert.ByMode): no exception here.
    want = chains(copy.deepcopy(model), x)
    got = fused_chains(conv.fusion_report)
    assert got == want, (sorted((want - got).elements()), sorted((got - want).elements()))
    assert want, "the model has fusable chains"

    # the same function in both modes, whichever mode it was converted in, over a training step
    for mode in (True, False):
        a, b = copy.deepcopy(model).train(mode), copy.deepcopy(conv).train(mode)
        ra, rb = _step(a, x, seed=1), _step(b, x, seed=1)
        for what, u, v in zip(("output", "dx", "parameter grads", "buffers after a step"), ra, rb):
            _assert_same(u, v, f"{name} converted in {converted_in}, run in {'train' if mode else 'eval'}: {what}")

    # checkpoints move both ways, strictly; the converted model pickles (torch.save of a whole model)
    conv.load_state_dict(model.state_dict(), strict=True)
    copy.deepcopy(model).load_state_dict(conv.state_dict(), strict=True)
    import pickle

    again = pickle.loads(pickle.dumps(conv)).eval()
    torch.testing.assert_close(again(x), conv.eval()(x), rtol=0, atol=0)


@pytest.mark.skipif("triton" not in fused_resnet.available_backends(), reason="needs the Triton backend")
def test_timm_resnetv2_through_the_triton_kernels():
    """The same model through the Triton kernels (the interpreter on the CPU): float32, train and eval,
    within float32 error of eager's."""
    torch.manual_seed(0)
    model = _models()["timm-resnetv2"]().train()
    conv = fused_resnet.convert(model, backend="triton")
    assert sum(e.fused for e in conv.fusion_report) > 0
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):
        a, b = copy.deepcopy(model).train(mode), copy.deepcopy(conv).train(mode)
        ya, gxa, ga, bufa = _step(a, x, seed=2)
        yb, gxb, gb, bufb = _step(b, x, seed=2)
        # float32 through ~10 BN layers at 1 pixel per channel in the last stage: loose, but relative
        torch.testing.assert_close(yb, ya, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(gxb, gxa, rtol=2e-3, atol=2e-3)
