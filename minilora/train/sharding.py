"""`[train] distributed = "fsdp"`: the frozen base sharded across processes with PyTorch's
FSDP2 (`fully_shard`), the adapter replicated as under DDP.

Under DDP every process holds the whole model. LoRA trains a few million numbers next
to a base of billions, so what fills a GPU is the frozen base, and that is what FSDP
spreads out: each of N processes keeps 1/N of every base tensor, and a decoder layer's
tensors are gathered whole only while that layer runs (forward, and again in backward),
then freed:

    resident per process  ≈  base / N  +  one layer gathered  +  adapter, its moments

The adapter stays whole on every process (FSDP's `ignored_params`): its gradients are
averaged with one all-reduce per optimizer step, as DDP does, so the optimizer, the
checkpoints and the saved adapter are the single-process ones, and a run resumes on any
number of processes. Sharding the adapter too would save its share of memory (with
AdamW, 12 bytes a parameter in fp32; for r = 16 on every projection of an 8B model,
about 0.5 GB per process) at the price of gathering it in every layer's forward and
backward; for the adapters minilora trains, the replicated copy is the smaller cost.

An NF4 base is sharded byte for byte: its packed codes and block scales become frozen
(uint8 and fp32) parameters of the layer, which FSDP shards like any other, and the
NF4 weight is rebuilt from them, gathered, each time the layer runs.

Loading (`shard_on_meta`, through load_model's `sharded_by`): the model is sharded while
still on the meta device, each process allocates only its shards, and each tensor read
from the checkpoint leaves behind only this process's rows (an NF4 weight: quantized
whole, then only this process's part of its codes and scales is kept). No process holds
the whole model at any point.

Every process must run every layer's forward the same number of times, since each one
gathers across all of them: evaluation pads the shorter shares with repeated batches
whose results are dropped (`collectives_per_rank`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..qlora.nf4 import NF4Weight, dynamic_map_signed, nf4_code
from ..qlora.nf4_linear import NF4Linear

MODES = ("ddp", "fsdp")
_NF4_PIECES = ("packed", "absmax", "nested_absmax", "offset")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of layers: its longest nn.ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no stack of layers (an nn.ModuleList) for FSDP to shard "
                         "layer by layer; use train.distributed = \"ddp\"")
    return max(lists, key=len)


def _expose_nf4(layer: NF4Linear, tables_on=None) -> None:
    """Register the NF4 weight's tensors as frozen parameters and rebuild the weight from
    them before each forward (when FSDP has gathered them). `tables_on`: where the two
    small code tables live, for a layer still on the meta device."""
    w = layer.weight
    if tables_on is not None:
        w.code = nf4_code(tables_on)
        w.nested_code = dynamic_map_signed(tables_on) if w.double_quant else None
    for piece in _NF4_PIECES:
        t = getattr(w, piece)
        if t is not None:
            layer.register_parameter(f"nf4_{piece}", nn.Parameter(t.reshape(-1).clone(), requires_grad=False))
    scalar_offset = w.offset is not None and w.offset.dim() == 0
    meta = dict(shape=w.shape, dtype=w.dtype, blocksize=w.blocksize, code=w.code, nested_code=w.nested_code)

    def rebuild(module, args):
        get = lambda piece: getattr(module, f"nf4_{piece}", None)  # noqa: E731
        offset = get("offset")
        if offset is not None and scalar_offset:
            offset = offset.reshape(())
        module._nf4 = NF4Weight(get("packed"), get("absmax"), meta["shape"], meta["dtype"], meta["blocksize"],
                                meta["code"], get("nested_absmax"), meta["nested_code"], offset)

    layer.register_forward_pre_hook(rebuild)
    # The parameters are the weight now and the pre-hook rebuilds it; until then the layer
    # keeps a stand-in with the weight's shape and dtype and no data (moved for free).
    where = tables_on if tables_on is not None else w.packed.device  # never meta: it must stay movable
    empty = lambda dtype: torch.empty(0, dtype=dtype, device=where)  # noqa: E731
    layer._nf4 = NF4Weight(empty(torch.uint8), empty(w.absmax.dtype), w.shape, w.dtype, w.blocksize, w.code,
                           empty(torch.float32) if w.double_quant else None, w.nested_code,
                           torch.zeros((), device=where) if w.offset is not None else None)


def shard_model(model: nn.Module) -> None:
    """Shard the frozen base of `model` across the process group, layer by layer, in place.
    A model that load_model(sharded_by=shard_on_meta) built is sharded already: nothing to do."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    for module in list(model.modules()):
        if isinstance(module, NF4Linear):
            _expose_nf4(module)
    adapter = {p for p in model.parameters() if p.requires_grad}
    for block in transformer_blocks(model):
        fully_shard(block, ignored_params=adapter)
    fully_shard(model, ignored_params=adapter)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """The adapter's gradients averaged over the processes (what DDP's all-reduce does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def collectives_per_rank(n_local: int, world: int) -> int:
    """How many forwards every process runs when each has `n_local` of its own: the most any has."""
    if world == 1:
        return n_local
    t = torch.tensor([n_local])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def shard_on_meta(model: nn.Module, tied: dict[str, str], dtype: torch.dtype | None, device,
                  nf4: dict | None = None) -> Callable:
    """Shard a model that is still on the meta device (load_model(sharded_by=this)), allocate
    this process's shards, and return the loader's `put`: it copies this process's rows of
    each full tensor it is given into the shard, and lets the tensor go.

    The tensors FSDP shards are split along their first dimension as torch.chunk splits
    it, one piece per process in rank order (the last pieces may be shorter, or empty).

    `nf4` (quantize-on-load: the weight names, blocksize, double_quant, compute_dtype,
    source_dtype): those layers become NF4Linear layers before sharding, their packed
    codes and scales exposed as parameters, and `put.nf4(model, name, weight, _)` keeps
    this process's piece of each tensor of a weight quantized whole, one weight at a time."""
    from torch.distributed.fsdp import fully_shard

    for dst, src in tied.items():  # shared before sharding, so FSDP shards the matrix once
        owner, _, attr = dst.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = model.get_parameter(src)
    if dtype is not None:
        model.to(dtype)
    for name in sorted((nf4 or {}).get("quantize", ())):
        owner, _, _ = name.rpartition(".")
        linear = model.get_submodule(owner)
        layer = NF4Linear(linear.in_features, linear.out_features, linear.bias is not None,
                          blocksize=nf4["blocksize"], double_quant=nf4["double_quant"],
                          compute_dtype=nf4["compute_dtype"], device="meta",
                          dtype=nf4["source_dtype"] or linear.weight.dtype)
        parent, _, attr = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
        _expose_nf4(layer, tables_on=device)
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()

    @torch.no_grad()
    def put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        current = module._parameters.get(attr, module._buffers.get(attr))
        if not hasattr(current, "to_local"):  # a buffer: kept whole
            module._buffers[attr] = tensor
            return
        pieces = torch.chunk(tensor, world, dim=0)
        local = current.to_local()
        if rank < len(pieces) and local.numel():
            local.copy_(pieces[rank])

    def put_nf4(model: nn.Module, name: str, weight: NF4Weight, compute_dtype) -> None:
        owner = name.removesuffix(".weight")
        layer = model.get_submodule(owner)
        if not isinstance(layer, NF4Linear) or tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"{name}: a 4-bit weight of shape {list(weight.shape)} has no sharded NF4 layer here")
        for piece in _NF4_PIECES:
            t = getattr(weight, piece)
            if t is not None:
                put(model, f"{owner}.nf4_{piece}", t.reshape(-1))

    put.nf4 = put_nf4
    return put
