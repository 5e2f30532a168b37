"""Re-parameterized convolutions: rich training-time forms folded into one plain conv for deployment."""
from .dbb import *  # noqa: F401,F403
from .doconv import *  # noqa: F401,F403
from .fuse import *  # noqa: F401,F403
from .orepa import *  # noqa: F401,F403
from .repvgg import *  # noqa: F401,F403
