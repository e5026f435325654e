"""Hook points and activation caches: values equal transformers' hidden states and eager attentions, hooks
replace what they return, caches keep only what is asked, and the residual decompositions add up."""

from __future__ import annotations

import pytest
import torch

import decoderlab
from decoderlab import interp, masks
from decoderlab.errors import UserError

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _padded_batch(vocab: int):
    lengths = [11, 4, 8]
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=torch.Generator().manual_seed(5))
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, T - n:] = True
    ids = ids.masked_fill(~valid, 0)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return ids, valid, positions


@pytest.mark.parametrize("case", ["gpt2", "llama", "qwen2", "qwen2-window-mixed"])
def test_cached_values_equal_transformers_on_a_left_padded_batch(hf_folder, case):
    folder = hf_folder(case)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    model = decoderlab.load(folder)
    ids, valid, positions = _padded_batch(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=valid.long(), position_ids=positions,
                       output_hidden_states=True, output_attentions=True)
    logits, cache = interp.run_with_cache(model, ids, positions=positions,
                                          mask=masks.causal() & masks.padding(valid))
    assert len(cache) == len(interp.hook_names(model))
    n = model.config.n_layers
    assert (logits - expected.logits)[valid].abs().max() <= TOL
    for layer in range(n):
        assert (cache["resid_pre", layer] - expected.hidden_states[layer])[valid].abs().max() <= TOL
        if layer < n - 1:  # transformers' last hidden state is after the final norm
            assert (cache["resid_post", layer] - expected.hidden_states[layer + 1])[valid].abs().max() <= TOL
        pattern = cache["pattern", layer]  # [B, H, Tq, Tk]
        assert pattern.shape == expected.attentions[layer].shape
        assert (pattern - expected.attentions[layer]).transpose(1, 2)[valid].abs().max() <= TOL
    assert (cache["ln_final.hook_normalized"] - expected.hidden_states[-1])[valid].abs().max() <= TOL
    heads, kv = model.config.n_heads, model.config.kv_heads
    assert cache["q", 0].shape == (3, ids.shape[1], heads, model.config.dim_head)
    assert cache["k", 0].shape == cache["v", 0].shape == (3, ids.shape[1], kv, model.config.dim_head)


def test_every_point_read_changes_nothing_and_no_hooks_cost_nothing():
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                                                          n_kv_heads=2, context_length=64)).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        plain = model(ids)
    with interp.hooks(model, [(lambda name: True, lambda x, hook: None)]):
        assert model.hooks is not None
        with torch.no_grad():
            hooked = model(ids)
    assert model.hooks is None
    assert (hooked - plain).abs().max() <= 1e-5


def test_a_hook_replaces_the_value_and_patching_clean_into_clean_is_a_no_op(hf_folder):
    model = decoderlab.load(hf_folder("llama"))
    clean = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    corrupt[0, 2] = (corrupt[0, 2] + 7) % 100
    clean_logits, clean_cache = interp.run_with_cache(model, clean)
    corrupt_logits, corrupt_cache = interp.run_with_cache(model, corrupt)
    assert (clean_logits - corrupt_logits).abs().max() > 1e-3
    for name in interp.hook_names(model):
        out = interp.run_with_hooks(model, clean, {name: lambda x, hook: clean_cache[hook.name]})
        assert (out - clean_logits).abs().max() <= 1e-5, name
    # Every block's output taken from the corrupted run gives the corrupted output.
    last = f"blocks.{model.config.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        out = interp.run_with_hooks(model, clean, {last: lambda x, hook: corrupt_cache[hook.name]})
    assert (out - corrupt_logits).abs().max() <= 1e-5
    # Zeroing one head's values at one position changes the logits after it, not before.
    def zero_head(v, hook):
        v = v.clone()
        v[:, 4, 0] = 0
        return v
    with torch.no_grad():
        out = interp.run_with_hooks(model, clean, {"blocks.0.attn.hook_v": zero_head})
    assert (out[:, :4] - clean_logits[:, :4]).abs().max() <= 1e-5
    assert (out[:, 4:] - clean_logits[:, 4:]).abs().max() > 1e-4


