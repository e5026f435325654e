"""Hardware-specific speed, kept out of the model: the model's layers call in here, behaviour is unchanged."""

from .packing import SMALL_MODEL_BYTES, Linear, available_memory, pack_model, packed_linear

__all__ = ["SMALL_MODEL_BYTES", "Linear", "available_memory", "pack_model", "packed_linear"]
