"""The training loop and its parts: `loop.py` (read it top to bottom), data and batching,
the schedule, checkpoints, metrics, the TOML config and the runner behind `minilora train`."""
