"""SST-2 sentiment with LoRA on all-MiniLM-L6-v2: minilora against transformers Trainer + peft.

    .venv/bin/python benchmarks/bench_train_cls.py                  # 20,000 sentences, 1 epoch
    .venv/bin/python benchmarks/bench_train_cls.py --repeats 2      # minilora, hf, hf, minilora
    .venv/bin/python benchmarks/bench_train_cls.py --quick          # 512 sentences: a smoke test
    .venv/bin/python benchmarks/bench_train_cls.py --stacks minilora,hf     # the fp32 pair only

What is trained. Both stacks use the settings of examples/sst2_minilm.toml, read from
that file: LoRA r=8, alpha=32, dropout 0.01 on query+value, a new 2-way classifier
trained in full (modules_to_save), 1 epoch, batch 32, lr 1e-3 with linear decay and no
warmup, weight decay 0, gradient clipping at 1.0 (both defaults), max length 64, seed 0.
The training sentences are the toml's seeded subset (max_train_examples = 20,000 of
train.tsv, picked by the same function minilora's build_datasets uses), chosen once in
the parent, written to a JSON file, and read by both children; dev is all 872
sentences of dev.tsv. Each stack tokenizes with its own tokenizer (a hash of the token
ids shows whether they agree).

- minilora: load_model + inject + minilora.train.loop.train() with eval_set=None, i.e. no
  periodic evaluation (the toml's eval_every = 200 is dropped, so that neither stack
  evaluates inside the timed call) and no best-checkpoint selection: the accuracy
  after training is that of the last step, as for the Trainer. minilora batches with
  dynamic padding and, as the toml says (data.group_by_length, on by default), length
  grouping; in training our BERT runs its projections on the real tokens only
  (minilora/fast/unpad.py), so its padding costs attention work alone.
- hf: AutoModelForSequenceClassification + peft get_peft_model(LoraConfig(SEQ_CLS)) +
  Trainer(TrainingArguments as in the toml, eval/save "no", use_cpu, no workers) with
  DataCollatorWithPadding (dynamic padding, random batches), AutoTokenizer with
  truncation to 64, a plain torch Dataset of dicts.

Padding matters more than anything else here. SST-2 sentences are short (13 tokens on
average in the 20,000-sentence subset) and uneven, so random batches of 32 padded to
their longest row are ~2/3 padding, while minilora's length-grouped batches are ~5%
padding: the Trainer processes ~2.9x more token positions. The printed "padded
positions" line shows both numbers (minilora's are those of its attention; its
projections see the real tokens only, so with random batches too, group_by_length =
false, it does not pay for most of the padding: a whole `run_training` at seed 1 took
307 s before this and 163 s after). --hf-group-by-length gives the Trainer the same
advantage (train_sampling_strategy="group_by_length") for a like-for-like comparison;
it is off by default, which is the Trainer's default.

Precision. Five stacks: minilora and hf in fp32; minilora-bf16 (`train.precision =
"bf16"`: the encoder loaded in bf16, the adapters and the new head in fp32, the step and
the evaluations under bf16 autocast); and transformers' two other CPU configurations,
hf-bf16 (from_pretrained(dtype=bfloat16), the Trainer otherwise unchanged) and hf-autocast
(fp32 weights, TrainingArguments(bf16=True), i.e. the Trainer's torch.autocast on CPU).
minilora fp32 is compared with hf fp32; minilora-bf16 with the fastest of the three
transformers rows, and with hf fp32 beside it.

How it is measured. Every (stack, repeat) runs in its own FRESH Python process, so a
peak belongs to that stack alone and nothing is cached between runs. The child times

    train s   the training call only (train() / trainer.train()), perf_counter;
    total s   from the child's first line (before importing torch) to its end:
              imports, tokenization, model load, two dev evaluations, training;

and reads its memory at the end:

    peak RSS  VmHWM (common.peak_rss_mb): the largest resident set the process
              ever had (libraries, weights, activations, optimizer), in MB;
    above baseline  peak RSS minus the RSS right after the imports (torch, the stack's
              libraries and model code): what the run itself added.

Dev accuracy is measured before training (LoRA B = 0, so the base encoder with an
untrained head) and after. Runs are interleaved (with --repeats 2 the stack list, then
the list reversed) and the table shows medians over repeats. Children print one JSON line that
the parent parses. Results: benchmarks/results/train_cls-<host>-<date>.json.
Goals (printed, never asserted): train wall time <= 0.5x hf's, peak RSS <= 0.7x, dev
accuracy >= hf's and >= 86%.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()  # a child's total time counts from here, before torch is imported

try:
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

from minilora.fast.lean_malloc import restart_with_lean_malloc

TOML = common.ROOT / "examples" / "sst2_minilm.toml"
STACKS = ("minilora", "hf", "minilora-bf16", "hf-bf16", "hf-autocast")
# bf16 (issue 20): minilora-bf16 is `train.precision = "bf16"` (base in bf16, adapters and
# head fp32, bf16 autocast); transformers in its three CPU configurations: hf (fp32),
# hf-bf16 (from_pretrained(dtype=bfloat16)), hf-autocast (fp32 weights, TrainingArguments(bf16=True),
# which on CPU runs the step under torch.autocast("cpu", bfloat16)).
HF_CONFIGS = ("hf", "hf-bf16", "hf-autocast")
# minilora row -> the transformers rows it is compared with (the fastest of them, and the first).
PAIRS = {"minilora": ("hf",), "minilora-bf16": HF_CONFIGS}
GOALS = {"train_time_ratio": 0.5, "peak_rss_ratio": 0.7, "min_accuracy": 0.86}
QUICK_TRAIN, QUICK_DEV = 512, 256


def _ids_hash(rows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- children


def child_minilora(job: dict, stack: str = "minilora") -> dict:
    import torch

    from minilora.train.batching import classification_examples, make_batches
    from minilora.train.config import load_config
    from minilora.train.data import ClassificationData
    from minilora.lora.inject import inject
    from minilora.io.loading import load_model
    from minilora.models import bert  # noqa: F401  (the model code, in the baseline as transformers' is)
    from minilora.train.run import lora_config
    from minilora.io.tokenizer import load_tokenizer
    from minilora.train import precision
    from minilora.train.loop import CLASSIFICATION, evaluate, train

    baseline = common.rss_mb()
    cfg = load_config(job["toml"])
    data = json.loads(Path(job["data"]).read_text())
    names = data["label_names"]
    tokenizer = load_tokenizer(cfg.model.path)
    train_set = classification_examples(
        tokenizer, ClassificationData(data["train"]["texts"], data["train"]["labels"], names), cfg.data.max_length)
    dev_set = classification_examples(
        tokenizer, ClassificationData(data["dev"]["texts"], data["dev"]["labels"], names), cfg.data.max_length)
    num_labels = len(names)

    # Pinned, not "auto" (which picks bf16 on a CPU with AMX): each row names its precision.
    cfg.train.precision = "bf16" if stack == "minilora-bf16" else "fp32"
    dtype = torch.bfloat16 if stack == "minilora-bf16" else torch.float32  # what run.load_dtype gives
    torch.manual_seed(cfg.train.seed)  # the new head's init
    model = load_model(cfg.model.path, task=CLASSIFICATION, dtype=dtype, num_labels=num_labels)
    torch.manual_seed(cfg.train.seed)  # the adapter's A, as run_training seeds it
    inject(model, lora_config(cfg))
    precision.trained_in_fp32(model)  # as train() does, so the untrained head is evaluated in fp32 too
    chosen = precision.Precision(dtype, "benchmark")

    def accuracy() -> float:
        return evaluate(model, dev_set.examples, CLASSIFICATION, batch_size=cfg.train.batch_size,
                        pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
                        autocast=lambda: precision.autocast(chosen, torch.device("cpu")))["accuracy"]

    acc_before = accuracy()
    t0 = time.perf_counter()
    result = train(model, train_set.examples, None, cfg.train, task=CLASSIFICATION, out_dir=None,
                   pad_token_id=tokenizer.pad_token_id, num_labels=num_labels, progress=False,
                   group_by_length=cfg.data.group_by_length)
    train_s = time.perf_counter() - t0
    acc_after = accuracy()
    losses = [h["loss"] for h in result["history"]]
    # The batches train() ran (one epoch, one process): make_batches is a pure function.
    lengths = train_set.lengths
    batches = make_batches(lengths, cfg.train.batch_size, cfg.train.seed, 0, group_by_length=cfg.data.group_by_length)
    return {
        "padded_positions": sum(max(lengths[i] for i in b) * len(b) for b in batches),
        "real_tokens": sum(lengths),
        "stack": stack, "acc_before": acc_before, "acc_after": acc_after, "train_s": train_s,
        "steps": result["state"].step, "mean_train_loss": sum(losses) / len(losses),
        "baseline_rss_mb": baseline, "train_ids_hash": _ids_hash([e["input_ids"] for e in train_set.examples]),
        "torch_threads": torch.get_num_threads(),
    }


class DictDataset:
    """A plain map-style dataset over a list of dicts (no `datasets` package)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class CountingCollator:
    """Wraps a collator and counts the (padded) token positions and real tokens it hands out."""

    def __init__(self, inner):
        self.inner, self.positions, self.tokens = inner, 0, 0

    def __call__(self, rows):
        batch = self.inner(rows)
        self.positions += batch["input_ids"].numel()
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def child_hf(job: dict, stack: str = "hf") -> dict:
    import torch
    import transformers
    import transformers.models.bert.modeling_bert  # noqa: F401  (imported lazily otherwise: keep it in the baseline)
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    baseline = common.rss_mb()
    s = job["settings"]
    data = json.loads(Path(job["data"]).read_text())
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])

    def dataset(part: dict) -> DictDataset:
        enc = tokenizer(part["texts"], truncation=True, max_length=s["max_length"])
        keys = list(enc.keys())
        return DictDataset([{**{k: enc[k][i] for k in keys}, "labels": y} for i, y in enumerate(part["labels"])])

    train_set, dev_set = dataset(data["train"]), dataset(data["dev"])
    num_labels = len(data["label_names"])

    transformers.set_seed(s["seed"])
    weights = torch.bfloat16 if stack == "hf-bf16" else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], num_labels=num_labels, dtype=weights)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=s["r"], lora_alpha=s["alpha"],
                                             lora_dropout=s["dropout"], target_modules=s["target_modules"]))
    collator = CountingCollator(DataCollatorWithPadding(tokenizer))

    @torch.no_grad()
    def accuracy() -> float:
        was_training = model.training
        model.eval()
        correct = 0
        for start in range(0, len(dev_set), s["batch_size"]):
            batch = collator([dev_set[i] for i in range(start, min(start + s["batch_size"], len(dev_set)))])
            labels = batch.pop("labels")
            # The Trainer's own evaluation runs under its autocast when bf16=True.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=stack == "hf-autocast"):
                correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        model.train(was_training)
        return correct / len(dev_set)

    with tempfile.TemporaryDirectory(prefix="bench-cls-hf-") as out:
        args = TrainingArguments(
            output_dir=out, train_sampling_strategy="group_by_length" if job["hf_group_by_length"] else "random",
            per_device_train_batch_size=s["batch_size"], learning_rate=s["lr"],
            num_train_epochs=s["epochs"], lr_scheduler_type="linear", warmup_steps=s["warmup_steps"],
            weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], eval_strategy="no",
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=s["seed"],
            disable_tqdm=True, bf16=stack == "hf-autocast")
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                          processing_class=tokenizer)
        acc_before = accuracy()
        collator.positions = collator.tokens = 0
        t0 = time.perf_counter()
        output = trainer.train()
        padded_positions, real_tokens = collator.positions, collator.tokens
        train_s = time.perf_counter() - t0
        acc_after = accuracy()
    return {
        "padded_positions": padded_positions, "real_tokens": real_tokens,
        "stack": stack, "acc_before": acc_before, "acc_after": acc_after, "train_s": train_s,
        "steps": output.global_step, "mean_train_loss": output.training_loss, "baseline_rss_mb": baseline,
        "train_ids_hash": _ids_hash([r["input_ids"] for r in train_set.rows]),
        "torch_threads": torch.get_num_threads(),
    }


