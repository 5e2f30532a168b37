"""Official KernelWarehouse state dicts -> mmpretrain ImageClassifier keys: every key placed, shapes
match our models, checkpoint formats (model / model_ema, Namespace args, trusted files), the CLI.

Logit parity of converted weights is proven in tests/backbones/test_kw_backbones.py."""
import argparse
import importlib.util
import json
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from mmengine.registry import MODELS as ROOT_MODELS
from torch import nn

from dynconv_mm.converters.common import ConversionError
from dynconv_mm.converters.kernelwarehouse import (
    ARCHITECTURES,
    convert_kernelwarehouse,
    detect_kw_architecture,
    kw_rules,
    load_kernelwarehouse_checkpoint,
)
from dynconv_mm.layers.kernel_warehouse import WarehouseManager

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
HAS_MMPRETRAIN = importlib.util.find_spec('mmpretrain') is not None

# fixture -> (architecture, our backbone, classifier input channels, classes)
FIXTURES = {
    'kw_resnet18_kw1d4x.pt': ('resnet', dict(type='KWResNet', depth=18, cell_num_ratio=0.25, cell_inplane_ratio=0.5,
                                             cell_outplane_ratio=0.5), 512, 1000),
    'kw_resnet_bottleneck_1111_kw1d2x.pt': ('resnet', dict(type='KWResNet', depth=50, stage_blocks=(1, 1, 1, 1),
                                                           cell_num_ratio=0.5, cell_inplane_ratio=0.5,
                                                           cell_outplane_ratio=0.5), 2048, 10),
    'kw_mobilenetv2_050_kw1x.pt': ('mobilenetv2', dict(type='KWMobileNetV2', widen_factor=0.5), 1280, 1000),
    'kw_convnext_1121_d32_kw1x.pt': ('convnext', dict(type='KWConvNeXt', arch=dict(depths=[1, 1, 2, 1],
                                                                                   channels=[32, 64, 128, 256])),
                                     256, 10),
}


def _target_state(backbone: dict, channels: int, classes: int) -> dict:
    """State dict (on the meta device) of ``backbone`` + ``head.fc`` as an ImageClassifier names it."""
    with torch.device('meta'):
        model = nn.Module()
        model.backbone = ROOT_MODELS.build(backbone)
        model.head = nn.Module()
        model.head.fc = nn.Linear(channels, classes)
    return model.state_dict()


@pytest.mark.parametrize('name', list(FIXTURES))
def test_golden_state_dicts_convert_completely(golden, name):
    arch, backbone, channels, classes = FIXTURES[name]
    sd = golden(name)['state_dict']
    assert detect_kw_architecture(sd) == arch
    target = _target_state(backbone, channels, classes)
    out, report = convert_kernelwarehouse(sd, model_keys=target)
    report.check()
    assert not report.dropped and len(report.mapped) == len(sd)
    # the only keys not taken from the checkpoint: one temperature per KW attention
    assert set(report.added) == {k for k in target if k.endswith('.attention.temperature')}
    assert len(out) == len(target) == len(sd) + len(report.added)
    assert all(float(out[k]) == 0 for k in report.added)
    assert all(k.startswith(('backbone.', 'head.fc.')) for k in out)
    # values are carried over untouched (up to the ConvNeXt layer-scale reshape)
    for src, dst in report.mapped.items():
        assert torch.equal(out[dst].reshape(sd[src].shape), sd[src]), src


@pytest.mark.parametrize('src,dst', [
    ('warehouse_manager.weights.3', 'backbone.warehouse_manager.weights.3'),
    ('layer2.0.downsample.0.attention.fc2.weight', 'backbone.layer2.0.downsample.0.attention.fc2.weight'),
    ('layer4.1.bn2.num_batches_tracked', 'backbone.layer4.1.bn2.num_batches_tracked'),
    ('fc.bias', 'head.fc.bias'),
])
def test_resnet_keys(golden, src, dst):
    sd = golden('kw_resnet18_kw1d4x.pt')['state_dict']
    _, report = convert_kernelwarehouse(sd, 'resnet')
    assert report.mapped[src] == dst


