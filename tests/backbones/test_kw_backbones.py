"""KernelWarehouse backbones: official logits through the converter (golden fixtures), published
parameter counts, warehouse layout, multi-scale outputs, frozen stages and norm_eval in training."""
import ast
import importlib.util

import pytest
import torch
from mmengine.registry import MODELS as ROOT_MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import dynconv_mm
from dynconv_mm.backbones.kw_convnext import KWConvNeXt
from dynconv_mm.backbones.kw_mobilenetv2 import KWMobileNetV2, make_divisible
from dynconv_mm.backbones.kw_resnet import KWResNet
from dynconv_mm.converters.kernelwarehouse import convert_kernelwarehouse
from dynconv_mm.layers.kernel_warehouse import WarehouseManager

HAS_MMPRETRAIN = importlib.util.find_spec('mmpretrain') is not None

GOLDEN = ['kw_resnet18_kw1d4x.pt', 'kw_resnet_bottleneck_1111_kw1d2x.pt', 'kw_mobilenetv2_050_kw1x.pt',
          'kw_convnext_1121_d32_kw1x.pt']


# ------------------------------------------------------------------------------------------------
# official constructor call -> our mmpretrain ImageClassifier config
def classifier_cfg(constructor: str) -> dict:
    """Translate the fixture's official constructor call into an mmpretrain ``ImageClassifier`` config."""
    call = ast.parse(constructor, mode='eval').body
    name = call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id
    args = [a.id if isinstance(a, ast.Name) else ast.literal_eval(a) for a in call.args]
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    num_classes = kw.pop('num_classes', 1000)
    kw.pop('dropout', None)  # identity in eval; the official classification runs all use 0
    gap = dict(type='GlobalAveragePooling')
    if name == 'KW_ResNet':
        block, layers = args
        bottleneck = block == 'Bottleneck'
        backbone = dict(type='KWResNet', depth=50 if bottleneck else 18, stage_blocks=layers, **kw)
        neck, channels = gap, 512 * (4 if bottleneck else 1)
    elif name == 'KW_MobileNetV2':
        wf = kw.pop('width_mult', 1.0)
        backbone = dict(type='KWMobileNetV2', widen_factor=wf, **kw)
        neck, channels = gap, make_divisible(1280 * max(1.0, wf), 8)
    elif name == 'KW_ConvNeXt':
        depths, dims = kw.pop('depths', [3, 3, 9, 3]), kw.pop('dims', [96, 192, 384, 768])
        backbone = dict(type='KWConvNeXt', arch=dict(depths=depths, channels=dims), **kw)
        neck, channels = None, dims[-1]
    else:
        raise AssertionError(f'no translation for {name}')
    return dict(type='ImageClassifier', backbone=backbone, neck=neck,
                head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=channels))


class TorchClassifier(nn.Module):
    """``backbone`` + (global average pooling) + ``head.fc``: the mmpretrain classifier's computation
    and key names, for use without mmpretrain."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.backbone = ROOT_MODELS.build(cfg['backbone'])
        self.pool = cfg['neck'] is not None
        self.head = nn.Module()
        self.head.fc = nn.Linear(cfg['head']['in_channels'], cfg['head']['num_classes'])

    def forward(self, x):
        f = self.backbone(x)[-1]
        return self.head.fc(f.mean((2, 3)) if self.pool else f)


def build_classifier(cfg: dict, impl: str) -> nn.Module:
    if impl == 'mmpretrain':
        if not HAS_MMPRETRAIN:
            pytest.skip('mmpretrain is not installed')
        from mmpretrain.registry import MODELS
        return MODELS.build(cfg)
    return TorchClassifier(cfg)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) if isinstance(model, TorchClassifier) else model(x, mode='tensor')


@pytest.mark.parametrize('impl', ['mmpretrain', 'torch'])
@pytest.mark.parametrize('name', GOLDEN)
def test_official_logits_through_converter(golden, name, impl):
    ref = golden(name)
    cfg = classifier_cfg(ref['constructor'])
    model = build_classifier(cfg, impl)
    assert sum(p.numel() for p in model.parameters()) == ref['num_params']
    sd, report = convert_kernelwarehouse(ref['state_dict'], model_keys=model.state_dict())
    report.check()
    model.load_state_dict(sd, strict=True)
    model.eval()
    assert ref['outputs'], 'fixture without outputs'
    for temperature, expected in ref['outputs'].items():
        assert dynconv_mm.set_temperature(model, temperature) > 0
        with torch.no_grad():
            out = logits(model, ref['input'])
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                                   msg=lambda m: f'{name} at temperature {temperature}: {m}')


def test_temperature_changes_logits(golden):
    """Guards the parity test: the fixture's temperatures give different logits."""
    ref = golden('kw_resnet18_kw1d4x.pt')
    outs = list(ref['outputs'].values())
    assert (outs[0] - outs[-1]).abs().max() > 1e-3 * outs[0].abs().max()


