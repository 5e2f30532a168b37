"""Honest FLOPs: the convolution count papers report equals a plain-conv twin's, and the extra cost of
the dynamic layers (attention, kernel assembly) equals the arithmetic."""
import copy
import math

import pytest
import torch
from torch import nn

import dynconv_mm  # noqa: F401
from dynconv_mm.analysis.dynamic_flops import count_dynamic_flops, format_dynamic_flops
from dynconv_mm.layers import KWConv2d


def _build(cfg):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(copy.deepcopy(cfg))


def _mmengine_conv_count(model, shape=(3, 224, 224)):
    """Independent count: mmengine's analyzer, convolution operators only."""
    from mmengine.analysis import FlopAnalyzer
    with torch.no_grad():
        ops = FlopAnalyzer(model.eval(), (torch.randn(1, *shape),)).unsupported_ops_warnings(False) \
            .uncalled_modules_warnings(False).by_operator()
    return ops['conv']


def test_kw_resnet50_1x_conv_count_is_the_plain_twins_and_extra_is_the_warehouse_product():
    torchvision = pytest.importorskip('torchvision')
    model = _build(dict(type='KWResNet', depth=50))
    info = count_dynamic_flops(model)
    twin = _mmengine_conv_count(torchvision.models.resnet50())
    assert info.conv_flops == twin == 4_087_136_256
    kw = [m for m in model.modules() if isinstance(m, KWConv2d)]
    expected = sum(m.num_mixtures * m.cell_shape[0] * math.prod(m.cell_shape[1:]) for m in kw)
    assert info.assembly_flops == expected > 0
    # attention of one layer by hand: pooling + fc1 + fc2 (KW-ResNet's BN attention: fc1 without bias)
    path, layer = next((p, m) for p, m in model.named_modules() if p == 'layer1.0.conv2')
    hw = 56 * 56
    hidden = layer.attention.fc1.out_features
    assert info.per_layer[path][2] == 64 * hw + 64 * hidden + hidden * layer.attention.kw_planes
    assert info.per_layer[path][1] == 56 * 56 * 64 * 64 * 9
    assert info.params == sum(p.numel() for p in model.parameters())
    text = format_dynamic_flops(info)
    assert 'Conv FLOPs' in text and 'Dynamic extra FLOPs' in text


def test_dynamic_dwnet_tiny_matches_static_twin_plus_kernel_generation():
    static = _build(dict(type='DWNet', arch='tiny'))
    dyn = _build(dict(type='DWNet', arch='tiny', dynamic=True))
    s, d = count_dynamic_flops(static), count_dynamic_flops(dyn)
    assert s.extra_flops == 0
    assert d.conv_flops == s.conv_flops
    # per DynamicDWConv2d at C channels and H x W: pooling C*H*W, 1x1 conv C -> C/4, 1x1 conv C/4 -> C*7*7
    expected = 0
    for c, depth, res in ((96, 2, 56), (192, 2, 28), (384, 6, 14), (768, 2, 7)):
        hidden = c // 4
        expected += depth * (c * res * res + c * hidden + hidden * c * 49)
    assert d.attention_flops == expected
    assert d.assembly_flops == 0


@pytest.mark.parametrize('cfg,assembly', [
    (dict(type='CondConv2d', num_experts=3), 3 * 16 * 8 * 9),
    (dict(type='DyConv2d', num_kernels=4), 4 * 16 * 8 * 9),
    (dict(type='ODConv2d', kernel_num=4), 8 * 10 * 10 + 16 * 10 * 10 + 4 * 16 * 8 * 9 + 16 * 8 * 9),
    (dict(type='PEDConv2d'), 16 * 8 + 2 * 16 * 8 * 9),
])
def test_layer_counts(cfg, assembly):
    from mmcv.cnn import build_conv_layer
    net = nn.Sequential(build_conv_layer(copy.deepcopy(cfg), 8, 16, 3, padding=1))
    info = count_dynamic_flops(net, (8, 10, 10))
    twin = count_dynamic_flops(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)), (8, 10, 10))
    assert info.conv_flops == twin.conv_flops == 10 * 10 * 16 * 8 * 9
    assert info.assembly_flops == assembly
    assert info.attention_flops > 8 * 10 * 10  # pooling plus the attention's own layers


def test_get_flops_tool_prints_conv_and_dynamic_extra(capsys):
    import importlib.util
    import os.path as osp
    import re
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    spec = importlib.util.spec_from_file_location('get_flops', osp.join(root, 'tools', 'analysis', 'get_flops.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = osp.join(root, 'configs', 'kernelwarehouse', 'kw1x-resnet18_8xb128-accum4_in1k.py')
    assert tool.main([config, '--shape', '32', '--exact']) == 0
    out = capsys.readouterr().out
    conv = int(re.search(r'Conv FLOPs \(plain-conv twin, as papers report\): (\d+)', out).group(1))
    extra = int(re.search(r'Dynamic extra FLOPs: (\d+)', out).group(1))
    from dynconv_mm.apis import build_model
    info = count_dynamic_flops(build_model(config), (3, 32, 32))
    assert (conv, extra) == (info.conv_flops, info.extra_flops) and extra > 0
    # ResNet-18 convolutions at 32 x 32 plus the classifier
    assert conv == 1_813_561_344 // 49 + 512 * 1000
