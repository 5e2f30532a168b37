"""The attention of a KernelWarehouse layer over the cells of its warehouse (Li & Yao, ICML 2024,
Sec. 3.3), and its "contrasting-driven" attention function."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..attention import build_attention_norm, pooled_context
from ..temperature import TemperatureMixin

__all__ = ['KWAttention', 'contrast_normalize', 'kw_attention']


def contrast_normalize(logits: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """KernelWarehouse's L1 normalisation: ``z / (sum_j |z_j| + eps)`` over the last dim."""
    return logits / (logits.abs().sum(dim=-1, keepdim=True) + eps)


def kw_attention(logits: torch.Tensor,
                 temperature: torch.Tensor,
                 temp_bias: Optional[torch.Tensor] = None,
                 eps: float = 1e-3) -> torch.Tensor:
    """KernelWarehouse attention from raw logits: L1 normalisation of each mixture's logits, then the
    linear blend with the temperature prior, ``a = (1 - tau) * z + tau * t``.

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


class KWAttention(TemperatureMixin, nn.Module):
    """Attention of a KW layer over the cells of its warehouse (paper Sec. 3.3).

    ``x (B, C_in, *S)`` -> mean over ``S`` -> ``fc1`` -> norm -> ReLU -> ``fc2`` (-> basis mapping)
    -> per mixture ``P = n + 1`` logits -> :func:`kw_attention`
    -> ``(B, M, n)``.

    Args:
        in_planes: ``C_in`` of the layer.
        reduction: hidden width ``max(int(in_planes * reduction), 16)``.
        num_static_cell: ``n``, cells in the warehouse.
        num_local_mixture: ``M``, mixtures of the layer.
        norm_layer: ``'BN'`` (then ``fc1`` has no bias) or ``'LN'`` (``fc1`` with bias), or a cfg dict.
        cell_num_ratio: the warehouse's ``cell_num_ratio`` (sizes the basis mode's local part).
        nonlocal_basis_ratio: ``< 1`` enables the basis mode: the logits of the cells owned by other
            layers are produced from ``max(int(n_nonlocal * ratio), 16)`` basis logits through ``fc3``.
        start_cell_idx: index of the layer's first own cell in the warehouse.

    The temperature prior ``temp_bias (M * P,)`` is a non-persistent buffer derived from
    ``start_cell_idx`` and ``cell_num_ratio`` (never saved); the temperature is the
    :class:`~dynconv_mm.layers.temperature.TemperatureMixin` buffer ``temperature``, saved with the
    weights (0, the end of the schedule, at construction).
    """

    def __init__(self, in_planes: int, reduction: float, num_static_cell: int, num_local_mixture: int,
                 norm_layer: Any = 'BN', cell_num_ratio: float = 1.0, nonlocal_basis_ratio: float = 1.0,
                 start_cell_idx: int = 0) -> None:
        super().__init__()
        hidden = max(int(in_planes * reduction), 16)
        self.kw_planes_per_mixture = num_static_cell + 1
        self.num_local_mixture = num_local_mixture
        self.kw_planes = self.kw_planes_per_mixture * num_local_mixture
        self.num_local_cell = int(cell_num_ratio * num_local_mixture)
        self.num_nonlocal_cell = num_static_cell - self.num_local_cell
        self.start_cell_idx = int(start_cell_idx)
        self.basis_mode = nonlocal_basis_ratio < 1.0

        norm, fc_bias = build_attention_norm(norm_layer, hidden, owner='KWAttention')
        self.fc1 = nn.Linear(in_planes, hidden, bias=fc_bias)
        self.norm1 = norm
        self.act1 = nn.ReLU(inplace=True)
        if not self.basis_mode:
            self.fc2 = nn.Linear(hidden, self.kw_planes, bias=True)
        else:
            if self.num_nonlocal_cell < 0:
                raise ValueError(f'KWAttention: basis mode needs at least int(cell_num_ratio * M) = '
                                 f'{self.num_local_cell} cells, the warehouse has {num_static_cell}')
            self.num_basis = max(int(self.num_nonlocal_cell * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(hidden, (self.num_local_cell + self.num_basis + 1) * num_local_mixture, bias=False)
            self.fc3 = nn.Linear(self.num_basis, self.num_nonlocal_cell, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.kw_planes))
        self.register_buffer('temp_bias', torch.zeros(self.kw_planes), persistent=False)
        self.init_temperature()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_temp_bias(self, start_cell_idx: int, cell_num_ratio: float) -> int:
        """Build the temperature prior from the layer's first own cell; returns the next free cell."""
        P = self.kw_planes_per_mixture
        bias = torch.zeros(self.kw_planes)
        idx = int(start_cell_idx)
        if cell_num_ratio >= 1.0:
            step = int(cell_num_ratio)
            for m in range(self.num_local_mixture):
                bias[m * P + idx] = 1
                idx += step
        else:
            r = int(1.0 / cell_num_ratio)
            for m in range(self.num_local_mixture):
                if m % r == (m // r) % r:
                    bias[m * P + idx] = 1
                    idx += 1
                else:
                    bias[m * P + P - 1] = 1
        self.temp_bias.copy_(bias)
        return idx

    def _map_basis(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, M * (n_local + n_basis + 1))`` -> ``(B, M, P)`` logits in warehouse cell order."""
        B = logits.shape[0]
        x = logits.reshape(B, self.num_local_mixture, self.num_local_cell + self.num_basis + 1)
        local = x[..., :self.num_local_cell]
        nonlocal_ = self.fc3(x[..., self.num_local_cell:-1])
        s = self.start_cell_idx
        x = torch.cat([nonlocal_[..., :s], local, nonlocal_[..., s:], x[..., -1:]], dim=-1)
        return x + self.basis_bias.reshape(self.num_local_mixture, self.kw_planes_per_mixture)

    end_temperature = 0.0
    temperature_preset = 'kernelwarehouse'
    temperature_owner = 'a KernelWarehouse layer (KWConv*d, KWLinear)'
    temperature_divides = False  # it blends the logits with the prior (the schedule goes from 1 to 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) -> (B, M, n)``."""
        self.check_temperature_schedule()
        h = self.act1(self.norm1(self.fc1(pooled_context(x))))
        logits = self.fc2(h)
        if self.basis_mode:
            logits = self._map_basis(logits)
        else:
            logits = logits.reshape(logits.shape[0], self.num_local_mixture, self.kw_planes_per_mixture)
        prior = self.temp_bias.reshape(self.num_local_mixture, self.kw_planes_per_mixture)
        return kw_attention(logits, self.temperature, prior)

    def extra_repr(self) -> str:
        return (f'mixtures={self.num_local_mixture}, cells={self.kw_planes_per_mixture - 1}, '
                f'start_cell_idx={self.start_cell_idx}, basis={self.basis_mode}')
