"""The `minilora` command line end to end, on a tiny BERT folder and the real SmolLM2.
transformers is the oracle for what `merge` writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import minilora
from helpers_smollm import smollm2_gguf_path, smollm2_hf_dir
from tiny_models import save_tiny_bert_folder, write_sentiment_tsv

MINILORA = Path(sys.executable).parent / "minilora"


def run(*args, cwd=None):
    return subprocess.run([str(MINILORA), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT classifier with all-MiniLM-L6-v2's real tokenizer."""
    return save_tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def run_config(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    write_sentiment_tsv(folder / "train.tsv")
    (folder / "run.toml").write_text(f"""
[model]
path = "{tiny_bert}"
task = "sequence-classification"
[lora]
r = 4
alpha = 8
target_modules = ["query", "value"]
[data]
train_file = "train.tsv"
validation_fraction = 0.25
max_length = 32
[train]
epochs = 2
batch_size = 8
lr = 5e-3
[output]
dir = "out"
""")
    return folder / "run.toml"


def test_train_into_a_pipe_logs_plain_lines_not_a_redrawn_bar(run_config, tmp_path):
    """stderr is a pipe here, as in CI or a job's log: no carriage returns, a closing line per loop."""
    proc = run("train", run_config, "--set", f"output.dir={tmp_path / 'piped'}")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert any(line.startswith("train: 10/10 steps (100%)  loss ") and " lr " in line and " tok_s " in line
               for line in lines), proc.stderr
    assert any(line.startswith("eval: ") for line in lines), proc.stderr
    assert len(lines) < 30 and all(len(line) < 200 for line in lines)


def test_train_eval_merge_round_trip(run_config, tiny_bert, tmp_path):
    proc = run("train", run_config, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = run_config.parent / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 10 and set(summary["eval"]) == {"loss", "accuracy", "macro_f1"}

    proc = run("eval", run_config, "--adapter", out / "adapter")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] == pytest.approx(summary["eval"]["accuracy"])

    proc = run("merge", "--model", tiny_bert, "--adapter", out / "adapter", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    ours = minilora.load_model(tiny_bert, task="sequence-classification")
    minilora.load_adapter(ours, out / "adapter")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3835, 2143, 102, 0], [101, 6659, 2143, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    adapted = ours(input_ids=ids, attention_mask=mask).logits
    minilora.remove_lora(ours, merge=True)
    # What merge wrote is exactly our merged model...
    torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits,
                               ours(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)
    # ...which equals the adapted model up to the fp32 rounding of W0 + s*BA (this tiny
    # random BERT is badly conditioned, so the rounding shows more than in real models).
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, adapted, rtol=0, atol=2e-4)


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1e-3", "[train] 'lrr'; did you mean 'lr'"),
    ("train.epochs=many", "train.epochs"),
    ("data.train_file=/nowhere/train.tsv", "/nowhere/train.tsv"),
    ('lora.target_modules=["qury"]', "closest: query"),
    ("model.gradient_checkpointing=true", "BertForSequenceClassification has no checkpointed layers"),
])
def test_config_errors_are_one_line_with_exit_code_2(run_config, override, needle, tmp_path):
    # A fresh output.dir: the fixture's folder holds a finished run, which is an error of its own.
    proc = run("train", run_config, "--set", override, "--set", f"output.dir={tmp_path / 'out'}", "--no-progress")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len([l for l in lines if "error" in l]) == 1 and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_lists_linear_layers_per_layer(tiny_bert):
    proc = run("info", tiny_bert)
    assert proc.returncode == 0
    assert "bert (BertModel)" in proc.stdout
    assert "encoder.layer.N.attention.self.query" in proc.stdout and "x2" in proc.stdout


def test_import_gguf_and_generate_on_smollm2(tmp_path):
    proc = run("import-gguf", smollm2_gguf_path(), tmp_path / "smol")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "smol" / "config.json").read_text())["num_hidden_layers"] == 30
    proc = run("generate", "--model", smollm2_hf_dir(), "--max-new-tokens", "12", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_gpt2_merge_writes_conv1d_layout_transformers_loads(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                                              n_positions=32)).eval()
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    ours = minilora.load_model(tmp_path / "base")
    minilora.inject(ours, minilora.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 9))
    want = ours(input_ids=ids).logits
    minilora.remove_lora(ours, merge=True)
    from minilora.io.export import save_pretrained
    save_pretrained(ours, tmp_path / "base", tmp_path / "merged", task="causal-lm")
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_qlora_config_trains_on_a_4bit_base(run_config, tiny_bert, tmp_path):
    """quant.method = "nf4": the base's block linears load as NF4Linear, LoRA trains on them."""
    proc = run("train", run_config, "--no-progress", "--set", "quant.method=nf4", "--set", f"output.dir={tmp_path}/q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "q" / "run.json").read_text())["steps"] == 10
    proc = run("quantize", tiny_bert, tmp_path / "q4")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    model = minilora.load_model(tmp_path / "q4", task="sequence-classification")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, minilora.NF4Linear)
