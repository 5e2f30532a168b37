"""Datasets made by dynconv_mm itself (see :mod:`dynconv_mm.datasets.toy`)."""
from .toy import *  # noqa: F401,F403
from .toy import __all__  # noqa: F401
