"""DWNet backbone: official parity (golden fixtures), published sizes, dense-prediction behaviour."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynconv_mm.backbones.dwnet import DWNet, SpatialBlock
from dynconv_mm.converters.dwnet import convert_dwnet
from dynconv_mm.layers.dynamic_dw import DynamicDWConv2d, IDynamicDWConv2d

TINY = dict(embed_dims=8, depths=[1, 1, 1, 1], drop_path_rate=0.)


def _randomise_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (_BatchNorm, nn.LayerNorm)):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


class _Classifier(nn.Module):
    """DWNet + global average pooling + Linear, with mmpretrain's ``ImageClassifier`` key names."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__()
        self.backbone = DWNet(**kwargs)
        self.head = nn.Module()
        self.head.fc = nn.Linear(self.backbone.num_features[-1], num_classes)

    def forward(self, x):
        return self.head.fc(self.backbone(x)[-1].mean((2, 3)))


GOLDEN = [('dwnet_static_d32_1121.pt', False), ('dwnet_dynamic_d32_1121.pt', True)]


def _golden_kwargs(dynamic):
    return dict(embed_dims=32, depths=[1, 1, 2, 1], window_size=7, dynamic=dynamic, drop_path_rate=0.)


@pytest.mark.parametrize('name, dynamic', GOLDEN)
def test_golden_classifier(golden, name, dynamic):
    ref = golden(name)
    model = _Classifier(10, **_golden_kwargs(dynamic))
    assert sum(p.numel() for p in model.parameters()) == ref['num_params']
    sd, report = convert_dwnet(ref['state_dict'], model_keys=model.state_dict())
    report.check()
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref['input'])
    expected = ref['outputs'][0.0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize('name, dynamic', GOLDEN)
def test_golden_mmpretrain_classifier(golden, name, dynamic):
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    from mmpretrain.registry import MODELS

    import dynconv_mm  # noqa: F401  (registers DWNet in mmpretrain's MODELS)
    ref = golden(name)
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='DWNet', **_golden_kwargs(dynamic)),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=256)))
    assert sum(p.numel() for p in model.parameters()) == ref['num_params']
    sd, report = convert_dwnet(ref['state_dict'], model_keys=model.state_dict())
    report.check()
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref['input'], mode='tensor')
    expected = ref['outputs'][0.0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize('arch, dynamic, millions', [
    ('tiny', False, 24.17), ('tiny', True, 51.13), ('base', False, 74.35), ('base', True, 161.60)])
def test_published_param_counts(arch, dynamic, millions):
    """Published sizes with an ImageNet head (final LayerNorm + Linear(8C, 1000))."""
    model = DWNet(arch=arch, dynamic=dynamic)
    c = model.num_features[-1]
    n = sum(p.numel() for p in model.parameters()) + c * 1000 + 1000
    assert round(n / 1e6, 2) == millions
    del model


def test_arch_settings_and_custom():
    m = DWNet(arch='base')
    assert m.embed_dims == 128 and m.depths == [2, 2, 18, 2] and m.num_features == [128, 256, 512, 1024]
    m = DWNet(arch='tiny', embed_dims=16, depths=[1, 2])
    assert m.num_features == [16, 32] and len(m.layers) == 2 and m.out_indices == (1,)
    assert m.layers[0].downsample is not None and m.layers[1].downsample is None
    m = DWNet(arch=dict(embed_dims=8, depths=[1, 1, 1]), out_indices=(0, -1))
    assert m.out_indices == (0, 2)


def test_block_conv_types():
    static = DWNet(**TINY)
    dyn = DWNet(dynamic=True, **TINY)
    inh = DWNet(inhomogeneous=True, **TINY)
    conv = lambda m: m.layers[1].blocks[0].attn2conv.conv  # noqa: E731
    assert type(conv(static)) is nn.Conv2d and conv(static).groups == 16 and conv(static).kernel_size == (7, 7)
    assert isinstance(conv(dyn), DynamicDWConv2d) and conv(dyn).padding == (3, 3)
    assert isinstance(conv(inh), IDynamicDWConv2d)
    # 32 kernel groups per stage unless told otherwise; the official tiny config's "heads"
    tiny = DWNet(arch='tiny', inhomogeneous=True)
    assert [s.blocks[0].attn2conv.conv.group_channels for s in tiny.layers] == [3, 6, 12, 24]
    assert all(s.blocks[0].attn2conv.conv.num_kernel_groups == 32 for s in tiny.layers)
    m = DWNet(inhomogeneous=True, inhomo_group_channels=2, **TINY)
    assert [s.blocks[0].attn2conv.conv.num_kernel_groups for s in m.layers] == [4, 8, 16, 32]


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='huge'), 'arch'),
    (dict(mode='detection'), 'mode'),
    (dict(out_indices=(4,)), 'out_indices'),
    (dict(frozen_stages=5), 'frozen_stages'),
    (dict(window_size=6), 'window_size'),
    (dict(depths=[]), 'depths'),
    (dict(inhomogeneous=True, inhomo_group_channels=[3, 3, 3, 3], embed_dims=8, depths=[1, 1, 1, 1]),
     'inhomo_group_channels'),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        DWNet(**kwargs)
    assert 'DWNet' in str(e.value)