def child(stack: str, job_path: str) -> dict:
    job = json.loads(Path(job_path).read_text())
    row = child_minilora(job, stack) if stack.startswith("minilora") else child_hf(job, stack)
    peak = common.peak_rss_mb()
    return {**row, "total_s": time.perf_counter() - T_START, "peak_rss_mb": peak,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "peak_above_baseline_mb": peak - row["baseline_rss_mb"]}


# --------------------------------------------------------------------------- parent


def prepare(max_train: int | None, max_dev: int | None, folder: Path, hf_group_by_length: bool = False) -> dict:
    """Pick the training subset once (as build_datasets would), write it for both children."""
    from minilora.train.batching import _cap  # the seeded subset build_datasets takes for max_train_examples
    from minilora.train.config import load_config
    from minilora.train.data import read_classification
    from minilora.io.paths import resolve_model_path

    cfg = load_config(TOML)
    d, t, lora = cfg.data, cfg.train, cfg.lora
    raw = read_classification(d.train_file, d.text_column, d.label_column, d.format)
    dev = read_classification(d.validation_file, d.text_column, d.label_column, d.format, raw.label_names)
    train_idx = _cap(list(range(len(raw.texts))), max_train, t.seed)
    dev_idx = list(range(len(dev.texts)))[:max_dev]
    data = {
        "label_names": raw.label_names,
        "train": {"texts": [raw.texts[i] for i in train_idx], "labels": [raw.labels[i] for i in train_idx]},
        "dev": {"texts": [dev.texts[i] for i in dev_idx], "labels": [dev.labels[i] for i in dev_idx]},
    }
    (folder / "data.json").write_text(json.dumps(data))
    if t.warmup_ratio or t.grad_accum != 1 or t.schedule != "linear" or cfg.model.dtype not in ("auto", "float32"):
        raise ValueError(f"{TOML} uses settings this benchmark does not mirror on the transformers side")
    settings = {
        "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules,
        "modules_to_save": lora.modules_to_save, "batch_size": t.batch_size, "lr": t.lr, "epochs": t.epochs,
        "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
        "schedule": t.schedule, "seed": t.seed, "max_length": d.max_length,
        "train_file": d.train_file, "validation_file": d.validation_file,
        "n_train": len(train_idx), "n_dev": len(dev_idx),
    }
    job = {"toml": str(TOML), "data": str(folder / "data.json"), "settings": settings,
           "model_dir": str(resolve_model_path(cfg.model.path)), "hf_group_by_length": hf_group_by_length}
    # The minilora child reads its settings from the toml but its sentences from data.json
    # (the subset is taken here, so the toml's max_train_examples does not apply again).
    (folder / "job.json").write_text(json.dumps(job))
    return job


