"""Shared fixtures: tiny random Hugging Face models of each supported family, saved to local folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

# Each case: (family, transformers config class name, config kwargs). Shapes are tiny but exercise
# GQA (fewer KV heads than heads), biases where the family has them, tied and untied embeddings,
# explicit head_dim and Llama-3 RoPE scaling.
HF_CASES = {
    "gpt2": ("GPT2Config", dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)),
    "gpt2-untied-gelu": ("GPT2Config", dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                            n_inner=48, activation_function="gelu", resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                            bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True,
                                  mlp_bias=True, rope_theta=500000.0)),
    "llama3-scaled": ("LlamaConfig", dict(vocab_size=101, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                           "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", dict(vocab_size=103, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(vocab_size=99, hidden_size=64, intermediate_size=112,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
                                      sliding_window=None)),
    "mistral-window": ("MistralConfig", dict(vocab_size=99, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                             max_position_embeddings=128, sliding_window=7)),
    # Qwen2 with a window of 5 in layers 1 and 2 (max_window_layers=1) and full attention in layer 0.
    "qwen2-window-mixed": ("Qwen2Config", dict(vocab_size=103, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, use_sliding_window=True,
                                               sliding_window=5, max_window_layers=1)),
    # Qwen2 with explicit layer_types, sliding in every layer.
    "qwen2-window-all": ("Qwen2Config", dict(vocab_size=103, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=128, use_sliding_window=True,
                                             sliding_window=6, layer_types=["sliding_attention"] * 2)),
}
HF_MODEL_CLASS = {"GPT2Config": "GPT2LMHeadModel", "LlamaConfig": "LlamaForCausalLM",
                  "Qwen2Config": "Qwen2ForCausalLM", "MistralConfig": "MistralForCausalLM"}


def make_hf_model(case: str, seed: int = 0, **overrides):
    """A transformers model of `case` (its config kwargs updated by `overrides`) with every weight (norms and
    biases too) randomised."""
    import transformers

    config_cls, kwargs = HF_CASES[case]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, HF_MODEL_CLASS[config_cls])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """Factory: (case, sharded) -> a folder written by transformers' save_pretrained."""
    made: dict[tuple[str, bool], Path] = {}

    def build(case: str, sharded: bool = False) -> Path:
        if (case, sharded) not in made:
            folder = tmp_path_factory.mktemp(f"hf-{case}-{'sharded' if sharded else 'single'}")
            model = make_hf_model(case)
            model.save_pretrained(folder, max_shard_size="20KB" if sharded else "5GB")
            made[(case, sharded)] = folder
        return made[(case, sharded)]

    return build


@pytest.fixture(scope="session")
def choice_run(tmp_path_factory):
    """A run folder: a small char-level model trained by decoderlab on a task with options
    (`evaluate.max_number_task`: "max: 37 82 15 64 -> 82"), a fixed number of steps so it is reproducible."""
    import decoderlab
    from decoderlab import evaluate

    folder = tmp_path_factory.mktemp("choice-model")
    corpus = folder / "max.txt"
    corpus.write_text(evaluate.task_text(evaluate.max_number_task(20000, seed=1)))
    run = folder / "run"
    decoderlab.train(data=[str(corpus)], out=str(run), steps=80, context_length=64, sample_tokens=0,
                     progress=False, eval_batches=4)
    return run


@pytest.fixture(scope="session")
def choice_model(choice_run):
    """(model, tokenizer) of `choice_run`."""
    import decoderlab

    return decoderlab.load(choice_run), decoderlab.Tokenizer.from_folder(choice_run)


@pytest.fixture
def one_thread():
    """Hundreds or thousands of tiny forward passes: one thread is several times faster than a pool on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
