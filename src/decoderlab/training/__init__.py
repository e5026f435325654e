"""Training from scratch: the loop, optimisers (AdamW, Muon), objectives, exact resume and torchrun scale-out."""

from .budget import BudgetPlan, plan_shape
from .config import TrainConfig, parse_duration, resolve_model_config
from .loop import Trainer, TrainResult, resume_config, train
from .optim import Muon, lr_factor
from .resources import MemoryEstimate, check_memory, estimate_memory
from .schedule import Budget, Schedule
from .signals import TrainingInterrupted

__all__ = ["Budget", "BudgetPlan", "MemoryEstimate", "Muon", "Schedule", "TrainConfig", "TrainResult", "Trainer",
           "TrainingInterrupted", "check_memory", "estimate_memory", "lr_factor", "parse_duration", "plan_shape",
           "resolve_model_config", "resume_config", "train"]
