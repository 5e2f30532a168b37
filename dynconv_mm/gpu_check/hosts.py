"""A small host network for every registered conv type, built through ``mmcv.cnn.build_conv_layer``.

The GPU check (parity, the native-kernel spy) and the fp16-autocast tests run every layer the conv
registry holds (``dynconv_mm.registry.registered_names('conv')``), so a new layer is covered without
a new line here unless its constructor needs more than ``(in_channels, out_channels, kernel_size,
stride, padding, groups)``. A host is two layers of the type, the second one strided (and grouped for
the dense dynamic layers), so that both a plain and a strided/grouped geometry run, and the
KernelWarehouse layers share a warehouse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['LayerHost', 'layer_hosts', 'build_host', 'host_input', 'host_objective', 'disable_training_noise']

#: channels, spatial size and kernel of the default host geometry (tiny: the check and the tests run
#: every layer at batch 1 and 3 in float32 and float64)
CHANNELS, SIZE, KERNEL = 8, 10, 3


@dataclass(frozen=True)
class LayerHost:
    """How to host one registered conv type.

    Attributes:
        name: the registered type (``conv_cfg=dict(type=name)``).
        kind: ``'conv'`` (``(B, C, *S)`` input, ``dims`` spatial dims), ``'depthwise'`` (depth-wise only:
            ``groups = in = out``) or ``'linear'`` (``(B, L, C)`` input).
        dims: spatial dims of the input (1 to 3).
        kernel: kernel size of both layers.
        stride2_groups: groups of the second (strided) layer.
        same_channels: the layer needs ``in_channels == out_channels`` for its identity branch to be
            exercised.
        extra: further ``conv_cfg`` keys.
    """

    name: str
    kind: str = 'conv'
    dims: int = 2
    kernel: int = KERNEL
    stride2_groups: int = 1
    same_channels: bool = False
    extra: Dict[str, object] = field(default_factory=dict)

    def input_shape(self, batch: int) -> Tuple[int, ...]:
        if self.kind == 'linear':
            return (batch, 5, CHANNELS)
        return (batch, CHANNELS) + (SIZE,) * self.dims


#: hosts that differ from the default (a 3x3 2-D conv, groups 1)
_SPECIAL: Dict[str, LayerHost] = {h.name: h for h in (
    LayerHost('KWConv1d', dims=1, stride2_groups=2),
    LayerHost('KWConv2d', stride2_groups=2),
    LayerHost('KWConv3d', dims=3, stride2_groups=2),
    LayerHost('KWLinear', kind='linear'),
    LayerHost('CondConv2d', stride2_groups=2, extra=dict(num_experts=4)),
    LayerHost('DyConv2d', stride2_groups=2),
    LayerHost('ODConv2d', stride2_groups=2),
    LayerHost('PEDConv2d', stride2_groups=2),
    LayerHost('DynamicDWConv2d', kind='depthwise'),
    LayerHost('IDynamicDWConv2d', kind='depthwise'),
    LayerHost('OREPA_1x1', kernel=1),
    LayerHost('OREPA_LargeConv', kernel=5),
    # without the closing ReLU: at these sizes its flips for inputs within float16/TF32 rounding of zero move
    # the gradients by a few per cent, hiding what the comparisons look for (the host has a smooth activation)
    LayerHost('RepVGGBlock', same_channels=True, extra=dict(act_cfg=None)),
    LayerHost('RepVGGBlock_OREPA', same_channels=True, extra=dict(act_cfg=None)),
)}


def layer_hosts(names: Optional[Sequence[str]] = None) -> List[LayerHost]:
    """The host of every registered conv type (or of ``names``), sorted by name."""
    from ..registry import registered_names
    known = registered_names('conv')
    if names is None:
        names = known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f'not registered conv types: {unknown}; registered: {known}')
    return [_SPECIAL.get(n, LayerHost(n)) for n in sorted(names)]


class _Host(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a smooth activation: low-precision comparisons are not thrown by inputs at a ReLU's kink
        return self.second(nn.functional.gelu(self.first(x)))


def build_host(host: LayerHost, seed: int = 0) -> nn.Module:
    """The host network of ``host`` (float32, train mode, seeded), on the CPU."""
    from mmcv.cnn import build_conv_layer

    from ..layers.kernel_warehouse import allocate_warehouses

    torch.manual_seed(seed)
    cfg = dict(type=host.name, **host.extra)
    c = CHANNELS
    if host.kind == 'linear':
        first, second = build_conv_layer(cfg, c, 2 * c), build_conv_layer(dict(cfg), 2 * c, c)
    else:
        pad = host.kernel // 2
        mid = c if host.kind == 'depthwise' or host.same_channels else 2 * c
        groups1 = c if host.kind == 'depthwise' else 1
        groups2 = mid if host.kind == 'depthwise' else host.stride2_groups
        first = build_conv_layer(cfg, c, mid, host.kernel, stride=1, padding=pad, groups=groups1)
        second = build_conv_layer(dict(cfg), mid, c, host.kernel, stride=2, padding=pad, groups=groups2)
    model = _Host(first, second)
    allocate_warehouses(model)
    return model.train()


def host_input(host: LayerHost, batch: int, seed: int = 1, dtype: torch.dtype = torch.float32,
               device: str = 'cpu') -> torch.Tensor:
    """A seeded input for ``host`` at ``batch`` (made on the CPU, so every device gets the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(host.input_shape(batch), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def host_objective(model: nn.Module, out: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A scalar with non-trivial gradients everywhere: a fixed random projection of ``out`` plus the
    auxiliary losses the layers recorded (PEDConv's info-max loss; they must be collected)."""
    from ..engine import collect_aux_losses

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=torch.float32)
    loss = (out.float() * weight).sum() / out.numel() ** 0.5
    return loss + collect_aux_losses(model).float()


def disable_training_noise(model: nn.Module) -> int:
    """Set every ``noise_std`` (PEDConv's attention noise) in ``model`` to 0, so that training forwards
    are deterministic and two copies of a model can be compared; returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, 'noise_std', None), float) and module.noise_std > 0:
            module.noise_std = 0.0
            count += 1
    return count
