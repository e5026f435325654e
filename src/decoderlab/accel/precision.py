"""Which precision is fast on a device: bf16 only where the hardware multiplies in it natively.

Measured on this project's hosts: on an AMD EPYC with AVX2 and no AVX-512, a 512 x 512 bf16 matrix product ran
at 1.1 GFLOP/s against 68 for fp32 (one thread; oneDNN emulates bf16 there), and a linear layer's forward and
backward under bf16 autocast took 45x as long as in fp32; on the earlier AVX-512 host bf16 was 3.7x faster than
fp32. So training's default dtype and Muon's Newton-Schulz iteration use bf16 only where this says so.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def fast_bf16(device_type: str) -> bool:
    """Whether bf16 matrix products run natively (faster than fp32) on devices of this type: CUDA GPUs that
    support bf16, CPUs whose oneDNN has bf16 kernels (AVX-512 BF16 / AMX; AVX-512 cores convert fast enough)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
