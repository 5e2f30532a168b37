"""Whether a forward is the recomputation that activation checkpointing runs in the backward pass.

Non-reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``) runs a block's forward
twice: once in the forward pass, and again inside the backward pass to rebuild the activations it did not
keep. A layer with a side effect in its training forward (an auxiliary loss it records for the objective)
must act only on the first run: a loss recorded by the recomputation would be collected in the next step,
from the previous step's weights.

A recomputation is recognised in two ways: :func:`recomputation` marks it explicitly (the backbones'
``with_cp`` does), and any forward that runs while this thread executes a backward pass is one (the id of
the running backward call, a probed torch internal, see :mod:`.torch_internals`; where it is unavailable,
only the explicit mark is seen).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from . import torch_internals

__all__ = ['recomputation', 'is_recomputing']

_state = threading.local()


@contextlib.contextmanager
def recomputation() -> Iterator[None]:
    """Mark the forward run inside the block as a checkpointing recomputation."""
    _state.depth = getattr(_state, 'depth', 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def is_recomputing() -> bool:
    """Whether the caller runs as a recomputation (marked, or inside a backward pass)."""
    if getattr(_state, 'depth', 0):
        return True
    task = torch_internals.graph_task_id()
    return task is not None and task != -1
