"""NF4Linear: a frozen linear layer whose weight is stored in 4-bit NF4 (the QLoRA base).

The weight lives as an `NF4Weight` (see minilora.qlora.nf4) and is dequantized on every
forward into the compute dtype, used once by F.linear and dropped (on the CPU into
one buffer per thread that all layers share; `release_cpu_workspace()` frees it). Backward
dequantizes again instead of saving the full-precision weight: between the two
passes only the 4-bit copy stays in memory, which is what makes QLoRA fit large
models (Dettmers et al., 2023, section 3: "we dequantize the storage data type
to the computation data type to perform the forward and backward pass").

It behaves like bitsandbytes' `Linear4bit(quant_type="nf4")`: same arithmetic,
output in the input's dtype, and the same state-dict keys (`weight`,
`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), so checkpoints
move between the two.

Wrap it in `LoRALinear` to train adapters; `weight` returns the `NF4Weight`, whose
`dtype` (the original float dtype) and `device` LoRALinear reads.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minilora.qlora.nf4 import MissingStateKeyError, NF4Weight, quantize_nf4

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Workspace(threading.local):
    buf: torch.Tensor | None = None


_WORKSPACE = _Workspace()


def release_cpu_workspace() -> None:
    """Free the CPU buffer that NF4Linear layers dequantize into (it is rebuilt on demand)."""
    _WORKSPACE.buf = None


def _dequantize_for_compute(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`, used once and dropped. On CPU every layer of a thread shares
    one buffer: fresh multi-megabyte allocations cost a page fault per 4 KiB, which would
    double the cost of a dequantization. On CUDA the caching allocator already reuses memory,
    and a shared buffer could be overwritten while another stream still reads it."""
    if weight.device.type != "cpu":
        return weight.dequantize(dtype)
    n, buf = weight.numel(), _WORKSPACE.buf
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _WORKSPACE.buf = torch.empty(n, dtype=dtype)
    return weight.dequantize(dtype, out=buf[:n].view(weight.shape))


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly in both passes (never saved)."""

    @staticmethod
    def forward(ctx, x, bias, weight: NF4Weight, compute_dtype):
        ctx.weight, ctx.compute_dtype = weight, compute_dtype
        return F.linear(x, _dequantize_for_compute(weight, compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # With create_graph the matmul below saves W for a second backward: then it
            # must own its memory instead of borrowing the shared buffer.
            if torch.is_grad_enabled():
                w = ctx.weight.dequantize(ctx.compute_dtype)
            else:
                w = _dequantize_for_compute(ctx.weight, ctx.compute_dtype)
            grad_x = grad_out.matmul(w)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


class NF4Linear(nn.Module):
    """Linear layer with a frozen NF4 weight, optional bias, and a chosen compute dtype.

    compute_dtype=None computes in the input's dtype. Build one from a trained layer
    with `from_linear`, or from a bitsandbytes checkpoint with `from_bnb_state_dict`
    (or `load_state_dict` on an instance of the right shape).
    """

    _merge_warned = False  # class-wide: one warning per process, not one per layer

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 device=None, dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be one of {_FLOAT_DTYPES} or None, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        # Placeholder until real weights arrive (from_linear / load_state_dict).
        self._nf4 = NF4Weight.empty((out_features, in_features), dtype, blocksize, double_quant, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def num_quantized_values(self) -> int:
        """The 4-bit weight is not an nn.Parameter; count_parameters asks for it here."""
        return self._nf4.numel()

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:  # fmt: skip
        """Quantize an nn.Linear (bit-identical to bitsandbytes' Linear4bit on the CPU)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype, device="meta", dtype=w.dtype)  # fmt: skip
        layer._nf4 = quantize_nf4(w, blocksize, double_quant)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "", compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Build from the state dict of a bitsandbytes Linear4bit (keys `{prefix}weight...`)."""
        w = NF4Weight.from_bnb_state_dict(sd, prefix + "weight")
        if len(w.shape) != 2:
            raise ValueError(f"{prefix}weight has shape {list(w.shape)}; a linear layer needs 2 dimensions")
        bias = sd.get(prefix + "bias")
        layer = cls(w.shape[1], w.shape[0], bias is not None, blocksize=w.blocksize, double_quant=w.double_quant,
                    compute_dtype=compute_dtype, device="meta", dtype=w.dtype)  # fmt: skip
        layer._nf4 = w
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone().to(w.device), requires_grad=False)
        return layer

    @property
    def weight(self) -> NF4Weight:
        return self._nf4

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float tensor (default: its original dtype)."""
        return self._nf4.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        if compute not in _FLOAT_DTYPES:
            raise TypeError(f"NF4Linear needs a float16/bfloat16/float32 input, got {x.dtype}")
        bias = None if self.bias is None else self.bias.to(compute)
        # Like bitsandbytes: compute in compute_dtype, hand back the input's dtype.
        return _NF4LinearFunction.apply(x.to(compute), bias, self._nf4, compute).to(x.dtype)

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """W <- quantize(dequantize(W) + delta). Used by LoRALinear.merge()/unmerge()."""
        if not NF4Linear._merge_warned:
            NF4Linear._merge_warned = True
            warnings.warn(
                "Merging a LoRA update into an NF4 weight re-quantizes it: the merged weight is rounded to "
                "4 bits again and unmerge() will not restore the original exactly. To deploy, export a merged "
                "16-bit model instead (dequantize the base, add the update, save in bf16/fp16).",
                stacklevel=3,
            )
        w = self._nf4.dequantize(torch.float32)
        w.add_(delta.to(device=w.device, dtype=torch.float32))
        merged = quantize_nf4(w, self._nf4.blocksize, self._nf4.double_quant)
        merged.dtype = self._nf4.dtype  # keep the logical dtype of the original weight
        self._nf4 = merged

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # fn is .to()/.cuda()/.half()...: applied to the uint8 bytes it moves devices but
        # never casts, so its result tells where the quantized state belongs.
        target = fn(self._nf4.packed).device
        if target != self._nf4.device:
            self._nf4 = self._nf4.to(target)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        quant = self._nf4.to_bnb_state_dict(prefix + "weight")
        destination[prefix + "weight"] = quant.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(quant)  # same key order as bitsandbytes: weight, bias, weight.*

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in mine:
            missing_keys.append(key)
            return
        # A placeholder on the meta device cannot hold data: keep the checkpoint's device then.
        device = mine[key].device if self._nf4.device.type == "meta" else self._nf4.device
        if len(mine) == 1 and mine[key].is_floating_point():
            # A plain float checkpoint (e.g. from nn.Linear): quantize on load.
            loaded = quantize_nf4(mine[key].to(device), self._nf4.blocksize, self._nf4.double_quant)
        else:
            try:
                loaded = NF4Weight.from_bnb_state_dict(mine, key).to(device)
            except MissingStateKeyError as e:
                missing_keys.append(e.key)
                return
            except ValueError as e:
                error_msgs.append(f"{key}: {e}")
                return
        if tuple(loaded.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{key}: checkpoint shape {list(loaded.shape)} does not match this layer's "
                f"{[self.out_features, self.in_features]}; build the layer with the checkpoint's sizes"
            )
            return
        self._nf4, self.blocksize, self.double_quant = loaded, loaded.blocksize, loaded.double_quant

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )
