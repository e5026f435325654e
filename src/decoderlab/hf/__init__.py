"""Everything decoderlab knows about Hugging Face folders, in one place.

`config`: config.json <-> `ModelConfig`, field by field as transformers 5.23 reads each family (GPT-2, Llama,
Qwen2, Mistral), defaults and per-layer sliding windows included. `weights`: the tensor-name maps between
decoderlab parameters and each family's checkpoint names. `decoderlab.checkpoint` reads and writes the
files; this package only translates.
"""

from .config import (
    ARCHITECTURES,
    DEFAULTS,
    FAMILIES,
    FAMILY_ARCHITECTURES,
    check_fits_family,
    family_of,
    from_hf_config,
    to_hf_config,
)
from .weights import (
    IGNORED,
    RULES,
    Rule,
    gather_weight,
    hf_names,
    normalize_hf_name,
    part_shapes,
    split_sizes,
    to_hf_state_dict,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULTS",
    "FAMILIES",
    "FAMILY_ARCHITECTURES",
    "IGNORED",
    "RULES",
    "Rule",
    "check_fits_family",
    "family_of",
    "from_hf_config",
    "gather_weight",
    "hf_names",
    "normalize_hf_name",
    "part_shapes",
    "split_sizes",
    "to_hf_config",
    "to_hf_state_dict",
]
