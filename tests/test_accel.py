"""CPU weight packing (`decoderlab.accel`): packed in place with one copy held, and the plain weight given back,
exactly, to whatever reads it (training, saving, copies, conversions)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import decoderlab
import decoderlab.accel.packing
from decoderlab import ModelConfig, Transformer
from decoderlab.accel import SMALL_MODEL_BYTES, Linear, packing_supported, stored_tensors
from decoderlab.generation import generate

pytestmark = pytest.mark.skipif(not packing_supported(torch.float32), reason="oneDNN cannot pack on this CPU")

TIED = ModelConfig(vocab_size=96, n_layers=2, n_heads=4, d_model=32, context_length=64)  # gpt2-like
UNTIED = ModelConfig(vocab_size=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, context_length=64,
                     norm="rmsnorm", positions="rope", activation="swiglu", tie_embeddings=False, n_future=1)
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="this CPU's oneDNN does not pack bf16 (needs AVX-512)"))]


@pytest.fixture
def pack_small(monkeypatch):
    """Pack the test's tiny models too (fp32 models under SMALL_MODEL_BYTES are left plain)."""
    monkeypatch.setattr(decoderlab.accel.packing, "SMALL_MODEL_BYTES", 0)


def _model(config: ModelConfig = UNTIED, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval().to(dtype)
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so every tensor matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _linears(model: Transformer) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear)]


def _stored_weight(layer: Linear) -> torch.Tensor:
    return dict.__getitem__(layer._parameters, "weight")  # as stored, without giving a released weight back


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _ids(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_packed_in_place_gives_the_unpacked_logits_and_holds_one_copy(pack_small, config, dtype):
    plain, model = _model(config, dtype=dtype), _model(config, dtype=dtype).pack()
    ids = _ids()
    with torch.no_grad():
        want, got = plain(ids, future=True), model(ids, future=True)
    atol = 1e-5 if dtype == torch.float32 else 2e-2  # oneDNN's blocked products sum in another order
    assert (got.logits - want.logits).abs().max() <= atol
    assert all((g - w).abs().max() <= atol for g, w in zip(got.future_logits, want.future_logits, strict=True))
    for layer in _linears(model):
        assert layer.packed is not None and not layer.stale
        weight = _stored_weight(layer)
        if weight is model.embed.weight:  # a tied head: the embedding needs its plain rows
            assert not layer.released and weight.untyped_storage().nbytes() == weight.numel() * weight.itemsize
        else:
            assert layer.released and weight.untyped_storage().nbytes() == 0
            assert weight.shape == (layer.out_features, layer.in_features) and weight.dtype == dtype
    assert model.num_params() == plain.num_params()  # counting does not unpack
    assert all(layer.released for layer in _linears(model) if _stored_weight(layer) is not model.embed.weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpacking_gives_the_weights_back_bit_for_bit(pack_small, dtype):
    model = _model(dtype=dtype)
    with torch.no_grad():  # values that an arithmetic round trip would change: -0.0, inf, nan, subnormals
        w = model.blocks[0].mlp.down.weight
        w[0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), torch.finfo(dtype).tiny / 4], dtype=dtype)
        del w  # a weight someone holds is never released
    before = {name: _bits(p).clone() for name, p in model.state_dict().items()}
    model.pack()
    assert model.blocks[0].mlp.down.released
    # state_dict() of a packed model holds copies unpacked for it; the model stays packed
    assert all(torch.equal(_bits(p), before[name]) for name, p in model.state_dict().items())
    assert model.blocks[0].mlp.down.released
    model.unpack()
    assert not any(layer.released or layer.packed is not None for layer in _linears(model))
    assert all(torch.equal(_bits(p), before[name]) for name, p in model.state_dict().items())


def test_reading_a_weight_through_the_model_gives_it_back(pack_small):
    plain, model = _model(), _model().pack()
    layer = model.blocks[1].attn.qkv
    assert layer.released
    assert torch.equal(layer.weight, plain.blocks[1].attn.qkv.weight)  # attribute access
    assert not layer.released and not layer.stale and layer.packed is not None  # the packed copy stays current
    assert model.blocks[0].mlp.up.released
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not any(layer.released for layer in _linears(model))
    with torch.no_grad():
        assert (model(_ids()) - plain(_ids())).abs().max() <= 1e-5
    # A second pack releases them again, where nothing else holds them.
    del p, q
    model.pack()
    assert all(layer.released for layer in _linears(model))


