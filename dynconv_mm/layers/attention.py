"""Pieces shared by the attention branches of dynamic convolutions.

* :func:`pooled_context`: global average pooling of a ``(B, C, *S)`` feature map to ``(B, C)``.
* :func:`build_attention_norm`: the norm layer of an attention branch (``(B, C)`` vectors) and
  whether the Linear layer feeding it carries a bias.
* :class:`SafeBatchNorm1d` / :class:`SafeBatchNorm2d` (from :mod:`dynconv_mm.layers.norm`): batch
  norms that accept a training batch of one, the norms of every attention branch.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .norm import NormSpec, SafeBatchNorm1d, SafeBatchNorm2d, build_norm

__all__ = ['SafeBatchNorm1d', 'SafeBatchNorm2d', 'pooled_context', 'build_attention_norm']


def pooled_context(x: torch.Tensor) -> torch.Tensor:
    """Global average pool ``(B, C, *S) -> (B, C)`` (any number of spatial dims, including none)."""
    if x.dim() == 2:
        return x
    return x.reshape(x.shape[0], x.shape[1], -1).mean(dim=-1)


def build_attention_norm(norm: NormSpec, num_features: int, owner: str = 'attention') -> Tuple[nn.Module, bool]:
    """The norm of an attention branch acting on ``(B, num_features)`` vectors
    (:func:`~dynconv_mm.layers.norm.build_norm` with ``dims=1``: ``'BN'``, ``'LN'``, ``'SyncBN'``, a cfg
    dict or the class the official code passes), and ``fc_bias``: ``False`` for batch norms (their
    shift makes a bias of the preceding Linear redundant), ``True`` otherwise, matching the official
    KernelWarehouse and ODConv attention branches."""
    module = build_norm(norm, num_features, dims=1, owner=owner)
    return module, not isinstance(module, nn.modules.batchnorm._BatchNorm)
