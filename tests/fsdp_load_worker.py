"""Run by torchrun from test_train_fsdp.py: load_model(sharded_by=shard_on_meta) keeps this
process's rows of every tensor, and gathered back they are the plain load's tensors, bit
for bit (tied embedding and head included, in the dtype asked for).

    fsdp_load_worker.py FOLDER DTYPE OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import minilora
from minilora.train.sharding import shard_on_meta

if __name__ == "__main__":
    folder, dtype, out = sys.argv[1], getattr(torch, sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    sharded = minilora.load_model(folder, task="causal-lm", dtype=dtype, sharded_by=shard_on_meta)
    plain = minilora.load_model(folder, task="causal-lm", dtype=dtype)
    names = [n for n, _ in sharded.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()], "parameter names differ"
    rows = 0
    for (name, p), (_, q) in zip(sharded.named_parameters(), plain.named_parameters()):
        assert hasattr(p, "to_local"), f"{name} is not sharded"
        rows += p.to_local().shape[0]
        full = p.detach().full_tensor()
        assert full.dtype == q.dtype and torch.equal(full, q.detach()), name
    tied = getattr(plain.config, "tie_word_embeddings", False)
    assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == tied
    total = sum(q.shape[0] for _, q in plain.named_parameters())
    if dist.get_rank() == 0:
        (out / "ok").write_text(f"{rows} of {total} rows")
    dist.barrier()  # every collective done on every rank before gloo is torn down
    dist.destroy_process_group()