def test_a_weight_held_elsewhere_is_not_released(pack_small):
    model = _model()
    held = model.blocks[0].mlp.up.weight
    optimizer = torch.optim.SGD([model.blocks[1].attn.out.weight], lr=0.1)
    model.pack()
    assert not model.blocks[0].mlp.up.released and not model.blocks[1].attn.out.released
    assert model.blocks[0].attn.qkv.released
    assert torch.equal(held, _model().blocks[0].mlp.up.weight)  # still readable, still right
    assert optimizer.param_groups[0]["params"][0].untyped_storage().nbytes() > 0


def _loss(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_training_a_packed_model_matches_the_unpacked_one(pack_small, config):
    plain, model = _model(config), _model(config).pack()
    ids = _ids(12)
    # A forward with gradients in eval mode (e.g. attributions) gives the weights back; the grads are the same.
    _loss(plain, ids).backward()
    _loss(model, ids).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name  # future heads: no grad
    # train() unpacks; optimizer steps then follow the unpacked model's exactly.
    model, plain = _model(config).pack(), _model(config)
    for m in (model, plain):
        m.train()
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            _loss(m, ids).backward()
            optimizer.step()
    assert not any(layer.packed is not None for layer in _linears(model))
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_optimizer_built_on_a_packed_eval_model(pack_small):
    # parameters() gives the weights back, so an optimizer built before any forward steps real tensors.
    plain, model = _model(), _model().pack()
    ids = _ids(12)
    for m in (plain, model):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        _loss(m, ids).backward()
        optimizer.step()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_save_of_a_packed_model_writes_the_same_bytes(pack_small, tmp_path, config):
    decoderlab.save(_model(config), tmp_path / "plain")
    model = _model(config).pack()
    decoderlab.save(model, tmp_path / "packed")
    assert (tmp_path / "packed" / "model.safetensors").read_bytes() == (
        tmp_path / "plain" / "model.safetensors").read_bytes()
    assert model.blocks[0].attn.qkv.released  # saving did not keep a plain copy


def test_an_edited_weight_goes_stale_and_repacks(pack_small):
    model, plain = _model().pack(), _model()
    ids = _ids()
    with torch.no_grad():
        model.blocks[0].mlp.down.weight.mul_(2.0)  # gives the weight back, then edits it: the packed copy is stale
        plain.blocks[0].mlp.down.weight.mul_(2.0)
        assert model.blocks[0].mlp.down.stale
        want = plain(ids)
        assert (model(ids) - want).abs().max() <= 1e-5  # the stale layer runs unpacked
        model.pack()
        assert not model.blocks[0].mlp.down.stale and model.blocks[0].mlp.down.released
        assert (model(ids) - want).abs().max() <= 1e-5
        model.blocks[1].attn.out.packed = None  # the old way to drop a packed copy: unpacks
        assert model.blocks[1].attn.out.packed is None and not model.blocks[1].attn.out.released
        assert (model(ids) - want).abs().max() <= 1e-5


def test_load_state_dict_into_a_packed_model(pack_small):
    model, other = _model().pack(), _model(seed=3)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(_ids()), other(_ids()))  # the loaded layers run plain until packed again
    assert not any(layer.packed is not None for layer in _linears(model))


def test_conversions_copies_and_pickles(pack_small):
    model, plain = _model().pack(), _model()
    ids = _ids()
    model.to("cpu").float().requires_grad_(False)  # changes nothing: stays packed
    assert all(layer.released for layer in _linears(model))
    clone = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    for other in (clone, pickled):
        assert not any(layer.packed is not None for layer in _linears(other))  # copies are plain
        assert all(torch.equal(p, q) for p, q in zip(other.parameters(), plain.parameters(), strict=True))
    assert all(layer.released for layer in _linears(model))
    model.to(torch.bfloat16)  # another dtype: unpacked, converted like the plain model
    assert not any(layer.packed is not None for layer in _linears(model))
    for p, q in zip(model.parameters(), plain.to(torch.bfloat16).parameters(), strict=True):
        assert torch.equal(p, q)
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))


