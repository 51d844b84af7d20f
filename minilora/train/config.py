"""The trainer's TOML config: seven sections, every key checked before any work starts.

A run is described by one TOML file (read with the standard library's tomllib; no
YAML dependency), for example:

    [model]
    path = "models/MiniLM"               # relative paths: see below
    task = "sequence-classification"

    [data]
    train_file = "../data/sst2/train.tsv"

    [train]
    lr = 5e-4

Everything else has a default that works for the common case (LoRA r=8 on the model
type's default modules, a bf16 step where the hardware multiplies bf16 (CUDA, AMX / AVX-512
BF16 CPUs) and fp32 elsewhere (train/precision.py), 5% of the training file
held out for validation). `model.method` picks what trains: "lora" (the default,
set up by [lora]) or "prompt_tuning" (a learned soft prompt, set up by
[prompt_tuning]); the section of the other method must then be absent. Command-line overrides use the same TOML syntax:
`--set train.lr=1e-3 --set lora.target_modules=["query","value"]`; a value that is not
valid TOML (`--set data.train_file=foo.tsv`) is taken as a bare string.

Paths. Relative paths written in a config file are resolved against the folder of
that file, not the current directory, so a config keeps working wherever it is run
from; paths given with --set (and the default output.dir) are resolved against the
current directory. All end up absolute, so `Config.to_dict()` / `to_toml()`, written
into the run folder, reload from anywhere.

Errors. A typo should cost seconds, not a crashed run an hour in. Unknown sections and
keys, wrong types, values outside the allowed set and missing required keys all raise
`ConfigError` (a ValueError) with a one-line message naming `section.key` and the fix;
the CLI prints it and exits with code 2. Whether the files exist is a separate step,
`Config.validate_paths()`, so configs can be built and tested without any data.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..io.paths import PACKAGE_SCHEME, resolve_model_path
from ..io.text_files import utf8_errors_named

DTYPES = ("auto", "float32", "bfloat16", "float16")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being a finite number; nothing after it is saved."""


