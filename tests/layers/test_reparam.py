"""Re-parameterized layers: golden parity with the official code, exact fusion, deploy form, training."""
import copy
import functools
import math
import os.path as osp

import conftest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv_mm.analysis.complexity import count_parameters
from dynconv_mm.converters.common import compare_with
from dynconv_mm.converters.doconv import convert_doconv
from dynconv_mm.converters.orepa import convert_orepa_block
from dynconv_mm.layers.reparam import (
    DBB,
    OREPA,
    ConvNorm,
    DOConv2d,
    OREPA_1x1,
    OREPA_LargeConv,
    RepVGGBlock,
    RepVGGBlock_OREPA,
    avg_pool_kernel,
    compose_1x1_kxk,
    fuse_conv_norm,
    identity_kernel,
    leaf_module_types,
    pad_kernel,
    reparameterize_model,
)
from dynconv_mm.layers.reparam.orepa import orepa_prior

BN = dict(type='BN')


def assert_rel(ours, ref, rtol):
    """max |ours - ref| <= rtol * max |ref|."""
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f'max abs error {err:.3g} > {rtol} * {scale:.3g}'


def assert_golden(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


#: every BatchNorm with non-trivial statistics and affine parameters
randomize_norms = functools.partial(conftest.randomize_norms, seed=1, mean_scale=0.5, affine=True, bias_scale=0.5)


def randomize_params(model, seed=2):
    """Make zero-initialised parameters (DO-Conv's D, OREPA's idconv1, the prior scale) non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith('vector'):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


# ------------------------------------------------------------------------------------------------
# golden fixtures (official code)
@pytest.mark.parametrize('case', ['case0', 'case1', 'case2', 'case3', 'case4'])
def test_doconv_golden(golden, case):
    c = golden('doconv_layers.pt')['cases'][case]
    layer = DOConv2d(**c['args']).eval()
    sd, report = convert_doconv(c['state_dict'])
    compare_with(report, sd, layer.state_dict()).check()
    if 'd_diag' in c['state_dict']:
        assert 'd_diag' in report.dropped
    layer.load_state_dict(sd)
    with torch.no_grad():
        assert_golden(layer(c['input']), c['output'])
        layer.switch_to_deploy()
        assert_golden(layer(c['input']), c['output'])
    assert isinstance(layer.reparam, nn.Conv2d) and not hasattr(layer, 'W')


_OREPA_CLASSES = {'OREPA_k3': OREPA, 'OREPA_k3_s2_g2': OREPA, 'OREPA_1x1': OREPA_1x1,
                  'OREPA_LargeConv_k7': OREPA_LargeConv}


@pytest.mark.parametrize('case', sorted(_OREPA_CLASSES))
def test_orepa_golden(golden, case):
    c = golden('orepa_blocks.pt')['cases'][case]
    cls = _OREPA_CLASSES[case]
    layer = cls(**c['args'], norm_cfg=BN).eval()
    sd, report = convert_orepa_block(c['state_dict'])
    compare_with(report, sd, layer.state_dict()).check()
    layer.load_state_dict(sd)
    with torch.no_grad():
        assert_golden(layer(c['input']), c['output'])
        layer.switch_to_deploy()
        assert_golden(layer(c['input']), c['deploy_output'])
    # our fused weights equal the official deployed ones
    dsd, report = convert_orepa_block(c['deploy_state_dict'])
    for k, v in dsd.items():
        assert_golden(layer.state_dict()[k], v)
    # the official deploy checkpoint loads into a deploy-built layer
    deployed = cls(**c['args'], norm_cfg=BN, deploy=True).eval()
    compare_with(report, dsd, deployed.state_dict()).check()
    deployed.load_state_dict(dsd)
    with torch.no_grad():
        assert_golden(deployed(c['input']), c['deploy_output'])


_OFFICIAL_BLOCKS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'data', 'reparam_official_blocks.pt')
_BLOCK_CLASSES = {'DBB': DBB, 'RepVGGBlock': RepVGGBlock, 'RepVGGBlock_OREPA': RepVGGBlock_OREPA}


@pytest.mark.parametrize('case', ['DBB', 'DBB_s2_g2', 'DBB_dw', 'RepVGGBlock', 'RepVGGBlock_s2', 'RepVGGBlock_OREPA',
                                  'RepVGGBlock_OREPA_s2'])
def test_dbb_repvgg_match_official(case):
    """Reference outputs of the official DBB / RepVGG / RepVGG-OREPA blocks (tests/data, tensors only)."""
    c = torch.load(_OFFICIAL_BLOCKS, weights_only=True)['cases'][case]
    args = {k: v for k, v in c['args'].items() if k != 'padding'}
    layer = _BLOCK_CLASSES[c['block']](**args).eval()
    sd, report = convert_orepa_block(c['state_dict'])
    compare_with(report, sd, layer.state_dict()).check()
    layer.load_state_dict(sd)
    with torch.no_grad():
        assert_golden(layer(c['input']), c['output'])
        layer.switch_to_deploy()
        assert_golden(layer(c['input']), c['deploy_output'])
    dsd, report = convert_orepa_block(c['deploy_state_dict'])
    deployed = _BLOCK_CLASSES[c['block']](**args, deploy=True).eval()
    compare_with(report, dsd, deployed.state_dict()).check()
    deployed.load_state_dict(dsd)
    with torch.no_grad():
        assert_golden(deployed(c['input']), c['deploy_output'])


def test_orepa_prior_matches_official_formula_for_3x3():
    out = 5
    prior = orepa_prior(out, 3)
    half = out / 2
    for o in range(out):
        for h in range(3):
            for w in range(3):
                ref = math.cos(math.pi * (h + 0.5) * (o + 1) / 3) if o < half else \
                    math.cos(math.pi * (w + 0.5) * (o + 1 - half) / 3)
                assert abs(prior[o, h, w].item() - ref) < 1e-6
    assert torch.isfinite(orepa_prior(8, 5)).all()


# ------------------------------------------------------------------------------------------------
# the fusion toolkit against plain PyTorch
def test_fuse_conv_norm_matches_conv_then_bn():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = randomize_norms(nn.BatchNorm2d(6).double()).eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    k, b = fuse_conv_norm(conv.weight, conv.bias, bn)
    assert_rel(F.conv2d(x, k, b, padding=1), bn(conv(x)), 1e-12)
    bn2 = randomize_norms(nn.BatchNorm2d(6, affine=False).double()).eval()
    k, b = fuse_conv_norm(conv.weight, None, bn2)
    assert_rel(F.conv2d(x, k, b, padding=1), bn2(F.conv2d(x, conv.weight, padding=1)), 1e-12)


@pytest.mark.parametrize('groups', [1, 2])
def test_compose_1x1_kxk_matches_two_convs(groups):
    k1 = torch.randn(6, 4 // groups, 1, 1, dtype=torch.float64)
    b1 = torch.randn(6, dtype=torch.float64)
    k2 = torch.randn(8, 6 // groups, 3, 3, dtype=torch.float64)
    b2 = torch.randn(8, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    k, b = compose_1x1_kxk(k1, b1, k2, b2, groups)
    ref = F.conv2d(F.conv2d(x, k1, b1, groups=groups), k2, b2, groups=groups)   # unpadded kxk: exact with bias
    assert_rel(F.conv2d(x, k, b, groups=groups), ref, 1e-12)


@pytest.mark.parametrize('groups', [1, 3])
def test_avg_identity_pad_kernels(groups):
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    avg = avg_pool_kernel(6, 3, groups, dtype=torch.float64)
    assert avg.shape == (6, 6 // groups, 3, 3)
    assert_rel(F.conv2d(x, avg, padding=1, groups=groups), F.avg_pool2d(x, 3, 1, 1), 1e-12)
    ident = identity_kernel(6, groups, 3, dtype=torch.float64)
    assert_rel(F.conv2d(x, ident, padding=1, groups=groups), x, 0)
    k1 = torch.randn(9, 6 // groups, 1, 1, dtype=torch.float64)
    assert_rel(F.conv2d(x, pad_kernel(k1, 3), padding=1, groups=groups), F.conv2d(x, k1, groups=groups), 1e-12)
    with pytest.raises(ValueError):
        pad_kernel(k1, 2)


# ------------------------------------------------------------------------------------------------
# every layer: deploy form equals the training form, and is exactly a plain conv
def _layers():
    """(id, constructor, has_bias_after_deploy, activation type or None)."""
    return [
        ('doconv3x3', lambda: DOConv2d(4, 8, 3, padding=1), True, None),
        ('doconv_dw', lambda: DOConv2d(8, 8, 3, padding=1, groups=8, bias=False), False, None),
        ('doconv_g2_dmul12_s2', lambda: DOConv2d(4, 8, 3, D_mul=12, stride=2, padding=1, groups=2), True, None),
        ('doconv1x1', lambda: DOConv2d(4, 6, 1), True, None),
        ('doconv_3x1_reflect', lambda: DOConv2d(4, 6, (3, 1), padding=(1, 0), padding_mode='reflect'), True, None),
        ('doconv_dil2', lambda: DOConv2d(4, 6, 3, padding=2, dilation=2, bias=False), False, None),
        ('orepa_bn_relu', lambda: OREPA(4, 8, 3, norm_cfg=BN, act_cfg=dict(type='ReLU')), True, nn.ReLU),
        ('orepa_conv_only', lambda: OREPA(4, 8, 3), False, None),
        ('orepa_conv_bias', lambda: OREPA(4, 8, 3, stride=2, bias=True), True, None),
        ('orepa_g8_T2I', lambda: OREPA(8, 16, 3, groups=8, norm_cfg=BN), True, None),
        ('orepa_dil2', lambda: OREPA(4, 4, 3, dilation=2, norm_cfg=BN), True, None),
        ('orepa_k5', lambda: OREPA(4, 6, 5, norm_cfg=BN), True, None),
        ('orepa_1x1_up', lambda: OREPA_1x1(4, 8, norm_cfg=BN), True, None),
        ('orepa_1x1_down_s2', lambda: OREPA_1x1(8, 4, stride=2), False, None),
        ('orepa_large7', lambda: OREPA_LargeConv(3, 8, 7, stride=2, norm_cfg=BN, act_cfg=dict(type='ReLU')), True,
         nn.ReLU),
        ('orepa_large5_conv_only', lambda: OREPA_LargeConv(4, 6, 5), False, None),
        ('repvgg_orepa_id', lambda: RepVGGBlock_OREPA(6, 6, 3), True, nn.ReLU),
        ('repvgg_orepa_s2', lambda: RepVGGBlock_OREPA(4, 8, 3, stride=2, act_cfg=None), True, None),
        ('dbb', lambda: DBB(4, 8, 3), True, None),
        ('dbb_s2_g2', lambda: DBB(4, 8, 3, stride=2, groups=2, act_cfg=dict(type='ReLU')), True, nn.ReLU),
        ('dbb_dw', lambda: DBB(6, 6, 3, groups=6), True, None),
        ('dbb_T2I', lambda: DBB(4, 8, 3, internal_channels_1x1_3x3=8), True, None),
        ('repvgg_id', lambda: RepVGGBlock(6, 6, 3), True, nn.ReLU),
        ('repvgg_s2_g2_se', lambda: RepVGGBlock(4, 8, 3, stride=2, groups=2, use_se=True), True, nn.ReLU),
        ('repvgg_dil2', lambda: RepVGGBlock(6, 6, 3, dilation=2, act_cfg=None), True, None),
        ('convnorm', lambda: ConvNorm(4, 8, 1, stride=2), True, None),
    ]


_LAYERS = _layers()


def _input_channels(layer):
    return layer.in_channels if hasattr(layer, 'in_channels') else layer.conv.in_channels


@pytest.mark.parametrize('dtype,rtol', [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize('name,make,has_bias,act', _LAYERS, ids=[x[0] for x in _LAYERS])
def test_deploy_equals_training_form(name, make, has_bias, act, dtype, rtol):
    layer = randomize_norms(randomize_params(make())).to(dtype).eval()
    x = torch.randn(2, _input_channels(layer), 11, 11, dtype=dtype)
    with torch.no_grad():
        before = layer(x)
        reparameterize_model(layer)
        after = layer(x)
    assert_rel(after, before, rtol)
    # exactly one plain conv (+ the activation / SE the block keeps)
    conv = layer.reparam
    assert type(conv) is nn.Conv2d and conv.weight.dtype == dtype
    assert (conv.bias is not None) == has_bias
    expected_types = [nn.Conv2d] + ([act] if act is not None else [])
    se = getattr(layer, 'se', None)
    extra = count_parameters(se) if se is not None else 0
    if se is not None:
        expected_types = [nn.Conv2d, nn.Conv2d, nn.Conv2d] + ([act] if act is not None else [])
    assert sorted(t.__name__ for t in leaf_module_types(layer)) == sorted(t.__name__ for t in expected_types)
    assert count_parameters(layer) == conv.weight.numel() + (conv.bias.numel() if has_bias else 0) + extra
    assert len(list(layer.buffers())) == 0
    # idempotent
    state = copy.deepcopy(layer.state_dict())
    reparameterize_model(layer)
    assert layer.reparam is conv and layer.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize('name,make,has_bias,act', _LAYERS, ids=[x[0] for x in _LAYERS])
def test_train_step(name, make, has_bias, act):
    layer = make().train()
    x = torch.randn(2, _input_channels(layer), 9, 9)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    out = layer(x)
    out.pow(2).mean().backward()
    params = dict(layer.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, f'no gradient for {missing}'
    assert all(torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in params.items())


def test_deploy_built_layers_have_the_deployed_keys():
    for make, kwargs in [(lambda **k: OREPA(4, 8, 3, norm_cfg=BN, **k), {}), (lambda **k: DBB(4, 8, 3, **k), {}),
                         (lambda **k: RepVGGBlock(4, 4, 3, **k), {}), (lambda **k: DOConv2d(4, 8, 3, **k), {}),
                         (lambda **k: OREPA_LargeConv(3, 8, 7, **k), {})]:
        trained = make()
        trained.switch_to_deploy()
        built = make(deploy=True)
        assert {k: v.shape for k, v in trained.state_dict().items()} == \
            {k: v.shape for k, v in built.state_dict().items()}


def test_official_initialisation():
    layer = OREPA(4, 8, 3, init_hyper_gamma=4.0)
    torch.testing.assert_close(layer.vector, torch.tensor([0.5, 0.5, 0.0, 1.0, 2.0, 1.0]).reshape(6, 1).expand(6, 8))
    assert not layer.weight_orepa_1x1_kxk_idconv1.any() and layer.internal_channels == 4
    assert OREPA(8, 8, 3, groups=8).internal_channels == 16      # T = 2I when groups > 4
    single = OREPA(4, 8, 3, single_init=True)
    torch.testing.assert_close(single.vector[:, 0], torch.tensor([1.0, 0, 0, 0, 0, 0]))
    # init_hyper_para scales the branch weights (same random draws)
    torch.manual_seed(3)
    a = OREPA(4, 8, 3)
    torch.manual_seed(3)
    b = OREPA(4, 8, 3, init_hyper_para=4.0)
    torch.testing.assert_close(b.weight_orepa_origin, 4 * a.weight_orepa_origin)
    torch.testing.assert_close(b.weight_orepa_gconv_dw, 2 * a.weight_orepa_gconv_dw)
    up, down = OREPA_1x1(4, 8), OREPA_1x1(8, 4)
    assert torch.equal(up.weight_or1x1_l2i_conv1.flatten(1), torch.eye(4))
    assert torch.equal(down.weight_or1x1_l2i_conv2.flatten(1), torch.eye(4))
    torch.testing.assert_close(up.vector[:, 0], torch.tensor([1.0, 0.5]))
    rv = RepVGGBlock_OREPA(4, 4, 3).rbr_dense
    torch.testing.assert_close(rv.vector[:, 0], torch.tensor([0.25, 0.25, 0.0, 0.5, 0.5]))
    assert DOConv2d(4, 8, 3).D.abs().sum() == 0


def test_frozen_layer_stays_frozen_after_deploy():
    layer = OREPA(4, 8, 3, norm_cfg=BN).requires_grad_(False)
    layer.switch_to_deploy()
    assert not any(p.requires_grad for p in layer.parameters())
    layer = DBB(4, 8, 3)
    layer.switch_to_deploy()
    assert all(p.requires_grad for p in layer.parameters())


def test_gradcheck_doconv_and_orepa():
    torch.manual_seed(0)
    do = randomize_params(DOConv2d(2, 3, 3, D_mul=10, padding=1, groups=1).double())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    names = ['W', 'D', 'bias']

    def f_do(x, *params):
        return torch.func.functional_call(do, dict(zip(names, params)), (x,))
    params = [getattr(do, n).detach().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f_do, (x, *params), fast_mode=True)

    orepa = randomize_params(OREPA(2, 4, 3, groups=2, bias=True).double())
    pnames = [n for n, _ in orepa.named_parameters()]

    def f_or(x, *params):
        return torch.func.functional_call(orepa, dict(zip(pnames, params)), (x,))
    params = [p.detach().clone().requires_grad_() for p in orepa.parameters()]
    assert torch.autograd.gradcheck(f_or, (x, *params), fast_mode=True)


# ------------------------------------------------------------------------------------------------
# build-time errors
@pytest.mark.parametrize('make,match', [
    (lambda: DOConv2d(6, 8, 3, groups=4), 'DOConv2d'),
    (lambda: DOConv2d(4, 8, 3, D_mul=4), 'D_mul'),
    (lambda: OREPA(4, 8, 3, groups=3), 'OREPA'),
    (lambda: OREPA_1x1(4, 8, groups=2), 'OREPA_1x1'),
    (lambda: OREPA_1x1(4, 8, 3), 'OREPA_1x1'),
    (lambda: OREPA_LargeConv(4, 8, 6), 'OREPA_LargeConv'),
    (lambda: OREPA_LargeConv(4, 8, 7, groups=2), 'OREPA_LargeConv'),
    (lambda: DBB(4, 8, 3, dilation=2, padding=2), 'DBB'),
    (lambda: DBB(4, 8, 3, padding=0), 'DBB'),
    (lambda: DBB(4, 8, 3, bias=True), 'DBB'),
    (lambda: RepVGGBlock(4, 8, 3, padding=0), 'RepVGGBlock'),
    (lambda: RepVGGBlock_OREPA(4, 8, 3, groups=2), 'OREPA3x3RepVGG'),
])
def test_bad_arguments_fail_at_build_time(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------
# OpenMMLab integration: conv_cfg
def test_build_conv_layer():
    mmcv_cnn = pytest.importorskip('mmcv.cnn', reason='mmcv is not installed')
    for name in ['DOConv2d', 'OREPA', 'OREPA_1x1', 'DBB', 'RepVGGBlock', 'RepVGGBlock_OREPA']:
        k = 1 if name == 'OREPA_1x1' else 3
        layer = mmcv_cnn.build_conv_layer(dict(type=name), 4, 4, k, stride=1, padding=k // 2, dilation=1, bias=False)
        assert type(layer).__name__ == name
        assert layer(torch.randn(2, 4, 6, 6)).shape == (2, 4, 6, 6)
    layer = mmcv_cnn.build_conv_layer(dict(type='OREPA_LargeConv'), 3, 8, 7, stride=2, padding=3, bias=False)
    assert layer(torch.randn(2, 3, 16, 16)).shape == (2, 8, 8, 8)


@pytest.mark.parametrize('conv', ['OREPA', 'DOConv2d', 'DBB'])
def test_conv_module(conv):
    mmcv_cnn = pytest.importorskip('mmcv.cnn', reason='mmcv is not installed')
    block = mmcv_cnn.ConvModule(4, 8, 3, padding=1, conv_cfg=dict(type=conv), norm_cfg=BN, act_cfg=dict(type='ReLU'))
    block.init_weights()
    block = randomize_norms(randomize_params(block)).double().eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        before = block(x)
        reparameterize_model(block)
        assert_rel(block(x), before, 1e-5)
    assert type(block.conv.reparam) is nn.Conv2d and isinstance(block.bn, nn.BatchNorm2d)


def _stock_resnet(conv_cfg):
    from mmpretrain.models.backbones import ResNet
    return ResNet(18, base_channels=8, stem_channels=8, conv_cfg=conv_cfg)


@pytest.mark.parametrize('conv,deploy_adds_bias', [
    (dict(type='OREPA'), False), (dict(type='DOConv2d'), False),
    (dict(type='DBB'), True), (dict(type='RepVGGBlock', act_cfg=None), True),
])
def test_stock_mmpretrain_resnet18_with_conv_cfg(conv, deploy_adds_bias):
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    import dynconv_mm  # noqa: F401  (registers the layers)
    model = _stock_resnet(conv)
    plain = _stock_resnet(None)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not deploy_adds_bias:   # the stock norms are the only norms: nothing is doubled
        assert len(norms) == len([m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)])
    model = randomize_norms(randomize_params(model)).double()
    model.eval()   # (mmpretrain's ResNet.train returns None)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)[-1]
        reparameterize_model(model)
        after = model(x)[-1]
    assert_rel(after, before, 1e-5)
    assert leaf_module_types(model) == leaf_module_types(plain)
    n_convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    extra = sum(m.out_channels for m in n_convs) if deploy_adds_bias else 0
    assert count_parameters(model) == count_parameters(plain) + extra
    state = copy.deepcopy(model.state_dict())
    reparameterize_model(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
