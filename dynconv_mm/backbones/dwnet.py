"""DWNet and dynamic DWNet backbones.

Han et al., "On the Connection between Local Attention and Dynamic Depth-wise Convolution", ICLR 2022
(arXiv 2106.04263). A Swin Transformer skeleton (4x4 patch embedding, four stages at strides 4-32
with 2x2 patch merging in between) whose window attention is replaced by a depth-wise convolution
block with the window's size (7x7):

* ``DWBlock`` (``attn2conv``): 1x1 conv -> BN -> ReLU -> 7x7 depth-wise conv -> BN -> ReLU -> 1x1 conv
  -> BN, where the depth-wise conv is static (DWNet), :class:`~dynconv_mm.layers.DynamicDWConv2d`
  (dynamic DWNet: per-sample kernels from the pooled input) or
  :class:`~dynconv_mm.layers.IDynamicDWConv2d` (inhomogeneous: per-position kernels);
* ``SpatialBlock``: ``x + DropPath(DWBlock(x))``, then ``x + DropPath(MLP(BN(x)))`` (a BatchNorm, not a
  LayerNorm, before the MLP).

Two modes (``mode``):

* ``'classification'`` (the official ImageNet model): LayerNorm output norms (``norm3`` is the official
  final ``norm``); feed the output to a global-average-pooling neck and a linear head, which is the
  official head (LayerNorm -> mean over tokens -> Linear).
* ``'dense'`` (the official detection/segmentation backbone): BatchNorm output norms on every output
  stage (SyncBN with ``norm_cfg=dict(type='SyncBN')``), arbitrary input sizes: each block pads its map
  on the right/bottom to a multiple of the window before the ``DWBlock`` and crops afterwards (the
  padded zeros pass through the first 1x1 conv and BN, so this differs from the conv's own padding).

In both modes the patch embedding pads the image on the right/bottom to a multiple of the patch size
and patch merging pads odd sizes, so any input size runs (at 224x224 nothing is padded).

Feature maps inside a stage are channels-last ``(B, H, W, C)``; outputs are ``(B, C, H, W)``.
Parameter names follow the official code (``patch_embed``, ``layers.{i}.blocks.{j}.attn2conv``,
``layers.{i}.downsample``), with the output norms named ``norm{i}`` as in mmpretrain/mmdet backbones,
so official checkpoints convert by a handful of renames (:mod:`dynconv_mm.converters.dwnet`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from torch import nn

from ..layers.dynamic_dw import DynamicDWConv2d, IDynamicDWConv2d
from ..registry import register
from .base import BackboneBase

__all__ = ['DWNet', 'DWBlock', 'SpatialBlock', 'PatchMerging', 'DWNetPatchEmbed']


class DWNetPatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches: conv (stride ``p``) then LayerNorm over channels.

    The image is zero-padded on the right/bottom to a multiple of ``p``.
    Shapes: ``(B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C)`` (channels last).
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int = 4, patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:]
        p = self.patch_size
        if H % p or W % p:
            x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """2x2 patch merging: concatenate the neighbours ``(0,0), (1,0), (0,1), (1,1)`` (row offset
    first), LayerNorm(4C), Linear(4C -> 2C, no bias). Odd sizes are zero-padded on the right/bottom.

    Shapes: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)``.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_channels)
        self.reduction = nn.Linear(4 * in_channels, 2 * in_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class DWBlock(nn.Module):
    """The convolution that replaces window attention (NCHW):
    ``BN(conv2(ReLU(BN(dwconv(ReLU(BN(conv0(x))))))))``.

    Args:
        channels: ``C``.
        window_size: depth-wise kernel size ``k`` ("same" padding).
        conv_type: ``'static'`` (``nn.Conv2d`` with bias), ``'dynamic'`` (:class:`DynamicDWConv2d`) or
            ``'inhomogeneous'`` (:class:`IDynamicDWConv2d`).
        group_channels: channels sharing one per-position kernel (inhomogeneous only).
        reduction: width reduction of the dynamic kernel generators.
        norm_cfg: norm of every BatchNorm here (and in the kernel generator).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, window_size: int = 7, conv_type: str = 'static', group_channels: int = 1,
                 reduction: int = 4, norm_cfg: Optional[dict] = None):
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN')
        self.conv0 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn0 = build_norm_layer(norm_cfg, channels)[1]
        if conv_type == 'static':
            self.conv = nn.Conv2d(channels, channels, window_size, padding=window_size // 2, groups=channels)
        elif conv_type == 'dynamic':
            self.conv = DynamicDWConv2d(channels, channels, window_size, padding=window_size // 2,
                                        reduction=reduction, norm_cfg=norm_cfg)
        elif conv_type == 'inhomogeneous':
            self.conv = IDynamicDWConv2d(channels, channels, window_size, group_channels=group_channels,
                                         reduction=reduction, norm_cfg=norm_cfg)
        else:
            raise ValueError(f"DWBlock: conv_type must be 'static', 'dynamic' or 'inhomogeneous', got {conv_type!r}")
        self.bn = build_norm_layer(norm_cfg, channels)[1]
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = build_norm_layer(norm_cfg, channels)[1]
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv0(x)))
        x = self.relu(self.bn(self.conv(x)))
        return self.bn2(self.conv2(x))


class _Mlp(nn.Module):
    """Linear(C -> hC) -> GELU -> dropout -> Linear(hC -> C) -> dropout (channels last)."""

    def __init__(self, channels: int, hidden: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SpatialBlock(nn.Module):
    """One DWNet block on a channels-last map ``(B, H, W, C) -> (B, H, W, C)``:
    ``x = x + DropPath(DWBlock(x))``; ``x = x + DropPath(MLP(BN(x)))``.

    ``pad_to_window``: zero-pad the map on the right/bottom to a multiple of ``window_size`` before
    the ``DWBlock`` and crop its output back (the official dense-prediction backbone).
    """

    def __init__(self, channels: int, window_size: int = 7, mlp_ratio: float = 4., drop_rate: float = 0.,
                 drop_path_rate: float = 0., conv_type: str = 'static', group_channels: int = 1,
                 reduction: int = 4, norm_cfg: Optional[dict] = None, pad_to_window: bool = False,
                 with_cp: bool = False):
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN')
        self.window_size = window_size
        self.pad_to_window = pad_to_window
        self.with_cp = with_cp
        self.attn2conv = DWBlock(channels, window_size, conv_type, group_channels, reduction, norm_cfg)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.mlp = _Mlp(channels, int(channels * mlp_ratio), drop_rate)
        self.bn = build_norm_layer(norm_cfg, channels)[1]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        y = x
        if self.pad_to_window:
            ws = self.window_size
            pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
            if pad_b or pad_r:
                y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        y = self.attn2conv(y.permute(0, 3, 1, 2))[:, :, :H, :W].permute(0, 2, 3, 1)
        x = x + self.drop_path(y)
        y = self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class _Stage(nn.Module):
    """``blocks`` followed by an optional ``downsample`` (:class:`PatchMerging`)."""

    def __init__(self, blocks: List[SpatialBlock], downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for blk in self.blocks:
            x = blk(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


@register('model')
class DWNet(BackboneBase):
    """DWNet / dynamic DWNet / inhomogeneous dynamic DWNet backbone.

    Args:
        arch: ``'tiny'`` (``embed_dims`` 96, depths 2-2-6-2), ``'base'`` (128, 2-2-18-2), or a dict with
            ``embed_dims`` and ``depths``.
        embed_dims / depths: override the arch's stage-0 width and blocks per stage.
        in_channels: image channels.
        patch_size: patch embedding stride.
        window_size: depth-wise kernel size (7).
        mlp_ratio: MLP hidden width ratio.
        dynamic: use :class:`DynamicDWConv2d` (per-sample kernels) in every block.
        inhomogeneous: use :class:`IDynamicDWConv2d` (per-position kernels) in every block (implies
            ``dynamic``).
        inhomo_group_channels: channels sharing one per-position kernel, per stage (int or 4 values).
            Default: the official configs' values (``[3, 6, 12, 24]`` tiny, ``[4, 8, 16, 32]`` base,
            which they call heads), i.e. 32 kernel groups per stage; for other widths ``width // 32``.
        reduction: width reduction of the dynamic kernel generators.
        drop_rate: dropout in the MLPs and after the patch embedding.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        mode: ``'classification'`` or ``'dense'`` (see the module docstring).
        out_indices: stages whose (pre-merging) features are returned.
        out_norm_cfg: norm of the outputs; default LayerNorm (classification) or ``norm_cfg`` (dense).
        norm_cfg: every BatchNorm of the blocks, e.g. ``dict(type='SyncBN')`` for distributed training.
        patch_norm: LayerNorm after the patch embedding.
        frozen_stages: ``-1`` freezes nothing; ``k >= 0`` freezes the patch embedding and the first ``k``
            stages (their blocks, their patch merging and their output norms): eval mode, no gradients.
            (The official Swin-derived detection code counts differently: its ``frozen_stages=k`` freezes
            only the first ``k - 1`` stages.)
        norm_eval: keep every BatchNorm in eval mode while training.
        with_cp: gradient checkpointing per block.
        init_cfg: mmengine init config (default: truncated-normal(0.02) Linear layers, unit LayerNorms,
            as the official code; convolutions keep PyTorch's default).

    Returns from ``forward``: a tuple with one ``(B, C_i, H_i, W_i)`` map per ``out_indices`` entry,
    ``C_i = embed_dims * 2**i``, ``H_i = ceil(H / (patch_size * 2**i))``.
    """

    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=96, depths=[2, 2, 6, 2], inhomo_group_channels=[3, 6, 12, 24])),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=128, depths=[2, 2, 18, 2],
                                            inhomo_group_channels=[4, 8, 16, 32])),
    }
    MODES = ('classification', 'dense')

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 embed_dims: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None,
                 in_channels: int = 3,
                 patch_size: int = 4,
                 window_size: int = 7,
                 mlp_ratio: float = 4.,
                 dynamic: bool = False,
                 inhomogeneous: bool = False,
                 inhomo_group_channels: Optional[Union[int, Sequence[int]]] = None,
                 reduction: int = 4,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 mode: str = 'classification',
                 out_indices: Union[int, Sequence[int]] = -1,
                 out_norm_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN'),
                 patch_norm: bool = True,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        if init_cfg is None:
            init_cfg = [dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
                        dict(type='Constant', layer='LayerNorm', val=1., bias=0.)]
        super().__init__(with_cp=with_cp, init_cfg=init_cfg)
        name = type(self).__name__
        if isinstance(arch, str):
            if arch.lower() not in self.arch_zoo:
                raise ValueError(f'{name}: unknown arch {arch!r}; expected one of {sorted(set(self.arch_zoo))} '
                                 'or a dict with embed_dims and depths')
            arch_cfg = dict(self.arch_zoo[arch.lower()])
        elif isinstance(arch, dict):
            arch_cfg = dict(arch)
        else:
            raise ValueError(f'{name}: arch must be a name or a dict, got {arch!r}')
        if embed_dims is not None or depths is not None:
            arch_cfg.pop('inhomo_group_channels', None)
        embed_dims = int(embed_dims if embed_dims is not None else arch_cfg.get('embed_dims', 0))
        depths = list(depths if depths is not None else arch_cfg.get('depths', []))
        if embed_dims < 1 or not depths or any(int(d) < 1 for d in depths):
            raise ValueError(f'{name}: embed_dims must be positive and depths a non-empty list of positive '
                             f'ints, got embed_dims={embed_dims}, depths={depths}')
        if mode not in self.MODES:
            raise ValueError(f'{name}: mode must be one of {self.MODES}, got {mode!r}')
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f'{name}: window_size must be odd, got {window_size}')
        num_stages = len(depths)
        self.embed_dims = embed_dims
        self.depths = depths
        self.num_stages = num_stages
        self.mode = mode
        self.window_size = window_size
        self.num_features = [embed_dims * 2 ** i for i in range(num_stages)]

        if isinstance(out_indices, int):
            out_indices = [out_indices]
        idx = []
        for i in out_indices:
            j = i + num_stages if i < 0 else i
            if not 0 <= j < num_stages:
                raise ValueError(f'{name}: out_indices entry {i} is out of range for {num_stages} stages')
            idx.append(j)
        self.out_indices = tuple(idx)
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'{name}: frozen_stages must be in [-1, {num_stages}], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        conv_type = 'inhomogeneous' if inhomogeneous else ('dynamic' if dynamic else 'static')
        self.conv_type = conv_type
        group_channels = self._group_channels(inhomo_group_channels, arch_cfg) if inhomogeneous else [1] * num_stages

        self.patch_embed = DWNetPatchEmbed(in_channels, embed_dims, patch_size, patch_norm)
        self.drop_after_pos = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            c = self.num_features[i]
            blocks = [SpatialBlock(c, window_size, mlp_ratio, drop_rate, dpr[sum(depths[:i]) + j], conv_type,
                                   group_channels[i], reduction, norm_cfg, pad_to_window=mode == 'dense',
                                   with_cp=with_cp)
                      for j in range(depth)]
            self.layers.append(_Stage(blocks, PatchMerging(c) if i < num_stages - 1 else None))

        if out_norm_cfg is None:
            out_norm_cfg = dict(type='LN') if mode == 'classification' else dict(norm_cfg)
        self._out_norm_is_ln = out_norm_cfg.get('type') in ('LN', 'LayerNorm')
        for i in self.out_indices:
            self.add_module(f'norm{i}', build_norm_layer(out_norm_cfg, self.num_features[i])[1])
        self._freeze_stages()

    def _group_channels(self, value, arch_cfg: dict) -> List[int]:
        name = type(self).__name__
        if value is None:
            value = arch_cfg.get('inhomo_group_channels') or [max(c // 32, 1) for c in self.num_features]
        if isinstance(value, int):
            value = [value] * self.num_stages
        value = [int(v) for v in value]
        if len(value) != self.num_stages:
            raise ValueError(f'{name}: inhomo_group_channels needs {self.num_stages} values, got {value}')
        for c, g in zip(self.num_features, value):
            if g < 1 or c % g:
                raise ValueError(f'{name}: inhomo_group_channels {value} must divide the stage widths '
                                 f'{self.num_features}')
        return value

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.drop_after_pos(self.patch_embed(x))
        outs = []
        for i, stage in enumerate(self.layers):
            feat, x = stage(x)
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                if self._out_norm_is_ln:
                    out = norm(feat).permute(0, 3, 1, 2)
                else:
                    out = norm(feat.permute(0, 3, 1, 2))
                outs.append(out.contiguous())
        return tuple(outs)

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: List[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            mods.append(self.layers[i])
            if i in self.out_indices:
                mods.append(getattr(self, f'norm{i}'))
        return mods