def test_classification_output_is_layer_normed_tokens():
    model = _randomise_norms(DWNet(**TINY)).eval()
    x = torch.randn(2, 3, 64, 64)
    (out,) = model(x)
    assert out.shape == (2, 64, 2, 2)
    # output = LayerNorm over channels of the last stage's tokens
    model.norm3 = nn.Identity()
    with torch.no_grad():
        raw = model(x)[0]
        ref = F.layer_norm(raw.permute(0, 2, 3, 1), (64,))
    ln = _randomise_norms(DWNet(**TINY)).norm3
    torch.testing.assert_close(out, (ref * ln.weight + ln.bias).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# dense prediction
DENSE = dict(mode='dense', out_indices=(0, 1, 2, 3), **TINY)


@pytest.mark.parametrize('size, expected', [
    ((70, 90), [(18, 23), (9, 12), (5, 6), (3, 3)]),
    ((250, 333), [(63, 84), (32, 42), (16, 21), (8, 11)]),   # measured with the official backbone
])
@pytest.mark.parametrize('conv', ['static', 'dynamic', 'inhomogeneous'])
def test_dense_multiscale_shapes(size, expected, conv):
    model = DWNet(dynamic=conv == 'dynamic', inhomogeneous=conv == 'inhomogeneous', **DENSE).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape) for o in outs] == [(1, c, h, w) for c, (h, w) in zip([8, 16, 32, 64], expected)]
    assert all(isinstance(getattr(model, f'norm{i}'), nn.BatchNorm2d) for i in range(4))