# ------------------------------------------------------------------------------------------------
# published parameter counts (ImageNet heads), built on the meta device
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _kw1d2x_head_params(in_channels: int, num_classes: int = 1000) -> int:
    if HAS_MMPRETRAIN:
        from mmpretrain.registry import MODELS
        return _count(MODELS.build(dict(type='KWLinearClsHead', num_classes=num_classes, in_channels=in_channels)))
    manager = WarehouseManager(reduction=0.03125, cell_num_ratio=0.5, cell_inplane_ratio=0.025,
                               cell_outplane_ratio=1)
    head = nn.Module()
    head.warehouse_manager = manager
    head.fc = manager.reserve(in_channels, num_classes, kernel_size=1, warehouse_name='classifier',
                              layer_type='linear')
    manager.store()
    manager.allocate(head)
    return _count(head)


R = {  # cell_num_ratio, cell in/out-plane ratio
    '1/4': dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
    '1/2': dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5),
    '1': dict(cell_num_ratio=1), '2': dict(cell_num_ratio=2), '4': dict(cell_num_ratio=4)}
PUBLISHED = [
    ('KW-ResNet18 1/4x', dict(type='KWResNet', depth=18, **R['1/4']), 512, 4.03),
    ('KW-ResNet18 1/2x', dict(type='KWResNet', depth=18, **R['1/2']), 512, 7.43),
    ('KW-ResNet18 1x', dict(type='KWResNet', depth=18, **R['1']), 512, 11.93),
    ('KW-ResNet18 2x', dict(type='KWResNet', depth=18, **R['2']), 512, 23.24),
    ('KW-ResNet18 4x', dict(type='KWResNet', depth=18, **R['4']), 512, 45.86),
    ('KW-ResNet50 1/2x', dict(type='KWResNet', depth=50, nonlocal_basis_ratio=0.0625, **R['1/2']), 2048, 17.64),
    ('KW-ResNet50 1x', dict(type='KWResNet', depth=50, **R['1']), 2048, 28.05),
    ('KW-ResNet50 4x', dict(type='KWResNet', depth=50, **R['4']), 2048, 102.02),
    ('KW-MobileNetV2-1.0 1/2x', dict(type='KWMobileNetV2', widen_factor=1.0, variant='kw1d2x'), 'kw1d2x', 2.65),
    ('KW-MobileNetV2-1.0 1x', dict(type='KWMobileNetV2', widen_factor=1.0, **R['1']), 1280, 5.17),
    ('KW-MobileNetV2-1.0 4x', dict(type='KWMobileNetV2', widen_factor=1.0, sharing_range=('layer',), **R['4']), 1280,
     11.38),
    ('KW-MobileNetV2-0.5 1/2x', dict(type='KWMobileNetV2', widen_factor=0.5, variant='kw1d2x'), 'kw1d2x', 1.47),
    ('KW-MobileNetV2-0.5 1x', dict(type='KWMobileNetV2', widen_factor=0.5, **R['1']), 1280, 2.85),
    ('KW-MobileNetV2-0.5 4x', dict(type='KWMobileNetV2', widen_factor=0.5, sharing_range=('layer',), **R['4']), 1280,
     4.65),
    ('KW-ConvNeXt-T 1x', dict(type='KWConvNeXt', arch='tiny', **R['1']), 768, 39.37),
]


