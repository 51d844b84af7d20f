"""Load a Hugging Face model folder (config.json + safetensors) into our own models.

The strategy keeps peak memory near ONE copy of the weights:

1. Build the model on the meta device. Meta tensors have a shape and a dtype but
   no storage, so a 7B-parameter model costs nothing yet, and no time is spent on
   random initialisation that the checkpoint would overwrite.
2. Open the safetensors file(s) with `safe_open`, which memory-maps them, and read
   one tensor at a time: convert its key to ours (`model.convert_checkpoint_tensor`),
   check its shape, cast it, move it, and put it in the module in place of the
   meta tensor. The only extra memory is the one tensor in flight.
3. Tie what is tied (an LM head sharing the embedding matrix is filled once and
   then pointed at the same Parameter), initialise the heads the checkpoint does
   not have (a new classifier) as transformers would, and create the buffers that
   checkpoints never hold (`model.init_non_persistent_buffers(device)`).
4. Be strict: a parameter never filled or a checkpoint tensor with no place is
   an error, because a silently random layer is the worst kind of bug.

QLoRA's 4-bit base is built the same way: with quantize="nf4" each linear weight
of the transformer blocks is quantized as it is read and its meta nn.Linear swapped
for an NF4Linear, and a bitsandbytes 4-bit folder is read into NF4Linear layers
directly (minilora.qlora.quantize says what stays in 16/32 bits and why).

We only read safetensors. A pickle file (pytorch_model.bin) can execute code
when loaded, so we refuse it and say how to convert it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..models import TASKS, get_config_class, get_model_class
from ..qlora.nf4 import quantize_nf4
from ..qlora.quantize import (
    bnb_quantization,
    bnb_weight_groups,
    check_quantize_args,
    nf4_module_names,
    put_nf4,
    read_bnb_weight,  # fmt: skip
)
from .paths import resolve_model_path
from .safetensors_files import open_safetensors

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "auto": None,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """torch.dtype, a name like "bf16", or None/"auto" (keep the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def find_model_dir(path) -> Path:
    """The model folder (or `pkg:NAME`, see minilora.io.paths), checked to hold a config.json."""
    model_dir = resolve_model_path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"model folder not found: {model_dir} (expected a folder with config.json and model.safetensors)"
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: is this a Hugging Face model folder?")
    return model_dir


def checkpoint_shards(model_dir: Path) -> list[tuple[Path, list[str]]]:
    """[(safetensors file, keys to read from it)] for a single or a sharded checkpoint."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        with open_safetensors(single) as f:
            return [(single, list(f.keys()))]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise FileNotFoundError(f"{index} lists shard {shard}, which is not in {model_dir}")
        return [(model_dir / shard, keys) for shard, keys in shards.items()]
    pickles = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickles:
        raise ValueError(
            f"{model_dir} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); minilora reads "
            "safetensors only, because unpickling can run arbitrary code. Convert once with transformers:\n"
            f"  python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{model_dir}')"
            f".save_pretrained('{model_dir}', safe_serialization=True)\""
        )
    found = sorted(p.name for p in model_dir.iterdir())
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir} (found: {', '.join(found[:10])})"
    )


def _short(keys, limit: int = 10) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) tensor `name` by `tensor` without copying it."""
    module, attr = _owner(model, name)
    if attr in module._parameters:
        old = module._parameters[attr]
        trainable = old.requires_grad and (tensor.is_floating_point() or tensor.is_complex())
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=trainable)
    else:
        module._buffers[attr] = tensor


