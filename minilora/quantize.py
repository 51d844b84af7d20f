"""The 4-bit base of QLoRA, built as the checkpoint is read, and bitsandbytes' 4-bit folders.

What is quantized. Every `nn.Linear` inside the repeated transformer blocks (the
attention projections and the MLP: q/k/v/o, gate/up/down, c_attn/c_fc, query/
key/value/dense) becomes an `NF4Linear` (minilora.nf4_linear). Everything else
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
(minilora.nf4 explains the codes). For Llama-2-7B the blocks hold 6.48 B of the
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

import json
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .atomic import atomic_write, atomic_write_text
from .nf4 import ALLOWED_BLOCKSIZES, NF4Weight, quantize_nf4
from .nf4_linear import NF4Linear
from .progress import Progress

QUANTIZE_METHODS = ("nf4",)
# The tensors bitsandbytes stores next to a 4-bit `weight` (QuantState.as_dict(packed=True)).
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")  # fmt: skip
_NF4_STATE = ".quant_state.bitsandbytes__nf4"
_FP4_STATE = ".quant_state.bitsandbytes__fp4"
# Files a model folder carries besides its weights: copied as they are.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


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
        with safe_open(locate[key], framework="pt") as f:
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


# --------------------------------------------------------------------------- writing a 4-bit folder

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class SafetensorsStream:
    """Write a .safetensors file one tensor at a time, holding none of them in memory.

    The format is an 8-byte little-endian header length, a JSON header with every
    tensor's dtype, shape and byte range, then the bytes. The header comes first but
    is known only at the end, so the bytes go to temporary files first, one per
    element size (8, 4, 2, 1 bytes); concatenated in that order every tensor starts
    at a multiple of its own element size, as safetensors' own writer guarantees, so
    readers can map it without copying.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, tuple[str, list[int], int, int, int]] = {}
        self._bodies: dict[int, tuple] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.entries:
            raise ValueError(f"tensor {key!r} written twice")
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"safetensors cannot store {key!r} of dtype {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        size = t.element_size()
        if size not in self._bodies:
            self._bodies[size] = [tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}."), 0]
        body = self._bodies[size]
        nbytes = t.numel() * size
        if nbytes:
            body[0].write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.entries[key] = (_ST_DTYPES[t.dtype], list(t.shape), size, body[1], nbytes)
        body[1] += nbytes

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        sizes = sorted(self._bodies, reverse=True)
        starts, pos = {}, 0
        for size in sizes:
            starts[size], pos = pos, pos + self._bodies[size][1]
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        for key, (dtype, shape, size, offset, nbytes) in self.entries.items():
            begin = starts[size] + offset
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # data starts 8-aligned; safetensors pads with spaces too
        with atomic_write(self.path) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for size in sizes:
                body = self._bodies[size][0]
                body.seek(0)
                shutil.copyfileobj(body, out, 16 << 20)
        self.close()
        return self.path

    def close(self) -> None:
        for body, _ in self._bodies.values():
            body.close()  # TemporaryFile: deleted on close
        self._bodies = {}


def _pick_task(model_type: str) -> str:
    from .models import supported_tasks

    tasks = supported_tasks(model_type)
    # The task whose model holds the most of the checkpoint: a causal LM's head, or the
    # bare encoder (a classifier in the checkpoint is then copied as it is, unquantized).
    for task in ("causal-lm", "embedding", "sequence-classification"):
        if task in tasks:
            return task
    return tasks[0]


