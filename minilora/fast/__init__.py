"""Opt-in speed and memory work for the CPU, kept apart from the teaching code."""