@pytest.mark.parametrize('name,backbone,head,millions', PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_parameter_counts(name, backbone, head, millions):
    with torch.device('meta'):
        n = _count(ROOT_MODELS.build(backbone))
    n += _kw1d2x_head_params(1280) if head == 'kw1d2x' else head * 1000 + 1000
    assert round(n / 1e6, 2) == millions, f'{name}: {n} parameters'


# ------------------------------------------------------------------------------------------------
# warehouse layout
def _kw_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, 'warehouse_id', None), int)}


def _cells(model):
    return [tuple(w.shape) for w in model.warehouse_manager.weights]


def test_resnet18_warehouses_and_handover():
    with torch.device('meta'):
        model = KWResNet(18, **R['1/4'])
    assert _cells(model) == [(56, 32, 32, 1, 1), (47, 64, 64, 1, 1), (47, 128, 128, 1, 1), (27, 256, 256, 1, 1)]
    kw = _kw_layers(model)
    assert kw['layer1.0.conv1'].warehouse_id == 0
    assert kw['layer2.0.conv1'].warehouse_id == 0          # handover: first conv of a stage uses the previous
    assert kw['layer2.0.downsample.0'].warehouse_id == 0
    assert kw['layer2.0.conv2'].warehouse_id == 1
    assert kw['layer4.1.conv2'].warehouse_id == 3
    assert isinstance(model.conv1, nn.Conv2d) and 'conv1' not in kw


def test_resnet50_plain_convs_of_layer1():
    with torch.device('meta'):
        model = KWResNet(50)
    kw = _kw_layers(model)
    assert type(model.layer1[0].conv1) is nn.Conv2d          # stage -1 -> plain
    assert type(model.layer1[0].downsample[0]) is nn.Conv2d  # stride-1 shortcut -> plain
    assert 'layer1.0.conv2' in kw and 'layer2.0.conv1' in kw and 'layer2.0.downsample.0' in kw
    assert len(model.warehouse_manager.weights) == 4


def test_mobilenetv2_kw1d2x_layout():
    with torch.device('meta'):
        model = KWMobileNetV2(0.5, variant='kw1d2x')
    kw = _kw_layers(model)
    assert len(model.warehouse_manager.weights) == 9          # + the classifier's in KWLinearClsHead
    assert type(model.layer2[1].conv[0].conv) is nn.Conv2d    # point-wise convs plain in stages 1-5
    assert type(model.layer2[1].conv[2].conv) is nn.Conv2d
    assert 'layer2.1.conv.1.conv' in kw                       # depth-wise always KW
    assert 'layer6.1.conv.0.conv' in kw and 'layer7.0.conv.2.conv' in kw and 'conv2.conv' in kw
    assert type(model.layer6[0].conv[0].conv) is nn.Conv2d    # handover block belongs to stage 5
    with pytest.raises(ValueError, match='kw1d2x'):
        KWMobileNetV2(0.5, variant='kw1d2x', cell_num_ratio=2)


def test_convnext_twelve_warehouses():
    with torch.device('meta'):
        model = KWConvNeXt(dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256]))
    assert len(model.warehouse_manager.weights) == 12
    kw = _kw_layers(model)
    assert kw['stages.2.0.pointwise_conv1'].warehouse_id == kw['stages.2.1.pointwise_conv2'].warehouse_id
    assert kw['stages.2.0.depthwise_conv'].warehouse_id != kw['stages.2.0.pointwise_conv1'].warehouse_id


