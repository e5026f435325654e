"""Activation patching, path patching, ablations and subspace interchange: patching the clean run into itself
changes nothing, patching everything gives the source's output, batched sweeps equal one-at-a-time patching,
path patching isolates the direct path, and DAS finds a planted subspace."""

from __future__ import annotations

import pytest
import torch

import decoderlab
from decoderlab import interp, masks
from decoderlab.errors import UserError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4,
                                                         n_kv_heads=2, context_length=64)).eval()


def _pair(batch: int = 1, T: int = 7, seed: int = 1):
    clean = torch.randint(0, 50, (batch, T), generator=torch.Generator().manual_seed(seed))
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 11) % 50
    return clean, corrupt


def _metric(answer=3, wrong=4):
    return interp.logit_diff(answer, wrong)


def test_patching_the_clean_run_into_itself_changes_nothing(model):
    clean, _ = _pair()
    logits, cache = interp.run_with_cache(model, clean)
    for name in interp.hook_names(model):
        out = interp.patch(model, clean, cache, name)
        assert (out - logits).abs().max() <= 1e-5, name
    metric = _metric()
    base = float(metric(logits))
    for fn in (interp.resid_pre_by_pos, interp.attn_out_by_pos, interp.mlp_out_by_pos, interp.head_out,
               interp.head_out_by_pos):
        grid = fn(model, clean, cache, metric)
        assert (grid - base).abs().max() <= 1e-5, fn.__name__


def test_patching_all_of_resid_pre_0_from_the_corrupted_run_gives_its_output(model):
    clean, corrupt = _pair(batch=2)
    with torch.no_grad():
        corrupt_logits, clean_logits = model(corrupt), model(clean)
    out = interp.patch(model, clean, corrupt, ("resid_pre", 0))
    assert (out - corrupt_logits).abs().max() <= 1e-5
    # And the normalised metric: 0 on the corrupted run, 1 on the clean one, as patched.
    metric = interp.normalized(_metric(), clean_logits, corrupt_logits)
    assert abs(float(interp.patch(model, corrupt, clean, ("resid_pre", 0), metric)) - 1) <= 1e-4
    assert abs(float(metric(corrupt_logits.detach()))) <= 1e-6
    # Positions before the corrupted token never matter; the corrupted token's position does at layer 0.
    grid = interp.resid_pre_by_pos(model, corrupt, clean, metric)
    assert grid.shape == (3, 7)
    assert grid[:, :2].abs().max() <= 1e-4
    assert abs(float(grid[0, 2]) - 1) <= 1e-4


@pytest.mark.parametrize("act,by", [("resid_pre", "pos"), ("attn_out", "pos"), ("mlp_out", "pos"),
                                    ("z", "head"), ("z", ("head", "pos")), ("v", ("pos", "head")),
                                    ("pattern", "head"), ("resid_mid", ())])
def test_a_sweep_equals_patching_one_cell_at_a_time(model, act, by):
    clean, corrupt = _pair(batch=2, T=6)
    metric = _metric(torch.tensor([3, 5]), torch.tensor([4, 1]))
    grid = interp.sweep(model, clean, corrupt, act, metric, by=by, batch=5)
    _, cache = interp.run_with_cache(model, corrupt)
    by = (by,) if isinstance(by, str) else by
    sizes = {"pos": 6, "head": cache[act, 0].shape[2] if act in ("z", "v") else 4}
    assert grid.shape == (3, *[sizes[d] for d in by])
    head_site = act in ("z", "v")
    for cell in torch.cartesian_prod(*[torch.arange(n) for n in grid.shape]).view(-1, grid.dim()).tolist():
        layer, *coords = cell
        named = dict(zip(by, coords, strict=True))
        if head_site:
            index = (named.get("pos", slice(None)), named.get("head", slice(None)))
        elif act == "pattern":
            index = named["head"]
        else:
            index = named.get("pos")
        one = interp.patch(model, clean, cache, (act, layer), metric, index=index)
        assert abs(float(one) - float(grid[tuple(cell)])) <= 1e-5, cell
    if by:
        assert grid.std() > 0  # the sweep measured something
    else:  # all of resid_mid at any layer carries everything the output depends on
        with torch.no_grad():
            assert (grid - float(metric(model(corrupt)))).abs().max() <= 1e-5


