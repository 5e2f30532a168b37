"""Pieces shared by the attention branches of dynamic convolutions.

* :func:`pooled_context`: global average pooling of a ``(B, C, *S)`` feature map to ``(B, C)``.
* :class:`SafeBatchNorm1d` / :class:`SafeBatchNorm2d`: drop-in ``nn.BatchNorm1d/2d`` subclasses
  (identical state-dict keys) that do not crash on a training batch holding a single value per
  channel (the pooled context of a batch of one). Such a batch has no variance to normalise with,
  so it is normalised with the running statistics instead, which are then left unchanged.
  Batches with more than one value per channel behave exactly as the torch classes (batch
  statistics, running-statistic updates), and eval mode is untouched.
* :func:`build_attention_norm`: the norm layer of an attention branch from ``'BN'``, ``'LN'`` or
  an mmcv-style norm cfg dict, and whether the Linear layer feeding it carries a bias.
* :func:`contrast_normalize` and :func:`kw_attention`: KernelWarehouse's "contrasting-driven"
  attention function (Li & Yao, *KernelWarehouse: Rethinking the Design of Dynamic Convolution*,
  ICML 2024, Sec. 3.3): L1 normalisation of each mixture's logits followed by the linear blend
  with the temperature prior, ``a = (1 - tau) * z + tau * t``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'SafeBatchNorm1d', 'SafeBatchNorm2d', 'pooled_context', 'build_attention_norm', 'contrast_normalize',
    'kw_attention'
]

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


def pooled_context(x: torch.Tensor) -> torch.Tensor:
    """Global average pool ``(B, C, *S) -> (B, C)`` (any number of spatial dims, including none)."""
    if x.dim() == 2:
        return x
    return x.reshape(x.shape[0], x.shape[1], -1).mean(dim=-1)


_BN_TYPES = ('BN', 'BN1d', 'BatchNorm1d', 'SafeBatchNorm1d', 'bn')
_LN_TYPES = ('LN', 'LayerNorm', 'ln')
_SYNC_TYPES = ('SyncBN', 'SyncBatchNorm')


def build_attention_norm(norm: NormSpec, num_features: int, owner: str = 'attention') -> Tuple[nn.Module, bool]:
    """Build the norm layer of an attention branch acting on ``(B, num_features)`` vectors.

    Args:
        norm: ``'BN'`` (BatchNorm1d, as :class:`SafeBatchNorm1d`), ``'LN'`` (LayerNorm), ``'SyncBN'``,
            ``nn.BatchNorm1d`` / ``nn.LayerNorm`` (the classes the official code passes), or an
            mmcv-style dict ``dict(type='BN'|'LN'|'SyncBN', eps=..., momentum=..., requires_grad=...)``.
        num_features: channels of the normalised vector.
        owner: name used in error messages.

    Returns:
        ``(module, fc_bias)``: ``fc_bias`` is ``False`` for batch norms (their shift makes a bias of
        the preceding Linear redundant) and ``True`` otherwise, matching the official KernelWarehouse
        and ODConv attention branches.
    """
    if norm is None:
        norm = 'BN'
    if isinstance(norm, type):
        if issubclass(norm, nn.LayerNorm):
            norm = 'LN'
        elif issubclass(norm, nn.SyncBatchNorm):
            norm = 'SyncBN'
        elif issubclass(norm, nn.BatchNorm1d):
            norm = 'BN'
        else:
            raise ValueError(f'{owner}: unsupported attention norm class {norm!r}; use BatchNorm1d or LayerNorm')
    if isinstance(norm, str):
        cfg: Dict[str, Any] = dict(type=norm)
    elif isinstance(norm, dict):
        if 'type' not in norm:
            raise ValueError(f'{owner}: attention norm cfg {norm!r} has no "type"')
        cfg = dict(norm)
    else:
        raise ValueError(f'{owner}: attention norm must be "BN", "LN", a norm cfg dict or a norm class, '
                         f'got {norm!r}')
    kind = cfg.pop('type')
    requires_grad = cfg.pop('requires_grad', True)
    try:
        if kind in _BN_TYPES:
            module: nn.Module = SafeBatchNorm1d(num_features, **cfg)
            fc_bias = False
        elif kind in _SYNC_TYPES:
            module = nn.SyncBatchNorm(num_features, **cfg)
            fc_bias = False
        elif kind in _LN_TYPES:
            module = nn.LayerNorm(num_features, **cfg)
            fc_bias = True
        else:
            raise ValueError(f'{owner}: unknown attention norm type {kind!r}; expected one of '
                             f'{_BN_TYPES[:2] + _LN_TYPES[:1] + _SYNC_TYPES[:1]}')
    except TypeError as err:
        raise ValueError(f'{owner}: bad attention norm options {cfg!r}: {err}') from None
    for p in module.parameters():
        p.requires_grad_(bool(requires_grad))
    return module, fc_bias


def contrast_normalize(logits: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """KernelWarehouse's L1 normalisation: ``z / (sum_j |z_j| + eps)`` over the last dim."""
    return logits / (logits.abs().sum(dim=-1, keepdim=True) + eps)


def kw_attention(logits: torch.Tensor,
                 temperature: torch.Tensor,
                 temp_bias: Optional[torch.Tensor] = None,
                 eps: float = 1e-3) -> torch.Tensor:
    """KernelWarehouse attention from raw logits.

    Args:
        logits: ``(B, M, P)``: for each of the ``M`` kernel mixtures, one logit per warehouse cell
            plus a last one for the virtual all-zero cell (``P = n + 1``).
        temperature: 0-d tensor ``tau`` (a tensor so compiled graphs do not specialise on it).
        temp_bias: ``(M, P)`` 0/1 prior ``t`` (``None``: no prior, only valid for ``tau = 0``).
        eps: added to the L1 norm.

    Returns:
        ``(B, M, n)``: ``(1 - tau) * z + tau * t`` with ``z`` the L1-normalised logits, with the zero
        cell's column dropped (it multiplies a zero kernel).
    """
    z = contrast_normalize(logits, eps)
    if temp_bias is not None:
        temperature = temperature.to(z.dtype)
        z = (1.0 - temperature) * z + temperature * temp_bias.to(z.dtype)
    return z[..., :-1]
