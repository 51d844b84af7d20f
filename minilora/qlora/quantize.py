"""The 4-bit base of QLoRA, built as the checkpoint is read, and bitsandbytes' 4-bit folders.

What is quantized. Every `nn.Linear` inside the repeated transformer blocks (the
attention projections and the MLP: q/k/v/o, gate/up/down, c_attn/c_fc, query/
key/value/dense) becomes an `NF4Linear` (minilora.qlora.nf4_linear). Everything else
stays in the compute dtype (16 or 32 bits), as bitsandbytes and transformers do
(transformers' `get_keys_to_not_convert` skips the output embeddings, the tied
weights and the model's last module), because:

- Embeddings are a table lookup, not a matrix product: a 4-bit error in a row is
  added to every occurrence of that token with nothing to average it out, and
  bitsandbytes has no 4-bit embedding (Linear4bit is its only 4-bit layer).
- Norm gains (RMSNorm / LayerNorm weights) and biases multiply or shift every
  activation of a layer, and they are tiny: hidden_size values per norm,
  far below 0.1% of the parameters. Quantizing them would save nothing.
- The output head (lm_head, or a classifier with its pooler/pre_classifier)
  feeds the softmax directly; its rounding errors become logit errors. A tied
  head IS the embedding matrix, so it stays tied and unquantized. A new
  classification head is trained in full anyway.

The bit budget. NF4 stores 4 bits per weight plus one absmax per 64 weights;
double quantization turns those fp32 absmax values into 8-bit codes with one fp32
scale per 256 of them: 4 + 8/64 + 32/(64*256) = 4.127 bits per quantized weight
(minilora.qlora.nf4 explains the codes). For Llama-2-7B the blocks hold 6.48 B of the
6.74 B parameters: 3.34 GB in NF4, plus 0.52 GB for the bf16 embedding and head,
3.9 GB in all instead of 13.5 GB in bf16.

Two ways in, both streaming (the model is never whole in 16/32 bits):

- `load_model(path, quantize="nf4")` builds the model on the meta device and, for
  each checkpoint tensor that is a block linear's weight, quantizes that one tensor
  and swaps the meta nn.Linear for an NF4Linear (`nf4_layer`). Peak memory is the
  4-bit model plus the one tensor in flight.
- A folder saved by transformers + bitsandbytes (`*-bnb-4bit` on the Hub) has a
  `quantization_config` in config.json and, per quantized layer, the tensors
  `W.weight` (packed nibbles, uint8 of shape (n/2, 1)), `W.weight.absmax`,
  `W.weight.quant_map`, `W.weight.nested_absmax`, `W.weight.nested_quant_map` and
  `W.weight.quant_state.bitsandbytes__nf4` (a JSON blob as uint8 bytes).
  `load_model` reads those into NF4Linear layers without any argument.

`quantize_folder(in_dir, out_dir)` writes such a folder itself, tensor by tensor:
transformers + bitsandbytes load it, and it loads here without re-quantizing.
Keys keep the checkpoint's names; a GPT-2 Conv1D weight, stored (in, out), is
quantized as (out, in), which is how bitsandbytes' Linear4bit holds it and how
transformers saves it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..io.safetensors_files import open_safetensors
from .nf4 import ALLOWED_BLOCKSIZES, NF4Weight
from .nf4_linear import NF4Linear

QUANTIZE_METHODS = ("nf4",)
# The tensors bitsandbytes stores next to a 4-bit `weight` (QuantState.as_dict(packed=True)).
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")  # fmt: skip
_NF4_STATE = ".quant_state.bitsandbytes__nf4"
_FP4_STATE = ".quant_state.bitsandbytes__fp4"
# Files a model folder carries besides its weights: copied as they are.


# --------------------------------------------------------------------------- reading


def bnb_quantization(hf_config: dict, model_dir) -> dict | None:
    """The folder's bitsandbytes NF4 `quantization_config`, None when it has none.

    Any other quantization (fp4, 8-bit, GPTQ, AWQ ...) is an error that says so:
    reading its tensors as plain weights would give garbage."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    where = f"{Path(model_dir) / 'config.json'}"
    method = q.get("quant_method", "bitsandbytes")
    fix = "Load the unquantized original folder and pass quantize='nf4' to quantize it on load."
    if method != "bitsandbytes":
        raise ValueError(f"{where} is quantized with quant_method {method!r}; minilora reads bitsandbytes NF4 "
                         f"folders only. {fix}")  # fmt: skip
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ValueError(f"{where} is a bitsandbytes 8-bit (LLM.int8) folder; minilora reads 4-bit NF4 only. {fix}")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise ValueError(f"{where} has a bitsandbytes quantization_config with neither load_in_4bit nor load_in_8bit "
                         f"set, so the format of its weights is unknown. {fix}")  # fmt: skip
    quant_type = q.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' default is fp4
    if quant_type != "nf4":
        raise ValueError(f"{where} is a bitsandbytes 4-bit folder with bnb_4bit_quant_type {quant_type!r}; minilora "
                         f"reads 'nf4' only (FP4 has other codes). {fix}")  # fmt: skip
    return q


