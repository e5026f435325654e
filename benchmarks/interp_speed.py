"""Activation caching speed and memory: decoderlab's `interp.run_with_cache` vs TransformerLens 4.3's
`TransformerBridge.run_with_cache`, on the same weights, in one run.

Run: .venv/bin/python benchmarks/interp_speed.py [--tl-python /work/tlvenv/bin/python] [--batch 4 --tokens 256
     --repeats 5 --rounds 2] [--compat]
The `gpt2` preset (124M, random weights, fp32) is saved as a Hugging Face folder with `decoderlab.save`; each side
loads that folder in its own fresh subprocess (so each process's peak RSS is its own) and caches every block's
`hook_resid_pre`, `hook_resid_mid`, `hook_resid_post` and `attn.hook_pattern` (48 tensors) for a 4 x 256 batch of
random tokens, without gradients (TransformerLens' tutorials switch them off too). Workers:
- decoderlab: `decoderlab.load(folder)` (as a user loads it: packed CPU weights); the plain forward before any hook
  was ever set, `run_with_cache`, then the plain forward again with no hooks set (the zero-cost check: within 2 %);
- TransformerLens: `TransformerBridge.boot_transformers(folder, device="cpu", dtype=float32)` and
  `bridge.run_with_cache(ids, names_filter=...)`, in TransformerLens' own environment (`--tl-python`: a venv with
  `transformer-lens==4.3.*`, which pins its own transformers), plus transformers' plain forward of the model
  under the bridge (`AutoModelForCausalLM.from_pretrained(folder)`, sdpa) for reference; with --compat also
  after `bridge.enable_compatibility_mode()` (HookedTransformer's weight processing: fold LN, centre weights).
Times are medians of --repeats calls after a warm-up, in each of --rounds rounds of the two workers (alternating,
so machine noise hits both sides alike); every round's medians are printed. Peak memory: the process's peak RSS
(VmHWM, load included), and the call's own peak (VmHWM reset through /proc/self/clear_refs before the call,
minus the RSS then).
Target (issue #11): run_with_cache >= 1.2x faster than TransformerLens, at most half its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WANTED = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_pattern")

COMMON = r'''
import json, re, statistics, sys, time
import torch

def rss(field="VmRSS"):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False

def timed(fn, repeats):
    """(median, min) wall seconds of `repeats` calls after a warm-up (allocator, oneDNN kernel choice), and the
    median CPU seconds of this process (less sensitive to other processes on a shared machine)."""
    fn()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), min(times), statistics.median(cpu)

def call_peak(fn):
    """Peak RSS above the RSS before one call of fn (bytes), or None where VmHWM cannot be reset."""
    before = rss()
    if not reset_peak():
        return None
    fn()
    return rss("VmHWM") - before

def wanted(name):
    return name.startswith("blocks.") and name.split(".", 2)[2] in WANTED

folder, batch, tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
WANTED = set(sys.argv[5].split(","))
torch.set_grad_enabled(False)
ids = torch.randint(0, 50257, (batch, tokens), generator=torch.Generator().manual_seed(0))
out = {"threads": torch.get_num_threads(), "torch": torch.__version__}
'''

OURS = COMMON + r'''
import decoderlab
from decoderlab import interp

model = decoderlab.load(folder, dtype="float32", pack=sys.argv[6] == "packed")
out["rss_loaded"] = rss()
plain = lambda: model(ids)
out["plain_before"] = timed(plain, repeats)  # no hook was ever set on this model
names = [n for n in interp.hook_names(model) if wanted(n)]
cached = lambda: interp.run_with_cache(model, ids, names)
out["cache_peak"] = call_peak(cached)
out["cache"] = timed(cached, repeats)
out["cached_points"] = len(cached()[1])
out["plain_after"] = timed(plain, repeats)  # hooks were set and removed: model.hooks is None again
out["rss_peak"] = rss("VmHWM")
print(json.dumps(out))
'''

THEIRS = COMMON + r'''
import logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import tokenizers, transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
import transformer_lens
from transformer_lens.model_bridge import TransformerBridge
from importlib.metadata import version

out["transformer_lens"] = version("transformer-lens")
out["transformers"] = transformers.__version__
if sys.argv[6] == "hf":  # transformers' plain forward, for reference (its own process: memory not mixed in)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out["hf_plain"] = timed(lambda: hf(ids), repeats)
    out["rss_peak"] = rss("VmHWM")
    print(json.dumps(out))
    sys.exit()
# The folder holds weights only (random ones): a one-token stand-in tokenizer, never used (the ids are given).
vocab = {"<|endoftext|>": 0}
tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(
    vocab, unk_token="<|endoftext|>")), eos_token="<|endoftext|>", bos_token="<|endoftext|>")
import tempfile
tok_dir = tempfile.mkdtemp()
tok.save_pretrained(tok_dir)  # TransformerLens re-reads a tokenizer from where it was loaded
tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
bridge = TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32, tokenizer=tok)
if sys.argv[6] == "tl-compat":  # HookedTransformer's weight processing, which TL's docs ask for before a logit
    bridge.enable_compatibility_mode(disable_warnings=True)  # lens or a direct logit attribution
out["rss_loaded"] = rss()
cached = lambda: bridge.run_with_cache(ids, names_filter=wanted)
out["cache_peak"] = call_peak(cached)
out["cache"] = timed(cached, repeats)
out["cached_points"] = len(cached()[1])
out["rss_peak"] = rss("VmHWM")
print(json.dumps(out))
'''


def worker(python: str, code: str, folder: Path, args, *extra: str) -> dict:
    cmd = [python, "-c", code, str(folder), str(args.batch), str(args.tokens), str(args.repeats), ",".join(WANTED),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({python}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tl-python", default="/work/tlvenv/bin/python",
                    help="python of an environment with transformer-lens==4.3.* (it pins its own transformers)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compat", action="store_true",
                    help="also measure TransformerLens after bridge.enable_compatibility_mode() (its weight "
                         "processing, which its docs ask for before logit-lens / logit-attribution work)")
    args = ap.parse_args()

    import torch

    import decoderlab

    have_tl = Path(args.tl_python).exists()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        torch.manual_seed(0)
        decoderlab.save(decoderlab.load("gpt2", dtype="float32", pack=False), folder)
        ours, plain, theirs, compat, hf = [], [], [], [], []
        for _ in range(args.rounds):
            ours.append(worker(sys.executable, OURS, folder, args, "packed"))
            if have_tl:
                theirs.append(worker(args.tl_python, THEIRS, folder, args, "tl"))
            plain.append(worker(sys.executable, OURS, folder, args, "plain"))
            if have_tl and args.compat:
                compat.append(worker(args.tl_python, THEIRS, folder, args, "tl-compat"))
        if have_tl:
            hf.append(worker(args.tl_python, THEIRS, folder, args, "hf"))

    gib = 2**30

    def med(runs: list[dict], key: str) -> float:  # median over rounds of each round's median
        return statistics.median(r[key][0] for r in runs)

    def fastest(runs: list[dict], key: str) -> float:
        return min(r[key][1] for r in runs)

    def cpu(runs: list[dict], key: str) -> float:
        return statistics.median(r[key][2] for r in runs)

    o = ours[0]
    print(f"torch {o['torch']}, {o['threads']} threads; gpt2 preset (124M, random weights, fp32); batch {args.batch} x "
          f"{args.tokens} tokens; caching {o['cached_points']} points (resid_pre/mid/post + pattern of every block); "
          f"median (min) of {args.repeats} calls per round, {args.rounds} round(s)")
    if have_tl:
        t = theirs[0]
        print(f"TransformerLens {t['transformer_lens']} (transformers {t['transformers']}), caching "
              f"{t['cached_points']} points")
    for i in range(args.rounds):
        line = (f"round {i}: decoderlab run_with_cache {ours[i]['cache'][0]:.3f} s (plain weights "
                f"{plain[i]['cache'][0]:.3f})")
        if have_tl:
            line += f" | TransformerLens run_with_cache {theirs[i]['cache'][0]:.3f} s"
        print(line)
    for label, runs in (("decoderlab (load: packed weights)", ours), ("decoderlab (load(pack=False))", plain)):
        before, after = med(runs, "plain_before"), med(runs, "plain_after")
        peak, call = statistics.median(r["rss_peak"] for r in runs), runs[0]["cache_peak"]
        print(f"{label}: run_with_cache {med(runs, 'cache'):.3f} s ({fastest(runs, 'cache'):.3f}); plain forward "
              f"before any hook {before:.3f} s ({fastest(runs, 'plain_before'):.3f}), with no hooks set after hooks "
              f"{after:.3f} s ({fastest(runs, 'plain_after'):.3f}): {after / before - 1:+.1%} by medians, "
              f"{fastest(runs, 'plain_after') / fastest(runs, 'plain_before') - 1:+.1%} by mins, "
              f"{cpu(runs, 'plain_after') / cpu(runs, 'plain_before') - 1:+.1%} by CPU time (target within 2 %); "
              f"peak RSS {peak / gib:.2f} GiB (after load {runs[0]['rss_loaded'] / gib:.2f})"
              + (f", run_with_cache's own peak +{call / gib:.2f} GiB" if call is not None else ""))
    if not have_tl:
        print(f"TransformerLens not measured: {args.tl_python} does not exist (make a venv with "
              "`pip install 'transformer-lens==4.3.*'` and pass --tl-python)")
        return
    t_cache, t_peak, t_call = med(theirs, "cache"), statistics.median(r["rss_peak"] for r in theirs), t["cache_peak"]
    print(f"TransformerLens: run_with_cache {t_cache:.3f} s ({fastest(theirs, 'cache'):.3f}); peak RSS "
          f"{t_peak / gib:.2f} GiB (after load {t['rss_loaded'] / gib:.2f})"
          + (f", run_with_cache's own peak +{t_call / gib:.2f} GiB" if t_call is not None else ""))
    if compat:
        c = compat[0]
        own = c["cache_peak"]
        print(f"TransformerLens after enable_compatibility_mode(): run_with_cache {med(compat, 'cache'):.3f} s "
              f"({fastest(compat, 'cache'):.3f}); peak RSS {statistics.median(r['rss_peak'] for r in compat) / gib:.2f}"
              f" GiB (after load and processing {c['rss_loaded'] / gib:.2f})"
              + (f", run_with_cache's own peak +{own / gib:.2f} GiB" if own is not None else ""))
    hf_plain = hf[0]["hf_plain"][0]
    print(f"transformers plain forward (sdpa): {hf_plain:.3f} s ({hf[0]['hf_plain'][1]:.3f})")
    for label, runs in (("packed", ours), ("plain weights", plain)):
        speed = t_cache / med(runs, "cache")
        memory = statistics.median(r["rss_peak"] for r in runs) / t_peak
        call = runs[0]["cache_peak"]
        print(f"ratios ({label}): run_with_cache {speed:.2f}x faster than TransformerLens by medians, "
              f"{fastest(theirs, 'cache') / fastest(runs, 'cache'):.2f}x by mins (target >= 1.2x); peak RSS "
              f"{memory:.2f}x TransformerLens' (target <= 0.5x)"
              + (f", the call's own peak {call / t_call:.2f}x" if call and t_call else "")
              + f"; plain forward {hf_plain / med(runs, 'plain_before'):.2f}x faster than transformers'")


if __name__ == "__main__":
    main()
