"""Everything dynconv_mm takes from torch beyond the public API of its oldest supported release.

Two kinds of things live here, and nowhere else in the package:

* **Private internals** that make the CPU fast paths faster (memory reuse and a shared warehouse
  gradient in the KernelWarehouse assembly) or let a native inference call know that no module hook
  would be skipped. Any torch release may rename, remove or change them, so each is *probed* once
  per process with a small self-test of the behaviour dynconv_mm relies on. A probe that fails, or
  an internal that is missing, makes the callers take their plain path: slower, never different.
* **Public APIs newer than torch 2.1** (``torch.compiler.is_compiling``, ``torch.compiler.is_exporting``,
  ``torch.is_autocast_enabled(device_type)``), with what the older releases offer instead.

``DYNCONV_MM_TORCH_INTERNALS=0`` (or :func:`force_fallback`) switches every private internal off,
which is how the tests run the layers through the fallback paths.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from typing import Dict, Iterator, Optional

import torch

__all__ = ['is_compiling', 'is_exporting', 'plain_eager', 'autocast_enabled', 'onnx_export_kwargs',
           'weights_only_globals', 'internals_status',
           'storage_use_count', 'graph_task_id', 'will_execute', 'has_global_module_hooks', 'force_fallback',
           'gradient_sink_supported', 'memory_reuse_supported']


# ------------------------------------------------------------------------------------------------
# public APIs that the oldest supported torch lacks
def _find_is_compiling():
    fn = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    if fn is None:  # torch < 2.3
        import importlib
        fn = getattr(importlib.import_module('torch._dynamo'), 'is_compiling', None)
    return fn


# looked up once: torch 2.1's dynamo cannot trace ``getattr``/``hasattr`` on a module inside a compiled region
_IS_COMPILING = _find_is_compiling()


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller."""
    return bool(_IS_COMPILING()) if _IS_COMPILING is not None else False


_IS_EXPORTING = getattr(getattr(torch, 'compiler', None), 'is_exporting', None)  # torch >= 2.4


def is_exporting() -> bool:
    """Whether an exporter (ONNX, ``torch.export``) is tracing the caller."""
    if torch.onnx.is_in_onnx_export():
        return True
    return bool(_IS_EXPORTING()) if _IS_EXPORTING is not None else False


def plain_eager() -> bool:
    """Not tracing, exporting or compiling: eager-only mechanisms (custom autograd nodes that reuse
    memory, native calls) may be used; traced, exported and compiled graphs see plain tensor
    operations."""
    return not (torch.jit.is_tracing() or is_exporting() or is_compiling())


@functools.lru_cache(maxsize=None)
def onnx_export_kwargs() -> dict:
    """Keyword arguments that select the TorchScript-based exporter: ``torch.onnx.export(..., **onnx_export_kwargs())``.

    torch >= 2.5 takes ``dynamo=`` (from 2.9 the dynamo exporter is the default); older releases have
    only the TorchScript exporter and reject the keyword.
    """
    return {'dynamo': False} if 'dynamo' in inspect.signature(torch.onnx.export).parameters else {}


