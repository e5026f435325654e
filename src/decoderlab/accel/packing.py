"""CPU weight packing: oneDNN's blocked weight layout for the skinny matrix products of decoding.

`Linear` is the model's linear layer; on the CPU it can keep its weight in oneDNN's packed layout, which streams
weights from memory up to twice as fast as the plain row-major product. A packed layer holds one copy of its
weight: `pack_model` releases the plain storage (the `Parameter` keeps its shape and dtype, not its bytes), and
whatever reaches for the weight through the module (attribute access, `parameters()`, `.to()`, `load_state_dict`,
copies, a forward with gradients) gets it back first, unpacked bit for bit. `packed_linear` is the custom op that
lets `torch.compile` call the packed kernel as it is. Nothing here changes what a layer computes.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

if TYPE_CHECKING:
    from .quantize import QuantizedWeight

# Below this many bytes of fp32 linear weights, `Transformer.pack` leaves the weights unpacked (about a
# server CPU's last-level cache: 32 MiB here).
SMALL_MODEL_BYTES = 32 * 2**20
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("decoderlab::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b with W in oneDNN's packed layout. An op of our own so that `torch.compile` calls the packed
    kernel as it is: inductor cannot lower oneDNN's op on a packed weight that is not a frozen constant."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


@functools.cache
def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs weights of `dtype` and unpacks them exactly (bf16 needs AVX-512 or
    AVX-NE-CONVERT; on a CPU without them oneDNN refuses)."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    weight = (torch.arange(24 * 40, dtype=torch.float32).view(24, 40) % 13 - 6).to(dtype)
    x = torch.ones(1, 40, dtype=dtype)
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            return torch.equal(packed.to_dense(), weight) and torch.allclose(y.float(), (x @ weight.T).float())
    except RuntimeError:
        return False


def _references(table: dict, name: str) -> int:
    """References to `table[name]`, counted the same way for every caller (the interpreter's own references
    while counting included): compare with `_ONLY_IN_TABLE`."""
    value = dict.__getitem__(table, name)
    return sys.getrefcount(value)


_ONLY_IN_TABLE = _references({"x": object()}, "x")  # what `_references` counts for a value held nowhere else


class _PlainOnRead(dict):
    """The parameter table of a `Linear` whose plain weight is released: every way of reading the weight out of
    it (`module.weight`, `parameters()`, `named_parameters()`, `state_dict(keep_vars=True)`, `.to()`,
    `load_state_dict`, `repr`) first gives the layer its plain weight back, so no caller ever sees the empty
    storage. The layer then holds a plain table again; keys and membership are served without that."""

    def __init__(self, params: dict, owner: Linear) -> None:
        super().__init__(params)
        self._owner = weakref.ref(owner)

    def _plain(self) -> dict:
        """The owner's table after giving its weight back (self if the owner is gone)."""
        owner = self._owner()
        if owner is None:
            return self
        owner._restore_plain()
        return owner.__dict__["_parameters"]

    def __getitem__(self, key):
        if key == "weight":
            self._plain()
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "weight":
            self._plain()
        return super().get(key, default)

    def __iter__(self):  # keeps dict(table) and {**table} off CPython's fast path, which reads values directly
        return iter(list(self.keys()))

    def _listed(self) -> dict:
        # torch.compile lists every module's parameters to mark them static (metadata only): that must not unpack.
        # Code that it traces reads a released weight through `Linear.forward`, which gives it back first.
        return self if torch.compiler.is_compiling() else self._plain()

    def items(self):
        return dict.items(self._listed())

    def values(self):
        return dict.values(self._listed())

    def copy(self) -> dict:
        return dict(dict.items(self._plain()))

    # dict's own methods on the table returned: it may be this one (owner gone), whose overrides would recurse.
    def pop(self, *args):
        return dict.pop(self._plain(), *args)

    def popitem(self):
        return dict.popitem(self._plain())

    def setdefault(self, *args):
        return dict.setdefault(self._plain(), *args)

    def update(self, *args, **kwargs) -> None:
        dict.update(self._plain(), *args, **kwargs)

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self._plain(), key, value)

    def __delitem__(self, key) -> None:
        dict.__delitem__(self._plain(), key)

    def __repr__(self) -> str:
        return dict.__repr__(self._plain())

    def __eq__(self, other) -> bool:
        return dict.__eq__(self._plain(), other)

    __hash__ = None

    def __reduce_ex__(self, protocol):
        return dict, (self.copy(),)


