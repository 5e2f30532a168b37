"""dynconv_mm: dynamic and re-parameterized convolutions, and the backbones built from them, for
OpenMMLab 2.x (mmpretrain, mmdet, mmseg).

Importing the package registers every layer in mmcv's conv registry, every backbone in the MODELS
registries of the installed task libraries, the hooks in mmengine's HOOKS and our classification
models in mmpretrain's model hub (``mmpretrain.list_models`` / ``get_model``), and lets mmengine
checkpoints load under ``torch.load(weights_only=True)``. In a config::

    custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
"""
from .version import check_openmmlab_versions

check_openmmlab_versions()  # a clear message, before the imports below fail on a missing or unsupported mmcv

from . import backbones, engine, layers  # noqa: F401,E402
from .layers import get_temperature, set_temperature  # noqa: F401,E402
from .layers.reparam.fuse import reparameterize_model  # noqa: F401,E402
from .model_hub import register_model_hub  # noqa: E402
from .registry import register_all_scopes  # noqa: E402
from .surgery import dynamize  # noqa: F401,E402
from .utils import checkpoint as _checkpoint  # noqa: F401,E402  (safe globals for mmengine checkpoints)
from .version import __version__  # noqa: F401,E402

register_all_scopes()
register_model_hub()

__all__ = ['__version__', 'dynamize', 'set_temperature', 'get_temperature', 'reparameterize_model']