@pytest.mark.parametrize('src,dst', [
    ('features.0.0.attention.fc1.weight', 'backbone.conv1.conv.attention.fc1.weight'),
    ('features.0.1.running_var', 'backbone.conv1.bn.running_var'),
    # expand ratio 1: [dw (conv, bn), project conv, bn]
    ('features.1.conv.0.0.attention.fc2.bias', 'backbone.layer1.0.conv.0.conv.attention.fc2.bias'),
    ('features.1.conv.1.attention.norm1.weight', 'backbone.layer1.0.conv.1.conv.attention.norm1.weight'),
    ('features.1.conv.2.running_mean', 'backbone.layer1.0.conv.1.bn.running_mean'),
    # expand ratio 6: [expand (conv, bn), dw (conv, bn), project conv, bn]
    ('features.3.conv.0.1.weight', 'backbone.layer2.1.conv.0.bn.weight'),
    ('features.7.conv.1.0.attention.fc1.weight', 'backbone.layer4.0.conv.1.conv.attention.fc1.weight'),
    ('features.17.conv.2.attention.fc2.weight', 'backbone.layer7.0.conv.2.conv.attention.fc2.weight'),
    ('features.17.conv.3.bias', 'backbone.layer7.0.conv.2.bn.bias'),
    ('features.18.0.attention.fc2.weight', 'backbone.conv2.conv.attention.fc2.weight'),
    ('classifier.weight', 'head.fc.weight'),
])
def test_mobilenetv2_keys(golden, src, dst):
    sd = golden('kw_mobilenetv2_050_kw1x.pt')['state_dict']
    _, report = convert_kernelwarehouse(sd, 'mobilenetv2')
    assert report.mapped[src] == dst


def test_convnext_keys_and_layer_scale(golden):
    sd = golden('kw_convnext_1121_d32_kw1x.pt')['state_dict']
    out, report = convert_kernelwarehouse(sd, 'convnext')
    assert report.mapped['stages.2.1.dwconv.attention.fc1.bias'] == \
        'backbone.stages.2.1.depthwise_conv.attention.fc1.bias'
    assert report.mapped['stages.0.0.pwconv2.bias'] == 'backbone.stages.0.0.pointwise_conv2.bias'
    assert report.mapped['downsample_layers.0.0.attention.norm1.weight'] == \
        'backbone.downsample_layers.0.0.attention.norm1.weight'
    assert report.mapped['norm.weight'] == 'backbone.norm3.weight'
    assert report.mapped['head.bias'] == 'head.fc.bias'
    assert sd['stages.3.0.gamma'].shape == (1, 256, 1, 1)
    assert out['backbone.stages.3.0.gamma'].shape == (256,)
    torch.testing.assert_close(out['backbone.stages.3.0.gamma'], sd['stages.3.0.gamma'].flatten())


def test_unknown_and_missing_keys_are_reported(golden):
    sd = OrderedDict(golden('kw_resnet18_kw1d4x.pt')['state_dict'])
    sd['layer9.0.conv1.weight'] = torch.zeros(1)
    del sd['layer3.1.bn1.running_var']
    target = _target_state(FIXTURES['kw_resnet18_kw1d4x.pt'][1], 512, 1000)
    _, report = convert_kernelwarehouse(sd, model_keys=target)
    assert report.unplaced == ['layer9.0.conv1.weight']
    assert report.missing == ['backbone.layer3.1.bn1.running_var']
    with pytest.raises(ConversionError, match=r'layer9\.0\.conv1\.weight'):
        report.check()


def test_wrong_architecture_fails_on_shapes(golden):
    sd = golden('kw_resnet_bottleneck_1111_kw1d2x.pt')['state_dict']
    target = _target_state(dict(type='KWResNet', depth=50, stage_blocks=(1, 1, 1, 1), cell_num_ratio=1), 2048, 10)
    with pytest.raises(ConversionError, match='shape'):
        convert_kernelwarehouse(sd, model_keys=target)