@pytest.mark.parametrize('cls,kwargs,match', [
    (KWResNet, dict(depth=20), 'depth'),
    (KWResNet, dict(depth=18, out_indices=(4,)), 'out_indices'),
    (KWResNet, dict(depth=18, stage_blocks=(1, 1, 1)), 'stage_blocks'),
    (KWResNet, dict(depth=18, block='wide'), 'block'),
    (KWMobileNetV2, dict(out_indices=(8,)), 'out_indices'),
    (KWMobileNetV2, dict(variant='kw3x'), 'variant'),
    (KWMobileNetV2, dict(drop_path_rate=0.1), 'drop_path_rate'),
    (KWConvNeXt, dict(arch='giant'), 'arch'),
    (KWConvNeXt, dict(arch=dict(depths=[1, 1, 1, 1], channels=[8, 16, 32])), 'channels'),
    (KWConvNeXt, dict(frozen_stages=5), 'frozen_stages'),
])
def test_bad_arguments_fail_at_build(cls, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        cls(**kwargs)
    assert cls.__name__ in str(e.value)


# ------------------------------------------------------------------------------------------------
# dense-prediction use: multi-scale outputs, a training step, frozen stages, norm_eval
TINY = {
    'resnet': lambda **kw: KWResNet(18, stage_blocks=(1, 1, 1, 1), base_channels=16, **kw),
    'mobilenetv2': lambda **kw: KWMobileNetV2(0.25, **kw),
    'convnext': lambda **kw: KWConvNeXt(dict(depths=[1, 1, 1, 1], channels=[16, 32, 64, 128]),
                                        gap_before_final_norm=False, layer_scale_init_value=1.0, **kw),
}
FPN = {  # out_indices, expected (channels, stride) per output
    'resnet': ((0, 1, 2, 3), [(16, 4), (32, 8), (64, 16), (128, 32)]),
    'mobilenetv2': ((1, 2, 4, 7), [(8, 4), (8, 8), (24, 16), (1280, 32)]),
    'convnext': ((0, 1, 2, 3), [(16, 4), (32, 8), (64, 16), (128, 32)]),
}


@pytest.mark.parametrize('arch', list(TINY))
def test_multiscale_outputs(arch):
    out_indices, expected = FPN[arch]
    model = TINY[arch](out_indices=out_indices).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert isinstance(outs, tuple)
    assert [(o.shape[1], 64 // o.shape[2]) for o in outs] == expected
    assert all(o.shape[0] == 1 and o.shape[2] == o.shape[3] for o in outs)


def _train_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    outs = model(x)
    loss = sum(o.pow(2).mean() for o in outs)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return outs, loss


@pytest.mark.parametrize('arch', list(TINY))
def test_train_step_updates_warehouses(arch):
    out_indices, _ = FPN[arch]
    model = TINY[arch](out_indices=out_indices, drop_path_rate=0.1 if arch != 'mobilenetv2' else 0.)
    model.train()
    before = [w.detach().clone() for w in model.warehouse_manager.weights]
    outs, loss = _train_step(model, torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)
    assert len(outs) == len(out_indices)
    for i, (w, b) in enumerate(zip(model.warehouse_manager.weights, before)):
        assert w.grad is not None and w.grad.abs().sum() > 0, f'warehouse {i} got no gradient'
        assert not torch.equal(w.detach(), b), f'warehouse {i} did not change'


FROZEN = {  # frozen_stages, frozen modules, warehouses that must freeze, warehouses that must not
    'resnet': (1, ['conv1', 'bn1', 'layer1'], [], [0, 1, 2, 3]),   # warehouse 0 also serves layer2.0.conv1
    'mobilenetv2': (1, ['conv1', 'layer1'], [0], [1]),            # stem warehouse only used by conv1
    'convnext': (1, ['downsample_layers.0', 'stages.0'], [0, 4, 5], [1, 2, 3, 6]),
}


@pytest.mark.parametrize('arch', list(TINY))
def test_frozen_stages(arch):
    frozen_stages, names, frozen_wh, live_wh = FROZEN[arch]
    out_indices, _ = FPN[arch]
    model = TINY[arch](out_indices=out_indices, frozen_stages=frozen_stages)
    model.train()
    mods = dict(model.named_modules())
    frozen = [mods[n] for n in names]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not s.training for s in m.modules())
    for i in frozen_wh:
        assert not model.warehouse_manager.weights[i].requires_grad, f'warehouse {i} should be frozen'
    for i in live_wh:
        assert model.warehouse_manager.weights[i].requires_grad, f'warehouse {i} should train'
    state = {k: v.clone() for n in names for k, v in mods[n].state_dict(prefix=n + '.').items()}
    _train_step(model, torch.randn(2, 3, 32, 32))
    for k, v in model.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), f'{k} changed although frozen'
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize('arch', ['resnet', 'mobilenetv2'])
def test_norm_eval_keeps_batchnorm_statistics(arch):
    out_indices, _ = FPN[arch]
    model = TINY[arch](out_indices=out_indices, norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert any(isinstance(m, nn.BatchNorm1d) for m in bns), 'the attention BatchNorm1d should be covered'
    assert bns and all(not m.training for m in bns)
    stats = {k: v.clone() for k, v in model.state_dict().items() if 'running_' in k}
    _train_step(model, torch.randn(2, 3, 32, 32))
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), f'{k} moved under norm_eval'
    # without norm_eval the statistics move
    model = TINY[arch](out_indices=out_indices).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if 'running_mean' in k}
    _train_step(model, torch.randn(2, 3, 32, 32))
    assert any(not torch.equal(v, stats[k]) for k, v in model.state_dict().items() if k in stats)


