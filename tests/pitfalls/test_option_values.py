"""Options with a closed set of values refuse a misspelling where they are read, naming the valid values,
instead of building a different network: KernelWarehouse ``sharing_range`` (through ``conv_cfg`` and on
the backbones), ``impl`` of the dynamic layers, norm and activation types, ``TemperatureHook`` presets,
the static-initialisation options and the auxiliary-loss guard."""
import pytest
import torch
from mmcv.cnn import build_conv_layer
from torch import nn

import dynconv_mm  # noqa: F401  (registers the layers)
from dynconv_mm.backbones import KWResNet
from dynconv_mm.engine import TemperatureHook, set_aux_loss_guard
from dynconv_mm.layers import CondConv2d, DyConv2d, DynamicDWConv2d, ODConv2d, PEDConv2d, allocate_warehouses
from dynconv_mm.layers.batched import batched_conv
from dynconv_mm.layers.reparam import DBB, RepVGGBlock

VALID_TOKENS = r"\['stage', 'layer', 'conv', 'dwconv', 'pwconv'\]"


class _Stage(nn.Module):
    """Module paths like a ResNet stage: layer1.0.conv1, layer1.0.conv2, ..."""

    def __init__(self, conv_cfg):
        super().__init__()
        self.layer1 = nn.Sequential(*[nn.Sequential() for _ in range(2)])
        for block in self.layer1:
            block.add_module('conv1', build_conv_layer(conv_cfg, 8, 8, 3, padding=1))
            block.add_module('conv2', build_conv_layer(conv_cfg, 8, 8, 3, padding=1))


@pytest.mark.parametrize('sharing_range', [('layer', 'cnov'), 'layer_cnov', ('layr', 'conv'), 'layer-conv'])
def test_kw_sharing_range_misspellings_through_conv_cfg(sharing_range):
    with pytest.raises(ValueError, match=VALID_TOKENS):
        allocate_warehouses(_Stage(dict(type='KWConv2d', sharing_range=sharing_range)))


@pytest.mark.parametrize('sharing_range', [('layr', 'conv'), 'layer-conv', ('layer', 'cnov')])
def test_kw_sharing_range_misspellings_on_the_backbone(sharing_range):
    with pytest.raises(ValueError, match=VALID_TOKENS):
        KWResNet(18, stage_blocks=(1, 1, 1, 1), base_channels=16, sharing_range=sharing_range)


def test_kw_official_sharing_ranges_build():
    for sr in (('layer', 'conv'), ('layer',), ('stage', 'layer', 'conv')):
        assert KWResNet(18, stage_blocks=(1, 1, 1, 1), base_channels=16, sharing_range=sr) is not None
        assert allocate_warehouses(_Stage(dict(type='KWConv2d', sharing_range=sr))) is not None


@pytest.mark.parametrize('cls', [ODConv2d, DyConv2d, CondConv2d, PEDConv2d])
def test_impl_misspelling(cls):
    with pytest.raises(ValueError, match=r"impl must be one of .*'auto'.*got 'grouped_'"):
        cls(8, 8, 3, padding=1, impl='grouped_')


def test_impl_of_batched_conv_and_the_dynamic_depthwise_conv():
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'unfld'"):
        DynamicDWConv2d(8, 8, 3, padding=1, groups=8, impl='unfld')
    x, w = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"unknown batched_conv impl 'grouped_'; expected one of"):
        batched_conv(x, w, None, padding=1, impl='grouped_')


def test_norm_and_activation_types():
    with pytest.raises(ValueError, match=r"unknown norm type 'BatchNorm'; expected one of"):
        DynamicDWConv2d(8, 8, 3, padding=1, groups=8, norm_cfg=dict(type='BatchNorm'))
    with pytest.raises(Exception, match=r"(?i)BN2|not in|registry|unknown"):
        RepVGGBlock(8, 8, 3, padding=1, norm_cfg=dict(type='BN2'))
    with pytest.raises(ValueError, match=r"unknown activation type 'Relu'.*expected one of"):
        DBB(8, 8, 3, padding=1, act_cfg=dict(type='Relu'))


def test_temperature_hook_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'kernel_warehouse'; choose from \[.*'kernelwarehouse'"):
        TemperatureHook(preset='kernel_warehouse')


def test_static_initialisation_options():
    from dynconv_mm import dynamize
    with pytest.raises(ValueError, match=r"kw_attention"):
        dynamize(nn.Sequential(nn.Conv2d(4, 4, 3)), 'KWConv2d', kw_attention='priors')
    from dynconv_mm.converters.static import check_static_init_options
    with pytest.raises(ValueError, match=r"unknown static-initialisation option\(s\) \['expert_nosie'\]"):
        check_static_init_options(dict(expert_nosie=0.1))


def test_aux_loss_guard_mode():
    with pytest.raises(ValueError, match=r"mode must be one of \('raise', 'warn', 'ignore'\), got 'warning'"):
        set_aux_loss_guard('warning')
