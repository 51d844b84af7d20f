"""Triton kernels, installed as minilora.kernels."""
