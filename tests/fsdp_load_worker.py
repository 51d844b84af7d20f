"""Run by torchrun from test_train_fsdp.py: load_model(sharded_by=shard_on_meta) keeps this
process's rows of every tensor, and gathered back they are the plain load's tensors, bit
for bit (tied embedding and head included, in the dtype asked for).

    fsdp_load_worker.py FOLDER DTYPE OUT [nf4]

With nf4 the base is quantized as it is read: each process keeps its part of every
layer's packed codes and scales, and gathered back they are the plain NF4 load's bytes.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import minilora
from minilora.train.sharding import shard_on_meta

if __name__ == "__main__":
    folder, dtype, out = sys.argv[1], getattr(torch, sys.argv[2]), Path(sys.argv[3])
    quantize = "nf4" if sys.argv[4:] == ["nf4"] else None
    dist.init_process_group("gloo")
    sharded = minilora.load_model(folder, task="causal-lm", dtype=dtype, quantize=quantize, sharded_by=shard_on_meta)
    plain = minilora.load_model(folder, task="causal-lm", dtype=dtype, quantize=quantize)
    expected = dict(plain.named_parameters())
    for name, layer in plain.named_modules():  # the 4-bit weights, as sharding exposes them
        if isinstance(layer, minilora.NF4Linear):
            for piece in ("packed", "absmax", "nested_absmax", "offset"):
                t = getattr(layer.weight, piece)
                if t is not None:
                    expected[f"{name}.nf4_{piece}"] = t.reshape(-1)
    got = dict(sharded.named_parameters())
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:5]
    rows = 0
    for name, p in got.items():
        q = expected[name]
        assert hasattr(p, "to_local"), f"{name} is not sharded"
        rows += p.to_local().shape[0]
        full = p.detach().full_tensor()
        assert full.dtype == q.dtype and torch.equal(full, q.detach()), name
    tied = getattr(plain.config, "tie_word_embeddings", False)
    assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == tied
    total = sum(q.shape[0] for q in expected.values())
    if dist.get_rank() == 0:
        (out / "ok").write_text(f"{rows} of {total} rows")
    dist.barrier()  # every collective done on every rank before gloo is torn down
    dist.destroy_process_group()
    # After DTensor.full_tensor() torch 2.13 aborts in 1 exit of 7 or so, in C++ teardown with
    # no Python frame left ("terminate called without an active exception"); the checks are
    # done and written, so leave without that teardown.
    sys.stdout.flush()
    os._exit(0)
