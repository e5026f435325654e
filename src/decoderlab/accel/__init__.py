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
from .quantize import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    QUANTIZATIONS,
    QuantizedWeight,
    kernel_available,
    quantize_model,
    quantized_layers,
)

__all__ = ["DEFAULT_GROUP_SIZE", "INT4_GROUP_SIZES", "QUANTIZATIONS", "SMALL_MODEL_BYTES", "Linear",
           "QuantizedWeight", "available_memory", "drop_file_pages", "fast_bf16", "finish_load",
           "kernel_available", "pack_model", "packed_linear", "packing_supported", "quantize_model",
           "quantized_layers", "stored_parameters", "stored_tensors"]
