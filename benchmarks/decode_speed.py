"""Greedy decode speed: decoderlab's plain `generate` vs transformers' `generate()` on the same weights, in one process.

Run: .venv/bin/python benchmarks/decode_speed.py [--model PATH] [--prompt 32 --new 96 --batch 1 --dtype fp32
     --repeats 5] [--pack | --no-pack] [--compile] [--hf-compile] [--cache-dtype fp32]
With no flags it measures the issue's target as a user meets it: the `gpt2` preset (124M, tied embeddings, random
weights) saved to a folder, loaded with `decoderlab.load` (which packs the weights on the CPU) and decoded with
plain `decoderlab.generate(model, ids, max_new_tokens=96)` at batch 1, against transformers' `generate()` on the
model `from_pretrained` reads from the same folder. Target: >= 2x with identical greedy tokens, and resident
memory after loading at most 1.15x the weight bytes: a fresh process reports VmRSS (/proc/self/status) before and
after `load`, once torch's one-time lazy imports are paid (a tiny model's load: sympy and friends, ~70 MB
whatever the model).
For each dtype and batch size it prints tokens/s of both (median of --repeats runs, interleaved so that machine
noise hits both alike, and every run's ratio), whether the greedy tokens are identical, and the decode step time
against the memory-bandwidth bound (the bytes of weights one step reads / a bandwidth measured here by copying a
large tensor). It also measures the per-token Python overhead of the model's forward on tiny 2- and 8-layer
models. A `--model` outside the Hugging Face families is timed alone.
`--quantize int8 int4` also times the model loaded with `load(..., quantize=...)` (`--group-size` for int4).
`--pack` re-tunes the packed layout for each batch size (`Transformer.pack(batch)`), `--no-pack` loads plain
weights (`load(..., pack=False)`), `--compile` runs `generate(..., compile=True)`, `--cache-dtype` sets the KV
cache's dtype; `--hf-compile` adds transformers with its static cache and torch.compile as a second peer. The
README's figures: no flags; and `--batch 1 8 --dtype fp32 bf16 --compile --hf-compile`.
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
from decoderlab import ModelConfig, Transformer
from decoderlab.accel import Linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bandwidth_gbs(mib: int = 512, repeats: int = 9) -> float:
    """Memory bandwidth from copying a tensor much larger than the caches: bytes read + written per second
    (median after a warm-up copy that faults the pages in)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times[1:]) / 1e9


def parameters_as_stored(model: Transformer) -> dict[int, torch.Tensor]:
    """Every parameter once (a tied head is the embedding), read from the modules' tables: `model.parameters()`
    would give packed layers their plain weights back."""
    return {id(p): p for m in model.modules() for p in dict.values(m._parameters) if p is not None}


def weight_bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in parameters_as_stored(model).values())


def step_bytes(model: Transformer) -> int:
    """Weight bytes one decode step reads: every matrix once, but only a row of the embedding tables
    (unless the input embedding is also the LM head)."""
    skip = {id(model.embed.weight)} if model.lm_head.packed is not None or not model.config.tie_embeddings else set()
    if model.pos_embed is not None:
        skip.add(id(model.pos_embed.weight))
    return sum(p.numel() * p.element_size() for i, p in parameters_as_stored(model).items() if i not in skip)