def test_pattern_hooks_make_only_their_layer_eager(monkeypatch):
    from decoderlab import model as model_module
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4,
                                                          context_length=64)).eval()
    calls = []
    real = model_module._eager_attention
    monkeypatch.setattr(model_module, "_eager_attention", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    _, cache = interp.run_with_cache(model, torch.randint(0, 50, (1, 8)), names=["blocks.1.attn.hook_pattern"])
    assert calls == ["blocks.1.attn."]
    assert list(cache) == ["blocks.1.attn.hook_pattern"]
    _, cache = interp.run_with_cache(model, torch.randint(0, 50, (1, 8)), names=lambda n: "resid" in n,
                                     dtype=torch.bfloat16)
    assert len(calls) == 1 and all(v.dtype == torch.bfloat16 for v in cache.values.values())
    assert set(cache) == {f"blocks.{i}.hook_resid_{k}" for i in range(3) for k in ("pre", "mid", "post")}


def test_hook_result_and_the_residual_decompositions_add_up(hf_folder):
    model = decoderlab.load(hf_folder("gpt2"))  # LayerNorm with bias, learned positions, tied head
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    logits, cache = interp.run_with_cache(model, ids)
    n = model.config.n_layers
    for layer in range(n):
        bias = model.blocks[layer].attn.out.bias
        assert (cache["result", layer].sum(2) + bias - cache["attn_out", layer]).abs().max() <= 1e-5
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed"] + [f"{i}_{k}_out" for i in range(n) for k in ("attn", "mlp")]
    assert (parts.sum(0) - cache["resid_post", n - 1]).abs().max() <= 1e-5
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"] and acc.shape[0] == n + 1
    # Direct logit attribution: the components' shares plus the final norm's bias give the logit.
    target = ids[:, 1:].roll(1, dims=1)[:, :1].squeeze(1)  # one token per row
    shares = cache.logit_attrs(parts, target)  # [component, batch, pos]
    bias_term = model.lm_head.weight[target] @ model.final_norm.bias  # [batch]
    expected = logits.gather(-1, target[:, None, None].expand(-1, ids.shape[1], 1)).squeeze(-1)
    assert (shares.sum(0) + bias_term[:, None] - expected).abs().max() <= 1e-4
    heads = cache.stack_head_results(pos_slice=-1)
    assert heads.shape == (n * model.config.n_heads, 2, 1, model.config.d_model)


def test_recording_during_generate_keeps_each_step():
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                                                          context_length=64)).eval()
    prompt = torch.randint(0, 50, (1, 6))
    with interp.record(model, ["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"]) as rec:
        out = decoderlab.generate(model, prompt, max_new_tokens=5, temperature=0)
    new = out.sequences.shape[1] - prompt.shape[1] if hasattr(out, "sequences") else 5
    assert len(rec) >= new
    assert rec[0]["pattern", 1].shape[-2:] == (6, 6)
    assert rec[1]["pattern", 1].shape[-2] == 1
    assert rec.stacked("blocks.1.hook_resid_post").shape[1] == 6 + len(rec) - 1


def test_bad_hooks_are_one_line_errors():
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                                                          context_length=64)).eval()
    ids = torch.randint(0, 50, (1, 5))
    with pytest.raises(decoderlab.UserError, match="did you mean blocks.0.hook_resid_post"):
        interp.run_with_cache(model, ids, names=["blocks.0.hook_resid_pots"])
    with pytest.raises(decoderlab.UserError, match="blocks 0..1"):
        interp.run_with_cache(model, ids, names=["blocks.7.hook_resid_post"])
    with pytest.raises(decoderlab.UserError, match="returned"):
        interp.run_with_hooks(model, ids, {"hook_embed": lambda x, hook: x[:, :2]})
    assert model.hooks is None
    with pytest.raises(KeyError, match="not cached"):
        interp.run_with_cache(model, ids, names="hook_embed")[1]["resid_pre", 0]
    assert interp.act_name("normalized", 2, "ln2") == "blocks.2.ln2.hook_normalized"


def test_start_at_layer_reruns_only_the_later_blocks():
    """`model(None, start_at_layer=k, residual=resid_pre_k)` gives the full forward's logits and fires only the
    hooks of blocks k..; bad combinations are one-line errors."""
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=50, n_layers=3, n_heads=4, d_model=32,
                                                          context_length=16)).eval()
    ids = torch.randint(0, 50, (2, 7))
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(3)]
    with torch.no_grad():
        logits, cache = interp.run_with_cache(model, ids, names)
        for k in range(4):
            if k < 3:
                residual = cache[names[k]]
            else:  # past the last block: only the final norm and the unembedding run
                _, last = interp.run_with_cache(model, ids, "blocks.2.hook_resid_post")
                residual = last["blocks.2.hook_resid_post"]
            fired = []
            with interp.hooks(model, [(lambda n: n.endswith("hook_resid_pre"),
                                       lambda x, h, fired=fired: fired.append(h.name))]):
                out = model(None, start_at_layer=k, residual=residual)
            torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-5)
            assert fired == names[k:]
        with pytest.raises(UserError, match="residual="):
            model(ids, start_at_layer=1)
        with pytest.raises(UserError, match="KV cache"):
            model(None, start_at_layer=1, residual=cache[names[1]], cache=model.new_cache(2))
        with pytest.raises(UserError, match="disagree"):
            model(ids[:, :3], start_at_layer=1, residual=cache[names[1]])
        with pytest.raises(UserError, match="start_at_layer must be"):
            model(None, start_at_layer=4, residual=cache[names[1]])
