"""The training loop, written out by hand: read it top to bottom in `train()`.

One optimizer step consumes a *group* of `grad_accum` micro-batches (per process).
The loss of the group is the mean over everything in it, computed exactly:

    L = (1 / N) · Σ_micro-batches Σ_items ℓ_i       N = items (classification) or
                                                      target tokens (language modelling)
                                                      in the whole group, on all processes

Each micro-batch backpropagates its own sum divided by the group's N (times the
number of processes, because DistributedDataParallel averages gradients), so the
update equals one big batch of the same examples, also for a last, smaller group
and for micro-batches with different numbers of tokens.

Then: clip the gradient norm, set the rate from the schedule (a pure function of
the step), AdamW step. Every `eval_every` steps and at each epoch's end the model
is evaluated with task metrics; the best adapter is kept (in `<out>/best`) and put
back at the end; early stopping ends the run after `patience` evaluations without
improvement. Checkpoints hold the adapter, optimizer, RNG states and the position
in the data, so `resume_from` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import fast
from ..fast.cpu_memory import hold_freed_memory
from ..fast.optim import AdamW
from ..io.atomic import atomic_write_text
from ..io.progress import Progress
from ..io.safetensors_files import load_safetensors
from ..lora.trainable import save_trainable, trainable_state_dict
from .batching import collate, make_batches, shard_batches
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainingDiverged
from . import precision, sharding
from .metrics import accuracy, confusion_matrix, macro_f1, perplexity
from .schedule import lr_at, warmup_steps_for

CLASSIFICATION = "sequence-classification"


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    group_in_epoch: int = 0  # next group of micro-batches to run in this epoch
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list = field(default_factory=list)
    world_size: int = 1  # processes the run had when this state was saved


def _dist() -> tuple[int, int]:
    """(rank, world size); starts the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm scales (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   use_fast: bool = True) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, 2019): torch's, or on the fast path fast/optim.py's, which
    runs the same fused kernel without importing torch._dynamo (bit-identical updates)."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad; inject LoRA (minilora.inject) first")
    adamw = AdamW if use_fast else torch.optim.AdamW
    # torch's fused kernel (one pass per tensor) on CPU and CUDA, its foreach ops elsewhere.
    return adamw(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=None)


def target_count(batch: dict, task: str) -> int:
    """How many loss terms a batch has: examples, or next-token targets."""
    if task == CLASSIFICATION:
        return batch["labels"].numel()
    return int((batch["labels"][:, 1:] != -100).sum())