def hf_twin(folder: Path, dtype: torch.dtype):
    """transformers' model read by `from_pretrained` from the same folder, or None if not a Hugging Face family."""
    import transformers

    if decoderlab.read_config(folder).hf_family is None:
        return None
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def resident_after_load(folder: Path, dtype: str) -> dict[str, int]:
    """VmRSS of a fresh process (bytes) before and after `decoderlab.load(folder)`, and the weight bytes."""
    code = f"""
import json, re, sys, tempfile
import torch, decoderlab
sys.path.insert(0, {str(Path(__file__).parent)!r})
from decode_speed import weight_bytes
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
imported = rss()
with tempfile.TemporaryDirectory() as tiny:  # pays torch's one-time lazy imports (the meta device's sympy)
    decoderlab.save(decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=64, n_layers=1, n_heads=2,
                                                                  d_model=32, context_length=32)), tiny)
    decoderlab.load(tiny)
before = rss()
model = decoderlab.load(sys.argv[1], dtype=sys.argv[2])
print(json.dumps(dict(imported=imported, before=before, after=rss(), weights=weight_bytes(model))))
"""
    out = subprocess.run([sys.executable, "-c", code, str(folder), dtype], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ours(model: Transformer, prompts: list[list[int]], n: int, cache_dtype: torch.dtype | None = None,
             compile: bool = False) -> tuple[float, list[list[int]]]:
    """The plain call, `decoderlab.generate(model, prompts, max_new_tokens=n)`: (seconds, tokens)."""
    t0 = time.perf_counter()
    result = decoderlab.generate(model, prompts, n, cache_dtype=cache_dtype, compile=compile)
    return time.perf_counter() - t0, result.tokens


def run_theirs(twin, ids: torch.Tensor, n: int, compiled: bool = False) -> tuple[float, list[list[int]]]:
    """transformers' greedy `generate()` with the folder's generation config (the same end token as ours);
    `compiled`: its static cache with its auto-compiled forward (the way its docs make decoding fast; on the CPU
    the compile has to be asked for explicitly)."""
    kwargs = {}
    if compiled:
        import transformers

        config = transformers.CompileConfig()
        config._compile_all_devices = True
        kwargs = dict(cache_implementation="static", compile_config=config)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            pad_token_id=twin.generation_config.eos_token_id, **kwargs)
    end = twin.generation_config.eos_token_id
    # Rows that ended early are padded with the end token; ours stop without it.
    rows = [row[:row.index(end)] if end in row else row for row in out[:, ids.shape[1]:].tolist()]
    return time.perf_counter() - t0, rows


def first_difference(model: Transformer, prompts: list[list[int]], ours: list[list[int]],
                     theirs: list[list[int]]) -> str:
    """Where the first differing row parts from transformers, and how close our top two logits were there:
    in bf16 a near-tie that rounding flips is expected, a clear margin is a bug."""
    row = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if row is None:
        return ""
    step = next((i for i, (a, b) in enumerate(zip(ours[row], theirs[row], strict=False)) if a != b), None)
    if step is None:  # one stopped at the end token, the other went on
        return f" (row {row}: {len(ours[row])} tokens here, {len(theirs[row])} in transformers)"
    with torch.inference_mode():
        logits = model(torch.tensor([prompts[row] + ours[row][:step]]), logits_to_keep=1)[0, -1].float()
    top = logits.topk(2).values
    return f" (row {row} parts at step {step}; our top-2 logit gap there {float(top[0] - top[1]):.3f})"


def forward_overhead(repeats: int = 200) -> dict[int, float]:
    """Seconds per single-token forward (batch 1, cache, logits_to_keep=1) of tiny models by depth: their
    matmuls take microseconds, so this is the Python and dispatch cost of the forward."""
    out = {}
    for layers in (2, 8):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=256, n_layers=layers, n_heads=2, d_model=64,
                                        context_length=1024)).eval()
        tok = torch.tensor([[1]])
        times = []
        with torch.inference_mode():
            cache = model.new_cache(1, repeats + 20)
            for i in range(repeats + 10):
                t0 = time.perf_counter()
                model(tok, cache=cache, logits_to_keep=1)
                if i >= 10:
                    times.append(time.perf_counter() - t0)
        out[layers] = statistics.median(times)
    return out


