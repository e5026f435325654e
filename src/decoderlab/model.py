"""`Transformer`: the one decoder-only model every decoderlab feature runs on.

Masks and positions are explicit inputs: with neither, it is a plain causal LM over positions
0..T-1 and attention takes SDPA's `is_causal` fast path. Architecture differences (norm, positions,
activation, GQA, biases, QK-norm, soft-cap, tied embeddings, per-layer sliding windows) are config switches,
not subclasses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import masks
from .accel import DEFAULT_GROUP_SIZE, Linear, pack_model, quantize_model, stored_parameters
from .accel import flex as block_sparse
from .cache import KVCache
from .config import ModelConfig, rope_inv_freq
from .errors import UserError
from .generation_config import GenerationConfig

# Hook points, named as TransformerLens names them so its tutorials read across (decoderlab.interp sets them).
# Per block, in the order a forward pass reaches them; each is "blocks.{layer}." + the site. Around the blocks:
# hook_embed, hook_pos_embed (learned positions) and ln_final.hook_normalized.
BLOCK_HOOKS = (
    "hook_resid_pre", "ln1.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
    "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized",
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
)
# Sites whose values only the written-out attention produces: a layer with one of them hooked runs eagerly.
EAGER_HOOKS = ("attn.hook_attn_scores", "attn.hook_pattern")


class Hooks:
    """What a forward pass calls at each hook point while hooks are set (`Transformer.hooks`).

    `wants(name)` says whether anything listens at a point (sites nobody asked for cost nothing), and
    `hooks(name, x)` returns the value to carry on with: `x` itself, or a replacement of the same shape.
    `decoderlab.interp` implements it; the model only calls it.
    """

    def wants(self, name: str) -> bool:
        raise NotImplementedError

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _fire(hooks: Hooks | None, name: str, x: torch.Tensor) -> torch.Tensor:
    return x if hooks is None or not hooks.wants(name) else hooks(name, x)


def _fire_heads(hooks: Hooks | None, name: str, x: torch.Tensor) -> torch.Tensor:
    """A per-head tensor kept [B, H, T, D] here, shown to hooks as TransformerLens shows it: [B, T, H, D]."""
    return x if hooks is None or not hooks.wants(name) else hooks(name, x.transpose(1, 2)).transpose(1, 2)


@dataclass
class ModelOutput:
    """What `Transformer.forward` returns when hidden states or attention weights are asked for."""

    logits: torch.Tensor
    # Residual stream entering each block, then after the final norm: n_layers + 1 tensors [B, T, d].
    hidden_states: list[torch.Tensor] | None = None
    # Attention probabilities per layer [B, H, Tq, Tk] (eager path only).
    attentions: list[torch.Tensor] | None = None
    # Logits of the future-token heads: entry k predicts the token k+2 places ahead.
    future_logits: list[torch.Tensor] | None = None


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose weight follows the input's dtype, so bf16 activations take the fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def _norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed_sin) [..., D] for integer `positions` of any shape, in the half-split layout of HF.

    signed_sin is [-sin, sin]: it folds rotate_half's sign in, so `apply_rope` needs one roll instead of chunk,
    neg and cat. Angles are computed in fp32 whatever `dtype`: bf16 positions lose integer precision past 256.
    """
    with torch.autocast(device_type=positions.device.type, enabled=False):
        freqs = positions.float().unsqueeze(-1) * inv_freq.float()
        sin = freqs.sin()
        return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [..., D] by angles from `rope_angles` (broadcast against x): x * cos + rotate_half(x) * sin,
    bit for bit, with fewer dispatches (this runs in every layer of every decode step)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.n_heads, config.kv_heads, config.dim_head
        # One fused projection: a single larger matmul is faster than three on CPU and GPU.
        self.qkv = Linear(config.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=config.bias_qkv)
        self.out = Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias_attn_out)
        self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.hook_prefix = f"blocks.{layer}.attn."

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, attn: _AttnPlan,
                cache: KVCache | None, hooks: Hooks | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        # Heads of queries, keys and values side by side: one view and one transpose for all three.
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
        if self.q_norm is None and rope is not None and attn.custom is None and hooks is None:
            # Queries and keys share their positions: rotate both in one go (fewer dispatches per layer).
            q, k = apply_rope(qkv[:, :H + Hkv], *rope).split((H, Hkv), dim=1)
            v = qkv[:, H + Hkv:]
        else:
            q, k, v = qkv.split((H, Hkv, Hkv), dim=1)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            p = self.hook_prefix
            if hooks is not None:
                q, k, v = (_fire_heads(hooks, p + "hook_q", q), _fire_heads(hooks, p + "hook_k", k),
                           _fire_heads(hooks, p + "hook_v", v))
            if attn.custom is not None:
                y = attn.custom(self.layer, q, k, v)
                return self.out(y.transpose(1, 2).reshape(B, T, H * D).to(q.dtype)), None
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
                if hooks is not None:
                    q, k = _fire_heads(hooks, p + "hook_rot_q", q), _fire_heads(hooks, p + "hook_rot_k", k)
        dtype = q.dtype
        if cache is not None:
            if k.dtype != cache.keys.dtype:
                k, v = k.to(cache.keys.dtype), v.to(cache.keys.dtype)
            k, v = cache.update(self.layer, k, v)
            # Attention runs in the cache's dtype: an fp32 cache keeps a bf16 model's decode attention in
            # fp32, whose CPU kernel is 3-7x faster than bf16's for a single query.
            if q.dtype != k.dtype:
                q = q.to(k.dtype)
        weights = None
        if attn.eager:
            y, weights = _eager_attention(q, k, v, attn.mask, hooks, self.hook_prefix)
        elif attn.sparse is not None:
            y = attn.sparse(q, k, v, self.dropout if self.training else 0.0)
        elif T == 1 and Hkv == H and attn.mask is not None and torch.compiler.is_compiling():
            y = _one_query_attention(q, k, v, attn.mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn.mask, is_causal=attn.is_causal,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=Hkv != H)
        if hooks is not None:
            return self._hooked_output(y if y.dtype == dtype else y.to(dtype), hooks), weights
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.out(y if y.dtype == dtype else y.to(dtype)), weights

    def _hooked_output(self, y: torch.Tensor, hooks: Hooks) -> torch.Tensor:
        """The output projection with `hook_z` (mixed values per head) and, when asked, `hook_result`: each
        head's share of the output [B, T, H, d_model], summed (plus the bias) into the layer's output."""
        B, H, T, D = y.shape
        z = _fire_heads(hooks, self.hook_prefix + "hook_z", y).transpose(1, 2)  # [B, T, H, D]
        name = self.hook_prefix + "hook_result"
        if not hooks.wants(name):
            return self.out(z.reshape(B, T, H * D))
        if getattr(self.out, "lora_adapters", None) is not None:
            raise UserError(f"{name} splits attn.out's weight by head, which leaves out its LoRA adapter; "
                            "merge the adapter first (decoderlab.merge_lora)")
        w_out = self.out.weight.view(-1, H, D)  # [d_model, H, D]
        result = hooks(name, torch.einsum("bthd,mhd->bthm", z, w_out.to(z.dtype)))
        out = result.sum(2)
        return out if self.out.bias is None else out + self.out.bias.to(out.dtype)


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     hooks: Hooks | None = None, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, so the probabilities can be returned (for interpretability): scores [B, H, Tq, Tk]
    (scaled, masked slots at -inf) and probabilities, each a hook point."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # Scaled and masked in place: the product is a fresh tensor, and each [B, H, Tq, Tk] copy saved is memory
    # (and page faults) a cached run of every layer's pattern would otherwise pay twice per layer.
    scores = (q @ k.transpose(-2, -1)).float().div_(math.sqrt(q.shape[-1]))
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    if hooks is None:  # training's written-out attention runs here too: no hook names on that path
        probs = scores.softmax(dim=-1).to(q.dtype)
        return probs @ v, probs
    scores = _fire(hooks, prefix + "hook_attn_scores", scores)
    probs = _fire(hooks, prefix + "hook_pattern", scores.softmax(dim=-1).to(q.dtype))
    return probs @ v, probs


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row and head, q [B, H, 1, D] over k, v [B, H, S, D], as sums of products, for
    compiled decode steps: inductor turns it into two streaming reductions over the cache, which read it from
    memory about 1.5x faster than SDPA's flash kernel (measured: 35 vs 54 us per gpt2 layer, cache not in the
    CPU's caches; gpt2's compiled bf16 step 7.1 -> 6.9 ms). Not for grouped keys (GQA), where it measured slower
    than SDPA (a 22M model's step 1.68 -> 1.80 ms). Eagerly it would materialise [B, H, S, D]."""
    scores = (q * k).sum(-1) * (1 / math.sqrt(q.shape[-1]))  # [B, H, S]
    scores = scores.masked_fill(~mask.view(mask.shape[0], 1, -1), float("-inf"))
    return (scores.softmax(-1).unsqueeze(-1) * v).sum(-2, keepdim=True)  # [B, H, 1, D]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.mlp_width
        self.gated = config.gated_mlp
        # SwiGLU keeps gate and up in one matrix ([gate; up]) for one matmul.
        self.up = Linear(config.d_model, (2 if self.gated else 1) * width, bias=config.bias_mlp)
        self.down = Linear(width, config.d_model, bias=config.bias_mlp)
        self.activation = config.activation
        self.hook_prefix = ""  # "blocks.{layer}.mlp." in a block (a future head's MLP has no hook points)

    def forward(self, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        h = self.up(x)
        p = self.hook_prefix
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            if hooks is not None:  # TransformerLens: hook_pre is the gate's input, hook_pre_linear the up branch
                gate, up = _fire(hooks, p + "hook_pre", gate), _fire(hooks, p + "hook_pre_linear", up)
            h = F.silu(gate) * up
        else:
            if hooks is not None:
                h = _fire(hooks, p + "hook_pre", h)
            if self.activation == "gelu_tanh":
                h = F.gelu(h, approximate="tanh")
            elif self.activation == "gelu":
                h = F.gelu(h)
            else:  # relu2
                h = F.relu(h).square()
        if hooks is not None:  # nothing named on the plain path: decoding pays for every call
            h = _fire(hooks, p + "hook_post", h)
        return self.down(h)


class FutureHead(nn.Module):
    """A residual MLP on the trunk's last hidden state that predicts a token further ahead (Medusa-style).

    It needs no attention, hence no KV cache, so drafting with it costs one small MLP per head.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = _norm(config, config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = _norm(config, config.d_model)
        self.attn = Attention(config, layer)
        self.mlp_norm = _norm(config, config.d_model)
        self.mlp = MLP(config)
        self.mlp.hook_prefix = f"blocks.{layer}.mlp."
        self.dropout = config.dropout
        self.branch_drop = config.branch_drop
        self.hook_prefix = f"blocks.{layer}."

    def forward(self, x: torch.Tensor, rope, attn: _AttnPlan, cache: KVCache | None, hooks: Hooks | None = None):
        if hooks is not None:
            return self._hooked_forward(x, rope, attn, cache, hooks)
        a, weights = self.attn(self.attn_norm(x), rope, attn, cache)
        if self.training:  # no regulariser call when off: decoding pays for every call
            a = self._regularise(a)
        x = x + a
        m = self.mlp(self.mlp_norm(x))
        return x + (self._regularise(m) if self.training else m), weights

    def _regularise(self, branch: torch.Tensor) -> torch.Tensor:
        """A residual branch's output while training: dropout, then per-token branch dropping."""
        if self.dropout:
            branch = F.dropout(branch, self.dropout)
        if self.branch_drop:
            keep = 1.0 - self.branch_drop
            branch = branch * branch.new_empty(*branch.shape[:-1], 1).bernoulli_(keep).div_(keep)
        return branch

    def _hooked_forward(self, x: torch.Tensor, rope, attn: _AttnPlan, cache: KVCache | None, hooks: Hooks):
        """`forward` with the block's hook points (TransformerLens names) on the residual stream and its parts."""
        p = self.hook_prefix
        x = _fire(hooks, p + "hook_resid_pre", x)
        a, weights = self.attn(_fire(hooks, p + "ln1.hook_normalized", self.attn_norm(x)), rope, attn, cache, hooks)
        a = _fire(hooks, p + "hook_attn_out", self._regularise(a) if self.training else a)
        x = _fire(hooks, p + "hook_resid_mid", x + a)
        m = self.mlp(_fire(hooks, p + "ln2.hook_normalized", self.mlp_norm(x)), hooks)
        m = _fire(hooks, p + "hook_mlp_out", self._regularise(m) if self.training else m)
        return _fire(hooks, p + "hook_resid_post", x + m), weights


AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _AttnPlan:
    """How a layer of one forward pass attends: SDPA's causal flag, a boolean mask, a custom function, or
    block-sparse attention (`sparse(q, k, v, dropout_p)` after RoPE and the cache)."""

    mask: torch.Tensor | None
    is_causal: bool
    eager: bool
    custom: AttentionFn | None = None
    sparse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None


class Transformer(nn.Module):
    """A decoder-only transformer configured by a `ModelConfig`.

    `model(input_ids)` gives logits [B, T, V]. `positions` ([T] or [B, T]) set RoPE / learned
    positions; `mask` (a `decoderlab.masks.Mask`) says which key slots each query slot sees; `cache`
    (a `KVCache`) holds earlier slots, so the new tokens occupy slots cache.length .. +T-1.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # End ids and sampling defaults for `generate` (`load` reads a checkpoint's generation_config.json).
        self.generation_config = GenerationConfig.from_model_config(config)
        # Set while `decoderlab.interp` hooks are active; None (the fast path) otherwise.
        self.hooks: Hooks | None = None
        # {"bits", "group_size", "lm_head"} once `quantize`d; None for float weights.
        self.quantization: dict | None = None
        # "auto" | "dense" | "flex" | "blocks" for masks other than plain causal (`accel.flex.choose_attention`);
        # None reads DECODERLAB_ATTENTION, else "auto".
        self.attention_backend: str | None = None
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = (nn.Embedding(config.context_length, config.d_model)
                          if config.positions == "learned" else None)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = _norm(config, config.d_model)
        self.future_heads = nn.ModuleList(FutureHead(config) for _ in range(config.n_future))
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", torch.empty(config.dim_head // 2), persistent=False)
        self.tie_weights()
        if self.embed.weight.device.type != "meta":
            self.reset_buffers()
            self.apply(self._init_weights)
            # Residual projections scaled down with depth (GPT-2), so the stream's variance stays put.
            for name, p in self.named_parameters():
                if name.endswith(("attn.out.weight", "mlp.down.weight")):
                    nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after loading onto a model built on the meta device)."""
        device = self.embed.weight.device
        self.rope_inv_freq = rope_inv_freq(self.config).to(device)

    def pack(self, batch_size: int = 1) -> Transformer:
        """Keep every linear layer's weight in oneDNN's packed layout for CPU inference: decoding runs 1.3-2x
        as fast, by CPU (benchmarks/decode_speed.py). `load` does this for a checkpoint on the CPU; calling it
        again is cheap (it packs what `train()`, an edit or `unpack` left plain).

        The packed copy is the only one held: each plain weight's storage is released where nothing else holds
        the weight (a variable, an optimizer, autograd), and anything that reads a weight through the model
        (`parameters()`, attribute access, `.to()` another dtype or device, `load_state_dict`, copies, a forward
        with gradients) gets it back first, unpacked bit for bit (gpt2: under 0.1 s), the packed copy kept.
        `state_dict()` and `save` read unpacked copies and leave the model packed. A tied LM head keeps its
        plain weight (the embedding's). A weight changed afterwards is used unpacked until `pack` is called
        again. Off the CPU, in a dtype this CPU's oneDNN does not pack (fp32 and bf16; bf16 needs AVX-512), for
        fp32 models small enough to stay in the CPU's caches, or where packing would take more than half the
        available memory, it does nothing. `batch_size` is the batch the layout is tuned for.
        """
        return pack_model(self, batch_size)

    def unpack(self) -> Transformer:
        """Plain weights everywhere, packed copies dropped (`pack` undone); quantized layers keep their weights
        dequantized (`quantize` undone, its rounding kept)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.unpack()
        self.quantization = None
        return self

    def quantize(self, quantize: str = "int8", group_size: int = DEFAULT_GROUP_SIZE,
                 lm_head: bool = True) -> Transformer:
        """Weight-only quantization for CPU inference (`accel.quantize_model`): every linear layer's weight held
        as int8 per output channel or int4 in groups of `group_size` inputs, the LM head too unless `lm_head` is
        False; activations stay in the model's dtype. `quantization` then describes it; `unpack` undoes it."""
        return quantize_model(self, quantize, group_size, lm_head)

    def train(self, mode: bool = True) -> Transformer:
        """Training mode. It unpacks packed weights (`unpack`): training changes them; `pack` again after.
        Frozen quantized layers stay quantized (QLoRA: adapters trained on an int8/int4 base)."""
        if mode:
            kept = False
            for module in self.modules():
                if isinstance(module, Linear):
                    if module.quantized is not None and module.frozen:
                        kept = True
                    else:
                        module.unpack()
            if not kept:
                self.quantization = None
        return super().train(mode)

    def requires_grad_(self, requires_grad: bool = True) -> Transformer:
        # A flag, not a read of the weights: packed layers stay packed (parameters() would unpack them).
        for p in stored_parameters(self):
            p.requires_grad_(requires_grad)
        return self

    def num_params(self, include_embeddings: bool = True) -> int:
        seen, total = set(), 0
        for module_name, module in self.named_modules():
            # The stored table, not named_parameters(): counting must not unpack packed weights.
            for name, p in dict.items(module._parameters):
                full = f"{module_name}.{name}" if module_name else name
                if p is None or id(p) in seen or (
                        not include_embeddings and full.startswith(("embed.", "pos_embed.", "lm_head."))):
                    continue
                seen.add(id(p))
                total += p.numel()
        return total

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch_size: int, max_length: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache on this model's device, in its dtype unless told."""
        return KVCache(self.config, batch_size, max_length, device=self.device, dtype=dtype or self.dtype)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor | None = None,
                mask: masks.Mask | torch.Tensor | None = None, cache: KVCache | None = None, *,
                hidden_states: bool = False, attentions: bool = False, future: bool = False,
                logits_to_keep: int | torch.Tensor = 0,
                edit_residual: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                attention: AttentionFn | None = None, start_at_layer: int = 0,
                residual: torch.Tensor | None = None) -> torch.Tensor | ModelOutput:
        """Logits [B, T, V] for `input_ids` [B, T]; a `ModelOutput` if hidden states, attentions or the
        future heads' logits (`future=True`) are asked for.

        `mask` is a `masks.Mask`, or the boolean tensor [B or 1, 1, T, cache.length + T] it materialises to
        (for loops that build one pattern once and reuse it). A cache in static mode (`cache.write_slots` set)
        needs `positions` and a tensor mask over all `cache.max_length` slots, and its `length` is left to the
        caller: every step then has the same shapes (`generate(..., compile=True)`). The model adds each layer's
        sliding window (`config.layer_windows`) to any mask it is given, tensor masks included.
        `logits_to_keep=n` computes logits for the last n positions only (generation needs one); a boolean
        [B, T] tensor computes them at its True positions only, returned as [N, V] in row-major order (a loss on
        some tokens, e.g. fine-tuning's responses, skips the LM head and its softmax everywhere else).
        `edit_residual(layer, x)` may return a changed residual stream [B, T, d] before block `layer` runs
        (token prepending, steering, patching); it is called once per block.
        `attention(layer, q, k, v)` replaces every layer's attention: it gets the queries [B, H, T, D] and
        keys and values [B, H_kv, T, D] before RoPE (after QK-norm) and returns the mixed values [B, H, T, D].
        It owns RoPE, masking and any cache (`mask` and `cache` must then be None; `positions` only feed learned
        position embeddings); PINE (`decoderlab.pine`) is one.
        `start_at_layer=k` with `residual` [B, T, d] runs blocks k.. on that residual stream (block k's
        `hook_resid_pre`) instead of embedding `input_ids`: an intervention that leaves layers < k alone
        reruns only the rest (TransformerLens' `start_at_layer`). `input_ids` may then be None; skipped layers
        appear as None in `hidden_states` and `attentions`.
        """
        if residual is not None:
            if residual.dim() != 3 or residual.shape[-1] != self.config.d_model:
                raise UserError(f"residual must be [batch, time, {self.config.d_model}], got shape "
                                f"{tuple(residual.shape)}")
            if cache is not None:
                raise UserError("start_at_layer skips blocks, so it cannot fill a KV cache: pass cache=None")
            if not 0 <= start_at_layer <= len(self.blocks):
                raise UserError(f"start_at_layer must be in 0..{len(self.blocks)}, got {start_at_layer}")
            if input_ids is not None and tuple(input_ids.shape) != tuple(residual.shape[:2]):
                raise UserError(f"input_ids {tuple(input_ids.shape)} and residual {tuple(residual.shape[:2])} "
                                "disagree on [batch, time]")
            B, T = residual.shape[:2]
            device = residual.device
        elif start_at_layer:
            raise UserError("start_at_layer needs the residual stream before that layer: pass residual=")
        elif input_ids.dim() != 2:
            raise UserError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        else:
            B, T = input_ids.shape
            device = input_ids.device
        static = cache is not None and cache.write_slots is not None
        past = cache.length if cache is not None and not static else 0
        ctx = self.config.context_length
        if static and (positions is None or not isinstance(mask, torch.Tensor)):
            raise UserError("a KV cache with write_slots set (static mode) needs explicit positions and a bool "
                            "tensor mask over all of its slots")
        if positions is None:
            if self.pos_embed is not None and past + T > ctx:
                raise UserError(f"{past + T} tokens exceed the context length {ctx} of this model's "
                                "learned position embeddings; shorten the input")
            positions = torch.arange(past, past + T, device=device)
        elif positions.shape[-1] != T:
            raise UserError(f"positions has length {positions.shape[-1]} but input_ids has {T} tokens")
        elif (self.pos_embed is not None and not torch.compiler.is_compiling()
              and not bool(((positions >= 0) & (positions < ctx)).all())):
            raise UserError(f"positions must lie in [0, {ctx}) for learned position embeddings")
        hooks = self.hooks
        if residual is not None:
            x = residual
        else:
            x = _fire(hooks, "hook_embed", self.embed(input_ids))
            if self.pos_embed is not None:
                pos = self.pos_embed(positions)
                x = x + (pos if hooks is None else _fire(hooks, "hook_pos_embed", pos.expand_as(x)))
            if self.config.dropout and self.training:
                x = F.dropout(x, self.config.dropout)
        if attention is not None:
            if mask is not None or cache is not None or attentions:
                raise UserError("a custom attention function owns masking and caching: pass no mask, cache "
                                "or attentions=True with it")
            rope, plans = None, [_AttnPlan(None, False, False, attention)] * len(self.blocks)
        else:
            rope = self._rope(positions, x.dtype) if self.config.positions == "rope" else None
            plans = self._attention_plans(mask, B, T, past, device, eager=attentions,
                                          static=cache if static else None, hooks=hooks)

        all_hidden = [None] * start_at_layer if hidden_states else None
        all_attn = [None] * start_at_layer if attentions else None
        for i in range(start_at_layer, len(self.blocks)):
            block = self.blocks[i]
            if edit_residual is not None:
                x = edit_residual(i, x)
            if all_hidden is not None:
                all_hidden.append(x)
            x, weights = block(x, rope, plans[i], cache, hooks)
            if all_attn is not None:
                all_attn.append(weights)
        if cache is not None and not static:
            cache.advance(T)
        if all_hidden is not None:
            all_hidden.append(self.final_norm(x))
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        trunk = x
        x = _fire(hooks, "ln_final.hook_normalized", self.final_norm(x))
        logits = self.unembed(x)
        future_logits = None
        if future:
            future_logits = [self.unembed(self.final_norm(head(trunk))) for head in self.future_heads]
        if hidden_states or attentions or future:
            return ModelOutput(logits, all_hidden, all_attn, future_logits)
        return logits

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from normalised hidden states (the LM head, then the soft-cap if configured)."""
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.unsqueeze(0) if positions.dim() == 1 else positions
        cos, signed_sin = rope_angles(pos, self.rope_inv_freq, dtype)
        return cos.unsqueeze(1), signed_sin.unsqueeze(1)  # [B, 1, T, D]

    def _attention_plans(self, mask: masks.Mask | torch.Tensor | None, B: int, T: int, past: int,
                         device: torch.device, eager: bool, static: KVCache | None = None,
                         hooks: Hooks | None = None) -> list[_AttnPlan]:
        """Each layer's plan: the one mask, and `& window(w)` in the layers with a sliding window w.

        Layers that share a window share a plan, so a model without windows builds one (Qwen2's mixed models
        build two). `static` is a cache in static mode: its `write_slots` are the query slots. Layers whose
        attention scores or pattern a hook wants run the written-out attention; the others keep SDPA.
        """
        # Measured on CPU: for bf16 training at short contexts the written-out attention's backward is
        # 2-4x faster than SDPA's flash kernel (benchmarks/README.md); longer contexts favour the kernel.
        eager = eager or (torch.is_grad_enabled() and device.type == "cpu" and past + T <= 256
                          and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        windows = self.config.layer_windows
        kinds = [(w, eager or (hooks is not None and any(hooks.wants(f"blocks.{i}.{site}") for site in EAGER_HOOKS)))
                 for i, w in enumerate(windows)]
        plans = {kind: self._attention_plan(mask, kind[0], B, T, past, device, kind[1], static) for kind in set(kinds)}
        return [plans[kind] for kind in kinds]

    def _attention_plan(self, mask: masks.Mask | torch.Tensor | None, window: int | None, B: int, T: int,
                        past: int, device: torch.device, eager: bool, static: KVCache | None) -> _AttnPlan:
        def slots() -> tuple[torch.Tensor, torch.Tensor]:
            return torch.arange(past, past + T, device=device), torch.arange(past + T, device=device)

        if isinstance(mask, torch.Tensor):  # already materialised (hot loops that reuse one pattern)
            keys = static.max_length if static is not None else past + T
            if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, T, keys) or (
                    mask.shape[0] not in (1, B)):
                raise UserError(f"a tensor mask must be bool [B or 1, 1, {T}, {keys}] (queries x cache slots), "
                                f"got {str(mask.dtype).removeprefix('torch.')} {list(mask.shape)}")
            dense = mask
            if window is not None and static is not None:
                # A static cache's query slots are a tensor (inside a compiled graph): the window always applies.
                key_slots = torch.arange(keys, device=device)
                dense = dense & masks.window(window).materialize(static.write_slots, key_slots, device=device)
            elif window is not None and past + T > window:
                dense = dense & masks.window(window).materialize(*slots(), device=device)
        else:
            if mask is None:
                if self.config.bidirectional and window is None:
                    return _AttnPlan(None, False, eager)  # every slot sees every slot: no mask at all
                mask = masks.full() if self.config.bidirectional else masks.causal()
            if window is not None and past + T > window:
                mask = mask & masks.window(window)
            if mask.is_causal:
                if T == 1:  # one new token sees every cached slot
                    return _AttnPlan(None, False, eager)
                if past == 0 and not eager:
                    return _AttnPlan(None, True, eager)
            if not eager and static is None:
                plan = self._block_sparse_plan(mask, T, past, device)
                if plan is not None:
                    return plan
            dense = mask.materialize(*slots(), batch_size=B, device=device)
        # A query that may see nothing (a padding row) would give NaN; let it see everything instead.
        # Its output is garbage either way and is never used.
        dense = dense | ~dense.any(dim=-1, keepdim=True)
        return _AttnPlan(dense, False, eager)

    def _block_sparse_plan(self, mask: masks.Mask, T: int, past: int, device: torch.device) -> _AttnPlan | None:
        """Block-sparse attention over `mask` where `accel.flex.choose_attention` says it beats the dense mask;
        None keeps the dense mask."""
        backend = block_sparse.attention_backend(self.attention_backend)
        if backend == "auto" and torch.compiler.is_compiling():
            return None  # building a block mask needs data-dependent sizes: it would break the graph
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.dtype
        backward = torch.is_grad_enabled()
        if not block_sparse.wants_block_mask(device, past + T, dtype, backward, backend):
            return None
        block_mask = block_sparse.to_block_mask(mask, None, T, past + T, device, q_offset=past)
        choice = block_sparse.choose_attention(device, T, past + T, block_sparse.block_density(block_mask), dtype,
                                               backward, backend)
        if choice == "flex":
            if device.type == "cpu" and torch.is_grad_enabled():
                raise UserError("attention backend 'flex' has no backward on CPU (torch's FlexAttention): use "
                                "'blocks' or 'auto' to train, or run under torch.no_grad()")
            if self.config.dropout and self.training:
                return None  # FlexAttention has no dropout: the dense mask keeps training faithful

            def sparse(q, k, v, dropout_p):
                return block_sparse.flex_attention(q, k, v, block_mask)
        elif choice == "blocks":
            def sparse(q, k, v, dropout_p):
                return block_sparse.block_sparse_attention(q, k, v, mask, block_mask, past, dropout_p)
        else:
            return None
        return _AttnPlan(None, False, False, sparse=sparse)
