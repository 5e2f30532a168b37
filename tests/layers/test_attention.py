"""Shared attention pieces: batch-of-one safe batch norms, the attention norm builder and the
KernelWarehouse attention function."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynconv_mm.layers.attention import SafeBatchNorm1d, SafeBatchNorm2d, build_attention_norm, pooled_context
from dynconv_mm.layers.kernel_warehouse.attention import contrast_normalize, kw_attention


def _randomized(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize('safe,plain,shape', [
    (SafeBatchNorm1d, nn.BatchNorm1d, (4, 6)),
    (SafeBatchNorm1d, nn.BatchNorm1d, (3, 6, 5)),
    (SafeBatchNorm2d, nn.BatchNorm2d, (2, 6, 1, 1)),
    (SafeBatchNorm2d, nn.BatchNorm2d, (1, 6, 3, 3)),  # one sample but several values per channel
])
def test_safe_batchnorm_equals_torch_otherwise(safe, plain, shape):
    a, b = _randomized(safe(6)), plain(6)
    b.load_state_dict(a.state_dict())
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(shape)
    for mode in (True, False):
        a.train(mode)
        b.train(mode)
        torch.testing.assert_close(a(x), b(x))
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    assert a.num_batches_tracked == b.num_batches_tracked == 1


@pytest.mark.parametrize('safe,shape', [(SafeBatchNorm1d, (1, 6)), (SafeBatchNorm1d, (1, 6, 1)),
                                        (SafeBatchNorm2d, (1, 6, 1, 1))])
def test_training_batch_of_one_uses_running_stats(safe, shape):
    bn = _randomized(safe(6)).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(shape)
    y = bn(x)
    ref = F.batch_norm(x, before['running_mean'], before['running_var'], bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(y, ref)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    y.sum().backward()
    assert bn.weight.grad is not None
    with pytest.raises(ValueError):  # the torch class refuses the same input
        nn.BatchNorm1d(6).train()(torch.randn(1, 6))


def test_without_running_stats_behaves_like_torch():
    bn = SafeBatchNorm1d(6, track_running_stats=False).train()
    with pytest.raises(ValueError):
        bn(torch.randn(1, 6))


def test_build_attention_norm():
    bn, bias = build_attention_norm('BN', 8)
    assert isinstance(bn, SafeBatchNorm1d) and bias is False
    ln, bias = build_attention_norm(dict(type='LN', eps=1e-6), 8)
    assert isinstance(ln, nn.LayerNorm) and ln.eps == 1e-6 and bias is True
    assert isinstance(build_attention_norm(nn.BatchNorm1d, 8)[0], SafeBatchNorm1d)
    assert isinstance(build_attention_norm(nn.LayerNorm, 8)[0], nn.LayerNorm)
    frozen, _ = build_attention_norm(dict(type='BN', momentum=0.01, requires_grad=False), 8)
    assert frozen.momentum == 0.01 and not frozen.weight.requires_grad
    with pytest.raises(ValueError, match="unknown attention norm type 'GN'"):
        build_attention_norm('GN', 8)
    with pytest.raises(ValueError, match='bad attention norm options'):
        build_attention_norm(dict(type='BN', foo=1), 8)
    with pytest.raises(ValueError, match='no "type"'):
        build_attention_norm(dict(eps=1.0), 8)


def test_kw_attention_function():
    logits = torch.randn(3, 5, 7)
    z = contrast_normalize(logits)
    torch.testing.assert_close(z.abs().sum(-1), logits.abs().sum(-1) / (logits.abs().sum(-1) + 1e-3))
    prior = torch.zeros(5, 7)
    prior[:, 2] = 1
    a0 = kw_attention(logits, torch.tensor(0.0), prior)
    torch.testing.assert_close(a0, z[..., :-1])
    a1 = kw_attention(logits, torch.tensor(1.0), prior)
    torch.testing.assert_close(a1, prior[None, :, :-1].expand(3, -1, -1))
    tau = torch.tensor(0.7)
    torch.testing.assert_close(kw_attention(logits, tau, prior), (0.3 * z + 0.7 * prior)[..., :-1])
    assert kw_attention(logits, tau, prior).shape == (3, 5, 6)


def test_pooled_context():
    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(pooled_context(x), x.mean((2, 3, 4)))
    torch.testing.assert_close(pooled_context(x[..., 0, 0, 0]), x[..., 0, 0, 0])
