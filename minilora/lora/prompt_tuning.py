"""Prompt tuning: a few learned input vectors in front of every sequence, nothing else trains.

Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning") keeps the whole model frozen and learns only a "soft prompt":
n virtual tokens, each a free vector in the model's embedding space. For a sequence
of token ids x_1..x_T with word embeddings e(x_t), the model reads

    [P_1, ..., P_n, e(x_1), ..., e(x_T)]          P ∈ R^{n × d}  (d = hidden size)

and only P gets gradients (section 2: "the prompt parameters θ_P are updated by
gradient descent, the model parameters θ are frozen"). That is n·d trainable
numbers, 7,680 for 20 tokens of all-MiniLM-L6-v2, against 22.7 M in the model. The
virtual tokens sit where real tokens would, so they get positions 0..n-1 and the
real tokens n..n+T-1, and they are never padding: the attention mask gains n ones.

Initialisation (section 3.2): `random` draws P ~ N(0, 1) (nn.Embedding's default,
as peft does); `vocab` copies the embeddings of n random vocabulary tokens; `text`
copies the embeddings of a phrase describing the task, tokenised with special
tokens and repeated or cut to n tokens. The paper finds the last two better than
random on small models; a small encoder also needs a high learning rate (3e-2 and
up) and, for classification, its new head trained in full (`modules_to_save`).

Where the outputs go, exactly as peft's PeftModelForSequenceClassification /
PeftModelForCausalLM compute them:

- classification: the encoder runs on n + T positions and the pooler reads
  position 0, which is now the first virtual token;
- causal LM: labels gain n leading -100s, so the loss is peft's to the last digit.
  The logits we *return* are those of the T real positions only (peft returns all
  n + T); the dropped n rows predict virtual tokens and carry no loss. Returning T
  rows keeps logits aligned with input_ids, which the training loop and
  `generate` (logits[:, -1]) rely on.
- generation: the prompt enters once, in the prefill; afterwards it lives in the
  KV cache, and every later step only extends the attention mask and positions.

On disk it is peft's prompt-tuning adapter, so peft loads ours and we load peft's:

    adapter_config.json          {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20,
                                  "token_dim": 384, "num_transformer_submodules": 1, ...}
    adapter_model.safetensors    prompt_embeddings                 (n x d)
                                 base_model.<module path>.<param>  (modules_to_save)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..io.safetensors_files import open_safetensors
from .adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    fill_adapter,
    read_raw_config,
    write_adapter_files,
)
from .targets import match_modules_to_save

PROMPT_KEY = "prompt_embeddings"
PREFIX = "base_model."  # peft's key prefix for the modules_to_save of a prompt-learning adapter

INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # ours -> peft's prompt_tuning_init
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
SEQ_CLS_HEAD_NAMES = ("classifier", "score")  # peft trains and saves these for SEQ_CLS


@dataclass
class PromptTuningConfig:
    """How many virtual tokens, how to start them, and which heads train in full."""

    num_virtual_tokens: int = 20
    init: str = "random"                      # "random" | "vocab" | "text"
    init_text: str | None = None              # the phrase for init="text"
    modules_to_save: list[str] | None = None  # e.g. ["classifier"]; SEQ_CLS adds its head anyway
    task_type: str | None = None              # CAUSAL_LM | SEQ_CLS | FEATURE_EXTRACTION; None: from the model

    def __post_init__(self):
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"PromptTuningConfig.num_virtual_tokens must be a positive integer (typical: 8 to 100), "
                             f"got {n!r}")
        if self.init not in INITS:
            raise ValueError(f"PromptTuningConfig.init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError('PromptTuningConfig.init = "text" needs init_text, a phrase describing the task '
                             '(e.g. "Is this movie review positive or negative?")')
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f'PromptTuningConfig.init_text is only used with init = "text" (init is {self.init!r}); '
                             'set init = "text" or remove init_text')
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.task_type not in (None, *TASK_TYPES):
            raise ValueError(f"PromptTuningConfig.task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")


def _infer_task_type(model: nn.Module) -> str:
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out) and get_out() is not None:
        return "CAUSAL_LM"
    if any(isinstance(getattr(model, h, None), nn.Module) for h in SEQ_CLS_HEAD_NAMES):
        return "SEQ_CLS"
    return "FEATURE_EXTRACTION"


def _modules_to_save(model: nn.Module, entries: list[str], task_type: str) -> list[str]:
    """Full names of the modules that train in full, by peft's rule (targets.match_modules_to_save);
    a classifier's head names are added for SEQ_CLS."""
    return match_modules_to_save(model, entries, list(SEQ_CLS_HEAD_NAMES) if task_type == "SEQ_CLS" else [])


