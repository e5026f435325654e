"""Text generation: `generate` (whole results) and `stream` (step by step) over one decode engine.

The engine (`engine`) is a host loop over a public decoder protocol: a `Decoder`, built by a factory from a
`DecodeRequest`, runs the forward passes and returns one or more tokens per row per step (`Decoded`); the host
applies stop ids, stop strings, the token budget, text and logprobs alike for every decoder. `CachedDecoder` is
the default; `stream(..., decoder=factory)` takes another (PINE, the speculative decoders).
Streaming past the context with attention sinks (StreamingLLM) lives in `streaming` (`generate(..., window=W)`).
Lossless speculative decoding (Token Recycling, a draft model, multi-token heads) lives in `speculative`;
Recursive Speculative Decoding (sampled draft trees, exact in distribution, batched) in `rsd`.
Masked diffusion sampling (LLaDA; models with objective "diffusion" or "mlm", which `generate` dispatches to)
lives in `diffusion` (`diffusion_generate`, the `DiffusionSampler` decoder factory).
The logits processors (penalties, temperature, top-k, top-p, min-p) live in `sampling` as pure functions.
"""

from . import constrained, diffusion, rsd, sampling, speculative
from .constrained import Grammar
from .counterfactual import Trace, counterfactual
from .diffusion import DiffusionSampler, diffusion_generate
from .engine import (
    CACHE_CHUNK,
    CachedDecoder,
    Decoded,
    Decoder,
    DecodeRequest,
    DecoderFactory,
    GenerationResult,
    GenerationStep,
    Stream,
    check_prompts,
    generate,
    require_finite,
    resolve_sampling,
    resolve_stop_strings,
    resolve_stop_tokens,
    stream,
)
from .rsd import DraftTree, RSDDecoder, rsd_decoder, rsd_generate
from .sampling import SamplingParams, TokenLogprob, token_logprobs
from .sinks import SinkWindow, StreamingDecoder
from .speculative import (
    DraftDecoder,
    MTPDecoder,
    RecyclingDecoder,
    SpeculativeResult,
    TokenRecycler,
    draft_decoder,
    mtp_decoder,
    mtp_generate,
    speculative_generate,
    tree_template,
)

__all__ = [
    "CACHE_CHUNK", "CachedDecoder", "DecodeRequest", "Decoded", "Decoder", "DecoderFactory", "DiffusionSampler",
    "DraftDecoder", "diffusion", "diffusion_generate",
    "DraftTree", "RSDDecoder", "rsd", "rsd_decoder", "rsd_generate",
    "GenerationResult", "GenerationStep", "Grammar", "MTPDecoder", "RecyclingDecoder", "SamplingParams",
    "SinkWindow", "SpeculativeResult", "Stream", "StreamingDecoder", "TokenLogprob", "TokenRecycler", "Trace",
    "check_prompts", "constrained",
    "counterfactual", "draft_decoder", "generate", "mtp_decoder", "mtp_generate", "require_finite",
    "resolve_sampling", "resolve_stop_strings", "resolve_stop_tokens", "sampling", "speculative",
    "speculative_generate", "stream", "token_logprobs", "tree_template",
]
