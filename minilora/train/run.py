"""From a TOML config to a trained adapter: what `minilora train` and `minilora eval` do.

    config -> tokenizer -> datasets -> model (optionally 4-bit) -> LoRA or soft prompt -> train()
           -> <output.dir>/adapter   (the best adapter, peft's format)
              <output.dir>/config.toml, metrics.jsonl, run.json, loss.png

Everything here is plumbing; the loop itself is minilora/train.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..fast import nf4_codec
from ..io.atomic import atomic_write_text
from ..io.loading import load_model
from ..io.paths import resolve_model_path
from ..io.tokenizer import load_tokenizer
from ..lora.adapters import load_adapter, save_adapter
from ..lora.config import LoraConfig
from ..lora.inject import inject
from ..lora.prompt_tuning import (
    PromptTuningConfig,
    add_prompt_tuning,
    is_prompt_tuning_adapter,
    load_prompt_tuning,
    save_prompt_tuning,
)
from ..lora.prompt_tuning import parameter_table as prompt_parameter_table
from ..lora.summary import parameter_table
from ..models import grad_checkpoint
from . import precision
from .batching import build_datasets
from .config import Config, ConfigError
from .loop import CLASSIFICATION, evaluate, resolve_device, train
from .run_folder import RunLock, check_resume, claim, resumes_folder

_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "embedding": "FEATURE_EXTRACTION"}


def load_dtype(cfg: Config) -> str | torch.dtype:
    """model.dtype, or with "auto" the dtype train.precision computes in (precision.py): a
    bf16 step holds its frozen base in bf16, loaded so, never in fp32 first."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return precision.choose(cfg.train.precision, resolve_device(cfg.train.device)).dtype


def _load(cfg: Config, num_labels: int | None, training: bool = False):
    kwargs = {}
    if training and cfg.train.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .loop import _dist

        _dist()  # the process group first: each process reads only its shards (sharding.py)
        # Whole modules that train (modules_to_save, a new head, a soft prompt's embedding)
        # are copied from the base when the adapter is added, so those bases load whole
        # and train() shards them after.
        if cfg.model.method == "lora" and cfg.model.task == "causal-lm" and not cfg.lora.modules_to_save:
            from .sharding import shard_on_meta

            kwargs["sharded_by"] = shard_on_meta
    dtype = load_dtype(cfg)
    if cfg.quant.method == "nf4":
        compute = cfg.quant.compute_dtype if cfg.quant.compute_dtype != "auto" else dtype
        kwargs = dict(quantize="nf4", double_quant=cfg.quant.double_quant, blocksize=cfg.quant.blocksize,
                      compute_dtype=compute)
        if cfg.train.fast:  # quantize as the checkpoint is read with the fast codec too (same bytes)
            nf4_codec.install()
    model = load_model(cfg.model.path, task=cfg.model.task, dtype=dtype,
                       num_labels=num_labels if cfg.model.task == CLASSIFICATION else None, **kwargs)
    if cfg.model.gradient_checkpointing and not grad_checkpoint.enable(model, cfg.model.checkpoint_every):
        raise ConfigError(f"model.gradient_checkpointing = true, but {type(model).__name__} has no checkpointed "
                          "layers (the Llama family and GPT-2 do); set it to false")
    return model


def prepare(cfg: Config, log=print, training: bool = False):
    """Tokenizer, datasets and the (not yet adapted) model for a config."""
    cfg.validate_paths()
    tokenizer = load_tokenizer(cfg.model.path)
    data = build_datasets(cfg, tokenizer)
    for note in data.notes:
        log(f"note: {note}")
    num_labels = cfg.model.num_labels or (len(data.label_names) if data.label_names else None)
    torch.manual_seed(cfg.train.seed)  # a new classification head is initialised while loading
    model = _load(cfg, num_labels, training)
    _check_positions(cfg, model, data)
    return tokenizer, data, model, num_labels


def _check_positions(cfg: Config, model, data) -> None:
    """Examples longer than a learned position table (BERT, DistilBERT, GPT-2) would index
    past it in the first forward; say which setting to lower instead."""
    config = getattr(model, "config", None)
    table = getattr(config, "n_positions", None) or (
        getattr(config, "max_position_embeddings", None) if getattr(config, "model_type", None) in (
            "bert", "distilbert") else None)
    if not table:
        return
    sets = [data.train] + ([data.val] if data.val else [])
    longest = max((len(e["input_ids"]) for s in sets for e in s.examples), default=0)
    if longest > table:
        key = "data.block_size" if cfg.data.kind == "text" else "data.max_length"
        raise ConfigError(f"{key}: examples of {longest} tokens, but {type(model).__name__} has {table} learned "
                          f"positions; set {key} to at most {table}")


def lora_config(cfg: Config) -> LoraConfig:
    section = cfg.lora
    return LoraConfig(r=section.r, alpha=section.alpha, dropout=section.dropout,
                      target_modules=section.target_modules, rslora=section.rslora,
                      modules_to_save=section.modules_to_save, task_type=_TASK_TYPES.get(cfg.model.task))


