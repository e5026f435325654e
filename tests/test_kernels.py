"""decoderlab's own CPU products (accel/gemv.c): int8, int4 and bf16 weights against dequantized float matmuls,
any row count and thread count, the build cache, the switch that turns them off, and the model paths using them."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decoderlab
from decoderlab.accel import QuantizedWeight, kernels, quantized_layers

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs x86-64 with AVX2 and FMA and a C compiler")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def test_builds_here():
    # CI runs on x86-64 with AVX2 and gcc: the kernels must build there (a broken gemv.c fails here, not silently).
    assert kernels.library() is not None
    assert kernels.library().decoderlab_kernels_version() == 1


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), out_features=st.integers(1, 70), blocks=st.integers(1, 6),
       bias=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_int8_int4_bf16_equal_dequantized_products(rows, out_features, blocks, bias, threads, seed):
    g = torch.Generator().manual_seed(seed)
    k = 32 * blocks
    w = torch.randn(out_features, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # int8: the dequantized weight's product; int4: x rounded to int8 per block of 32 (as llama.cpp's Q4_0).
        q8 = QuantizedWeight.from_float(w, 8)
        want = x @ q8.dequantize().t() + (0 if b is None else b)
        assert _rel(kernels.int8_linear(x, q8.qweight, q8.scales.float(), b), want) < 1e-5
        group = 32 if blocks % 2 else 64
        q4 = QuantizedWeight.from_float(w, 4, group)
        offset = q4.zeros.float() - 8 * q4.scales.float()
        got = kernels.int4_linear(x, kernels.int4_blocks(q4.codes()), q4.scales.float(), offset, b)
        xq = kernels.quantize_activations(x)
        assert _rel(xq, x) < 0.01
        # The offsets multiply the sums of the unrounded x.
        want4 = xq @ (q4.dequantize() - offset.repeat_interleave(group, 1)).t() + x @ offset.repeat_interleave(
            group, 1).t()
        assert _rel(got, want4 + (0 if b is None else b)) < 1e-5
        wb = w.to(torch.bfloat16)
        assert _rel(kernels.bf16_linear(x, wb, b), x @ wb.float().t() + (0 if b is None else b)) < 1e-5
    finally:
        torch.set_num_threads(old)


def test_each_row_independent_of_the_others():
    # A row's result does not depend on which rows share its call: cached decoding (one row) equals a prompt pass.
    torch.manual_seed(0)
    q = QuantizedWeight.from_float(torch.randn(96, 256), 4, 64)
    x = torch.randn(9, 256)
    together = q.linear(x, None)
    for i in range(9):
        assert torch.equal(q.linear(x[i:i + 1], None), together[i:i + 1])


def test_layer_widths_off_the_kernel_grid_still_compute():
    # in_features not a multiple of 32: torch's ops (or a dequantized product), same numbers.
    torch.manual_seed(0)
    q = QuantizedWeight.from_float(torch.randn(40, 48), 8)
    x = torch.randn(2, 48)
    assert not q._own
    assert _rel(q.linear(x, None), x @ q.dequantize().t()) < 1e-5


def test_bf16_model_decodes_through_the_kernel_where_onednn_cannot_pack(tmp_path):
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=96, n_layers=2, n_heads=4, d_model=64,
                                                          d_mlp=128, context_length=64)).eval()
    decoderlab.save(model, tmp_path / "m")
    bf16 = decoderlab.load(tmp_path / "m", dtype="bfloat16")
    if decoderlab.accel.packing_supported(torch.bfloat16):
        pytest.skip("oneDNN packs bf16 on this CPU: the packed path is used instead")
    assert bf16.blocks[0].mlp.up._bf16_kernel
    ids = torch.randint(0, 96, (1, 10))
    with torch.inference_mode():
        plain = decoderlab.load(tmp_path / "m", dtype="bfloat16", pack=False)
        ref = plain(ids)
        got = torch.cat([bf16(ids[:, :1])] + [bf16(ids[:, : i + 1])[:, -1:] for i in range(1, 10)], 1)
    assert _rel(got, ref) < 2e-2
    tokens = decoderlab.generate(bf16, [[1, 2, 3]], 8, temperature=0.0).tokens[0]
    ids = [1, 2, 3]
    with torch.inference_mode():
        for _ in tokens:  # uncached, whole sequence each step (at most 11 rows: the kernel too)
            ids.append(int(bf16(torch.tensor([ids]))[0, -1].float().argmax()))
    assert ids[3:] == tokens


def test_switched_off_by_environment_and_quantized_models_still_work():
    code = ("import torch, decoderlab\nfrom decoderlab.accel import kernels, quantized_layers\n"
            "assert not kernels.available()\n"
            "m = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=64, n_layers=1, n_heads=2, d_model=64,"
            " context_length=32)).eval().quantize('int8')\n"
            "assert not any(q._own for q in quantized_layers(m).values())\n"
            "print(decoderlab.generate(m, [[1, 2]], 4, temperature=0.0).tokens)\n")
    env = dict(os.environ, DECODERLAB_KERNELS="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_build_is_cached_and_rebuilt_into_a_fresh_folder(tmp_path):
    code = ("from decoderlab.accel import kernels\nassert kernels.available()\n"
            "print(next(kernels.cache_root().rglob('*.so')))\n")
    env = dict(os.environ, DECODERLAB_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    built = first.stdout.strip()
    assert built.startswith(str(tmp_path)) and os.path.getsize(built) > 0
    mtime = os.path.getmtime(built)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert again.stdout.strip() == built and os.path.getmtime(built) == mtime  # loaded, not rebuilt


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_gpt2_shape_close_to_its_dequantized_twin(bits):
    # int8 is the dequantized model up to summation order; int4 rounds activations to int8 too (little error).
    torch.manual_seed(0)
    config = decoderlab.ModelConfig.preset("gpt2").replace(n_layers=2, tie_embeddings=False)
    model = decoderlab.Transformer(config).eval()
    q = copy.deepcopy(model).quantize(bits, group_size=32)
    assert all(w._own for w in quantized_layers(q).values())
    plain = copy.deepcopy(q).unpack()  # the same model with the dequantized weights as plain fp32 layers
    assert not quantized_layers(plain)
    ids = torch.randint(0, 50257, (1, 12))
    with torch.inference_mode():
        ref, got, dequantized = model(ids), q(ids), plain(ids)
    assert _rel(got, dequantized) < (1e-4 if bits == "int8" else 0.03)
    assert _rel(got, ref) < _rel(dequantized, ref) + 0.01


def test_nan_and_inf_activations_propagate():
    # A NaN must not be rounded away (the engine refuses NaN logits: it has to see them).
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 64)
        x[0, 5] = bad
        q8, q4 = QuantizedWeight.from_float(w, 8), QuantizedWeight.from_float(w, 4, 32)
        for y in (q8.linear(x, None), q4.linear(x, None), kernels.bf16_linear(x, w.to(torch.bfloat16), None)):
            assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all()


def test_bf16_layer_long_prompt_and_bias():
    # Past kernels.BF16_MAX_ROWS rows a bf16 layer casts its weight to fp32 for the product; both paths agree.
    torch.manual_seed(0)
    layer = decoderlab.accel.Linear(64, 96, bias=True).to(torch.bfloat16)
    layer.pack()
    assert layer._bf16_kernel or decoderlab.accel.packing_supported(torch.bfloat16)
    x = torch.randn(1, kernels.BF16_MAX_ROWS + 30, 64).to(torch.bfloat16)
    with torch.inference_mode():
        want = x.float() @ layer.weight.float().t() + layer.bias.float()
        long, short = layer(x), layer(x[:, :5])
    assert long.dtype == torch.bfloat16 and _rel(long, want) < 1e-2 and _rel(short, want[:, :5]) < 1e-2
