"""Static checkpoints (torchvision / mmpretrain ResNet-50) initialise dynamic and re-param ResNet-50s.

Where the method allows it, the converted model computes what the static network did (eval, 1e-5);
elsewhere (KernelWarehouse at temperature 0 and below 1x) the difference is finite and bounded.
"""
import copy

import pytest
import torch
from conftest import randomize_norms
from torch import nn

import dynconv_mm  # noqa: F401
from dynconv_mm.converters.static import convert_static_to_dynamic, init_layer_from_static
from dynconv_mm.layers.temperature import set_temperature

torchvision = pytest.importorskip('torchvision')

EXACT = {
    'CondConv2d': dict(type='CondConv2d', num_experts=4),
    'DyConv2d': dict(type='DyConv2d', num_kernels=4),
    'ODConv2d': dict(type='ODConv2d', kernel_num=4),
    'DOConv2d': dict(type='DOConv2d'),
    'OREPA': dict(type='OREPA'),
    'PEDConv2d': dict(type='PEDConv2d'),
}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    randomize_norms(model, seed, affine=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope='module')
def torchvision_r50():
    torch.manual_seed(0)
    net = _randomise(torchvision.models.resnet50(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x)
    return net.state_dict(), x, y


def _classifier(conv_cfg=None, backbone=None):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    backbone = backbone or dict(type='ResNet', depth=50, conv_cfg=copy.deepcopy(conv_cfg))
    return MODELS.build(dict(type='ImageClassifier', backbone=backbone, neck=dict(type='GlobalAveragePooling'),
                             head=dict(type='LinearClsHead', num_classes=10, in_channels=2048)))


def _close(out, ref, rtol=1e-5):
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x, mode='tensor')


@pytest.mark.parametrize('name', sorted(EXACT))
def test_torchvision_resnet50_into_dynamic_resnet50_is_exact(name, torchvision_r50):
    sd, x, ref = torchvision_r50
    model = _classifier(EXACT[name])
    converted, report = convert_static_to_dynamic(sd, model)
    assert not report.unplaced, report.unplaced
    assert set(report.mapped) == set(sd)
    assert len(report.layers) == 53 and all(v.startswith('exact') for v in report.layers.values()), report.layers
    # only the dynamic layers' own extra parameters (attention, DO-Conv D, OREPA branches) have no static source
    assert all('.conv' in k or 'downsample.0' in k for k in report.missing)
    _close(_logits(model, x), ref)
    # the returned state dict is the model's: a fresh model loads it strictly and agrees
    fresh = _classifier(EXACT[name])
    fresh.load_state_dict(converted, strict=True)
    _close(_logits(fresh, x), ref)


def test_mmpretrain_keys_and_unused_keys_are_reported(torchvision_r50):
    sd, x, ref = torchvision_r50
    mm = {('head.' + k if k.startswith('fc.') else 'backbone.' + k): v for k, v in sd.items()}
    model = _classifier(EXACT['ODConv2d'])
    _, report = convert_static_to_dynamic(mm, model)
    assert not report.unplaced and set(report.mapped) == set(mm)
    _close(_logits(model, x), ref)
    mm['backbone.extra.weight'] = torch.zeros(3)
    mm['head.fc.weight'] = torch.zeros(7, 2048)  # another classifier size: reported, not loaded
    model = _classifier(EXACT['DyConv2d'])
    _, report = convert_static_to_dynamic(mm, model)
    assert sorted(report.unplaced) == ['backbone.extra.weight', 'head.fc.weight']
    assert 'head.fc.weight' in report.missing and 'head.fc.bias' not in report.missing
    assert 'backbone.layer1.0.conv2.attention.fc1.weight' in report.missing
    assert 'backbone.extra.weight' in report.summary()


def test_condconv_experts_differ_but_mix_to_the_static_kernel():
    from dynconv_mm.layers import CondConv2d
    w = torch.randn(8, 4, 3, 3)
    layer = CondConv2d(4, 8, 3, padding=1, num_experts=4)
    init_layer_from_static(layer, w)
    assert not torch.allclose(layer.weight[0], layer.weight[1])
    x = torch.randn(3, 4, 9, 9)
    _close(layer.eval()(x), torch.nn.functional.conv2d(x, w, padding=1))
    still = CondConv2d(4, 8, 3, padding=1, num_experts=4)
    init_layer_from_static(still, w, expert_noise=0.0)
    assert torch.equal(still.weight[0], still.weight[1])


