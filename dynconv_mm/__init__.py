"""dynconv_mm: dynamic and re-parameterized convolutions, and the backbones built from them, for
OpenMMLab 2.x (mmpretrain, mmdet, mmseg).

Importing the package registers every layer in mmcv's conv registry, every backbone in the MODELS
registries of the installed task libraries and the hooks in mmengine's HOOKS, and lets mmengine
checkpoints load under ``torch.load(weights_only=True)``. In a config::

    custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
"""
from . import backbones, engine, layers  # noqa: F401,E402
from .layers import get_temperature, set_temperature  # noqa: F401
from .layers.reparam.fuse import reparameterize_model  # noqa: F401
from .registry import register_all_scopes
from .utils import checkpoint as _checkpoint  # noqa: F401  (safe globals for mmengine checkpoints)
from .version import __version__  # noqa: F401

register_all_scopes()

__all__ = ['__version__', 'set_temperature', 'get_temperature', 'reparameterize_model']
