"""Forward throughput of the `gpt2` preset: decoderlab vs transformers' GPT2LMHeadModel, same weights.

Run: .venv/bin/python benchmarks/forward_speed.py [--batch 8 --seq 256 --repeats 5]
Prints tokens/s (median of --repeats timed passes after a warm-up) for fp32 and bf16 and the ratios.
Targets (issue #2): decoderlab >= 1.0x transformers in fp32; decoderlab bf16 >= 2x decoderlab fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decoderlab
from decoderlab import hf


def tokens_per_s(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import transformers

    torch.manual_seed(0)
    ours = decoderlab.load(args.preset).eval()
    hf_config = transformers.GPT2Config(**{k: v for k, v in ours.config.to_hf_config().items()
                                           if k not in ("architectures", "torch_dtype")})
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = theirs.load_state_dict(hf.to_hf_state_dict(ours.config, ours.state_dict()), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    theirs.tie_weights()

    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"{args.preset} batch {args.batch} x {args.seq}, median of {args.repeats}")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        theirs.to(dtype)
        with torch.inference_mode():
            diff = (ours(ids[:1, :32]).float() - theirs(ids[:1, :32]).logits.float()).abs().max().item()
            ours_tps = tokens_per_s(lambda: ours(ids), tokens, args.repeats)
            theirs_tps = tokens_per_s(lambda: theirs(ids), tokens, args.repeats)
        name = str(dtype).removeprefix("torch.")
        results[name] = ours_tps
        print(f"{name:9s} decoderlab {ours_tps:9.0f} tok/s   transformers {theirs_tps:9.0f} tok/s   "
              f"ratio {ours_tps / theirs_tps:5.2f}x   max |logit diff| {diff:.1e}")
    print(f"bf16 / fp32 (decoderlab): {results['bfloat16'] / results['float32']:.2f}x")


if __name__ == "__main__":
    main()
