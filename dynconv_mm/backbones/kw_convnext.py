"""KernelWarehouse ConvNeXt backbone (KW-ConvNeXt-T).

Li, Yao: "KernelWarehouse: Rethinking the Design of Dynamic Convolution" (ICML 2024,
https://arxiv.org/abs/2406.07879), on ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022).

Every convolution is a KW convolution with bias: the 4x4 stem (warehouse ``stagestem_conv0``), the
three 2x2 downsamplers (``stage{i}_layerds_conv0``), and in each block the 7x7 depth-wise
convolution (``stage{i}_layer{j}_dwconv0``) and the two point-wise convolutions, as 1x1 convolutions
in NCHW (``..._pwconv1`` / ``..._pwconv2``). With ``sharing_range=('layer', 'pwconv')`` each stage
has one depth-wise and one point-wise warehouse (12 warehouses). The attention branches use
LayerNorm. Stochastic depth increases linearly over the blocks.

Module and attribute names follow mmpretrain's ``ConvNeXt`` (``downsample_layers``, ``stages``,
``depthwise_conv``, ``pointwise_conv1/2``, ``gamma`` of shape ``(C,)``, output norms ``norm{i}``),
which mmdet's layer-wise learning-rate decay constructor relies on. ``gap_before_final_norm=True``
(classification) pools before the output norm, as the official classifier does with its final norm.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import nn

from ..layers.kernel_warehouse import WarehouseManager
from ..registry import register
from .kw_resnet import KWBackboneBase, Ratio

__all__ = ['KWConvNeXt', 'KWConvNeXtBlock', 'LayerNorm2d']


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor: ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class KWConvNeXtBlock(nn.Module):
    """ConvNeXt block with KW convolutions:
    ``x + drop_path(gamma * pw2(GELU(pw1(LN(dw7x7(x))))))``.

    Args:
        channels: block width ``C`` (hidden ``4C``).
        stage / layer: warehouse naming indices.
        manager: the network's :class:`WarehouseManager`.
        drop_path_rate: stochastic depth rate of this block.
        layer_scale_init_value: initial ``gamma`` (``<= 0`` disables layer scale).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, *, stage: int, layer: int, manager: WarehouseManager,
                 drop_path_rate: float = 0., layer_scale_init_value: float = 1e-6):
        super().__init__()
        prefix = f'stage{stage}_layer{layer}_'
        self.depthwise_conv = manager.reserve(channels, channels, kernel_size=7, padding=3, groups=channels,
                                              bias=True, warehouse_name=prefix + 'dwconv0')
        self.norm = LayerNorm2d(channels)
        self.pointwise_conv1 = manager.reserve(channels, 4 * channels, kernel_size=1, bias=True,
                                               warehouse_name=prefix + 'pwconv1')
        self.act = nn.GELU()
        self.pointwise_conv2 = manager.reserve(4 * channels, channels, kernel_size=1, bias=True,
                                               warehouse_name=prefix + 'pwconv2')
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale_init_value)))
        else:
            self.gamma = None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pointwise_conv2(self.act(self.pointwise_conv1(self.norm(self.depthwise_conv(x)))))
        if self.gamma is not None:
            out = out * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(out)


