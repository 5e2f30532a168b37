"""What every dynconv_mm backbone shares: frozen stages, norm layers kept in eval mode, activation
checkpointing and constructor arguments checked by name.

* ``frozen_stages``: a backbone lists the modules of its frozen stages in :meth:`BackboneBase._frozen_modules`;
  :meth:`BackboneBase.train` puts them in eval mode and stops their parameters from requiring
  gradients, whatever mode the model is switched to (as mmpretrain's and mmdet's backbones do).
* ``norm_eval``: every BatchNorm (attention branches included) stays in eval mode while training.
* ``with_cp``: :meth:`BackboneBase.run_stage` runs a stage block by block, each under non-reentrant
  activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``) while training with
  gradients: the activations inside a block are recomputed in the backward pass instead of kept. The
  gradients are those of ``with_cp=False``; a BatchNorm in training mode sees each batch twice, as in
  mmpretrain's and mmdet's ``with_cp``, and updates its running statistics twice.
* A misspelled or unknown constructor argument raises a ``TypeError`` that lists the arguments the
  backbone takes (and the closest match), instead of Python's bare "unexpected keyword argument".
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, List, Optional

import torch
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.recompute import recomputation

__all__ = ['BackboneBase']


def _check_arguments(init: Callable) -> Callable:
    """Wrap a backbone's ``__init__`` so that unknown keyword arguments are named with the valid ones."""
    signature = inspect.signature(init)
    params = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        return init
    valid = [p.name for p in params[1:]]

    @functools.wraps(init)
    def checked(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, valid, n=1)
                hints.append(f'{k!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
            raise TypeError(f'{type(self).__name__}: unknown argument(s) {", ".join(hints)}; '
                            f'{type(self).__name__} takes: {", ".join(valid)}')
        init(self, *args, **kwargs)

    return checked


class _FirstRunOnly:
    """Calls ``block``; every later call (checkpointing's recomputation) runs under :func:`recomputation`,
    so that layers record their auxiliary losses once."""

    def __init__(self, block: nn.Module) -> None:
        self.block, self.calls = block, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.block(x)
        with recomputation():
            return self.block(x)


class BackboneBase(BaseModule):
    """Base of the backbones: ``frozen_stages`` / ``norm_eval`` in :meth:`train`, ``with_cp`` in
    :meth:`run_stage`, and the check of constructor arguments (every subclass's ``__init__``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if '__init__' in vars(cls):
            cls.__init__ = _check_arguments(vars(cls)['__init__'])

    def __init__(self, frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = bool(with_cp)

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``stage(x)``; with ``with_cp`` while training with gradients, the blocks of ``stage`` (an
        ``nn.Sequential``) one by one, each under non-reentrant checkpointing."""
        if not (self.with_cp and self.training and torch.is_grad_enabled()):
            return stage(x)
        blocks = list(stage) if isinstance(stage, nn.Sequential) else [stage]
        for block in blocks:
            x = cp.checkpoint(_FirstRunOnly(block), x, use_reentrant=False)
        return x

    def _frozen_modules(self) -> List[nn.Module]:
        """The modules of the frozen stages (none by default)."""
        return []

    def _freeze_stages(self) -> List[nn.Module]:
        frozen = self._frozen_modules()
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False
        return frozen

    def train(self, mode: bool = True) -> 'BackboneBase':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
