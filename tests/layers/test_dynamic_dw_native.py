"""The native inference path of the dynamic depth-wise convolution: the PyTorch path's outputs in
float64, where it applies, and the PyTorch path wherever it does not."""
import contextlib

import pytest
import torch
from conftest import assert_matches_reference, at_thread_counts, float64_reference

from dynconv_mm.layers import native
from dynconv_mm.layers.dynamic_dw import DynamicDWConv2d


@pytest.fixture
def spy(native_calls):
    return native_calls('dynamic_dw_forward')


def _layer(channels=12, seed=0, **kwargs) -> DynamicDWConv2d:
    """An eval-mode layer with every tensor the forward reads random (no zero bias, no unit norm)."""
    torch.manual_seed(seed)
    layer = DynamicDWConv2d(channels, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        bn = layer.bn
        bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.3)
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    return layer.eval()


@pytest.mark.parametrize('kwargs,batch,size', [
    (dict(kernel_size=7), 1, (14, 14)),                            # DWNet's shape: the row-block path
    (dict(kernel_size=7), 3, (5, 23)),                             # rows and columns off the blocks
    (dict(kernel_size=3), 2, (17, 33)),
    (dict(kernel_size=5, padding=0), 1, (9, 20)),                  # valid convolution
    (dict(kernel_size=(7, 3), padding=(1, 2)), 2, (8, 19)),         # non-square kernel, odd padding
    (dict(kernel_size=(3, 5), dilation=(1, 2)), 1, (12, 12)),      # horizontal dilation (row blocks)
    (dict(kernel_size=3, dilation=2), 2, (11, 7)),                 # vertical dilation: the flat path
    (dict(kernel_size=3, dilation=2), 1, (8, 6)),                  # flat path: 64 + a 16-output tail
    (dict(kernel_size=1), 2, (6, 6)),                              # 1x1: the flat path
    (dict(kernel_size=4), 1, (10, 9)),                             # even kernel, "same" padding 1
    (dict(kernel_size=7), 1, (1, 1)),                              # one pixel, all padding
    (dict(kernel_size=7, bias=False), 2, (6, 40)),
])
@pytest.mark.parametrize('channels,reduction', [(12, 4), (80, 4)])  # hidden 3 (tail only) and 20
def test_native_matches_the_pytorch_path(lib, spy, kwargs, batch, size, channels, reduction):
    layer = _layer(channels, reduction=reduction, **kwargs)
    x = torch.randn(batch, channels, *size)
    with torch.no_grad():
        out = layer(x)
    assert spy == [True]
    assert_matches_reference(out, float64_reference(layer, x))


def test_norm_without_affine_parameters(lib, spy):
    layer = _layer(16, norm_cfg=dict(type='BN', affine=False))
    assert layer.bn.weight is None
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        out = layer(x)
    assert spy == [True]
    assert_matches_reference(out, float64_reference(layer, x))


def test_results_do_not_depend_on_the_thread_count(lib, spy):
    layer = _layer(64)
    x = torch.randn(3, 64, 14, 14)
    with torch.no_grad():
        outs = at_thread_counts(lambda: layer(x))
    assert spy == [True] * 3
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_the_dwnet_model_gives_the_same_outputs_with_and_without_it(lib, spy, monkeypatch):
    from dynconv_mm.backbones import DWNet

    torch.manual_seed(0)
    model = DWNet(arch=dict(embed_dims=16, depths=[1, 2, 1, 1]), dynamic=True, out_indices=(0, 1, 2, 3)).eval()
    for m in model.modules():
        if isinstance(m, DynamicDWConv2d):
            with torch.no_grad():
                m.bn.running_mean.normal_(0, 0.2)
                m.bn.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        assert spy and all(spy)
        monkeypatch.setenv('DYNCONV_MM_NATIVE', '0')
        refs = model(x)
    assert not spy[-1]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_training_mode_and_autograd_take_the_pytorch_path(lib, spy):
    layer = _layer(16)
    x = torch.randn(2, 16, 8, 8)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert spy == []
    layer.eval()
    x.requires_grad_(True)
    out = layer(x)  # autograd: the graph is PyTorch's
    assert spy == [] and out.requires_grad
    out.sum().backward()
    assert x.grad is not None and layer.conv2.weight.grad is not None


