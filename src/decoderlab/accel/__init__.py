"""Hardware-specific speed, kept out of the model: the model's layers call in here, behaviour is unchanged."""

from .flex import (
    ATTENTION_BACKENDS,
    attention_backend,
    block_density,
    block_sparse_attention,
    choose_attention,
    flex_attention,
    to_block_mask,
)
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
from .quantize import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    QUANTIZATIONS,
    QuantizedWeight,
    kernel_available,
    quantize_model,
    quantized_layers,
)

__all__ = ["ATTENTION_BACKENDS", "DEFAULT_GROUP_SIZE", "INT4_GROUP_SIZES", "QUANTIZATIONS", "SMALL_MODEL_BYTES",
           "Linear", "QuantizedWeight", "attention_backend", "available_memory", "block_density",
           "block_sparse_attention", "choose_attention", "drop_file_pages", "fast_bf16", "finish_load",
           "flex_attention", "kernel_available", "pack_model", "packed_linear", "packing_supported",
           "quantize_model", "quantized_layers", "stored_parameters", "stored_tensors", "to_block_mask"]
