"""Weight-only quantization for inference: a linear layer's weight held as int8 or int4, read with torch's CPU ops.

Batch-1 decoding reads every weight once per token, so on the CPU its speed is the memory bandwidth divided by
the bytes of the weights; int8 reads a quarter of fp32's bytes, int4 an eighth. Activations stay in the model's
float dtype; only the weights are stored in integers, dequantized inside the kernel.

- int8: per output channel, symmetric: w = q * scale, q in -127..127, one fp scale per row. Kernel:
  `torch.ops.aten._weight_int8pack_mm` (x @ q.T * scale).
- int4: grouped along the input dimension (`group_size` of 32, 64, 128 or 256 inputs share a scale and a zero),
  asymmetric: w = (q - 8) * scale + zero, q in 0..15, the form torch's CPU int4 kernel takes
  (`_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu`, scales and zeros as [K/G, N, 2]).
  That kernel wants N divisible by 16: the rows are padded with zeros for it and the output sliced back.

Where this torch lacks an op, `QuantizedWeight.linear` dequantizes and multiplies (`kernel_available` says
which). A `QuantizedWeight` sits behind the model's `accel.Linear` as the packed copy does (`Linear.quantize`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import kernels
from .packing import Linear

QUANTIZATIONS = {"int8": 8, "int4": 4}
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
DEFAULT_GROUP_SIZE = 64
_INT4_ROWS = 16  # `_convert_weight_to_int4pack_for_cpu` needs N divisible by this


def bits_of(quantize: str | int) -> int:
    """8 or 4 from "int8" / "int4" / 8 / 4; a one-line error otherwise."""
    if isinstance(quantize, int) and not isinstance(quantize, bool) and quantize in QUANTIZATIONS.values():
        return quantize
    if isinstance(quantize, str) and quantize.lower() in QUANTIZATIONS:
        return QUANTIZATIONS[quantize.lower()]
    raise UserError(f"quantize must be 'int8' or 'int4' (bits 8 or 4), not {quantize!r}")


def check_group_size(group_size: int, in_features: int | None = None, name: str = "weight") -> None:
    """A one-line error unless `group_size` is one torch's int4 kernel takes and divides `in_features`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise UserError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, not {group_size!r}")
    if in_features is not None and in_features % group_size:
        divisors = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        hint = f"use group_size {divisors[-1]}" if divisors else "quantize it to int8"
        raise UserError(f"group_size {group_size} does not divide {name}'s {in_features} input features; {hint}")


@functools.cache
def kernel_available(bits: int) -> bool:
    """Whether this torch has (and runs) the CPU kernel for `bits`; without it `linear` dequantizes."""
    try:
        x = torch.ones(1, 32)
        if bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x, torch.ones(16, 32, dtype=torch.int8), torch.ones(16))
            return bool(torch.allclose(y, torch.full((1, 16), 32.0)))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.full((16, 32), 9, dtype=torch.int32), 1)
        scale_zeros = torch.stack([torch.ones(1, 16), torch.zeros(1, 16)], -1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scale_zeros)
        return bool(torch.allclose(y, torch.full((1, 16), 32.0)))
    except (AttributeError, RuntimeError):
        return False