class Linear(nn.Linear):
    """`nn.Linear` that can keep its weight in oneDNN's packed layout for CPU inference (`Transformer.pack`).

    oneDNN's blocked weight layout runs the skinny products of decoding (a few rows per step) at up to
    twice the memory bandwidth of the plain row-major product (1.3-1.5x on an AVX2 CPU), fp32 and bf16
    alike. `pack(release=True)` keeps the packed copy only; the plain weight comes back (unpacked from the
    packed copy, exactly) when anything reads it through the module. A weight changed after packing
    (`stale`) is used unpacked until `repack`.
    """

    _packed: torch.Tensor | None = None
    _packed_for: tuple = ()
    _packed_batch: int = 1
    _released: bool = False
    _quantized: QuantizedWeight | None = None
    _bf16_kernel: bool = False  # bf16 weights oneDNN cannot pack here: decoded with kernels.bf16_linear

    @property
    def quantized(self) -> QuantizedWeight | None:
        """The weight in int8/int4 (`quantize`), or None."""
        return self._quantized

    @property
    def packed(self) -> torch.Tensor | None:
        """The weight in oneDNN's packed layout, or None. Setting None unpacks the layer (`unpack`)."""
        return self._packed

    @packed.setter
    def packed(self, value: None) -> None:
        if value is not None:
            raise TypeError("set Linear.packed only to None (to unpack); pack with Linear.pack(batch_size)")
        self.unpack()

    @property
    def released(self) -> bool:
        """Whether the plain weight's storage is released (the packed copy is the only one)."""
        return self._released

    def _raw_weight(self) -> nn.Parameter:
        # The parameter as stored, without giving a released weight back (metadata and bookkeeping only).
        return dict.__getitem__(self._parameters, "weight")

    def _weight_key(self) -> tuple:
        # Training, load_state_dict or .to() change the version, storage or dtype: the packed copy is then stale.
        weight = self._raw_weight()
        return weight.data_ptr(), weight._version, weight.dtype

    @property
    def stale(self) -> bool:
        """Packed, but the weight has changed since."""
        held = self._packed is not None or self._quantized is not None
        return held and not self._released and self._packed_for != self._weight_key()

    @property
    def frozen(self) -> bool:
        """Whether the weight is frozen (requires no gradient), read without giving a released weight back."""
        return not self._raw_weight().requires_grad

    @property
    def weight_device(self) -> torch.device:
        """The weight's device (whether or not its plain storage is held)."""
        return self._raw_weight().device

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight (whether or not its plain storage is held)."""
        weight = self._raw_weight()
        return weight.numel() * weight.element_size()

    def pack(self, batch_size: int = 1, release: bool = False) -> bool:
        """Pack the weight for CPU products of about `batch_size` rows; with `release`, also drop the plain
        storage where nothing else holds the weight (`release`). Returns whether the layer is packed (False
        off the CPU or in a dtype this CPU's oneDNN does not pack; a bf16 layer oneDNN cannot pack is marked
        for `kernels.bf16_linear` instead, where those kernels run)."""
        device, dtype = self._raw_weight().device, self._raw_weight().dtype
        if device.type != "cpu" or self._quantized is not None:
            return False
        if not packing_supported(dtype):
            # An AVX2 CPU's oneDNN does not pack bf16; its plain bf16 product is slower than our own kernel.
            self._bf16_kernel = (dtype == torch.bfloat16 and self.in_features % kernels.ROW_MULTIPLE == 0
                                 and kernels.available())
            return False
        current = self._packed is not None and (self._released or self._packed_for == self._weight_key())
        if not current or self._hint(self._packed_batch) != self._hint(batch_size):
            self._restore_plain()
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self._raw_weight().detach(),
                                                                       self._hint(batch_size))
            self._packed_for = self._weight_key()
        self._packed_batch = batch_size
        if release:
            self.release()
        return True

    def quantize(self, weight: QuantizedWeight, release: bool = True) -> None:
        """Compute with `weight` (this layer's weight quantized, `accel.quantize`) instead of the float weight; with
        `release`, drop the plain storage as `pack` does. Reading the weight through the module then gives the
        dequantized weight; `unpack` goes back to a plain layer holding it."""
        self.unpack()
        self._quantized = weight
        self._packed_for = self._weight_key()
        if release:
            self.release()

    def _hint(self, batch_size: int) -> int:
        # Measured here: for fp32 the layout oneDNN picks for one row streams weights at 30-42 GB/s, the one for
        # four rows at 53-66 GB/s, also when multiplying one row; for bf16 the hint makes no clear difference.
        return max(batch_size, 4) if self._raw_weight().dtype == torch.float32 else batch_size

    def repack(self) -> None:
        """Pack the current weight again, for the batch size of the last `pack`."""
        self.pack(self._packed_batch)

    def release(self) -> bool:
        """Drop the plain weight's storage, keeping the packed copy as the only one. Only where that is safe:
        the packed copy is current and nothing but this layer holds the weight (a tied weight, one held by an
        optimizer or a variable, or one with a gradient is left alone). Returns whether it is released."""
        if self._released:
            return True
        if (self._packed is None and self._quantized is None) or self.stale:
            return False
        # Anyone else holding the parameter (or, in C++, its tensor: autograd's saved tensors) could read it
        # directly, and would find it empty.
        if _references(self._parameters, "weight") > _ONLY_IN_TABLE:
            return False
        weight = self._raw_weight()
        if weight.grad is not None or getattr(weight, "_use_count", lambda: 1)() > 1:
            return False
        with torch.inference_mode(False), torch.no_grad():
            stub = torch.empty_like(weight)
            stub.untyped_storage().resize_(0)  # same shape, strides and dtype; no bytes
            weight.data = stub
        self.__dict__["_parameters"] = _PlainOnRead(self._parameters, self)
        self._released = True
        return True

    def unpacked_weight(self) -> torch.Tensor:
        """The plain weight, as a new tensor when released (unpacked from the packed copy, bit for bit; or the
        quantized weight dequantized)."""
        if not self._released:
            return self._raw_weight().detach()
        with torch.inference_mode(False), torch.no_grad():
            if self._quantized is not None:
                return self._quantized.dequantize()
            return self._packed.to_dense()

    @torch.compiler.disable
    def _restore_plain(self) -> None:
        """Give a released layer its plain weight back (the packed copy stays, and stays current)."""
        if not self._released:
            return
        weight = self._raw_weight()
        plain = self.unpacked_weight()
        with torch.inference_mode(False), torch.no_grad():
            weight.data = plain
        self.__dict__["_parameters"] = dict(dict.items(self._parameters))
        self._released = False
        self._packed_for = self._weight_key()

    def unpack(self) -> None:
        """Back to a plain layer: the weight unpacked where released, the packed copy dropped (a quantized layer
        keeps its weight dequantized: the rounding stays)."""
        self._restore_plain()
        self._packed, self._packed_for, self._quantized = None, (), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self._quantized
        if quantized is not None and not torch.is_grad_enabled() and x.dtype == quantized.dtype:
            if torch.compiler.is_compiling() or self._released or self._packed_for == self._weight_key():
                return quantized.linear(x, self.bias)
        if quantized is not None and torch.is_grad_enabled() and self.frozen and (
                self._released or self._packed_for == self._weight_key()):
            # A frozen quantized layer under autograd (QLoRA): gradients flow to the input, the weight stays int.
            return quantized.linear_with_grad(x, self.bias)
        packed = self._packed
        if packed is not None and not torch.is_grad_enabled() and x.dtype == packed.dtype:
            if torch.compiler.is_compiling():
                # Whoever compiles repacks stale weights first (`generation.compiled`): a graph cannot check.
                return packed_linear(x, packed, self.bias)
            if self._released or self._packed_for == self._weight_key():
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        if self._bf16_kernel and not torch.is_grad_enabled() and x.dtype == torch.bfloat16:
            weight = self._raw_weight()
            if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.is_contiguous():
                bias = None if self.bias is None else self.bias.float()
                flat = x.reshape(-1, self.in_features)
                if flat.shape[0] <= kernels.BF16_MAX_ROWS:
                    y = kernels.bf16_linear(flat, weight, bias)
                else:  # a long prompt: this CPU's fp32 product beats its bf16 one by far, even with the cast
                    y = F.linear(flat.float(), weight.float(), bias)
                return y.to(torch.bfloat16).view(*x.shape[:-1], self.out_features)
        if self._released:
            self._restore_plain()  # gradients, training: the plain weight (a graph break under torch.compile)
        return super().forward(x)

    def _apply(self, fn, recurse: bool = True):
        held = self._packed if self._packed is not None else self._quantized
        if held is not None:
            probe = torch.empty(0, dtype=held.dtype)
            if fn(probe) is probe:  # .to() / .float() / .cpu() that change nothing: stay packed
                return self
            self.unpack()  # another dtype or device: the packed copy would be stale
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if not self._released or keep_vars:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        # A copy unpacked for the caller (e.g. `save`): the layer stays packed, with no second copy kept.
        for name, param in dict.items(self._parameters):
            if param is not None:
                destination[prefix + name] = self.unpacked_weight() if name == "weight" else param.detach()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.unpack()  # new values make the packed copy stale
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) are plain layers: oneDNN's packed tensors cannot be copied or pickled.
        state = super().__getstate__()
        params = dict(dict.items(self._parameters))
        if self._released:
            weight = params["weight"]
            params["weight"] = nn.Parameter(self.unpacked_weight(), requires_grad=weight.requires_grad)
        state.update(_parameters=params, _packed=None, _packed_for=(), _released=False, _quantized=None)
        return state


def stored_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of `model` once, as stored: released weights stay released (for metadata and bookkeeping:
    sizes, flags). `model.parameters()` gives each one its plain weight back."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        seen.update((id(p), p) for p in dict.values(module._parameters) if p is not None)
    return list(seen.values())


def stored_tensors(model: nn.Module) -> list[torch.Tensor]:
    """`stored_parameters` and the buffers of `model`."""
    return [*stored_parameters(model), *(b for b in model.buffers() if b is not None)]


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


def pack_model(model: nn.Module, batch_size: int = 1, release: bool = True) -> nn.Module:
    """`Transformer.pack`: pack every `Linear` of `model` where that pays and, with `release`, keep the packed
    copy as the only one wherever that is safe (`Linear.release`)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not linears or model.device.type != "cpu":
        return model
    if not packing_supported(model.dtype):
        for module in linears:  # nothing to pack; bf16 layers are marked for kernels.bf16_linear where it runs
            module.pack(batch_size)
        return model
    weight_bytes = sum(m.weight_bytes for m in linears)
    if model.dtype == torch.float32 and weight_bytes < SMALL_MODEL_BYTES:
        # Measured (benchmarks/decode_speed.py): fp32 weights that stay in the CPU's caches between steps run
        # faster through the plain product, whose call costs less; packing pays once they stream from memory.
        return model
    new_bytes = sum(m.weight_bytes for m in linears if m.packed is None)
    free = available_memory()
    if free is not None and 2 * new_bytes > free:
        return model  # packing needs room for a layer's copy at a time and more: not worth swapping
    for module in linears:
        module.pack(batch_size, release=release)
    return model


def finish_load(model: nn.Module, pack: bool = True) -> nn.Module:
    """`load`'s last step on the CPU: pack the model (`pack_model`, unless `pack` is False), then drop the pages
    of the checkpoint file that loading read from this process's resident memory (`drop_file_pages`)."""
    if model.device.type == "cpu":
        if pack:
            pack_model(model)
        drop_file_pages(model)
    return model


def drop_file_pages(model: nn.Module) -> int:
    """Unmap the resident pages of the file mappings that `model`'s tensors view (safetensors and `torch.load(...,
    mmap=True)` map checkpoint files), returning how many bytes of mappings were advised.

    Loading reads every tensor through the mapping; the pages read stay in the process's resident set while any
    tensor still views the file (an embedding, a bias), though most were only read to be transposed, converted
    or packed. MADV_DONTNEED drops them from the resident set; a later read of a tensor in the file takes its page
    from the page cache (or the disk) again. Only for a mapping nothing has written to: a private mapping's
    written pages would be discarded. `load` calls it on the model it has just built, before anyone else holds it.
    """
    if not sys.platform.startswith("linux"):
        return 0
    pointers = {t.data_ptr() for t in stored_tensors(model) if t.device.type == "cpu"} - {0}
    mappings = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].startswith("/"):
                    continue  # anonymous memory, the heap, the stack: not a file's pages
                start, end = (int(a, 16) for a in fields[0].split("-"))
                if any(start <= p < end for p in pointers):
                    mappings.add((start, end))
    except (OSError, ValueError):
        return 0
    if not mappings:
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madv_dontneed = 4
    return sum(end - start for start, end in mappings if madvise(start, end - start, madv_dontneed) == 0)
