"""The benchmark zoo: every dynamic / re-parameterized layer and the published backbones, each with
its plain static-convolution twin.

A :class:`BenchmarkCase` builds three things from a seed: the module under test (``build``), its
static twin (``build_twin``: same convolution geometry, ordinary ``nn.Conv2d`` layers) and, through
:func:`dynconv_mm.benchmark.reference.use_reference`, the official-style forward of its dynamic
layers (``has_reference``). Inputs are images ``(B, C, size, size)``.

Layer cases use one representative shape per method (a ResNet stage-3 3x3 convolution, the DWNet
7x7 depth-wise convolution); model cases are the published configurations (KW ResNet-18/50 1x and
4x, KW MobileNetV2 1x, KW ConvNeXt-T, DWNet-T static and dynamic, OREPA ResNet-18 training-time and
deployed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ['BenchmarkCase', 'KWLayerBlock', 'CASES', 'LAYER_CASES', 'MODEL_CASES', 'get_cases']


@dataclass
class BenchmarkCase:
    """One benchmarked module.

    Attributes:
        name: unique identifier (``--models`` selects by name or ``fnmatch`` pattern).
        kind: ``'layer'`` or ``'model'``.
        build: ``() -> nn.Module`` (the module under test, float32, train mode).
        build_twin: ``() -> nn.Module`` the plain static-convolution twin.
        in_channels: channels of the input image / feature map.
        size: spatial size used for timing (quick mode divides model sizes by 4, see :meth:`input_size`).
        train_batch: batch size of the training-step measurement.
        has_reference: the module has dynamic layers with an official-style forward.
        deploy: the module is already in deploy (fused) form, inference only.
        note: what the twin is.
    """

    name: str
    kind: str
    build: Callable[[], nn.Module]
    build_twin: Callable[[], nn.Module]
    in_channels: int
    size: int
    train_batch: int = 8
    has_reference: bool = True
    deploy: bool = False
    note: str = ''
    tags: Sequence[str] = field(default_factory=tuple)

    def input_size(self, quick: bool = False, override: Optional[int] = None) -> int:
        if override is not None and self.kind == 'model':
            return override
        if quick:
            return max(self.size // 4, 32) if self.kind == 'model' else max(self.size // 2, 7)
        return self.size


# --------------------------------------------------------------------------------------------
# layer cases
# --------------------------------------------------------------------------------------------
class KWLayerBlock(nn.Module):
    """A single KW convolution with its own :class:`WarehouseManager` (a warehouse for one layer)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, cell_num_ratio: float = 1.0,
                 **conv_kwargs) -> None:
        super().__init__()
        from ..layers.kernel_warehouse import WarehouseManager
        self.warehouse_manager = WarehouseManager(cell_num_ratio=cell_num_ratio, sharing_range=())
        self.conv = self.warehouse_manager.reserve(in_channels, out_channels, kernel_size,
                                                   warehouse_name='layer', **conv_kwargs)
        self.warehouse_manager.store()
        self.warehouse_manager.allocate(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn()
    return build


def _plain(cin: int, cout: int, k: int, groups: int = 1, bias: bool = False,
           relu: bool = False) -> Callable[[], nn.Module]:
    """The static twin of a layer: one ``nn.Conv2d`` (followed by a ReLU where the layer ends with one)."""
    def build() -> nn.Module:
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
        return nn.Sequential(conv, nn.ReLU()) if relu else conv
    return _seeded(build)


def _conv_cfg_layer(type_: str, cin: int, cout: int, k: int, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from mmcv.cnn import build_conv_layer

        import dynconv_mm  # noqa: F401  (registers the layers)
        return build_conv_layer(dict(type=type_, **kwargs), cin, cout, k, padding=k // 2)
    return _seeded(build)


def _deployed(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ..layers.reparam.fuse import reparameterize_model
        module = builder()
        module.eval()
        return reparameterize_model(module)
    return build


C, S = 128, 28  # layer cases: a ResNet stage-2 3x3 convolution at 224 input
LAYER_CASES: List[BenchmarkCase] = [
    BenchmarkCase('KWConv2d-1x', 'layer', _seeded(lambda: KWLayerBlock(C, C, 3, 1.0, padding=1)), _plain(C, C, 3),
                  C, S, note='3x3, warehouse of its own mixtures'),
    BenchmarkCase('KWConv2d-4x', 'layer', _seeded(lambda: KWLayerBlock(C, C, 3, 4.0, padding=1)), _plain(C, C, 3),
                  C, S, note='3x3, 4x cells'),
    BenchmarkCase('KWConv2d-1x1-1x', 'layer', _seeded(lambda: KWLayerBlock(C, 4 * C, 1, 1.0)), _plain(C, 4 * C, 1),
                  C, S, note='1x1 expansion'),
    BenchmarkCase('CondConv2d', 'layer', _conv_cfg_layer('CondConv2d', C, C, 3, num_experts=8), _plain(C, C, 3),
                  C, S, note='8 experts'),
    BenchmarkCase('DyConv2d', 'layer', _conv_cfg_layer('DyConv2d', C, C, 3), _plain(C, C, 3), C, S,
                  note='4 kernels'),
    BenchmarkCase('ODConv2d', 'layer', _conv_cfg_layer('ODConv2d', C, C, 3), _plain(C, C, 3), C, S,
                  note='4 kernels'),
    BenchmarkCase('PEDConv2d', 'layer', _conv_cfg_layer('PEDConv2d', C, C, 3, aux_loss_weight=0.0),
                  _plain(C, C, 3), C, S),
    BenchmarkCase('DynamicDWConv2d', 'layer', _conv_cfg_layer('DynamicDWConv2d', 192, 192, 7),
                  _plain(192, 192, 7, groups=192, bias=True), 192, 14, note='DWNet-T stage-2 7x7 depth-wise'),
]
# (name, kwargs, deployed conv has a bias, block ends with a ReLU): the twin is the deployed form's plain network
for _name, _kw, _bias, _relu in (('OREPA', {}, False, False), ('DBB', {}, True, False),
                                 ('RepVGGBlock', {}, True, True), ('DOConv2d', {}, True, False)):
    LAYER_CASES.append(BenchmarkCase(f'{_name}-train', 'layer', _conv_cfg_layer(_name, C, C, 3, **_kw),
                                     _plain(C, C, 3, relu=_relu), C, S, has_reference=False,
                                     note='training-time form'))
    LAYER_CASES.append(BenchmarkCase(f'{_name}-deploy', 'layer', _deployed(_conv_cfg_layer(_name, C, C, 3, **_kw)),
                                     _plain(C, C, 3, bias=_bias, relu=_relu), C, S, has_reference=False, deploy=True,
                                     note='deployed (one conv' + (' + ReLU)' if _relu else ')')))


# --------------------------------------------------------------------------------------------
# model cases
# --------------------------------------------------------------------------------------------
def _kw_resnet(depth: int, ratio: float) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ..backbones.kw_resnet import KWResNet
        return KWResNet(depth=depth, cell_num_ratio=ratio)
    return _seeded(build)


def _mm_resnet(depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from mmpretrain.models.backbones import ResNet
        return ResNet(depth=depth)
    return _seeded(build)


def _kw_mbv2() -> nn.Module:
    from ..backbones.kw_mobilenetv2 import KWMobileNetV2
    return KWMobileNetV2(widen_factor=1.0)


def _mm_mbv2() -> nn.Module:
    from mmpretrain.models.backbones import MobileNetV2
    return MobileNetV2(widen_factor=1.0)


def _kw_convnext() -> nn.Module:
    from ..backbones.kw_convnext import KWConvNeXt
    return KWConvNeXt(arch='tiny')


def _mm_convnext() -> nn.Module:
    from mmpretrain.models.backbones import ConvNeXt
    return ConvNeXt(arch='tiny')


def _dwnet(dynamic: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ..backbones.dwnet import DWNet
        return DWNet(arch='tiny', dynamic=dynamic)
    return _seeded(build)


def _orepa_r18(deploy: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ..backbones.orepa_resnet import OREPAResNet
        model = OREPAResNet(depth=18)
        if deploy:
            from ..layers.reparam.fuse import reparameterize_model
            model.eval()
            reparameterize_model(model)
        return model
    return _seeded(build)


def _orepa_r18_plain() -> nn.Module:
    from ..backbones.orepa_resnet import OREPAResNet
    model = OREPAResNet(depth=18, deploy=True)
    return model


MODEL_CASES: List[BenchmarkCase] = [
    BenchmarkCase('kw1x-resnet18', 'model', _kw_resnet(18, 1), _mm_resnet(18), 3, 128, note='twin: ResNet-18'),
    BenchmarkCase('kw4x-resnet18', 'model', _kw_resnet(18, 4), _mm_resnet(18), 3, 128, note='twin: ResNet-18'),
    BenchmarkCase('kw1x-resnet50', 'model', _kw_resnet(50, 1), _mm_resnet(50), 3, 128, note='twin: ResNet-50'),
    BenchmarkCase('kw4x-resnet50', 'model', _kw_resnet(50, 4), _mm_resnet(50), 3, 128, note='twin: ResNet-50'),
    BenchmarkCase('kw1x-mobilenetv2', 'model', _seeded(_kw_mbv2), _seeded(_mm_mbv2), 3, 128,
                  note='twin: MobileNetV2'),
    BenchmarkCase('kw1x-convnext-t', 'model', _seeded(_kw_convnext), _seeded(_mm_convnext), 3, 128,
                  note='twin: ConvNeXt-T'),
    BenchmarkCase('dwnet-t', 'model', _dwnet(False), _dwnet(False), 3, 128, has_reference=False,
                  note='static; twin: itself'),
    BenchmarkCase('dynamic-dwnet-t', 'model', _dwnet(True), _dwnet(False), 3, 128, note='twin: static DWNet-T'),
    BenchmarkCase('orepa-resnet18-train', 'model', _orepa_r18(False), _seeded(_orepa_r18_plain), 3, 128,
                  has_reference=False, note='training-time form; twin: deployed-shape ResNet-18'),
    BenchmarkCase('orepa-resnet18-deploy', 'model', _orepa_r18(True), _seeded(_orepa_r18_plain), 3, 128,
                  has_reference=False, deploy=True, note='deployed; twin: plain conv ResNet-18'),
]

CASES: Dict[str, BenchmarkCase] = {c.name: c for c in LAYER_CASES + MODEL_CASES}


def get_cases(patterns: Optional[Sequence[str]] = None) -> List[BenchmarkCase]:
    """Cases whose names match any of ``patterns`` (exact names, ``fnmatch`` patterns, or ``'layers'`` /
    ``'models'``); all cases for ``None``. ``ValueError`` names a pattern that matches nothing."""
    import fnmatch
    if not patterns:
        return list(CASES.values())
    out: List[BenchmarkCase] = []
    for pattern in patterns:
        if pattern in ('layers', 'models'):
            hits = [c for c in CASES.values() if c.kind == pattern[:-1]]
        else:
            hits = [c for n, c in CASES.items() if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f'no benchmark case matches {pattern!r}; known: {sorted(CASES)}')
        out.extend(c for c in hits if c not in out)
    return out
