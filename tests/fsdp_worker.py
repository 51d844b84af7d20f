"""Run by torchrun from test_train_fsdp.py (and in-process for the single-process run):
LoRA on a tiny Llama folder, fp32 or an NF4 base, with DDP or FSDP; rank 0 saves the
adapter and the per-step losses.

    fsdp_worker.py FOLDER OUT MODE NF4 CHECKPOINTING GRAD_ACCUM BATCH_SIZE

Environment: SAVE_EVERY (checkpoints), RESUME (a checkpoint to resume from), KILL_RANK
and KILL_AT_STEP (that rank exits during that step, as a crashed process would), DORA=1,
SAVE_MODULES (modules_to_save, comma-separated), PRECISION (train.precision, default fp32).
"""

import os
import sys

import torch
from safetensors.torch import save_file

import minilora
from minilora import LoraConfig, inject
from minilora.models import grad_checkpoint
from minilora.train.loop import train
from minilora.train.sharding import shard_on_meta
from toy_lm import args

VOCAB = 96


def examples(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 17, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        cut = int(torch.randint(0, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def run(folder, out, mode="ddp", nf4=False, checkpointing=False, grad_accum=1, batch_size=8):
    if mode == "fsdp" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    # Under FSDP each process keeps only its shards as it reads (an NF4 base: its part of the codes).
    whole = os.environ.get("DORA") or os.environ.get("SAVE_MODULES")  # copied from the base: load whole
    model = minilora.load_model(folder, task="causal-lm", dtype=torch.float32, quantize="nf4" if nf4 else None,
                                sharded_by=shard_on_meta if mode == "fsdp" and not whole else None)
    torch.manual_seed(int(os.environ.get("INIT_SEED", "2")))
    inject(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, use_dora=os.environ.get("DORA") == "1",
                             modules_to_save=os.environ["SAVE_MODULES"].split(",") if os.environ.get("SAVE_MODULES")
                             else None,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # a non-zero B, so the first step already moves everything
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    if checkpointing:
        grad_checkpoint.enable(model)
    save_every, resume = os.environ.get("SAVE_EVERY"), os.environ.get("RESUME")
    if "KILL_AT_STEP" in os.environ and os.environ.get("RANK") == os.environ["KILL_RANK"]:
        import minilora.train.loop as loop

        real_lr_at, kill_at = loop.lr_at, int(os.environ["KILL_AT_STEP"])

        def lr_at(step, **kw):  # called once per optimizer step, after its backward
            if step + 1 == kill_at:
                os._exit(9)
            return real_lr_at(step, **kw)

        loop.lr_at = lr_at
    result = train(model, examples(), examples(12, seed=3),
                   args(batch_size=batch_size, grad_accum=grad_accum, max_steps=5, lr=2e-3, schedule="linear",
                        warmup_steps=1, max_grad_norm=1.0, distributed=mode, eval_every=5,
                        save_every=int(save_every) if save_every else None, resume_from=resume,
                        precision=os.environ.get("PRECISION", "fp32")),
                   task="causal-lm", out_dir=out, progress=False, pad_token_id=0)
    adapter = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    losses = torch.tensor([h["loss"] for h in result["history"]])
    return adapter, losses, result


if __name__ == "__main__":
    folder, out, mode, nf4, ckpt, accum, bs = sys.argv[1:8]
    adapter, losses, result = run(folder, out, mode, nf4 == "1", ckpt == "1", int(accum), int(bs))
    if torch.distributed.get_rank() == 0:
        save_file(adapter, f"{out}/final.safetensors")
        save_file({"losses": losses, "eval_loss": torch.tensor([result["eval"]["loss"]])},
                  f"{out}/losses.safetensors")
    torch.distributed.barrier()  # every collective done on every rank before gloo is torn down
    torch.distributed.destroy_process_group()
