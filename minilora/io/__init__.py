"""What goes in and out: model folders, tokenizers and chat, generation, GGUF, atomic writes."""