def test_sweeps_on_a_left_padded_batch_equal_one_at_a_time(model):
    clean, corrupt = _pair(batch=2, T=6)
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    kwargs = dict(positions=(valid.long().cumsum(-1) - 1).clamp(min=0), mask=masks.causal() & masks.padding(valid))
    metric = _metric()
    grid = interp.head_out(model, clean, corrupt, metric, batch=4, **kwargs)
    for layer in range(3):
        for head in range(4):
            one = interp.patch(model, clean, corrupt, ("z", layer), metric, index=(slice(None), head), **kwargs)
            assert abs(float(one) - float(grid[layer, head])) <= 1e-5


def test_path_patching(model):
    clean, corrupt = _pair()
    metric = _metric()
    clean_logits, clean_cache = interp.run_with_cache(model, clean)
    _, corrupt_cache = interp.run_with_cache(model, corrupt)
    receiver = ("blocks.2.hook_resid_post", None)
    # No sender: no effect.
    assert abs(float(interp.path_patch(model, clean, corrupt, None, receiver, metric)) - float(
        metric(clean_logits))) <= 1e-5
    # A head sending to the final residual stream: its direct effect only, computed here from the head's
    # per-head outputs (hook_result) of both runs.
    sender = ("blocks.0.attn.hook_z", (slice(None), 1))
    out = interp.path_patch(model, clean, corrupt, sender, receiver)
    _, r_clean = interp.run_with_cache(model, clean, "blocks.0.attn.hook_result")
    _, r_corrupt = interp.run_with_cache(model, corrupt, "blocks.0.attn.hook_result")
    delta = r_corrupt["result", 0][:, :, 1] - r_clean["result", 0][:, :, 1]
    final = clean_cache["resid_post", 2] + delta
    expected = model.unembed(model.final_norm(final))
    assert (out - expected).abs().max() <= 1e-4
    # It differs from the total effect (patching the head itself), which also goes through later layers.
    total = interp.patch(model, clean, corrupt_cache, ("z", 0), index=(slice(None), 1))
    assert (total - out).abs().max() > 1e-4
    # The same through the final norm's output; and a head's effect through block 1's attention is the same
    # whether received at that attention's input or at its output.
    via_norm = interp.path_patch(model, clean, corrupt, sender, ("ln_final.hook_normalized", None))
    assert (via_norm - out).abs().max() <= 1e-5
    at_input = interp.path_patch(model, clean, corrupt, sender, ("blocks.1.ln1.hook_normalized", None))
    at_output = interp.path_patch(model, clean, corrupt, sender, ("blocks.1.hook_attn_out", None))
    assert (at_input - at_output).abs().max() <= 1e-5 and (at_input - clean_logits).abs().max() > 1e-4
    # A later head cannot reach an earlier receiver.
    late = interp.path_patch(model, clean, corrupt, ("blocks.2.attn.hook_z", (slice(None), 0)),
                             ("blocks.1.hook_resid_pre", None))
    assert (late - clean_logits).abs().max() <= 1e-5
    # A sender straight into the next layer's values of one head: between "nothing" and the total effect.
    via_v = interp.path_patch(model, clean, corrupt, sender, ("blocks.1.attn.hook_v", (slice(None), 0)))
    assert (via_v - clean_logits).abs().max() > 1e-5
    # Batched over every sender head: each cell equals path patching that head alone.
    receiver_v = ("blocks.2.attn.hook_v", (slice(None), 1))
    grid = interp.path_patch_heads(model, clean, corrupt, receiver_v, metric, batch=5)
    assert grid.shape == (3, 4)
    for layer in range(3):
        for head in range(4):
            one = interp.path_patch(model, clean, corrupt, (("z", layer), (slice(None), head)), receiver_v, metric)
            assert abs(float(one) - float(grid[layer, head])) <= 1e-5, (layer, head)
    assert (grid[2] - float(metric(clean_logits))).abs().max() <= 1e-5
    assert (grid[:2] - float(metric(clean_logits))).abs().max() > 1e-4
    with pytest.raises(UserError, match="path-patching cell"):
        interp.path_patch(model, clean, corrupt, sender, ["blocks.1.hook_resid_pre"])


