"""Batch-1 CPU decoding, decoderlab against llama.cpp on the same GPT-2 124M-shaped weights, at every width.

Run (llama.cpp lives in its own environment, never in CI):
    python3 -m venv /work/llama/venv && /work/llama/venv/bin/pip install llama-cpp-python==0.3.36 gguf transformers
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # the sources: convert_hf_to_gguf.py
    .venv/bin/python benchmarks/llama_cpp_decode.py --llama-python /work/llama/venv/bin/python \
        --llama-src /work/llama/src/llama_cpp_python-0.3.36/vendor/llama.cpp [--threads 2 --repeats 5]

What it does, in one run:
1. Saves the `gpt2` preset (124M parameters, random weights, seed 0) as a Hugging Face GPT-2 folder with a
   byte-level BPE tokenizer trained here on tinyshakespeare (llama.cpp's converter needs a tokenizer; its
   pre-tokenizer check does not know a locally trained one, so the conversion names it "gpt-2"), and `n_ctx`.
2. Converts that folder to GGUF f32 and f16 with llama.cpp's `convert_hf_to_gguf.py` and quantizes the f16 file
   to Q8_0 and Q4_0 with `llama_cpp.llama_model_quantize`.
3. Times greedy decoding of 96 new tokens after a 32-token prompt (the same ids on both sides, end token ignored
   by neither: random weights do not produce it), prompt included, `--threads` threads on both sides:
   llama.cpp f32/f16/Q8_0/Q4_0 in a subprocess of its environment, decoderlab fp32/bf16/int8/int4 (the plain
   `decoderlab.generate` on `decoderlab.load(folder, dtype=..., quantize=...)`) in this process, alternating
   sides for `--repeats` rounds. Prints the median tokens/s of each and the ratios of the pairs the issue names:
   our bf16 vs its f16, our int8 vs Q8_0, our int4 vs Q4_0 (and fp32 vs f32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import decoderlab

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PAIRS = [("fp32", "f32"), ("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")]

LLAMA_SIDE = r"""
import json, sys, time
import llama_cpp
spec = json.loads(sys.argv[1])
out = {}
for name, path in spec["models"].items():
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_batch=64, verbose=False)
    times, tokens = [], None
    for _ in range(spec["runs"] + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        got = []
        for token in llm.generate(spec["prompt"], temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == spec["new"]:
                break
        times.append(time.perf_counter() - t0)
        tokens = got
    out[name] = {"times": times[1:], "tokens": tokens}
    del llm
print(json.dumps(out))
"""

CONVERT = r"""
import runpy, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/gguf-py")
import convert_hf_to_gguf as convert
from conversion.base import TextModel
# A locally trained BPE tokenizer has no entry in the converter's table of known pre-tokenizers: GPT-2's it is.
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert.main()
"""


def make_folder(folder: Path, vocab: int) -> None:
    """The gpt2 preset (random weights) as a GPT-2 folder with a byte-level BPE tokenizer of `vocab` tokens."""
    from tokenizers import ByteLevelBPETokenizer

    torch.manual_seed(0)
    decoderlab.save(decoderlab.Transformer(decoderlab.ModelConfig.preset("gpt2")).eval(), folder)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train([str(SHARED)], vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 1024}))
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = config.get("n_positions", 1024)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def run(cmd: list[str]) -> str:
    """A subprocess's stdout; its stderr's tail as the error if it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} ... failed:\n{done.stderr[-3000:]}")
    return done.stdout


def make_ggufs(folder: Path, python: str, src: Path) -> dict[str, str]:
    out = {}
    for kind in ("f32", "f16"):
        path = folder / f"gpt2-{kind}.gguf"
        run([python, "-c", CONVERT, str(src), str(folder), "--outtype", kind, "--outfile", str(path)])
        out[kind] = str(path)
    quantize = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params) == 0
