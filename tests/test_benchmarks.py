"""The benchmark runner (benchmarks/runner.py): what it writes, and that it refuses to time
stacks that disagree.

The slow end-to-end check runs `python -m benchmarks --quick lora_linear` from the
repository root, as `make bench` does: the runner must keep the repo's kernels/ from
standing in for the PyPI package `kernels` that bitsandbytes imports.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METADATA = ("host", "date", "command", "device", "cpu", "torch", "triton", "peft", "bitsandbytes", "transformers")


@pytest.fixture(scope="module")
def bench():
    """The benchmarks package, imported without leaving the repo root on sys.path."""
    import bitsandbytes  # noqa: F401  (first: with the root on sys.path it would import kernels/ as `kernels`)

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import common, lora_linear, runner
    finally:
        sys.path.remove(str(ROOT))
    return common, lora_linear, runner


def test_quick_run_writes_json_with_metadata_markdown_and_png(bench, tmp_path, capsys):
    runner = bench[2]
    assert runner.main(["lora_linear", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out

    (json_path,) = tmp_path.glob("*-quick.json")
    record = json.loads(json_path.read_text())
    for key in METADATA:
        assert record[key], key
    assert record["command"] == f"python -m benchmarks lora_linear --quick --out {tmp_path}"
    assert record["quick"] is True and record["suites"] == ["lora_linear"]
    suite = record["results"]["lora_linear"]
    assert suite["check"]["ok"] and "error" not in suite
    stacks = {(row["stack"], row["r"]) for row in suite["results"]}
    assert {("minilora", 16), ("peft", 16), ("nn.Linear (frozen)", None), ("nn.Linear (trainable)", None)} <= stacks
    for row in suite["results"]:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert len(row["fwd_ms_all"]) == suite["settings"]["repeats"]

    png = tmp_path / record["plots"]["lora_linear"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "latest-quick.md").read_text()
    assert "| minilora LoRALinear | 16 |" in markdown and "fwd+bwd ÷ peft" in markdown
    assert markdown.split("## ", 1)[1] in printed  # what it printed is what it wrote


@pytest.mark.slow  # a fresh Python importing torch, peft, transformers, bitsandbytes: ~40 s on a busy 2-core box
def test_python_m_benchmarks_from_the_repo_root_keeps_kernels_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "lora_linear", "--repeats", "1",
                           "--no-plots", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # lora_linear imports bitsandbytes (through peft) with common.import_bitsandbytes, which
    # fails the suite, and so the run, if the repo's kernels/ was imported as `kernels`.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(ROOT / "kernels") not in proc.stderr
    record = json.loads(next(tmp_path.glob("*-quick.json")).read_text())
    assert record["command"].endswith("-m benchmarks --quick lora_linear --repeats 1 --no-plots --out " + str(tmp_path))


def test_stacks_that_disagree_are_never_timed(bench, monkeypatch, tmp_path):
    common, lora_linear, runner = bench
    make_peft = lora_linear.make_peft_layer

    def off_by_one_percent(base, r, alpha):
        layer = make_peft(base, r, alpha)
        layer.scaling["default"] *= 1.01  # a different LoRA update than minilora's
        return layer

    monkeypatch.setattr(lora_linear, "make_peft_layer", off_by_one_percent)
    with pytest.raises(common.StacksDisagree, match=r"minilora vs peft, y: the stacks disagree"):
        lora_linear.run(quick=True, repeats=1, log=lambda _: None)

    # Through the runner: reported, recorded, exit status 1, no timings in the file.
    status = runner.main(["lora_linear", "--quick", "--repeats", "1", "--no-plots", "--out", str(tmp_path)])
    assert status == 1
    record = json.loads(next(tmp_path.glob("*-quick.json")).read_text())
    suite = record["results"]["lora_linear"]
    assert suite["error"].startswith("StacksDisagree") and "results" not in suite
    assert "**FAILED**: StacksDisagree" in (tmp_path / "latest-quick.md").read_text()


def test_assert_close_passes_rounding_and_fails_on_nan(bench):
    common = bench[0]
    a = torch.randn(8, 8)
    assert common.assert_close("same", a, a.clone(), 1e-5) == 0
    assert common.assert_close("rounded", a.bfloat16().float(), a, 2e-2) <= 2e-2
    b = a.clone()
    b[3, 5] = float("nan")
    with pytest.raises(common.StacksDisagree):
        common.assert_close("nan", b, a, 1e-5)


def test_unknown_suite_is_an_error_that_lists_the_suites(bench, capsys):
    runner = bench[2]
    with pytest.raises(SystemExit):
        runner.parse_args(["lora_lin"])
    assert "lora_linear, nf4, train_step, load" in capsys.readouterr().err
    assert runner.parse_args(["lora_linear nf4"]).suites == ["lora_linear", "nf4"]  # make SUITES="a b"


def test_bench_unpad_quick_times_both_paths_and_restores_the_model_code(bench):
    from benchmarks import bench_unpad
    from minilora.fast.unpad import Unpadded

    before = Unpadded.__dict__["in_training"]
    record = bench_unpad.run(quick=True)
    assert [r["path"] for r in record["results"]] == ["padded", "real tokens"]
    assert all(len(r["step_s_all"]) == 1 and r["step_s"] > 0 for r in record["results"])
    assert record["padded_positions"] > 2 * record["real_tokens"] > 0  # SST-2 lengths: ~2/3 padding
    assert Unpadded.__dict__["in_training"] is before


def test_the_pypi_kernels_package_in_the_venv_is_not_taken_for_ours(bench):
    """transformers depends on PyPI's `kernels`, installed under .venv inside the repository:
    that one is the right package, and importing bitsandbytes beside it must pass."""
    common = bench[0]
    import kernels

    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels"
    assert common.repo_kernels_shadow(kernels) is None
    assert common.import_bitsandbytes() is sys.modules["bitsandbytes"]


def test_the_repos_kernels_folder_on_sys_path_is_refused():
    """With the repo root on sys.path our kernels/ stands in for PyPI's `kernels`: refused, clearly."""
    code = "import kernels\nfrom benchmarks.common import import_bitsandbytes\nimport_bitsandbytes()\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"imported the repository's {ROOT / 'kernels'} as the package `kernels`" in proc.stderr, proc.stderr[-2000:]
    assert "Run the benchmarks as `python -m benchmarks`" in proc.stderr


