"""The README's quick start runs as written, and the CLI's error contract holds."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINILORA = Path(sys.executable).parent / "minilora"


def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    # The comment in the README quotes the line the code prints.
    quoted = re.search(r"# (trainable params: [\d,]+ \|\| all params: [\d,]+)", block).group(1)
    assert quoted in out
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


def test_user_error_exits_2_with_one_clear_line(tmp_path):
    proc = subprocess.run([str(MINILORA), "demo", "--model", str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [f"minilora demo: error: model folder not found: {tmp_path / 'nope'} "
                     "(expected a folder with config.json and model.safetensors)"]
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = subprocess.run([str(MINILORA), "--debug", "demo", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "minilora", "--help"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_readme_several_adapters_block_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Several adapters on one base.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README several adapters", "exec"), {})  # its asserts are the check
    saved = (tmp_path / "topic-adapter" / "adapter_config.json").read_text()
    assert '"use_dora": true' in saved
