"""QLoRA, read second: a frozen base in 4-bit NormalFloat, LoRA on top (Dettmers et al., 2023).

- `nf4.py`: the NF4 codebook, blockwise absmax quantization, double quantization.
- `nf4_linear.py`: `NF4Linear`, the frozen 4-bit layer LoRA wraps.
- `quantize.py`: bitsandbytes' serialisation, quantize-on-load, and `quantize_folder`.
"""
