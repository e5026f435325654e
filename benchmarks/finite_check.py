"""What `load`'s NaN/inf check costs: one `aminmax` pass per weight vs the obvious `isfinite().all()`, on GPT-2
124M-shaped weights, and `decoderlab.load` of a saved gpt2-shaped folder with the check on and off.

Run: .venv/bin/python benchmarks/finite_check.py [--repeats 5] [--no-load]
Prints medians (ms) per dtype. `aminmax` is exact (min and max are NaN if any value is, +-inf if any is
infinite) and allocates nothing the size of a weight; `isfinite().all()` writes a bool tensor per weight.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import decoderlab
from decoderlab import ModelConfig, Transformer


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _aminmax(weights: list[torch.Tensor]) -> bool:
    flags = [lo.isfinite() & hi.isfinite() for lo, hi in map(torch.aminmax, weights)]
    return bool(torch.stack(flags).all())


def _isfinite(weights: list[torch.Tensor]) -> bool:
    return all(bool(w.isfinite().all()) for w in weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-load", action="store_true", help="skip the save + load timing (writes 500 MB)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2")).eval()
    print(f"gpt2 preset: {model.num_params() / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        weights = [p.detach().to(dtype) for p in model.parameters()]
        fast, slow = _median_ms(lambda w=weights: _aminmax(w), args.repeats), \
            _median_ms(lambda w=weights: _isfinite(w), args.repeats)
        print(f"{str(dtype).removeprefix('torch.'):9s} aminmax {fast:7.1f} ms   isfinite().all() {slow:7.1f} ms")
    if args.no_load:
        return
    with tempfile.TemporaryDirectory() as folder:
        decoderlab.save(model, folder)
        for check in (False, True, False, True):  # interleaved: page-cache warmth hits both alike
            ms = _median_ms(lambda c=check: decoderlab.load(folder, check_finite=c), args.repeats)
            print(f"load(check_finite={check!s:5s}) {ms:7.1f} ms")


if __name__ == "__main__":
    main()
