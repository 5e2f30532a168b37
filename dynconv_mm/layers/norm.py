"""Norm layers of dynconv_mm: one builder, and batch norms that accept a training batch of one.

* :class:`SafeBatchNorm1d` / :class:`SafeBatchNorm2d`: drop-in ``nn.BatchNorm1d/2d`` subclasses
  (identical state-dict keys) that do not crash on a training batch holding a single value per
  channel (the pooled context of a batch of one). Such a batch has no variance to normalise with,
  so it is normalised with the running statistics instead, which are then left unchanged.
  Batches with more than one value per channel behave exactly as the torch classes (batch
  statistics, running-statistic updates), and eval mode is untouched.
* :func:`build_norm`: every norm layer of the package's layers (attention branches, kernel
  generators, re-parameterization branches) from an mmcv-style config.
"""
from __future__ import annotations

from typing import Any, Dict, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['SafeBatchNorm1d', 'SafeBatchNorm2d', 'build_norm', 'NormSpec', 'NORM_TYPES']

NormSpec = Union[str, Dict[str, Any], type, None]


class _SafeBatchNormMixin:
    """Training-mode batch-of-one handling shared by the 1-D and 2-D classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.training and self.running_mean is not None and x.numel() == x.shape[1]:
            # a single value per channel: batch statistics are undefined, use the running ones
            self._check_input_dim(x)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        return super().forward(x)  # type: ignore[misc]


class SafeBatchNorm1d(_SafeBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that accepts a training batch of one.

    Input ``(B, C)`` or ``(B, C, L)``. When training with a single value per channel (``B == 1``
    and ``L == 1``), normalises with the running statistics (as in eval mode) and does not update
    them; everything else is ``nn.BatchNorm1d``. Without running statistics
    (``track_running_stats=False``) it behaves exactly like the torch class.
    """


class SafeBatchNorm2d(_SafeBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that accepts a training batch of one ``(1, C, 1, 1)`` map.

    Same rule as :class:`SafeBatchNorm1d`: a single value per channel in training is normalised
    with the running statistics, which stay unchanged.
    """


_BN_TYPES = ('BN', 'BN1d', 'BN2d', 'BatchNorm1d', 'BatchNorm2d', 'SafeBatchNorm1d', 'SafeBatchNorm2d', 'bn')
_LN_TYPES = ('LN', 'LayerNorm', 'ln')
_SYNC_TYPES = ('SyncBN', 'SyncBatchNorm')
#: the norm types every layer takes (2-D layers also take any other mmcv norm type, e.g. ``'GN'``)
NORM_TYPES = ('BN', 'SyncBN', 'LN')


def _as_cfg(norm: NormSpec, owner: str) -> Dict[str, Any]:
    if norm is None:
        return dict(type='BN')
    if isinstance(norm, type):  # the classes the official code passes
        if issubclass(norm, nn.LayerNorm):
            return dict(type='LN')
        if issubclass(norm, nn.SyncBatchNorm):
            return dict(type='SyncBN')
        if issubclass(norm, nn.modules.batchnorm._BatchNorm):
            return dict(type='BN')
        raise ValueError(f'{owner}: unsupported norm class {norm!r}; use a BatchNorm or LayerNorm class, or one of '
                         f'{NORM_TYPES}')
    if isinstance(norm, str):
        return dict(type=norm)
    if isinstance(norm, dict):
        if 'type' not in norm:
            raise ValueError(f'{owner}: norm cfg {norm!r} has no "type" (one of {NORM_TYPES})')
        return dict(norm)
    raise ValueError(f'{owner}: norm must be one of {NORM_TYPES}, a norm cfg dict or a norm class, got {norm!r}')


def build_norm(norm: NormSpec, num_features: int, dims: int = 2, owner: str = 'norm') -> nn.Module:
    """The norm layer for ``num_features`` channels of ``dims``-D features (``dims=1``: ``(B, C)``
    vectors of attention branches; ``2``: ``(B, C, H, W)`` maps).

    Args:
        norm: ``'BN'`` (:class:`SafeBatchNorm1d` / :class:`SafeBatchNorm2d`), ``'SyncBN'``, ``'LN'``
            (``nn.LayerNorm`` over the channels; 1-D features only), a norm class (``nn.BatchNorm1d``,
            ``nn.LayerNorm``: what the official code passes), ``None`` (``'BN'``), or an mmcv-style dict
            ``dict(type=..., eps=..., momentum=..., requires_grad=...)``. For 2-D features every other
            type of mmcv's norm registry (``'GN'``, ``'IN'``, ...) is built by mmcv.
        num_features: channels.
        dims: 1 or 2.
        owner: the layer named in error messages.

    Raises ``ValueError`` for an unknown type (listing the valid ones) or bad options.
    """
    cfg = _as_cfg(norm, owner)
    kind = cfg.pop('type')
    what = 'attention norm' if dims == 1 else 'norm'
    requires_grad = cfg.pop('requires_grad', True)
    try:
        if kind in _BN_TYPES:
            module: nn.Module = (SafeBatchNorm1d if dims == 1 else SafeBatchNorm2d)(num_features, **cfg)
        elif kind in _SYNC_TYPES:
            module = nn.SyncBatchNorm(num_features, **cfg)
        elif kind in _LN_TYPES and dims == 1:
            module = nn.LayerNorm(num_features, **cfg)
        elif dims == 1:
            raise ValueError(f'{owner}: unknown attention norm type {kind!r}; expected one of {NORM_TYPES}')
        else:
            module = _mmcv_norm(kind, cfg, num_features, owner)
    except TypeError as err:
        raise ValueError(f'{owner}: bad {what} options {cfg!r}: {err}') from None
    for p in module.parameters():
        p.requires_grad_(bool(requires_grad))
    return module


def _mmcv_norm(kind: str, cfg: Dict[str, Any], num_features: int, owner: str) -> nn.Module:
    from mmcv.cnn import build_norm_layer
    from mmengine.registry import MODELS
    try:
        return build_norm_layer(dict(type=kind, **cfg), num_features)[1]
    except KeyError:
        known = sorted(n for n, cls in MODELS.module_dict.items() if isinstance(cls, type)
                       and issubclass(cls, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)))
        raise ValueError(f'{owner}: unknown norm type {kind!r}; expected one of {NORM_TYPES} or a norm type of '
                         f"mmcv's registry ({', '.join(known)})") from None
