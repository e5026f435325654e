"""decoderlab: one causal transformer with an explicit attention-mask algebra.

Train it, load and save Hugging Face checkpoints, generate, and look inside; every feature is a
function over the one `Transformer`.
"""

from . import data, evaluate, masks, pine
from .cache import KVCache
from .checkpoint import load, read_config, save
from .config import PRESETS, ModelConfig
from .embed import Encoder, embed
from .errors import CheckpointError, ConfigError, MaskError, UserError
from .generate import GenerationResult, counterfactual, generate, stream
from .masks import Mask
from .model import ModelOutput, Transformer
from .tokenizer import Tokenizer
from .train import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "Encoder",
    "KVCache",
    "Mask",
    "MaskError",
    "ModelConfig",
    "ModelOutput",
    "Tokenizer",
    "Transformer",
    "GenerationResult",
    "TrainConfig",
    "TrainResult",
    "UserError",
    "counterfactual",
    "data",
    "embed",
    "evaluate",
    "generate",
    "stream",
    "train",
    "load",
    "masks",
    "pine",
    "read_config",
    "save",
]
