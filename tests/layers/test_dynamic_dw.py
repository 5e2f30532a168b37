"""DWNet's dynamic depth-wise convolutions against explicit plain-PyTorch references."""
import math

import pytest
import torch
import torch.nn.functional as F

from dynconv_mm.layers.dynamic_dw import DynamicDWConv2d, IDynamicDWConv2d, idynamic_conv2d


def _randomise(layer: torch.nn.Module) -> torch.nn.Module:
    """Random norm statistics/affine and biases, so that a wrong mapping changes the output."""
    g = torch.Generator().manual_seed(1)
    for m in layer.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    if getattr(layer, 'bias', None) is not None:
        layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def _bn_ref(h: torch.Tensor, bn: torch.nn.Module, training: bool) -> torch.Tensor:
    if training:
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    shape = (1, -1, 1, 1)
    return (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps) * bn.weight.reshape(shape) \
        + bn.bias.reshape(shape)


def ref_dynamic_dw(layer: DynamicDWConv2d, x: torch.Tensor) -> torch.Tensor:
    """Pool -> 1x1 -> BN -> ReLU -> 1x1 -> one depth-wise ``F.conv2d`` per sample."""
    B, C = x.shape[:2]
    ctx = x.mean((2, 3), keepdim=True)
    h = torch.relu(_bn_ref(F.conv2d(ctx, layer.conv1.weight), layer.bn, layer.training))
    kernels = F.conv2d(h, layer.conv2.weight, layer.conv2.bias).reshape(B, C, 1, *layer.kernel_size)
    outs = [F.conv2d(x[b:b + 1], kernels[b], layer.bias, layer.stride, layer.padding, layer.dilation, groups=C)
            for b in range(B)]
    return torch.cat(outs, 0)


