"""Streaming generation with attention sinks (StreamingLLM) on a decoderlab-trained model: quality and memory.

1. Per-token NLL over a long held-out text (several times the context), scored token by token through the
   streaming KV cache (`SinkWindow`): with sinks (S=4) against plain window eviction (S=0), and against the
   sliding-window recompute baseline (each token scored by a fresh forward over its last `context` tokens).
2. N generated tokens at flat memory: RSS and the cache's bytes and buffer address printed along the way.

    OMP_NUM_THREADS=1 decoderlab train --data /work/shared/data/tinyshakespeare.txt --time 90s --context 128 \\
        --out runs/shakespeare-128
    python benchmarks/streaming.py runs/shakespeare-128 --text /work/shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import decoderlab
from decoderlab.generation import Stream, resolve_sampling
from decoderlab.generation.sinks import SinkWindow


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def streamed_nll(model, ids: list[int], window: int, sinks: int) -> torch.Tensor:
    """NLL of ids[1:], each token scored by the streaming cache (the text forced through the decoder)."""
    force = {step: {0: token} for step, token in enumerate(ids[1:])}
    steps = Stream(model, [ids[:1]], len(ids) - 1, resolve_sampling(model, temperature=0.0), seed=0,
                   force=force, decoder=SinkWindow(window, sinks), logprobs=0)
    return torch.tensor([-lp.logprob for lp in steps.result().logprobs[0]])


@torch.inference_mode()
def recompute_nll(model, ids: list[int], context: int, batch: int = 64) -> torch.Tensor:
    """NLL of ids[1:], token i scored by a fresh forward over ids[max(0, i - context) : i] (positions 0..)."""
    out = []
    for i in range(1, len(ids)):
        out.append(ids[max(0, i - context):i + 1])
    nll = []
    for start in range(0, len(out), batch):
        rows = out[start:start + batch]
        for row in rows:  # windows differ in length only at the start: run them one by one there
            if len(row) <= context:
                logits = model(torch.tensor([row[:-1]]))[0, -1]
                nll.append(-logits.log_softmax(-1)[row[-1]].item())
        full = [r for r in rows if len(r) == context + 1]
        if full:
            x = torch.tensor(full)
            logits = model(x[:, :-1], logits_to_keep=1)[:, -1]
            nll += (-logits.log_softmax(-1).gather(1, x[:, -1:])[:, 0]).tolist()
    return torch.tensor(nll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True, help="Text file; the held-out tail is scored.")
    ap.add_argument("--multiple", type=int, default=8, help="Scored length in contexts.")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--generate", type=int, default=20000, help="Tokens to generate for the memory check.")
    ap.add_argument("--random-context", type=int, default=512,
                    help="Also generate from a random model of the same shape with this context (0: skip).")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = decoderlab.load(args.model)
    tok = decoderlab.Tokenizer.from_folder(args.model)
    ctx = model.config.context_length
    text = open(args.text).read()
    n = args.multiple * ctx + 1
    ids = tok.encode(text[-(len(text) // 10):], add_special_tokens=False)[:n]  # the validation tail
    print(f"model {args.model}: context {ctx}, {model.num_params():,} params; scoring {len(ids) - 1} tokens "
          f"({args.multiple}x the context), torch threads {torch.get_num_threads()}")
    runs = {}
    t0 = time.perf_counter()
    runs[f"sinks S={args.sinks}, W={ctx - args.sinks}"] = streamed_nll(model, ids, ctx - args.sinks, args.sinks)
    runs[f"window only S=0, W={ctx}"] = streamed_nll(model, ids, ctx, 0)
    runs[f"sliding recompute W={ctx}"] = recompute_nll(model, ids, ctx)
    print(f"(scored in {time.perf_counter() - t0:.1f} s)")
    print("mean NLL (nats/token) per segment of one context length:")
    print(f"{'':32s}" + "".join(f"{f'{i * ctx}-{(i + 1) * ctx}':>10s}" for i in range(args.multiple)) + f"{'all':>10s}")
    for name, nll in runs.items():
        segs = [nll[i * ctx:(i + 1) * ctx].mean().item() for i in range(args.multiple)]
        print(f"{name:32s}" + "".join(f"{s:10.3f}" for s in segs) + f"{nll.mean().item():10.3f}")

    def generate(m, label: str) -> None:
        c = m.config.context_length
        prompt = tok.encode("ROMEO:\n", add_special_tokens=False)
        steps = decoderlab.generation.stream(m, [prompt], args.generate, temperature=0.8, seed=0, stop_tokens=[],
                                             tokenizer=tok, window=c - args.sinks, sinks=args.sinks)
        print(f"\n{label}: generating {args.generate} tokens ({args.generate / c:.0f}x its context {c}), "
              f"S={args.sinks}, W={c - args.sinks}")
        print(f"{'tokens':>8s} {'RSS MiB':>9s} {'cache KiB':>10s} {'cache buffer':>14s} {'tok/s':>7s}")
        text_out, count, t = [], 0, time.perf_counter()
        report = max(args.generate // 10, 1)
        for step in steps:
            count += len(step.tokens[0])
            text_out.append(step.texts[0])
            if count % report == 0 or count == args.generate:
                cache = steps.decoder.cache
                print(f"{count:8d} {rss_mib():9.1f} {cache.nbytes / 1024:10.1f} {hex(cache.keys.data_ptr()):>14s} "
                      f"{count / (time.perf_counter() - t):7.0f}")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB; "
              f"last 200 characters: {''.join(text_out)[-200:]!r}")

    generate(model, f"trained model {args.model}")
    if args.random_context:
        config = model.config.__class__(**{**model.config.__dict__, "context_length": args.random_context})
        generate(decoderlab.Transformer(config).eval(), f"random model, same shape, context {args.random_context}")


if __name__ == "__main__":
    main()