def engine_overhead(n: int = 200) -> float:
    """Seconds per decode step of the whole `stream` loop on the 2-layer tiny model (forward included)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, n_layers=2, n_heads=2, d_model=64, context_length=1024)).eval()
    run_ours(model, [[1, 2, 3]], 10)
    return run_ours(model, [[1, 2, 3]], n)[0] / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", help="checkpoint folder, or a preset saved to a temporary folder "
                    "first (default: gpt2, random weights)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=96, help="max_new_tokens (greedy; both stop at the end token)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    packing = ap.add_mutually_exclusive_group()
    packing.add_argument("--pack", action="store_true",
                         help="call model.pack(batch) for each batch size: the packed layout tuned for it")
    packing.add_argument("--no-pack", action="store_true", help="load plain weights: load(..., pack=False)")
    ap.add_argument("--cache-dtype", choices=list(DTYPES), help="KV cache dtype (default: the engine's: fp32 on CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="generate(..., compile=True): decode steps through one torch.compile graph (compiled in "
                         "the warm-up, not timed)")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time transformers with its static cache and torch.compile (compiled in the warm-up)")
    ap.add_argument("--quantize", nargs="+", default=[], choices=["int8", "int4"],
                    help="also time the model loaded with load(..., quantize=Q), interleaved with the others")
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size")
    args = ap.parse_args()

    import transformers

    bw = bandwidth_gbs()
    cache_dtype = DTYPES[args.cache_dtype] if args.cache_dtype else None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}; "
          f"{args.model}, prompt {args.prompt}, max_new_tokens {args.new}, greedy, median of {args.repeats}; "
          f"memory bandwidth (copy) {bw:.1f} GB/s" + (" (plain weights)" if args.no_pack else "")
          + (" (packed for each batch size)" if args.pack else "")
          + (f" ({args.cache_dtype} KV cache)" if cache_dtype else "")
          + (" (compiled decode step)" if args.compile else ""), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dtype:
            folder = Path(args.model)
            if not folder.exists() and args.model in decoderlab.PRESETS:
                torch.manual_seed(0)
                folder = Path(tmp) / f"{args.model}-{name}"
                decoderlab.save(decoderlab.load(args.model, dtype=name, pack=False), folder)
            memory = resident_after_load(folder, name) if sys.platform.startswith("linux") else None
            model = decoderlab.load(folder, dtype=name, pack=not args.no_pack)
            twin = hf_twin(folder, DTYPES[name])
            quantized = {q: decoderlab.load(folder, dtype=name, quantize=q, group_size=args.group_size)
                         for q in args.quantize}
            packed = sum(m.packed is not None for m in model.modules() if isinstance(m, Linear))
            released = sum(m.released for m in model.modules() if isinstance(m, Linear))
            line = (f"{name}: {model.num_params() / 1e6:.0f}M params, {weight_bytes(model) / 2**20:.0f} MiB of "
                    f"weights; {packed} linear layers packed, {released} of them without a plain copy")
            if memory is not None:
                added = memory["after"] - memory["before"]
                mib = {k: f"{v / 2**20:.0f}" for k, v in memory.items()}
                line += (f"; RSS after load {mib['after']} MiB: +{added / 2**20:.0f} MiB = "
                         f"{added / memory['weights']:.2f}x the weights (fresh process: {mib['imported']} MiB after "
                         f"imports, {mib['before']} after torch's lazy imports)")
            print(line + ("" if twin is not None else "; no Hugging Face family: decoderlab alone"), flush=True)
            bound = step_bytes(model) / (bw * 1e9)
            depth = model.config.n_layers
            for B in args.batch:
                # The same prompts whichever dtypes and batch sizes run.
                rows = torch.Generator().manual_seed(B)
                ids = torch.randint(0, model.config.vocab_size, (B, args.prompt), generator=rows)
                prompts = ids.tolist()
                if args.pack:
                    model.pack(B)
                # Warm-up: allocator, oneDNN kernel choice; with --compile, the graph for this batch and cache size.
                run_ours(model, prompts, args.new if args.compile else 4, cache_dtype, args.compile)
                ours, ours_prefill, theirs, theirs_prefill, compiled, compiled_prefill = [], [], [], [], [], []
                hf_compile = twin is not None and args.hf_compile
                for qmodel in quantized.values():
                    run_ours(qmodel, prompts, args.new if args.compile else 4, cache_dtype, args.compile)
                timed_q = {q: [] for q in quantized}
                if twin is not None:
                    run_theirs(twin, ids, 4)
                if hf_compile:
                    run_theirs(twin, ids, args.new, compiled=True)
                for _ in range(args.repeats):  # interleaved, so noise on the shared machine hits both alike
                    ours.append(run_ours(model, prompts, args.new, cache_dtype, args.compile))
                    ours_prefill.append(run_ours(model, prompts, 1, cache_dtype, args.compile)[0])
                    for q, qmodel in quantized.items():
                        timed_q[q].append(run_ours(qmodel, prompts, args.new, cache_dtype, args.compile))
                    if twin is not None:
                        theirs.append(run_theirs(twin, ids, args.new))
                        theirs_prefill.append(run_theirs(twin, ids, 1)[0])
                    if hf_compile:
                        compiled.append(run_theirs(twin, ids, args.new, compiled=True))
                        compiled_prefill.append(run_theirs(twin, ids, 1, compiled=True)[0])
                tokens = sum(len(row) for row in ours[0][1])
                steps = max(len(row) for row in ours[0][1]) - 1
                total = statistics.median(r[0] for r in ours)
                step = (total - statistics.median(ours_prefill)) / max(steps, 1)
                line = (f"{name} batch {B}: decoderlab {tokens / total:7.1f} tok/s "
                        f"(step {step * 1e3:6.2f} ms, {bound / step:4.0%} of bandwidth bound {bound * 1e3:.2f} ms)")
                if twin is not None:
                    their_total = statistics.median(r[0] for r in theirs)
                    their_step = (their_total - statistics.median(theirs_prefill)) / max(steps, 1)
                    same = sum(row == their_row for row, their_row in zip(ours[0][1], theirs[0][1], strict=True))
                    parting = first_difference(model, prompts, ours[0][1], theirs[0][1])
                    runs = ", ".join(f"{t[0] / o[0]:.2f}" for o, t in zip(ours, theirs, strict=True))
                    line += (f" | transformers {tokens / their_total:7.1f} tok/s (step {their_step * 1e3:6.2f} ms, "
                             f"{bound / their_step:4.0%}) | ratio {their_total / total:4.2f}x (runs: {runs}) | "
                             f"identical tokens: {same}/{B} rows ({tokens} tokens){parting}")
                if hf_compile:
                    c_total = statistics.median(r[0] for r in compiled)
                    c_step = (c_total - statistics.median(compiled_prefill)) / max(steps, 1)
                    c_same = sum(a == b for a, b in zip(ours[0][1], compiled[0][1], strict=True))
                    line += (f" | transformers static+compiled {tokens / c_total:7.1f} tok/s (step "
                             f"{c_step * 1e3:6.2f} ms) | ratio {c_total / total:4.2f}x, identical {c_same}/{B}")
                for q, runs_q in timed_q.items():
                    q_total = statistics.median(r[0] for r in runs_q)
                    same = sum(a == b for a, b in zip(ours[0][1], runs_q[0][1], strict=True))
                    q_tokens = sum(len(row) for row in runs_q[0][1])
                    line += (f" | ours {q} {q_tokens / q_total:7.1f} tok/s ({total / q_total * q_tokens / tokens:.2f}x "
                             f"ours {name}), greedy tokens identical to {name}: {same}/{B} rows")
                print(line, flush=True)
            if released:  # what giving every weight back costs (anything that reads them does it), and repacking
                t0 = time.perf_counter()
                model.unpack()
                t1 = time.perf_counter()
                model.pack()
                print(f"{name}: unpack (every weight back, bit for bit) {t1 - t0:.2f} s, pack again "
                      f"{time.perf_counter() - t1:.2f} s", flush=True)
            del model, twin, quantized

    fwd = forward_overhead()
    per_layer = (fwd[8] - fwd[2]) / 6
    estimate = fwd[2] + (depth - 2) * per_layer
    print(f"python overhead, batch 1 single-token forward: {fwd[2] * 1e6:.0f} us with 2 layers, {fwd[8] * 1e6:.0f} us "
          f"with 8 ({per_layer * 1e6:.0f} us/layer) -> ~{estimate * 1e6:.0f} us for {depth} layers; "
          f"a whole stream step on the 2-layer model: {engine_overhead() * 1e6:.0f} us")


if __name__ == "__main__":
    main()