class ConfigError(ValueError):
    """A one-line message naming the offending key or path and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


@dataclass
class ModelSection:
    path: str                                 # HF model folder (config.json, safetensors, tokenizer)
    task: str = "causal-lm"
    dtype: str = "auto"                       # the frozen weights' dtype; auto: train.precision's
    num_labels: int | None = None             # unset: from the data's labels
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1                 # with checkpointing: 1 in N layers (2: half the recompute, more memory)
    method: str = "lora"                      # or "prompt_tuning": the section of that name configures it


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str | None = None   # list, regex or "all-linear"; unset: model default
    rslora: bool = False
    modules_to_save: list[str] | None = None


@dataclass
class PromptTuningSection:
    num_virtual_tokens: int = 20
    init: str = "random"                      # "random" N(0, 1), "vocab" (random tokens' embeddings), "text"
    init_text: str | None = None              # the phrase for init = "text"
    modules_to_save: list[str] | None = None  # a classifier head always trains


@dataclass
class QuantSection:
    method: str = "none"                      # "nf4" = QLoRA: frozen base weights in 4 bits
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"


@dataclass
class DataSection:
    train_file: str
    validation_file: str | None = None
    format: str = "auto"
    kind: str | None = None                   # unset: from model.task
    text_column: str | int = "sentence"       # an int is a column index (files without header)
    label_column: str | int = "label"
    max_length: int = 256
    validation_fraction: float = 0.05
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    block_size: int = 256
    group_by_length: bool = True
    assistant_turns: str = "all"              # chat data: loss on every assistant turn, or "last" only


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int | None = None              # optimizer steps; overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0                # 0 disables clipping
    seed: int = 0
    eval_every: int | None = None             # steps; evaluation also runs at every epoch's end
    save_every: int | None = None
    early_stopping_patience: int | None = None  # in evaluations without improvement
    early_stopping_min_delta: float = 0.0
    metric_for_best: str = "auto"             # auto: accuracy for classification, loss for LM
    log_every: int = 10
    resume_from: str | None = None
    device: str = "auto"
    precision: str = "auto"                   # auto: bf16 on CUDA and bf16-capable CPUs, else fp32
    hold_cpu_memory: bool = True              # CPU, glibc: reuse freed memory across steps (fast/cpu_memory.py)
    fast: bool = True                         # minilora.fast: the same computation on faster paths; false: plain
    distributed: str = "ddp"                  # under torchrun: "ddp" (whole model per process) or "fsdp" (base sharded)


@dataclass
class OutputSection:
    dir: str = "runs/minilora"
    save_total_limit: int | None = None


SECTIONS = {"model": ModelSection, "lora": LoraSection, "quant": QuantSection, "data": DataSection,
            "train": TrainSection, "output": OutputSection, "prompt_tuning": PromptTuningSection}
METHODS = ("lora", "prompt_tuning")  # model.method; each names the section that configures it

ENUMS = {
    ("model", "task"): ("causal-lm", "sequence-classification", "embedding"),
    ("model", "dtype"): DTYPES,
    ("model", "method"): METHODS,
    ("prompt_tuning", "init"): ("random", "vocab", "text"),
    ("quant", "method"): ("none", "nf4"),
    ("quant", "compute_dtype"): DTYPES,
    ("data", "format"): ("auto", "tsv", "csv", "jsonl", "json", "text"),
    ("data", "kind"): ("classification", "instructions", "text"),
    ("data", "assistant_turns"): ("all", "last"),
    ("train", "schedule"): ("linear", "cosine", "constant"),
    ("train", "metric_for_best"): ("auto", "loss", "accuracy"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "precision"): ("auto", "fp32", "bf16"),
    ("train", "distributed"): ("ddp", "fsdp"),
}

_POSITIVE = (lambda v: v >= 1, "an integer >= 1")
_NONNEG = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
RANGES = {
    ("model", "num_labels"): _POSITIVE, ("model", "checkpoint_every"): _POSITIVE, ("lora", "r"): _POSITIVE,
    ("prompt_tuning", "num_virtual_tokens"): (lambda v: v >= 1, "an integer >= 1 (typical: 8 to 100)"),
    ("lora", "alpha"): (lambda v: v > 0, "> 0 (typical: r or 2*r)"), ("lora", "dropout"): _FRACTION,
    ("quant", "blocksize"): (lambda v: v >= 2 and v % 2 == 0,
                             "a positive even integer, two 4-bit codes per byte (typical: 64)"),
    ("data", "max_length"): _POSITIVE, ("data", "validation_fraction"): _FRACTION,
    ("data", "max_train_examples"): _POSITIVE, ("data", "max_eval_examples"): _POSITIVE,
    ("data", "block_size"): (lambda v: v >= 2, "an integer >= 2"),
    ("train", "epochs"): _POSITIVE, ("train", "max_steps"): _POSITIVE, ("train", "batch_size"): _POSITIVE,
    ("train", "grad_accum"): _POSITIVE, ("train", "lr"): (lambda v: v > 0, "> 0 (typical: 1e-4 to 1e-3)"),
    ("train", "weight_decay"): _NONNEG, ("train", "warmup_steps"): _NONNEG,
    ("train", "warmup_ratio"): _FRACTION, ("train", "min_lr_ratio"): (lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train", "max_grad_norm"): _NONNEG, ("train", "eval_every"): _POSITIVE,
    ("train", "save_every"): _POSITIVE, ("train", "early_stopping_patience"): _POSITIVE,
    ("train", "early_stopping_min_delta"): _NONNEG, ("train", "log_every"): _POSITIVE,
    ("output", "save_total_limit"): _POSITIVE,
}
REQUIRED = {("model", "path"): 'path = "path/to/hf-model-folder"',
            ("data", "train_file"): 'train_file = "path/to/train.tsv"'}
PATHS = {("model", "path"), ("data", "train_file"), ("data", "validation_file"),
         ("train", "resume_from"), ("output", "dir")}
DEFAULT_KIND = {"causal-lm": "instructions", "sequence-classification": "classification",
                "embedding": "classification"}


@dataclass
class Config:
    model: ModelSection
    data: DataSection
    lora: LoraSection = field(default_factory=LoraSection)
    prompt_tuning: PromptTuningSection = field(default_factory=PromptTuningSection)
    quant: QuantSection = field(default_factory=QuantSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        """{section: {key: value}} with unset (None) keys left out: TOML has no null.
        The section of the method not in use is left out too (it would be an error on reload)."""
        return {name: {k: v for k, v in dataclasses.asdict(getattr(self, name)).items() if v is not None}
                for name in SECTIONS if name not in _unused_sections(self.model.method)}

    def to_toml(self) -> str:
        """The resolved config as TOML text, loadable by load_config."""
        lines = []
        for name, values in self.to_dict().items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)

    def validate_paths(self) -> None:
        """Check that the model folder and data files exist (ConfigError naming the key)."""
        hint = "(relative paths in a config file are resolved against the config file's folder)"
        if self.model.path.startswith(PACKAGE_SCHEME):
            try:
                resolve_model_path(self.model.path)
            except FileNotFoundError as e:
                raise ConfigError(f"model.path: {e}") from None
        checks = [("model.path", None if self.model.path.startswith(PACKAGE_SCHEME) else self.model.path, Path.exists),
                  ("data.train_file", self.data.train_file, Path.is_file),
                  ("data.validation_file", self.data.validation_file, Path.is_file),
                  ("train.resume_from", self.train.resume_from, Path.exists)]
        for key, value, ok in checks:
            if value is not None and not ok(Path(value)):
                raise ConfigError(f"{key}: not found: {value} {hint}")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" (or unset)" if type(None) in args else "")
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}s"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def _coerce(value, tp):
    """value converted to type tp, or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(x, typing.get_args(tp)[0]) for x in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise TypeError


