"""PEDConv ResNet: the ResNet of the official PEDConv code, as an OpenMMLab backbone.

Paper: Hou and Kung, "Parameter-Efficient Dynamic Convolution via Tensor Decomposition", BMVC 2021
(official code: zejiangh/PEDConv ``image_classification/resnet.py``, ``resnet18(width_ratio)`` and
``resnet50(wmul)``).

Every convolution inside the residual blocks is a :class:`~dynconv_mm.layers.PEDConv2d` (BasicBlock:
``conv1`` including the stride-2 one, ``conv2``; Bottleneck: ``conv1``-``conv3``); the 7x7 stem and the
1x1 downsample shortcuts stay static. Module names follow mmpretrain's ``ResNet`` (``conv1``, ``bn1``,
``layer{i}.{j}.conv{k}``, ``bn{k}``, ``downsample.{0,1}``), so the official checkpoints convert with
prefixes only (:mod:`dynconv_mm.converters.pedconv`).

Widths: stage ``i`` has ``int(base_channels * 2**i * widen_factor)`` channels (times 4 after a
Bottleneck), the stem ``int(base_channels * widen_factor)``: ``depth=18, widen_factor=0.25`` is the
official ``resnet18(width_ratio=0.25)``. (The official ``resnet50(wmul)`` with ``wmul < 1`` uses
``int(wmul * 64) + 1``-wide bottlenecks; its released models use ``wmul = 1``, where both agree.)

For classification use ``GlobalAveragePooling`` + ``LinearClsHead``: at 224x224 input the
global average equals the official fixed ``AvgPool2d(7)``, and other input sizes work too.
Training needs the info-max loss hook: ``custom_hooks=[dict(type='AuxLossHook')]``.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import nn

from ..registry import register
from .base import BackboneBase

__all__ = ['PEDResNet', 'PEDBasicBlock', 'PEDBottleneck']

DEFAULT_CONV = dict(type='PEDConv2d')


class PEDBasicBlock(nn.Module):
    """ResNet basic block with dynamic 3x3 convolutions: ``conv1 (stride) -> bn1 -> relu -> conv2 -> bn2
    (+ shortcut) -> relu``."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, conv_cfg: Optional[Dict] = None,
                 norm_cfg: Dict = dict(type='BN')) -> None:
        super().__init__()
        conv_cfg = copy.deepcopy(conv_cfg or DEFAULT_CONV)
        self.conv1 = build_conv_layer(conv_cfg, in_channels, channels, 3, stride=stride, padding=dilation,
                                      dilation=dilation, bias=False)
        self.bn1 = build_norm_layer(norm_cfg, channels)[1]
        self.conv2 = build_conv_layer(conv_cfg, channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = build_norm_layer(norm_cfg, channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class PEDBottleneck(nn.Module):
    """ResNet bottleneck with dynamic convolutions (stride on the 3x3, "pytorch" style):
    ``1x1 -> 3x3 (stride) -> 1x1 (x4)``."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, conv_cfg: Optional[Dict] = None,
                 norm_cfg: Dict = dict(type='BN')) -> None:
        super().__init__()
        conv_cfg = copy.deepcopy(conv_cfg or DEFAULT_CONV)
        out_channels = channels * self.expansion
        self.conv1 = build_conv_layer(conv_cfg, in_channels, channels, 1, bias=False)
        self.bn1 = build_norm_layer(norm_cfg, channels)[1]
        self.conv2 = build_conv_layer(conv_cfg, channels, channels, 3, stride=stride, padding=dilation,
                                      dilation=dilation, bias=False)
        self.bn2 = build_norm_layer(norm_cfg, channels)[1]
        self.conv3 = build_conv_layer(conv_cfg, channels, out_channels, 1, bias=False)
        self.bn3 = build_norm_layer(norm_cfg, out_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@register('model')
class PEDResNet(BackboneBase):
    """PEDConv ResNet backbone (mmpretrain / mmdet / mmseg).

    Args:
        depth: 18, 34, 50, 101 or 152 (the official code ships 18 and 50).
        in_channels: input image channels.
        widen_factor: width multiplier of every stage and the stem (official ``width_ratio``/``wmul``).
        base_channels: width of the first stage before ``widen_factor`` (64).
        num_stages: 1 to 4.
        strides, dilations: per stage.
        out_indices: stages whose outputs are returned (tuple of feature maps).
        frozen_stages: stages to freeze (``-1``: none; ``0``: the stem). Frozen stages run in eval mode,
            so their PEDConv layers use the attention means and add no info-max loss.
        conv_cfg: config of the block convolutions (``dict(type='PEDConv2d')``; options such as
            ``aux_loss_weight``, ``noise_std`` go here). Any registered conv type works.
        norm_cfg: norm layers (``dict(type='SyncBN')`` for detection).
        norm_eval: keep norm layers in eval mode while training.
        with_cp: activation checkpointing per block while training (:meth:`BackboneBase.run_stage`).
        zero_init_residual: zero the last norm of each block (off by default, like the official code,
            which initialises every BN weight to 0.5).
        init_cfg: mmengine init config; the default reproduces the official init (Kaiming fan-out
            convolutions, BN weight 0.5 / bias 0; PEDConv layers initialise themselves).

    Shapes: ``(B, in_channels, H, W)`` -> tuple of ``(B, C_i, H / 2**(i+2), W / 2**(i+2))`` for ``i`` in
    ``out_indices`` (with the default strides).
    """

    arch_settings = {
        18: (PEDBasicBlock, (2, 2, 2, 2)),
        34: (PEDBasicBlock, (3, 4, 6, 3)),
        50: (PEDBottleneck, (3, 4, 6, 3)),
        101: (PEDBottleneck, (3, 4, 23, 3)),
        152: (PEDBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self,
                 depth: int = 18,
                 in_channels: int = 3,
                 widen_factor: float = 1.0,
                 base_channels: int = 64,
                 num_stages: int = 4,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (3, ),
                 frozen_stages: int = -1,
                 conv_cfg: Optional[Dict] = None,
                 norm_cfg: Dict = dict(type='BN', requires_grad=True),
                 norm_eval: bool = False,
                 zero_init_residual: bool = False,
                 with_cp: bool = False,
                 init_cfg=(dict(type='Kaiming', layer=['Conv2d'], mode='fan_out', nonlinearity='relu'),
                           dict(type='Constant', val=0.5, bias=0, layer=['_BatchNorm'])),
                 ) -> None:
        super().__init__(with_cp=with_cp, init_cfg=list(init_cfg) if init_cfg is not None else None)
        if depth not in self.arch_settings:
            raise ValueError(f'PEDResNet: depth={depth!r} is not one of {sorted(self.arch_settings)}')
        if not 1 <= num_stages <= 4:
            raise ValueError(f'PEDResNet: num_stages must be 1..4, got {num_stages}')
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(f'PEDResNet: strides={tuple(strides)} and dilations={tuple(dilations)} need '
                             f'num_stages={num_stages} entries')
        out_indices = tuple(out_indices)
        if not out_indices or any(not -num_stages <= i < num_stages for i in out_indices):
            raise ValueError(f'PEDResNet: out_indices={out_indices} must index the {num_stages} stages')
        if not widen_factor > 0:
            raise ValueError(f'PEDResNet: widen_factor must be > 0, got {widen_factor}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'PEDResNet: frozen_stages must be in -1..{num_stages}, got {frozen_stages}')
        self.depth = depth
        self.num_stages = num_stages
        self.out_indices = tuple(i % num_stages for i in out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual
        self.conv_cfg = copy.deepcopy(conv_cfg or DEFAULT_CONV)
        block, stage_blocks = self.arch_settings[depth]
        self.block = block

        stem = int(base_channels * widen_factor)
        if stem < 1:
            raise ValueError(f'PEDResNet: base_channels={base_channels} x widen_factor={widen_factor} leaves no '
                             'channels')
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = build_norm_layer(norm_cfg, stem)[1]
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.out_channels = []
        cin = stem
        for i in range(num_stages):
            channels = int(base_channels * 2 ** i * widen_factor)
            layers = []
            for j in range(stage_blocks[i]):
                stride = strides[i] if j == 0 else 1
                downsample = None
                if j == 0 and (stride != 1 or cin != channels * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(cin, channels * block.expansion, 1, stride=stride, bias=False),
                        build_norm_layer(norm_cfg, channels * block.expansion)[1])
                layers.append(block(cin, channels, stride, dilations[i], downsample, self.conv_cfg, norm_cfg))
                cin = channels * block.expansion
            self.add_module(f'layer{i + 1}', nn.Sequential(*layers))
            self.out_channels.append(cin)
        self._freeze_stages()

    def init_weights(self) -> None:
        super().init_weights()
        if self.zero_init_residual:
            for m in self.modules():
                last = getattr(m, 'bn3', None) if isinstance(m, PEDBottleneck) else (
                    getattr(m, 'bn2', None) if isinstance(m, PEDBasicBlock) else None)
                if last is not None:
                    nn.init.zeros_(last.weight)

    def _frozen_modules(self) -> List[nn.Module]:
        stem = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        return stem + [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]


    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(self.num_stages):
            x = self.run_stage(getattr(self, f'layer{i + 1}'), x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
