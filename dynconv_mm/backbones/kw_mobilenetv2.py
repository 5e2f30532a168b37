"""KernelWarehouse MobileNetV2 backbone (KW-MobileNetV2 1x/4x and the 1/2x variant).

Li, Yao: "KernelWarehouse: Rethinking the Design of Dynamic Convolution" (ICML 2024,
https://arxiv.org/abs/2406.07879), on MobileNetV2 (Sandler et al., CVPR 2018).

Layout (reproduces the official models, so that converted weights give the official logits):

* the seven inverted-residual rows belong to KW stages ``[1, 2, 3, 4, 5, 6, 6]``; the first block of a
  row that starts a new stage draws from the previous stage's warehouses (*handover*) and the
  layer counter restarts after it;
* warehouse names: stem ``stage0_conv0``; per block ``stage{s}_layer{l}_pwconv0`` (expansion),
  ``..._dwconv0`` (depth-wise) and ``..._pwconv1`` (projection); the final 1x1 convolution is
  ``stage6_layer{l}_pwconv1``; ``sharing_range`` merges them (1x: ``('layer', 'pwconv')``,
  4x: ``('layer',)``);
* ``variant='kw1d2x'`` is the official 1/2x model: its KW options are fixed per warehouse
  (reduction 1/32, ten warehouses, the point-wise convolutions of stages 1-5 plain) and its
  classifier is a :class:`KWLinear` with a warehouse of its own, provided by the head
  :func:`KWLinearClsHead` (use it instead of ``LinearClsHead``).

Module names follow mmpretrain's ``MobileNetV2`` (``conv1``, ``layer1`` .. ``layer7``, ``conv2``;
``out_indices`` 0..7 index ``layer1`` .. ``layer7``, ``conv2``), so mmdet/mmseg configs written for
it (e.g. ``out_indices=(1, 2, 4, 7)`` for FPN) carry over.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.kernel_warehouse import WarehouseManager
from ..registry import register
from .kw_resnet import KWBackboneBase, Ratio

__all__ = ['KWMobileNetV2', 'KWLinearClsHead', 'make_divisible', 'KW1D2X_MOBILENETV2_SETTINGS']

#: the official 1/2x model's fixed KernelWarehouse options (ten warehouses, in reservation order:
#: stem, depth-wise convs of stages 1-5, stage 6 expansion / depth-wise / projection, classifier)
KW1D2X_MOBILENETV2_SETTINGS = dict(
    reduction=0.03125,
    cell_num_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5),
    cell_inplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
    cell_outplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1),
    sharing_range=('layer',),
)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` (not below ``min_value``, not more than 10% down)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class _ConvNormAct(nn.Module):
    """``conv`` (KW or plain) -> ``bn`` -> optional ``activate`` (key names of mmcv's ConvModule)."""

    def __init__(self, conv: nn.Module, channels: int, norm_cfg: dict, act_cfg: Optional[dict]):
        super().__init__()
        self.conv = conv
        self.bn = build_norm_layer(norm_cfg, channels)[1]
        self.activate = build_activation_layer(act_cfg) if act_cfg is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class KWInvertedResidual(nn.Module):
    """MobileNetV2 inverted residual with KW convolutions.

    ``conv`` is ``[expand 1x1 (if expand_ratio != 1), depth-wise 3x3 (stride), project 1x1 (linear)]``.
    ``pw_enabled=False`` makes the two point-wise convolutions plain (1/2x variant).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, *, stage: int,
                 layer: int, manager: WarehouseManager, pw_enabled: bool = True, norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU6')):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f'KWInvertedResidual: stride must be 1 or 2, got {stride!r}')
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        prefix = f'stage{stage}_layer{layer}_'
        layers = []
        if expand_ratio != 1:
            layers.append(_ConvNormAct(
                manager.reserve(in_channels, hidden, kernel_size=1, bias=False, warehouse_name=prefix + 'pwconv0',
                                enabled=pw_enabled), hidden, norm_cfg, act_cfg))
        layers.append(_ConvNormAct(
            manager.reserve(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False,
                            warehouse_name=prefix + 'dwconv0'), hidden, norm_cfg, act_cfg))
        layers.append(_ConvNormAct(
            manager.reserve(hidden, out_channels, kernel_size=1, bias=False, warehouse_name=prefix + 'pwconv1',
                            enabled=pw_enabled), out_channels, norm_cfg, None))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


@register('model')
class KWMobileNetV2(KWBackboneBase):
    """KernelWarehouse MobileNetV2 (Li & Yao, ICML 2024), an mmpretrain/mmdet/mmseg backbone.

    Args:
        widen_factor: width multiplier (1.0 and 0.5 are the published models).
        variant: ``'kw'`` (KW options from the arguments; 1x: ``cell_num_ratio=1,
            sharing_range=('layer', 'pwconv')``, 4x: ``cell_num_ratio=4, sharing_range=('layer',)``) or
            ``'kw1d2x'`` (the official 1/2x model, options fixed by
            :data:`KW1D2X_MOBILENETV2_SETTINGS`; pair it with :func:`KWLinearClsHead`).
        out_indices: outputs among ``layer1`` .. ``layer7`` (0..6) and ``conv2`` (7).
        frozen_stages: -1 nothing, 0 ``conv1``, ``i`` also ``layer1`` .. ``layer{i}``.
        norm_eval: keep every BatchNorm (also the attention's) in eval mode while training.
        with_cp: activation checkpointing per block while training (:meth:`BackboneBase.run_stage`).
        norm_cfg, act_cfg: normalization and activation (ReLU6) of the network.
        reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, sharing_range,
            nonlocal_basis_ratio: KernelWarehouse options (``variant='kw'`` only).
        drop_path_rate: accepted for a uniform interface; MobileNetV2 has no stochastic depth, so
            it must be 0.
        init_cfg: mmengine initialization config (``None``: the official initialization).

    Input ``(B, 3, H, W)``; output: tuple of NCHW features of the selected layers.
    """

    #: expand ratio, channels, blocks, stride of the seven inverted-residual rows
    arch_settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                     [6, 320, 1, 1]]
    #: KernelWarehouse stage of each row
    kw_stages = [1, 2, 3, 4, 5, 6, 6]

    def __init__(self, widen_factor: float = 1.0, variant: str = 'kw', out_indices: Sequence[int] = (7,),
                 frozen_stages: int = -1, norm_eval: bool = False, norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU6'), reduction: Optional[Ratio] = None,
                 cell_num_ratio: Optional[Ratio] = None, cell_inplane_ratio: Optional[Ratio] = None,
                 cell_outplane_ratio: Optional[Ratio] = None, sharing_range: Union[str, Sequence[str], None] = None,
                 nonlocal_basis_ratio: Optional[float] = None, drop_path_rate: float = 0.,
                 with_cp: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(frozen_stages=frozen_stages, norm_eval=norm_eval, with_cp=with_cp, init_cfg=init_cfg)
        kw = dict(reduction=reduction, cell_num_ratio=cell_num_ratio, cell_inplane_ratio=cell_inplane_ratio,
                  cell_outplane_ratio=cell_outplane_ratio, sharing_range=sharing_range,
                  nonlocal_basis_ratio=nonlocal_basis_ratio)
        if variant == 'kw':
            defaults = dict(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1, cell_outplane_ratio=1,
                            sharing_range=('layer', 'pwconv'), nonlocal_basis_ratio=1)
            kw = {k: defaults[k] if v is None else v for k, v in kw.items()}
        elif variant == 'kw1d2x':
            given = sorted(k for k, v in kw.items() if v is not None)
            if given:
                raise ValueError(f'KWMobileNetV2: variant "kw1d2x" fixes the KernelWarehouse options; do not pass '
                                 f'{given}')
            kw = dict(KW1D2X_MOBILENETV2_SETTINGS, nonlocal_basis_ratio=1)
            # the classifier's warehouse (the last one) belongs to KWLinearClsHead
            kw.update({k: v[:-1] for k, v in kw.items() if isinstance(v, tuple) and k.startswith('cell_')})
        else:
            raise ValueError(f'KWMobileNetV2: variant must be "kw" or "kw1d2x", got {variant!r}')
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(8) for i in out_indices):
            raise ValueError(f'KWMobileNetV2: out_indices must be in range(0, 8), got {out_indices!r}')
        if frozen_stages not in range(-1, 8):
            raise ValueError(f'KWMobileNetV2: frozen_stages must be in range(-1, 8), got {frozen_stages!r}')
        if drop_path_rate != 0:
            raise ValueError(f'KWMobileNetV2: MobileNetV2 has no stochastic depth; drop_path_rate must be 0, got '
                             f'{drop_path_rate!r}')
        self.widen_factor = widen_factor
        self.variant = variant
        self.out_indices = out_indices

        manager = self._init_manager(norm_layer='BN', **kw)
        in_ch = make_divisible(32 * widen_factor, 8)
        self.conv1 = _ConvNormAct(
            manager.reserve(3, in_ch, kernel_size=3, stride=2, padding=1, bias=False, warehouse_name='stage0_conv0'),
            in_ch, norm_cfg, act_cfg)
        # 1/2x: point-wise convolutions are KW only in the last KW stage
        pw_enabled = [variant == 'kw' or s == 6 for s in range(7)]
        self.layers: List[str] = []
        self.out_channels: List[int] = []
        layer_idx = 0
        for row, (t, c, n, s) in enumerate(self.arch_settings):
            out_ch = make_divisible(c * widen_factor, 8)
            blocks = []
            for i in range(n):
                handover = i == 0 and row > 0 and self.kw_stages[row] != self.kw_stages[row - 1]
                stage = self.kw_stages[row] - 1 if handover else self.kw_stages[row]
                blocks.append(KWInvertedResidual(
                    in_ch, out_ch, s if i == 0 else 1, t, stage=stage, layer=layer_idx, manager=manager,
                    pw_enabled=pw_enabled[stage], norm_cfg=norm_cfg, act_cfg=act_cfg))
                in_ch = out_ch
                layer_idx = 0 if handover else layer_idx + 1
            self.add_module(f'layer{row + 1}', nn.Sequential(*blocks))
            self.layers.append(f'layer{row + 1}')
            self.out_channels.append(out_ch)
        last = make_divisible(1280 * max(1.0, widen_factor), 8)
        self.conv2 = _ConvNormAct(
            manager.reserve(in_ch, last, kernel_size=1, bias=False,
                            warehouse_name=f'stage{self.kw_stages[-1]}_layer{layer_idx}_pwconv1'),
            last, norm_cfg, act_cfg)
        self.layers.append('conv2')
        self.out_channels.append(last)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._allocate_warehouses()
        self._freeze_stages()

    def _frozen_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = [self.conv1] if self.frozen_stages >= 0 else []
        return mods + [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.conv1(x)
        outs = []
        for i, name in enumerate(self.layers):
            x = self.run_stage(getattr(self, name), x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def _kw_linear_cls_head_class():
    """Build (once) the KW classifier head class on top of mmpretrain's ``LinearClsHead``."""
    global _KW_HEAD_CLS
    if _KW_HEAD_CLS is not None:
        return _KW_HEAD_CLS
    from mmpretrain.models.heads import LinearClsHead

    class _KWLinearClsHead(LinearClsHead):
        """``LinearClsHead`` whose ``fc`` is a :class:`KWLinear` drawing from its own warehouse
        (``warehouse_manager.weights.0``), with dropout before it."""

        def __init__(self, num_classes: int, in_channels: int, dropout: float = 0., reduction: float = 0.03125,
                     cell_num_ratio: float = 0.5, cell_inplane_ratio: float = 0.025, cell_outplane_ratio: float = 1,
                     init_cfg: Optional[dict] = None, **kwargs):
            super().__init__(num_classes, in_channels, init_cfg=init_cfg, **kwargs)
            self.warehouse_manager = WarehouseManager(
                reduction=reduction, cell_num_ratio=cell_num_ratio, cell_inplane_ratio=cell_inplane_ratio,
                cell_outplane_ratio=cell_outplane_ratio, norm_layer='BN')
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.fc = self.warehouse_manager.reserve(in_channels, num_classes, kernel_size=1,
                                                     warehouse_name='classifier', layer_type='linear')
            self.warehouse_manager.store()
            self.warehouse_manager.allocate(self)

        def forward(self, feats: Tuple[torch.Tensor, ...]) -> torch.Tensor:
            return self.fc(self.dropout(self.pre_logits(feats)))

    # importable (so picklable) as dynconv_mm.backbones.kw_mobilenetv2.KWLinearClsHeadModule
    _KWLinearClsHead.__name__ = _KWLinearClsHead.__qualname__ = 'KWLinearClsHeadModule'
    _KWLinearClsHead.__module__ = __name__
    _KW_HEAD_CLS = _KWLinearClsHead
    return _KW_HEAD_CLS


_KW_HEAD_CLS = None


def __getattr__(name: str):
    if name == 'KWLinearClsHeadModule':  # built on first use: it needs mmpretrain
        return _kw_linear_cls_head_class()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


@register('model')
def KWLinearClsHead(num_classes: int, in_channels: int, dropout: float = 0., reduction: float = 0.03125,
                    cell_num_ratio: float = 0.5, cell_inplane_ratio: float = 0.025, cell_outplane_ratio: float = 1,
                    **kwargs) -> nn.Module:
    """mmpretrain classification head of KW-MobileNetV2 1/2x: ``LinearClsHead`` with a KernelWarehouse
    linear layer (its own one-layer warehouse; defaults = the official 1/2x classifier) and dropout.

    Keys: ``warehouse_manager.weights.0`` (cells ``(n, c_o, c_i, 1)``), ``fc.conv.bias``,
    ``fc.conv.attention.*``. Input: mmpretrain's tuple of features, the last ``(B, in_channels)``;
    output logits ``(B, num_classes)``. Requires mmpretrain.
    """
    return _kw_linear_cls_head_class()(num_classes, in_channels, dropout=dropout, reduction=reduction,
                                       cell_num_ratio=cell_num_ratio, cell_inplane_ratio=cell_inplane_ratio,
                                       cell_outplane_ratio=cell_outplane_ratio, **kwargs)
