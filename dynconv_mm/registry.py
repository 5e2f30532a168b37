"""One registration path for every OpenMMLab scope.

dynconv_mm classes are registered with :func:`register` and a *kind*:

* ``'conv'``: mmengine's root ``MODELS`` registry, which is where ``mmcv.cnn.build_conv_layer``
  looks (``conv_cfg=dict(type=...)``). The task registries of mmdet, mmseg and mmpretrain are
  children of it, so their configs find the layer too.
* ``'model'`` (backbones and other model parts): the root ``MODELS`` registry and the ``MODELS``
  registries of mmpretrain, mmdet and mmseg, for each one that is installed (each is optional).
* ``'hook'``: mmengine's root ``HOOKS`` registry (inherited by every task library).

Post-build callbacks (:func:`register_post_build`) run on every model built through one of those
``MODELS`` registries, right after construction and before the Runner wraps it or builds the
optimizer. KernelWarehouse uses this to allocate the warehouses of layers created through
``conv_cfg`` (which cannot know their sharing partners while they are constructed).

Registration into the task libraries is deferred until :func:`register_all_scopes` runs (it is
called once when ``dynconv_mm`` is imported), so that a decorated class never imports mmdet.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Dict, List, Optional, Tuple, Type

from mmengine.registry import HOOKS as ROOT_HOOKS
from mmengine.registry import MODELS as ROOT_MODELS

#: task libraries whose ``MODELS`` registry receives dynconv_mm models (module name -> registry path)
TASK_SCOPES: Dict[str, str] = {
    'mmpretrain': 'mmpretrain.registry',
    'mmdet': 'mmdet.registry',
    'mmseg': 'mmseg.registry',
}

_KINDS = ('conv', 'model', 'hook')
_PENDING: List[Tuple[str, str, type]] = []   # (kind, name, cls) awaiting task-scope registration
_DONE_SCOPES: Dict[str, bool] = {}
_NAMES: Dict[str, set] = {}       # kind -> registered names


def register(kind: str, name: Optional[str] = None) -> Callable[[Type], Type]:
    """Class decorator registering ``cls`` for ``kind`` (``'conv'``, ``'model'`` or ``'hook'``)."""
    if kind not in _KINDS:
        raise ValueError(f'unknown registration kind {kind!r}; expected one of {_KINDS}')

    def _wrap(cls: Type) -> Type:
        key = name or cls.__name__
        _NAMES.setdefault(kind, set()).add(key)
        if kind == 'hook':
            ROOT_HOOKS.register_module(name=key, module=cls, force=True)
        else:
            ROOT_MODELS.register_module(name=key, module=cls, force=True)
        if kind == 'model':
            _PENDING.append((kind, key, cls))
            for scope in list(_DONE_SCOPES):
                _register_in_scope(scope, key, cls)
        return cls

    return _wrap


def _register_in_scope(scope: str, key: str, cls: type) -> None:
    reg = importlib.import_module(TASK_SCOPES[scope]).MODELS
    reg.register_module(name=key, module=cls, force=True)


_POST_BUILD: List[Callable] = []


def register_post_build(fn: Callable) -> Callable:
    """Run ``fn(module)`` on every module built through a ``MODELS`` registry (root or task scope).

    Callbacks must be cheap when there is nothing for them to do and idempotent.
    """
    if fn not in _POST_BUILD:
        _POST_BUILD.append(fn)
    return fn


def _install_post_build(registry) -> None:
    if getattr(registry.build_func, '_dynconv_mm_wrapped', False):
        return
    inner = registry.build_func

    def build_func(*args, **kwargs):
        obj = inner(*args, **kwargs)
        for fn in _POST_BUILD:
            fn(obj)
        return obj

    build_func._dynconv_mm_wrapped = True
    build_func.__wrapped__ = inner
    registry.build_func = build_func


_install_post_build(ROOT_MODELS)


def available_scopes() -> List[str]:
    """The OpenMMLab task libraries that are installed (without importing them)."""
    found = []
    for scope in TASK_SCOPES:
        try:
            if importlib.util.find_spec(scope) is not None:
                found.append(scope)
        except (ImportError, ValueError):  # a broken or blocked optional install
            continue
    return found


def register_all_scopes() -> List[str]:
    """Register every pending model class into the installed task libraries' registries."""
    for scope in available_scopes():
        if scope in _DONE_SCOPES:
            continue
        try:
            importlib.import_module(TASK_SCOPES[scope])
        except Exception:  # a broken optional install must not break dynconv_mm
            continue
        _DONE_SCOPES[scope] = True
        _install_post_build(importlib.import_module(TASK_SCOPES[scope]).MODELS)
        for _, key, cls in _PENDING:
            _register_in_scope(scope, key, cls)
    return sorted(_DONE_SCOPES)


def registered_names(kind: str) -> List[str]:
    """Names registered with :func:`register` for ``kind`` (used in error messages and tests)."""
    return sorted(_NAMES.get(kind, ()))
