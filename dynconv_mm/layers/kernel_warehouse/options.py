"""The options of a warehouse manager, and their checks (shared by :class:`WarehouseManager` and by
the KW layers built through ``conv_cfg``, which carry the options until their manager exists)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List

from ..attention import build_attention_norm

__all__ = ['MANAGER_OPTIONS', 'UNBOUND_DEFAULTS', 'per_warehouse', 'check_manager_options', 'is_sequence']

#: options a KW layer built through ``conv_cfg`` accepts (all of the manager's options)
MANAGER_OPTIONS = ('reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'sharing_range',
                   'nonlocal_basis_ratio', 'norm_layer', 'spatial_partition')
#: defaults of an unbound layer (``conv_cfg`` path); the sharing default gives one warehouse per stage
UNBOUND_DEFAULTS: Dict[str, Any] = dict(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1,
                                        cell_outplane_ratio=1, sharing_range=('layer', 'conv'),
                                        nonlocal_basis_ratio=1, norm_layer='BN', spatial_partition=True)
_RATIOS = ('reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'nonlocal_basis_ratio')


def is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def per_warehouse(value: Any, n: int, what: str) -> list:
    """The official ``parse``: a scalar or a length-1 sequence is repeated, a length-n one kept."""
    if is_sequence(value):
        if len(value) == 1:
            return [value[0]] * n
        if len(value) == n:
            return list(value)
        raise ValueError(f'WarehouseManager: {what} has {len(value)} values but there are {n} warehouses '
                         '(give one value, or one per warehouse in order of first reservation)')
    return [value] * n


def _check_ratio(value: Any, what: str, owner: str) -> None:
    values = value if is_sequence(value) else [value]
    if not values:
        raise ValueError(f'{owner}: {what} must not be an empty sequence')
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0 or math.isinf(v):
            raise ValueError(f'{owner}: {what} must be a positive number (or one per warehouse), got {value!r}')


def check_manager_options(owner: str, **options: Any) -> None:
    """``ValueError`` naming ``owner`` for a bad ratio, ``spatial_partition`` or attention norm
    (each a scalar or one value per warehouse)."""
    for what in _RATIOS:
        if what in options:
            _check_ratio(options[what], what, owner)
    spatial: List[Any] = options.get('spatial_partition', True)
    for v in (spatial if is_sequence(spatial) else [spatial]):
        if not isinstance(v, (bool, int)):
            raise ValueError(f'{owner}: spatial_partition must be a bool (or one per warehouse), got {spatial!r}')
    norm = options.get('norm_layer', 'BN')
    for v in (norm if is_sequence(norm) else [norm]):
        build_attention_norm(v, 16, owner=owner)  # fails now on a bad norm