def test_small_fp32_models_stay_plain():
    model = _model()
    assert sum(layer.weight_bytes for layer in _linears(model)) < SMALL_MODEL_BYTES
    model.pack()
    assert not any(layer.packed is not None for layer in _linears(model))


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_load_packs_by_default_on_the_cpu(pack_small, tmp_path, config):
    decoderlab.save(_model(config), tmp_path)
    model, plain = decoderlab.load(tmp_path), decoderlab.load(tmp_path, pack=False)
    assert all(layer.released for layer in _linears(model) if _stored_weight(layer) is not model.embed.weight)
    assert all(layer.packed is not None for layer in _linears(model))
    assert not any(layer.packed is not None for layer in _linears(plain))
    # Tensors left plain may view the file (its pages dropped from memory after loading): they read right.
    assert all(torch.equal(p, q) for p, q in zip(stored_tensors(model), stored_tensors(plain), strict=True)
               if p.untyped_storage().nbytes())
    prompts = _ids(6).tolist()
    assert generate(model, prompts, 12, stop_tokens=[]).tokens == generate(plain, prompts, 12, stop_tokens=[]).tokens


def test_a_loaded_model_trains_after_train(pack_small, tmp_path, monkeypatch):
    decoderlab.save(_model(), tmp_path)
    model, plain = decoderlab.load(tmp_path), decoderlab.load(tmp_path, pack=False)
    assert model.blocks[0].attn.qkv.released
    ids = _ids(8)
    for m in (model, plain):
        m.train()
        _loss(m, ids).backward()
    assert not any(layer.packed is not None for layer in _linears(model))
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name
    monkeypatch.setitem(decoderlab.config.PRESETS, "accel-test", TIED)
    assert not any(layer.packed is not None for layer in _linears(decoderlab.load("accel-test")))  # fresh: plain


def test_compiled_decode_runs_on_released_weights(pack_small):
    model = _model()
    prompts = _ids(6).tolist()
    eager = generate(model, prompts, 12, stop_tokens=[]).tokens
    model.pack()
    assert generate(model, prompts, 12, stop_tokens=[], compile=True).tokens == eager
    assert all(layer.released for layer in _linears(model))  # compiling did not give the weights back


def test_compiled_forward_with_gradients_on_a_packed_model(pack_small):
    plain, model = _model(), _model().pack()
    ids = _ids(12)
    _loss(plain, ids).backward()
    compiled = torch.compile(model)
    loss = F.cross_entropy(compiled(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_packing_on_the_gpu(pack_small, tmp_path):
    decoderlab.save(_model(), tmp_path)
    model = decoderlab.load(tmp_path, device="cuda")
    assert not any(layer.packed is not None for layer in _linears(model))
    plain = decoderlab.load(tmp_path, pack=False)
    prompts = _ids(6).tolist()
    assert generate(model, prompts, 8, stop_tokens=[]).tokens == generate(plain, prompts, 8, stop_tokens=[]).tokens
    model.pack()  # does nothing off the CPU
    assert not any(layer.packed is not None for layer in _linears(model))


def _resident_kib_of_mapping(address: int) -> int:
    """Resident KiB of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "Rss:":
                return int(fields[1])
    raise AssertionError("no mapping holds that address")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_loading_leaves_the_file_pages_it_read_out_of_memory(pack_small, tmp_path):
    # The tied embedding stays plain, a view of the checkpoint file: packing the head read all of it.
    config = ModelConfig(vocab_size=4096, n_layers=1, n_heads=2, d_model=128, context_length=32)
    decoderlab.save(_model(config), tmp_path)
    model = decoderlab.load(tmp_path)
    embedding = model.embed.weight
    assert model.lm_head.packed is not None and model.lm_head.weight is embedding
    assert _resident_kib_of_mapping(embedding.data_ptr()) < 256  # biases, norms: not the 2 MiB embedding
    assert torch.equal(embedding, _model(config).embed.weight)  # still the weights, read from the file again
    assert _resident_kib_of_mapping(embedding.data_ptr()) >= embedding.nbytes // 1024
