"""decoderlab's own CPU products for decoding (`gemv.c`): int8, int4 and bf16 weights streamed at memory speed.

torch 2.13's CPU weight-only ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) read about 1.3 GB/s of
weights at batch 1 on an AVX2 CPU, slower than the fp32 product they should beat. `gemv.c` reads each weight row
once and multiplies it into up to four rows of x at a time, with OpenMP threads over the rows (torch's own OpenMP
runtime, so the two share one thread pool). bf16 and int8 weights are widened to fp32 (the dequantized weight's
product); for int4 weights each row of x is rounded to int8 in blocks of 32 (`quantize_activations`, as llama.cpp
does for Q4_0) and the block sums are integer dot products, fast enough to keep up with memory.

The C source ships with the package and is compiled on first use with the machine's C compiler (`$CC`, else
`cc`; `-O3 -march=native -fopenmp`) into `$DECODERLAB_CACHE/kernels` (default ~/.cache/decoderlab), keyed by
the source, the compiler and the CPU. Without a compiler, off x86-64 or without AVX2 and FMA, `library()` is
None and callers keep torch's ops; `DECODERLAB_KERNELS=0` turns the kernels off. The products are custom ops
(`torch.ops.decoderlab.int8_linear`, ...) so that `torch.compile` calls them as they are.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ROW_MULTIPLE = 32  # every kernel walks the inputs 32 at a time
BF16_MAX_ROWS = 64  # bf16 rows of x up to which our kernel beats casting the weight to fp32 (AVX2, measured)

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "decoderlab_int8_linear": [_P, _I64, _I64, _P, _P, _P, _P, _I64, _INT],
    "decoderlab_int4_linear": [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, _INT],
    "decoderlab_bf16_linear": [_P, _I64, _I64, _P, _P, _P, _I64, _INT],
}


def cache_root() -> Path:
    return Path(os.environ.get("DECODERLAB_CACHE", Path.home() / ".cache" / "decoderlab")) / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(built, target)  # atomic: a concurrent process sees the old file or the whole new one


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (see the module docstring)."""
    if os.environ.get("DECODERLAB_KERNELS", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = _cpu_flags()
    if " avx2" not in flags or " fma" not in flags:
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), flags.encode()]))
    target = cache_root() / key.hexdigest()[:20] / "libdecoderlab_gemv.so"
    try:
        if not target.is_file():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"decoderlab's CPU kernels did not build ({detail.strip()[:200]}); quantized layers use "
                      "torch's slower ops", RuntimeWarning, stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def available() -> bool:
    """Whether the kernels run here."""
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(x: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    return x, torch.empty(x.shape[0], out_features, dtype=torch.float32)


def _int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x, y = _rows(x, q.shape[0])
    library().decoderlab_int8_linear(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scale.data_ptr(),
                                     _ptr(bias), y.data_ptr(), q.shape[0], torch.get_num_threads())
    return y


def _int4_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    x, y = _rows(x, q.shape[0])
    group = x.shape[1] // scale.shape[1]
    library().decoderlab_int4_linear(x.data_ptr(), x.shape[0], x.shape[1], group, q.data_ptr(), scale.data_ptr(),
                                     offset.data_ptr(), _ptr(bias), y.data_ptr(), q.shape[0],
                                     torch.get_num_threads())
    return y


def _bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x, y = _rows(x, w.shape[0])
    library().decoderlab_bf16_linear(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), _ptr(bias),
                                     y.data_ptr(), w.shape[0], torch.get_num_threads())
    return y


# The same functions as ops, for torch.compile; eager callers use the plain functions (no dispatcher overhead).
int8_linear_op = torch.library.custom_op("decoderlab::int8_linear", _int8_linear, mutates_args=())
int4_linear_op = torch.library.custom_op("decoderlab::int4_linear", _int4_linear, mutates_args=())
bf16_linear_op = torch.library.custom_op("decoderlab::bf16_linear", _bf16_linear, mutates_args=())


@int8_linear_op.register_fake
def _(x, q, scale, bias):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)


@int4_linear_op.register_fake
def _(x, q, scale, offset, bias):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)


@bf16_linear_op.register_fake
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ (q [N, K] int8 * scale [N] fp32).T + bias [N] fp32 -> [M, N] fp32."""
    return int8_linear_op(x, q, scale, bias) if torch.compiler.is_compiling() else _int8_linear(x, q, scale, bias)


def int4_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W.T + bias with W [N, K] = codes * scale + offset per group (`int4_blocks` layout) -> [M, N]."""
    if torch.compiler.is_compiling():
        return int4_linear_op(x, q, scale, offset, bias)
    return _int4_linear(x, q, scale, offset, bias)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ w.T + bias, w [N, K] bfloat16, in fp32 -> [M, N] fp32."""
    return bf16_linear_op(x, w, bias) if torch.compiler.is_compiling() else _bf16_linear(x, w, bias)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the int4 kernel sees it: each block of 32 inputs rounded to a multiple of max|x| / 127 (the
    reference the kernels are tested against; the kernels do this in C)."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).reshape(x.shape)


def int4_blocks(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K] (0..15) in the kernel's layout: uint8 [N, K/32, 16], byte j of a block holding input j in
    its low nibble and input j + 16 in its high one (a nibble split then gives inputs in order)."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).view(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).contiguous()
