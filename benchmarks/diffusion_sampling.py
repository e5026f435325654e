"""Masked diffusion sampling speed: `diffusion_generate` at steps = tokens and steps = tokens / 4, beside a port of
LLaDA's reference `generate()` on the same weights, and causal KV-cached `generate` on the same backbone.

Run: .venv/bin/python benchmarks/diffusion_sampling.py [--layers 4 --width 256 --vocab 4096 --prompt 32 --new 128
     --block 32 --repeats 5]
A random bidirectional diffusion model (Llama-style, weights packed for the CPU as `load` does) generates --new
tokens after a --prompt-token prompt, greedy, with no stop tokens. Prints tokens/s (median of --repeats runs,
interleaved), the forward passes, and whether our greedy tokens equal the reference port's (tests/
test_diffusion_sampler.py checks that on a trained model against the unchanged reference). The reference runs the
LM head over the whole sequence at every step; ours only over the slots of the current block. The causal line is the
same backbone with objective "causal" decoded with its KV cache (a different model, there for scale).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decoderlab
from decoderlab import ModelConfig, Transformer
from decoderlab.generation import DiffusionSampler, stream


def llada_generate(model, prompt, steps, gen_length, block_length, mask_id):
    """LLaDA's reference `generate()` (GSAI-ML/LLaDA generate.py), greedy low-confidence remasking, with one change
    that ours makes too: x0 is never the mask token (a random model predicts it everywhere; a trained one never)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        mask_num = (x[:, start:start + block_length] == mask_id).sum(dim=1, keepdim=True)
        num_transfer_tokens = torch.zeros(x.shape[0], steps, dtype=torch.long) + mask_num // steps
        for j in range(x.shape[0]):
            num_transfer_tokens[j, :int(mask_num[j] % steps)] += 1
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits.index_fill(-1, torch.tensor([mask_id]), -torch.inf), dim=-1)
            x0_p = torch.gather(torch.softmax(logits, dim=-1), -1, x0[..., None])[..., 0]
            x0_p[:, start + block_length:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                transfer_index[j, torch.topk(confidence[j], k=int(num_transfer_tokens[j, i])).indices] = True
            x[transfer_index] = x0[transfer_index]
    return x[:, prompt.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, n_layers=args.layers, n_heads=args.width // 64, d_model=args.width,
                         context_length=args.prompt + args.new, positions="rope", norm="rmsnorm",
                         activation="swiglu", objective="diffusion", bidirectional=True,
                         mask_token_id=args.vocab - 1)
    model = Transformer(config).eval().pack()
    causal = Transformer(config.replace(objective="causal", bidirectional=False, mask_token_id=None)).eval()
    causal.load_state_dict(model.state_dict())
    causal.pack()
    prompt = torch.randint(0, args.vocab - 1, (1, args.prompt))
    ids = prompt.tolist()
    n = args.new

    def ours(steps):
        def run():
            s = stream(model, ids, n, temperature=0, stop_tokens=[], decoder=DiffusionSampler(steps, args.block))
            tokens = [t for step in s for t in step.tokens[0]]
            return tokens, s.decoder.forward_passes
        return run

    def reference(steps):
        def run():
            with torch.no_grad():
                return llada_generate(model, prompt, steps, n, args.block, config.mask_token_id)[0], steps
        return run

    def cached():
        return decoderlab.generate(causal, ids, n, temperature=0, stop_tokens=[]).tokens[0], n

    arms = {f"ours, steps={n}": ours(n), f"LLaDA reference, steps={n}": reference(n),
            f"ours, steps={n // 4}": ours(n // 4), f"LLaDA reference, steps={n // 4}": reference(n // 4),
            "causal KV-cached generate (same backbone)": cached}
    times: dict[str, list[float]] = {name: [] for name in arms}
    outputs: dict[str, tuple[list[int], int]] = {}
    for name, run in arms.items():  # warm-up
        outputs[name] = run()
    for _ in range(args.repeats):
        for name, run in arms.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"{args.layers} layers x {args.width}, vocab {args.vocab}, prompt {args.prompt}, {n} new tokens, block "
          f"{args.block}, batch 1, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'arm':44s} {'tokens/s':>9s} {'passes':>7s}")
    for name in arms:
        tokens, passes = outputs[name]
        print(f"{name:44s} {len(tokens) / statistics.median(times[name]):9.1f} {passes:7d}")
    for steps in (n, n // 4):
        same = outputs[f"ours, steps={steps}"][0] == outputs[f"LLaDA reference, steps={steps}"][0]
        print(f"steps={steps}: our greedy tokens equal the reference's: {same}")


if __name__ == "__main__":
    main()
