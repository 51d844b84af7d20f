"""Run by `torchrun --nproc_per_node=2` from test_train_ddp.py: trains the toy LM with
each process taking half of every global batch, then rank 0 saves the adapter."""

import sys

import torch
from safetensors.torch import save_file

from minilora.train.loop import train
from toy_lm import adapter, args, lm_examples, toy_model

if __name__ == "__main__":
    out = sys.argv[1]
    model = toy_model()
    result = train(model, lm_examples(n=32), lm_examples(n=8, seed=5),
                   args(batch_size=4, grad_accum=2, epochs=2, schedule="linear", warmup_steps=1, max_grad_norm=1.0),
                   task="causal-lm", out_dir=out, progress=False)
    if torch.distributed.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in adapter(model).items()}, f"{out}/final.safetensors")
        losses = torch.tensor([h["loss"] for h in result["history"]])
        save_file({"losses": losses}, f"{out}/losses.safetensors")
    torch.distributed.destroy_process_group()
