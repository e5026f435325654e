"""Fine-tuning a checkpoint: SFT with response-only loss on packed examples, LoRA, Bitune, distillation, DPO."""

from .bitune import BidirectionalPromptDecoder, training_mask
from .config import FINETUNE_OBJECTIVES, FinetuneConfig
from .examples import Example, PreferencePair, read_examples, render, render_pair
from .objectives import (
                         MASK_TOKEN,
                         MaskedLMBatch,
                         TAIDState,
                         bico_mask,
                         bico_masked_lm,
                         dpo_loss,
                         kl_to_teacher,
                         next_token_loss,
                         sequence_logprobs,
)
from .packing import RowPlan, SFTBatch, build_batch, pack
from .trainer import FinetuneResult, FinetuneTrainer, ResponseScore, finetune, score_responses

__all__ = ["FINETUNE_OBJECTIVES", "MASK_TOKEN", "BidirectionalPromptDecoder", "Example", "FinetuneConfig",
           "FinetuneResult", "FinetuneTrainer", "MaskedLMBatch", "PreferencePair", "ResponseScore", "RowPlan",
           "SFTBatch", "TAIDState", "bico_mask", "bico_masked_lm", "build_batch", "dpo_loss", "finetune",
           "kl_to_teacher", "next_token_loss", "pack", "read_examples", "render", "render_pair", "score_responses",
           "sequence_logprobs", "training_mask"]
