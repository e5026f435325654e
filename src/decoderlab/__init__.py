"""decoderlab: one causal transformer with an explicit attention-mask algebra.

Train it, load and save Hugging Face checkpoints, generate, and look inside; every feature is a
function over the one `Transformer`. The short functions (`generate`, `stream`, `train`, `finetune`,
`embed`) live at the top level; their subpackages are `generation`, `training`, `finetuning` and `embeddings`, never
hidden by them.
"""

from . import accel, data, embeddings, evaluate, finetuning, generation, interp, masks, pine, tasks, training
from .cache import KVCache
from .causal2vec import Causal2Vec, Causal2VecConfig, load_causal2vec, save_causal2vec, train_causal2vec
from .checkpoint import load, read_config, save
from .config import PRESETS, ModelConfig
from .embeddings import Encoder, embed
from .errors import CheckpointError, ConfigError, MaskError, UserError
from .finetuning import FinetuneConfig, FinetuneResult, finetune
from .generation import GenerationResult, counterfactual, diffusion_generate, generate, stream
from .generation_config import GenerationConfig
from .likelihood import PerplexityResult, perplexity
from .lora import LoraConfig, apply_lora, load_adapter, lora_parameters, merge_lora, save_adapter
from .masks import Mask
from .model import ModelOutput, Transformer
from .tokenizer import Tokenizer
from .training import TrainConfig, TrainResult, train
from .vocab import add_mask_token

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Causal2Vec",
    "Causal2VecConfig",
    "CheckpointError",
    "ConfigError",
    "Encoder",
    "FinetuneConfig",
    "FinetuneResult",
    "KVCache",
    "LoraConfig",
    "Mask",
    "MaskError",
    "ModelConfig",
    "ModelOutput",
    "PerplexityResult",
    "Tokenizer",
    "Transformer",
    "GenerationConfig",
    "GenerationResult",
    "TrainConfig",
    "TrainResult",
    "UserError",
    "counterfactual",
    "diffusion_generate",
    "accel",
    "add_mask_token",
    "apply_lora",
    "causal2vec",
    "data",
    "embeddings",
    "embed",
    "evaluate",
    "finetune",
    "finetuning",
    "generate",
    "generation",
    "interp",
    "stream",
    "tasks",
    "train",
    "train_causal2vec",
    "training",
    "load",
    "load_adapter",
    "load_causal2vec",
    "lora_parameters",
    "merge_lora",
    "save_adapter",
    "save_causal2vec",
    "masks",
    "perplexity",
    "pine",
    "read_config",
    "save",
]
