"""Accuracy of weight-only quantization: the quantized model against its float original, on held-out text.

Run: .venv/bin/python benchmarks/quant_accuracy.py MODEL --text FILE [--held-out 0.1] [--quantize int8 int4]
     [--group-size 64] [--tokens 256] [--chars 20000]
MODEL is a folder with its tokenizer (a `decoderlab train` run: random GPT-2-shaped weights make perplexity
meaningless). The held-out text is the last `--held-out` fraction of FILE (`decoderlab train` validates on the
end of its data), cut to `--chars` characters. For each quantization it prints: perplexity of the float and the
quantized model (`decoderlab.perplexity`, the same windows) and the relative increase; greedy-token agreement
over `--tokens` generated tokens (from 16-token held-out prompts, each continued to the context length; matching
tokens in total, and before the first difference, prompts concatenated); and the per-layer error: for every
linear layer, ||y_q - y|| / ||y|| on the float model's own inputs to
that layer over the held-out text (the worst and the median layer, and the worst layer's name).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

import decoderlab
from decoderlab.accel import Linear, quantized_layers


def layer_errors(model: decoderlab.Transformer, quantized: decoderlab.Transformer,
                 ids: torch.Tensor) -> dict[str, float]:
    """Relative output error of each quantized linear layer on the inputs the float model feeds it."""
    inputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0]))
             for name in quantized_layers(quantized)]
    with torch.inference_mode():
        model(ids)
    for h in hooks:
        h.remove()
    errors = {}
    qmodules = dict(quantized.named_modules())
    with torch.inference_mode():
        for name, x in inputs.items():
            float_layer: Linear = modules[name]
            y = torch.nn.functional.linear(x, float_layer.unpacked_weight(), float_layer.bias)
            errors[name] = ((qmodules[name](x) - y).norm() / y.norm()).item()
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--chars", type=int, default=20000)
    ap.add_argument("--quantize", nargs="+", default=["int8", "int4"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()

    text = Path(args.text).read_text(encoding="utf-8")
    held = text[int(len(text) * (1 - args.held_out)):][:args.chars]
    tok = decoderlab.Tokenizer.from_folder(args.model)
    model = decoderlab.load(args.model, pack=False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.model}: "
          f"{model.num_params() / 1e6:.1f}M params; held-out text {len(held)} chars (last {args.held_out:.0%} of "
          f"{args.text})", flush=True)
    base = decoderlab.perplexity(model, texts=[held], tokenizer=tok).total.perplexity
    # --tokens greedy tokens in all, from 16-token held-out prompts, as many as the context length needs.
    context = model.config.context_length
    n = min(args.tokens, context - 16)
    starts = range(0, len(held), max(len(held) // 64, 1))
    prompts = [tok.encode(held[s:s + 256])[:16] for s in starts][:-(-args.tokens // n)]
    reference = sum(decoderlab.generate(model, prompts, n, temperature=0.0, stop_tokens=[]).tokens, [])
    ids = torch.tensor([tok.encode(held[:4 * context])[:context]])
    print(f"float: perplexity {base:.4f}", flush=True)
    for q in args.quantize:
        quantized = copy.deepcopy(model).quantize(q, args.group_size)
        ppl = decoderlab.perplexity(quantized, texts=[held], tokenizer=tok).total.perplexity
        rows = decoderlab.generate(quantized, prompts, n, temperature=0.0, stop_tokens=[]).tokens
        got = sum(rows, [])
        agree = sum(a == b for a, b in zip(got, reference, strict=False))
        first = next((i for i, (a, b) in enumerate(zip(got, reference, strict=False)) if a != b),
                     min(len(got), len(reference)))
        errors = layer_errors(model, quantized, ids)
        worst = max(errors, key=errors.get)
        print(f"{q}{f' (group {args.group_size})' if q == 'int4' else ''}: perplexity {ppl:.4f} "
              f"({ppl / base - 1:+.2%}); greedy agreement {agree}/{len(reference)} tokens, identical for the first "
              f"{first}; per-layer relative error median {statistics.median(errors.values()):.4f}, worst "
              f"{errors[worst]:.4f} ({worst})", flush=True)


if __name__ == "__main__":
    main()
