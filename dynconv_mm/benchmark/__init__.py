"""Benchmarks: the zoo of benchmarked layers and backbones with their static twins, official-style
reference forwards, timing / memory utilities and report writers (``tools/benchmark/benchmark.py``)."""
from .cases import *  # noqa: F401,F403
from .reference import *  # noqa: F401,F403
from .report import *  # noqa: F401,F403
from .runner import *  # noqa: F401,F403
from .timing import *  # noqa: F401,F403