def _init_prompt(config: PromptTuningConfig, word_embeddings: nn.Embedding, tokenizer) -> torch.Tensor:
    n, d = config.num_virtual_tokens, word_embeddings.embedding_dim
    # Drawn first whatever the init, as peft's nn.Embedding is: the same seed gives peft's prompt.
    weight = torch.empty(n, d).normal_()
    if config.init == "random":
        return weight
    if config.init == "vocab":
        ids = torch.randint(0, word_embeddings.num_embeddings, (n,))
    else:
        if tokenizer is None:
            raise ValueError('init = "text" needs the tokenizer: add_prompt_tuning(model, config, '
                             "tokenizer=minilora.load_tokenizer(MODEL_DIR))")
        ids = tokenizer.encode(config.init_text)  # with special tokens, as peft tokenises it
        if not ids:
            raise ValueError(f"init_text {config.init_text!r} tokenises to nothing; give a phrase with words in it")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        ids = torch.tensor(ids)
    with torch.no_grad():
        return word_embeddings(ids.to(word_embeddings.weight.device)).detach().float().cpu()


class PromptTuningModel(nn.Module):
    """A frozen model that reads `prompt_embeddings` (n x d) before every input.

    State-dict keys are peft's saved keys: `prompt_embeddings`, and `base_model.<name>`
    for the wrapped model, so a trained head is `base_model.classifier.weight` in both.
    """

    def __init__(self, model: nn.Module, config: PromptTuningConfig, prompt: torch.Tensor, saved: list[str]):
        super().__init__()
        self.base_model = model
        self.prompt_config = config
        self.config = getattr(model, "config", None)  # the base's config, for code that reads model.config
        self.modules_to_save = saved
        device = model.get_input_embeddings().weight.device
        # fp32 whatever the base dtype (peft does the same); cast to the input dtype in forward.
        self.prompt_embeddings = nn.Parameter(prompt.to(device=device, dtype=torch.float32))

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    @property
    def fused_lm_loss(self) -> bool:
        """Whether the base model takes labels= with return_logits=False (see train.loss_sum)."""
        return bool(getattr(self.base_model, "fused_lm_loss", False))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.base_model.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, labels=None, token_type_ids=None,
                position_ids=None, kv_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        n, batch = self.num_virtual_tokens, inputs_embeds.shape[0]
        device = inputs_embeds.device
        causal = self.prompt_config.task_type == "CAUSAL_LM"
        # With a filled KV cache the prompt is already in it (prefill put it there).
        prepend = kv_cache is None or kv_cache.seq_length == 0
        if prepend:
            prompt = self.prompt_embeddings.to(inputs_embeds.dtype)[None].expand(batch, -1, -1)
            inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)
            if token_type_ids is not None:  # virtual tokens are segment 0
                token_type_ids = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], dim=1)
            if labels is not None and causal:  # a virtual token is never a target
                labels = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
            if position_ids is not None:
                virtual = torch.arange(n, device=position_ids.device).expand(position_ids.shape[0], n)
                position_ids = torch.cat([virtual, position_ids + n], dim=1)
        elif position_ids is not None:
            position_ids = position_ids + n
        if attention_mask is not None:  # virtual tokens are never padding
            attention_mask = attention_mask.to(device)
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)

        extra = {"token_type_ids": token_type_ids, "position_ids": position_ids, "labels": labels,
                 "kv_cache": kv_cache}
        kwargs.update({k: v for k, v in extra.items() if v is not None})
        out = self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        if causal and prepend and out.logits is not None:
            out = dataclasses.replace(out, logits=out.logits[:, n:])
        return out


def add_prompt_tuning(model: nn.Module, config: PromptTuningConfig, tokenizer=None) -> PromptTuningModel:
    """Freeze `model` and return it wrapped with a trainable soft prompt.

    `tokenizer` (minilora.load_tokenizer) is needed for init="text" only. The base
    model is changed in place (frozen; heads in modules_to_save trainable), so use
    the returned model from now on: `model = add_prompt_tuning(model, config)`.
    """
    if isinstance(model, PromptTuningModel):
        raise ValueError("this model already has a soft prompt; use model.base_model to start again")
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(); prompt tuning needs the word "
                         "embedding table to know the hidden size")
    config = dataclasses.replace(config, task_type=config.task_type or _infer_task_type(model))
    saved = _modules_to_save(model, list(config.modules_to_save or []), config.task_type)
    return _wrap(model, config, _init_prompt(config, model.get_input_embeddings(), tokenizer), saved)


def _wrap(model: nn.Module, config: PromptTuningConfig, prompt: torch.Tensor, saved: list[str]) -> PromptTuningModel:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return PromptTuningModel(model, config, prompt, saved)


def prompt_tuning_state_dict(model: PromptTuningModel) -> dict[str, torch.Tensor]:
    """What the adapter consists of, under peft's saved keys."""
    state = {PROMPT_KEY: model.prompt_embeddings}
    for name in model.modules_to_save:
        for key, value in model.base_model.get_submodule(name).state_dict(keep_vars=True).items():
            state[f"{PREFIX}{name}.{key}"] = value
    return state


