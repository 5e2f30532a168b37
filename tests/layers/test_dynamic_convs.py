"""PEDConv2d, CondConv2d, DyConv2d and ODConv2d against plain-PyTorch references and the official
implementations' outputs (golden fixtures).

Each reference below re-derives every sample's kernel from the layer's parameters with elementary
tensor operations and runs one ``F.conv2d`` per sample, so it shares no code with the layers.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dynconv_mm.converters.pedconv import convert_odconv_layer, convert_pedconv_layer, convert_timm_condconv
from dynconv_mm.engine.aux_loss import collect_aux_losses
from dynconv_mm.layers import CondConv2d, DyConv2d, ODConv2d, PEDConv2d, set_temperature
from dynconv_mm.layers.dynamic_base import mix_kernels


def close(ours, ref, rtol=1e-5):
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def golden_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def per_sample_conv(x, kernels, layer, bias=None):
    outs = []
    for b in range(x.shape[0]):
        bb = None if bias is None else bias[b]
        outs.append(F.conv2d(x[b:b + 1], kernels[b], bb, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------ references
def ref_pedconv(layer, x, noise=None):
    """noise: (eps_in, eps_out, eps_k) drawn in the layer's order, or None (eval: the means)."""
    a = layer.attn
    p = x.mean(dim=(2, 3))
    h = torch.clamp(p @ a.fc_share.weight.t() + a.fc_share.bias, min=0)
    mus = [h @ fc.weight.t() + fc.bias for fc in (a.fc_inp, a.fc_oup, a.fc_k)]
    if noise is not None:
        mus = [m + 0.1 * e for m, e in zip(mus, noise)]
    s_in, s_out, s_k = (1 / (1 + torch.exp(-m)) for m in mus)
    kernels = []
    kh, kw = layer.kernel_size
    for b in range(x.shape[0]):
        k = layer.weight.clone()
        for o in range(k.shape[0]):
            for i in range(k.shape[1]):
                k[o, i] = k[o, i] * s_out[b, o] * s_in[b, i] * s_k[b].reshape(kh, kw)
        kernels.append(k)
    bias = None if layer.bias is None else layer.bias.expand(x.shape[0], -1)
    out = per_sample_conv(x, kernels, layer, bias)
    z = torch.cat(mus, 1)
    d = a.decoder
    recon = torch.clamp(z @ d[0].weight.t() + d[0].bias, min=0) @ d[2].weight.t() + d[2].bias
    infomax = ((recon - p) ** 2).mean()
    return out, infomax


def ref_condconv(layer, x):
    r = 1 / (1 + torch.exp(-(x.mean(dim=(2, 3)) @ layer.routing_fn.weight.t() + layer.routing_fn.bias)))
    kernels = [sum(r[b, e] * layer.weight[e] for e in range(layer.num_experts)) for b in range(x.shape[0])]
    bias = None
    if layer.bias is not None:
        bias = torch.stack([sum(r[b, e] * layer.bias[e] for e in range(layer.num_experts))
                            for b in range(x.shape[0])])
    return per_sample_conv(x, kernels, layer, bias), r


def ref_dyconv(layer, x, temperature):
    a = layer.attention
    h = torch.clamp(x.mean(dim=(2, 3)) @ a.fc1.weight.t() + a.fc1.bias, min=0)
    logits = (h @ a.fc2.weight.t() + a.fc2.bias) / temperature
    pi = torch.exp(logits - logits.max(1, keepdim=True).values)
    pi = pi / pi.sum(1, keepdim=True)
    kernels = [sum(pi[b, k] * layer.weight[k] for k in range(layer.num_experts)) for b in range(x.shape[0])]
    bias = None
    if layer.bias is not None:
        bias = torch.stack([sum(pi[b, k] * layer.bias[k] for k in range(layer.num_experts))
                            for b in range(x.shape[0])])
    return per_sample_conv(x, kernels, layer, bias), pi