def test_convnext_classification_output_is_pooled_then_normed():
    model = KWConvNeXt(dict(depths=[1, 1, 1, 1], channels=[16, 32, 64, 128])).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (out,) = model(x)
        model.gap_before_final_norm = False
        (dense,) = model(x)
    assert out.shape == (2, 128) and dense.shape == (2, 128, 2, 2)
    feat = x
    with torch.no_grad():
        for i in range(4):
            feat = model.stages[i](model.downsample_layers[i](feat))
        expected = nn.functional.layer_norm(feat.mean((2, 3)), (128,), model.norm3.weight, model.norm3.bias, 1e-6)
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(not HAS_MMPRETRAIN, reason='mmpretrain is not installed')
def test_convnext_layer_decay_groups_match_mmpretrain():
    from types import SimpleNamespace

    from mmpretrain.models.backbones import ConvNeXt
    from mmpretrain.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
    for arch in ('tiny', 'small'):
        with torch.device('meta'):
            backbone = KWConvNeXt(arch)
        names = [n for n, _ in backbone.named_parameters(prefix='backbone')] + ['head.fc.weight']
        ref_self = SimpleNamespace(depths=backbone.depths)
        for n in names:
            assert backbone.get_layer_depth(n, 'backbone.') == ConvNeXt.get_layer_depth(ref_self, n, 'backbone.'), n
    model = MODELS.build(dict(type='ImageClassifier', backbone=dict(type='KWConvNeXt', arch=dict(
        depths=[1, 1, 1, 1], channels=[16, 32, 64, 128])), head=dict(type='LinearClsHead', num_classes=10,
                                                                   in_channels=128)))
    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type='LearningRateDecayOptimWrapperConstructor',
        optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        paramwise_cfg=dict(layer_decay_rate=0.5)))
    wrapper = constructor(model)
    lrs = {id(p): g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
    assert lrs[id(model.backbone.warehouse_manager.weights[0])] == 1.0
    assert lrs[id(model.backbone.stages[0][0].gamma)] == 0.5 ** (8 - 1 - 1)  # num_layers 8, stage 0 = layer 1


# ------------------------------------------------------------------------------------------------
# converted ImageNet weights in dense-prediction models
def test_converted_weights_initialise_a_dense_backbone(golden, tmp_path):
    """mmdet/mmseg load ImageNet weights with ``init_cfg=dict(type='Pretrained', prefix='backbone.')``."""
    from dynconv_mm.converters.common import save_checkpoint_file
    ref = golden('kw_resnet18_kw1d4x.pt')
    sd, report = convert_kernelwarehouse(ref['state_dict'])
    report.check()
    path = str(tmp_path / 'kw1d4x_r18.pth')
    save_checkpoint_file(sd, path)
    backbone = ROOT_MODELS.build(dict(
        type='KWResNet', depth=18, cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
        out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.')))
    backbone.init_weights()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, sd['backbone.' + k]), k
    backbone.eval()
    with torch.no_grad():
        feats = backbone(ref['input'])
        logits = nn.functional.linear(feats[-1].mean((2, 3)), sd['head.fc.weight'], sd['head.fc.bias'])
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    expected = ref['outputs'][0.0]   # dense models run at temperature 0 (the layers' initial value)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.skipif(importlib.util.find_spec('mmdet') is None, reason='mmdet is not installed')
def test_mmdet_fpn_on_kw_backbones():
    from mmdet.registry import MODELS
    for backbone, channels in [
            (dict(type='KWResNet', depth=18, stage_blocks=(1, 1, 1, 1), base_channels=16, out_indices=(0, 1, 2, 3),
                  frozen_stages=1, norm_eval=True), [16, 32, 64, 128]),
            (dict(type='KWMobileNetV2', widen_factor=0.25, out_indices=(1, 2, 4, 7), frozen_stages=1,
                  norm_eval=True), [8, 8, 24, 1280])]:
        model = MODELS.build(backbone)
        neck = MODELS.build(dict(type='FPN', in_channels=channels, out_channels=8, num_outs=5))
        model.train()
        outs = neck(model(torch.randn(2, 3, 64, 64)))
        assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1] and all(o.shape[1] == 8 for o in outs)
        sum(o.mean() for o in outs).backward()
        assert model.warehouse_manager.weights[-1].grad is not None


@pytest.mark.skipif(importlib.util.find_spec('mmseg') is None, reason='mmseg is not installed')
def test_mmseg_uperhead_on_kw_convnext():
    from mmseg.registry import MODELS
    model = MODELS.build(dict(type='KWConvNeXt', arch=dict(depths=[1, 1, 1, 1], channels=[16, 32, 64, 128]),
                              out_indices=(0, 1, 2, 3), gap_before_final_norm=False, drop_path_rate=0.1))
    head = MODELS.build(dict(type='UPerHead', in_channels=[16, 32, 64, 128], in_index=[0, 1, 2, 3],
                             channels=8, num_classes=3, norm_cfg=dict(type='BN')))
    model.train()
    head.train()
    logits = head(model(torch.randn(2, 3, 64, 64)))
    assert logits.shape == (2, 3, 16, 16)
    logits.mean().backward()
    assert all(w.grad is not None for w in model.warehouse_manager.weights)


@pytest.mark.parametrize('frozen_stages,frozen', [(-1, []), (0, []), (1, []), (2, [0]), (3, [0, 1]),
                                                  (4, [0, 1, 2, 3])])
def test_resnet_warehouse_freezing_follows_handover(frozen_stages, frozen):
    """A warehouse freezes only when every layer drawing from it is frozen: stage s's warehouse also
    serves the first convolution (and shortcut) of stage s + 1."""
    with torch.device('meta'):
        model = KWResNet(18, frozen_stages=frozen_stages)
    model.train()
    assert [i for i, w in enumerate(model.warehouse_manager.weights) if not w.requires_grad] == frozen
    assert model.bn1.training == (frozen_stages < 0)


def test_official_string_sharing_range_gives_the_same_warehouses():
    with torch.device('meta'):
        a = KWResNet(18, sharing_range='layer_conv', **R['1/2'])
        b = KWResNet(18, sharing_range=('layer', 'conv'), **R['1/2'])
    assert _cells(a) == _cells(b) == [(112, 32, 32, 1, 1), (94, 64, 64, 1, 1), (94, 128, 128, 1, 1),
                                      (54, 256, 256, 1, 1)]
