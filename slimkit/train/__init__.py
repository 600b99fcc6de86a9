"""Training engine: fit/evaluate, optimizers (incl. YOGI and AcceleGrad) and lr schedules."""

from .engine import Batch, FitResult, LossTerm, check_input, evaluate, fit, load_checkpoint, seed_everything
from .optim import OPTIMIZERS, build_optimizer
from .schedules import SCHEDULES, build_schedule

__all__ = ["Batch", "FitResult", "LossTerm", "check_input", "evaluate", "fit", "load_checkpoint", "seed_everything",
           "OPTIMIZERS", "build_optimizer", "SCHEDULES", "build_schedule"]
