"""lean_malloc: the restart with glibc's tcache and fast bins off, and what it is for:
a freed tensor's memory is reused by the next tensor of its size."""

import os
import subprocess
import sys
import textwrap

from minilora.cli import commands as cli

from minilora.fast import lean_malloc
from minilora.fast.lean_malloc import TUNABLES, lean_malloc_env

GLIBC = lean_malloc.glibc_version()

# 50 rounds of: a 6 MB tensor, small objects made while it lives and kept, the tensor
# freed. Prints how much the heap grew (MB). The thresholds are the ones training sets
# (hold_freed_memory), so the 6 MB blocks come from the heap, not from mmap.
# torch asks for posix_memalign(64, n); the sliver glibc cuts off behind the block is
# 32, 64, 80 or 112 bytes, so the small objects are those sizes: whichever matches takes
# the sliver and walls the freed block in. Each tcache bin is filled first (7 chunks, its
# default count), the state a busy process may be in: a full bin sends the sliver to the
# fast bins, which glibc merges back before a large request, and the probe must show the
# walls even then (CI's machine was in that state and saw none with small tensors).
REUSE_PROBE = textwrap.dedent("""
    import ctypes, os, sys
    import torch
    from minilora.fast.lean_malloc import restart_with_lean_malloc
    if sys.argv[1] == "lean":
        restart_with_lean_malloc()
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-3, 32 << 20)       # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2 ** 31 - 1)    # M_TRIM_THRESHOLD
    for size in range(24, 1032, 16):
        chunks = [libc.malloc(size) for _ in range(7)]
        for c in chunks:
            libc.free(c)
    kept, start = [], libc.mallinfo2().arena
    for _ in range(50):
        big = torch.empty(6 << 20, dtype=torch.uint8)
        kept += [libc.malloc(size) for size in (24, 56, 72, 104)]
        del big
    print(os.environ.get("GLIBC_TUNABLES", ""), (libc.mallinfo2().arena - start) >> 20)
""")


def _probe(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    return (out[0], int(out[1])) if len(out) == 2 else ("", int(out[0]))


def test_env_adds_both_tunables_and_keeps_the_users_other_ones(monkeypatch):
    monkeypatch.setattr(lean_malloc, "glibc_version", lambda: "2.36")
    assert lean_malloc_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": ":".join(TUNABLES)}
    env = lean_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + ":".join(TUNABLES)


def test_env_leaves_a_users_own_choice_and_non_glibc_systems_alone(monkeypatch):
    monkeypatch.setattr(lean_malloc, "glibc_version", lambda: "2.36")
    assert lean_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) is None
    assert lean_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.mxfast=64:glibc.malloc.arena_max=2"}) is None
    monkeypatch.setattr(lean_malloc, "glibc_version", lambda: None)
    assert lean_malloc_env({}) is None


def test_restarted_process_reuses_a_freed_tensors_memory():
    if GLIBC is None:  # musl, macOS, Windows: no tunables exist, so there is nothing to restart for
        assert lean_malloc_env(dict(os.environ)) is None
        return
    tunables, lean_growth = _probe("lean")
    assert tunables == ":".join(TUNABLES)  # the restart happened, once
    default_tunables, default_growth = _probe("default")
    assert default_tunables == ""
    # Lean: every round's 6 MB fits in the last round's hole (a round's worth of slack).
    assert lean_growth <= 12, (lean_growth, default_growth)
    if tuple(int(v) for v in GLIBC.split(".")[:2]) < (2, 38):
        # glibc 2.38 learned to look for an aligned chunk in its bins; before it, the
        # defaults leave every round's hole unused (288 MB measured here).
        assert default_growth >= 200, default_growth


def test_cli_restarts_for_training_and_only_when_run_as_the_program(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "restart_with_lean_malloc", lambda: calls.append(sys.argv[1:]))
    monkeypatch.setattr(cli, "_cmd_train", lambda args: 0)
    monkeypatch.setattr(cli, "_cmd_info", lambda args: 0)
    config = tmp_path / "run.toml"
    assert cli.main(["train", str(config)]) == 0  # called from Python: the caller's process is left alone
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["minilora", "info", str(tmp_path)])
    assert cli.main() == 0  # not a training command: no second start-up
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["minilora", "train", str(config)])
    assert cli.main() == 0
    assert calls == [["train", str(config)]]
