"""Training an encoder on real tokens only against the padded computation, in one process.

    .venv/bin/python benchmarks/bench_unpad.py            # DistilBERT-base size, 12 batches, 3 rounds
    .venv/bin/python benchmarks/bench_unpad.py --quick    # a tiny model: a smoke test

What runs. A DistilBERT classifier of distilbert-base-uncased's size (6 layers, dim 768,
66M parameters; random weights: only the time is measured) with LoRA r=8 on q_lin and
v_lin (dropout 0.1) and the head trained in full, AdamW, fp32 on the CPU. Batches of 32
random SST-2 training sentences (../shared/data/sst2/train.tsv), each row as long as its
sentence's words + 2 (capped at 64; random ids), padded to the batch's longest: about
two thirds padding, as for the Trainer's random batches in bench_train_cls.py.

How. The model is on minilora's fast path (minilora.fast.enable, as the trainer does).
The same batches run with the real-token encoder (minilora/fast/unpad.py: every step
but attention on the real tokens) and with the plain DistilBertModel class in its place
(the padded layout throughout, as in evaluation; every other fast piece stays),
alternating rounds in one process after a warm-up round; the table shows the median
seconds per step over the timed rounds. JSON goes to
benchmarks/results/unpad-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

try:
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def make_batches(n: int, batch_size: int, vocab: int, seed: int = 0):
    import numpy as np
    import torch

    words = [len(line.split("\t")[1].split()) for line in SST2.read_text().splitlines()[1:]]
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = [min(64, words[i] + 2) for i in rng.integers(0, len(words), batch_size)]
        mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(1000, vocab, mask.shape, generator=g) * mask
        batches.append((ids, mask, torch.randint(0, 2, (batch_size,), generator=g)))
    return batches


def run(quick: bool = False, n_batches: int = 12, rounds: int = 3) -> dict:
    import torch
    import transformers

    import minilora.fast
    from minilora.fast import unpad
    from minilora.fast.cpu_memory import hold_freed_memory
    from minilora.io.loading import load_model
    from minilora.lora.config import LoraConfig
    from minilora.lora.inject import inject
    from minilora.models.distilbert import DistilBertModel

    torch.manual_seed(0)
    size = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4) if quick else {}
    config = transformers.DistilBertConfig(num_labels=2, **size)
    with tempfile.TemporaryDirectory() as folder:
        transformers.DistilBertForSequenceClassification(config).save_pretrained(folder)
        model = load_model(folder, task="sequence-classification")
    inject(model, LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["q_lin", "v_lin"],
                             modules_to_save=["pre_classifier", "classifier"]))
    minilora.fast.enable(model)
    unpad.install(model)  # enable has done it (0 changes); the toggle below relies on it
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = make_batches(2 if quick else n_batches, 32, config.vocab_size)

    # The encoder's class decides the layout; its attention modules take either.
    encoder_class = {"padded": DistilBertModel, "real tokens": unpad.RealTokenDistilBertModel}
    times = {"padded": [], "real tokens": []}
    with hold_freed_memory():
        for r in range(1 + (1 if quick else rounds)):  # round 0 warms up
            for mode in times:
                model.distilbert.__class__ = encoder_class[mode]
                t0 = time.perf_counter()
                for ids, mask, labels in batches:
                    model(ids, attention_mask=mask, labels=labels).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if r:
                    times[mode].append((time.perf_counter() - t0) / len(batches))
    tokens = sum(int(m.sum()) for _, m, _ in batches)
    positions = sum(m.numel() for _, m, _ in batches)
    rows = [{"path": mode, "step_s": statistics.median(t), "step_s_all": t} for mode, t in times.items()]
    return {"benchmark": "unpad", **common.environment(), "quick": quick,
            "settings": {"model": "DistilBERT-base size, random weights" if not quick else "tiny DistilBERT",
                         "batch_size": 32, "batches": len(batches), "timed_rounds": len(rows[0]["step_s_all"])},
            "real_tokens": tokens, "padded_positions": positions, "results": rows,
            "speedup": rows[0]["step_s"] / rows[1]["step_s"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 batches: a smoke test")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    args = p.parse_args(argv)
    record = run(quick=args.quick)
    print(f"{record['settings']['model']}, batches of 32 SST-2-length rows: {record['real_tokens']:,} real tokens "
          f"in {record['padded_positions']:,} padded positions "
          f"({1 - record['real_tokens'] / record['padded_positions']:.0%} padding)")
    common.print_table(record["results"], [("path", "training path", "s"), ("step_s", "s/step", ".3f")])
    print(f"real tokens only: {record['speedup']:.2f}x faster than the padded computation")
    if not args.no_save:
        print(f"wrote {common.write_results('unpad', record).relative_to(common.ROOT)}")
    return record


if __name__ == "__main__":
    main()
