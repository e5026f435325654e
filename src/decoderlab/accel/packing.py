"""CPU weight packing: oneDNN's blocked weight layout for the skinny matrix products of decoding.

`Linear` is the model's linear layer; on the CPU it can keep its weight in oneDNN's packed layout, which streams
weights from memory about twice as fast as the plain row-major product. `packed_linear` is the custom op that
lets `torch.compile` call the packed kernel as it is. Nothing here changes what a layer computes.
"""

from __future__ import annotations

import torch
from torch import nn

# Below this many bytes of fp32 linear weights, `Transformer.pack` leaves the weights unpacked (about a
# server CPU's last-level cache: 32 MiB here).
SMALL_MODEL_BYTES = 32 * 2**20


@torch.library.custom_op("decoderlab::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b with W in oneDNN's packed layout. An op of our own so that `torch.compile` calls the packed
    kernel as it is: inductor cannot lower oneDNN's op on a packed weight that is not a frozen constant."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` that can keep a oneDNN-packed copy of its weight for CPU inference (`Transformer.pack`).

    oneDNN's blocked weight layout runs the skinny products of decoding (a few rows per step) at about
    twice the memory bandwidth of the plain row-major product, in fp32 and bf16 alike.
    """

    packed: torch.Tensor | None = None
    _packed_for: tuple = ()

    def pack(self, batch_size: int) -> None:
        # Measured here: for fp32 the layout oneDNN picks for one row streams weights at 30-42 GB/s, the one for
        # four rows at 53-66 GB/s, also when multiplying one row; for bf16 the hint makes no clear difference.
        hint = max(batch_size, 4) if self.weight.dtype == torch.float32 else batch_size
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), hint)
        self._packed_for, self._packed_batch = self._weight_key(), batch_size

    def repack(self) -> None:
        """Pack the current weight again, for the batch size of the last `pack`."""
        self.pack(self._packed_batch)

    def _weight_key(self) -> tuple:
        # Training, load_state_dict or .to() change the version, storage or dtype: the packed copy is then stale.
        return self.weight.data_ptr(), self.weight._version, self.weight.dtype

    @property
    def stale(self) -> bool:
        """Packed, but the weight has changed since."""
        return self.packed is not None and self._packed_for != self._weight_key()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # Whoever compiles repacks stale weights first (`generation.compiled`): a graph cannot check.
                return packed_linear(x, self.packed, self.bias)
            if self._packed_for == self._weight_key():
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return super().forward(x)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pack_model(model: nn.Module, batch_size: int = 1) -> nn.Module:
    """`Transformer.pack`: give every `Linear` of `model` a packed copy of its weight where that pays."""
    if (model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available()):
        return model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if model.dtype == torch.float32 and weight_bytes < SMALL_MODEL_BYTES:
        # Measured (benchmarks/decode_speed.py): fp32 weights that stay in the CPU's caches between steps run
        # faster through the plain product, whose call costs less; packing pays once they stream from memory.
        return model
    free = available_memory()
    if free is not None and 2 * weight_bytes > free:
        return model  # the packed copy must fit with room to spare: faster decoding is not worth swapping
    for module in linears:
        module.pack(batch_size)
    return model