def _computes_own_lm_loss(model: nn.Module) -> bool:
    """Whether the model takes labels= and return_logits=False (our causal LMs do)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return bool(getattr(inner, "fused_lm_loss", False))


def loss_sum(model: nn.Module, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of per-item losses, logits) for one micro-batch; logits are None when our
    causal LMs compute the loss from hidden states without building them."""
    if task != CLASSIFICATION and _computes_own_lm_loss(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    return_logits=False)
        return out.loss_sum, out.logits
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task == CLASSIFICATION:
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), logits
    # Token t predicts token t+1; -100 marks prompt and padding positions. Shifting
    # the labels (small) rather than slicing the logits (batch x seq x vocab) avoids a
    # copy of the largest tensor of the step.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum"), logits


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples, task, *, batch_size, pad_token_id, padding_side="right", num_labels=None,
             device=torch.device("cpu"), autocast=contextlib.nullcontext, progress: bool = False) -> dict:
    """Task metrics on `examples`; each process takes a share and the sums are added."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    mine = examples[rank::world]
    batches = make_batches([len(e["input_ids"]) for e in mine], batch_size, seed=0, epoch=0, shuffle=False)
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, count
    confusion = torch.zeros(num_labels or 1, num_labels or 1, dtype=torch.long)
    # Under FSDP each forward gathers on every process: all run as many as the busiest one,
    # the extra ones on a batch of their own whose result is dropped.
    runs = sharding.collectives_per_rank(len(batches), world) if _is_sharded(model) else len(batches)
    with Progress(len(batches), "eval", enabled=progress and rank == 0, unit="batches") as bar:
        for b in range(runs):
            idx = batches[b] if b < len(batches) else [0]
            batch = _to(collate([(mine or examples)[i] for i in idx], pad_token_id, padding_side), device)
            with autocast():
                loss, logits = loss_sum(model, batch, task)
            if b >= len(batches):
                continue
            total += torch.tensor([loss.item(), target_count(batch, task)], dtype=torch.float64)
            if task == CLASSIFICATION:
                confusion += confusion_matrix(logits.argmax(-1).cpu(), batch["labels"].cpu(), num_labels)
            bar.update(1)
    _all_reduce(total, world)
    model.train(was_training)
    mean_loss = (total[0] / total[1].clamp(min=1)).item()
    if task == CLASSIFICATION:
        _all_reduce(confusion, world)
        return {"loss": mean_loss, "accuracy": accuracy(confusion), "macro_f1": macro_f1(confusion)}
    return {"loss": mean_loss, "perplexity": perplexity(mean_loss)}


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_finite(what: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"training stopped at step {step}: the {what} is {value} (not finite); the last good adapter and "
            "checkpoints are kept. Lower train.lr, keep train.max_grad_norm on, or check the data")


def _log(out_dir: Path | None, record: dict) -> None:
    if out_dir is not None:
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_log(out_dir: Path, step: int) -> None:
    """On resume, forget what the killed run logged after its last checkpoint."""
    path = out_dir / "metrics.jsonl"
    if path.is_file():
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _plot_loss(out_dir: Path, history: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: the plot is a convenience, never a dependency
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)


def resolve_device(setting: str | None) -> torch.device:
    """`[train] device`: "auto" (or None) is CUDA when torch sees it, else the CPU."""
    return torch.device(setting if setting not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))


def train(model: nn.Module, train_set: list[dict], eval_set: list[dict] | None, args, *, task: str,
          out_dir: str | os.PathLike | None = None, pad_token_id: int = 0, padding_side: str = "right",
          num_labels: int | None = None, progress: bool = True, keep_last: int | None = None,
          group_by_length: bool = True) -> dict:
    """Fine-tune the trainable parameters of `model` (its LoRA adapter) in place.

    `args` carries the [train] settings (see minilora.train.config.TrainSection); `keep_last`
    limits how many checkpoints stay on disk; `group_by_length` batches similar
    lengths together (less padding). Returns
    {"state": TrainState, "eval": last metrics, "best": best metric, "history": per-step records}.
    """
    rank, world = _dist()
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    chosen = precision.choose(args.precision, device, precision.frozen_dtype(model))
    autocast = lambda: precision.autocast(chosen, device)  # noqa: E731
    if rank == 0:
        print(chosen.describe())
    out = Path(out_dir) if out_dir is not None and rank == 0 else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if task == CLASSIFICATION and num_labels is None:
        num_labels = max(int(e["labels"]) for e in train_set) + 1

    torch.manual_seed(args.seed)
    precision.trained_in_fp32(model)
    use_fast = getattr(args, "fast", True)
    if use_fast:
        fast.enable(model)
    model.to(device).train()
    mode = getattr(args, "distributed", "ddp")
    if mode not in sharding.MODES:
        raise ValueError(f"train.distributed = {mode!r}; choose one of {', '.join(sharding.MODES)}")
    fsdp = world > 1 and mode == "fsdp"
    trained = [p for p in model.parameters() if p.requires_grad]
    if fsdp:  # the frozen base sharded, the adapter whole on every process (sharding.py)
        sharding.shard_model(model)
        ddp = model
    else:
        ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device, use_fast)

    lengths = [len(e["input_ids"]) for e in train_set]
    global_batch = args.batch_size * world  # batch_size is per process, as in transformers and torchrun
    if rank == 0 and world > 1:
        print(f"{world} processes ({mode}): global batch {global_batch} = batch_size {args.batch_size} x {world}"
              + (f", x grad_accum {args.grad_accum} = {global_batch * args.grad_accum} per optimizer step"
                 if args.grad_accum > 1 else ""))
    batches_of = lambda epoch: make_batches(lengths, global_batch, args.seed, epoch, group_by_length=group_by_length)
    groups_per_epoch = math.ceil(len(batches_of(0)) / args.grad_accum)
    total_steps = args.max_steps or args.epochs * groups_per_epoch
    warmup = warmup_steps_for(total_steps, args.warmup_steps, args.warmup_ratio)
    higher_is_better = args.metric_for_best in ("accuracy", "macro_f1") or (
        args.metric_for_best == "auto" and task == CLASSIFICATION)
    best_key = {"auto": "accuracy" if task == CLASSIFICATION else "loss"}.get(args.metric_for_best, args.metric_for_best)

    state = TrainState(world_size=world)
    if args.resume_from:
        saved = load_checkpoint(args.resume_from, model, optimizer)
        state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
        if state.world_size != world and rank == 0:
            # The adapter and its optimizer state are whole on every process, so any number
            # of processes can take them up; but the global batch, and with it the data order
            # and the rest of the run, change.
            print(f"note: resuming on {world} process(es) a run checkpointed on {state.world_size}: the global "
                  f"batch changes from {args.batch_size * state.world_size} to {global_batch} (train.batch_size is "
                  f"per process), so the remaining steps differ from the run that was stopped")
        state.world_size = world
        if out is not None:
            _truncate_log(out, state.step)

    def run_eval() -> dict | None:
        if not eval_set:
            return None
        metrics = evaluate(model, eval_set, task, batch_size=args.batch_size, pad_token_id=pad_token_id,
                           padding_side=padding_side, num_labels=num_labels, device=device, autocast=autocast,
                           progress=progress)
        value = metrics[best_key]
        improved = state.best_metric is None or (
            value > state.best_metric + args.early_stopping_min_delta if higher_is_better
            else value < state.best_metric - args.early_stopping_min_delta)
        if improved:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            if out is not None:
                save_trainable(model, out / "best")
        else:
            state.bad_evals += 1
        _log(out, {"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    # On the CPU, freed activations stay in the process for the next step (cpu_memory.py).
    with hold_freed_memory(use_fast and device.type == "cpu" and getattr(args, "hold_cpu_memory", True)):
        bar = Progress(total_steps, "train", initial=state.step, enabled=progress and rank == 0, unit="steps")
        last_eval, last_eval_step, stop = None, -1, False
        tokens, t0 = 0, time.perf_counter()
        while state.step < total_steps and not stop:
            batches = shard_batches(batches_of(state.epoch), rank, world)
            groups = [batches[i:i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]
            while state.group_in_epoch < len(groups) and state.step < total_steps:
                micro = [_to(collate([train_set[i] for i in idx], pad_token_id, padding_side), device)
                         for idx in groups[state.group_in_epoch]]
                n = _all_reduce(torch.tensor(float(sum(target_count(b, task) for b in micro))), world).item()
                group_loss = 0.0
                for k, batch in enumerate(micro):
                    # Gradients are averaged across processes only on the group's last backward.
                    last = k == len(micro) - 1
                    sync = contextlib.nullcontext() if world == 1 or last or fsdp else ddp.no_sync()
                    with sync:
                        with autocast():
                            loss = loss_sum(ddp, batch, task)[0]  # logits not kept alive through backward
                        (loss * (world / max(n, 1.0))).backward()
                    group_loss += loss.item()
                    tokens += int(batch["attention_mask"].sum())
                if fsdp:
                    sharding.average_gradients(trained, world)
                group_loss = _all_reduce(torch.tensor(group_loss), world).item() / max(n, 1.0)
                check_finite("loss", group_loss, state.step + 1)

                if args.max_grad_norm:
                    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                          args.max_grad_norm)
                    check_finite("gradient norm", float(norm), state.step + 1)
                lr = lr_at(state.step, base_lr=args.lr, total_steps=total_steps, warmup_steps=warmup,
                           schedule=args.schedule, min_lr_ratio=args.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                state.step += 1
                state.group_in_epoch += 1
                epoch_done = state.group_in_epoch == len(groups)
                if epoch_done:
                    state.epoch, state.group_in_epoch = state.epoch + 1, 0
                record = {"step": state.step, "epoch": state.epoch, "loss": group_loss, "lr": lr}
                state.history.append(record)
                elapsed = time.perf_counter() - t0
                bar.update(1, loss=f"{group_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens * world / elapsed:,.0f}")
                if state.step % args.log_every == 0 or state.step == total_steps:
                    _log(out, {**record, "tokens_per_s": tokens * world / elapsed})

                if (args.eval_every and state.step % args.eval_every == 0) or epoch_done or state.step == total_steps:
                    last_eval, last_eval_step = run_eval(), state.step
                    if last_eval is not None and args.early_stopping_patience and \
                            state.bad_evals >= args.early_stopping_patience:
                        stop = True
                if args.save_every and (state.step % args.save_every == 0 or stop) and out_dir is not None:
                    if rank == 0:
                        save_checkpoint(out_dir, model, optimizer, state.__dict__, keep_last=keep_last)
                    if world > 1:
                        dist.barrier()
                if stop or epoch_done:  # a new epoch needs its own batch order: recompute it
                    break
        bar.close()
    if last_eval_step != state.step:
        last_eval = run_eval()

    # Put the best adapter back: the last step is rarely the best one.
    if world > 1:
        dist.barrier()
    best_file = Path(out_dir) / "best" / "adapter_model.safetensors" if out_dir is not None else None
    # best_step is None when nothing was evaluated: a best/ left by an earlier run is not ours.
    if best_file is not None and best_file.is_file() and state.best_step is not None \
            and state.best_step != state.step:
        params = trainable_state_dict(model)
        with torch.no_grad():
            for key, value in load_safetensors(best_file).items():
                params[key.removeprefix("base_model.model.")].copy_(value)
    if out is not None and state.history:
        _plot_loss(out, state.history)
    return {"state": state, "eval": last_eval, "best": state.best_metric, "history": state.history}
