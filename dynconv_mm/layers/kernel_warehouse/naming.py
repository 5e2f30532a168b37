"""Warehouse names: which KW layers share a warehouse.

Every KW layer has a warehouse *name* made of ``'_'``-separated tokens, ``stage<s>_layer<l>_<kind><c>``
(``kind``: ``conv``, ``dwconv`` for depth-wise, ``pwconv`` for point-wise convolutions in the
MobileNetV2 / ConvNeXt backbones). ``sharing_range`` lists token kinds whose index is dropped, so
that the layers that then have the same name share one warehouse (the official fusion rule: a
token that *starts with* an entry is replaced by it; later entries win):

==============  ====================================================================================
entry           effect
==============  ====================================================================================
``'layer'``     the blocks of a stage share: ``stage2_layer3_conv1 -> stage2_layer_conv1``
``'conv'``      the (non depth-wise) convolutions of a block share: ``-> stage2_layer3_conv``
``'dwconv'``    the depth-wise convolutions of a block share
``'pwconv'``    the point-wise convolutions of a block share (MobileNetV2, ConvNeXt names)
``'stage'``     the stages share (rarely useful: the channel counts differ between stages)
==============  ====================================================================================

``('layer', 'conv')`` therefore gives one warehouse per stage, ``('conv',)`` one per block and
``()`` one per layer. Any other entry must be a prefix of some token of the names in use (it is
checked when the warehouses are created: a misspelling such as ``'cnov'`` would silently give a
different network).
"""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple, Union

__all__ = ['SHARING_TOKENS', 'normalize_sharing_range', 'fuse_warehouse_name', 'path_warehouse_key',
           'check_sharing_range']

#: the token kinds of the warehouse names of the KW backbones and of the ``conv_cfg`` path
SHARING_TOKENS = ('stage', 'layer', 'conv', 'dwconv', 'pwconv')

SharingRange = Union[str, Sequence[str], None]


def normalize_sharing_range(sharing_range: SharingRange, owner: str = 'WarehouseManager') -> Tuple[str, ...]:
    """``sharing_range`` as a tuple of non-empty strings.

    The official JSON configs give a string such as ``"layer_conv"``, which the official manager
    iterates character by character. Here a string is read as the ``'_'``-separated list it stands
    for (``"layer_conv" -> ('layer', 'conv')``); for every name scheme of the KW backbones (and every
    shipped config) this gives the same warehouses as the character reading. A tuple of single
    characters (the official ``tuple("layer")``) is kept as it is and keeps its meaning.

    Raises ``ValueError`` for entries that can never match a name token (containing characters
    other than letters and digits, or ``'_'``), listing the valid entries.
    """
    if sharing_range is None:
        return ()
    if isinstance(sharing_range, str):
        entries: Tuple[str, ...] = tuple(s.strip() for s in sharing_range.replace(',', '_').split('_') if s.strip())
    elif isinstance(sharing_range, (list, tuple)):
        for entry in sharing_range:
            if not isinstance(entry, str) or not entry:
                raise ValueError(f'{owner}: sharing_range entries must be non-empty strings, got {entry!r} in '
                                 f'{sharing_range!r}')
            if '_' in entry and entry != '_':  # '_' alone (from tuple('layer_conv')) is harmless
                raise ValueError(f'{owner}: sharing_range entry {entry!r} contains "_" and could never match a name '
                                 f'token; write {tuple(entry.split("_"))!r} (or the string {entry!r})')
        entries = tuple(sharing_range)
    else:
        raise ValueError(f'{owner}: sharing_range must be a string or a sequence of strings, got {sharing_range!r}')
    for entry in entries:
        if len(entry) > 1 and not entry.isalnum():
            raise ValueError(f'{owner}: sharing_range entry {entry!r} can never match a warehouse name token '
                             f'(tokens are letters and digits); valid entries: {list(SHARING_TOKENS)} '
                             '(see docs/kernel_warehouse.md), given as a tuple or an "_"-separated string')
    return entries


def check_sharing_range(sharing_range: Sequence[str], names: Iterable[str], owner: str = 'WarehouseManager') -> None:
    """``ValueError`` for an entry of more than one character that is no token kind of
    :data:`SHARING_TOKENS` and matches no token of ``names`` (a misspelling: it would silently
    share nothing). Single characters are the official character-by-character reading and pass."""
    tokens = {tok for name in names for tok in name.split('_')}
    for entry in sharing_range:
        if len(entry) > 1 and entry not in SHARING_TOKENS and not any(t.startswith(entry) for t in tokens):
            kinds = sorted({t.rstrip('0123456789') for t in tokens if t.rstrip('0123456789')})
            raise ValueError(f'{owner}: sharing_range entry {entry!r} matches no token of the warehouse names '
                             f'(token kinds here: {kinds}); valid entries: {list(SHARING_TOKENS)} or a prefix of '
                             'a token (see docs/kernel_warehouse.md)')


def fuse_warehouse_name(name: str, sharing_range: Sequence[str]) -> str:
    """The official name fusion: each ``'_'``-separated token that starts with a sharing entry is
    replaced by that entry (later entries win). ``stage2_layer3_conv1`` with ``('layer', 'conv')``
    gives ``stage2_layer_conv``: every conv of every block of stage 2 shares one warehouse."""
    return '_'.join(_fuse_token(tok, sharing_range) for tok in name.split('_'))


def _fuse_token(token: str, sharing_range: Sequence[str]) -> str:
    for entry in sharing_range:
        if token.startswith(entry):
            token = entry
    return token


def path_tokens(path: str, depthwise: bool) -> Tuple[str, str, str]:
    """The ``stage`` / ``layer`` / ``conv`` tokens of a layer created through ``conv_cfg`` (see
    :func:`path_warehouse_key`), before fusion."""
    parts = path.split('.') if path else []
    if not parts:
        stage, layer, conv = '', '', ''
    else:
        cut = None
        for i in range(len(parts) - 1):
            if parts[i + 1].isdigit():
                cut = i
                break
        if cut is None:
            stage, layer = '.'.join(parts[:-1]), ''
        else:
            stage, layer = '.'.join(parts[:cut + 1]), '.'.join(parts[cut + 1:-1])
        conv = parts[-1]
    kind = 'dwconv' if depthwise else 'conv'
    return 'stage' + stage, 'layer' + layer, kind + conv


def path_warehouse_key(path: str, depthwise: bool, sharing_range: Sequence[str]) -> str:
    """Warehouse name of a layer created through ``conv_cfg``, from its module path.

    The path (relative to the module the warehouses are attached to) is read as
    ``stage / layer / conv``:

    * ``stage``: the path up to the first component that is followed by a numeric one (the
      container of the blocks, e.g. ``layer2`` in ``layer2.1.conv1``); if there is none, the parent
      path (``''`` for a top-level layer such as a ResNet stem ``conv1``);
    * ``layer``: the components between ``stage`` and the last one (``1``, ``0.downsample``);
    * ``conv``: the last component, prefixed by the layer kind, ``dwconv`` for depth-wise layers
      (``groups == C_in == C_out > 1``) and ``conv`` otherwise.

    Each part, written ``stage<stage>``, ``layer<layer>`` and ``<kind><conv>``, is fused with
    ``sharing_range`` like a token of an official name (:func:`fuse_warehouse_name`). So with
    ``('layer', 'conv')`` (the default) every non-depth-wise conv of a ResNet stage shares one
    warehouse (``layer2.*``), depth-wise convs of a stage share another one per conv name, and the
    stem gets its own; ``('conv',)`` gives one warehouse per block and ``()`` one per layer.
    """
    return '_'.join(_fuse_token(t, sharing_range) for t in path_tokens(path, depthwise))
