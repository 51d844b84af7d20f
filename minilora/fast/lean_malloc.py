"""Run with glibc's thread cache and fast bins off, so that freed activations are reused.

torch allocates every CPU tensor with `posix_memalign(64, n)`. glibc (through 2.37)
serves an aligned request by taking n + 64 + 32 bytes, the worst-case padding, and
giving back the unused head and tail as free chunks of a few dozen bytes. By default
those slivers go to the per-thread cache (tcache) or the fast bins. Chunks there count
as in use, so they never merge with a neighbour, and the next small malloc of that
size takes them: a tensor's size array, a shared_ptr's control block. When the tensor
is freed its chunk is then walled in by small live objects and is exactly n bytes, and
the next `posix_memalign(64, n)`, which asks for n + 96, does not fit in it. A training
step allocates the same activation sizes over and over, so each round of them takes
new memory from the top of the heap while the holes of the last round sit unused.

With `glibc.malloc.tcache_count=0` and `glibc.malloc.mxfast=0` a sliver goes to the
ordinary bins, which merge free neighbours, and a freed tensor's memory fits the next
request of its size. Both are needed: with one alone the slivers still land in the
other, and whether the holes get reused changed from run to run. tests/test_lean_malloc.py
shows the heap growth with and without; benchmarks/RESULTS.md has the peak RSS of a
SmolLM2 step both ways, at the same speed: training allocates few small blocks from C.

Tunables are read once, when a process starts (mallopt has no switch for the tcache),
so the `minilora` command restarts itself once with them added to GLIBC_TUNABLES:
`os.execv` keeps the process id, the open files and the rest of the environment.
A GLIBC_TUNABLES that already names either tunable is left as it is, which is also how
to opt out (`GLIBC_TUNABLES=glibc.malloc.tcache_count=7`). Scripts that train through
the Python API get the same effect by calling `restart_with_lean_malloc()` first thing,
or by starting Python with the variable set. Elsewhere than glibc nothing happens.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLES = ("glibc.malloc.tcache_count=0", "glibc.malloc.mxfast=0")


def glibc_version() -> str | None:
    """'2.36' on a glibc system, else None."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    except (AttributeError, ValueError, OSError):  # not a glibc system (or no confstr)
        return None
    return version if name == "glibc" else None


def lean_malloc_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None when it would change nothing."""
    if glibc_version() is None:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    named = {item.partition("=")[0] for item in current.split(":")}
    if any(t.partition("=")[0] in named for t in TUNABLES):
        return None  # the user chose these: theirs wins
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (current, *TUNABLES)))}


def restart_with_lean_malloc() -> None:
    """Re-execute this process with the tunables set; returns only when there is no need
    (already set, not glibc) or no way (no interpreter path, exec failed)."""
    env = lean_malloc_env(os.environ)
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own argv, flags included (3.10+)
    if env is None or not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # go on with glibc's defaults: more memory, same results
