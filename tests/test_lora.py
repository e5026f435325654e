"""LoRA adapters: parity with PEFT both ways (files and logits), merging, freezing, training paths, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model

import decoderlab
from decoderlab import LoraConfig, apply_lora, load_adapter, lora_parameters, merge_lora, save_adapter
from decoderlab.errors import CheckpointError, UserError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# Every module kind of each family, so fused slices (q/k/v of qkv, gate/up of up) and GPT-2's Conv1D are covered.
ALL_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt2-untied-gelu": ["c_attn", "c_proj", "c_fc", "lm_head"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
}


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _randomize(params, seed: int = 3) -> None:
    """Nonzero B (fresh adapters are the identity, so a test with B = 0 could not fail)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    made = {}

    def build(case: str):
        if case not in made:
            folder = tmp_path_factory.mktemp(f"lora-base-{case}")
            make_hf_model(case).save_pretrained(folder)
            made[case] = folder
        return made[case]

    return build


def _hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("case", ["llama", "gpt2", "gpt2-untied-gelu", "qwen2"])
@pytest.mark.parametrize("targets", ["all", "default"])
def test_adapter_saved_by_decoderlab_loads_in_peft_with_same_logits(base, tmp_path, case, targets):
    folder = base(case)
    model = decoderlab.load(folder)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=ALL_TARGETS[case] if targets == "all" else None))
    _randomize(lora_parameters(model))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids)
        plain = _hf(folder)(ids).logits
        theirs = peft.PeftModel.from_pretrained(_hf(folder), tmp_path / "adapter")(ids).logits
    assert (theirs - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_adapter_file_layout_is_peft_s(base, tmp_path):
    from safetensors import safe_open

    model = apply_lora(decoderlab.load(base("llama")), LoraConfig(r=4))
    save_adapter(model, tmp_path / "ours", base_model_name_or_path=str(base("llama")))
    hf = peft.get_peft_model(_hf(base("llama")), peft.LoraConfig(r=4, lora_alpha=16))
    hf.save_pretrained(tmp_path / "peft")
    files = [safe_open(str(tmp_path / d / "adapter_model.safetensors"), "pt") for d in ("ours", "peft")]
    assert set(files[0].keys()) == set(files[1].keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in files[0].keys()
    for key in files[1].keys():
        assert files[0].get_tensor(key).shape == files[1].get_tensor(key).shape
    assert files[0].metadata() == files[1].metadata()
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ours:
        if key not in ("task_type", "inference_mode", "target_modules"):
            assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


def test_fresh_adapter_initialised_as_peft_and_changes_nothing(base):
    model = decoderlab.load(base("llama"))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, LoraConfig(r=8, alpha=16))
    adapter = model.blocks[0].attn.qkv.lora_adapters[0]
    assert adapter.name == "model.layers.0.self_attn.q_proj"
    assert torch.count_nonzero(adapter.B) == 0
    bound = 1 / adapter.A.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert adapter.A.abs().max() <= bound and adapter.A.std() > bound / 3
    assert adapter.scaling == 2.0
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_adapter_made_by_peft_loads_in_decoderlab_with_same_logits(base, tmp_path, case):
    folder = base(case)
    targets = ALL_TARGETS[case]
    hf = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets))
    _randomize([p for n, p in hf.named_parameters() if "lora_" in n])
    hf.save_pretrained(tmp_path / "adapter")
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = decoderlab.load(folder, adapter=tmp_path / "adapter")(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_merged_folder_loads_in_transformers_with_peft_logits(base, tmp_path, case):
    folder = base(case)
    targets = [t for t in ALL_TARGETS[case] if t != "lm_head"]
    hf = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize([p for n, p in hf.named_parameters() if "lora_" in n], seed=5)
    hf.save_pretrained(tmp_path / "adapter")
    model = merge_lora(decoderlab.load(folder, adapter=tmp_path / "adapter"))
    decoderlab.save(model, tmp_path / "merged")
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        theirs = hf(ids).logits
        merged = _hf(tmp_path / "merged")(ids).logits
        ours = model(ids)
    torch.testing.assert_close(merged, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_apply_lora_freezes_the_base(base):
    model = decoderlab.load(base("llama"))
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    model.train()
    _randomize(lora_parameters(model))
    ids = _ids(model.config.vocab_size)
    model(ids).logsumexp(-1).mean().backward()
    trainable = {id(p) for p in lora_parameters(model)}
    assert len(trainable) == 2 * 2 * 2  # (q, up) x 2 layers x (A, B)
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_training_steps_match_peft(base):
    """Same adapter, same data: one AdamW step each gives the same adapter and loss (autograd through both)."""
    folder = base("llama")
    ids = _ids(101, seed=7)
    model = apply_lora(decoderlab.load(folder).train(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    _randomize(lora_parameters(model))
    hf = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=4, lora_alpha=16,
                                                          target_modules=["q_proj", "v_proj", "o_proj"]))
    ours_sites = {a.name: a for layer in model.modules() if hasattr(layer, "lora_adapters")
                  for a in layer.lora_adapters}
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_" in n:
                site = n.removeprefix("base_model.model.").split(".lora_")[0]
                p.copy_(getattr(ours_sites[site], "A" if ".lora_A." in n else "B"))
    losses = []
    for m, params in ((model, lora_parameters(model)), (hf, [p for p in hf.parameters() if p.requires_grad])):
        opt = torch.optim.AdamW(params, lr=1e-2)
        logits = m(ids) if m is model else m(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for n, p in hf.named_parameters():
        if "lora_" in n:
            site = n.removeprefix("base_model.model.").split(".lora_")[0]
            torch.testing.assert_close(getattr(ours_sites[site], "A" if ".lora_A." in n else "B"), p,
                                       atol=1e-5, rtol=0)


def test_bf16_autocast_training_and_cached_generation(base):
    model = apply_lora(decoderlab.load(base("qwen2")), LoraConfig(r=4, target_modules=["q_proj", "k_proj",
                                                                                        "v_proj", "up_proj"]))
    model.train()
    ids = _ids(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(model))
    _randomize(lora_parameters(model))
    model.eval().pack()
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        stepped = torch.cat([model(ids[:, :6], cache=cache), model(ids[:, 6:], cache=cache)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=0)
    out = decoderlab.generate(model, [ids[0].tolist()], max_new_tokens=5, temperature=0)
    assert len(out.tokens[0]) == 5


def test_packed_base_keeps_adapter(base):
    folder = base("llama")
    model = apply_lora(decoderlab.load(folder, pack=False), LoraConfig(r=4))
    _randomize(lora_parameters(model))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids)
        model.pack()
        torch.testing.assert_close(model(ids), plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_qlora_on_a_quantized_base(base, bits):
    """Adapters train on an int8/int4 base: gradients equal those on the dequantized float base, weights stay int."""
    folder = base("llama3-scaled")
    # The LM head stays float: it is tied to the embedding here, which unpacking a quantized head would change.
    quantized = decoderlab.load(folder, pack=False).quantize(bits, 32, lm_head=False)
    reference = decoderlab.load(folder, pack=False).quantize(bits, 32, lm_head=False).unpack()  # same rounding
    grads = []
    for model in (quantized, reference):
        apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        _randomize(lora_parameters(model))
        model.train()
        ids = _ids(model.config.vocab_size)
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad for p in lora_parameters(model)])
    # Still int after training: no float copy of a weight was brought back (frozen layers stay quantized).
    assert quantized.quantization is not None
    layers = (quantized.blocks[0].attn.qkv, quantized.blocks[1].mlp.up)
    assert all(m.quantized is not None and m.released for m in layers)
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-3)
    with pytest.raises(UserError, match="quantized"):
        merge_lora(quantized)


def test_native_model_adapter_roundtrip(tmp_path):
    config = decoderlab.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, context_length=32)
    model = decoderlab.Transformer(config).eval()
    decoderlab.save(model, tmp_path / "base")
    apply_lora(model, LoraConfig(r=2, target_modules=["qkv", "down"]))
    _randomize(lora_parameters(model))
    save_adapter(model, tmp_path / "adapter")
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert keys == ["down", "qkv"]
    ids = _ids(50)
    again = decoderlab.load(tmp_path / "base", adapter=tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=1e-5, rtol=0)
        expected = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)