def test_ablations(model):
    ids, _ = _pair(batch=2)
    reference = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(9))
    name = "blocks.1.attn.hook_z"
    seen = {}

    def look(x, hook):
        seen[hook.name] = x.clone()

    def run(**kwargs):
        with torch.no_grad(), interp.ablated(model, name, **kwargs), interp.hooks(model, {name: look}):
            logits = model(ids)
        return logits, seen[name]

    logits, z = run(how="zero", index=(slice(None), 2))
    assert z.shape == (2, 7, 4, 8)
    assert z[:, :, 2].abs().max() == 0 and z[:, :, 1].abs().min() > 0
    assert (logits - interp.ablate(model, ids, name, "zero", index=(slice(None), 2))).abs().max() == 0

    _, ref_cache = interp.run_with_cache(model, reference, name)
    _, z = run(how="mean", reference=reference, index=4)
    assert (z[:, 4] - ref_cache[name][:, 4].mean(0)).abs().max() <= 1e-6
    _, z_plain = interp.run_with_cache(model, ids, name)
    assert (z[:, :4] - z_plain[name][:, :4]).abs().max() <= 1e-6
    _, z = run(how="mean", reference=reference, over_positions=True)
    assert (z - ref_cache[name].mean((0, 1))).abs().max() <= 1e-6

    _, z = run(how="resample", reference=reference, seed=3)
    for row in range(2):  # each row is one of the reference rows
        assert min(float((z[row] - r).abs().max()) for r in ref_cache[name]) <= 1e-6
    with pytest.raises(UserError, match="same length"):
        interp.ablate(model, ids, name, "resample", reference=reference[:, :5])
    with pytest.raises(UserError, match="same length"):
        interp.ablate(model, ids, name, "mean", reference=reference[:, :5])
    with pytest.raises(UserError, match="unknown ablation"):
        interp.ablate(model, ids, name, "noise")
    with pytest.raises(UserError, match="reference"):
        interp.ablate(model, ids, name, "mean")


def test_interchange_of_the_whole_space_is_a_patch_and_of_none_is_nothing(model):
    clean, corrupt = _pair()
    d = model.config.d_model
    full = interp.interchange(model, clean, corrupt, ("resid_pre", 1), torch.eye(d), index=-1)
    assert (full - interp.patch(model, clean, corrupt, ("resid_pre", 1), index=-1)).abs().max() <= 1e-5
    # Swapping a subspace and then its complement gives the whole swap.
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0))).Q
    _, corrupt_cache = interp.run_with_cache(model, corrupt, "blocks.1.hook_resid_pre")
    _, clean_cache = interp.run_with_cache(model, clean, "blocks.1.hook_resid_pre")
    x, s = clean_cache["resid_pre", 1][0, -1], corrupt_cache["resid_pre", 1][0, -1]
    b = q[:, :5]
    assert ((x + (s - x) @ b @ b.T) + ((s - x) @ q[:, 5:] @ q[:, 5:].T) - s).abs().max() <= 1e-5
    with pytest.raises(UserError, match="orthonormal"):
        interp.interchange(model, clean, corrupt, ("resid_pre", 1), torch.ones(d, 2))
    with pytest.raises(UserError, match="features"):
        interp.interchange(model, clean, corrupt, ("z", 1), torch.eye(d)[:, :2], index=-1)
    with pytest.raises(UserError, match="target's shape"):
        interp.interchange(model, clean, corrupt[:, :4], ("resid_pre", 1), torch.eye(d)[:, :2])


