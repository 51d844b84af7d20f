"""LoRA training steps on SmolLM2-135M-Instruct (CPU, fp32 and bf16): minilora against transformers + peft.

    .venv/bin/python benchmarks/bench_train_lm.py                   # 5 timed steps per run
    .venv/bin/python benchmarks/bench_train_lm.py --repeats 2
    .venv/bin/python benchmarks/bench_train_lm.py --steps 1 --seq-len 64    # smoke test
    .venv/bin/python benchmarks/bench_train_lm.py --qlora           # + the 4-bit (QLoRA) pair
    .venv/bin/python -m benchmarks train_step                       # through the runner (with --qlora)

What is trained. LoRA r=16, alpha=32, dropout 0.05 on every linear layer of attention
and MLP (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), fp32 weights,
AdamW lr 2e-4 (weight decay 0), on Alpaca rows (../shared/data/alpaca/alpaca_5000.json)
rendered with the model's chat template, loss on the response tokens only. Each step is
one batch of 4 rows x 256 tokens: rows whose chat rendering has at least 256 tokens,
truncated to 256, so every step processes exactly 1,024 real tokens (no padding; the
attention mask is all ones). The batches are built ONCE in the parent with minilora's
tokenizer and data code (chat_examples) and saved to a temporary safetensors file that
every child reads, so both stacks see identical input_ids / attention_mask / labels.

- minilora: load_model + inject, a hand-written step: minilora.train.loop.loss_sum (summed
  token cross-entropy) / target_count, backward, AdamW from minilora.train.loop.make_optimizer,
  zero_grad(set_to_none=True); this is what minilora.train.loop.train() does per step, minus
  gradient clipping, scheduling and logging. Like train(), it runs with freed memory
  held for reuse (minilora/fast/cpu_memory.py: glibc's mmap/trim thresholds).
- hf: AutoModelForCausalLM.from_pretrained(dtype=float32) + peft get_peft_model with
  the same LoraConfig; the same step with the model's own loss (labels=..., use_cache=False)
  and torch AdamW over the trainable parameters.
- bf16 (issue 20): minilora-bf16 is what `train.precision = "bf16"` runs (train/precision.py):
  the frozen base loaded in bf16, LoRA A/B in fp32, the step under bf16 autocast. The
  transformers side runs all three of its CPU configurations, and each minilora bf16 ratio
  is taken against the fastest of them (and, printed beside it, against fp32):
  hf (fp32), hf-bf16 (from_pretrained(dtype=bfloat16); peft keeps the adapters in fp32),
  hf-autocast (fp32 weights, the forward under torch.autocast("cpu", bfloat16), which is
  what the Trainer's bf16=True does). Their first losses are checked against the fp32
  ones to 2e-2, and the floor line is measured again with bf16 operands.
- QLoRA (--qlora, checkpointing off only): the same LoRA over a 4-bit NF4 base, every
  linear layer of the blocks quantized (blocksize 64, double quantization, fp32 compute;
  embeddings, norms and head stay fp32). minilora-nf4: load_model(quantize="nf4") +
  inject, the same step. hf-bnb4: from_pretrained with BitsAndBytesConfig(load_in_4bit,
  nf4, double quant, compute fp32, device_map="cpu") + get_peft_model, the same step
  (no prepare_model_for_kbit_training: it would turn checkpointing on, and every
  non-4-bit weight is fp32 already). Both quantize the same fp32 weights with the same
  (bit-identical) algorithm, so their first losses are compared with each other. If
  bitsandbytes' CPU 4-bit step fails, the run says why and times minilora-nf4 alone.
- gradient checkpointing off and on: minilora calls grad_checkpoint.enable(model) (as
  minilora.train.run does for `gradient_checkpointing = true`); transformers gets
  gradient_checkpointing_enable(use_reentrant=False) + enable_input_require_grads().
  Both then keep only each decoder layer's input and run every layer forward again in
  the backward. Mode "on2" (minilora only, compared with transformers' "on"):
  `checkpoint_every = 2`, one layer in two checkpointed, half the recomputation for
  about half the memory saving; transformers has no such setting.

How it is measured. First a check: one fresh process per stack computes the loss of the
first batch with the adapter injected (B = 0, so it is the base model's loss) and the
two must agree to 1e-4; the timed runs report the loss of their warm-up step too, and
those are checked the same way. Then every (stack, checkpointing) combination runs in
its own FRESH process: load, inject, one warm-up step (not timed), then --steps timed
steps (perf_counter around forward + loss + backward + optimizer step); the child reports
the median seconds per step, tokens/s = tokens per step / median, and at its end

    peak RSS  VmHWM (common.peak_rss_mb): the largest resident set of the process
              (libraries, weights, activations, gradients, optimizer state), in MB;
    above baseline  peak RSS minus the RSS right after the imports.

Each stack runs as its users get it: the minilora children restart themselves with
glibc's malloc tunables, as the `minilora` command does (minilora/fast/lean_malloc.py), the
transformers children keep the defaults. Set GLIBC_TUNABLES in the parent's environment
to give both the same (e.g. `glibc.malloc.tcache_count=7` keeps glibc's defaults for
minilora too); each row records what its child ran with.

Runs are interleaved: minilora-off, hf-off, minilora-on, hf-on, and with --repeats 2
that list again reversed; the table shows medians over repeats. Results:
benchmarks/results/train_lm-<host>-<date>.json. Goals (printed, never asserted), per
checkpointing mode (minilora's on2 against transformers' on): tokens/s minilora/hf >= 1.5x
in fp32 and >= 1.6x in bf16 (against transformers' fastest configuration), peak RSS
<= 0.8x. With --qlora and bf16 stacks, the NF4 pair runs in both compute dtypes too.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from . import common
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import common

from minilora.fast.lean_malloc import restart_with_lean_malloc

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_5000.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS}
LR = 2e-4
SEED = 0
# fp32 and bf16 (train/precision.py) for minilora; transformers + peft in all three of its
# CPU configurations: fp32, bf16 weights ("hf-bf16", what from_pretrained(dtype=bfloat16)
# gives), and fp32 weights under bf16 autocast ("hf-autocast", the Trainer's bf16=True).
STACKS = ("minilora", "hf", "minilora-bf16", "hf-bf16", "hf-autocast")
HF_CONFIGS = ("hf", "hf-bf16", "hf-autocast")
QLORA_STACKS = ("minilora-nf4", "hf-bnb4", "minilora-nf4-bf16", "hf-bnb4-bf16")
BF16_STACKS = {"minilora-bf16", "hf-bf16", "hf-autocast", "minilora-nf4-bf16", "hf-bnb4-bf16"}
# Stacks whose first losses must agree, and how closely: the same fp32 base (or the same
# NF4 bytes) to 1e-4; a bf16 step against the fp32 one to 2e-2 (issue 20's bound).
LOSS_GROUPS = {"fp32": (("minilora", "hf"), 1e-4), "nf4": (("minilora-nf4", "hf-bnb4"), 1e-4),
               "bf16": (("minilora", "minilora-bf16", "hf-bf16", "hf-autocast"), 2e-2),
               "nf4-bf16": (("minilora-nf4", "minilora-nf4-bf16", "hf-bnb4-bf16"), 2e-2)}
# minilora row -> the transformers rows it is compared with (the fastest of them, and the first).
PAIRS = {"minilora": ("hf",), "minilora-bf16": HF_CONFIGS,
         "minilora-nf4": ("hf-bnb4",), "minilora-nf4-bf16": ("hf-bnb4", "hf-bnb4-bf16")}
_HELD = contextlib.ExitStack()
# Closed at exit, before interpreter teardown: left to the garbage collector then, its
# mallopt call fails on a half-torn-down ctypes ("Exception ignored ... wrong type").
atexit.register(_HELD.close)
# minilora / the fastest transformers row it is compared with (PAIRS); bf16 rows against
# the fastest of transformers' three CPU configurations.
GOALS = {"tokens_per_s_ratio": 1.5, "tokens_per_s_ratio_bf16": 1.6, "peak_rss_ratio": 0.8}


def tokens_goal(stack: str) -> float:
    return GOALS["tokens_per_s_ratio_bf16" if stack in BF16_STACKS else "tokens_per_s_ratio"]
# Checkpointing modes: layers run again in the backward, one in N (minilora's checkpoint_every).
CHECKPOINT_EVERY = {"on": 1, "on2": 2}
MODES = ("off", "on", "on2")
MINILORA_ONLY_MODES = {"on2": "on"}  # mode -> the transformers mode it is compared with
LOSS_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- children


def _minilora_setup(job: dict, checkpointing: str, stack: str):
    import torch

    import minilora.fast
    from minilora.lora.config import LoraConfig
    from minilora.lora.inject import inject
    from minilora.io.loading import load_model
    from minilora.fast.cpu_memory import hold_freed_memory
    from minilora.models.grad_checkpoint import enable
    from minilora.train import precision
    from minilora.train.loop import loss_sum, make_optimizer, target_count

    # train() runs its loop inside this on the CPU; the child keeps it until it exits.
    _HELD.enter_context(hold_freed_memory())

    dtype = torch.bfloat16 if stack in BF16_STACKS else torch.float32
    quant = dict(quantize="nf4", double_quant=True, blocksize=64, compute_dtype=dtype) if "nf4" in stack else {}
    model = load_model(job["model_dir"], task="causal-lm", dtype=dtype, **quant)
    torch.manual_seed(SEED)
    inject(model, LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    precision.trained_in_fp32(model)  # as train() does (a no-op in fp32)
    minilora.fast.enable(model)
    if checkpointing != "off":
        enable(model, every=CHECKPOINT_EVERY[checkpointing])
    model.train()
    chosen = precision.Precision(dtype, "benchmark")

    def loss_of(batch):
        with precision.autocast(chosen, torch.device("cpu")):
            total, _ = loss_sum(model, batch, "causal-lm")
        return total / target_count(batch, "causal-lm")

    return model, loss_of, lambda: make_optimizer(model, LR, 0.0, torch.device("cpu"))


def _hf_setup(job: dict, checkpointing: str, stack: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # hf-bf16 and hf-bnb4-bf16 hold their weights in bf16; hf-autocast keeps fp32 weights.
    weights = torch.bfloat16 if stack in ("hf-bf16", "hf-bnb4-bf16") else torch.float32
    quant = {}
    if "bnb4" in stack:
        quant = dict(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=weights))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=weights, **quant)
    if checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(SEED)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules=LORA["target_modules"]))
    model.train()
    autocast = stack == "hf-autocast"

    def loss_of(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss

    def optimizer():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

    return model, loss_of, optimizer


def floor_child(job_path: str, dtype_name: str = "fp32") -> dict:
    """The work every stack must do in a step, timed alone on random tensors of the model's shapes.

    Per layer: the seven frozen projections forward (x W^T) and their input gradients
    backward (dy W), and causal attention forward + backward (SDPA, as both stacks
    call it); then the LM head forward and backward on the batch's target rows. No
    adapter, no norm, no activation, no optimizer: a step can take no less than this.
    In "bf16" every operand is bf16, at the measured bf16 GEMM rate.
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    job = json.loads(Path(job_path).read_text())
    cfg = json.loads((Path(job["model_dir"]) / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    labels = load_file(job["batches"])["labels"]
    batch, seq = labels.shape[1:]
    n, targets = batch * seq, int((labels[:, :, 1:] != -100).sum(dim=(1, 2)).float().mean())
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden),
              (hidden, inter), (hidden, inter), (inter, hidden)]  # (in, out) of the seven projections
    dt = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    weights = [(torch.randn(o, i) * 0.02).to(dt) for i, o in shapes]
    xs = {i: torch.randn(n, i, dtype=dt) for i, _ in shapes}
    gs = {o: torch.randn(n, o, dtype=dt) for _, o in shapes}
    head = (torch.randn(cfg["vocab_size"], hidden) * 0.02).to(dt)
    head_x, head_g = torch.randn(targets, hidden, dtype=dt), torch.randn(targets, cfg["vocab_size"], dtype=dt)
    q = torch.randn(batch, heads, seq, head_dim, dtype=dt, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, dtype=dt, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, dtype=dt, requires_grad=True)
    dy = torch.randn(batch, heads, seq, head_dim, dtype=dt)

    def matmuls():
        for _ in range(layers):
            for (i, o), w in zip(shapes, weights):
                xs[i] @ w.t()
                gs[o] @ w
        head_x @ head.t()
        head_g @ head

    def attention():
        for _ in range(layers):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads < heads)
            y.backward(dy)

    def median_s(fn, rounds=3):
        fn()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    gemm_s, attention_s = median_s(matmuls), median_s(attention)
    gflop = 2 * 2 * (n * sum(i * o for i, o in shapes) * layers + targets * hidden * cfg["vocab_size"]) / 1e9
    return {"stack": "floor", "dtype": dtype_name, "matmul_s": gemm_s, "attention_s": attention_s, "floor_s": gemm_s + attention_s,
            "matmul_gflop": gflop, "matmul_gflops_per_s": gflop / gemm_s, "torch_threads": torch.get_num_threads()}


