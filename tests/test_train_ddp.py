"""torchrun with two CPU processes (gloo) gives the single-process result for the
same global batch: each rank takes half of every batch, gradients are averaged."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from minilora.train.loop import train
from toy_lm import adapter, args, lm_examples, toy_model

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_single_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
         str(HERE / "ddp_worker.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    model = toy_model()
    single = train(model, lm_examples(n=32), lm_examples(n=8, seed=5),
                   args(batch_size=8, grad_accum=2, epochs=2, schedule="linear", warmup_steps=1, max_grad_norm=1.0),
                   task="causal-lm", progress=False)
    ddp = load_file(str(tmp_path / "final.safetensors"))
    for name, value in adapter(model).items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-5)
    losses = load_file(str(tmp_path / "losses.safetensors"))["losses"]
    torch.testing.assert_close(losses, torch.tensor([h["loss"] for h in single["history"]]), rtol=1e-5, atol=1e-6)
