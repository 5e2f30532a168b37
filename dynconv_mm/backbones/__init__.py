"""Backbones, registered in the MODELS registries of mmpretrain, mmdet and mmseg (those installed)."""
from .dwnet import *  # noqa: F401,F403
from .dynamized import *  # noqa: F401,F403
from .kw_convnext import *  # noqa: F401,F403
from .kw_mobilenetv2 import *  # noqa: F401,F403
from .kw_resnet import *  # noqa: F401,F403
from .orepa_resnet import *  # noqa: F401,F403
from .pedconv_resnet import *  # noqa: F401,F403
