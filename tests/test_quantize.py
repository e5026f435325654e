"""Weight-only int8/int4 quantization: the arithmetic, the kernels against dequantized matmuls, a quantized
model against its float original, generation through it, saved folders and bad input."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decoderlab
from decoderlab.accel import QuantizedWeight, kernel_available, kernels, quantized_layers
from decoderlab.errors import UserError
from decoderlab.generation import TokenRecycler, draft_decoder


def _model(seed: int = 0, **overrides) -> decoderlab.Transformer:
    torch.manual_seed(seed)
    fields = dict(vocab_size=120, n_layers=2, n_heads=4, d_model=64, d_mlp=128, context_length=64,
                  tie_embeddings=False)
    fields.update(overrides)
    return decoderlab.Transformer(decoderlab.ModelConfig(**fields)).eval()


def _kernel_reference(q: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """What `q.linear` computes for rows x [M, K]: the dequantized weight's product, except that our int4 kernel
    rounds the activations to int8 per block of 32 (the offsets multiply the unrounded sums)."""
    w = q.dequantize().float()
    if not q._own or q.bits == 8:
        return x @ w.t()
    xq = kernels.quantize_activations(x)
    offset = (q.zeros.float() - 8 * q.scales.float()).repeat_interleave(q.group_size, 1)
    return xq @ (w - offset).t() + x @ offset.t()


def test_kernels_exist_in_this_torch():
    # The fast path is torch's own CPU ops; if they vanish the fallback still computes, but say so here.
    assert kernel_available(8) and kernel_available(4)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16), scale=st.floats(1e-3, 10.0))
def test_round_trip_error_bounds(rows, groups, group_size, seed, scale):
    w = torch.randn(rows, groups * group_size, generator=torch.Generator().manual_seed(seed)) * scale
    q8 = QuantizedWeight.from_float(w, 8)
    # Symmetric per row: at most half a step, step = row's max |w| / 127.
    step8 = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q8.dequantize() - w).abs() <= step8 / 2 * (1 + 1e-4) + 1e-7).all()
    q4 = QuantizedWeight.from_float(w, 4, group_size)
    g = w.view(rows, groups, group_size)
    step4 = ((g.amax(2) - g.amin(2)) / 15).repeat_interleave(group_size, 1)
    assert ((q4.dequantize() - w).abs() <= step4 / 2 * (1 + 1e-3) + 1e-6).all()
    # Each group's extremes are exact up to rounding in the scale arithmetic.
    assert torch.allclose(q4.dequantize().view(rows, groups, group_size).amax(2), g.amax(2), atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,out_features", [(8, 50), (4, 48), (4, 50)])
def test_linear_equals_dequantized_matmul(bits, out_features, dtype):
    torch.manual_seed(1)
    w = torch.randn(out_features, 128).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    q = QuantizedWeight.from_float(w, bits, 32)
    x = torch.randn(3, 5, 128).to(dtype)
    got = q.linear(x, bias)
    assert q._own == kernels.available()  # our kernels here; torch's ops where they cannot build
    want = _kernel_reference(q, x.float().reshape(-1, 128)).view(3, 5, out_features) + bias.float()
    assert got.shape == (3, 5, out_features) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize("quantize,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_close_to_float(quantize, tol):
    model = _model()
    ids = torch.randint(0, 120, (2, 12))
    q = copy.deepcopy(model).quantize(quantize, group_size=32)
    with torch.inference_mode():
        ref, got = model(ids), q(ids)
    assert len(quantized_layers(q)) == 2 * 4 + 1  # qkv, out, up, down per block and the LM head
    assert q.blocks[0].attn.qkv.released  # one copy: the integers
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel < tol
    # The quantized forward is the float forward with the dequantized weights (int4 with our kernels: up to
    # rounding the activations to int8; test_kernels checks each product).
    plain = copy.deepcopy(q).unpack()
    assert plain.quantization is None and not quantized_layers(plain)
    with torch.inference_mode():
        dequantized = plain(ids)
    exact = quantize == "int8" or not kernels.available()
    assert ((dequantized - got).norm() / dequantized.norm()).item() < (1e-5 if exact else 0.02)


def test_greedy_generate_with_cache_and_batch_matches_uncached():
    model = _model().quantize("int4", 32)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    result = decoderlab.generate(model, prompts, max_new_tokens=10, temperature=0.0)
    for prompt, tokens in zip(prompts, result.tokens, strict=True):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(len(tokens)):  # full forward each step, no cache, batch 1
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert ids[len(prompt):] == tokens


def test_speculative_decoding_on_a_quantized_model():
    model = _model().quantize("int8")
    plain = decoderlab.generate(model, [[3, 1, 4]], 12, temperature=0.0).tokens
    recycled = TokenRecycler(model, n_nodes=15).generate([[3, 1, 4]], 12).tokens
    drafted = decoderlab.generate(model, [[3, 1, 4]], 12, temperature=0.0,
                                  decoder=draft_decoder(copy.deepcopy(model), k=3)).tokens
    assert recycled == plain == drafted


def test_save_load_round_trip_identical(tmp_path):
    for quantize in ("int8", "int4"):
        model = _model(tie_embeddings=True).quantize(quantize, 64)
        folder = decoderlab.save(model, tmp_path / quantize)
        again = decoderlab.load(folder)
        assert again.quantization == model.quantization
        ids = torch.randint(0, 120, (1, 9))
        with torch.inference_mode():
            assert torch.equal(model(ids), again(ids))
        # Integers on disk: int8 a byte a weight, int4 half of one.
        qkv = quantized_layers(again)["blocks.0.attn.qkv"]
        assert qkv.nbytes < 64 * 192 * (1.2 if quantize == "int8" else 0.7)


def test_load_quantize_option_and_pack_after(tmp_path):
    folder = decoderlab.save(_model(), tmp_path / "float")
    model = decoderlab.load(folder, quantize="int4", group_size=32).pack()
    assert model.quantization == {"bits": 4, "group_size": 32, "lm_head": True}
    qkv = model.blocks[0].attn.qkv
    assert qkv.quantized is not None and qkv.packed is None  # pack() leaves quantized layers alone
    decoderlab.save(model, tmp_path / "q")
    with pytest.raises(UserError, match="already quantized"):
        decoderlab.load(tmp_path / "q", quantize="int8")


def test_bad_input_one_line_errors():
    model = _model()
    with pytest.raises(UserError, match="'int8' or 'int4'") as e:
        model.quantize(3)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="group_size must be one of"):
        model.quantize("int4", group_size=48)
    odd = _model(d_mlp=96)
    with pytest.raises(UserError, match="group_size 64 does not divide blocks.0.mlp.down's 96 input features; "
                                        "use group_size 32") as e:
        odd.quantize("int4", group_size=64)
    assert not quantized_layers(odd)  # checked before anything changed


def test_cli_quantize_then_generate(tmp_path):
    from decoderlab import Tokenizer

    text = tmp_path / "text.txt"
    text.write_text("hello world, the quick brown fox")
    tok = Tokenizer.train_char(text)
    model = _model(vocab_size=tok.vocab_size)
    decoderlab.save(model, tmp_path / "float", tokenizer=tok)
    run = [sys.executable, "-m", "decoderlab"]
    done = subprocess.run([*run, "quantize", str(tmp_path / "float"), str(tmp_path / "q4"), "--bits", "4",
                           "--group-size", "32"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = subprocess.run([*run, "generate", str(tmp_path / "q4"), "the", "-n", "5", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = decoderlab.load(tmp_path / "q4")
    want = decoderlab.generate(loaded, [tok.encode("the")], 5, temperature=0.0).tokens[0]
    assert out.stdout.strip() == "the" + tok.decode(want)
    bad = subprocess.run([*run, "quantize", str(tmp_path / "float"), str(tmp_path / "x"), "--bits", "3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: quantize must be 'int8' or 'int4' (bits 8 or 4), not 3"]
    # The float folder is never overwritten in place, and another model folder only with --overwrite.
    before = (tmp_path / "float" / "model.safetensors").read_bytes()
    same = subprocess.run([*run, "quantize", str(tmp_path / "float"), str(tmp_path / "float")],
                          capture_output=True, text=True, timeout=120)
    assert same.returncode == 2 and "the model's own folder" in same.stderr and len(same.stderr.splitlines()) == 1
    assert (tmp_path / "float" / "model.safetensors").read_bytes() == before
    again = subprocess.run([*run, "quantize", str(tmp_path / "float"), str(tmp_path / "q4")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    forced = subprocess.run([*run, "quantize", str(tmp_path / "float"), str(tmp_path / "q4"), "--overwrite"],
                            capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert decoderlab.load(tmp_path / "q4").quantization["bits"] == 8


def test_compiled_decode_step_matches_eager():
    model = _model().quantize("int4", 32)
    prompts = [[1, 2, 3], [4, 5]]
    eager = decoderlab.generate(model, prompts, 6, temperature=0.0).tokens
    assert decoderlab.generate(model, prompts, 6, temperature=0.0, compile=True).tokens == eager