def test_architecture_detection_and_rules():
    with pytest.raises(ConversionError, match='KernelWarehouse'):
        detect_kw_architecture({'blocks.0.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='unknown'):
        kw_rules('vit')
    for arch in ARCHITECTURES:
        assert kw_rules(arch)


# ------------------------------------------------------------------------------------------------
# KW-MobileNetV2 1/2x: keys and shapes of the official kw1d2x_mobilenetv2_050 (no value fixture)
def _kw1d2x_official_state() -> dict:
    with open(osp.join(HERE, 'kw1d2x_mobilenetv2_050_official_keys.json')) as f:
        shapes = json.load(f)
    def value(key, shape):
        if not shape:
            return torch.tensor(3)                      # num_batches_tracked
        return torch.rand(shape) + 0.5 if key.endswith('running_var') else torch.randn(shape) * 0.1
    return OrderedDict((k, value(k, s)) for k, s in shapes.items())


def _kw1d2x_classifier() -> nn.Module:
    model = nn.Module()
    model.backbone = ROOT_MODELS.build(dict(type='KWMobileNetV2', widen_factor=0.5, variant='kw1d2x'))
    if HAS_MMPRETRAIN:
        from mmpretrain.registry import MODELS
        model.head = MODELS.build(dict(type='KWLinearClsHead', num_classes=1000, in_channels=1280))
    else:
        model.head = nn.Module()
        model.head.warehouse_manager = WarehouseManager(reduction=0.03125, cell_num_ratio=0.5,
                                                        cell_inplane_ratio=0.025)
        model.head.fc = model.head.warehouse_manager.reserve(1280, 1000, warehouse_name='classifier',
                                                             layer_type='linear')
        model.head.warehouse_manager.store()
        model.head.warehouse_manager.allocate(model.head)
    return model


def test_kw1d2x_mobilenetv2_converts_and_loads_strictly():
    sd = _kw1d2x_official_state()
    assert detect_kw_architecture(sd) == 'mobilenetv2_kw1d2x'
    model = _kw1d2x_classifier()
    out, report = convert_kernelwarehouse(sd, model_keys=model.state_dict())
    report.check()
    assert report.mapped['warehouse_manager.weights.9'] == 'head.warehouse_manager.weights.0'
    assert report.mapped['warehouse_manager.weights.8'] == 'backbone.warehouse_manager.weights.8'
    assert report.mapped['classifier.1.conv.attention.fc2.weight'] == 'head.fc.conv.attention.fc2.weight'
    assert report.mapped['features.2.conv.0.0.weight'] == 'backbone.layer2.0.conv.0.conv.weight'  # plain conv
    model.load_state_dict(out, strict=True)
    assert tuple(model.head.warehouse_manager.weights[0].shape) == (20, 1000, 32, 1)
    model.eval()
    with torch.no_grad():
        logits = model.head.fc(model.backbone(torch.randn(2, 3, 32, 32))[-1].mean((2, 3)))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_kw1d2x_needs_its_classifier_warehouse():
    sd = _kw1d2x_official_state()
    del sd['warehouse_manager.weights.9']
    with pytest.raises(ConversionError, match='10 warehouses'):
        convert_kernelwarehouse(sd, 'mobilenetv2_kw1d2x')


@pytest.mark.skipif(not HAS_MMPRETRAIN, reason='mmpretrain is not installed')
def test_kw1d2x_head_in_image_classifier():
    from mmpretrain.registry import MODELS
    model = MODELS.build(dict(
        type='ImageClassifier', backbone=dict(type='KWMobileNetV2', widen_factor=0.5, variant='kw1d2x'),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='KWLinearClsHead', num_classes=1000, in_channels=1280, dropout=0.1)))
    out, report = convert_kernelwarehouse(_kw1d2x_official_state(), model_keys=model.state_dict())
    report.check()
    model.load_state_dict(out, strict=True)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x, mode='tensor')
        expected = model.head.fc(model.backbone(x)[-1].mean((2, 3)))
    torch.testing.assert_close(logits, expected)


# ------------------------------------------------------------------------------------------------
# checkpoint files and the CLI
class _Opaque:
    """A picklable object a weights-only load refuses."""


#: torch >= 2.5 lets a weights-only load take allow-listed classes such as the official argparse.Namespace
#: args; older releases refuse them (load_checkpoint_file then asks for --trusted)
NAMESPACE_IS_SAFE = hasattr(torch.serialization, 'safe_globals')


def _official_checkpoint(golden, path, extra=None, namespace=NAMESPACE_IS_SAFE):
    sd = golden('kw_resnet_bottleneck_1111_kw1d2x.pt')['state_dict']
    ema = OrderedDict((k, v + 1 if v.is_floating_point() else v) for k, v in sd.items())
    args = dict(model='kw_resnet50', sharing_range='layer_conv')
    ckpt = {'model': sd, 'optimizer': {'state': {}}, 'epoch': 299, 'scaler': {},
            'args': argparse.Namespace(**args) if namespace else args, 'model_ema': ema}
    if extra:
        ckpt.update(extra)
    torch.save(ckpt, path)
    return sd, ema


