"""ODConv's native inference kernels (attentions and per-sample kernels in one call, channel
attentions folded in): the PyTorch path's outputs in float64 where they apply, the PyTorch path
wherever they do not."""
import contextlib

import pytest
import torch
from conftest import assert_matches_reference, at_thread_counts, float64_reference

from dynconv_mm.layers import native
from dynconv_mm.layers.odconv import ODConv2d


@pytest.fixture
def spy(native_calls):
    return native_calls('odconv_kernels')


def _layer(c_in=32, c_out=48, k=3, temperature=2.5, seed=0, **kwargs) -> ODConv2d:
    """An eval-mode layer with random attention weights, biases and norm statistics."""
    torch.manual_seed(seed)
    kwargs.setdefault('padding', 1)
    layer = ODConv2d(c_in, c_out, k, temperature=temperature, **kwargs)
    with torch.no_grad():
        for p in layer.attention.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
        if layer.bias is not None:
            layer.bias.normal_()
        bn = layer.attention.bn
        bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.3)
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    return layer.eval()


@pytest.mark.parametrize('kwargs,batch,size', [
    (dict(), 1, (14, 14)),                                              # all four heads
    (dict(), 3, (7, 9)),
    (dict(groups=4), 2, (8, 8)),                                         # grouped: a_c by group
    (dict(c_in=32, c_out=32, groups=32), 2, (9, 9)),                     # depth-wise: no filter head
    (dict(kernel_num=1), 2, (6, 10)),                                    # no kernel head
    (dict(k=1, padding=0), 2, (5, 5)),                                   # no spatial head
    (dict(k=(3, 5), padding=(1, 2), stride=2, dilation=(1, 2)), 2, (11, 13)),
    (dict(bias=True, reduction=0.625, min_channels=4), 2, (6, 6)),       # hidden 20: a dot-product tail
    (dict(kernel_num=8, temperature=31.0), 1, (4, 4)),                   # the start of the annealing
])
def test_native_matches_the_pytorch_path(lib, spy, kwargs, batch, size):
    layer = _layer(**kwargs)
    x = torch.randn(batch, layer.in_channels, *size)
    with torch.no_grad():
        out = layer(x)
    assert spy == [True]
    assert_matches_reference(out, float64_reference(layer, x))


@pytest.mark.parametrize('impl', ['grouped', 'loop', 'unfold'])
def test_every_batched_conv_impl_takes_the_kernels(lib, spy, impl):
    layer = _layer(impl=impl)
    x = torch.randn(3, layer.in_channels, 6, 6)
    with torch.no_grad():
        out = layer(x)
    assert spy == [True]
    assert_matches_reference(out, float64_reference(layer, x))


def test_the_kernels_do_not_depend_on_the_thread_count(lib, spy):
    # (the convolution after them is PyTorch's, whose summation order may follow the thread count)
    layer = _layer()
    x = torch.randn(3, layer.in_channels, 10, 10)
    with torch.no_grad():
        kernels = at_thread_counts(lambda: layer._native_inference_kernels(x))
    assert spy == [True] * 3
    for k in kernels[1:]:
        assert torch.equal(k, kernels[0])


def test_the_temperature_reaches_the_kernels(lib, spy):
    layer = _layer()
    x = torch.randn(1, layer.in_channels, 6, 6)
    with torch.no_grad():
        hot = layer(x)
        layer.set_temperature(1.0)
        cold = layer(x)
    assert spy == [True, True]
    assert not torch.allclose(hot, cold)
    assert_matches_reference(cold, float64_reference(layer, x))


def test_training_mode_and_autograd_take_the_pytorch_path(lib, spy):
    layer = _layer()
    x = torch.randn(2, layer.in_channels, 6, 6)
    layer.train()
    with torch.no_grad():
        layer(x)
    layer.eval()
    x.requires_grad_(True)
    out = layer(x)
    assert spy == [] and out.requires_grad
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize('case', ['float64', 'channels_last', 'fc_hook', 'head_hook', 'attention_hook', 'autocast',
                                  'pointwise_static'])
def test_where_it_does_not_apply_the_pytorch_path_runs(lib, spy, case):
    layer = _layer(k=1, padding=0, kernel_num=1) if case == 'pointwise_static' else _layer()
    x = torch.randn(2, layer.in_channels, 7, 7)
    ctx = contextlib.nullcontext()
    seen = []
    if case == 'float64':
        layer, x = layer.double(), x.double()
    elif case == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    elif case.endswith('_hook'):
        module = dict(fc_hook=layer.attention.fc, head_hook=layer.attention.kernel_fc,
                      attention_hook=layer.attention)[case]
        module.register_forward_hook(lambda m, i, o: seen.append(m))
    elif case == 'autocast':
        ctx = torch.autocast('cpu', dtype=torch.bfloat16)
    with torch.no_grad(), ctx:
        out = layer(x)
    assert not any(spy), case
    if case.endswith('_hook'):
        assert len(seen) == 1  # hooks on the attention still see its tensors
    if case != 'autocast':
        assert_matches_reference(out.float(), float64_reference(layer.float(), x.float().contiguous()))


def test_the_entry_point_declines_inconsistent_tensors(lib):
    layer = _layer()
    att = layer.attention
    x = torch.randn(1, layer.in_channels, 7, 7)
    norm = native.eval_batch_norm(att.bn)

    def head(m):
        return (m.weight, m.bias)

    def call(**overrides):
        args = dict(x=x, fc=att.fc.weight, bn=norm, channel_fc=head(att.channel_fc), filter_fc=head(att.filter_fc),
                    spatial_fc=head(att.spatial_fc), kernel_fc=head(att.kernel_fc), temperature=2.0,
                    weight=layer.weight, groups=1)
        args.update(overrides)
        with torch.no_grad():
            return native.odconv_kernels(**args)

    assert call() is not None
    assert call(x=torch.randn(1, 8, 7, 7)) is None                       # channels differ from the weights
    assert call(groups=5) is None
    assert call(kernel_fc=(None, None)) is None                          # 4 kernels need the kernel head
    assert call(spatial_fc=(att.spatial_fc.weight[:4], None)) is None
    assert call(channel_fc=(att.channel_fc.weight, torch.zeros(3))) is None
    assert call(weight=layer.weight.double()) is None
    assert call(x=torch.randn(1, layer.in_channels, 7, 7)[..., ::2]) is None   # not contiguous
    with pytest.raises(RuntimeError, match='rejected'):
        call(temperature=0.0)


def test_eval_batch_norm_reads_only_plain_eval_batch_norms():
    bn = torch.nn.BatchNorm2d(4)
    assert native.eval_batch_norm(bn) is None                             # training mode
    bn.eval()
    mean, var, weight, bias, eps = native.eval_batch_norm(bn)
    assert mean is bn.running_mean and var is bn.running_var and weight is bn.weight and eps == bn.eps
    assert native.eval_batch_norm(torch.nn.BatchNorm2d(4, track_running_stats=False).eval()) is None
    assert native.eval_batch_norm(torch.nn.GroupNorm(2, 4).eval()) is None

    class Custom(torch.nn.BatchNorm2d):
        pass

    assert native.eval_batch_norm(Custom(4).eval()) is None              # a subclass may change the maths