def test_learned_interchange_recovers_a_planted_subspace():
    """A toy whose answer is a function of a known 2-d subspace of the final normalised stream: the LM head
    reads only that subspace. Interchanging exactly that subspace gives the source's answer; DAS finds it."""
    torch.manual_seed(0)
    d, k, V = 16, 2, 12
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=V, d_model=d, n_layers=1, n_heads=2,
                                                          context_length=16)).eval()
    planted = torch.linalg.qr(torch.randn(d, k)).Q  # [d, k]
    with torch.no_grad():
        model.lm_head.weight.copy_(3 * torch.randn(V, k) @ planted.T)
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, V, (256, 5), generator=g)
    source = torch.randint(0, V, (256, 5), generator=g)
    with torch.no_grad():
        labels = model(source)[:, -1].argmax(-1)
    site = "ln_final.hook_normalized"
    exact = interp.interchange(model, base, source, site, planted, index=-1)[:, -1].argmax(-1)
    assert bool((exact == labels).all())
    learned = interp.learn_subspace(model, base, source, labels, site, k, steps=100, lr=0.1)
    # Mean squared cosine of the principal angles: 1 when the spans agree, k / d = 0.125 for a random one.
    # Hard labels stop pulling once every pair is right, so the last few degrees stay loose.
    overlap = float((planted.T @ learned.basis).pow(2).sum()) / k
    assert overlap >= 0.9, overlap
    assert learned.accuracy >= 0.95
    assert learned.losses[-1] < learned.losses[0]
    assert all(p.requires_grad for p in model.parameters())
    # A random subspace does not do it.
    random_basis = torch.linalg.qr(torch.randn(d, k, generator=g)).Q
    chance = interp.interchange(model, base, source, site, random_basis, index=-1)[:, -1].argmax(-1)
    assert float((chance == labels).float().mean()) < 0.8


def test_bad_input_is_one_line_user_error(model):
    clean, corrupt = _pair()
    with pytest.raises(UserError, match="no hook point"):
        interp.patch(model, clean, corrupt, "blocks.9.hook_resid_pre")
    with pytest.raises(UserError, match="cannot sweep 'head'"):
        interp.sweep(model, clean, corrupt, "resid_pre", _metric(), by="head")
    with pytest.raises(UserError, match="source must be"):
        interp.patch(model, clean, torch.randn(1, 7, 32), "hook_embed")
    with pytest.raises(UserError, match="target's shape"):
        interp.patch(model, clean, corrupt[:, :5], ("resid_pre", 1))
    with pytest.raises(UserError, match="target's shape"):
        interp.resid_pre_by_pos(model, clean, torch.cat([corrupt, corrupt, corrupt]), _metric())
    with torch.no_grad():
        logits = model(clean)
    with pytest.raises(UserError, match="cannot be normalised"):
        interp.normalized(_metric(), logits, logits)


def test_cli_patch_writes_the_api_grid(tmp_path):
    import json
    import subprocess
    import sys

    tok = decoderlab.Tokenizer.train_char(texts=["abcdefgh ABCDEFGH\n"])
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size)).eval()
    decoderlab.save(model, tmp_path / "m", tokenizer=tok)
    base = [sys.executable, "-m", "decoderlab", "patch", str(tmp_path / "m"), "--clean", "abcd", "--corrupt", "abCd",
            "--answer", "e", "--wrong", "E"]
    run = subprocess.run(base + ["--json", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    saved = json.loads((tmp_path / "g.json").read_text())
    clean, corrupt = torch.tensor([tok.encode("abcd")]), torch.tensor([tok.encode("abCd")])
    with torch.no_grad():
        metric = interp.normalized(interp.logit_diff(tok.encode("e")[0], tok.encode("E")[0]), model(clean),
                                   model(corrupt))
    expected = interp.resid_pre_by_pos(model, corrupt, clean, metric)
    assert saved["tokens"] == ["a", "b", "c", "d"]
    assert (torch.tensor(saved["grid"]) - expected).abs().max() <= 1e-5
    assert abs(saved["grid"][0][2] - 1) <= 1e-4  # the corrupted position carries it all at layer 0
    for extra, fragment in [(["--by", "head"], "cannot sweep"), (["--answer", "ee"], "exactly one token")]:
        bad = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and fragment in bad.stderr and bad.stderr.strip().count("\n") == 0