def child(mode: str, stack: str, checkpointing: str, job_path: str) -> dict:
    """mode "check": the loss of batch 0, no training; mode "time": warm-up + timed steps;
    mode "floor": the shared work alone (floor_child)."""
    if mode == "floor":
        return floor_child(job_path, "bf16" if stack == "floor-bf16" else "fp32")
    t_start = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    # Import the stack and its model code before reading the baseline, so that the
    # baseline holds the libraries and "above baseline" only what the run allocates.
    if stack.startswith("minilora"):
        import minilora.io.loading  # noqa: F401
        import minilora.models.llama  # noqa: F401
        import minilora.train.loop  # noqa: F401
        setup = _minilora_setup
    else:
        if "bnb4" in stack:
            common.import_bitsandbytes()
        import peft  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401  (transformers imports it lazily)
        setup = _hf_setup
    baseline = common.rss_mb()
    job = json.loads(Path(job_path).read_text())
    data = load_file(job["batches"])
    n_batches = data["input_ids"].shape[0]
    batches = [{k: v[i].contiguous() for k, v in data.items()} for i in range(n_batches)]
    model, loss_of, make_opt = setup(job, checkpointing, stack)
    row = {"stack": stack, "checkpointing": checkpointing, "baseline_rss_mb": baseline,
           "torch_threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}

    if mode == "check":
        with torch.no_grad():
            row["first_loss"] = float(loss_of(batches[0]))
    else:
        optimizer = make_opt()

        def step(batch) -> float:
            loss = loss_of(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        row["first_loss"] = step(batches[0])  # warm-up, not timed
        times, losses = [], []
        for i in range(job["steps"]):
            t0 = time.perf_counter()
            losses.append(step(batches[(i + 1) % n_batches]))
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        row.update(step_s=s, step_s_all=times, tokens_per_s=job["tokens_per_step"] / s, losses=losses)
    peak = common.peak_rss_mb()
    row.update(peak_rss_mb=peak, peak_above_baseline_mb=peak - baseline, total_s=time.perf_counter() - t_start)
    return row


# --------------------------------------------------------------------------- parent


def default_model_dir() -> Path:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from helpers_smollm import smollm2_hf_dir  # converts the GGUF once per machine, then cached

    return smollm2_hf_dir()


def build_batches(model_dir: Path, n_batches: int, batch_size: int, seq_len: int, out: Path) -> dict:
    """Batches of Alpaca rows with >= seq_len tokens (cut to seq_len), saved for the children."""
    import torch
    from safetensors.torch import save_file

    from minilora.train.batching import chat_examples
    from minilora.train.data import IGNORE_INDEX, read_instructions
    from minilora.io.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    conversations = read_instructions(ALPACA)
    want = n_batches * batch_size
    rows, scanned = [], 0
    for start in range(0, len(conversations), 500):
        chunk = conversations[start:start + 500]
        scanned += len(chunk)
        # chat_examples cuts to seq_len and drops rows with no answer token left.
        for e in chat_examples(tokenizer, chunk, seq_len).examples:
            if len(e["input_ids"]) == seq_len and any(x != IGNORE_INDEX for x in e["labels"][1:]):
                rows.append(e)
        if len(rows) >= want:
            break
    rows = rows[:len(rows) // batch_size * batch_size][:want]
    if not rows:
        raise SystemExit(f"fewer than {batch_size} Alpaca rows reach {seq_len} tokens; lower --seq-len")
    ids = torch.tensor([e["input_ids"] for e in rows]).view(-1, batch_size, seq_len)
    labels = torch.tensor([e["labels"] for e in rows]).view(-1, batch_size, seq_len)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, str(out))
    return {"n_batches": ids.shape[0], "rows_scanned": scanned, "target_tokens_per_batch":
            [int((b[:, 1:] != IGNORE_INDEX).sum()) for b in labels]}


def summarize(runs: list[dict]) -> dict:
    first = runs[0]
    row = {"stack": first["stack"], "checkpointing": first["checkpointing"], "runs": len(runs)}
    for k in ("step_s", "tokens_per_s", "peak_rss_mb", "peak_above_baseline_mb", "baseline_rss_mb", "total_s"):
        row[k] = common.median(r[k] for r in runs)
    row["step_s_all"] = [t for r in runs for t in r["step_s_all"]]
    row["peak_rss_mb_all"] = [r["peak_rss_mb"] for r in runs]
    return row


def check_losses(values: dict[str, float], tolerance: float = LOSS_TOLERANCE) -> tuple[bool, float]:
    """All first-step losses within `tolerance` of each other: (ok, largest difference)."""
    spread = max(values.values()) - min(values.values())
    return spread <= tolerance, spread


def check_groups(values: dict[str, float]) -> tuple[bool, dict[str, float]]:
    """check_losses within each group of LOSS_GROUPS (keys start with the stack name):
    (all ok, each group's spread)."""
    ok, spreads = True, {}
    for name, (stacks, tolerance) in LOSS_GROUPS.items():
        group = {k: v for k, v in values.items() if k.split(":")[0] in stacks}
        if len(group) > 1:
            group_ok, spreads[name] = check_losses(group, tolerance)
            ok = ok and group_ok
    return ok, spreads


def _spreads(spreads: dict[str, float]) -> str:
    return ", ".join(f"{name} {v:.1e} (tolerance {LOSS_GROUPS[name][1]:g})" for name, v in spreads.items())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per run, after one warm-up step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per combination (medians reported)")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma-separated, of " + ", ".join(STACKS))
    p.add_argument("--checkpointing", default="off,on,on2",
                   help="gradient checkpointing modes: off, on (every layer), on2 (minilora: every 2nd layer)")
    p.add_argument("--qlora", action="store_true", help="also the NF4 stacks (checkpointing off): "
                   + ", ".join(QLORA_STACKS) + " (the bf16 ones when bf16 stacks are asked for)")
    p.add_argument("--model-dir", type=Path, default=None, help="HF folder (default: the converted SmolLM2)")
    p.add_argument("--skip-check", action="store_true", help="skip the separate first-loss check processes")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    p.add_argument("--child", nargs=4, metavar=("MODE", "STACK", "CKPT", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    args.checkpointing = [c.strip() for c in args.checkpointing.split(",") if c.strip()]
    if not set(args.stacks) <= set(STACKS) or not set(args.checkpointing) <= set(MODES):
        p.error(f"--stacks takes {', '.join(STACKS)}; --checkpointing takes {','.join(MODES)}")
    return args


def run(steps: int = 5, seq_len: int = 256, batch_size: int = 4, repeats: int = 1, stacks=STACKS,
        checkpointing=MODES, qlora: bool = False, model_dir: Path | None = None, skip_check: bool = False,
        log=print) -> dict:
    """Measure; returns the record main() writes. log: where progress lines go."""
    script = Path(__file__).resolve()
    model_dir = model_dir or default_model_dir()
    combos = [(stack, ckpt) for ckpt in checkpointing for stack in stacks
              if ckpt not in MINILORA_ONLY_MODES or stack.startswith("minilora")]
    want_bf16 = any(stack in BF16_STACKS for stack in stacks)
    qlora_stacks = [s for s in QLORA_STACKS if want_bf16 or s not in BF16_STACKS] if qlora else []
    tokens_per_step = batch_size * seq_len
    qlora_unavailable = {}
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp:
        batch_file = Path(tmp) / "batches.safetensors"
        data = build_batches(model_dir, 1 + steps, batch_size, seq_len, batch_file)
        job = {"model_dir": str(model_dir), "batches": str(batch_file), "steps": steps,
               "tokens_per_step": tokens_per_step}
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        log(f"SmolLM2-135M-Instruct, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout={LORA['dropout']} "
            f"on {', '.join(TARGETS)}; AdamW lr {LR}" + ("; + QLoRA (NF4 base) pair" if qlora else ""))
        log(f"batches: {data['n_batches']} distinct of {batch_size} x {seq_len} tokens "
            f"(Alpaca rows >= {seq_len} tokens, cut; {data['target_tokens_per_batch']} answer tokens each); "
            f"{steps} timed step(s) after 1 warm-up")

        check = {}
        if not skip_check:
            for stack in [*stacks, *qlora_stacks]:
                try:
                    check[stack] = common.run_child(script, ["check", stack, "off", str(job_path)], f"{stack} check")
                except RuntimeError as e:
                    if "bnb4" not in stack:
                        raise
                    # Say why, keep the rest: the QLoRA column then holds minilora-nf4 alone.
                    reason = _failure_reason(str(e))
                    qlora_unavailable[stack] = reason
                    log(f"{stack}: transformers + peft + bitsandbytes 4-bit failed on this machine, not timed: {reason}")
            values = {s: r["first_loss"] for s, r in check.items()}
            ok, spreads = check_groups(values)
            log("first-batch loss (adapter B = 0): " + ", ".join(f"{s} {v:.6f}" for s, v in values.items())
                + f"; spreads: {_spreads(spreads)}: " + ("OK" if ok else "MISMATCH"))
            if not ok:
                log("WARNING: the stacks do not compute the same loss; the timings below compare different work")
        combos += [(stack, "off") for stack in qlora_stacks if stack not in qlora_unavailable]
        order = common.interleaved_order(combos, repeats)
        runs: dict[tuple, list[dict]] = {c: [] for c in combos}

        log(f"run order: {', '.join(f'{s}-{c}' for s, c in order)}")
        for i, (stack, ckpt) in enumerate(order, 1):
            try:
                row = common.run_child(script, ["time", stack, ckpt, str(job_path)], f"{stack} checkpointing {ckpt}")
            except RuntimeError as e:
                if "bnb4" not in stack:
                    raise
                qlora_unavailable[stack] = _failure_reason(str(e))
                log(f"{stack}: the 4-bit training step failed, not timed: {qlora_unavailable[stack]}")
                continue
            runs[(stack, ckpt)].append(row)
            log(f"  [{i}/{len(order)}] {stack:<12} checkpointing {ckpt:<3}  {row['step_s']:.2f} s/step  "
                f"{row['tokens_per_s']:.0f} tok/s  peak RSS {row['peak_rss_mb']:.0f} MB  "
                f"first loss {row['first_loss']:.6f}")

        # Once, after the stacks: what no stack can avoid (frozen matmuls + attention).
        floors = {}
        for dtype in ("fp32", "bf16") if want_bf16 else ("fp32",):
            floors[dtype] = f = common.run_child(script, ["floor", "floor" if dtype == "fp32" else "floor-bf16", "off",
                                                          str(job_path)], f"shared floor {dtype}")
            log(f"shared floor {dtype}: frozen matmuls {f['matmul_s']:.2f} s ({f['matmul_gflops_per_s']:.0f} GFLOP/s) "
                f"+ attention {f['attention_s']:.2f} s = {f['floor_s']:.2f} s per step")
        floor = floors["fp32"]

    combos = [c for c in combos if runs[c]]
    first_losses = {f"{s}:{c}-{k}": r["first_loss"] for (s, c), rs in runs.items() for k, r in enumerate(rs)}
    timed_ok, timed_spreads = check_groups(first_losses)
    log(f"warm-up (first-step) losses of all timed runs: {_spreads(timed_spreads)}: {'OK' if timed_ok else 'MISMATCH'}")

    rows = [summarize(runs[c]) for c in combos]
    ratios, verdicts = {}, {}
    by = {(r["stack"], r["checkpointing"]): r for r in rows}
    for mine, theirs in PAIRS.items():
        for ckpt in ["off"] if "nf4" in mine else checkpointing:
            ours = by.get((mine, ckpt))
            hf_rows = [r for t in theirs if (r := by.get((t, MINILORA_ONLY_MODES.get(ckpt, ckpt))))]
            if not ours or not hf_rows:
                continue
            fastest = max(hf_rows, key=lambda r: r["tokens_per_s"])
            first = hf_rows[0]  # the fp32 configuration (the 4-bit one for QLoRA)
            tps = common.ratio(ours["tokens_per_s"], fastest["tokens_per_s"])
            rss = common.ratio(ours["peak_rss_mb"], fastest["peak_rss_mb"])
            key = f"{mine}:{ckpt}"
            ratios[key] = {"against": fastest["stack"], "tokens_per_s": tps, "peak_rss": rss,
                           "peak_above_baseline": common.ratio(ours["peak_above_baseline_mb"],
                                                               fastest["peak_above_baseline_mb"]),
                           "against_first": first["stack"],
                           "tokens_per_s_vs_first": common.ratio(ours["tokens_per_s"], first["tokens_per_s"]),
                           "peak_rss_vs_first": common.ratio(ours["peak_rss_mb"], first["peak_rss_mb"])}
            if "nf4" not in mine:
                # If everything but the shared floor took no time at all, minilora would be this much
                # faster than the fastest transformers row: the floor in minilora's own dtype.
                f = floors["bf16" if mine in BF16_STACKS else "fp32"]
                ratios[key]["tokens_per_s_ceiling"] = common.ratio(fastest["step_s"], f["floor_s"])
            verdicts[key] = {"tokens_per_s": tps >= tokens_goal(mine),
                             "peak_rss": rss <= GOALS["peak_rss_ratio"]}

    check_values = {s: r["first_loss"] for s, r in check.items()}
    return {
        "benchmark": "train_lm",
        **common.environment(),
        "model_dir": str(model_dir),
        "settings": {"lora": LORA, "lr": LR, "seed": SEED, "batch_size": batch_size, "seq_len": seq_len,
                     "tokens_per_step": tokens_per_step, "steps": steps, "repeats": repeats,
                     "dtypes": {s: "bf16" if s in BF16_STACKS else "fp32" for s in [*stacks, *qlora_stacks]},
                     "qlora": qlora, "data": str(ALPACA), **data},
        "run_order": [f"{s}-{c}" for s, c in order],
        "loss_check": {"tolerance": LOSS_TOLERANCE, "groups": {k: {"stacks": v[0], "tolerance": v[1]}
                                                               for k, v in LOSS_GROUPS.items()},
                       "check_runs": check_values,
                       "timed_runs": first_losses,
                       "ok": timed_ok and (not check or check_groups(check_values)[0])},
        "qlora_unavailable": qlora_unavailable,
        "floor": floor, "floors": floors, "goals": GOALS, "results": rows, "ratios_minilora_over_hf": ratios, "goals_met": verdicts,
        "check_children": check,
        "runs": {f"{s}-{c}": rs for (s, c), rs in runs.items()},
    }


def _failure_reason(message: str) -> str:
    """The last line of a child's stderr that names an error (what a reader needs)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["unknown error"])[-1][:500]


STACK_LABELS = {"minilora": "minilora fp32", "hf": "transformers + peft fp32", "minilora-bf16": "minilora bf16",
                "hf-bf16": "transformers + peft, bf16 weights", "hf-autocast": "transformers + peft, bf16 autocast",
                "minilora-nf4": "minilora, NF4 base, fp32", "hf-bnb4": "transformers + peft + bitsandbytes 4-bit, fp32",
                "minilora-nf4-bf16": "minilora, NF4 base, bf16",
                "hf-bnb4-bf16": "transformers + peft + bitsandbytes 4-bit, bf16"}
TABLE_COLUMNS = [("stack", "stack", "s"), ("checkpointing", "checkpointing", "s"), ("step_s", "s/step", ".2f"),
                 ("tokens_per_s", "tokens/s", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
                 ("peak_above_baseline_mb", "above baseline MB", ".0f"), ("baseline_rss_mb", "baseline MB", ".0f")]


def ratio_lines(record: dict) -> list[str]:
    lines = []
    for key, r in record["ratios_minilora_over_hf"].items():
        mine, ckpt = key.split(":")
        v = record["goals_met"][key]
        mode = {"on2": "checkpointing on2 (minilora every 2nd layer, transformers every layer)"}.get(
            ckpt, f"checkpointing {ckpt}")
        vs_first = "" if r["against"] == r["against_first"] else (
            f"; against {STACK_LABELS[r['against_first']]}: tokens/s {r['tokens_per_s_vs_first']:.2f}x, "
            f"peak RSS {r['peak_rss_vs_first']:.2f}x")
        lines.append(f"{STACK_LABELS[mine]}, {mode}: against the fastest transformers row "
                     f"({STACK_LABELS[r['against']]}) tokens/s {r['tokens_per_s']:.2f}x (goal >= {tokens_goal(mine)}x: "
                     f"{'meets' if v['tokens_per_s'] else 'MISSES'}), peak RSS {r['peak_rss']:.2f}x "
                     f"(goal <= {GOALS['peak_rss_ratio']}x: {'meets' if v['peak_rss'] else 'MISSES'}), "
                     f"above baseline {r['peak_above_baseline']:.2f}x{vs_first}")
    for dtype, floor in record.get("floors", {"fp32": record.get("floor")}).items():
        if not floor:
            continue
        ceilings = [f"{r['tokens_per_s_ceiling']:.2f}x ({k})" for k, r in record["ratios_minilora_over_hf"].items()
                    if "tokens_per_s_ceiling" in r and (k.split(":")[0] in BF16_STACKS) == (dtype == "bf16")]
        lines.append(f"shared floor {dtype} (frozen matmuls {floor['matmul_s']:.2f} s at {floor['matmul_gflops_per_s']:.0f} "
                     f"GFLOP/s + attention {floor['attention_s']:.2f} s = {floor['floor_s']:.2f} s a step, no adapter): "
                     f"even at zero cost for everything else, minilora / the fastest transformers row could reach at "
                     f"most " + ", ".join(ceilings))
    for stack, reason in record.get("qlora_unavailable", {}).items():
        lines.append(f"{STACK_LABELS[stack]}: not timed, its CPU training step failed: {reason}")
    return lines


def markdown(record: dict) -> str:
    """The runner's table."""
    s = record["settings"]
    rows = [{**r, "stack": STACK_LABELS[r["stack"]]} for r in record["results"]]
    losses = record["loss_check"]
    notes = (f"SmolLM2-135M-Instruct, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout={LORA['dropout']} on all "
             f"seven projections, AdamW, batch {s['batch_size']} x {s['seq_len']} tokens, fp32 or bf16 as each row says "
             f"(bf16: frozen weights bf16, adapters fp32); "
             f"median of {s['steps']} timed step(s) after 1 warm-up, {s['repeats']} fresh process(es) per row, "
             f"interleaved. First-step losses agree (fp32 stacks to 1e-4, bf16 against fp32 to 2e-2): "
             f"{'OK' if losses['ok'] else 'MISMATCH'}.")
    return "\n\n".join([common.markdown_table(rows, TABLE_COLUMNS[:-1]), notes, "\n".join(ratio_lines(record))])


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        if args.child[1].startswith("minilora"):
            restart_with_lean_malloc()  # as the `minilora` command starts
        common.print_result(child(*args.child))
        return None

    record = run(args.steps, args.seq_len, args.batch_size, args.repeats, args.stacks, args.checkpointing,
                 args.qlora, args.model_dir, args.skip_check)
    print()
    common.print_table(record["results"], TABLE_COLUMNS)
    print(f"medians over {args.repeats} fresh process(es) x {args.steps} step(s); tokens/s = "
          f"{record['settings']['tokens_per_step']} / median s per step; peak RSS = VmHWM of the child")
    for line in ratio_lines(record):
        print(line)
    if not args.no_save:
        # A smoke test (other shapes) never overwrites a full run's file.
        name = "train_lm" if (args.batch_size, args.seq_len) == (4, 256) else f"train_lm-{args.batch_size}x{args.seq_len}"
        path = common.write_results(name, record)
        print(f"wrote {path.relative_to(common.ROOT)}")
    return record


if __name__ == "__main__":
    main()
