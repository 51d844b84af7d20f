"""`LoraConfig`: what to adapt and how (r, alpha, dropout, targets, per-module patterns).

Field names are ours; `save_adapter` writes them under peft's names (lora_alpha,
lora_dropout, use_rslora, ...), so an adapter moves between the two libraries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Row name meaning "no adapter" in a mixed batch (peft spells it "__base__").
BASE_NAMES = ("base", "__base__")

# Head names that peft treats as a sequence-classification head (SEQ_CLS_HEAD_NAMES).
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

# peft's defaults when target_modules is not given, by config.model_type.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}

TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM")


@dataclass
class LoraConfig:
    """What to adapt and how. Field names are ours; `save_adapter` writes peft's."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    rslora: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    # Per-module overrides, keyed like peft's: a regex matched as a dotted suffix.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    # DoRA (Liu et al., 2024): also learn each output row's magnitude; see dora.py.
    use_dora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer (typical: 4, 8, 16), got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number (typical: r or 2*r), got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise ValueError(
                "LoraConfig.target_modules must be a list of module names, a regex string, or 'all-linear', "
                f"got {type(self.target_modules).__name__}"
            )
        for key in ("target_modules", "exclude_modules"):
            pattern = getattr(self, key)
            if isinstance(pattern, str) and pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"LoraConfig.{key} {pattern!r} is not a valid regular expression ({e}); "
                                     "give a list of module names, or a valid regex") from None
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig.task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.rslora and (self.rank_pattern or self.alpha_pattern):
            raise ValueError("rslora cannot be combined with rank_pattern or alpha_pattern (peft forbids it too)")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """r and alpha for one module: the first matching pattern wins, as in peft."""
        r, alpha = self.r, self.alpha
        for key, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                r = value
                break
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                alpha = value
                break
        return r, alpha