def test_kernelwarehouse_1x_exact_at_temperature_one_bounded_at_zero(torchvision_r50):
    sd, x, ref = torchvision_r50
    model = _classifier(dict(type='KWConv2d', cell_num_ratio=1))
    _, report = convert_static_to_dynamic(sd, model)
    assert not report.unplaced and len(report.layers) == 53
    assert all(v.startswith('exact at temperature 1') for v in report.layers.values())
    set_temperature(model, 1.0)
    _close(_logits(model, x), ref)
    set_temperature(model, 0.0)
    out = _logits(model, x)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert torch.isfinite(out).all() and 0 < rel < 0.05, rel   # every kernel is W / 1.001 (53 layers deep)
    # a larger prior logit L: kernels W * L / (L + 1e-3) at temperature 0, closer to exact
    sharp = _classifier(dict(type='KWConv2d', cell_num_ratio=1))
    convert_static_to_dynamic(sd, sharp, kw_prior_logit=100.0)
    set_temperature(sharp, 0.0)
    out = _logits(sharp, x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < rel / 20
    # keeping the attention as initialised: exact at temperature 1 only
    keep = _classifier(dict(type='KWConv2d', cell_num_ratio=1))
    convert_static_to_dynamic(sd, keep, kw_attention='keep')
    set_temperature(keep, 1.0)
    _close(_logits(keep, x), ref)
    set_temperature(keep, 0.0)
    assert torch.isfinite(_logits(keep, x)).all()


def test_kernelwarehouse_half_is_reported_inexact():
    from dynconv_mm.layers import KWConv2d, allocate_warehouses
    net = nn.Sequential(KWConv2d(8, 8, 3, padding=1, spatial_partition=False, cell_inplane_ratio=0.25,
                                 cell_num_ratio=0.5))
    allocate_warehouses(net)
    w = torch.randn(8, 8, 3, 3)
    _, report = convert_static_to_dynamic({'0.weight': w}, net)
    assert report.layers['0'].startswith('not exact: 2 of 4 mixtures own no cell')
    set_temperature(net, 1.0)
    x = torch.randn(2, 8, 6, 6)
    out, ref = net.eval()(x), torch.nn.functional.conv2d(x, w, padding=1)
    # the owned quarters of the input channels are reproduced exactly, the others start at zero
    half = torch.nn.functional.conv2d(x[:, [0, 1, 6, 7]], w[:, [0, 1, 6, 7]], padding=1)
    _close(out, half)
    assert not torch.allclose(out, ref, atol=1e-2)


@pytest.mark.parametrize('cfg', [dict(type='DBB'), dict(type='RepVGGBlock', act_cfg=None)])
def test_dbb_and_repvgg_layers_exact(cfg):
    from mmcv.cnn import build_conv_layer
    w = torch.randn(8, 8, 3, 3)
    layer = build_conv_layer(dict(cfg), 8, 8, 3, padding=1)
    rec = init_layer_from_static(layer, w)
    assert rec.note.startswith('exact')
    x = torch.randn(2, 8, 10, 10)
    _close(layer.eval()(x), torch.nn.functional.conv2d(x, w, padding=1))


def test_dynamic_dw_from_static_depthwise_is_exact():
    from dynconv_mm.layers import DynamicDWConv2d
    w = torch.randn(16, 1, 7, 7)
    layer = DynamicDWConv2d(16, 16, 7, padding=3)
    init_layer_from_static(layer, w)
    x = torch.randn(2, 16, 12, 12)
    _close(layer.eval()(x), torch.nn.functional.conv2d(x, w, padding=3, groups=16))


def test_bad_shapes_and_deployed_layers_fail_clearly():
    from dynconv_mm.layers import DyConv2d
    from dynconv_mm.layers.reparam import DOConv2d
    with pytest.raises(ValueError, match=r'DyConv2d: static kernel of shape \(8, 4, 1, 1\)'):
        init_layer_from_static(DyConv2d(4, 8, 3), torch.randn(8, 4, 1, 1))
    with pytest.raises(ValueError, match='deployed'):
        init_layer_from_static(DOConv2d(4, 8, 3, deploy=True), torch.randn(8, 4, 3, 3))


def test_cli_writes_a_checkpoint_that_loads_strictly(tmp_path):
    import importlib.util
    import os.path as osp
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    spec = importlib.util.spec_from_file_location('s2d', osp.join(root, 'tools', 'model_converters',
                                                                  'static_to_dynamic.py'))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg = osp.join(root, 'tests', 'data', 'configs', 'mmpretrain_resnet_plugin_conv.py')  # ResNet-18 + DOConv2d
    torch.manual_seed(0)
    static = _randomise(torchvision.models.resnet18(num_classes=1000)).eval()
    src, dst = str(tmp_path / 'r18.pth'), str(tmp_path / 'out.pth')
    sd = static.state_dict()
    sd['extra.weight'] = torch.zeros(2)
    torch.save(sd, src)
    assert cli.main([src, cfg, dst, '--strict']) == 1 and not osp.exists(dst)
    assert cli.main([src, cfg, dst]) == 0
    from dynconv_mm.apis import build_model, load_config
    model = build_model(load_config(cfg))
    model.load_state_dict(torch.load(dst, weights_only=True)['state_dict'], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(model.eval()(x, mode='tensor'), static(x))


def test_torchvision_resnet50_into_kw_resnet50_backbone(torchvision_r50):
    sd, x, _ = torchvision_r50
    static = torchvision.models.resnet50(num_classes=10)
    static.load_state_dict(sd)
    model = _classifier(backbone=dict(type='KWResNet', depth=50))  # KW-ResNet-50 1x, official layout
    _, report = convert_static_to_dynamic(sd, model)
    assert not report.unplaced and set(report.mapped) == set(sd)
    assert len(report.layers) == 50 and all(v.startswith('exact at temperature 1') for v in report.layers.values())
    assert all('.attention.' in k for k in report.missing)
    set_temperature(model, 1.0)
    _close(_logits(model, x), static.eval()(x).detach())


def test_timm_resnet18_into_dyconv_resnet18():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    static = _randomise(timm.create_model('resnet18', pretrained=False, num_classes=10)).eval()
    model = _classifier(backbone=dict(type='ResNet', depth=18, conv_cfg=dict(type='DyConv2d')))
    model.head.fc = nn.Linear(512, 10)
    _, report = convert_static_to_dynamic(static.state_dict(), model)
    assert not report.unplaced and len(report.layers) == 20
    x = torch.randn(2, 3, 32, 32)
    _close(_logits(model, x), static(x).detach())


def test_torchvision_resnet50_into_mmdet_mask_rcnn_backbone(torchvision_r50):
    """A detector config: the backbone is initialised exactly; fc is reported unused, neck and heads
    as model keys without a static source."""
    import os.path as osp

    from dynconv_mm.apis import build_model, load_config
    sd, _, _ = torchvision_r50
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    cfg = load_config(osp.join(root, 'tests', 'data', 'configs', 'mmdet_maskrcnn_plugin_conv.py'),
                      {'model.backbone.conv_cfg': dict(type='CondConv2d', num_experts=2)})
    model = build_model(cfg).eval()
    _, report = convert_static_to_dynamic(sd, model)
    assert sorted(report.unplaced) == ['fc.bias', 'fc.weight']
    assert any(k.startswith('neck.') for k in report.missing) and any(k.startswith('roi_head.') for k in report.missing)
    assert not any(k.startswith('backbone.') for k in report.missing)
    static = torchvision.models.resnet50(num_classes=10)
    static.load_state_dict(sd)
    static.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = static.layer4(static.layer3(static.layer2(static.layer1(static.maxpool(static.relu(static.bn1(
            static.conv1(x))))))))
        out = model.backbone(x)[-1]
    _close(out, ref)