def test_load_official_checkpoint_model_and_ema(golden, tmp_path):
    path = str(tmp_path / 'checkpoint-best.pth')
    sd, ema = _official_checkpoint(golden, path)
    got = load_kernelwarehouse_checkpoint(path)       # Namespace args: allowed by the safe loader
    assert list(got) == list(sd) and torch.equal(got['fc.weight'], sd['fc.weight'])
    got = load_kernelwarehouse_checkpoint(path, key='model_ema')
    assert torch.equal(got['fc.weight'], ema['fc.weight'])
    torch.save({'model': sd}, path)
    with pytest.raises(ConversionError, match='model_ema'):
        load_kernelwarehouse_checkpoint(path, key='model_ema')


@pytest.mark.skipif(NAMESPACE_IS_SAFE, reason='this torch allow-lists argparse.Namespace for weights-only loads')
def test_namespace_args_need_trusted_on_older_torch(golden, tmp_path):
    path = str(tmp_path / 'checkpoint-best.pth')
    sd, _ = _official_checkpoint(golden, path, namespace=True)
    with pytest.raises(ConversionError, match='--trusted'):
        load_kernelwarehouse_checkpoint(path)
    assert list(load_kernelwarehouse_checkpoint(path, trusted=True)) == list(sd)


def test_ddp_prefix_and_bare_state_dict(golden, tmp_path):
    sd = golden('kw_resnet_bottleneck_1111_kw1d2x.pt')['state_dict']
    path = str(tmp_path / 'bare.pth')
    torch.save(OrderedDict(('module.' + k, v) for k, v in sd.items()), path)
    got = load_kernelwarehouse_checkpoint(path)
    assert list(got) == list(sd)


def test_untrusted_pickles_are_refused(golden, tmp_path):
    path = str(tmp_path / 'odd.pth')
    sd, _ = _official_checkpoint(golden, path, extra={'odd': _Opaque()})
    with pytest.raises(ConversionError, match='trusted'):
        load_kernelwarehouse_checkpoint(path)
    assert list(load_kernelwarehouse_checkpoint(path, trusted=True)) == list(sd)


def _cli():
    spec = importlib.util.spec_from_file_location(
        'kernelwarehouse_to_mm', osp.join(ROOT, 'tools', 'model_converters', 'kernelwarehouse_to_mm.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_converts_and_reports(golden, tmp_path, capsys):
    src, dst = str(tmp_path / 'official.pth'), str(tmp_path / 'out' / 'kw_r50.pth')
    sd, ema = _official_checkpoint(golden, src)
    assert _cli().main([src, dst, '--key', 'model_ema']) == 0
    printed = capsys.readouterr().out
    assert 'architecture: resnet' in printed and f'{len(sd)} keys mapped' in printed
    out = torch.load(dst, weights_only=True)
    assert out['meta']['source_key'] == 'model_ema'
    assert torch.equal(out['state_dict']['head.fc.weight'], ema['fc.weight'])
    assert torch.equal(out['state_dict']['backbone.warehouse_manager.weights.2'], ema['warehouse_manager.weights.2'])


def test_cli_fails_on_unplaced_keys(golden, tmp_path, capsys):
    sd = OrderedDict(golden('kw_resnet_bottleneck_1111_kw1d2x.pt')['state_dict'])
    sd['teacher.fc.weight'] = torch.zeros(2)
    src, dst = str(tmp_path / 'official.pth'), str(tmp_path / 'out.pth')
    torch.save({'model': sd, 'epoch': 1}, src)
    assert _cli().main([src, dst]) == 1
    assert 'teacher.fc.weight' in capsys.readouterr().err
    assert not osp.exists(dst)


@pytest.mark.skipif(not HAS_MMPRETRAIN, reason='mmpretrain is not installed')
def test_kw_head_pickles():
    import copy
    import pickle

    from mmpretrain.registry import MODELS
    head = MODELS.build(dict(type='KWLinearClsHead', num_classes=10, in_channels=64, cell_inplane_ratio=0.5))
    assert type(head).__name__ == 'KWLinearClsHeadModule'
    for clone in (pickle.loads(pickle.dumps(head)), copy.deepcopy(head)):
        for (k, a), b in zip(head.state_dict().items(), clone.state_dict().values()):
            assert torch.equal(a, b), k
        x = torch.randn(2, 64)
        head.eval()
        clone.eval()
        with torch.no_grad():
            torch.testing.assert_close(clone((x,)), head((x,)))
