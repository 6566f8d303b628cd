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

Compiling leaves the opposite problem: the compiler's working memory (0.7 GiB for the alpha
1.0 train step) is freed in pieces that a step's one large temporary block cannot reuse, and
with the glibc tunables' trimming off they stay resident under it. ``release_after_compiles()``
(which ``train.compile_steps`` calls) then hands such freed pages back to the OS with glibc's
``malloc_trim`` once after every XLA compile; steps in between are untouched.
"""

from __future__ import annotations

import ctypes.util
import gc
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional

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


# JAX records this duration after every backend compile (or load from the persistent cache).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_release_registered = False


def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_after_compiles(environ: Mapping[str, str] = os.environ) -> bool:
    """After every XLA compile, give the heap's free pages back to the OS (glibc ``malloc_trim``).

    Only in a program restarted with the glibc tunables (whose trimming is off; glibc's default
    trims by itself and tcmalloc keeps its own pages). Registered once per process (a JAX
    monitoring listener); returns whether it is in place. A trim took 0.06-0.2 s after
    compiles of 10-46 s; the step that follows faults its temporary block in once more.
    """
    global _release_registered
    if _release_registered:
        return True
    if environ.get(APPLIED_VAR) != "glibc":
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    import jax

    def listener(event: str, duration_secs: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            trim(0)

    jax.monitoring.register_event_duration_secs_listener(listener)
    _release_registered = True
    return True


def release_compiled(jitted: Any, environ: Mapping[str, str] = os.environ) -> None:
    """Drop the compiled programs of `jitted` (a ``jax.jit`` function that has done its work) and
    give their host memory back to the OS (``malloc_trim`` under the glibc tunables).

    The training loop's init runs once; its program stayed resident under the train step's
    temporaries: alpha 0.75, batch 16, 256x256, peak RSS 2,616 MiB with it dropped against
    2,719 kept. Calling `jitted` again traces it again and loads its program from the
    compilation cache (or compiles it).
    """
    jitted.clear_cache()
    gc.collect()  # the executable is freed when its last Python reference goes
    trim = _malloc_trim() if environ.get(APPLIED_VAR) == "glibc" else None
    if trim is not None:
        trim(0)


def run_cpu_computations_inline() -> None:
    """Have XLA:CPU run each computation in the thread that calls it; call before JAX's first use.

    With JAX's default asynchronous CPU dispatch, a pool thread frees a step's temporaries
    (3 GiB at alpha 1.0, batch 16, 256x256) only after it has made the outputs ready, and the
    next step's temporaries are allocated on a pool thread as soon as its inputs (those
    outputs) are ready: a step called at once can get its block while the last one is still
    held, and under the glibc tunables the heap keeps the extra 3 GiB for good. Run inline, a
    call whose inputs are ready returns after its temporaries are freed. The training loop
    waits for every step on the CPU anyway, so nothing is lost; GPU and TPU computations are
    not affected. Has no effect once JAX has created its CPU backend.
    """
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