def bnb_weight_groups(keys) -> dict[str, list[str]]:
    """{checkpoint key of a 4-bit weight: the keys of its companion tensors}."""
    keys = set(keys)
    groups = {}
    for key in keys:
        if key.endswith(_FP4_STATE):
            raise ValueError(f"{key!r} is an FP4-quantized weight; minilora reads NF4 only (bnb_4bit_quant_type='nf4')")
        if key.endswith(_NF4_STATE):
            weight = key.removesuffix(_NF4_STATE)
            groups[weight] = [weight + s for s in BNB_SUFFIXES if weight + s in keys]
    return groups


def read_bnb_weight(locate: dict[str, Path], weight_key: str, parts: list[str], device) -> NF4Weight:
    """One bitsandbytes 4-bit weight from its tensors, each read from its own file.

    Every tensor is copied out of the short-lived mapping: a view would vanish with
    it, and a rewritten file would change the model under us."""
    sd = {}
    for key in [weight_key, *parts]:
        with open_safetensors(locate[key]) as f:
            sd[key] = f.get_tensor(key).clone()
    return NF4Weight.from_bnb_state_dict(sd, weight_key).to(device)


# --------------------------------------------------------------------------- which layers


def nf4_module_names(model: nn.Module) -> list[str]:
    """The nn.Linear modules that quantize="nf4" turns into NF4Linear: those inside a
    repeated block (a descendant of an nn.ModuleList), except the output embeddings
    and anything tied. Heads (lm_head, classifier, pooler, pre_classifier) live
    outside the blocks, so they stay in the compute dtype."""
    in_blocks: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefix = f"{name}." if name else ""
            in_blocks.update(prefix + sub for sub, m in module.named_modules() if isinstance(m, nn.Linear))
    out = getattr(model, "get_output_embeddings", lambda: None)()
    keep = {name for name, m in model.named_modules() if out is not None and m is out}
    tied = {k.removesuffix(".weight") for pair in (getattr(model, "tied_weights", None) or {}).items() for k in pair}
    return sorted(in_blocks - keep - tied)


def check_quantize_args(quantize, blocksize: int) -> None:
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise ValueError(f"unknown quantize={quantize!r}; use None (no quantization) or one of {QUANTIZE_METHODS}")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize!r}")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def nf4_layer(old: nn.Linear, weight: NF4Weight, compute_dtype: torch.dtype | None) -> NF4Linear:
    """An NF4Linear holding `weight` in place of `old` (a meta nn.Linear, maybe with its bias already filled)."""
    if tuple(weight.shape) != (old.out_features, old.in_features):
        raise ValueError(f"4-bit weight of shape {list(weight.shape)} does not fit a linear layer of "
                         f"{old.in_features} -> {old.out_features}")  # fmt: skip
    layer = NF4Linear(old.in_features, old.out_features, old.bias is not None, blocksize=weight.blocksize,
                      double_quant=weight.double_quant, compute_dtype=compute_dtype, device="meta",
                      dtype=weight.dtype)  # fmt: skip
    layer._nf4 = weight
    if old.bias is not None and not old.bias.is_meta:
        # The bias came first (checkpoints list keys in order: "bias" < "weight"). Frozen,
        # like every part of a quantized base layer.
        layer.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
    return layer


def put_nf4(model: nn.Module, name: str, weight: NF4Weight, compute_dtype: torch.dtype | None) -> None:
    """Swap the (meta) nn.Linear whose weight is `name` for an NF4Linear holding `weight`."""
    module_name = name.removesuffix(".weight")
    old = model.get_submodule(module_name)
    if not isinstance(old, nn.Linear) or not name.endswith(".weight"):
        raise ValueError(f"the checkpoint holds {name!r} in 4 bits, but it is not a linear layer's weight in "
                         f"{type(model).__name__}; only nn.Linear layers can be 4-bit")  # fmt: skip
    set_module(model, module_name, nf4_layer(old, weight, compute_dtype))
