"""Layers: dynamic convolutions (one batched-kernel primitive underneath) and re-parameterized
convolutions (one fusion toolkit underneath). Every public layer is registered in mmcv's conv
registry on import, so ``conv_cfg=dict(type=NAME)`` works in any OpenMMLab config, and answers the
layer protocol (:mod:`dynconv_mm.layers.base`) itself."""
from .attention import *  # noqa: F401,F403
from .base import ExtraMacs, LayerProtocol, StaticInit, StaticInitError  # noqa: F401
from .batched import batched_conv, reference_batched_conv  # noqa: F401
from .condconv import *  # noqa: F401,F403
from .dyconv import *  # noqa: F401,F403
from .dynamic_dw import *  # noqa: F401,F403
from .kernel_warehouse import *  # noqa: F401,F403
from .odconv import *  # noqa: F401,F403
from .pedconv import *  # noqa: F401,F403
from .reparam import *  # noqa: F401,F403
from .temperature import TemperatureMixin, get_temperature, set_temperature  # noqa: F401
