"""LoRA, read first: the layer, its variants, and how it gets into a model and onto disk.

- `layer.py`: `LoRALinear`, h = W0 x + (alpha / r) B A x (Hu et al., 2021, eq. 3).
- `dora.py`: DoRA's magnitude and direction (Liu et al., 2024).
- `config.py`: `LoraConfig`, what to adapt and how.
- `targets.py`: which layers a config names (peft's rules).
- `inject.py`: the walker that puts `LoRALinear` on them, and the verbs (merge, remove, count).
- `named_adapters.py`, `mixed_batch.py`: several adapters on one base, hot swaps, mixed batches.
- `modules_to_save.py`: modules trained in full beside the adapters (a new head).
- `adapters.py`: peft's adapter files, both ways.
- `prompt_tuning.py`: soft prompts (Lester et al., 2021), the other PEFT method here.
- `trainable.py`, `summary.py`: what is trained, saved, and counted.

The public names are re-exported by `minilora/__init__.py`.
"""
