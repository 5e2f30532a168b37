"""Parameters and FLOPs of a model built from an mmpretrain / mmdet / mmseg config.

The counts use mmengine's analyzers (:func:`mmengine.analysis.get_model_complexity_info`), i.e. a
``torch.jit`` trace of one forward pass:

* **parameters**: every parameter of the built model (shared ones once), trainable or not. For the
  re-parameterized models this is the *training* form; call the model's ``switch_to_deploy()``
  (or build the ``*_deploy_*`` config) for the inference form.
* **FLOPs**: the multiply-accumulates of the operators that run in the traced forward (mmengine
  counts one fused multiply-add as one FLOP). For dynamic convolutions only what runs is counted:
  the per-sample convolution and the attention branch are, but operators mmengine has no handle
  for (e.g. the kernel assembly of KernelWarehouse, a matrix product over warehouse cells) are
  skipped with a warning, so the number is a lower bound of the real cost. For classifiers the
  forward is ``model(inputs, mode='tensor')``: backbone, neck and head, without the data
  preprocessor.

Example::

    from dynconv_mm.analysis import get_complexity
    info = get_complexity('configs/kernelwarehouse/kw1x-resnet18_8xb128-accum4_in1k.py')
    print(info.params, info.flops)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config
from torch import nn

__all__ = ['ComplexityInfo', 'count_parameters', 'get_complexity', 'format_count']


@dataclass
class ComplexityInfo:
    """Result of :func:`get_complexity`."""

    #: number of parameters of the whole model (shared parameters counted once)
    params: int
    #: FLOPs (multiply-accumulates) mmengine's analyzer counted for one image of ``input_shape``
    flops: int
    #: input shape ``(C, H, W)`` of the analysed forward
    input_shape: Tuple[int, ...]
    #: mmengine's per-module table (empty unless requested)
    table: str = ''

    @property
    def params_str(self) -> str:
        return format_count(self.params)

    @property
    def flops_str(self) -> str:
        return format_count(self.flops)


def format_count(n: Union[int, float]) -> str:
    """``11933192 -> '11.93M'``, ``1819869184 -> '1.82G'`` (two decimals, SI prefixes)."""
    n = float(n)
    for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.2f}{unit}'
    return f'{n:.0f}'


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters once; frozen ones included)."""
    return sum(p.numel() for p in model.parameters())


class _TensorForward(nn.Module):
    """Call an OpenMMLab model in ``mode='tensor'`` (plain ``forward(x)`` for other modules)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        from mmengine.model import BaseModel
        if isinstance(self.model, BaseModel):
            return self.model(x, mode='tensor')
        return self.model(x)


def get_complexity(model: Union[str, Config, nn.Module], input_shape: Sequence[int] = (3, 224, 224),
                   cfg_options: Optional[Dict[str, Any]] = None, show_table: bool = False,
                   deploy: bool = False) -> ComplexityInfo:
    """Parameters and FLOPs of a model (or of the model of a config) for one ``input_shape`` image.

    Args:
        model: a config path, a :class:`Config` or a built module.
        input_shape: ``(C, H, W)``; 224x224 RGB by default (the ImageNet evaluation size).
        cfg_options: config overrides when ``model`` is a config.
        show_table: also return mmengine's per-module table (``info.table``).
        deploy: fold the re-parameterized layers first (:func:`dynconv_mm.reparameterize_model`, in place
            on a module that is passed in), so that the counts are the inference form's.

    The model is analysed in eval mode under ``torch.no_grad()``, with a batch of one.
    """
    from mmengine.analysis import get_model_complexity_info

    if not isinstance(model, nn.Module):
        from dynconv_mm.apis import build_model
        model = build_model(model, cfg_options)
    if deploy:
        from dynconv_mm.layers.reparam.fuse import reparameterize_model
        model.eval()
        reparameterize_model(model)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f'get_complexity: input_shape must be (C, H, W) with positive sizes, got {input_shape}')
    was_training = model.training
    model.eval()
    try:
        params = count_parameters(model)
        wrapper = _TensorForward(model)
        device = next(model.parameters()).device
        x = torch.randn(1, *input_shape, device=device)
        with torch.no_grad():
            try:
                result = get_model_complexity_info(wrapper, inputs=(x, ), show_table=show_table, show_arch=False)
            except Exception as e:  # a torch.jit.trace failure inside mmengine's analyzer
                raise RuntimeError(
                    f'get_complexity: mmengine\'s FLOP analyzer could not trace {type(model).__name__} '
                    f'({type(e).__name__}: {e}). For re-parameterized models count the deploy form '
                    '(deploy=True, get_flops.py --deploy).') from e
    finally:
        model.train(was_training)
    return ComplexityInfo(params=params, flops=int(result['flops']), input_shape=input_shape,
                          table=result.get('out_table', '') if show_table else '')
