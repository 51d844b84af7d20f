"""bf16 training (issue 20): a frozen base in bf16, fp32 master weights, auto by hardware.

Oracles: the same run in fp32 (first-step loss within 2e-2), float64 for the bf16 LoRA
branch, and the CPU's own flags (forced through MINILORA_CPU_FLAGS) for `auto`.
"""

import json
import os

import pytest
import torch

import minilora
from minilora.fast.dropout import dropout_keep_mask, keep_scale
from minilora.train import precision
from minilora.train.config import ConfigError, load_config
from minilora.train.run import run_training
from test_cli import run, run_config, tiny_bert  # noqa: F401  (fixtures)
from test_demo import SST2


@pytest.fixture
def flags(monkeypatch):
    def force(value: str):
        monkeypatch.setenv("MINILORA_CPU_FLAGS", value)
        precision.cpu_flags.cache_clear()

    yield force
    precision.cpu_flags.cache_clear()


def test_auto_follows_the_cpu_flags(flags):
    flags("fpu sse4_2 avx2 avx512f")
    chosen = precision.choose("auto", "cpu")
    assert chosen.dtype == torch.float32 and "neither AMX-BF16 nor AVX-512 BF16" in chosen.describe()
    flags("fpu avx512f avx512_bf16")
    assert precision.choose("auto", "cpu").dtype == torch.bfloat16
    flags("fpu amx_tile amx_bf16")
    assert "AMX-BF16" in precision.choose("auto", "cpu").reason
    assert precision.choose("auto", "cuda").dtype == torch.bfloat16
    assert precision.choose("fp32", "cuda").dtype == torch.float32
    # A base loaded in 16 bits on purpose computes in them.
    flags("fpu")
    assert precision.choose("auto", "cpu", torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="frozen weights are torch.bfloat16"):
        precision.choose("fp32", "cpu", torch.bfloat16)


def test_a_cpu_without_bf16_trains_in_fp32_and_says_so(run_config, tmp_path):  # noqa: F811
    env = {**os.environ, "MINILORA_CPU_FLAGS": "fpu sse4_2 avx2"}
    import subprocess

    from test_cli import MINILORA

    proc = subprocess.run([str(MINILORA), "train", str(run_config), "--set", f"output.dir={tmp_path / 'o'}",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "precision: fp32 (auto: this CPU has neither AMX-BF16 nor AVX-512 BF16" in proc.stdout
    info = subprocess.run([str(MINILORA), "info"], capture_output=True, text=True, env=env, timeout=120)
    assert 'train.precision = "auto" would choose fp32' in info.stdout


def test_a_16_bit_base_with_fp32_precision_is_a_config_error(run_config):  # noqa: F811
    with pytest.raises(ConfigError, match='model.dtype = "bfloat16" .* train.precision = "fp32"'):
        load_config(run_config, ["model.dtype=bfloat16", "train.precision=fp32"])


def _sst2_run(tmp_path, prec: str, steps: int = 1, **extra):
    over = [f"train.precision={prec}", f"train.max_steps={steps}", "train.log_every=1", "data.max_train_examples=256",
            "data.max_eval_examples=64", f"output.dir={tmp_path / prec}"] + [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "sst2_minilm.toml"), over)
    cfg.data.train_file, cfg.data.validation_file = str(SST2 / "train.tsv"), str(SST2 / "dev.tsv")
    result = run_training(cfg, progress=False, log=lambda *a: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / prec / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return result, losses


def test_bf16_and_fp32_agree_on_the_first_step_and_bf16_holds_its_weights_as_promised(tmp_path):
    fp32, fp32_losses = _sst2_run(tmp_path, "fp32", steps=3)
    bf16, bf16_losses = _sst2_run(tmp_path, "bf16", steps=3)
    assert abs(bf16_losses[0] - fp32_losses[0]) <= 2e-2, (bf16_losses, fp32_losses)
    model = bf16["model"]
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert set(frozen.values()) == {torch.bfloat16}
    assert set(trained.values()) == {torch.float32} and any("classifier" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in fp32["model"].parameters())
    # The adapter on disk is fp32 either way, and reloads onto an fp32 base.
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    # Outside autocast the trained model still runs (its fp32 head takes the bf16 hidden state).
    ids = torch.tensor([[101, 2023, 2143, 2001, 2307, 102]])
    with torch.no_grad():
        plain = model.eval()(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(input_ids=ids).logits
    torch.testing.assert_close(plain.float(), auto.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_bf16_lora_branch_keeps_bf16_activations_and_matches_float64(p):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    model = torch.nn.Sequential(layer)
    minilora.inject(model, minilora.LoraConfig(r=4, alpha=8, dropout=p, target_modules=["0"]))
    adapter = model[0].adapters["default"]
    torch.nn.init.normal_(adapter.lora_B.weight)
    minilora.fast.enable(model)
    model.train()
    x = torch.randn(5, 64).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.manual_seed(3)
    keep = dropout_keep_mask(x.shape, p, x.device) if p else torch.ones_like(x, dtype=torch.bool)
    c = keep_scale(p) if p else 1.0
    a64, b64 = (w.detach().double().requires_grad_() for w in (adapter.lora_A.weight, adapter.lora_B.weight))
    want = layer(x.detach()).double() + ((x.detach().double() * keep) * c @ a64.t() @ b64.t()) * adapter.scaling
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(out.dtype))
    want.backward(g)
    for got, ref in ((adapter.lora_A.weight, a64), (adapter.lora_B.weight, b64)):
        assert got.grad.dtype == torch.float32
        err = (got.grad.double() - ref.grad).abs().max() / ref.grad.abs().max()
        assert err < 2e-2, err



@pytest.mark.parametrize("cpu, expect", [("fpu avx2", "precision: fp32 (auto: this CPU has neither"),
                                         ("fpu amx_tile amx_bf16", "precision: bf16 (auto: this CPU has AMX-BF16)")])
def test_generate_holds_the_model_as_auto_precision_chooses(tmp_path, cpu, expect):
    import subprocess

    from test_cli import MINILORA
    from test_gguf import tiny_llama

    folder = tmp_path / "model"
    assert run("import-gguf", tiny_llama(tmp_path), folder).returncode == 0
    env = {**os.environ, "MINILORA_CPU_FLAGS": cpu}
    proc = subprocess.run([str(MINILORA), "generate", "--model", str(folder), "--no-chat", "--max-new-tokens", "3",
                           "hello"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stderr
