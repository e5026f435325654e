"""Training from scratch: the loop, optimisers (AdamW, Muon), objectives and torchrun scale-out."""

from .config import TrainConfig, parse_duration, resolve_model_config
from .loop import Trainer, TrainResult, resume_config, train
from .optim import Muon, lr_factor

__all__ = ["Muon", "TrainConfig", "TrainResult", "Trainer", "lr_factor", "parse_duration", "resolve_model_config",
           "resume_config", "train"]
