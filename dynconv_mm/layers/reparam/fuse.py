"""The one fusion toolkit for re-parameterized layers (being extended)."""
from __future__ import annotations

from torch import nn

__all__ = ['reparameterize_model']


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Call ``switch_to_deploy()`` on every module that has one (parents before children); idempotent."""
    for m in list(model.modules()):
        if m is not model and hasattr(m, 'switch_to_deploy') and not getattr(m, 'deploy', False):
            m.switch_to_deploy()
    return model
