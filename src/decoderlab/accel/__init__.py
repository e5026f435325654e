"""Hardware-specific speed, kept out of the model: the model's layers call in here, behaviour is unchanged."""

from .packing import (
    SMALL_MODEL_BYTES,
    Linear,
    available_memory,
    drop_file_pages,
    finish_load,
    pack_model,
    packed_linear,
    packing_supported,
    stored_parameters,
    stored_tensors,
)
from .precision import fast_bf16

__all__ = ["SMALL_MODEL_BYTES", "Linear", "available_memory", "drop_file_pages", "fast_bf16", "finish_load",
           "pack_model",
           "packed_linear", "packing_supported", "stored_parameters", "stored_tensors"]