@pytest.mark.parametrize('case', ['stride', 'float64', 'strided_view', 'impl', 'conv_hook', 'bn_hook', 'autocast',
                                  'no_running_stats'])
def test_where_it_does_not_apply_the_pytorch_path_runs(lib, spy, case):
    kwargs = dict(stride=2) if case == 'stride' else dict(impl='unfold') if case == 'impl' else {}
    if case == 'no_running_stats':
        kwargs = dict(norm_cfg=dict(type='BN', track_running_stats=False))
    layer = _layer(16, **kwargs) if case != 'no_running_stats' else DynamicDWConv2d(16, **kwargs).eval()
    x = torch.randn(2, 16, 10, 10)
    ctx = contextlib.nullcontext()
    if case == 'float64':
        layer, x = layer.double(), x.double()
    elif case == 'strided_view':
        x = torch.randn(2, 16, 10, 20)[..., ::2]
    elif case in ('conv_hook', 'bn_hook'):
        seen = []
        module = layer.conv2 if case == 'conv_hook' else layer.bn
        module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    elif case == 'autocast':
        ctx = torch.autocast('cpu', dtype=torch.bfloat16)
    with torch.no_grad(), ctx:
        out = layer(x)
    assert not any(spy), case
    if case in ('conv_hook', 'bn_hook'):
        assert len(seen) == 1  # hooks on the generator still see its tensors
    if case not in ('autocast', 'no_running_stats'):
        assert_matches_reference(out.float(), float64_reference(layer.float(), x.float()))


def test_a_channels_last_input_keeps_its_memory_format(lib, spy):
    layer = _layer(16)
    x = torch.randn(2, 16, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = layer(x)
    assert spy == [True]
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_matches_reference(out, float64_reference(layer, x.contiguous()))


def test_a_hook_on_the_layer_itself_keeps_the_native_path(lib, spy):
    layer = _layer(16)
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(1, 16, 7, 7)
    with torch.no_grad():
        out = layer(x)
    # a hook on the layer sees the layer's output whichever path computed it
    assert seen == [(1, 16, 7, 7)]
    assert_matches_reference(out, float64_reference(layer, x))


def test_native_off_by_environment_runs_the_pytorch_path(lib, monkeypatch):
    monkeypatch.setenv('DYNCONV_MM_NATIVE', '0')
    layer = _layer(16)
    x = torch.randn(1, 16, 7, 7)
    args = (x, layer.conv1.weight, layer.bn.running_mean, layer.bn.running_var, layer.bn.weight, layer.bn.bias,
            layer.bn.eps, layer.conv2.weight, layer.conv2.bias, layer.bias, layer.kernel_size, layer.padding,
            layer.dilation)
    assert native.dynamic_dw_forward(*args) is None
    with torch.no_grad():
        assert_matches_reference(layer(x), float64_reference(layer, x))


def test_the_entry_point_declines_inconsistent_tensors(lib):
    layer = _layer(16)
    x = torch.randn(1, 16, 7, 7)
    bn = layer.bn

    def call(**overrides):
        args = dict(x=x, w1=layer.conv1.weight, bn_mean=bn.running_mean, bn_var=bn.running_var, bn_weight=bn.weight,
                    bn_bias=bn.bias, bn_eps=bn.eps, w2=layer.conv2.weight, b2=layer.conv2.bias, bias=layer.bias,
                    kernel_size=layer.kernel_size, padding=layer.padding, dilation=layer.dilation)
        args.update(overrides)
        with torch.no_grad():
            return native.dynamic_dw_forward(**args)

    assert call() is not None
    assert call(x=torch.randn(1, 8, 7, 7)) is None                      # channels differ from the weights
    assert call(bias=torch.zeros(3)) is None
    assert call(bn_var=torch.ones(2)) is None
    assert call(kernel_size=(5, 5)) is None                             # w2 holds 7x7 kernels
    assert call(x=torch.randn(16, 7, 7)) is None                        # not a batch
    assert call(padding=(0, 0), x=torch.randn(1, 16, 3, 3)) is None     # empty output
    assert call(w2=layer.conv2.weight.double()) is None
