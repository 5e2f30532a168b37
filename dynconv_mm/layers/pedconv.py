"""PEDConv: dynamic convolution by a probabilistic, rank-1 perturbation of one shared kernel.

Paper: Hou and Kung, "Parameter-Efficient Dynamic Convolution via Tensor Decomposition", BMVC 2021
(official code: zejiangh/PEDConv, ``Variational_DYConv2d``).

For a sample with pooled context ``p = GAP(x)`` (``C_in``), a small MLP gives the means of three
factors, ``mu_in`` (``C_in/g``), ``mu_out`` (``C_out``) and ``mu_k`` (``k_h*k_w``)::

    h = ReLU(fc_share(p))                     # C_in // reduction units
    z_* = mu_*(h) + noise_std * eps           # training (eps ~ N(0, 1)); z_* = mu_* in eval
    a_* = sigmoid(z_*)
    W_b[o, i, u, v] = W[o, i, u, v] * a_out[o] * a_in[i] * a_k[u * k_w + v]

and the output is the convolution of ``x_b`` with ``W_b``. In training a decoder
``Linear(C_in/g + C_out + k_h*k_w -> C_in // reduction) -> ReLU -> Linear(-> C_in)`` reconstructs ``p``
from the samples ``z`` and the layer records the info-max loss ``MSE(decoder(z), p.detach())``
(weighted by ``aux_loss_weight``, 0.001 in the official trainer). That loss reaches the optimizer
through :mod:`dynconv_mm.engine.aux_loss` (``AuxLossHook`` in a Runner, ``collect_aux_losses`` in plain
PyTorch; forgetting both makes the first backward raise ``UncollectedAuxLossError``). The decoder is
unused at inference but its weights are training state and stay in checkpoints.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from .attention import pooled_context
from .aux_loss import AuxLossMixin
from .base import ExtraMacs, StaticInit, copy_static_bias, linear_macs, pooling_adds, set_param, zero_module
from .batched import batched_conv
from .dynamic_base import DynamicConv2dBase, IntOrPair, folded_conv

__all__ = ['PEDAttention', 'PEDConv2d']


class PEDAttention(nn.Module):
    """The variational attention of PEDConv (official ``Variational_Attn4d``; same submodule names).

    Args:
        in_channels, out_channels, kernel_numel (``k_h*k_w``), groups: the convolution's geometry.
        reduction: hidden width ``C_in // reduction`` (integer division, as the official code), at
            least ``min_hidden``. The official code has no minimum (a zero-width layer for ``C_in < 16``);
            the minimum only changes layers the official code could not train.
        noise_std: standard deviation of the training-time noise on the factor logits.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_numel: int, groups: int = 1,
                 reduction: int = 16, noise_std: float = 0.1, min_hidden: int = 1) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, min_hidden)
        self.in_channels = in_channels
        self.noise_std = float(noise_std)
        self.fc_share = nn.Linear(in_channels, hidden)
        self.fc_inp = nn.Linear(hidden, in_channels // groups)
        self.fc_oup = nn.Linear(hidden, out_channels)
        self.fc_k = nn.Linear(hidden, kernel_numel)
        self.decoder = nn.Sequential(
            nn.Linear(in_channels // groups + out_channels + kernel_numel, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, in_channels),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # official ResNet init: every Linear N(0, 0.01), bias 0 (all factors start at sigmoid(0) = 0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def _sample(self, mu: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_std > 0:
            return mu + self.noise_std * torch.randn_like(mu)
        return mu

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pooled (B, C_in)`` -> ``a_in (B, C_in/g)``, ``a_out (B, C_out)``, ``a_k (B, k_h*k_w)`` and the
        concatenated samples ``z (B, C_in/g + C_out + k_h*k_w)`` the decoder reads."""
        h = F.relu(self.fc_share(pooled))
        z_in = self._sample(self.fc_inp(h))
        z_out = self._sample(self.fc_oup(h))
        z_k = self._sample(self.fc_k(h))
        z = torch.cat((z_in, z_out, z_k), dim=1)
        return torch.sigmoid(z_in), torch.sigmoid(z_out), torch.sigmoid(z_k), z

    def infomax_loss(self, z: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``MSE(decoder(z), pooled)`` with the target detached (official ``IMLoss``)."""
        return F.mse_loss(self.decoder(z), pooled.detach())


@register('conv')
class PEDConv2d(AuxLossMixin, DynamicConv2dBase):
    """PEDConv 2-D convolution, a drop-in for ``nn.Conv2d`` (``conv_cfg=dict(type='PEDConv2d')``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as ``nn.Conv2d``.
        bias: add a learned static bias ``(C_out,)`` (the official layer takes the flag and ignores it).
        reduction: attention hidden width ``C_in // reduction`` (official: 16).
        noise_std: training noise on the attention logits (official: 0.1).
        aux_loss_weight: weight of the info-max loss (official: 0.001); 0 disables the loss (the
            decoder is then unused: under DDP set ``find_unused_parameters=True`` or freeze it).
        impl: :func:`~dynconv_mm.layers.batched.batched_conv` implementation.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``; parameters ``weight (C_out, C_in/g,
    k_h, k_w)``, ``attn.*`` (see :class:`PEDAttention`), optional ``bias``.
    """

    aux_loss_name = 'infomax'

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: IntOrPair,
                 stride: IntOrPair = 1,
                 padding: IntOrPair = 0,
                 dilation: IntOrPair = 1,
                 groups: int = 1,
                 bias: bool = False,
                 reduction: int = 16,
                 noise_std: float = 0.1,
                 aux_loss_weight: float = 0.001,
                 impl: str = 'auto') -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, impl)
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f'PEDConv2d: reduction must be a positive int, got {reduction!r}')
        if noise_std < 0:
            raise ValueError(f'PEDConv2d: noise_std must be >= 0, got {noise_std}')
        self.init_aux_loss(aux_loss_weight)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.attn = PEDAttention(in_channels, out_channels, self.num_kernel_elements, groups, reduction, noise_std)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attn.reset_parameters()

    def init_weights(self) -> None:
        """Keep this layer's own initialisation when built inside mmcv's ``ConvModule``."""
        self.reset_parameters()

    def dynamic_weight(self, a_in: torch.Tensor, a_out: torch.Tensor, a_k: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(B, C_out, C_in/g, k_h, k_w)`` from the three factors."""
        B = a_in.shape[0]
        attn = (a_out[:, :, None] * a_in[:, None, :]).reshape(B, self.out_channels, -1, 1, 1)
        attn = attn * a_k.reshape(B, 1, 1, *self.kernel_size)
        return self.weight.unsqueeze(0) * attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = pooled_context(x)
        a_in, a_out, a_k, z = self.attn(pooled)
        out = batched_conv(x, self.dynamic_weight(a_in, a_out, a_k), None, **self.conv_kwargs())
        if self.bias is not None:  # added here in the output's dtype (bf16 under autocast, like nn.Conv2d)
            out = out + self.bias.to(out.dtype).reshape(1, -1, 1, 1)
        if self.wants_aux_loss:
            self.record_aux_loss(self.attn.infomax_loss(z, pooled), out)
        return out

    # -- protocol ----------------------------------------------------------------------------
    def extra_macs(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> ExtraMacs:
        """Pooling, the four factor layers, and the kernel: the outer product of the channel factors
        (``C_out * C_in / g``), its product with the spatial factor and with the base kernel (two
        multiplies per kernel entry). The decoder runs in training only and is not counted."""
        a = self.attn
        att = sum(linear_macs(m) for m in (a.fc_share, a.fc_inp, a.fc_oup, a.fc_k))
        kernel = self.weight.numel()
        return ExtraMacs(pooling=pooling_adds(in_shape), attention=att,
                         assembly=self.out_channels * (self.in_channels // self.groups) + 2 * kernel)

    def init_from_static(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         **options: Any) -> StaticInit:
        """The three factor heads get weight and bias 0 (each factor ``sigmoid(0) = 1/2`` in eval), the
        base kernel is ``8W``: exact in eval; training adds the method's noise to the factor logits."""
        rec = StaticInit(True, 'exact in eval: the three factors are sigmoid(0) = 1/2, base kernel 8W (training '
                               "adds the method's noise to the factor logits)")
        for h in ('attn.fc_inp', 'attn.fc_oup', 'attn.fc_k'):
            zero_module(self, h, rec, 'weight and bias 0: the factor is 1/2 (in eval)')
        set_param(self, 'weight', weight * 8.0)
        rec.from_static.append('weight')
        copy_static_bias(self, bias, rec)
        return rec

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official layer's computation (eval semantics of the aux loss: none is recorded): the rank-1
        attention tensor times the base kernel, one batch-folded grouped convolution."""
        B = x.shape[0]
        a_in, a_out, a_k, _ = self.attn(x.reshape(B, x.shape[1], -1).mean(-1))
        attn = a_out.reshape(B, -1, 1, 1, 1) * a_in.reshape(B, 1, -1, 1, 1) * a_k.reshape(B, 1, 1, *self.kernel_size)
        weight = (self.weight.unsqueeze(0) * attn).reshape(-1, self.in_channels // self.groups, *self.kernel_size)
        out = folded_conv(x, weight, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).reshape(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f', noise_std={self.attn.noise_std}, aux_loss_weight={self.aux_loss_weight}'