def test_dense_block_pads_to_window_and_crops():
    """Official dense block: zero-pad right/bottom to a multiple of 7 *before* conv0/BN, crop after."""
    block = _randomise_norms(SpatialBlock(8, 7, conv_type='dynamic', pad_to_window=True)).eval()
    x = torch.randn(2, 9, 11, 8)
    with torch.no_grad():
        out = block(x)
        y = block.attn2conv(F.pad(x, (0, 0, 0, 3, 0, 5)).permute(0, 3, 1, 2))  # 9 -> 14, 11 -> 14
        x1 = x + y[:, :, :9, :11].permute(0, 2, 3, 1)
        ref = x1 + block.mlp(block.bn(x1.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        no_pad = copy.deepcopy(block)
        no_pad.pad_to_window = False
        differs = no_pad(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, differs, atol=1e-3)   # the padding is not the conv's own zero padding


def test_dense_equals_classification_on_window_multiples():
    """At 224x224 every map (56, 28, 14, 7) is a multiple of 7: no padding, same features."""
    cls = _randomise_norms(DWNet(dynamic=True, out_indices=(0, 1, 2, 3), **TINY)).eval()
    dense = DWNet(dynamic=True, out_norm_cfg=dict(type='LN'), **DENSE).eval()
    dense.load_state_dict(cls.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        for a, b in zip(cls(x), dense(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 3, 70, 90)
        assert not torch.allclose(cls(x)[0], dense(x)[0], atol=1e-3)


@pytest.mark.parametrize('conv', ['dynamic', 'inhomogeneous'])
def test_dense_train_step(conv):
    model = DWNet(dynamic=True, inhomogeneous=conv == 'inhomogeneous', **dict(DENSE, drop_path_rate=0.1))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outs = model(torch.randn(2, 3, 70, 90))
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)   # (BN-normalised outputs: no plain norms)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    after = model.state_dict()
    conv_keys = [k for k in before if '.attn2conv.conv.' in k and k.endswith('weight')]
    assert conv_keys and all(not torch.equal(before[k], after[k]) for k in conv_keys)
    assert not torch.equal(before['layers.0.blocks.0.bn.running_mean'], after['layers.0.blocks.0.bn.running_mean'])


def test_frozen_stages():
    model = DWNet(dynamic=True, frozen_stages=2, **DENSE)
    model.train()
    frozen = [model.patch_embed, model.layers[0], model.layers[1], model.norm0, model.norm1]
    live = [model.layers[2], model.layers[3], model.norm2, model.norm3]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not sub.training for sub in m.modules())
    for m in live:
        assert all(p.requires_grad for p in m.parameters())
        assert all(sub.training for sub in m.modules())
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        is_frozen = k.startswith(('patch_embed.', 'layers.0.', 'layers.1.', 'norm0.', 'norm1.'))
        if is_frozen:
            assert not changed, k
    assert not torch.equal(before['layers.2.blocks.0.attn2conv.conv0.weight'],
                           after['layers.2.blocks.0.attn2conv.conv0.weight'])
    assert not torch.equal(before['norm3.running_mean'], after['norm3.running_mean'])
    # all frozen: every parameter, still after another train()
    model = DWNet(frozen_stages=4, **DENSE).train()
    assert not any(p.requires_grad for p in model.parameters())


def test_norm_eval():
    model = DWNet(dynamic=True, norm_eval=True, **DENSE)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) > 10 and all(not m.training for m in bns)
    assert model.training and model.layers[0].blocks[0].mlp.training
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_syncbn_swap():
    model = DWNet(dynamic=True, norm_cfg=dict(type='SyncBN'), **DENSE)
    syncs = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    plain = [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d,) or
             (isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm))]
    assert not plain
    assert 'layers.0.blocks.0.attn2conv.conv.bn' in syncs and 'norm2' in syncs and 'layers.3.blocks.0.bn' in syncs
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 40, 40))
    assert len(outs) == 4


def test_with_cp_matches():
    model = DWNet(dynamic=True, **DENSE).train()
    model_cp = DWNet(dynamic=True, with_cp=True, **DENSE).train()
    model_cp.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 48, 40)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    sum(o.sum() for o in model(x1)).backward()
    sum(o.sum() for o in model_cp(x2)).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    g1 = model.layers[1].blocks[0].attn2conv.conv.conv2.weight.grad
    g2 = model_cp.layers[1].blocks[0].attn2conv.conv.conv2.weight.grad
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_init_weights():
    model = DWNet(arch='tiny', embed_dims=32, depths=[1, 1, 1, 1])
    model.init_weights()
    fc = model.layers[2].blocks[0].mlp.fc1.weight
    assert abs(fc.std().item() - 0.02) < 0.002
    assert torch.all(model.layers[2].blocks[0].mlp.fc1.bias == 0)
    assert torch.all(model.norm3.weight == 1) and torch.all(model.patch_embed.norm.bias == 0)


def test_registries():
    from mmengine.registry import MODELS

    import dynconv_mm  # noqa: F401
    m = MODELS.build(dict(type='DWNet', dynamic=True, **TINY))
    assert isinstance(m, DWNet)
    for scope in ('mmdet', 'mmseg', 'mmpretrain'):
        try:
            reg = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
        except ImportError:
            continue
        assert isinstance(reg.build(dict(type='DWNet', **DENSE)), DWNet)


def test_dense_outputs_feed_mmdet_fpn():
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    from mmdet.registry import MODELS

    import dynconv_mm  # noqa: F401
    backbone = MODELS.build(dict(type='DWNet', dynamic=True, **DENSE)).eval()
    neck = MODELS.build(dict(type='FPN', in_channels=backbone.num_features, out_channels=16, num_outs=5)).eval()
    with torch.no_grad():
        outs = neck(backbone(torch.randn(1, 3, 70, 90)))
    assert [tuple(o.shape[2:]) for o in outs] == [(18, 23), (9, 12), (5, 6), (3, 3), (2, 2)]