def ref_idynamic(x, weight, stride, padding, dilation):
    """Explicit per-output-pixel loop of the inhomogeneous depth-wise convolution."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    B, C = x.shape[:2]
    G, kh, kw, Ho, Wo = weight.shape[1:]
    group_of = torch.arange(C) // (C // G)
    xp = F.pad(x, (pw, pw, ph, ph))
    out = x.new_zeros(B, C, Ho, Wo)
    for i in range(Ho):
        for j in range(Wo):
            patch = xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            kernel = weight[:, group_of, :, :, i, j]  # (B, C, kh, kw)
            out[:, :, i, j] = (patch * kernel).sum((2, 3))
    return out


def ref_idynamic_layer(layer: IDynamicDWConv2d, x: torch.Tensor) -> torch.Tensor:
    conv_a, bn, _ = layer.conv1
    h = torch.relu(_bn_ref(F.conv2d(x, conv_a.weight, conv_a.bias, layer.stride), bn, layer.training))
    w = F.conv2d(h, layer.conv2[0].weight, layer.conv2[0].bias)
    B, _, Ho, Wo = w.shape
    w = w.reshape(B, layer.num_kernel_groups, *layer.kernel_size, Ho, Wo)
    out = ref_idynamic(x, w, layer.stride, layer.padding, layer.dilation)
    return out if layer.bias is None else out + layer.bias.reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------
# DynamicDWConv2d
DDW_CASES = [
    # C, k, stride, padding, dilation, H, W
    (8, 7, 1, None, 1, 14, 14),
    (8, 7, 2, None, 1, 15, 11),
    (12, 3, 2, 0, 1, 9, 10),
    (8, 5, 1, 4, 2, 7, 13),
    (4, (3, 5), (2, 1), (1, 2), 1, 6, 9),
]


@pytest.mark.parametrize('case', DDW_CASES)
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('impl', ['auto', 'grouped', 'loop', 'unfold'])
def test_dynamic_dw_matches_reference(case, training, impl):
    C, k, s, p, d, H, W = case
    layer = _randomise(DynamicDWConv2d(C, C, k, stride=s, padding=p, dilation=d, reduction=2, impl=impl))
    layer.train(training)
    x = torch.randn(3, C, H, W)
    out = layer(x)
    ref = ref_dynamic_dw(layer, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dynamic_dw_official_shape_and_keys():
    layer = DynamicDWConv2d(32, kernel_size=7)
    assert layer.padding == (3, 3)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes['conv1.weight'] == (8, 32, 1, 1)
    assert shapes['conv2.weight'] == (32 * 49, 8, 1, 1)
    assert shapes['conv2.bias'] == (32 * 49,)
    assert shapes['bias'] == (32,)
    assert {'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var'} <= set(shapes)
    assert layer(torch.randn(2, 32, 9, 10)).shape == (2, 32, 9, 10)


def test_dynamic_dw_samples_get_their_own_kernels():
    layer = _randomise(DynamicDWConv2d(8, kernel_size=3, reduction=2)).eval()
    x = torch.randn(2, 8, 6, 6)
    both = layer(x)
    torch.testing.assert_close(both[1:], layer(x[1:]), rtol=1e-5, atol=1e-5)
    k = layer.generate_kernels(x)
    assert not torch.allclose(k[0], k[1])


def test_dynamic_dw_no_bias():
    layer = _randomise(DynamicDWConv2d(8, kernel_size=3, bias=False, reduction=2)).eval()
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(layer(x), ref_dynamic_dw(layer, x), rtol=1e-5, atol=1e-5)


def test_dynamic_dw_batch_one_eval():
    layer = _randomise(DynamicDWConv2d(8, kernel_size=7, stride=2, reduction=2)).eval()
    x = torch.randn(1, 8, 11, 9)
    torch.testing.assert_close(layer(x), ref_dynamic_dw(layer, x), rtol=1e-5, atol=1e-5)


def test_dynamic_dw_batch_one_train():
    """A training batch of one: the pooled (1, C/r, 1, 1) context is normalised with the running
    statistics (batch statistics are undefined), which stay unchanged; gradients flow."""
    layer = _randomise(DynamicDWConv2d(8, kernel_size=5, reduction=2)).train()
    before = layer.bn.running_mean.clone(), layer.bn.running_var.clone()
    x = torch.randn(1, 8, 9, 7, requires_grad=True)
    g = torch.randn(1, 8, 9, 7)
    out = layer(x)
    torch.testing.assert_close((layer.bn.running_mean, layer.bn.running_var), before)
    (grad,) = torch.autograd.grad((out * g).sum(), x)
    layer.eval()
    ref = ref_dynamic_dw(layer, x)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_dynamic_dw_batch_two_train_updates_statistics():
    layer = _randomise(DynamicDWConv2d(8, kernel_size=3, reduction=2)).train()
    before = layer.bn.running_mean.clone()
    layer(torch.randn(2, 8, 5, 5))
    assert not torch.allclose(before, layer.bn.running_mean)


def test_dynamic_dw_bf16_autocast():
    """bf16 autocast: each of the three convolutions rounds to 8 mantissa bits; bound 2e-2 * max|ref|."""
    layer = _randomise(DynamicDWConv2d(16, kernel_size=7, reduction=4)).eval()
    x = torch.randn(2, 16, 14, 14)
    ref = ref_dynamic_dw(layer, x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, float(err)


@pytest.mark.parametrize('training', [False, True])
def test_dynamic_dw_gradcheck(training):
    layer = _randomise(DynamicDWConv2d(4, kernel_size=3, stride=2, reduction=2)).double().train(training)
    x = torch.randn(2, 4, 5, 4, dtype=torch.double, requires_grad=True)
    params = [layer.conv1.weight, layer.conv2.weight, layer.conv2.bias, layer.bias]
    assert torch.autograd.gradcheck(lambda inp, *ps: layer(inp), (x, *params), fast_mode=True)


@pytest.mark.parametrize('kwargs, match', [
    (dict(in_channels=8, out_channels=16), 'out_channels'),
    (dict(in_channels=8, groups=2), 'groups'),
    (dict(in_channels=8, reduction=16), 'reduction'),
    (dict(in_channels=8, kernel_size=(3, 3, 3)), 'kernel_size'),
    (dict(in_channels=8, impl='fast'), 'impl'),
])
def test_dynamic_dw_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        DynamicDWConv2d(**kwargs)
    assert 'DynamicDWConv2d' in str(e.value)


# ----------------------------------------------------------------------------------------------
# IDynamicDWConv2d
def test_idynamic_functional_matches_loop():
    x = torch.randn(2, 6, 7, 9)
    for stride, dilation in [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((2, 1), (2, 1))]:
        k = 3
        pad = tuple(d * (k - 1) // 2 for d in dilation)
        Ho = (7 + 2 * pad[0] - dilation[0] * (k - 1) - 1) // stride[0] + 1
        Wo = (9 + 2 * pad[1] - dilation[1] * (k - 1) - 1) // stride[1] + 1
        w = torch.randn(2, 3, k, k, Ho, Wo)
        out = idynamic_conv2d(x, w, stride, pad, dilation)
        torch.testing.assert_close(out, ref_idynamic(x, w, stride, pad, dilation), rtol=1e-5, atol=1e-5)


def test_idynamic_constant_kernel_is_depthwise_conv():
    """Per-position kernels that happen to be equal everywhere give an ordinary depth-wise conv."""
    x = torch.randn(2, 4, 8, 9)
    k = torch.randn(4, 3, 3)  # one kernel per channel (group_channels = 1)
    w = k.reshape(1, 4, 3, 3, 1, 1).expand(2, 4, 3, 3, 8, 9)
    ref = F.conv2d(x, k.unsqueeze(1), padding=1, groups=4)
    torch.testing.assert_close(idynamic_conv2d(x, w, 1, 1, 1), ref, rtol=1e-5, atol=1e-5)


IDW_CASES = [
    # C, group_channels, k, stride, dilation, H, W, bias
    (8, 2, 7, 1, 1, 9, 11, False),
    (8, 4, 3, 2, 1, 9, 10, True),
    (6, 3, 5, 2, 1, 7, 7, False),
    (4, 1, 3, 1, 2, 6, 5, True),
]


@pytest.mark.parametrize('case', IDW_CASES)
@pytest.mark.parametrize('training', [False, True])
def test_idynamic_layer_matches_reference(case, training):
    C, gc, k, s, d, H, W, bias = case
    layer = _randomise(IDynamicDWConv2d(C, C, k, stride=s, dilation=d, bias=bias, group_channels=gc, reduction=2))
    layer.train(training)
    x = torch.randn(2, C, H, W)
    out = layer(x)
    assert out.shape == (2, C, math.ceil(H / s), math.ceil(W / s))
    torch.testing.assert_close(out, ref_idynamic_layer(layer, x), rtol=1e-5, atol=1e-5)


def test_idynamic_batch_one_train_and_eval():
    # the generator's norm sees H*W values per channel, so batch 1 trains fine
    layer = _randomise(IDynamicDWConv2d(8, kernel_size=3, group_channels=2, reduction=2))
    x = torch.randn(1, 8, 5, 7)
    for training in (True, False):
        layer.train(training)
        torch.testing.assert_close(layer(x), ref_idynamic_layer(layer, x), rtol=1e-5, atol=1e-5)


def test_idynamic_official_keys():
    layer = IDynamicDWConv2d(96, kernel_size=7, group_channels=3)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert layer.num_kernel_groups == 32
    assert shapes['conv1.0.weight'] == (24, 96, 1, 1) and shapes['conv1.0.bias'] == (24,)
    assert shapes['conv1.1.running_var'] == (24,)
    assert shapes['conv2.0.weight'] == (32 * 49, 24, 1, 1) and shapes['conv2.0.bias'] == (32 * 49,)
    assert 'bias' not in shapes


def test_idynamic_bf16_autocast():
    """bf16 autocast: two 1x1 convs round to bf16, the taps accumulate in float32; bound 2e-2 * max|ref|."""
    layer = _randomise(IDynamicDWConv2d(16, kernel_size=7, group_channels=4)).eval()
    x = torch.randn(2, 16, 10, 12)
    ref = ref_idynamic_layer(layer, x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, float(err)


@pytest.mark.parametrize('stride', [1, 2])
def test_idynamic_gradcheck(stride):
    layer = _randomise(IDynamicDWConv2d(4, kernel_size=3, stride=stride, group_channels=2, reduction=2, bias=True))
    layer = layer.double().train()
    x = torch.randn(2, 4, 5, 4, dtype=torch.double, requires_grad=True)
    params = [layer.conv1[0].weight, layer.conv2[0].weight, layer.bias]
    assert torch.autograd.gradcheck(lambda inp, *ps: layer(inp), (x, *params), fast_mode=True)


@pytest.mark.parametrize('kwargs, match', [
    (dict(in_channels=8, group_channels=3), 'group_channels'),
    (dict(in_channels=8, kernel_size=4), 'odd'),
    (dict(in_channels=8, kernel_size=3, padding=0), 'padding'),
    (dict(in_channels=8, out_channels=4), 'out_channels'),
])
def test_idynamic_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        IDynamicDWConv2d(**kwargs)
    assert 'IDynamicDWConv2d' in str(e.value)


def test_build_through_conv_registry():
    cnn = pytest.importorskip('mmcv.cnn', reason='mmcv is not installed')
    layer = cnn.build_conv_layer(dict(type='DynamicDWConv2d'), 16, 16, 7, stride=1, padding=3, bias=True)
    assert isinstance(layer, DynamicDWConv2d) and layer.padding == (3, 3)
    layer = cnn.build_conv_layer(dict(type='IDynamicDWConv2d', group_channels=4), 16, 16, 3, stride=2, padding=1)
    assert isinstance(layer, IDynamicDWConv2d) and layer.num_kernel_groups == 4