@register('model')
class KWConvNeXt(KWBackboneBase):
    """KernelWarehouse ConvNeXt (Li & Yao, ICML 2024), an mmpretrain/mmdet/mmseg backbone.

    Args:
        arch: ``'tiny'`` (the published model), ``'small'``, ``'base'`` or a dict with ``depths`` and
            ``channels`` (e.g. ``dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256])``).
        in_channels: image channels.
        drop_path_rate: maximum stochastic depth rate (linear over the blocks).
        layer_scale_init_value: initial layer scale.
        out_indices: stages whose output is returned (0..3; ``-1`` = last).
        frozen_stages: number of stages frozen (``downsample_layers[i]`` and ``stages[i]`` for
            ``i < frozen_stages``), mmpretrain's convention.
        gap_before_final_norm: pool before the output norm (classification: outputs are ``(B, C)``);
            ``False`` for dense tasks (NCHW outputs, channels-first LayerNorm ``norm{i}``).
        norm_eval: keep BatchNorm layers in eval mode (there are none unless added; kept for a
            uniform interface).
        with_cp: activation checkpointing per block while training (:meth:`BackboneBase.run_stage`).
        reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, sharing_range,
            nonlocal_basis_ratio: KernelWarehouse options (1x: the defaults).
        init_cfg: mmengine initialization config (``None``: the official initialization).
    """

    arch_settings: Dict[str, Dict[str, List[int]]] = {
        'tiny': dict(depths=[3, 3, 9, 3], channels=[96, 192, 384, 768]),
        'small': dict(depths=[3, 3, 27, 3], channels=[96, 192, 384, 768]),
        'base': dict(depths=[3, 3, 27, 3], channels=[128, 256, 512, 1024]),
    }

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3, drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6, out_indices: Union[int, Sequence[int]] = -1,
                 frozen_stages: int = 0, gap_before_final_norm: bool = True, norm_eval: bool = False,
                 reduction: Ratio = 0.0625, cell_num_ratio: Ratio = 1, cell_inplane_ratio: Ratio = 1,
                 cell_outplane_ratio: Ratio = 1, sharing_range: Union[str, Sequence[str]] = ('layer', 'pwconv'),
                 nonlocal_basis_ratio: float = 1, with_cp: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(frozen_stages=frozen_stages, norm_eval=norm_eval, with_cp=with_cp, init_cfg=init_cfg)
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'KWConvNeXt: arch must be one of {sorted(self.arch_settings)} or a dict, '
                                 f'got {arch!r}')
            arch = self.arch_settings[arch]
        if not isinstance(arch, dict) or set(arch) < {'depths', 'channels'}:
            raise ValueError(f'KWConvNeXt: an arch dict needs "depths" and "channels", got {arch!r}')
        depths, channels = list(arch['depths']), list(arch['channels'])
        if len(depths) != 4 or len(channels) != 4:
            raise ValueError(f'KWConvNeXt: depths and channels must have 4 entries, got {depths} / {channels}')
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        out_indices = tuple(i + 4 if i < 0 else i for i in out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f'KWConvNeXt: out_indices must be in range(-4, 4), got {out_indices!r}')
        if frozen_stages not in range(0, 5):
            raise ValueError(f'KWConvNeXt: frozen_stages must be in range(0, 5), got {frozen_stages!r}')
        self.depths, self.channels = depths, channels
        self.out_indices = out_indices
        self.gap_before_final_norm = gap_before_final_norm

        manager = self._init_manager(
            reduction=reduction, cell_num_ratio=cell_num_ratio, cell_inplane_ratio=cell_inplane_ratio,
            cell_outplane_ratio=cell_outplane_ratio, sharing_range=sharing_range,
            nonlocal_basis_ratio=nonlocal_basis_ratio, norm_layer='LN')
        # all downsamplers are reserved (and registered) before the stages, as in the official model
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            manager.reserve(in_channels, channels[0], kernel_size=4, stride=4, bias=True,
                            warehouse_name='stagestem_conv0'),
            LayerNorm2d(channels[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(channels[i]),
                manager.reserve(channels[i], channels[i + 1], kernel_size=2, stride=2, bias=True,
                                warehouse_name=f'stage{i}_layerds_conv0')))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                KWConvNeXtBlock(channels[i], stage=i, layer=j, manager=manager, drop_path_rate=rates[start + j],
                                layer_scale_init_value=layer_scale_init_value) for j in range(depths[i])]))
        for i in out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(channels[i]))
        self.out_channels = [channels[i] for i in out_indices]

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # (attention branches do not exist before allocation)
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._allocate_warehouses()
        self._freeze_stages()

    def _frozen_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = []
        for i in range(self.frozen_stages):
            mods += [self.downsample_layers[i], self.stages[i]]
        return mods

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """``(layer id, number of layers)`` of a parameter, for layer-wise learning-rate decay
        (mmpretrain's ``LearningRateDecayOptimWrapperConstructor``), with ConvNeXt's grouping: the stem
        is layer 0; stages 0 and 1 (and the downsamplers before stages 1, 2) layers 1-3; stage 2 in
        groups of three blocks; the last downsampler and stage the deepest layer. Parameters outside
        the stages, the warehouses included (they are shared across blocks), get the last id, i.e. no
        decay, as in the official detection recipe."""
        deepest = 12 if self.depths[-2] > 9 else 6
        total = deepest + 2
        if not param_name.startswith(prefix):
            return deepest + 1, total
        parts = param_name[len(prefix):].split('.')
        if parts[0] == 'downsample_layers':
            i = int(parts[1])
            return {0: 0, 1: 2, 2: 3}.get(i, deepest), total
        if parts[0] == 'stages':
            i, j = int(parts[1]), int(parts[2])
            if i < 2:
                return i + 1, total
            return (3 + j // 3 if i == 2 else deepest), total
        return deepest + 1, total

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        for i in range(4):
            x = self.run_stage(self.stages[i], self.downsample_layers[i](x))
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                if self.gap_before_final_norm:
                    outs.append(norm(x.mean((2, 3), keepdim=True)).flatten(1))
                else:
                    outs.append(norm(x))
        return tuple(outs)
