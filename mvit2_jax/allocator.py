"""Host memory allocator for the command-line programs: keep freed memory for reuse.

XLA:CPU allocates the temporaries of a compiled step afresh at every call. glibc's malloc
serves blocks above 32 MiB with mmap and gives them back to the OS when they are freed, so
every training step touches its whole working set as new pages: at alpha 1.0, batch 16,
256x256 that is about 800,000 page faults (3 GiB zeroed by the kernel) per step, a third of
the step time on two cores. PyTorch on the CPU pays the same. Allocators that keep freed
memory avoid it:

- tcmalloc (``LD_PRELOAD``; Debian/Ubuntu package libtcmalloc-minimal4), the fastest here;
- glibc itself with mmap turned off, one arena and no trimming (``GLIBC_TUNABLES``).

``maybe_reexec()`` restarts the running program once with the first of these that applies,
so that the setting is in place before the process allocates anything. The choice comes
from the environment variable MVIT2_ALLOCATOR:

- ``auto`` (default): tcmalloc where its library is installed, else the glibc tunables;
- ``tcmalloc`` / ``glibc``: that one (an error if tcmalloc is not installed);
- ``system``: leave the allocator alone (no restart).

The cost: memory freed by a step stays with the process (its resident size stays at its
peak instead of falling between steps). Nothing changes on systems other than Linux.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Dict, Mapping, Optional

ENV_VAR = "MVIT2_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "glibc", "system")
# Set in the restarted program (and inherited by its children): the setting is in place.
APPLIED_VAR = "MVIT2_ALLOCATOR_APPLIED"
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=68719476736"
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
_TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


class AllocatorError(ValueError):
    """MVIT2_ALLOCATOR names an allocator that cannot be used here."""


def find_tcmalloc() -> Optional[str]:
    """Path of an installed tcmalloc shared library, or None."""
    for d in _TCMALLOC_DIRS:
        for name in _TCMALLOC_NAMES:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    for lib in ("tcmalloc_minimal", "tcmalloc"):
        name = ctypes.util.find_library(lib)
        if name:
            return name
    return None


def fast_allocator_env(environ: Mapping[str, str], platform: str = sys.platform) -> Dict[str, str]:
    """The environment variables to set for a fast allocator; {} when nothing is to change.

    Nothing changes off Linux, with MVIT2_ALLOCATOR=system, when the setting is already in
    place (MVIT2_ALLOCATOR_APPLIED), or when the user preloads an allocator of their own.
    """
    choice = environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV_VAR}={environ.get(ENV_VAR)!r}: use one of {', '.join(CHOICES)}")
    if choice == "system" or not platform.startswith("linux") or environ.get(APPLIED_VAR):
        return {}
    preload = environ.get("LD_PRELOAD", "")
    if choice == "auto" and any(lib in preload for lib in ("tcmalloc", "jemalloc", "mimalloc")):
        return {}
    if choice in ("auto", "tcmalloc"):
        lib = find_tcmalloc()
        if lib:
            return {"LD_PRELOAD": f"{lib}:{preload}" if preload else lib, APPLIED_VAR: "tcmalloc"}
        if choice == "tcmalloc":
            raise AllocatorError(
                f"{ENV_VAR}=tcmalloc but no tcmalloc library is installed: install libtcmalloc-minimal4 "
                f"or set {ENV_VAR}=glibc"
            )
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {"GLIBC_TUNABLES": f"{tunables}:{GLIBC_TUNABLES}" if tunables else GLIBC_TUNABLES, APPLIED_VAR: "glibc"}


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """The allocator this process runs with, in words."""
    applied = environ.get(APPLIED_VAR)
    if applied == "tcmalloc":
        return "tcmalloc (" + environ.get("LD_PRELOAD", "").split(":")[0] + ")"
    if applied == "glibc":
        return "glibc, " + GLIBC_TUNABLES
    preload = environ.get("LD_PRELOAD")
    return f"LD_PRELOAD={preload}" if preload else "system default"


def maybe_reexec() -> None:
    """Restart this program (same interpreter, same arguments) with a fast allocator, once.

    Call it first thing in a program's entry point, before JAX or TensorFlow start. A bad
    MVIT2_ALLOCATOR value exits with a one-line message (status 2).
    """
    try:
        changes = fast_allocator_env(os.environ)
    except AllocatorError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not changes or not getattr(sys, "orig_argv", None):
        return
    env = dict(os.environ)
    env.update(changes)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
