"""Logits parity with transformers: load HF folders, save folders transformers loads, padded batches."""

from __future__ import annotations

import pytest
import torch
from conftest import HF_CASES, make_hf_model

import decoderlab
from decoderlab import masks

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _hf_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits


def _hf_load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_load_matches_transformers(hf_folder, case, sharded):
    folder = hf_folder(case, sharded)
    ref = _hf_load(folder)
    ours = decoderlab.load(folder)
    assert ours.config.hf_family == ref.config.model_type
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    ids = torch.randint(0, ref.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(ref, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("case", list(HF_CASES))
def test_saved_folder_loads_in_transformers(hf_folder, tmp_path, case):
    ours = decoderlab.load(hf_folder(case))
    decoderlab.save(ours, tmp_path / "out")
    ref = _hf_load(tmp_path / "out")
    ids = torch.randint(0, ref.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(ref, ids)).abs().max().item() <= TOL
    again = decoderlab.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids), got)


@pytest.mark.parametrize("case", ["gpt2", "llama", "qwen2", "mistral", "mistral-window", "qwen2-window-mixed"])
def test_left_padded_batch_matches_transformers(hf_folder, case):
    folder = hf_folder(case)
    ref = _hf_load(folder)
    ours = decoderlab.load(folder)
    lengths = [13, 5, 9]
    T = max(lengths)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, ref.config.vocab_size, (len(lengths), T), generator=g)
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, T - n:] = True
    ids = ids.masked_fill(~valid, 0)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    expected = _hf_logits(ref, ids, attention_mask=valid.long(), position_ids=positions)
    with torch.no_grad():
        got = ours(ids, positions=positions, mask=masks.causal() & masks.padding(valid))
    assert (got - expected)[valid].abs().max().item() <= TOL
    # Each row alone, unpadded, gives the same logits as inside the padded batch.
    for row, n in enumerate(lengths):
        with torch.no_grad():
            alone = ours(ids[row:row + 1, T - n:])
        assert (alone[0] - got[row, T - n:]).abs().max().item() <= TOL


# bf16 parity, stated as three bounds over 4 x 37 random tokens (measured on the tiny HF_CASES models: at most
# 0.062, 1.16x and 96.6% agreement): the largest logit difference from transformers in bf16 is at most a tenth
# of the logits' standard deviation; our bf16 error against fp32 is at most 1.5x transformers' own; and the
# argmax token agrees on at least 90% of the positions (random tiny models have many near-ties).
BF16_MAX_DIFF_PER_STD, BF16_ERROR_RATIO, BF16_TOP1 = 0.1, 1.5, 0.9


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bf16_matches_transformers_bf16(hf_folder, case):
    folder = hf_folder(case)
    exact = _hf_load(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                            attn_implementation="eager").eval()
    ours = decoderlab.load(folder, dtype="bfloat16")
    ids = torch.randint(0, exact.config.vocab_size, (4, 37), generator=torch.Generator().manual_seed(9))
    truth = _hf_logits(exact, ids)
    theirs = _hf_logits(ref, ids).float()
    with torch.no_grad():
        got = ours(ids).float()
    std = truth.std()
    assert (got - theirs).abs().max() / std <= BF16_MAX_DIFF_PER_STD
    assert (got - truth).abs().max() <= BF16_ERROR_RATIO * (theirs - truth).abs().max()
    assert (got.argmax(-1) == theirs.argmax(-1)).float().mean() >= BF16_TOP1


