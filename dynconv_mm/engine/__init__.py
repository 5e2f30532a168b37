"""Training-loop pieces: temperature annealing and auxiliary losses."""
from .aux_loss import *  # noqa: F401,F403
from .hooks import *  # noqa: F401,F403
