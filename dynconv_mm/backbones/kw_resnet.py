"""KernelWarehouse ResNet backbone (KW-ResNet-18/50).

Li, Yao: "KernelWarehouse: Rethinking the Design of Dynamic Convolution" (ICML 2024,
https://arxiv.org/abs/2406.07879). Every 3x3/1x1 convolution of the residual stages takes its kernel
from a *warehouse* of kernel cells shared by the convolutions of one stage; the stem convolution and
the classifier stay static.

Warehouse layout (it decides which cells each layer mixes, so converted official weights depend on
it being reproduced exactly):

* layers are named ``stage{s}_layer{l}_conv{c}`` and merged by ``sharing_range`` (default
  ``('layer', 'conv')``: one warehouse per stage);
* *handover*: in the first block of stage ``s`` the first convolution (and the stride-2 shortcut
  convolution) draw from stage ``s - 1``'s warehouse; the Bottleneck's first 1x1 convolution of
  ``layer1`` (stage -1) and the stride-1 shortcut of ``layer1`` are plain convolutions;
* warehouse ids follow the order in which names are first reserved (the shortcut is reserved before
  its block's convolutions), cell offsets follow ``module.modules()`` order (the shortcut comes after
  the block's convolutions).

The module also holds :class:`KWBackboneBase`, the behaviour the three KW backbones share
(``frozen_stages``, ``norm_eval``, warehouse bookkeeping).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.kernel_warehouse import WarehouseManager
from ..registry import register
from .base import BackboneBase

__all__ = ['KWResNet', 'KWBasicBlock', 'KWBottleneck', 'KWBackboneBase']

Ratio = Union[float, Sequence[float]]


def _kw_layers(module: nn.Module) -> Iterable[nn.Module]:
    """The KernelWarehouse layers (modules that draw cells from a warehouse) inside ``module``."""
    for m in module.modules():
        if isinstance(getattr(m, 'warehouse_id', None), int):
            yield m


class KWBackboneBase(BackboneBase):
    """What the KernelWarehouse backbones share.

    * one :class:`WarehouseManager` registered as ``warehouse_manager`` (its cells are
      ``warehouse_manager.weights.<i>``), built by :meth:`_init_manager` before any KW layer is
      reserved and allocated by :meth:`_allocate_warehouses` once the whole network exists;
    * ``frozen_stages``: subclasses list the modules of each frozen stage in :meth:`_frozen_modules`;
      those are put in eval mode and their parameters stop requiring gradients. A warehouse is frozen
      too when *every* layer drawing from it lies inside the frozen modules (a warehouse shared with a
      trainable stage, e.g. through the ResNet handover, keeps training, so the frozen stages' output
      can still change through it);
    * ``norm_eval``: every BatchNorm (including the attention's ``BatchNorm1d``) stays in eval mode
      while training.
    """

    def _init_manager(self, *, reduction: Ratio, cell_num_ratio: Ratio, cell_inplane_ratio: Ratio,
                      cell_outplane_ratio: Ratio, sharing_range, nonlocal_basis_ratio: float,
                      norm_layer: str = 'BN') -> WarehouseManager:
        self.warehouse_manager = WarehouseManager(
            reduction=reduction, cell_num_ratio=cell_num_ratio, cell_inplane_ratio=cell_inplane_ratio,
            cell_outplane_ratio=cell_outplane_ratio, sharing_range=sharing_range,
            nonlocal_basis_ratio=nonlocal_basis_ratio, norm_layer=norm_layer)
        return self.warehouse_manager

    def _allocate_warehouses(self) -> None:
        self.warehouse_manager.store()
        self.warehouse_manager.allocate(self)

    def _freeze_stages(self) -> List[nn.Module]:
        frozen = super()._freeze_stages()
        inside = set()
        for m in frozen:
            inside.update(id(k) for k in _kw_layers(m))
        users: Dict[int, List[bool]] = {}
        for layer in _kw_layers(self):
            users.setdefault(layer.warehouse_id, []).append(id(layer) in inside)
        for wid, flags in users.items():
            if frozen and all(flags):
                self.warehouse_manager.weights[wid].requires_grad = False
        return frozen


def _stage_name(stage: int, layer: int, conv: int) -> str:
    return f'stage{stage}_layer{layer}_conv{conv}'


class KWBasicBlock(nn.Module):
    """Two 3x3 KW convolutions with a residual connection (ResNet-18/34 block).

    Args:
        in_channels / out_channels: block input / output channels (``expansion`` = 1).
        stride: stride of the first convolution.
        downsample: the shortcut (``Sequential(conv, norm)``), or ``None`` for identity.
        stage / layer: warehouse naming indices of this block; ``handover`` marks the first block of a
            stage (its first convolution draws from the previous stage's warehouse, clamped at 0).
        manager: the network's :class:`WarehouseManager`.
        drop_path_rate: stochastic depth on the residual branch.
        norm_cfg: normalization after each convolution.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """
    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 *, stage: int, layer: int, manager: WarehouseManager, handover: bool = False,
                 drop_path_rate: float = 0., norm_cfg: dict = dict(type='BN')):
        super().__init__()
        conv1_stage = max(stage - 1, 0) if handover else stage
        self.conv1 = manager.reserve(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False,
                                     warehouse_name=_stage_name(conv1_stage, layer, 0))
        self.bn1 = build_norm_layer(norm_cfg, out_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        layer = 0 if handover else layer
        self.conv2 = manager.reserve(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False,
                                     warehouse_name=_stage_name(stage, layer, 1))
        self.bn2 = build_norm_layer(norm_cfg, out_channels)[1]
        # registered after the convolutions: the shortcut's cells follow theirs in its warehouse
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(identity + self.drop_path(out))


class KWBottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 KW convolutions with a residual connection (ResNet-50+ block).

    Arguments as :class:`KWBasicBlock`; ``out_channels`` is the block output (``expansion`` = 4
    times the width). In the handover block the first 1x1 convolution draws from stage ``s - 1``;
    for stage 0 that is stage -1, which makes it a plain ``nn.Conv2d``.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """
    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 *, stage: int, layer: int, manager: WarehouseManager, handover: bool = False,
                 drop_path_rate: float = 0., norm_cfg: dict = dict(type='BN')):
        super().__init__()
        mid = out_channels // self.expansion
        conv1_stage = stage - 1 if handover else stage
        self.conv1 = manager.reserve(in_channels, mid, kernel_size=1, bias=False,
                                     warehouse_name=_stage_name(conv1_stage, layer, 0), enabled=conv1_stage >= 0)
        self.bn1 = build_norm_layer(norm_cfg, mid)[1]
        layer = 0 if handover else layer
        self.conv2 = manager.reserve(mid, mid, kernel_size=3, stride=stride, padding=1, bias=False,
                                     warehouse_name=_stage_name(stage, layer, 1))
        self.bn2 = build_norm_layer(norm_cfg, mid)[1]
        self.conv3 = manager.reserve(mid, out_channels, kernel_size=1, bias=False,
                                     warehouse_name=_stage_name(stage, layer, 2))
        self.bn3 = build_norm_layer(norm_cfg, out_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


_BLOCKS: Dict[str, Type[nn.Module]] = {'basic': KWBasicBlock, 'bottleneck': KWBottleneck}


@register('model')
class KWResNet(KWBackboneBase):
    """KernelWarehouse ResNet (Li & Yao, ICML 2024), an mmpretrain/mmdet/mmseg backbone.

    Args:
        depth: 18, 34, 50, 101 or 152 (block type and blocks per stage), unless ``stage_blocks`` /
            ``block`` override them (e.g. ``depth=50, stage_blocks=(1, 1, 1, 1)``).
        stage_blocks: blocks per stage (4 stages).
        block: ``'basic'`` or ``'bottleneck'``; defaults to the depth's block type.
        in_channels: image channels.
        base_channels: width of the first stage (64 in ResNets); stage ``i`` is ``base_channels * 2**i``
            times the block expansion.
        out_indices: stages whose output is returned (0..3); ``(3,)`` for classification,
            ``(0, 1, 2, 3)`` for FPN/UperNet.
        frozen_stages: -1 freezes nothing, 0 the stem, ``i`` the stem and ``layer1..layer{i}``
            (warehouses only when no trainable layer shares them, see :class:`KWBackboneBase`).
        norm_eval: keep every BatchNorm in eval mode while training (detection fine-tuning).
        with_cp: activation checkpointing per block while training (:meth:`BackboneBase.run_stage`).
        norm_cfg: normalization of the network (``BN``, ``SyncBN``...); the attention branches keep
            their own ``BatchNorm1d``.
        drop_path_rate: stochastic depth of every residual branch (the same rate in all blocks, as in
            the official model).
        reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, sharing_range,
            nonlocal_basis_ratio: KernelWarehouse options (see :class:`WarehouseManager`). The
            published models: 1/4x ``cell_num_ratio=0.25, cell_*plane_ratio=0.5``; 1/2x ``0.5, 0.5``
            (ResNet-50 also ``nonlocal_basis_ratio=0.0625``); 1x/2x/4x ``cell_num_ratio=1/2/4``.
        init_cfg: mmengine initialization config; ``None`` keeps the official initialization done at
            construction.

    Input ``(B, in_channels, H, W)``; output: tuple of ``(B, C_i, H / 2**(i+2), W / 2**(i+2))``.
    """

    arch_settings = {
        18: ('basic', (2, 2, 2, 2)),
        34: ('basic', (3, 4, 6, 3)),
        50: ('bottleneck', (3, 4, 6, 3)),
        101: ('bottleneck', (3, 4, 23, 3)),
        152: ('bottleneck', (3, 8, 36, 3)),
    }

    def __init__(self, depth: int = 50, stage_blocks: Optional[Sequence[int]] = None, block: Optional[str] = None,
                 in_channels: int = 3, base_channels: int = 64, out_indices: Sequence[int] = (3,),
                 frozen_stages: int = -1, norm_eval: bool = False, norm_cfg: dict = dict(type='BN'),
                 drop_path_rate: float = 0., reduction: Ratio = 0.0625, cell_num_ratio: Ratio = 1,
                 cell_inplane_ratio: Ratio = 1, cell_outplane_ratio: Ratio = 1,
                 sharing_range: Union[str, Sequence[str]] = ('layer', 'conv'), nonlocal_basis_ratio: float = 1,
                 with_cp: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(frozen_stages=frozen_stages, norm_eval=norm_eval, with_cp=with_cp, init_cfg=init_cfg)
        if depth not in self.arch_settings:
            raise ValueError(f'KWResNet: depth must be one of {sorted(self.arch_settings)}, got {depth!r}')
        default_block, default_blocks = self.arch_settings[depth]
        block = default_block if block is None else block
        if block not in _BLOCKS:
            raise ValueError(f'KWResNet: block must be one of {sorted(_BLOCKS)}, got {block!r}')
        stage_blocks = tuple(default_blocks if stage_blocks is None else stage_blocks)
        if len(stage_blocks) != 4 or any(int(n) < 1 for n in stage_blocks):
            raise ValueError(f'KWResNet: stage_blocks must be 4 positive ints, got {stage_blocks!r}')
        out_indices = tuple(i + 4 if i < 0 else i for i in out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f'KWResNet: out_indices must be in range(0, 4), got {out_indices!r}')
        if frozen_stages not in range(-1, 5):
            raise ValueError(f'KWResNet: frozen_stages must be in range(-1, 5), got {frozen_stages!r}')
        if drop_path_rate < 0 or drop_path_rate >= 1:
            raise ValueError(f'KWResNet: drop_path_rate must be in [0, 1), got {drop_path_rate!r}')
        self.depth = depth
        self.stage_blocks = stage_blocks
        self.out_indices = out_indices
        block_cls = _BLOCKS[block]

        manager = self._init_manager(
            reduction=reduction, cell_num_ratio=cell_num_ratio, cell_inplane_ratio=cell_inplane_ratio,
            cell_outplane_ratio=cell_outplane_ratio, sharing_range=sharing_range,
            nonlocal_basis_ratio=nonlocal_basis_ratio, norm_layer='BN')
        self.conv1 = nn.Conv2d(in_channels, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = build_norm_layer(norm_cfg, base_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.out_channels: List[int] = []
        in_ch, layer_idx = base_channels, 0
        for s, n in enumerate(stage_blocks):
            out_ch = base_channels * 2 ** s * block_cls.expansion
            stride = 1 if s == 0 else 2
            downsample = None
            if stride != 1 or in_ch != out_ch:
                # reserved before the block's convolutions (warehouse ids follow reservation order)
                downsample = nn.Sequential(
                    manager.reserve(in_ch, out_ch, kernel_size=1, stride=stride, bias=False,
                                    warehouse_name=_stage_name(s - 1, layer_idx + 1, 0), enabled=stride != 1),
                    build_norm_layer(norm_cfg, out_ch)[1])
            blocks = [block_cls(in_ch, out_ch, stride, downsample, stage=s, layer=layer_idx, manager=manager,
                                handover=True, drop_path_rate=drop_path_rate, norm_cfg=norm_cfg)]
            layer_idx = 1
            for _ in range(1, n):
                blocks.append(block_cls(out_ch, out_ch, stage=s, layer=layer_idx, manager=manager,
                                        drop_path_rate=drop_path_rate, norm_cfg=norm_cfg))
                layer_idx += 1
            self.add_module(f'layer{s + 1}', nn.Sequential(*blocks))
            self.out_channels.append(out_ch)
            in_ch = out_ch

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._allocate_warehouses()
        self._freeze_stages()

    def _frozen_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        return mods + [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            x = self.run_stage(getattr(self, f'layer{i + 1}'), x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