@torch.no_grad()
def _init_new(model: nn.Module, name: str, shape, dtype, device, std: float, put=_put) -> None:
    """Initialise a tensor the checkpoint lacks as transformers does: normal(0, std)
    for matrices (linear, embedding), zeros for biases, ones for norm gains."""
    t = torch.empty(shape, dtype=dtype, device=device)
    module, attr = _owner(model, name)
    if attr == "bias":
        t.zero_()
    elif t.dim() == 1:
        t.fill_(1.0)
    else:
        t.normal_(0.0, std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            t[module.padding_idx].zero_()
    put(model, name, t)


def _with_num_labels(config, num_labels: int):
    if dataclasses.is_dataclass(config):
        changes = {"num_labels": num_labels}
        if getattr(config, "id2label", None) and len(config.id2label) != num_labels:
            changes["id2label"] = None  # the checkpoint's names no longer fit
        return dataclasses.replace(config, **changes)
    config.num_labels = num_labels
    return config


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_init():
    """Skip nn.init while building on meta: the checkpoint overwrites every value, and
    the first random init on a meta tensor imports torch._dynamo's hundreds of modules."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


_CHUNK_BYTES = 32 << 20


def _read_in_chunks(file: Path, key: str, shape, dtype, device) -> torch.Tensor:
    """A big tensor read straight into its final buffer, rows at a time, each chunk through
    its own short-lived mapping: memory holds the result plus one chunk, where a copy of a
    whole mapped tensor would hold it twice (an embedding is often the largest tensor)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    step = max(1, out.shape[0] * _CHUNK_BYTES // max(1, out.numel() * out.element_size()))
    for r0 in range(0, out.shape[0], step):
        with open_safetensors(file) as f:
            out[r0 : r0 + step].copy_(f.get_slice(key)[r0 : r0 + step])
    return out


def _fill(model, shards, expected, tied, target_dtype, device, nf4: dict | None = None, put=_put,
          put_4bit=put_nf4):
    """Stream every checkpoint tensor into `model`, one at a time.

    nf4 (quantization): {"quantize": our weight names to quantize, "groups": bitsandbytes
    4-bit weights in the checkpoint (see minilora.qlora.quantize), "compute_dtype",
    "source_dtype", "blocksize", "double_quant"}.
    Returns (our keys filled, checkpoint keys with no place, checkpoint keys the
    model dropped, the dtype the floating tensors ended up in)."""
    filled: set[str] = set()
    filled_by_tie: set[str] = set()
    unexpected, dropped = [], []
    loaded_dtype = None  # dtype for new heads when none is asked: the checkpoint's
    nf4 = nf4 or {"quantize": set(), "groups": {}}
    groups = nf4["groups"]
    parts = {k for ks in groups.values() for k in ks}
    locate = {k: file for file, keys in shards for k in keys}

    def claim(ckpt_key, name, shape, dtype=None, file=None):
        """Our name for this tensor, or None when it is a tied duplicate or has no place."""
        tied_copy = name in tied
        name = tied.get(name, name)
        if name in filled:
            if tied_copy or name in filled_by_tie:  # one matrix stored under both names
                return None
            raise ValueError(f"two checkpoint tensors map to {name!r} (the second is {ckpt_key!r})")
        if name not in expected:
            unexpected.append(ckpt_key)
            return None
        want = tuple(expected[name].shape)
        if tuple(shape) != want:
            hint = " (pass num_labels to match the checkpoint's classifier, or omit it)" if "classifier" in name else ""
            raise ValueError(
                f"shape mismatch for {ckpt_key!r} (our {name!r}): checkpoint {tuple(shape)}, "
                f"model {want}; config.json does not describe these weights{hint}"
            )
        if dtype is not None and expected[name].is_floating_point() and not dtype.is_floating_point:
            # A relabelled or damaged header: integers would load, then fail (or lie) in the forward.
            raise ValueError(f"{file}: {ckpt_key!r} is stored as {dtype}, but {name!r} is a floating-point "
                             "weight; the file is damaged or mislabelled, download or convert it again")
        filled.add(name)
        if tied_copy:
            filled_by_tie.add(name)
        return name

    for file, keys in shards:
        for ckpt_key in keys:
            if ckpt_key in parts:
                continue  # read together with its 4-bit weight
            if ckpt_key in groups:  # a bitsandbytes 4-bit weight: packed bytes + their quant state
                # The name only: a 1-D stand-in, so that no layout conversion (a transpose) applies.
                converted = model.convert_checkpoint_tensor(ckpt_key, torch.empty(0, device="meta"))
                if converted is None:
                    dropped.append(ckpt_key)
                    continue
                weight = read_bnb_weight(locate, ckpt_key, groups[ckpt_key], device)
                name = claim(ckpt_key, converted[0], weight.shape)
                if name is not None:
                    put_4bit(model, name, weight, nf4["compute_dtype"])
                continue
            deferred = None
            # One short-lived mapping per tensor: closing it drops the file pages just
            # read, so memory holds the model plus one tensor, not the whole file too.
            with open_safetensors(file) as f:
                raw = f.get_tensor(ckpt_key)
                converted = model.convert_checkpoint_tensor(ckpt_key, raw)
                if converted is None:
                    dropped.append(ckpt_key)
                    continue
                name = claim(ckpt_key, converted[0], converted[1].shape, converted[1].dtype, file)
                if name is None:
                    continue
                tensor = converted[1]
                if name in nf4["quantize"]:  # quantized as it is read: never whole in 16/32 bits
                    src = tensor.to(device=device, dtype=nf4["source_dtype"] or tensor.dtype)
                    put_4bit(model, name, quantize_nf4(src, nf4["blocksize"], nf4["double_quant"]),
                             nf4["compute_dtype"])
                    continue
                # Integer tensors (ids, counters) keep their dtype whatever is asked.
                floating = tensor.is_floating_point()
                cast = target_dtype if target_dtype is not None and floating else tensor.dtype
                if loaded_dtype is None and floating:
                    loaded_dtype = cast
                if tensor is raw and tensor.dim() > 0 and raw.numel() * raw.element_size() > 2 * _CHUNK_BYTES:
                    deferred = (tuple(raw.shape), cast)
                else:
                    out = tensor.to(device=device, dtype=cast)
                    if out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
                        # Own memory, not a view of the file: a view would vanish with the
                        # mapping, and rewriting the file would change the model under us.
                        out = out.clone()
                    put(model, name, out)
            if deferred is not None:
                del raw, tensor, converted  # the mapping above must go before the chunks are read
                put(model, name, _read_in_chunks(file, ckpt_key, *deferred, device))
    return filled, unexpected, dropped, loaded_dtype


def load_model(
    path,
    task: str = "causal-lm",
    dtype=None,
    device="cpu",
    num_labels: int | None = None,
    strict: bool = True,
    quantize: str | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype=None,
    sharded_by=None,
) -> nn.Module:
    """Build our model for `task` from a Hugging Face folder and fill it from safetensors.

    dtype: None/"auto" keeps the checkpoint's; else a torch.dtype or "fp32"/"bf16"/"fp16".
    num_labels: classification only; defaults to the checkpoint config's label count.
    strict: missing or unexpected tensors raise (new classification heads excepted);
    with strict=False they are warned about and missing ones initialised.
    quantize="nf4": QLoRA's base. Each linear layer of the transformer blocks is
    quantized to NF4 (`blocksize`, `double_quant`) as its weight is read and becomes
    an NF4Linear; embeddings, norms, biases and heads stay in `compute_dtype` (None or
    "auto": `dtype`, else the checkpoint's), which is also what the 4-bit layers
    compute in. See minilora.qlora.quantize for what is kept and why.
    A bitsandbytes NF4 folder (config.json with a 4-bit `quantization_config`) loads
    into NF4Linear layers without `quantize`; its files fix blocksize and double_quant,
    and its bnb_4bit_compute_dtype is the default compute dtype.
    sharded_by (minilora.train.sharding.shard_on_meta under torchrun): called with the
    model while it is still on the meta device, it shards it and returns how to store
    each tensor read (only this process's rows; with quantize="nf4", this process's part
    of each weight's codes and scales, the weight quantized whole one at a time), so no
    process ever holds the whole model. A bitsandbytes 4-bit folder is read whole.
    Returns the model in eval() mode; `model.newly_initialized_keys` lists what the
    checkpoint did not provide.
    """
    model_dir = find_model_dir(path)
    hf_config = json.loads((model_dir / "config.json").read_text())
    model_type = hf_config.get("model_type")
    if not model_type:
        raise ValueError(f"{model_dir / 'config.json'} has no model_type, so the architecture is unknown")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    model_cls = get_model_class(model_type, task)
    config = get_config_class(model_type).from_hf(hf_config)
    if num_labels is not None:
        if task != "sequence-classification":
            raise ValueError(f"num_labels applies to task 'sequence-classification', not {task!r}")
        config = _with_num_labels(config, num_labels)
    target_dtype = resolve_dtype(dtype)
    device = torch.device(device)
    check_quantize_args(quantize, blocksize)
    prequantized = bnb_quantization(hf_config, model_dir)
    compute = resolve_dtype(compute_dtype)
    if compute is not None and quantize is None and prequantized is None:
        raise ValueError("compute_dtype applies to 4-bit layers: pass quantize='nf4' too, or use dtype= alone")
    shards = checkpoint_shards(model_dir)

    with torch.device("meta"), _no_init():
        model = model_cls(config)
    tied = dict(getattr(model, "tied_weights", None) or {})
    # Tied copies are not filled on their own: they will point at their source.
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in tied}

    nf4 = None
    if quantize is not None or prequantized is not None:
        groups = bnb_weight_groups(k for _, keys in shards for k in keys)
        if prequantized is not None and not groups:
            raise ValueError(f"{model_dir / 'config.json'} declares bitsandbytes 4-bit weights, but the checkpoint "
                             "holds no weight.quant_state.bitsandbytes__nf4 tensors; the folder is incomplete")
        layer_dtype = compute or target_dtype
        if layer_dtype is None and prequantized is not None:
            layer_dtype = resolve_dtype(prequantized.get("bnb_4bit_compute_dtype"))
        # A 4-bit folder is taken as it is: its files say which layers are 4-bit.
        names = set() if prequantized else {n + ".weight" for n in nf4_module_names(model)}
        nf4 = dict(quantize=names, groups=groups, compute_dtype=layer_dtype, source_dtype=target_dtype,
                   blocksize=blocksize, double_quant=double_quant)
        target_dtype = compute or target_dtype  # what stays in 16/32 bits is in the compute dtype

    put, put_4bit = _put, put_nf4
    # A bitsandbytes 4-bit folder is read whole (its layers are known only as they are read).
    sharded = sharded_by is not None and (nf4 is None or not nf4["groups"])
    if sharded:
        put = sharded_by(model, tied, target_dtype, device, nf4)
        put_4bit = getattr(put, "nf4", put_nf4)
    filled, unexpected, dropped, loaded_dtype = _fill(model, shards, expected, tied, target_dtype, device, nf4, put,
                                                      put_4bit)
    if dropped:
        logger.info("ignored %d checkpoint tensors this model does not use: %s", len(dropped), _short(dropped))

    missing = [k for k in expected if k not in filled]
    heads = tuple(getattr(model, "new_head_prefixes", ()))
    not_heads = [k for k in missing if not k.startswith(heads)]
    problems = []
    if not_heads:
        problems.append(f"{len(not_heads)} model tensors missing from the checkpoint: {_short(not_heads)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint tensors with no place in {model_cls.__name__}: {_short(unexpected)}"
        )
    if problems:
        message = f"{model_dir} does not match {model_cls.__name__} (task {task!r}): " + "; ".join(problems)
        if strict:
            raise ValueError(
                message + ". Check model_type and task, or pass strict=False to initialise the missing"
                " tensors and skip the extra ones."
            )
        warnings.warn(message, stacklevel=2)

    std = getattr(config, "initializer_range", 0.02)
    new_dtype = target_dtype or loaded_dtype or torch.float32
    for name in missing:
        _init_new(model, name, expected[name].shape, new_dtype, device, std, put)
    for dst, src in tied.items() if not sharded else ():  # sharding tied them on meta
        module, attr = _owner(model, dst)
        module._parameters[attr] = model.get_parameter(src)
    if hasattr(model, "init_non_persistent_buffers"):
        model.init_non_persistent_buffers(device)

    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    on_meta = [n for n, t in named if t.is_meta]
    if on_meta:
        raise RuntimeError(
            f"{model_cls.__name__} still has tensors on the meta device after loading: {_short(on_meta)}. "
            "Buffers that checkpoints do not hold must be created in init_non_persistent_buffers(device)."
        )

    model.newly_initialized_keys = missing
    if missing:
        warnings.warn(f"{model_cls.__name__}: newly initialised, train them: {', '.join(missing)}", stacklevel=2)
    return model.eval()
