"""OREPAResNet: official parity (golden OREPA ResNet-18 w0.25), deploy equivalence for every block type."""
import copy
import functools

import conftest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv_mm.analysis.complexity import count_parameters
from dynconv_mm.backbones.orepa_resnet import OREPAResNet
from dynconv_mm.converters.common import compare_with
from dynconv_mm.converters.orepa import convert_orepa_resnet
from dynconv_mm.layers.reparam import leaf_module_types, reparameterize_model


def assert_golden(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def assert_rel(ours, ref, rtol):
    err = (ours - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), f'max abs error {err:.3g}, max |ref| {ref.abs().max().item():.3g}'


randomize_norms = functools.partial(conftest.randomize_norms, seed=1, mean_scale=0.3, affine=True, bias_scale=0.3)


def split(sd):
    backbone = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    head = {k[len('head.fc.'):]: v for k, v in sd.items() if k.startswith('head.fc.')}
    assert len(backbone) + len(head) == len(sd)
    return backbone, head


def logits(backbone, head, x):
    return F.linear(backbone(x)[-1].mean((2, 3)), head['weight'], head['bias'])


def test_golden_resnet18_w025(golden):
    g = golden('orepa_resnet18_w025.pt')
    model = OREPAResNet(18, width_multiplier=0.25).eval()
    sd, report = convert_orepa_resnet(g['state_dict'])
    assert len(report.dropped) == 57 and not report.unplaced
    bsd, head = split(sd)
    compare_with(report, bsd, model.state_dict()).check()
    model.load_state_dict(bsd)
    assert count_parameters(model) + head['weight'].numel() + head['bias'].numel() == g['num_params']
    x = g['input']
    with torch.no_grad():
        assert_golden(logits(model, head, x), g['outputs'][0.0])
        model.switch_to_deploy()
        assert_golden(logits(model, head, x), g['deploy_output'])
    # our fused weights load the same as the official deploy checkpoint, which loads into a deploy-built model
    dsd, report = convert_orepa_resnet(g['deploy_state_dict'])
    dbsd, dhead = split(dsd)
    deployed = OREPAResNet(18, width_multiplier=0.25, deploy=True).eval()
    compare_with(report, dbsd, deployed.state_dict()).check()
    deployed.load_state_dict(dbsd)
    assert model.state_dict().keys() == deployed.state_dict().keys()
    for k, v in dbsd.items():
        assert_golden(model.state_dict()[k], v)
    with torch.no_grad():
        assert_golden(logits(deployed, dhead, x), g['deploy_output'])


def test_golden_through_mmpretrain_classifier(golden):
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    from mmpretrain.registry import MODELS

    import dynconv_mm  # noqa: F401
    g = golden('orepa_resnet18_w025.pt')
    cfg = dict(type='ImageClassifier', backbone=dict(type='OREPAResNet', depth=18, width_multiplier=0.25),
               neck=dict(type='GlobalAveragePooling'), head=dict(type='LinearClsHead', num_classes=10, in_channels=128))
    model = MODELS.build(cfg).eval()
    sd, report = convert_orepa_resnet(g['state_dict'])
    compare_with(report, sd, model.state_dict()).check()
    model.load_state_dict(sd)
    with torch.no_grad():
        assert_golden(model(g['input'], mode='tensor'), g['outputs'][0.0])
        reparameterize_model(model)
        assert_golden(model(g['input'], mode='tensor'), g['deploy_output'])


@pytest.mark.parametrize('depth,block_type', [(18, 'OREPA'), (18, 'DBB'), (18, 'RepVGG'), (18, 'OREPA_VGG'),
                                              (18, 'base'), (50, 'OREPA')])
def test_deploy_equals_training_and_is_plain(depth, block_type):
    width = 0.125 if depth == 18 else 0.0625
    model = randomize_norms(OREPAResNet(depth, width, block_type=block_type, out_indices=(0, 1, 2, 3))).eval()
    single = copy.deepcopy(model)
    model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for net, inp, rtol in ((model, x, 1e-5), (single, x.float(), 1e-4)):
        with torch.no_grad():
            before = net(inp)
            net.switch_to_deploy()
            after = net(inp)
        for a, b in zip(after, before):
            assert_rel(a, b, rtol)
    plain = OREPAResNet(depth, width, block_type=block_type, deploy=True)
    assert count_parameters(model) == count_parameters(plain)
    assert leaf_module_types(model) == leaf_module_types(plain)
    assert all(type(m) in (nn.Conv2d, nn.ReLU, nn.MaxPool2d) for m in model.modules() if not list(m.children()))
    state = copy.deepcopy(model.state_dict())
    model.switch_to_deploy()
    reparameterize_model(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_float32_deploy_and_train_step():
    model = randomize_norms(OREPAResNet(18, 0.125)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)[-1]
    trained = copy.deepcopy(model).train()
    out = trained(x)[-1]
    out.mean().backward()
    assert all(p.grad is not None for p in trained.parameters())
    model.switch_to_deploy()
    with torch.no_grad():
        assert_rel(model(x)[-1], before, 1e-4)


def test_out_indices_frozen_stages_norm_eval():
    model = OREPAResNet(18, 0.125, out_indices=(0, 2), frozen_stages=1, norm_eval=True)
    model.train()
    outs = model(torch.randn(2, 3, 64, 64))
    assert [o.shape for o in outs] == [(2, 8, 16, 16), (2, 32, 4, 4)]
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not model.stem.bn.training and not model.layer2[0].conv1.bn.training   # norm_eval
    model.switch_to_deploy()
    assert not any(p.requires_grad for p in model.layer1.parameters())
    with pytest.raises(ValueError, match='OREPAResNet'):
        OREPAResNet(18, block_type='ACNet')
    with pytest.raises(ValueError, match='OREPAResNet'):
        OREPAResNet(19)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_builds_in_dense_prediction_registries(scope):
    pytest.importorskip(scope, reason=f'{scope} is not installed')
    import importlib

    import dynconv_mm  # noqa: F401
    models = importlib.import_module(f'{scope}.registry').MODELS
    backbone = models.build(dict(type='OREPAResNet', depth=18, width_multiplier=0.125, out_indices=(0, 1, 2, 3),
                                 frozen_stages=1, norm_eval=True, norm_cfg=dict(type='BN', requires_grad=True)))
    backbone.init_weights()
    backbone.train()
    outs = backbone(torch.randn(2, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [8, 16, 32, 64]
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
