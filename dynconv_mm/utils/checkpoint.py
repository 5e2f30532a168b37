"""Let mmengine checkpoints load under ``torch.load(weights_only=True)``.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, and mmengine 0.10.7 cannot load
the checkpoints its own Runner saves (``resume=True``, ``load_from``, ``tools/test.py``): they hold
the message hub's ``HistoryBuffer`` objects and numpy arrays, dtypes and scalars. Turning
``weights_only`` off would let any downloaded checkpoint run code. Instead, importing dynconv_mm
allow-lists exactly the classes mmengine stores (:func:`allow_mmengine_checkpoint_globals`); the
weights-only unpickler keeps refusing everything else.
"""
from __future__ import annotations

import builtins
from typing import List

import numpy as np
import torch

_DONE = False


def mmengine_checkpoint_globals() -> List[object]:
    """The classes and functions an mmengine Runner checkpoint pickles (besides tensors)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    found: List[object] = [HistoryBuffer, np.ndarray, np.dtype, builtins.getattr]
    # numpy array reconstruction lives in numpy.core (1.x) or numpy._core (2.x)
    for modname in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        try:
            mod = __import__(modname, fromlist=['_reconstruct'])
        except ImportError:
            continue
        for fn in ('_reconstruct', 'scalar'):
            if hasattr(mod, fn):
                found.append(getattr(mod, fn))
    # dtype classes (numpy.dtypes.Float64DType, ...), present in numpy >= 1.25
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        found.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType'))
    return found


def allow_mmengine_checkpoint_globals() -> None:
    """Register :func:`mmengine_checkpoint_globals` with ``torch.serialization`` (idempotent)."""
    global _DONE
    if _DONE or not hasattr(torch.serialization, 'add_safe_globals'):
        return
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
    _DONE = True


allow_mmengine_checkpoint_globals()