def _unknown(kind: str, name: str, valid) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown {kind} {name!r}; {hint}valid: {', '.join(valid)}")


def _build_section(name: str, values) -> object:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {values!r}; write it as a [{name}] section")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown(f"key in [{name}]", key, valid)
        try:
            value = _coerce(value, hints[key])
        except TypeError:
            raise ConfigError(f"{name}.{key}: expected {_type_name(hints[key])}, "
                              f"got {value!r} ({type(value).__name__})") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}.{key}: {value!r} is not a finite number; give a finite value")
        allowed = ENUMS.get((name, key))
        if allowed and value is not None and value not in allowed and not (
                (name, key) == ("train", "device") and re.fullmatch(r"cuda:\d+", value)):
            raise ConfigError(f"{name}.{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        check = RANGES.get((name, key))
        if check and value is not None and not check[0](value):
            raise ConfigError(f"{name}.{key} must be {check[1]}, got {value!r}")
        kwargs[key] = value
    for (section, key), example in REQUIRED.items():
        if section == name and key not in kwargs:
            raise ConfigError(f"{name}.{key} is required: add `{example}` under [{name}]")
    return cls(**kwargs)


def config_from_dict(d: dict, base_dir=None) -> Config:
    """Validate a {section: {key: value}} dict into a Config.

    With base_dir, relative paths are resolved against it (load_config passes the
    config file's folder); without, they are kept as given.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a table of sections, got {type(d).__name__}")
    for name in d:
        if name not in SECTIONS:
            raise _unknown("section", name, list(SECTIONS))
    for name in ("model", "data"):
        if name not in d:
            key = "path" if name == "model" else "train_file"
            raise ConfigError(f"{name}.{key} is required: add a [{name}] section with `{REQUIRED[(name, key)]}`")
    sections = {name: _build_section(name, d.get(name, {})) for name in SECTIONS}
    if base_dir is not None:
        for name, key in PATHS:
            value = getattr(sections[name], key)
            if value is not None:
                setattr(sections[name], key, _resolve(value, base_dir))
    cfg = Config(**sections)
    for name in _unused_sections(cfg.model.method):
        if name in d:
            raise ConfigError(f"[{name}] is set but model.method = {cfg.model.method!r}; set model.method = "
                              f"{name!r} to use it, or remove the [{name}] section")
    _cross_checks(cfg)
    return cfg


def _unused_sections(method: str) -> list[str]:
    return [m for m in METHODS if m != method]


def _resolve(value: str, base_dir) -> str:
    if value.startswith(PACKAGE_SCHEME):  # an installed model package, not a file path
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (Path(base_dir) / p).resolve())


def _cross_checks(cfg: Config) -> None:
    task, data, train = cfg.model.task, cfg.data, cfg.train
    if data.kind is None:
        data.kind = DEFAULT_KIND[task]
    lm = task == "causal-lm"
    if lm != (data.kind in ("instructions", "text")):
        need = "'instructions' or 'text'" if lm else "'classification'"
        raise ConfigError(f"data.kind = {data.kind!r} does not fit model.task = {task!r}; "
                          f"set data.kind to {need} or change model.task")
    if lm and train.metric_for_best == "accuracy":
        raise ConfigError("train.metric_for_best = 'accuracy' needs a classification task; "
                          "use 'loss' (or 'auto') for model.task = 'causal-lm'")
    if cfg.model.checkpoint_every != 1 and not cfg.model.gradient_checkpointing:
        raise ConfigError(f"model.checkpoint_every = {cfg.model.checkpoint_every} only applies with gradient "
                          "checkpointing; set model.gradient_checkpointing = true or remove checkpoint_every")
    if train.warmup_steps and train.warmup_ratio:
        raise ConfigError("train.warmup_steps and train.warmup_ratio are both set; keep one")
    if train.precision == "fp32" and cfg.model.dtype in ("bfloat16", "float16"):
        raise ConfigError(f'model.dtype = "{cfg.model.dtype}" holds the base in 16 bits, but train.precision = "fp32"; '
                          'set model.dtype = "auto" (the base follows train.precision) or train.precision = "auto"')
    if train.precision == "bf16" and cfg.model.dtype == "float16":
        raise ConfigError('model.dtype = "float16" but train.precision = "bf16"; set model.dtype = "auto" or '
                          '"bfloat16"')
    pt = cfg.prompt_tuning
    if pt.init == "text" and not pt.init_text:
        raise ConfigError('prompt_tuning.init = "text" needs prompt_tuning.init_text, a phrase describing the task '
                          '(e.g. init_text = "Is this movie review positive or negative?")')
    if pt.init != "text" and pt.init_text is not None:
        raise ConfigError(f'prompt_tuning.init_text is only used with init = "text" (init is {pt.init!r}); '
                          'set prompt_tuning.init = "text" or remove init_text')


def parse_override(item: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, value); value parsed as TOML, else a bare string."""
    target, sep, raw = item.partition("=")
    parts = target.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-3")
    section, key = parts
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # `--set data.train_file=foo.tsv`: not TOML, so a plain string
    if section in SECTIONS:
        hints = typing.get_type_hints(SECTIONS[section])
        tp = hints.get(key)
        if tp is not None:
            if isinstance(raw, str) and raw.lower() in ("none", "null") and _accepts(tp, None) \
                    and not _accepts(tp, "x"):
                return section, key, None  # `--set train.max_steps=none` unsets an option
            if not _accepts(tp, value) and _accepts(tp, raw):
                value = raw  # `--set output.dir=2024` is the folder "2024", not an integer
    return section, key, value


def _accepts(tp, value) -> bool:
    try:
        _coerce(value, tp)
        return True
    except TypeError:
        return False


def load_config(path, overrides=()) -> Config:
    """Read a TOML config, apply `--set section.key=value` overrides, validate.

    Relative paths in the file are resolved against the file's folder; relative paths
    in overrides against the current directory (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with utf8_errors_named(path, ConfigError):
            d = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    base = path.resolve().parent
    for name, values in d.items():
        if name in SECTIONS and isinstance(values, dict):
            for key, value in values.items():
                if (name, key) in PATHS and isinstance(value, str):
                    values[key] = _resolve(value, base)
    for item in overrides:
        section, key, value = parse_override(item)
        if (section, key) in PATHS and isinstance(value, str):
            value = _resolve(value, Path.cwd())
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {d[section]!r}")
        d[section][key] = value
    cfg = config_from_dict(d)
    # The default output.dir ("runs/minilora") was written nowhere: it means the
    # current directory's runs/, and is made absolute like every other path.
    cfg.output.dir = _resolve(cfg.output.dir, Path.cwd())
    return cfg
