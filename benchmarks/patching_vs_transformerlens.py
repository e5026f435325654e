"""Activation-patching grids from decoderlab and from TransformerLens' `patching` module on the same GPT-2-shaped
random weights: resid_pre by position, attn_out by position, head outputs by head. TransformerLens runs in its own
environment (`--tl-python`, a Python with transformer-lens installed), on the folder this script writes.

    python benchmarks/patching_vs_transformerlens.py --tl-python /path/to/tl-venv/bin/python

Prints the largest difference between the two grids of each kind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch

import decoderlab
from decoderlab import interp

TL_SIDE = r"""
import json, sys, torch
from transformer_lens import patching
from transformer_lens.model_bridge import TransformerBridge
folder, clean, corrupt, answer, wrong = sys.argv[1], *map(json.loads, sys.argv[2:4]), int(sys.argv[4]), int(sys.argv[5])
torch.set_grad_enabled(False)
model = TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32)
clean, corrupt = torch.tensor(clean), torch.tensor(corrupt)
clean_logits, cache = model.run_with_cache(clean)
corrupt_logits = model(corrupt)
def diff(logits):
    return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()
c, k = float(diff(clean_logits)), float(diff(corrupt_logits))
metric = lambda logits: (diff(logits) - k) / (c - k)
out = {
    "resid_pre": patching.get_act_patch_resid_pre(model, corrupt, cache, metric).tolist(),
    "attn_out": patching.get_act_patch_attn_out(model, corrupt, cache, metric).tolist(),
    "head_out": patching.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric).tolist(),
}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tl-python", required=True, help="A Python with transformer-lens installed.")
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=257, n_positions=64, n_embd=64, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)  # larger than the init, so patching moves the metric visibly
    folder = Path(tempfile.mkdtemp()) / "gpt2-random"
    hf.save_pretrained(folder)
    clean = torch.randint(0, 257, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    corrupt[0, 3] = (corrupt[0, 3] + 5) % 257
    with torch.no_grad():
        last = hf(clean).logits[0, -1]
    answer, wrong = (int(i) for i in last.topk(2).indices)
    run = subprocess.run([args.tl_python, "-c", TL_SIDE, str(folder), json.dumps(clean.tolist()),
                          json.dumps(corrupt.tolist()), str(answer), str(wrong)], capture_output=True, text=True,
                         timeout=900)
    if run.returncode != 0:
        raise SystemExit(f"TransformerLens side failed:\n{run.stderr[-3000:]}")
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    model = decoderlab.load(folder)
    with torch.no_grad():
        metric = interp.normalized(interp.logit_diff(answer, wrong), model(clean), model(corrupt))
    ours = {"resid_pre": interp.resid_pre_by_pos(model, corrupt, clean, metric),
            "attn_out": interp.attn_out_by_pos(model, corrupt, clean, metric),
            "head_out": interp.head_out(model, corrupt, clean, metric)}
    for name, grid in ours.items():
        other = torch.tensor(theirs[name])
        print(f"{name:10s} {tuple(grid.shape)}: max |decoderlab - TransformerLens| = "
              f"{(grid - other).abs().max().item():.2e}  (grid range {grid.min().item():.2f}..{grid.max().item():.2f})")


if __name__ == "__main__":
    main()