def _base_config_value(model: nn.Module, *names: str):
    config = getattr(model, "config", None)
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def save_prompt_tuning(model: PromptTuningModel, directory: str | os.PathLike,
                       base_model_name_or_path: str | None = None, tokenizer_name_or_path: str | None = None) -> Path:
    """Write the soft prompt (and trained heads) to `directory` in peft's format."""
    if not isinstance(model, PromptTuningModel):
        raise ValueError("save_prompt_tuning needs the model add_prompt_tuning returned; "
                         "for a LoRA model use minilora.save_adapter")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_prompt_tuning: {directory} exists and is not a folder")
    cfg, base = model.prompt_config, model.base_model
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in prompt_tuning_state_dict(model).items()}
    entries = list(cfg.modules_to_save or [])
    if cfg.task_type == "SEQ_CLS":  # peft writes both head names into every classification adapter
        entries += [h for h in SEQ_CLS_HEAD_NAMES if h not in entries]
    text = cfg.init == "text"
    peft_config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": cfg.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": model.prompt_embeddings.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": _base_config_value(base, "num_attention_heads", "n_heads", "n_head"),
        "num_layers": _base_config_value(base, "num_hidden_layers", "n_layers", "n_layer"),
        "prompt_tuning_init": INITS[cfg.init],
        "prompt_tuning_init_text": cfg.init_text,
        # peft refuses a TEXT config without a tokenizer name (it would re-tokenise to re-initialise).
        "tokenizer_name_or_path": (tokenizer_name_or_path or base_model_name_or_path or "unknown") if text else None,
        "tokenizer_kwargs": None,
        "modules_to_save": entries or None,
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
    }
    return write_adapter_files(directory, tensors, peft_config)


def is_prompt_tuning_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a prompt-tuning adapter (rather than, say, LoRA)."""
    return read_raw_config(Path(directory)).get("peft_type") == "PROMPT_TUNING"


def read_prompt_tuning_config(directory: str | os.PathLike) -> PromptTuningConfig:
    """Parse peft's adapter_config.json of a prompt-tuning adapter, refusing what we cannot honour."""
    directory = Path(directory)
    raw = read_raw_config(directory)
    where = directory / CONFIG_NAME
    if raw.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"{where}: peft_type is {raw.get('peft_type')!r}, not 'PROMPT_TUNING'; "
                         "load a LoRA adapter with minilora.load_adapter")
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"{where}: num_transformer_submodules = {raw['num_transformer_submodules']} "
                         "(an encoder-decoder prompt); minilora supports decoder-only and encoder models")
    if raw.get("task_type") not in (None, *TASK_TYPES):
        raise ValueError(f"{where}: task_type {raw['task_type']!r} is not supported; supported: {TASK_TYPES}")
    init = {v: k for k, v in INITS.items()}.get(raw.get("prompt_tuning_init", "RANDOM"), "random")
    entries = list(dict.fromkeys(raw.get("modules_to_save") or []))  # peft may list the heads twice
    return PromptTuningConfig(num_virtual_tokens=raw["num_virtual_tokens"], init=init,
                              init_text=raw.get("prompt_tuning_init_text") if init == "text" else None,
                              modules_to_save=entries or None, task_type=raw.get("task_type"))


def load_prompt_tuning(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False
                       ) -> PromptTuningModel:
    """Wrap `model` with the soft prompt saved in `directory` (by minilora or peft).

    Every key and shape is checked before the model is touched. As with peft, the
    prompt and heads are frozen unless `is_trainable=True`.
    """
    if isinstance(model, PromptTuningModel):
        raise ValueError("this model already has a soft prompt; load into model.base_model instead")
    directory = Path(directory)
    config = read_prompt_tuning_config(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights not found: {path}")
    with open_safetensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    task_type = config.task_type or _infer_task_type(model)
    saved = _modules_to_save(model, list(config.modules_to_save or []), task_type)
    hidden = model.get_input_embeddings().embedding_dim
    expected = {PROMPT_KEY: (config.num_virtual_tokens, hidden)}
    for name in saved:
        for key, value in model.get_submodule(name).state_dict().items():
            expected[f"{PREFIX}{name}.{key}"] = tuple(value.shape)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}; "
                         "is this adapter for another model?")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)} but this model needs {shape}; "
                             "the adapter was trained on a model of another size")

    # The saved values are the prompt: no init to run, so "text" needs no tokenizer here.
    wrapped = _wrap(model, dataclasses.replace(config, task_type=task_type), tensors[PROMPT_KEY], saved)
    fill_adapter(prompt_tuning_state_dict(wrapped), tensors, is_trainable)
    return wrapped


def parameter_table(model: PromptTuningModel) -> str:
    """Where the trainable parameters are, in the layout of minilora.lora.summary's LoRA table."""
    rows = [(f"prompt_embeddings ({model.num_virtual_tokens} virtual tokens x {model.prompt_embeddings.shape[1]})",
             model.prompt_embeddings.numel())]
    rows += [(f"{name} (trained in full)", sum(p.numel() for p in model.base_model.get_submodule(name).parameters()))
             for name in model.modules_to_save]
    width = max(len(r[0]) for r in rows + [("module", 0)])
    lines = [f"{'module':<{width}}  {'trainable':>11}"] + [f"{k:<{width}}  {n:>11,d}" for k, n in rows]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"trainable params: {trainable:,d} || all params: {total:,d} || "
                 f"trainable%: {100 * trainable / total:.4f}")
    return "\n".join(lines)
