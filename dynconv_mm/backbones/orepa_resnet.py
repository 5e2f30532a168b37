"""ResNet with re-parameterized conv+BN blocks, the layout of the official OREPA code.

Hu et al., "Online Convolutional Re-parameterization", CVPR 2022 (``models/resnet.py`` of
JUGGHM/OREPA_CVPR2022). Every conv+BN(+ReLU) of the ResNet is one re-parameterized block that
contains its BatchNorm; ``switch_to_deploy()`` folds each into one ``nn.Conv2d`` with bias.

Block choice per kernel size (``block_type``, the official ``CONV_BN_IMPL``):

============  ===================  ========================  =====================
block_type    7x7 stem             3x3                       1x1 (Bottleneck)
============  ===================  ========================  =====================
'OREPA'       OREPA_LargeConv      OREPA                     OREPA_1x1
'DBB'         ConvNorm             DBB                       ConvNorm
'RepVGG'      ConvNorm             RepVGGBlock (+ReLU)       ConvNorm
'OREPA_VGG'   ConvNorm             RepVGGBlock_OREPA (+ReLU) ConvNorm
'base'        ConvNorm             ConvNorm                  ConvNorm
============  ===================  ========================  =====================

BasicBlock shortcuts are always ``ConvNorm`` (1x1 conv + BN); Bottleneck shortcuts follow the 1x1 column.
The RepVGG-style blocks end in a ReLU even at the second conv of a block, as in the official models.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn

from dynconv_mm.layers.reparam import (
    DBB,
    OREPA,
    ConvNorm,
    OREPA_1x1,
    OREPA_LargeConv,
    RepVGGBlock,
    RepVGGBlock_OREPA,
    reparameterize_model,
)
from dynconv_mm.registry import register

from .base import BackboneBase

__all__ = ['OREPAResNet', 'conv_norm_block']

_BLOCK_TYPES = ('OREPA', 'DBB', 'RepVGG', 'OREPA_VGG', 'base')


def conv_norm_block(block_type: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                    relu: bool = False, norm_cfg: dict = dict(type='BN'), deploy: bool = False) -> nn.Module:
    """One conv+norm(+ReLU) position of the network, built as ``block_type`` prescribes (table above)."""
    if block_type not in _BLOCK_TYPES:
        raise ValueError(f'OREPAResNet: block_type must be one of {_BLOCK_TYPES}, got {block_type!r}')
    act = dict(type='ReLU') if relu else None
    pad = kernel_size // 2
    common = dict(stride=stride, padding=pad, norm_cfg=norm_cfg, deploy=deploy)
    if block_type == 'OREPA':
        if kernel_size == 1:
            return OREPA_1x1(in_channels, out_channels, 1, act_cfg=act, **common)
        if kernel_size >= 7:
            return OREPA_LargeConv(in_channels, out_channels, kernel_size, act_cfg=act, **common)
        return OREPA(in_channels, out_channels, kernel_size, act_cfg=act, **common)
    if block_type == 'base' or kernel_size == 1 or kernel_size >= 7:
        return ConvNorm(in_channels, out_channels, kernel_size, act_cfg=act, **common)
    if block_type == 'DBB':
        return DBB(in_channels, out_channels, kernel_size, act_cfg=act, **common)
    cls = RepVGGBlock if block_type == 'RepVGG' else RepVGGBlock_OREPA
    return cls(in_channels, out_channels, kernel_size, act_cfg=dict(type='ReLU'), **common)


class OREPABasicBlock(nn.Module):
    """``relu(conv2(conv1(x)) + shortcut(x))``; conv1 (3x3, stride) ends in ReLU; shortcut ``ConvNorm``."""
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, block_type: str, norm_cfg: dict, deploy: bool):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = conv_norm_block(block_type, in_channels, planes, 3, stride, True, norm_cfg, deploy)
        self.conv2 = conv_norm_block(block_type, planes, out, 3, 1, False, norm_cfg, deploy)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = ConvNorm(in_channels, out, 1, stride, norm_cfg=norm_cfg, deploy=deploy)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class OREPABottleneck(nn.Module):
    """``relu(conv3(conv2(conv1(x))) + shortcut(x))``; 1x1 -> 3x3 (stride) -> 1x1, expansion 4."""
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, block_type: str, norm_cfg: dict, deploy: bool):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = conv_norm_block(block_type, in_channels, planes, 1, 1, True, norm_cfg, deploy)
        self.conv2 = conv_norm_block(block_type, planes, planes, 3, stride, True, norm_cfg, deploy)
        self.conv3 = conv_norm_block(block_type, planes, out, 1, 1, False, norm_cfg, deploy)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = conv_norm_block(block_type, in_channels, out, 1, stride, False, norm_cfg, deploy)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


@register('model')
class OREPAResNet(BackboneBase):
    """ResNet whose conv+BN positions are re-parameterized blocks (official OREPA ResNet layout).

    Args:
        depth: 18, 34, 50, 101 or 152.
        width_multiplier: channel multiplier (``int(64 * w)`` stem channels; the golden fixture uses 0.25).
        in_channels: input channels.
        block_type: ``'OREPA'`` (default), ``'DBB'``, ``'RepVGG'``, ``'OREPA_VGG'`` or ``'base'`` (see the module
            docstring).
        out_indices: stages (0-3) whose outputs are returned.
        frozen_stages: stages to freeze (-1: none; 0: the stem; i: the stem and stages 1..i).
        norm_cfg: the norm inside every block (BatchNorm-type: it is folded for deployment).
        norm_eval: keep the norm layers in eval mode during training.
        with_cp: activation checkpointing per block while training (:meth:`BackboneBase.run_stage`).
        deploy: build the deploy form (every block one ``nn.Conv2d`` with bias) directly, e.g. to load a
            converted deploy checkpoint.
        init_cfg: mmengine init config (default ``None``: the blocks' own initialisation, as the official code).

    Forward: ``(B, in_channels, H, W)`` -> tuple of stage outputs ``(B, C_i, H/2^(i+2), W/2^(i+2))``.
    Classification: add ``GlobalAveragePooling`` and ``LinearClsHead(in_channels=512 * expansion * w)``.
    Keys: ``stem``, ``layer{1-4}.{j}.conv{1,2[,3]}``, ``layer{1-4}.{j}.downsample``
    (:func:`dynconv_mm.converters.orepa.convert_orepa_resnet` maps official checkpoints).
    """

    arch_settings = {18: (OREPABasicBlock, (2, 2, 2, 2)), 34: (OREPABasicBlock, (3, 4, 6, 3)),
                     50: (OREPABottleneck, (3, 4, 6, 3)), 101: (OREPABottleneck, (3, 4, 23, 3)),
                     152: (OREPABottleneck, (3, 8, 36, 3))}

    def __init__(self, depth: int = 18, width_multiplier: float = 1.0, in_channels: int = 3,
                 block_type: str = 'OREPA', out_indices: Sequence[int] = (3,), frozen_stages: int = -1,
                 norm_cfg: dict = dict(type='BN', requires_grad=True), norm_eval: bool = False, deploy: bool = False,
                 with_cp: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(with_cp=with_cp, init_cfg=init_cfg)
        if depth not in self.arch_settings:
            raise ValueError(f'OREPAResNet: depth must be one of {sorted(self.arch_settings)}, got {depth}')
        if block_type not in _BLOCK_TYPES:
            raise ValueError(f'OREPAResNet: block_type must be one of {_BLOCK_TYPES}, got {block_type!r}')
        out_indices = tuple(i + 4 if i < 0 else i for i in out_indices)
        if not out_indices or any(i < 0 or i > 3 for i in out_indices):
            raise ValueError(f'OREPAResNet: out_indices must be in 0..3, got {out_indices}')
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f'OREPAResNet: frozen_stages must be in -1..4, got {frozen_stages}')
        block, layers = self.arch_settings[depth]
        self.depth, self.block_type, self.out_indices = depth, block_type, out_indices
        self.frozen_stages, self.norm_eval, self.deploy = frozen_stages, norm_eval, deploy
        planes = int(64 * width_multiplier)
        self.stem = conv_norm_block(block_type, in_channels, planes, 7, 2, True, norm_cfg, deploy)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = planes
        self.res_layers = []
        for i, n in enumerate(layers):
            p = int(64 * 2 ** i * width_multiplier)
            blocks = []
            for j in range(n):
                blocks.append(block(inplanes, p, (1 if i == 0 else 2) if j == 0 else 1, block_type, norm_cfg, deploy))
                inplanes = p * block.expansion
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.res_layers.append(f'layer{i + 1}')
        self.feat_dim = inplanes
        self._freeze_stages()

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.maxpool(self.stem(x))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = self.run_stage(getattr(self, name), x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _frozen_modules(self) -> List[nn.Module]:
        return ([self.stem] if self.frozen_stages >= 0 else []) + \
            [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]


    def switch_to_deploy(self) -> None:
        """Fold every block into one ``nn.Conv2d`` with bias (idempotent)."""
        reparameterize_model(self)
        self.deploy = True
        self._freeze_stages()