class QuantizedWeight:
    """One linear weight [out, in] in int8 (per row) or int4 (per group), with what its kernel needs.

    The stored form (`state`, what a quantized folder holds) is portable: `qweight` int8 [N, K] (int8) or uint8
    [N, K/2] with two 4-bit values a byte, the even input's in the low nibble (int4); `scales` [N] or [N, K/G];
    `zeros` [N, K/G] (int4 only). The kernel form (torch's CPU int4 layout) is built from it on load.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int, group_size: int | None, in_features: int) -> None:
        self.bits, self.group_size, self.in_features = bits, group_size, in_features
        self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.out_features = qweight.shape[0]
        self.dtype = scales.dtype
        self._int4_packed: torch.Tensor | None = None
        self._int4_scale_zeros: torch.Tensor | None = None
        # Read here, not in `linear`: torch.compile cannot trace the probes.
        self._own = kernels.available() and in_features % kernels.ROW_MULTIPLE == 0 and qweight.device.type == "cpu"
        self._kernel = kernel_available(bits)
        if self._own:
            self._prepare_own_kernel()
        elif bits == 4 and self._kernel:
            self._prepare_int4_kernel()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                   name: str = "weight") -> QuantizedWeight:
        """Quantize a float weight [out, in] (its dtype becomes the scales' and the activations')."""
        bits = bits_of(bits)
        w = weight.detach().float()
        out_features, in_features = w.shape
        if bits == 8:
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric: -127..127, 0 stays exact
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            return cls(q, scale.to(weight.dtype), None, 8, None, in_features)
        check_group_size(group_size, in_features, name)
        groups = w.view(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
        zero = low + 8 * scale  # w = (q - 8) * scale + zero gives low at q = 0, as torch's kernel computes
        q = q.view(out_features, in_features)
        nibbles = q[:, 0::2] | (q[:, 1::2] << 4)
        return cls(nibbles, scale.to(weight.dtype), zero.to(weight.dtype), 4, group_size, in_features)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], bits: int, group_size: int | None,
                   in_features: int) -> QuantizedWeight:
        """Back from `state` (a quantized folder's tensors for one layer)."""
        return cls(state["qweight"], state["scales"], state.get("zeros"), bits, group_size, in_features)

    def state(self) -> dict[str, torch.Tensor]:
        """The stored form's tensors by suffix ("qweight", "scales", and "zeros" for int4)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def codes(self) -> torch.Tensor:
        """The integer values [out, in]: int8 as stored, int4 unpacked to 0..15 (int32)."""
        if self.bits == 8:
            return self.qweight
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int32, device=self.qweight.device)
        q[:, 0::2] = (self.qweight & 15).to(torch.int32)
        q[:, 1::2] = (self.qweight >> 4).to(torch.int32)
        return q

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel computes with [out, in], in the scales' dtype."""
        if self.bits == 8:
            return (self.qweight.float() * self.scales.float()[:, None]).to(self.dtype)
        g = self.group_size
        q = self.codes().float().view(self.out_features, -1, g)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(self.out_features, self.in_features).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form."""
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def _prepare_own_kernel(self) -> None:
        self._scale_f32 = self.scales.float().contiguous()
        if self.bits == 8:
            self.qweight = self.qweight.contiguous()
            return
        self._int4_blocks = kernels.int4_blocks(self.codes())
        self._offset_f32 = (self.zeros.float() - 8 * self.scales.float()).contiguous()  # w = q * scale + offset

    def _prepare_int4_kernel(self) -> None:
        rows = -self.out_features % _INT4_ROWS
        codes = F.pad(self.codes(), (0, 0, 0, rows))
        self._int4_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scales, zeros = (F.pad(t, (0, 0, 0, rows), value=1.0 if t is self.scales else 0.0)
                         for t in (self.scales, self.zeros))
        self._int4_scale_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()

    def to_dtype(self, dtype: torch.dtype) -> QuantizedWeight:
        """The same integers with scales (and activations) in `dtype`."""
        zeros = None if self.zeros is None else self.zeros.to(dtype)
        return QuantizedWeight(self.qweight, self.scales.to(dtype), zeros, self.bits, self.group_size,
                               self.in_features)

    def linear_with_grad(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`linear` that autograd can go back through to `x` (and `bias`): the weight stays frozen (QLoRA:
        adapters trained on a quantized base). torch's int8/int4 kernels have no derivative, so the backward
        dequantizes this one weight for the moment it needs it (grad_x = grad_y @ W); only one layer's float
        weight exists at a time. `x` may be in another dtype (autocast): it is computed in the scales' dtype."""
        y = _QuantizedLinear.apply(x.reshape(-1, self.in_features), bias, self)
        return y.view(*x.shape[:-1], self.out_features)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T + b with W this weight; x [..., in] in the scales' dtype."""
        return self.linear_2d(x.reshape(-1, self.in_features), bias).view(*x.shape[:-1], self.out_features)

    def linear_2d(self, flat: torch.Tensor, bias: torch.Tensor | None, exact: bool = False) -> torch.Tensor:
        """`linear` of rows `flat` [N, in] -> [N, out]. `exact`: the dequantized weight's product also for int4
        (whose kernel rounds the activations to int8): what training on a quantized base differentiates."""
        if self._own and exact and self.bits == 4:
            y = flat @ self.dequantize().t()
            return y if bias is None else y + bias
        if self._own:  # any row count: at 32-512 rows as fast as dequantizing and multiplying, with no float copy
            bias32 = None if bias is None else bias.float()
            if self.bits == 8:
                y = kernels.int8_linear(flat, self.qweight, self._scale_f32, bias32)
            else:
                y = kernels.int4_linear(flat, self._int4_blocks, self._scale_f32, self._offset_f32, bias32)
            return y.to(self.dtype)
        if self.bits == 8 and self._kernel:
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales)
        elif self.bits == 4 and self._int4_packed is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self._int4_packed, self.group_size,
                                                           self._int4_scale_zeros)
            if y.shape[-1] != self.out_features:
                y = y[:, :self.out_features]
        else:  # no kernel in this torch: dequantize and multiply (correct, not faster)
            y = flat @ self.dequantize().t()
        if bias is not None:
            y = y + bias
        return y


class _QuantizedLinear(torch.autograd.Function):
    """y = x @ W.T + b for a frozen `QuantizedWeight` W: the kernel forward, a dequantizing backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight: QuantizedWeight) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Exact (the dequantized product): the backward below differentiates that function.
        y = weight.linear_2d(x.to(weight.dtype), None if bias is None else bias.to(weight.dtype), exact=True)
        # A view made inside a Function may not be changed in place later (LoRA adds into its output): a new tensor.
        return y.clone() if y._is_view() else y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.weight
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(weight.dtype) @ weight.dequantize()).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def quantize_model(model: nn.Module, quantize: str | int = "int8", group_size: int = DEFAULT_GROUP_SIZE,
                   lm_head: bool = True) -> nn.Module:
    """Quantize every `Linear` of `model` in place (`Linear.quantize`), the LM head too unless `lm_head` is False.

    Every layer is checked first (a group size that does not divide a layer's inputs fails before anything
    changes). The plain weights' storage is released where nothing else holds them; a tied LM head keeps the
    embedding's. `model.unpack()` (or `train()`) goes back to plain layers holding the dequantized weights.
    """
    bits = bits_of(quantize)
    if bits == 4:
        check_group_size(group_size)
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, Linear) and (lm_head or name != "lm_head")]
    for name, module in layers:
        if module.weight_device.type != "cpu":
            raise UserError(f"weight-only quantization runs on the CPU; {name} is on {module.weight_device} "
                            "(load with device='cpu')")
        if bits == 4:
            check_group_size(group_size, module.in_features, name)
    with torch.no_grad():
        for name, module in layers:
            module.quantize(QuantizedWeight.from_float(module.unpacked_weight(), bits, group_size, name))
    model.quantization = {"bits": bits, "group_size": group_size if bits == 4 else None, "lm_head": lm_head}
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedWeight]:
    """The quantized weights of `model` by layer name ("blocks.0.attn.qkv"), empty for a float model."""
    return {name: m.quantized for name, m in model.named_modules()
            if isinstance(m, Linear) and m.quantized is not None}
