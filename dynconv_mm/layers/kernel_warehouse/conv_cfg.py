"""The ``conv_cfg`` path: KW layers in stock OpenMMLab models.

``conv_cfg = dict(type='KWConv2d', cell_num_ratio=1, sharing_range=('layer', 'conv'))`` makes
``mmcv.cnn.build_conv_layer`` create *unbound* KW layers (no manager yet: a layer cannot know its
sharing partners while it is constructed). Right after a model is built through a ``MODELS``
registry, :func:`allocate_warehouses` groups them into warehouses by their module paths
(:func:`~.naming.path_warehouse_key`), attaches one :class:`~.manager.WarehouseManager` as
``warehouse_manager`` to the smallest module containing them all and allocates it. Call
:func:`allocate_warehouses` yourself for models built without a registry.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ...registry import register_post_build
from .conv import KWConvNd, KWLinear
from .manager import _PLAIN, WarehouseManager
from .naming import check_sharing_range, path_tokens, path_warehouse_key
from .options import MANAGER_OPTIONS

__all__ = ['allocate_warehouses']

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _common_prefix(paths: List[str]) -> str:
    split = [p.split('.') if p else [] for p in paths]
    prefix: List[str] = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            prefix.append(parts[0])
        else:
            break
    return '.'.join(prefix)


def allocate_warehouses(model: nn.Module) -> Optional[WarehouseManager]:
    """Create and allocate warehouses for the unbound KW layers in ``model`` (``conv_cfg`` path).

    Unbound layers are grouped into warehouses by :func:`path_warehouse_key` (or their explicit
    ``warehouse_name``); the layers of one warehouse must agree on every option. Warehouses are
    numbered in ``model.named_modules()`` order. One :class:`WarehouseManager` is attached as
    ``warehouse_manager`` to the smallest module containing all of the layers that is not a
    ``Sequential`` / ``ModuleList`` / ``ModuleDict`` (unless ``model`` itself is one); the paths used
    for naming are relative to that module. The manager is then stored and allocated
    (``ValueError`` on ratios that do not tile). Returns the manager, or ``None`` when nothing was
    unbound (cheap; safe to call again).

    Runs automatically after every model built through a ``MODELS`` registry.
    """
    if not isinstance(model, nn.Module):
        return None
    found: List[Tuple[str, KWConvNd]] = []
    linear_paths: Dict[int, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, KWLinear):
            linear_paths[id(module.conv)] = path  # name a KWLinear's warehouse after the linear layer
        elif isinstance(module, KWConvNd) and not module.bound:
            found.append((linear_paths.get(id(module), path), module))
    kept = []
    for path, layer in found:
        if any(fnmatch.fnmatchcase(path, pattern) for pattern in layer._exclude):
            _replace_with_plain(model, path, layer)
        else:
            kept.append((path, layer))
    found = kept
    if not found:
        return None
    parents = [p.rpartition('.')[0] if p else '' for p, _ in found]
    root_path = _common_prefix(parents)
    if len(found) == 1:
        root_path = found[0][0]
    root = model.get_submodule(root_path) if root_path else model
    while root_path and isinstance(root, _CONTAINERS):  # a Sequential would call the manager in its forward
        root_path = root_path.rpartition('.')[0]
        root = model.get_submodule(root_path) if root_path else model
    strip = len(root_path) + 1 if root_path else 0

    groups: Dict[str, List[Tuple[str, KWConvNd]]] = {}
    tokens: Dict[Tuple[str, ...], List[str]] = {}  # sharing_range -> unfused names of its layers
    for path, layer in found:
        rel = path[strip:] if len(path) >= strip else ''
        opts = layer._options
        if layer._warehouse_name is not None:
            key = layer._warehouse_name
        else:
            depthwise = layer.groups > 1 and layer.groups == layer.in_planes == layer.out_planes
            key = path_warehouse_key(rel, depthwise, opts['sharing_range'])
            tokens.setdefault(opts['sharing_range'], []).append('_'.join(path_tokens(rel, depthwise)))
        if key in groups:
            first_path, first = groups[key][0]
            for k in MANAGER_OPTIONS:
                if k == 'sharing_range':
                    continue
                if first._options[k] != opts[k]:
                    raise ValueError(f'allocate_warehouses: layers {first_path!r} and {path!r} share warehouse '
                                     f'{key!r} but disagree on {k}: {first._options[k]!r} vs {opts[k]!r}')
        groups.setdefault(key, []).append((path, layer))

    for sharing_range, names in tokens.items():
        check_sharing_range(sharing_range, names, owner='allocate_warehouses')
    settings = [groups[key][0][1]._options for key in groups]
    per = {k: [s[k] for s in settings] for k in MANAGER_OPTIONS if k != 'sharing_range'}
    manager = WarehouseManager(sharing_range=(), **per)
    for key, members in groups.items():
        for _, layer in members:
            manager._record(key, layer)
    try:
        manager.store()
    except ValueError as err:
        for _, layer in found:
            layer._manager[0] = None
            layer.warehouse_id = None
        raise ValueError(f'{err} (layers: {[p for p, _ in groups.get(_failing_key(err, groups), [])]})') from None
    attr = 'warehouse_manager'
    k = 1
    while hasattr(root, attr):
        attr = f'warehouse_manager{k}'
        k += 1
    root.add_module(attr, manager)
    manager.allocate(root)
    ref = next((p for p in model.parameters() if p.is_floating_point() and p.device.type != 'meta'), None)
    if ref is not None:
        manager.to(ref.device)
        for _, layer in found:
            layer.attention.to(ref.device)
    return manager


def _replace_with_plain(model: nn.Module, path: str, conv: KWConvNd) -> None:
    """Swap the unbound layer at ``path`` for the plain ``nn.ConvNd`` / ``nn.Linear`` it stands for."""
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    bias = conv.bias is not None
    if isinstance(old, KWLinear):
        plain: nn.Module = nn.Linear(conv.in_planes, conv.out_planes, bias=bias)
    else:
        plain = _PLAIN[conv.layer_type](conv.in_planes, conv.out_planes, conv.kernel_size, stride=conv.stride,
                                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=bias)
    nn.init.kaiming_normal_(plain.weight, mode='fan_out', nonlinearity='relu')
    if bias:
        nn.init.zeros_(plain.bias)
    ref = conv.bias if bias else next(iter(model.parameters()), None)
    if ref is not None:
        plain.to(ref.device)
    setattr(parent, name, plain)


def _failing_key(err: Exception, groups: Dict[str, Any]) -> Optional[str]:
    msg = str(err)
    for key in groups:
        if f'warehouse {key!r}' in msg:
            return key
    return None


register_post_build(allocate_warehouses)
