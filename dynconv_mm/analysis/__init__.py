"""Model analysis: parameter and FLOP counts of config-built models."""
from .complexity import *  # noqa: F401,F403
from .dynamic_flops import *  # noqa: F401,F403
