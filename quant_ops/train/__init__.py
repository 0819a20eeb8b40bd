"""Fine-tuning quantized Gluon nets: the SineScheduler and a resumable training loop."""
from .scheduler import SineScheduler  # noqa: F401
from .loop import FitConfig, evaluate, fit  # noqa: F401