def test_bench_fast_times_every_piece_against_the_plain_path(tmp_path):
    """benchmarks/bench_fast.py --quick: a plain, a fast and a fast-without row for every
    piece that changes the model, the children for AdamW and lean malloc, and a JSON."""
    import minilora.fast

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_fast
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "fast.json"
    record = bench_fast.main(["--quick", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == record["rows"]
    configs = {(row["case"], row["config"]) for row in record["rows"]}
    for case in ("LM step, checkpointing off", "LM step, checkpointing on", "encoder step"):
        assert {(case, "plain"), (case, "fast")} <= configs
    without = {config.removeprefix("fast without ") for _, config in configs if config.startswith("fast without ")}
    assert set(minilora.fast.PIECES) | {"hold_cpu_memory"} <= without | {"nf4_codec"}
    assert all(row["step_s"] > 0 for row in record["rows"])
    children = {(c["kind"], c["variant"]): c for c in record["children"]}
    assert set(children) == {(k, v) for k in ("adamw", "lean_malloc") for v in ("plain", "fast")}
    assert children[("adamw", "plain")]["dynamo_imported"] and not children[("adamw", "fast")]["dynamo_imported"]



def test_bench_fast_runs_the_pieces_in_bf16(tmp_path):
    """--precision bf16: the same rows on a bf16 base with fp32 adapters under autocast,
    every configuration's loss checked against the plain one first."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_fast
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "fast-bf16.json"
    record = bench_fast.main(["--quick", "--repeats", "1", "--precision", "bf16", "--cases", "lm,encoder",
                              "--out", str(out)])
    assert record["precision"] == "bfloat16" and not record["children"]
    configs = {(row["case"], row["config"]) for row in record["rows"]}
    assert ("LM step, checkpointing off", "fast without rms_norm") in configs
    assert ("encoder step", "fast without unpad") in configs
    assert all(row["step_s"] > 0 and row["loss_rel_diff"] < 1e-2 for row in record["rows"])