"""
    for kind, ftype in (("q8_0", 7), ("q4_0", 2)):  # LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0
        path = folder / f"gpt2-{kind}.gguf"
        run([python, "-c", quantize, out["f16"], str(path), str(ftype)])
        out[kind] = str(path)
    return out


def llama_round(python: str, models: dict[str, str], prompt: list[int], new: int, threads: int,
                runs: int) -> dict[str, dict]:
    spec = json.dumps({"models": models, "prompt": prompt, "new": new, "threads": threads, "runs": runs})
    return json.loads(run([python, "-c", LLAMA_SIDE, spec]).strip().splitlines()[-1])


def ours_round(models: dict[str, decoderlab.Transformer], prompt: list[int], new: int, runs: int,
               compile: bool) -> dict[str, dict]:
    out = {}
    for name, model in models.items():
        for compiled in (False, True) if compile else (False,):
            times, tokens = [], None
            for _ in range(runs + 1):
                t0 = time.perf_counter()
                tokens = decoderlab.generate(model, [prompt], new, temperature=0.0, stop_tokens=[],
                                             compile=compiled).tokens[0]
                times.append(time.perf_counter() - t0)
            out[name + (" compiled" if compiled else "")] = {"times": times[1:], "tokens": tokens}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", required=True, help="python of the environment holding llama-cpp-python")
    ap.add_argument("--llama-src", required=True, type=Path, help="llama.cpp sources (convert_hf_to_gguf.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="rounds, each timing every model once per side")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--vocab", type=int, default=8192, help="tokenizer size (the model keeps GPT-2's 50257 rows)")
    ap.add_argument("--group-size", type=int, default=32, help="our int4 group size (Q4_0's is 32)")
    ap.add_argument("--compile", action="store_true", help="also time ours with generate(..., compile=True)")
    ap.add_argument("--only", nargs="+", choices=[p[0] for p in PAIRS], default=[p[0] for p in PAIRS])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [p for p in PAIRS if p[0] in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        make_folder(folder, args.vocab)
        ggufs = make_ggufs(folder, args.llama_python, args.llama_src)
        ggufs = {theirs: ggufs[theirs] for _, theirs in pairs}
        ours = {}
        for name, _ in pairs:
            if name in ("fp32", "bf16"):
                ours[name] = decoderlab.load(folder, dtype={"fp32": "float32", "bf16": "bfloat16"}[name])
            else:
                ours[name] = decoderlab.load(folder, quantize=name, group_size=args.group_size)
        prompt = torch.randint(1, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
        times: dict[str, list[float]] = {}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for side in (ours_round(ours, prompt, args.new, 1, args.compile),
                         llama_round(args.llama_python, ggufs, prompt, args.new, args.threads, 1)):
                for name, got in side.items():
                    times.setdefault(name, []).extend(got["times"])
                    tokens[name] = got["tokens"]
    rate = {name: args.new / statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {args.threads} threads; gpt2 124M (random weights), batch 1, prompt "
          f"{args.prompt}, {args.new} greedy tokens, median of {args.repeats} rounds (tokens/s, prompt included)")
    for ours_name, theirs in pairs:
        agree = sum(a == b for a, b in zip(tokens[ours_name], tokens[theirs], strict=False))
        print(f"decoderlab {ours_name:5s} {rate[ours_name]:7.1f} | llama.cpp {theirs:5s} {rate[theirs]:7.1f} | "
              f"ratio {rate[ours_name] / rate[theirs]:.2f}x | runs ours "
              f"{', '.join(f'{args.new / t:.0f}' for t in times[ours_name])} theirs "
              f"{', '.join(f'{args.new / t:.0f}' for t in times[theirs])} | same greedy tokens {agree}/{args.new}")
        if ours_name + " compiled" in rate:
            fast = rate[ours_name + " compiled"]
            print(f"   compiled {ours_name:5s} {fast:7.1f} | ratio {fast / rate[theirs]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
