"""Training with a batch of one works for every dynamic layer and every KW / DWNet backbone.

The attention branches pool each sample to one vector; a BatchNorm over a batch of one such vector has
no variance. The layers use :class:`~dynconv_mm.layers.attention.SafeBatchNorm1d/2d`, which normalise a
single value per channel with the running statistics (left unchanged) and are ``nn.BatchNorm`` in
every other case: these tests check both halves of that contract.
"""
import copy

import pytest
import torch
from torch import nn

import dynconv_mm  # noqa: F401
from dynconv_mm.engine import collect_aux_losses
from dynconv_mm.layers import allocate_warehouses
from dynconv_mm.layers.attention import SafeBatchNorm1d, SafeBatchNorm2d

LAYERS = {
    'KWConv2d': dict(type='KWConv2d'),
    'PEDConv2d': dict(type='PEDConv2d'),
    'CondConv2d': dict(type='CondConv2d', num_experts=3),
    'DyConv2d': dict(type='DyConv2d', num_kernels=3),
    'ODConv2d': dict(type='ODConv2d', kernel_num=3),
    'DynamicDWConv2d': dict(type='DynamicDWConv2d'),
    'IDynamicDWConv2d': dict(type='IDynamicDWConv2d'),
}
DEPTHWISE = ('DynamicDWConv2d', 'IDynamicDWConv2d')


def _train_step(model: nn.Module, x: torch.Tensor, batch_norms_updated: bool = True) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    loss = sum(o.float().square().mean() for o in outs) + collect_aux_losses(model)  # PEDConv's info-max term
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    assert all(torch.isfinite(o).all() for o in outs) and torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed


class _Net(nn.Module):
    """stem conv -> BN -> the layer under test -> BN (the usual position of a conv_cfg layer)."""

    def __init__(self, cfg):
        super().__init__()
        from mmcv.cnn import build_conv_layer
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = build_conv_layer(copy.deepcopy(cfg), 16, 16, 3, padding=1,
                                     **({'groups': 16} if cfg['type'] in DEPTHWISE else {}))
        self.bn1 = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn1(self.conv(self.bn0(self.stem(x))))


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_dynamic_layer_trains_at_batch_size_one(name):
    net = _Net(LAYERS[name])
    allocate_warehouses(net)
    torch.manual_seed(0)
    _train_step(net, torch.randn(1, 3, 12, 12))
    # and still at batch size 2 afterwards, in train and eval
    _train_step(net, torch.randn(2, 3, 12, 12))
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(1, 3, 12, 12))).all()


BACKBONES = {
    'KWResNet18': dict(type='KWResNet', depth=18, stage_blocks=[1, 1, 1, 1], out_indices=(0, 1, 2, 3)),
    'KWResNet50': dict(type='KWResNet', depth=50, stage_blocks=[1, 1, 1, 1], out_indices=(0, 1, 2, 3)),
    'KWMobileNetV2': dict(type='KWMobileNetV2', widen_factor=0.5),
    'KWConvNeXt': dict(type='KWConvNeXt', arch=dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256])),
    'DWNet-static': dict(type='DWNet', embed_dims=8, depths=[1, 1, 1, 1], out_indices=(0, 1, 2, 3)),
    'DWNet-dynamic': dict(type='DWNet', embed_dims=8, depths=[1, 1, 1, 1], dynamic=True, out_indices=(0, 1, 2, 3)),
    'DWNet-inhomogeneous': dict(type='DWNet', embed_dims=8, depths=[1, 1, 1, 1], inhomogeneous=True),
}


def build_backbone(cfg: dict) -> nn.Module:
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(copy.deepcopy(cfg))


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_backbone_trains_at_batch_size_one(name):
    model = build_backbone(BACKBONES[name])
    torch.manual_seed(0)
    _train_step(model, torch.randn(1, 3, 64, 64))
    _train_step(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize('cls,shape', [(SafeBatchNorm1d, (4, 6)), (SafeBatchNorm2d, (4, 6, 1, 1)),
                                       (SafeBatchNorm2d, (3, 6, 5, 5))])
def test_safe_batchnorm_is_torch_batchnorm_above_one(cls, shape):
    torch.manual_seed(0)
    safe = cls(6)
    ref = (nn.BatchNorm1d if cls is SafeBatchNorm1d else nn.BatchNorm2d)(6)
    with torch.no_grad():
        for m in (safe, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-0.2, 0.2, 6))
    for _ in range(2):
        x = torch.randn(*shape)
        assert torch.equal(safe.train()(x), ref.train()(x))
    for k in ('running_mean', 'running_var', 'num_batches_tracked'):
        assert torch.equal(getattr(safe, k), getattr(ref, k))
    x = torch.randn(*shape)
    assert torch.equal(safe.eval()(x), ref.eval()(x))


def test_safe_batchnorm_batch_of_one_uses_and_keeps_running_statistics():
    bn = SafeBatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    x = torch.randn(1, 4, 1, 1)
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    out = bn.train()(x)
    torch.testing.assert_close(out, bn.eval()(x))
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    # a batch of one image with spatial extent has a variance: ordinary batch norm
    y = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(bn.train()(y), nn.functional.batch_norm(y, None, None, bn.weight, bn.bias, True))
    with pytest.raises(ValueError):
        nn.BatchNorm2d(4).train()(x)  # what the torch class does with a batch of one pooled vector


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_every_attention_batch_norm_is_the_safe_one(name):
    net = _Net(LAYERS[name])
    allocate_warehouses(net)
    norms = [m for m in net.conv.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(isinstance(m, (SafeBatchNorm1d, SafeBatchNorm2d)) for m in norms), [type(m) for m in norms]