def summarize(stack: str, runs: list[dict]) -> dict:
    keys = ("acc_before", "acc_after", "train_s", "total_s", "process_s", "peak_rss_mb",
            "peak_above_baseline_mb", "baseline_rss_mb", "mean_train_loss")
    row = {"stack": stack, "runs": len(runs), **{k: common.median(r[k] for r in runs) for k in keys}}
    row["steps"] = runs[0]["steps"]
    row["padded_positions"] = runs[0]["padded_positions"]
    row["real_tokens"] = runs[0]["real_tokens"]
    row["train_s_all"] = [r["train_s"] for r in runs]
    row["peak_rss_mb_all"] = [r["peak_rss_mb"] for r in runs]
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-train", type=int, default=20000, help="training sentences (seeded subset of train.tsv)")
    p.add_argument("--max-dev", type=int, default=None, help="dev sentences (default: all 872)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_TRAIN} training, {QUICK_DEV} dev sentences")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma-separated, in first-round run order")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per stack (medians reported)")
    p.add_argument("--order", choices=("alternate", "fixed"), default="alternate",
                   help="alternate: reverse the stack order every other repeat")
    p.add_argument("--hf-group-by-length", action="store_true",
                   help="let the Trainer group batches by length too (default: its default, random batches)")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    p.add_argument("--child", nargs=2, metavar=("STACK", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.max_train, args.max_dev = QUICK_TRAIN, args.max_dev or QUICK_DEV
    args.stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = [s for s in args.stacks if s not in STACKS]
    if unknown:
        p.error(f"unknown stack(s) {unknown}; choose from {', '.join(STACKS)}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        if args.child[0].startswith("minilora"):
            restart_with_lean_malloc()  # as the `minilora` command starts (bench_train_lm.py says more)
        common.print_result(child(*args.child))
        return None

    order = common.interleaved_order(args.stacks, args.repeats) if args.order == "alternate" \
        else args.stacks * args.repeats
    runs: dict[str, list[dict]] = {s: [] for s in args.stacks}
    with tempfile.TemporaryDirectory(prefix="bench-cls-") as tmp:
        job = prepare(args.max_train, args.max_dev, Path(tmp), args.hf_group_by_length)
        st = job["settings"]
        print(f"SST-2 on all-MiniLM-L6-v2: {st['n_train']:,} training / {st['n_dev']} dev sentences, "
              f"r={st['r']} alpha={st['alpha']} dropout={st['dropout']} on {st['target_modules']}, "
              f"batch {st['batch_size']}, lr {st['lr']}, {st['epochs']} epoch, max length {st['max_length']}")
        print(f"run order: {', '.join(order)}")
        for i, stack in enumerate(order, 1):
            t0 = time.perf_counter()
            row = common.run_child(Path(__file__).resolve(), [stack, str(Path(tmp) / "job.json")], stack)
            row["process_s"] = time.perf_counter() - t0
            runs[stack].append(row)
            print(f"  [{i}/{len(order)}] {stack:<8} acc {row['acc_before']:.4f} -> {row['acc_after']:.4f}  "
                  f"train {row['train_s']:.1f} s  total {row['total_s']:.1f} s  peak RSS {row['peak_rss_mb']:.0f} MB",
                  flush=True)

    rows = [summarize(s, runs[s]) for s in args.stacks]
    print()
    common.print_table(rows, [
        ("stack", "stack", "s"), ("acc_before", "acc before", ".4f"), ("acc_after", "acc after", ".4f"),
        ("train_s", "train s", ".1f"), ("total_s", "total s", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
        ("peak_above_baseline_mb", "above baseline MB", ".0f"), ("steps", "steps", "d")])
    print(f"medians over {args.repeats} fresh process(es) per stack; peak RSS = VmHWM of the child, "
          "above baseline = minus its RSS after imports")

    by = {r["stack"]: r for r in rows}
    ratios, verdicts = {}, {}

    def mark(ok):
        return "meets" if ok else "MISSES"

    for mine, theirs in PAIRS.items():
        hf_rows = [by[t] for t in theirs if t in by]
        if mine not in by or not hf_rows:
            continue
        ours = by[mine]
        # The fastest transformers configuration, and beside it the first (fp32).
        hf, first = min(hf_rows, key=lambda r: r["train_s"]), hf_rows[0]
        r = {
            "against": hf["stack"], "train_time": common.ratio(ours["train_s"], hf["train_s"]),
            "total_time": common.ratio(ours["total_s"], hf["total_s"]),
            "peak_rss": common.ratio(ours["peak_rss_mb"], hf["peak_rss_mb"]),
            "peak_above_baseline": common.ratio(ours["peak_above_baseline_mb"], hf["peak_above_baseline_mb"]),
            "against_first": first["stack"], "train_time_vs_first": common.ratio(ours["train_s"], first["train_s"]),
            "peak_rss_vs_first": common.ratio(ours["peak_rss_mb"], first["peak_rss_mb"]),
        }
        v = {
            "train_time": r["train_time"] <= GOALS["train_time_ratio"],
            "peak_rss": r["peak_rss"] <= GOALS["peak_rss_ratio"],
            "accuracy": ours["acc_after"] >= hf["acc_after"] and ours["acc_after"] >= GOALS["min_accuracy"],
        }
        ratios[mine], verdicts[mine] = r, v
        pad = " " * (len(mine) + len(hf["stack"]) + 6)
        print(f"\n{mine} / {hf['stack']}   train time {r['train_time']:.2f}x  (goal <= {GOALS['train_time_ratio']}x: "
              f"{mark(v['train_time'])});  total time {r['total_time']:.2f}x")
        print(f"{pad}peak RSS   {r['peak_rss']:.2f}x  (goal <= {GOALS['peak_rss_ratio']}x: "
              f"{mark(v['peak_rss'])});  above baseline {r['peak_above_baseline']:.2f}x")
        print(f"{pad}accuracy   {ours['acc_after']:.4f} vs {hf['acc_after']:.4f}  (goal >= theirs and >= "
              f"{GOALS['min_accuracy']:.0%}: {mark(v['accuracy'])})")
        if first is not hf:
            print(f"{pad}against {first['stack']} (fp32): train time {r['train_time_vs_first']:.2f}x, "
                  f"peak RSS {r['peak_rss_vs_first']:.2f}x")
    if "minilora" in runs and "hf" in runs and runs["minilora"] and runs["hf"]:
        same = {r["train_ids_hash"] for s in ("minilora", "hf") for r in runs[s]}
        print(f"\ntoken ids of the training set identical in both stacks: {len(same) == 1}")
        pad = {s: runs[s][0] for s in ("minilora", "hf")}
        print("padded token positions in the epoch: " + ", ".join(
            f"{s} {r['padded_positions']:,} ({1 - r['real_tokens'] / r['padded_positions']:.0%} padding)"
            for s, r in pad.items()))

    record = {
        "benchmark": "train_cls",
        **common.environment(),
        "settings": {**st, "hf_group_by_length": args.hf_group_by_length}, "run_order": order, "goals": GOALS,
        "results": rows, "ratios_minilora_over_hf": ratios, "goals_met": verdicts,
        "runs": runs,
    }
    if not args.no_save:
        # A smoke test (--quick or a smaller subset) never overwrites a full run's file.
        name = "train_cls" if st["n_train"] == 20000 and st["n_dev"] == 872 else f"train_cls-{st['n_train']}x{st['n_dev']}"
        path = common.write_results(name, record)
        print(f"wrote {path.relative_to(common.ROOT)}")
    return record


if __name__ == "__main__":
    main()