def test_regex_targets(base, tmp_path):
    model = apply_lora(decoderlab.load(base("llama")),
                       LoraConfig(r=2, target_modules=[r".*layers\.1\.self_attn\.[qk]_proj"]))
    assert [a.name for a in model.blocks[1].attn.qkv.lora_adapters] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert not hasattr(model.blocks[0].attn.qkv, "lora_adapters")
    save_adapter(model, tmp_path / "a")  # PEFT reads list entries as names: the file lists the modules in full
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


def test_errors_are_one_line(base, tmp_path):
    model = decoderlab.load(base("llama"))
    with pytest.raises(UserError) as e:
        apply_lora(model, LoraConfig(target_modules=["q_prj"]))
    assert "\n" not in str(e.value) and "q_proj" in str(e.value) and "'q_prj'" in str(e.value)
    with pytest.raises(UserError, match="bias"):
        LoraConfig(bias="all")
    gpt2 = apply_lora(decoderlab.load(base("gpt2")), LoraConfig(r=2))
    save_adapter(gpt2, tmp_path / "gpt2-adapter")
    with pytest.raises(CheckpointError, match="another model") as e:
        load_adapter(model, tmp_path / "gpt2-adapter")
    assert "\n" not in str(e.value)
    apply_lora(model, LoraConfig(r=2))
    with pytest.raises(UserError, match="merge"):
        decoderlab.save(model, tmp_path / "x")
    with pytest.raises(UserError, match="already"):
        apply_lora(model, LoraConfig(r=2))
    other = decoderlab.load(base("llama"))
    apply_lora(other, LoraConfig(r=3))
    save_adapter(other, tmp_path / "r3")
    cfg = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    (tmp_path / "r3" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(CheckpointError, match="shape") as e:
        load_adapter(decoderlab.load(base("llama")), tmp_path / "r3")
    assert "\n" not in str(e.value)
    (tmp_path / "r3" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        load_adapter(decoderlab.load(base("llama")), tmp_path / "r3")


def test_cli_lora_merge(base, tmp_path):
    folder = base("llama")
    model = apply_lora(decoderlab.load(folder), LoraConfig(r=2))
    _randomize(lora_parameters(model))
    save_adapter(model, tmp_path / "adapter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "decoderlab", "lora", "merge"]
    run = subprocess.run([*cmd, str(folder), str(tmp_path / "adapter"), str(folder)], capture_output=True,
                         text=True, env=env)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "error:" in run.stderr
    run = subprocess.run([*cmd, str(folder), str(tmp_path / "adapter"), str(tmp_path / "merged")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    ids = _ids(101)
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "merged")(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_hooks_see_the_adapted_model(base):
    from decoderlab import interp

    model = apply_lora(decoderlab.load(base("llama")), LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    _randomize(lora_parameters(model))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids)
        logits, cache = interp.run_with_cache(model, ids, names=lambda n: n.endswith("attn_out"))
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="merge"), torch.no_grad():  # per-head results would leave out o_proj's adapter
        interp.run_with_cache(model, ids, names=lambda n: n.endswith("hook_result"))
