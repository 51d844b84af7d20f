"""Model registry: which of our classes reads a given Hugging Face checkpoint.

A checkpoint folder's config.json names its architecture family in `model_type`
("bert", "llama", ...). The family fixes the config class (how config.json is
read) and, per task, the model class:

    "causal-lm"                -> next-token prediction (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3, GPT-2)
    "sequence-classification"  -> encoder + classification head (BERT, DistilBERT, RoBERTa)
    "embedding"                -> the plain encoder's last hidden states (BERT, DistilBERT, RoBERTa)

Classes are named by import path and imported only when asked for, so that using
BERT never imports Llama, and a family whose module is missing fails only when it
is requested. `register` lets tests and users add a family at run time.
"""

from __future__ import annotations

import importlib

TASKS = ("causal-lm", "sequence-classification", "embedding")

_CAUSAL_LLAMA = {"causal-lm": "minilora.models.llama:LlamaForCausalLM"}

# model_type -> (config class, {task: model class}); classes as "module:Name" or objects.
_REGISTRY: dict[str, tuple[object, dict[str, object]]] = {
    "bert": (
        "minilora.models.bert:BertConfig",
        {
            "sequence-classification": "minilora.models.bert:BertForSequenceClassification",
            "embedding": "minilora.models.bert:BertModel",
        },
    ),
    "distilbert": (
        "minilora.models.distilbert:DistilBertConfig",
        {
            "sequence-classification": "minilora.models.distilbert:DistilBertForSequenceClassification",
            "embedding": "minilora.models.distilbert:DistilBertModel",
        },
    ),
    # Mistral, Qwen2 and Qwen3 share Llama's block; LlamaConfig.from_hf reads their differences.
    "llama": ("minilora.models.llama:LlamaConfig", _CAUSAL_LLAMA),
    "mistral": ("minilora.models.llama:LlamaConfig", _CAUSAL_LLAMA),
    "qwen2": ("minilora.models.llama:LlamaConfig", _CAUSAL_LLAMA),
    "qwen3": ("minilora.models.llama:LlamaConfig", _CAUSAL_LLAMA),
    "gemma2": ("minilora.models.gemma:GemmaConfig", {"causal-lm": "minilora.models.gemma:GemmaForCausalLM"}),
    "gemma3_text": ("minilora.models.gemma:GemmaConfig", {"causal-lm": "minilora.models.gemma:GemmaForCausalLM"}),
    "phi3": ("minilora.models.phi3:Phi3Config", {"causal-lm": "minilora.models.phi3:Phi3ForCausalLM"}),
    "roberta": (
        "minilora.models.roberta:RobertaConfig",
        {
            "sequence-classification": "minilora.models.roberta:RobertaForSequenceClassification",
            "embedding": "minilora.models.roberta:RobertaModel",
        },
    ),
    "gpt2": ("minilora.models.gpt2:GPT2Config", {"causal-lm": "minilora.models.gpt2:GPT2LMHeadModel"}),
}


def _resolve(ref):
    if not isinstance(ref, str):
        return ref
    module, name = ref.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"model class {ref} is registered but cannot be imported: {e}") from e


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def supported_tasks(model_type: str) -> list[str]:
    return sorted(_family(model_type)[1])


def _family(model_type: str):
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported model_type {model_type!r} (from config.json); supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]


def get_config_class(model_type: str) -> type:
    return _resolve(_family(model_type)[0])


def get_model_class(model_type: str, task: str) -> type:
    tasks = _family(model_type)[1]
    if task not in tasks:
        raise ValueError(
            f"model_type {model_type!r} has no task {task!r}; supported tasks for it: {', '.join(sorted(tasks))}"
            f" (all tasks: {', '.join(TASKS)})"
        )
    return _resolve(tasks[task])


def register(model_type: str, config_class, tasks: dict) -> None:
    """Add or replace a family: `tasks` maps task name -> model class (or "module:Name")."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; tasks are {', '.join(TASKS)}")
    _REGISTRY[model_type] = (config_class, dict(tasks))


def unregister(model_type: str) -> None:
    _REGISTRY.pop(model_type, None)


__all__ = [
    "TASKS", "get_config_class", "get_model_class", "register", "unregister", "supported_model_types", "supported_tasks",
]