def ref_odconv(layer, x, temperature):
    """Folds every attention into the per-sample kernel (input-channel, output-channel, spatial, kernel)."""
    a = layer.attention
    B = x.shape[0]
    p = x.mean(dim=(2, 3))
    h = p @ a.fc.weight.flatten(1).t()
    bn = a.bn
    if layer.training and B > 1:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    h = torch.clamp((h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias, min=0)

    def head(fc):
        return (h @ fc.weight.flatten(1).t() + fc.bias) / temperature

    sig = torch.sigmoid
    a_c = sig(head(a.channel_fc))
    a_f = sig(head(a.filter_fc)) if a.filter_fc is not None else torch.ones(B, layer.out_channels)
    kh, kw = layer.kernel_size
    a_s = sig(head(a.spatial_fc)) if a.spatial_fc is not None else torch.ones(B, kh * kw)
    a_k = torch.softmax(head(a.kernel_fc), 1) if a.kernel_fc is not None else torch.ones(B, 1)
    cin_g = layer.in_channels // layer.groups
    cout_g = layer.out_channels // layer.groups
    kernels = []
    for b in range(B):
        k = sum(a_k[b, n] * layer.weight[n] for n in range(layer.num_experts)).clone()
        k = k * a_s[b].reshape(1, 1, kh, kw)
        for o in range(layer.out_channels):
            g = o // cout_g
            k[o] = k[o] * a_f[b, o] * a_c[b, g * cin_g:(g + 1) * cin_g].reshape(-1, 1, 1)
        kernels.append(k)
    bias = None if layer.bias is None else layer.bias.expand(B, -1)
    return per_sample_conv(x, kernels, layer, bias)


def randomise(layer, scale=0.5):
    """Move every parameter and BN statistic away from its init so no factor is trivially 0.5 or 1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for m in layer.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return layer


# geometry: in, out, kernel, stride, padding, dilation, groups, bias, (H, W)
GEOMS = [
    pytest.param((8, 12, 3, 1, 1, 1, 1, False, (9, 7)), id='3x3'),
    pytest.param((8, 6, 3, 2, 1, 1, 2, True, (11, 10)), id='3x3-s2-g2-bias-odd'),
    pytest.param((6, 6, 3, 1, 2, 2, 6, False, (8, 9)), id='depthwise-dil2'),
    pytest.param((6, 9, 1, 1, 0, 1, 3, True, (5, 7)), id='1x1-g3'),
    pytest.param((4, 8, (3, 5), (2, 1), (1, 2), 1, 1, False, (7, 9)), id='3x5-stride21'),
]


def geom_kwargs(g):
    cin, cout, k, s, p, d, groups, bias, _ = g
    return dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, padding=p, dilation=d, groups=groups,
                bias=bias)


# ------------------------------------------------------------------------------------------------ PEDConv
@pytest.mark.parametrize('geom', GEOMS)
@pytest.mark.parametrize('batch', [3, 1])
def test_pedconv_eval_matches_reference(geom, batch):
    layer = randomise(PEDConv2d(**geom_kwargs(geom))).eval()
    x = torch.randn(batch, geom[0], *geom[-1])
    out = layer(x)
    ref, _ = ref_pedconv(layer, x)
    close(out, ref)
    assert not layer._aux_pending  # eval records nothing


@pytest.mark.parametrize('geom', GEOMS[:2] + GEOMS[3:4])
@pytest.mark.parametrize('batch', [2, 1])
def test_pedconv_train_noise_and_infomax_loss(geom, batch):
    layer = randomise(PEDConv2d(**geom_kwargs(geom))).train()
    cin, cout, k = geom[0], geom[1], layer.kernel_size
    x = torch.randn(batch, cin, *geom[-1])
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    noise = (torch.randn(batch, cin // geom[6]), torch.randn(batch, cout), torch.randn(batch, k[0] * k[1]))
    ref, ref_loss = ref_pedconv(layer, x, noise)
    close(out, ref)
    loss = layer.pop_aux_loss()
    close(loss, ref_loss)
    assert layer.pop_aux_loss() is None
    # the noise is real: a second training forward differs, eval is deterministic and noise-free
    assert not torch.allclose(layer(x), out)
    layer.pop_aux_loss()
    layer.eval()
    close(layer(x), ref_pedconv(layer, x)[0])


def test_pedconv_aux_loss_recording_rules():
    layer = PEDConv2d(16, 16, 3, padding=1).train()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        layer(x)
    assert not layer._aux_pending, 'a no-grad training forward must record nothing'
    layer(x)
    layer(x)  # a layer called twice in one step keeps both terms
    assert len(layer._aux_pending) == 2
    total = collect_aux_losses(layer)
    assert total.requires_grad and not layer._aux_pending
    off = PEDConv2d(16, 16, 3, padding=1, aux_loss_weight=0).train()
    off(x).sum().backward()  # weight 0: nothing recorded, so nothing to guard
    assert not off._aux_pending and off.attn.decoder[0].weight.grad is None


def test_pedconv_hidden_width_follows_official_integer_division():
    assert PEDConv2d(64, 64, 3).attn.fc_share.out_features == 4
    assert PEDConv2d(40, 8, 3).attn.fc_share.out_features == 2
    assert PEDConv2d(3, 8, 7).attn.fc_share.out_features == 1  # official would be 0 wide: at least 1
    assert PEDConv2d(32, 64, 3).attn.decoder[0].in_features == 32 + 64 + 9


# ------------------------------------------------------------------------------------------------ CondConv / DY-Conv
@pytest.mark.parametrize('geom', GEOMS)
@pytest.mark.parametrize('batch', [3, 1])
@pytest.mark.parametrize('train', [False, True])
def test_condconv_matches_reference(geom, batch, train):
    layer = randomise(CondConv2d(**geom_kwargs(geom), num_experts=3)).train(train)
    x = torch.randn(batch, geom[0], *geom[-1])
    ref, r = ref_condconv(layer, x)
    close(layer(x), ref)
    close(layer.routing_weights(x), r)


@pytest.mark.parametrize('geom', GEOMS)
@pytest.mark.parametrize('batch', [3, 1])
def test_dyconv_matches_reference(geom, batch):
    layer = randomise(DyConv2d(**geom_kwargs(geom), num_kernels=4)).train()
    x = torch.randn(batch, geom[0], *geom[-1])
    assert float(layer.temperature) == 1.0  # a new layer is at the end of the schedule
    set_temperature(layer, 30.0)  # the paper's starting temperature
    close(layer(x), ref_dyconv(layer, x, 30.0)[0])
    set_temperature(layer, 1.0)
    ref, pi = ref_dyconv(layer, x, 1.0)
    close(layer(x), ref)
    close(pi.sum(1), torch.ones(batch))


def test_dyconv_temperature_flattens_attention_and_is_saved():
    layer = randomise(DyConv2d(8, 8, 3, padding=1), scale=2.0)
    x = torch.randn(4, 8, 5, 5)
    sharp = layer.attention(x, torch.tensor(1.0))
    flat = layer.attention(x, torch.tensor(30.0))
    assert (flat.max(1).values - flat.min(1).values).max() < (sharp.max(1).values - sharp.min(1).values).max()
    assert 'temperature' in layer.state_dict()  # a checkpoint computes what it computed when saved


# ------------------------------------------------------------------------------------------------ ODConv
OD_GEOMS = GEOMS + [pytest.param((8, 12, 1, 1, 0, 1, 1, True, (6, 5)), id='1x1-bias')]


@pytest.mark.parametrize('geom', OD_GEOMS)
@pytest.mark.parametrize('kernel_num', [1, 4])
@pytest.mark.parametrize('batch,train', [(3, False), (3, True), (1, True), (1, False)])
def test_odconv_matches_reference(geom, kernel_num, batch, train):
    layer = randomise(ODConv2d(**geom_kwargs(geom), kernel_num=kernel_num, temperature=2.5)).train(train)
    x = torch.randn(batch, geom[0], *geom[-1])
    ref = ref_odconv(layer, x, 2.5)
    close(layer(x), ref)


def test_odconv_structure_skips():
    dw = ODConv2d(8, 8, 3, padding=1, groups=8)
    assert dw.attention.filter_fc is None and dw.attention.spatial_fc is not None
    pw1 = ODConv2d(8, 16, 1, kernel_num=1)
    assert pw1.pointwise_static and pw1.attention.spatial_fc is None and pw1.attention.kernel_fc is None
    assert not ODConv2d(8, 16, 1, kernel_num=4).pointwise_static
    assert ODConv2d(64, 16, 3).attention.fc.out_channels == 16  # max(int(64 * 0.0625), 16)
    assert ODConv2d(512, 16, 3).attention.fc.out_channels == 32
    assert float(ODConv2d(8, 8, 3).temperature) == 1.0  # official initial value


def test_odconv_batch_of_one_trains_and_keeps_running_stats():
    layer = ODConv2d(8, 8, 3, padding=1).train()
    before = layer.attention.bn.running_mean.clone()
    layer(torch.randn(1, 8, 5, 5)).sum().backward()
    assert torch.equal(layer.attention.bn.running_mean, before)
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


# ------------------------------------------------------------------------------------------------ all layers
def make(name, **kw):
    base = dict(in_channels=6, out_channels=6, kernel_size=3, stride=1, padding=1, groups=2, bias=True)
    base.update(kw)
    cls = {'ped': PEDConv2d, 'cond': CondConv2d, 'dy': DyConv2d, 'od': ODConv2d}[name]
    return cls(**base)


ALL = ['ped', 'cond', 'dy', 'od']


def test_mix_kernels_is_the_weighted_sum_of_kernels():
    torch.manual_seed(0)
    kernels = torch.randn(4, 6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mixed = mix_kernels(coeffs, kernels)
    ref = torch.stack([sum(coeffs[b, k] * kernels[k] for k in range(4)) for b in range(3)])
    torch.testing.assert_close(mixed, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(mixed, (coeffs, kernels), g), torch.autograd.grad(ref, (coeffs, kernels), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert mix_kernels(coeffs, kernels[:, 0, 0, 0, 0]).shape == (3,)  # vectors (K,) -> (B,)
    with pytest.raises(ValueError, match=r'coefficients must be \(B, K=4\)'):
        mix_kernels(coeffs[:, :3], kernels)


@pytest.mark.parametrize('name', ALL)
def test_batched_conv_implementations_agree(name):
    x = torch.randn(3, 6, 7, 6)
    outs = {}
    layer = randomise(make(name, stride=2)).eval()
    for impl in ('grouped', 'loop', 'unfold'):
        layer.impl = impl
        outs[impl] = layer(x)
    close(outs['grouped'], outs['loop'])
    close(outs['unfold'], outs['loop'])


@pytest.mark.parametrize('name', ALL)
def test_bf16_autocast_close_to_float32(name):
    """Bound: |bf16 - fp32| <= 2e-2 * max|fp32| elementwise (bf16 keeps 8 mantissa bits; the measured
    worst case is 6-7e-3 of the output range for all four layers at these sizes)."""
    layer = randomise(make(name, in_channels=16, out_channels=16)).eval()
    x = torch.randn(2, 16, 8, 8)
    ref = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    print(f'{name}: bf16 max error / max|ref| = {err:.2e}')
    assert err < 2e-2, f'bf16 relative error {err:.2e}'


@pytest.mark.parametrize('name', ALL)
def test_gradcheck_float64(name):
    layer = randomise(make(name, in_channels=4, out_channels=4, kernel_size=3, groups=2)).double().eval()
    x = torch.randn(2, 4, 4, 3, dtype=torch.double, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_(True)

    def fn(x, w):
        return functional_call(layer, {'weight': w}, (x,))

    assert torch.autograd.gradcheck(fn, (x, weight), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize('name', ALL)
def test_bad_arguments_fail_at_build_time(name):
    cls = {'ped': 'PEDConv2d', 'cond': 'CondConv2d', 'dy': 'DyConv2d', 'od': 'ODConv2d'}[name]
    with pytest.raises(ValueError, match=rf'{cls}: groups=4 must divide in_channels=6'):
        make(name, groups=4)
    with pytest.raises(ValueError, match=rf'{cls}: padding=.same.'):
        make(name, padding='same')
    with pytest.raises(ValueError, match=rf'{cls}: in_channels must be a positive int, got 0'):
        make(name, in_channels=0)


def test_method_specific_bad_arguments():
    with pytest.raises(ValueError, match='ODConv2d: num_experts must be a positive int, got 0'):
        ODConv2d(8, 8, 3, kernel_num=0)
    with pytest.raises(ValueError, match='ODConv2d: temperature must be > 0'):
        ODConv2d(8, 8, 3, temperature=0)
    with pytest.raises(ValueError, match='CondConv2d: num_experts must be a positive int, got 0'):
        CondConv2d(8, 8, 3, num_experts=0)
    with pytest.raises(ValueError, match='DyConv2d: num_experts must be a positive int'):
        DyConv2d(8, 8, 3, num_kernels=-1)
    with pytest.raises(ValueError, match='PEDConv2d: reduction must be a positive int'):
        PEDConv2d(8, 8, 3, reduction=0)
    with pytest.raises(ValueError, match='PEDConv2d: aux_loss_weight must be >= 0'):
        PEDConv2d(8, 8, 3, aux_loss_weight=-1)


def test_build_conv_layer_and_conv_module():
    cnn = pytest.importorskip('mmcv.cnn', reason='mmcv is not installed')
    for name, extra in (('PEDConv2d', {}), ('CondConv2d', dict(num_experts=2)), ('DyConv2d', {}),
                        ('ODConv2d', dict(kernel_num=2))):
        conv = cnn.build_conv_layer(dict(type=name, **extra), 8, 16, 3, stride=2, padding=1, dilation=1, groups=1,
                                    bias=False)
        assert type(conv).__name__ == name
        assert conv(torch.randn(2, 8, 9, 9)).shape == (2, 16, 5, 5)
        block = cnn.ConvModule(8, 16, 3, padding=1, conv_cfg=dict(type=name, **extra), norm_cfg=dict(type='BN'))
        block.init_weights()
        assert block.conv.bias is None  # bias='auto' with a norm
        assert block(torch.randn(2, 8, 6, 6)).shape == (2, 16, 6, 6)


# ------------------------------------------------------------------------------------------------ golden
def test_golden_pedconv_layer(golden):
    g = golden('pedconv_layer.pt')
    sd, report = convert_pedconv_layer(g['state_dict'])
    assert report.ok and not report.dropped
    layer = PEDConv2d(32, 64, 3, stride=2, padding=1)
    layer.load_state_dict(sd)
    layer.eval()
    golden_close(layer(g['input']), g['outputs'][0.0])


def test_golden_odconv_layers(golden):
    g = golden('odconv_layers.pt')
    assert len(g['cases']) == 5
    for name, case in g['cases'].items():
        args = dict(case['args'])
        temperature = args.pop('temperature')
        layer = ODConv2d(args.pop('in_planes'), args.pop('out_planes'), temperature=temperature, **args)
        sd, report = convert_odconv_layer(case['state_dict'])
        assert report.ok, name
        layer.load_state_dict(sd)
        set_temperature(layer, temperature)  # official state dicts hold no temperature
        layer.eval()
        golden_close(layer(case['input']), case['output'])


def test_golden_condconv_layers(golden):
    g = golden('condconv_layers.pt')
    assert len(g['cases']) == 3
    for name, case in g['cases'].items():
        args = dict(case['args'])
        layer = CondConv2d(args.pop('in_channels'), args.pop('out_channels'), bias=True, **args)
        sd, report = convert_timm_condconv(case['state_dict'], layer.weight.shape[1:])
        assert report.ok, name
        layer.load_state_dict(sd)
        layer.eval()
        golden_close(layer.routing_weights(case['input']), case['routing_weights'])
        golden_close(layer(case['input']), case['output'])


def test_condconv_key_map_rejects_wrong_expert_size():
    sd = {'conv.weight': torch.zeros(4, 10), 'routing_fn.weight': torch.zeros(4, 3), 'routing_fn.bias': torch.zeros(4)}
    with pytest.raises(ValueError, match='expected .num_experts, 8.1.3.3. expert weights'):
        convert_timm_condconv(sd, (8, 1, 3, 3))


def test_init_scales():
    """Kaiming fan-out kernels (std sqrt(2 / (C_out k^2))) and the official PEDConv N(0, 0.01) attention."""
    torch.manual_seed(0)
    ped = PEDConv2d(64, 128, 3)
    assert abs(ped.weight.std().item() - math.sqrt(2 / (128 * 9))) < 0.1 * math.sqrt(2 / (128 * 9))
    assert abs(ped.attn.fc_share.weight.std().item() - 0.01) < 2e-3
    assert torch.all(ped.attn.fc_k.bias == 0)
    od = ODConv2d(64, 128, 3, kernel_num=2)
    assert abs(od.weight[1].std().item() - math.sqrt(2 / (128 * 9))) < 0.1 * math.sqrt(2 / (128 * 9))


@pytest.mark.parametrize('cls', [DyConv2d, ODConv2d])
def test_temperature_change_does_not_recompile(cls):
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    layer = randomise(cls(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 8, 6, 6)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    close(compiled(x), layer(x))
    set_temperature(layer, 7.0)
    close(compiled(x), layer(x))
    assert counter.frame_count == 1


def test_stock_mmpretrain_resnet_with_each_dynamic_conv():
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    from mmpretrain.models.backbones import ResNet
    for conv_cfg in (dict(type='CondConv2d', num_experts=2), dict(type='DyConv2d'), dict(type='ODConv2d'),
                     dict(type='PEDConv2d', aux_loss_weight=0)):
        net = ResNet(depth=18, stem_channels=8, base_channels=8, num_stages=2, strides=(1, 2), dilations=(1, 1),
                     conv_cfg=conv_cfg, out_indices=(1, ))
        net.init_weights()
        net.train()
        out = net(torch.randn(2, 3, 16, 16))[0]
        assert out.shape == (2, 16, 2, 2)
        assert type(net.layer2[0].conv2).__name__ == conv_cfg['type']
        out.sum().backward()
        assert net.layer1[0].conv1.weight.grad is not None