@contextlib.contextmanager
def weights_only_globals(extra) -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` accept the classes and functions in ``extra`` inside the block.

    ``torch.serialization.safe_globals`` (torch >= 2.5). Older releases have no public allow-list: there
    the weights-only unpickler's table of allowed globals (``torch._weights_only_unpickler``, a private
    internal) is extended for the duration, where it exists; without it nothing is added and such files
    are refused as before (the callers then ask for an explicit trusted load). Globals allowed before the
    block stay allowed after it.
    """
    public = getattr(torch.serialization, 'safe_globals', None)
    if public is not None:
        # torch's block removes on exit every global it was given, also those allowed before it began
        # (dynconv_mm allow-lists mmengine's checkpoint classes at import): hand it only the new ones
        before = getattr(torch.serialization, 'get_safe_globals', list)()
        with public([obj for obj in extra if obj not in before]):
            yield
        return
    module = getattr(torch, '_weights_only_unpickler', None)
    table = getattr(module, '_get_allowed_globals', None)
    if table is None or _forced['off'] or _env_off():
        yield
        return
    names = {f'{obj.__module__}.{obj.__qualname__}': obj for obj in extra}

    def extended():
        allowed = dict(table())
        allowed.update(names)
        return allowed

    module._get_allowed_globals = extended
    try:
        yield
    finally:
        module._get_allowed_globals = table


def autocast_enabled(device_type: str = 'cpu') -> bool:
    """``torch.is_autocast_enabled(device_type)``, also on releases whose function takes no argument."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: one function per device type
        if device_type == 'cpu':
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


# ------------------------------------------------------------------------------------------------
# private internals, probed
_lock = threading.Lock()
_probes: Dict[str, bool] = {}
_forced = {'off': False}


def _env_off() -> bool:
    return os.environ.get('DYNCONV_MM_TORCH_INTERNALS', '1').strip().lower() in ('0', 'false', 'off', 'no')


@contextlib.contextmanager
def force_fallback(off: bool = True) -> Iterator[None]:
    """Within the block, behave as if no private torch internal were available (``off=True``)."""
    before = _forced['off']
    _forced['off'] = off
    try:
        yield
    finally:
        _forced['off'] = before


def _usable(name: str) -> bool:
    if _forced['off'] or _env_off():
        return False
    with _lock:
        if name not in _probes:
            try:
                _probes[name] = bool(_PROBES[name]())
            except Exception:  # an internal that changed its signature or behaviour
                _probes[name] = False
        return _probes[name]


def _probe_storage_use_count() -> bool:
    fn = getattr(torch._C, '_storage_Use_Count', None)
    if fn is None:
        return False
    a = torch.empty(8)

    def count() -> int:
        return int(fn(a.untyped_storage()._cdata))
    free = count()
    b = a.view(2, 4)
    held = count()
    del b
    return held > free and count() == free


def _probe_graph_task() -> bool:
    current = getattr(torch._C, '_current_graph_task_id', None)
    will = getattr(torch._C, '_will_engine_execute_node', None)
    if current is None or will is None:
        return False
    seen: Dict[str, object] = {}

    class _Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, other_node):
            ctx.other_node = other_node
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.setdefault('tasks', []).append(current())
            seen.setdefault('executes', []).append(will(ctx.other_node))
            return grad, None

    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    b2 = b * 2  # a node on a branch that a gradient w.r.t. ``a`` alone does not run
    y = _Spy.apply(a * 1, b2.grad_fn) + b2
    torch.autograd.grad(y.sum(), [a], retain_graph=True)
    torch.autograd.grad(y.sum(), [a, b])
    tasks, executes = seen.get('tasks', []), seen.get('executes', [])
    return (len(tasks) == 2 and tasks[0] != tasks[1] and min(tasks) >= 0 and current() < 0
            and executes == [False, True])


_PROBES = {'storage_use_count': _probe_storage_use_count, 'graph_task': _probe_graph_task}


def memory_reuse_supported() -> bool:
    """:func:`storage_use_count` works here (memory can be handed out again once unreferenced)."""
    return _usable('storage_use_count')


def gradient_sink_supported() -> bool:
    """:func:`graph_task_id` and :func:`will_execute` work here (layers of a backward pass can add
    their gradients into one shared buffer)."""
    return _usable('graph_task')


def storage_use_count(t: torch.Tensor) -> Optional[int]:
    """How many tensors share ``t``'s storage (plus one for the query), or ``None`` where unavailable."""
    if not memory_reuse_supported():
        return None
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


def graph_task_id() -> Optional[int]:
    """An id of the backward call running now (``-1`` outside one), or ``None`` where unavailable."""
    if not gradient_sink_supported():
        return None
    return int(torch._C._current_graph_task_id())


def will_execute(node) -> Optional[bool]:
    """Whether the running backward call will execute autograd ``node``, or ``None`` where unavailable."""
    if not gradient_sink_supported():
        return None
    return bool(torch._C._will_engine_execute_node(node))


def has_global_module_hooks() -> bool:
    """Whether a global module forward (pre-)hook is registered (``torch.nn.modules.module``); ``True``
    where that cannot be told, so that callers which would skip hooks keep to the modules' path."""
    if _forced['off'] or _env_off():
        return True
    from torch.nn.modules import module as _module
    hooks = getattr(_module, '_global_forward_hooks', None)
    pre = getattr(_module, '_global_forward_pre_hooks', None)
    if hooks is None or pre is None:
        return True
    return bool(hooks) or bool(pre)


def internals_status() -> str:
    """One line: which private internals are in use here."""
    if _forced['off'] or _env_off():
        return 'off (DYNCONV_MM_TORCH_INTERNALS=0): plain paths'
    parts = [f'memory reuse {"on" if memory_reuse_supported() else "off"}',
             f'shared warehouse gradient {"on" if gradient_sink_supported() else "off"}']
    return ', '.join(parts)