def test_pytorch_bin_checkpoint(tmp_path, hf_folder):
    ref = _hf_load(hf_folder("llama"))
    state = ref.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_folder("llama") / "config.json").read_text())
    ours = decoderlab.load(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert (ours(ids) - _hf_logits(ref, ids)).abs().max().item() <= TOL


def test_load_dtype_and_no_extra_copies(hf_folder):
    ours = decoderlab.load(hf_folder("qwen2"), dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(p.is_meta for p in ours.parameters())
    assert ours.lm_head.weight is ours.embed.weight  # tied embeddings stay one tensor


# ---- Qwen2 sliding windows: use_sliding_window x max_window_layers x layer_types -------------------------

WINDOW = 5
MIXED = "qwen2-window-mixed"  # 3 layers
LAYER_SPECS = {
    "max_window_layers=0": dict(max_window_layers=0),
    "max_window_layers=1": dict(max_window_layers=1),
    "max_window_layers=n": dict(max_window_layers=3),
    "types-all-full": dict(layer_types=["full_attention"] * 3),
    "types-all-sliding": dict(layer_types=["sliding_attention"] * 3),
    "types-mixed": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def _qwen2_window_folder(folder, use_sliding_window: bool, spec: dict):
    """A Qwen2 folder as transformers writes it, then edited as hand-written config.json files are: the window
    stated even where use_sliding_window is false, and layer_types left out where max_window_layers decides."""
    import json

    ref = make_hf_model(MIXED, use_sliding_window=use_sliding_window, **{"layer_types": None, **spec})
    ref.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["sliding_window"] = WINDOW
    if "layer_types" not in spec:
        del data["layer_types"]
    path.write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("spec", list(LAYER_SPECS))
@pytest.mark.parametrize("use_sliding_window", [False, True],
                         ids=["use_sliding_window=false", "use_sliding_window=true"])
def test_qwen2_window_combinations_match_transformers(tmp_path, use_sliding_window, spec):
    folder = _qwen2_window_folder(tmp_path / "m", use_sliding_window, LAYER_SPECS[spec])
    if not use_sliding_window and "sliding_attention" in LAYER_SPECS[spec].get("layer_types", []):
        # Sliding layers without a window: transformers fails at the first forward; decoderlab refuses to load.
        with pytest.raises(decoderlab.ConfigError) as err:
            decoderlab.load(folder)
        assert "layer_types" in str(err.value) and "use_sliding_window is false" in str(err.value)
        assert "\n" not in str(err.value)
        return
    ref = _hf_load(folder)
    ours = decoderlab.load(folder)
    theirs = [layer.self_attn.sliding_window for layer in ref.model.layers]
    assert ours.config.layer_windows == theirs
    ids = torch.randint(0, ref.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(ref, ids)).abs().max().item() <= TOL


def test_qwen2_window_combinations_cover_each_kind():
    """The grid above is not vacuous: it holds all-full, all-sliding and mixed models, and windows that bite."""
    kinds = set()
    for use in (False, True):
        for spec in LAYER_SPECS.values():
            cfg = make_hf_model(MIXED, use_sliding_window=use, **{"layer_types": None, **spec}).config
            kinds.add(tuple(t == "sliding_attention" and cfg.sliding_window is not None for t in cfg.layer_types))
    assert {(False,) * 3, (True,) * 3, (False, True, True), (True, False, True)} <= kinds


def test_mixed_windows_with_cache_equal_full_forward(hf_folder):
    """Prefill, a chunk, then one token at a time through the KV cache: the logits of the full forward."""
    folder = hf_folder(MIXED)
    ref = _hf_load(folder)
    ours = decoderlab.load(folder)
    ids = torch.randint(0, ref.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 32)
        parts = [ours(ids[:, :7], cache=cache), ours(ids[:, 7:12], cache=cache)]
        parts += [ours(ids[:, t:t + 1], cache=cache) for t in range(12, 21)]
    stepped = torch.cat(parts, dim=1)
    assert (stepped - full).abs().max().item() <= 1e-5
    assert (full - _hf_logits(ref, ids)).abs().max().item() <= TOL


def test_mixed_windows_attentions_path_matches(hf_folder):
    """The eager path (attention probabilities returned) applies each layer's own window."""
    ours = decoderlab.load(hf_folder(MIXED))
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = ours(ids, attentions=True)
        plain = ours(ids)
    assert (out.logits - plain).abs().max().item() <= 1e-5
    query, key = torch.arange(12).view(-1, 1), torch.arange(12).view(1, -1)
    for layer, probs in enumerate(out.attentions):
        window = ours.config.layer_window(layer)
        allowed = (key <= query) & ((query - key < window) if window else True)
        assert torch.equal(probs[0].sum(0) > 0, allowed), layer


def test_mixed_windows_greedy_generation_matches_transformers(hf_folder):
    folder = hf_folder(MIXED)
    ref = _hf_load(folder)
    ours = decoderlab.load(folder)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, ref.config.vocab_size, (n,), generator=g).tolist() for n in (9, 3)]
    batch = decoderlab.generate(ours, prompts, 16, stop_tokens=[])  # ragged: left-padded inside
    for prompt, got in zip(prompts, batch.tokens, strict=True):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        assert got == expected


def test_per_layer_windows_save_and_load_in_transformers(tmp_path):
    """A decoderlab model whose sliding layers are not the top ones (only layer_types can say so)."""
    cfg = decoderlab.ModelConfig(vocab_size=50, n_layers=3, n_heads=4, n_kv_heads=2, d_model=32, d_mlp=40,
                                 context_length=64, norm="rmsnorm", positions="rope", activation="swiglu",
                                 bias_qkv=True, bias_attn_out=False, bias_mlp=False, tie_embeddings=False,
                                 sliding_window=4, sliding_layers=[0, 2], hf_family="qwen2")
    torch.manual_seed(0)
    ours = decoderlab.Transformer(cfg).eval()
    decoderlab.save(ours, tmp_path / "m")
    ref = _hf_load(tmp_path / "m")
    assert [layer.self_attn.sliding_window for layer in ref.model.layers] == [4, None, 4]
    ids = torch.randint(0, 50, (2, 15), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(ref, ids)).abs().max().item() <= TOL
    again = decoderlab.load(tmp_path / "m")
    assert again.config.layer_windows == [4, None, 4]
    with pytest.raises(decoderlab.ConfigError, match="does not fit the mistral family: sliding_layers"):
        cfg.replace(hf_family="mistral", bias_qkv=False).to_hf_config()
