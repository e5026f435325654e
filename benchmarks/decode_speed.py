"""Greedy decode speed: decoderlab's `generate` vs transformers' `generate()` on the same weights, in one process.

Run: .venv/bin/python benchmarks/decode_speed.py [--model PATH] [--prompt 32 --new 64 --batch 1 8 --repeats 5]
     [--pack] [--compile] [--hf-compile] [--cache-dtype fp32]
Default model: the `gpt2` preset with random weights. For each dtype and batch size it prints tokens/s of
both (median of --repeats runs, interleaved so that machine noise hits both alike), the ratio, whether the
greedy tokens are identical, and the decode step time against the memory-bandwidth bound (the bytes of
weights one step reads / a bandwidth measured here by copying a large tensor). It also measures the
per-token Python overhead of the model's forward on tiny 2- and 8-layer models. A `--model` outside the
Hugging Face families is timed alone. Target (issue): >= 2x transformers at batch 1 with identical tokens.
`--pack` (oneDNN-packed weights, `Transformer.pack`), `--compile` (`generate(..., compile=True)`) and
`--cache-dtype` choose how decoderlab runs; `--hf-compile` adds transformers with its static cache and
torch.compile as a second peer. The README's figures: `--pack --compile --hf-compile`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decoderlab
from decoderlab import ModelConfig, Transformer, hf
from decoderlab.generation import stream

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


def step_bytes(model: Transformer) -> int:
    """Weight bytes one decode step reads: every matrix once, but only a row of the embedding tables
    (unless the input embedding is also the LM head)."""
    skip = {id(model.embed.weight)} if model.lm_head.weight is not model.embed.weight else set()
    if model.pos_embed is not None:
        skip.add(id(model.pos_embed.weight))
    unique = {id(p): p for p in model.parameters() if id(p) not in skip}
    return sum(p.numel() * p.element_size() for p in unique.values())


def hf_twin(model: Transformer):
    """transformers' model of the same family with the same weights, or None if the family does not map."""
    import transformers

    if model.config.hf_family is None:
        return None
    cfg = model.config.to_hf_config()
    arch = cfg.pop("architectures")[0]
    cfg.pop("torch_dtype", None)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    twin = getattr(transformers, arch)(hf_config).eval()
    missing, unexpected = twin.load_state_dict(hf.to_hf_state_dict(model.config, model.state_dict()), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    twin.tie_weights()
    return twin


def run_ours(model: Transformer, prompts: list[list[int]], n: int, cache_dtype: torch.dtype | None = None,
             compile: bool = False) -> tuple[float, float, list[list[int]]]:
    """(total seconds, seconds per decode step after the first token, tokens)."""
    tokens = [[] for _ in prompts]
    t0 = time.perf_counter()
    for i, step in enumerate(stream(model, prompts, n, stop_tokens=[], cache_dtype=cache_dtype, compile=compile)):
        if i == 0:
            t_first = time.perf_counter()
        for row, new in zip(tokens, step.tokens, strict=True):
            row += new
    total = time.perf_counter() - t0
    return total, (t0 + total - t_first) / (n - 1), tokens


def run_theirs(twin, ids: torch.Tensor, n: int, compiled: bool = False) -> tuple[float, list[list[int]]]:
    """transformers' greedy `generate()`; `compiled`: its static cache with its auto-compiled forward (the way its
    docs make decoding fast; on the CPU the compile has to be asked for explicitly)."""
    kwargs = {}
    if compiled:
        import transformers

        config = transformers.CompileConfig()
        config._compile_all_devices = True
        kwargs = dict(cache_implementation="static", compile_config=config)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0, **kwargs)
    return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def first_difference(model: Transformer, prompts: list[list[int]], ours: list[list[int]],
                     theirs: list[list[int]]) -> str:
    """Where the first differing row parts from transformers, and how close our top two logits were there:
    in bf16 a near-tie that rounding flips is expected, a clear margin is a bug."""
    row = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if row is None:
        return ""
    step = next(i for i, (a, b) in enumerate(zip(ours[row], theirs[row], strict=True)) if a != b)
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
    return run_ours(model, [[1, 2, 3]], n)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", help="checkpoint folder or preset (default: gpt2, random weights)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens (greedy, no stop token)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pack", action="store_true",
                    help="call model.pack(batch) first: oneDNN-packed weights (Transformer.pack)")
    ap.add_argument("--cache-dtype", choices=list(DTYPES), help="KV cache dtype (default: the engine's: fp32 on CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="generate(..., compile=True): decode steps through one torch.compile graph (compiled in "
                         "the warm-up, not timed)")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time transformers with its static cache and torch.compile (compiled in the warm-up)")
    args = ap.parse_args()

    import transformers

    torch.manual_seed(0)
    model = decoderlab.load(args.model).eval()
    twin = hf_twin(model)
    bw = bandwidth_gbs()
    cache_dtype = DTYPES[args.cache_dtype] if args.cache_dtype else None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}; "
          f"{args.model}: {model.num_params() / 1e6:.0f}M params, prompt {args.prompt}, {args.new} new tokens, "
          f"greedy, median of {args.repeats}; memory bandwidth (copy) {bw:.1f} GB/s"
          + (" (packed weights)" if args.pack else "") + (f" ({args.cache_dtype} KV cache)" if cache_dtype else "")
          + (" (compiled decode step)" if args.compile else ""))
    if twin is None:
        print("(no Hugging Face family: decoderlab alone)")

    for name in args.dtype:
        model.to(DTYPES[name])
        if twin is not None:
            twin.to(DTYPES[name])
        bound = step_bytes(model) / (bw * 1e9)
        for B in args.batch:
            # The same prompts whichever dtypes and batch sizes run.
            rows = torch.Generator().manual_seed(B)
            ids = torch.randint(0, model.config.vocab_size, (B, args.prompt), generator=rows)
            prompts = ids.tolist()
            if args.pack:
                if not hasattr(model, "pack"):
                    raise SystemExit("--pack: this decoderlab's Transformer has no pack() method")
                model.pack(B)
            # Warm-up: allocator, oneDNN kernel choice; with --compile, the graph for this batch and cache size.
            run_ours(model, prompts, args.new if args.compile else 4, cache_dtype, args.compile)
            ours, theirs, theirs_prefill, compiled, compiled_prefill = [], [], [], [], []
            hf_compile = twin is not None and args.hf_compile
            if twin is not None:
                run_theirs(twin, ids, 4)
            if hf_compile:
                run_theirs(twin, ids, args.new, compiled=True)
            for _ in range(args.repeats):  # interleaved, so noise on the shared machine hits both alike
                ours.append(run_ours(model, prompts, args.new, cache_dtype, args.compile))
                if twin is not None:
                    theirs.append(run_theirs(twin, ids, args.new))
                    theirs_prefill.append(run_theirs(twin, ids, 1)[0])
                if hf_compile:
                    compiled.append(run_theirs(twin, ids, args.new, compiled=True))
                    compiled_prefill.append(run_theirs(twin, ids, 1, compiled=True)[0])
            total = statistics.median(r[0] for r in ours)
            step = statistics.median(r[1] for r in ours)
            line = (f"{name} batch {B}: decoderlab {B * args.new / total:7.1f} tok/s "
                    f"(step {step * 1e3:6.2f} ms, {bound / step:4.0%} of bandwidth bound {bound * 1e3:.2f} ms)")
            if twin is not None:
                their_total = statistics.median(r[0] for r in theirs)
                their_step = (their_total - statistics.median(theirs_prefill)) / (args.new - 1)
                same = sum(row == their_row for row, their_row in zip(ours[0][2], theirs[0][1], strict=True))
                parting = first_difference(model, prompts, ours[0][2], theirs[0][1])
                line += (f" | transformers {B * args.new / their_total:7.1f} tok/s (step {their_step * 1e3:6.2f} ms, "
                         f"{bound / their_step:4.0%}) | ratio {their_total / total:4.2f}x | "
                         f"identical tokens: {same}/{B} rows{parting}")
            if hf_compile:
                c_total = statistics.median(r[0] for r in compiled)
                c_step = (c_total - statistics.median(compiled_prefill)) / (args.new - 1)
                c_same = sum(a == b for a, b in zip(ours[0][2], compiled[0][1], strict=True))
                line += (f" | transformers static+compiled {B * args.new / c_total:7.1f} tok/s (step "
                         f"{c_step * 1e3:6.2f} ms) | ratio {c_total / total:4.2f}x, identical {c_same}/{B}")
            print(line, flush=True)

    fwd = forward_overhead()
    per_layer = (fwd[8] - fwd[2]) / 6
    depth = model.config.n_layers
    estimate = fwd[2] + (depth - 2) * per_layer
    print(f"python overhead, batch 1 single-token forward: {fwd[2] * 1e6:.0f} us with 2 layers, {fwd[8] * 1e6:.0f} us "
          f"with 8 ({per_layer * 1e6:.0f} us/layer) -> ~{estimate * 1e6:.0f} us for {depth} layers; "
          f"a whole stream step on the 2-layer model: {engine_overhead() * 1e6:.0f} us")


if __name__ == "__main__":
    main()