def prompt_tuning_config(cfg: Config) -> PromptTuningConfig:
    section = cfg.prompt_tuning
    return PromptTuningConfig(num_virtual_tokens=section.num_virtual_tokens, init=section.init,
                              init_text=section.init_text, modules_to_save=section.modules_to_save,
                              task_type=_TASK_TYPES.get(cfg.model.task))


def _add_prompt(cfg: Config, model, tokenizer):
    n = cfg.prompt_tuning.num_virtual_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if cfg.model.task != "causal-lm" and limit is not None and cfg.data.max_length + n > limit:
        raise ValueError(f"data.max_length ({cfg.data.max_length}) + prompt_tuning.num_virtual_tokens ({n}) exceeds "
                         f"the model's {limit} positions; lower one of them")
    return add_prompt_tuning(model, prompt_tuning_config(cfg), tokenizer)


def check_run_settings(cfg: Config) -> None:
    """What the config cannot check alone: this machine's devices, what is at output.dir."""
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {cfg.train.device!r}, but torch sees no CUDA device here; "
                          "set train.device = \"auto\" or \"cpu\"")
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {out} is a file, not a folder; choose a folder for the run's outputs")


def run_training(cfg: Config, progress: bool = True, log=print, overwrite: bool = False) -> dict:
    """Train as the config says, into output.dir, which this run holds (run_folder.py):
    locked while it runs, refused if it holds another run unless resuming it or `overwrite`."""
    check_run_settings(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 holds the folder, writes and reports
        return _run_training(cfg, progress, lambda line: None, writes=False)
    out = Path(cfg.output.dir)
    with RunLock(out, log):
        if cfg.train.resume_from is not None:
            check_resume(cfg)
        claim(out, resumes_folder(cfg.train.resume_from, out), overwrite, log)
        return _run_training(cfg, progress, log)


def _run_training(cfg: Config, progress: bool, log, writes: bool = True) -> dict:
    out = Path(cfg.output.dir)
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", cfg.to_toml())
    tokenizer, data, model, num_labels = prepare(cfg, log, training=True)
    torch.manual_seed(cfg.train.seed)  # the adapter's initial A (or the prompt) depends on it
    prompt = cfg.model.method == "prompt_tuning"
    if prompt:
        model = _add_prompt(cfg, model, tokenizer)
        log(prompt_parameter_table(model))
    else:
        inject(model, lora_config(cfg))
        log(parameter_table(model))
    log(f"train: {len(data.train.examples):,} examples, validation: {len(data.val.examples) if data.val else 0:,}")

    start = time.perf_counter()
    result = train(model, data.train.examples, data.val.examples if data.val else None, cfg.train,
                   task=cfg.model.task, out_dir=out, pad_token_id=tokenizer.pad_token_id,
                   num_labels=num_labels, progress=progress, keep_last=cfg.output.save_total_limit,
                   group_by_length=cfg.data.group_by_length)
    seconds = time.perf_counter() - start
    summary = {"train_seconds": seconds, "steps": result["state"].step, "eval": result["eval"],
               "best": result["best"], "best_step": result["state"].best_step, "label_names": data.label_names}
    if not writes:
        return {**summary, "model": model, "tokenizer": tokenizer}
    if prompt:
        # A real folder, not pkg:NAME: peft re-reads the tokenizer of a "text" prompt it is to train further.
        save_prompt_tuning(model, out / "adapter", base_model_name_or_path=str(cfg.model.path),
                           tokenizer_name_or_path=str(resolve_model_path(cfg.model.path)))
    else:
        save_adapter(model, out / "adapter", base_model_name_or_path=str(cfg.model.path))
    atomic_write_text(out / "run.json", json.dumps(summary, indent=1) + "\n")
    log(f"done in {seconds:.0f} s; adapter: {out / 'adapter'}; final eval: {result['eval']}")
    return {**summary, "model": model, "tokenizer": tokenizer}


def run_eval(cfg: Config, adapter: str | None = None, log=print) -> dict:
    tokenizer, data, model, num_labels = prepare(cfg, log)
    if data.val is None or not data.val.examples:
        raise ValueError("nothing to evaluate: set data.validation_file or data.validation_fraction > 0")
    if adapter and is_prompt_tuning_adapter(adapter):
        model = load_prompt_tuning(model, adapter)
    elif adapter:
        load_adapter(model, adapter)
    device = resolve_device(cfg.train.device)
    chosen = precision.choose(cfg.train.precision, device, precision.frozen_dtype(model))
    log(chosen.describe())
    return evaluate(precision.trained_in_fp32(model).to(device), data.val.examples, cfg.model.task,
                    batch_size=cfg.train.batch_size, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
                    device=device, autocast=lambda: precision.autocast(chosen, device))