def quantize_folder(in_dir, out_dir, blocksize: int = 64, double_quant: bool = True, compute_dtype=None,
                    progress: bool = False) -> Path:
    """Write `in_dir`'s model as a bitsandbytes NF4 folder in `out_dir`; return `out_dir`.

    Every linear layer of the transformer blocks is stored in 4 bits (the same bytes
    bitsandbytes' Linear4bit would make), under the checkpoint's own key names; all
    other tensors are copied, floating ones cast to `compute_dtype` when given (None:
    the checkpoint's dtype). One tensor is in memory at a time. config.json gets the
    `quantization_config` that transformers writes for BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", ...), listing the linear layers
    kept in full precision in `llm_int8_skip_modules`; tokenizer and generation files
    are copied. Every file is written to a temporary name and renamed into place.
    `progress` reports the tensors done (a bar on a terminal, a few lines elsewhere).
    """
    from .loading import _no_init, checkpoint_shards, find_model_dir, resolve_dtype
    from .models import get_config_class, get_model_class

    check_quantize_args("nf4", blocksize)
    model_dir = find_model_dir(in_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"quantize_folder would overwrite its input {model_dir}; choose another output folder")
    stale = sorted(p.name for p in out_dir.glob("*.safetensors*") if p.name != "model.safetensors") \
        if out_dir.is_dir() else []  # fmt: skip
    if stale:
        raise ValueError(f"{out_dir} already holds other weights ({', '.join(stale[:3])}), which loaders would "
                         "mix with the new file; choose an empty or new output folder")  # fmt: skip
    hf_config = json.loads((model_dir / "config.json").read_text())
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{model_dir} is already quantized (quant_method {method!r}); quantize_folder needs the "
                         "unquantized original")  # fmt: skip
    model_type = hf_config.get("model_type")
    if not model_type:
        raise ValueError(f"{model_dir / 'config.json'} has no model_type, so the architecture is unknown")
    compute = resolve_dtype(compute_dtype)
    if compute is not None and compute not in _DTYPE_NAMES:
        raise ValueError(f"compute_dtype must be one of {', '.join(_DTYPE_NAMES.values())} or None, got {compute}")
    model_cls = get_model_class(model_type, _pick_task(model_type))
    with torch.device("meta"), _no_init():
        model = model_cls(get_config_class(model_type).from_hf(hf_config))
    quantized = {name + ".weight" for name in nf4_module_names(model)}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = getattr(model, "get_output_embeddings", lambda: None)()
    skip = {name for name, m in model.named_modules() if out is not None and m is out}

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsStream(out_dir / "model.safetensors")
    seen_dtype = None
    n_quantized = 0
    shards = checkpoint_shards(model_dir)
    bar = Progress(sum(len(keys) for _, keys in shards), "quantize", enabled=progress, unit="tensors")
    try:
        for file, keys in shards:
            for key in keys:
                bar.update(1)
                with safe_open(file, framework="pt") as f:  # one short-lived mapping per tensor, as in loading
                    raw = f.get_tensor(key)
                    if raw.is_floating_point() and seen_dtype is None:
                        seen_dtype = raw.dtype
                    converted = model.convert_checkpoint_tensor(key, raw)
                    name = converted[0] if converted is not None else None
                    if name in quantized:
                        w = converted[1]
                        if w.dtype not in _DTYPE_NAMES:
                            raise TypeError(f"{key!r} is {w.dtype}; NF4 quantizes float32/float16/bfloat16 weights")
                        for k, t in quantize_nf4(w, blocksize, double_quant).to_bnb_state_dict(key).items():
                            writer.add(k, t)
                        n_quantized += 1
                        continue
                    module = (name or key).removesuffix(".weight")
                    if key.endswith(".weight") and raw.ndim == 2 and (module in linears or name is None):
                        # A linear kept in full precision (or a weight our model does not use): tell
                        # transformers not to build a 4-bit layer for it.
                        skip.add(key.removesuffix(".weight"))
                    cast = compute if compute is not None and raw.is_floating_point() else raw.dtype
                    writer.add(key, raw.to(cast))
        if n_quantized == 0:
            raise ValueError(f"{model_dir} has no linear layer inside its transformer blocks to quantize")
        writer.finish({"format": "pt"})
    finally:
        bar.close()
        writer.close()

    if compute is not None:  # the floating tensors were cast: say so where transformers looks
        hf_config["dtype"] = _DTYPE_NAMES.get(compute, str(compute).removeprefix("torch."))
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = hf_config["dtype"]
    compute = compute or seen_dtype or torch.float32
    # The keys and values transformers 5 writes for this BitsAndBytesConfig, in its order.
    hf_config["quantization_config"] = {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES.get(compute, "float32"),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": sorted(skip) or None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name != "config.json" and not path.name.endswith(_WEIGHT_SUFFIXES):
            with atomic_write(out_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)
    # config.json last: a folder with one is complete.
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return out_dir
