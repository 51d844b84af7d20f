"""A run's output folder belongs to that run: locked while it runs, never silently reused.

- `RunLock(folder)`: `folder/.minilora-run.lock`, created exclusively (O_EXCL), holds the
  pid, host and start time. A second run into the same folder is refused and told who
  holds it. A lock left by a process that no longer exists on this host (a kill -9, a
  power cut) is stale: it is taken over, and the log says so.
- `claim(folder, cfg, overwrite)`: a folder that already holds a run's outputs (an
  adapter, checkpoints, run.json, metrics) is refused, unless this run resumes it
  (`train.resume_from`) or the user asked to replace it (`--overwrite`, which removes
  those outputs first). Two different runs can then never mix their checkpoints, logs
  or adapters in one folder.
- `check_resume(cfg)`: resuming continues *the same* run: the config saved with the
  checkpoints must equal this one, apart from what may change on resume (how long to
  train, and how often to evaluate, log and save).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
from pathlib import Path

from .config import ConfigError, load_config

LOCK_NAME = ".minilora-run.lock"
# What a run writes into its folder (config.toml is rewritten by every start, so not listed).
OUTPUTS = ("adapter", "best", "checkpoints", "run.json", "metrics.jsonl", "loss.png")
# Keys a resumed run may change: how long it trains, how often it evaluates, logs and saves.
MAY_CHANGE_ON_RESUME = {("train", k) for k in ("max_steps", "epochs", "eval_every", "save_every", "log_every",
                                               "resume_from", "early_stopping_patience")} | {
                        ("output", "dir"), ("output", "save_total_limit")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock(contextlib.AbstractContextManager):
    """Hold `folder`'s run lock for the duration of a `with` block."""

    def __init__(self, folder: str | os.PathLike, log=print, setting: str = "output.dir"):
        self.path = Path(folder) / LOCK_NAME
        self.log, self.setting = log, setting  # `setting`: what the user changes to choose another folder

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    self.log(f"note: {self.path.parent}: taking over a stale lock of process {holder['pid']} "
                             f"(started {holder.get('started', '?')}), which no longer runs")
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError(f"{self.setting} {self.path.parent} is in use by another run (pid "
                                  f"{holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                                  f"{holder.get('started', '?')}); wait for it to end or choose another {self.setting} "
                                  f"(if no such run exists, delete {self.path})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise ConfigError(f"could not take the lock {self.path}; delete it if no run uses this folder")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def existing_outputs(folder: Path) -> list[str]:
    return [name for name in OUTPUTS if (folder / name).exists()]


def resumes_folder(resume_from, folder: Path) -> bool:
    """Whether `resume_from` is `folder` or one of its checkpoints."""
    if resume_from is None:
        return False
    resume, folder = Path(resume_from).resolve(), Path(folder).resolve()
    return resume == folder or folder in resume.parents


def claim(folder: Path, resuming: bool, overwrite: bool, log=print) -> None:
    """Refuse a folder that holds another run's outputs, or clear it when asked to."""
    found = existing_outputs(folder)
    if not found or resuming:
        return
    if not overwrite:
        raise ConfigError(f"output.dir {folder} already holds a run ({', '.join(found)}); resume it with "
                          f"--set train.resume_from={folder}, replace it with --overwrite, or choose another "
                          "output.dir")
    log(f"note: --overwrite: removing the earlier run's {', '.join(found)} from {folder}")
    for name in found:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _run_config_of(resume_from: Path) -> Path | None:
    """The config.toml of the run a checkpoint belongs to (run folder, or checkpoints/step-N inside it)."""
    for folder in (resume_from, resume_from.parent.parent):
        if (folder / "config.toml").is_file():
            return folder / "config.toml"
    return None


def check_resume(cfg) -> None:
    """The checkpoints' run had this config, apart from MAY_CHANGE_ON_RESUME."""
    saved_path = _run_config_of(Path(cfg.train.resume_from))
    if saved_path is None:
        return  # checkpoints written by train() from Python, without a config: nothing to compare
    saved, now = load_config(saved_path).to_dict(), cfg.to_dict()
    differ = sorted(f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {now.get(section, {}).get(key)!r}"
                    for section in set(saved) | set(now)
                    for key in set(saved.get(section, {})) | set(now.get(section, {}))
                    if (section, key) not in MAY_CHANGE_ON_RESUME
                    and saved.get(section, {}).get(key) != now.get(section, {}).get(key))
    if differ:
        raise ConfigError(f"train.resume_from={cfg.train.resume_from} continues a run with another config ("
                          + "; ".join(differ) + "); resume with the same settings, or start a new run in "
                          "another output.dir")
