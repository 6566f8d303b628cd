"""The fast-allocator choice of the command-line programs (mvit2_jax.allocator)."""

import json
import subprocess
import sys

import pytest

from mvit2_jax import allocator


def test_auto_prefers_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    env = allocator.fast_allocator_env({}, platform="linux")
    assert env == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4", allocator.APPLIED_VAR: "tcmalloc"}
    # An existing preload is kept after it.
    env = allocator.fast_allocator_env({"LD_PRELOAD": "/x/libfoo.so", "MVIT2_ALLOCATOR": "tcmalloc"}, platform="linux")
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/x/libfoo.so"


def test_auto_falls_back_to_glibc_tunables(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    env = allocator.fast_allocator_env({"GLIBC_TUNABLES": "glibc.rtld.x=1"}, platform="linux")
    assert env["GLIBC_TUNABLES"] == "glibc.rtld.x=1:" + allocator.GLIBC_TUNABLES
    assert "glibc.malloc.mmap_max=0" in env["GLIBC_TUNABLES"] and env[allocator.APPLIED_VAR] == "glibc"
    with pytest.raises(allocator.AllocatorError, match="install libtcmalloc-minimal4"):
        allocator.fast_allocator_env({"MVIT2_ALLOCATOR": "tcmalloc"}, platform="linux")


@pytest.mark.parametrize(
    "environ, platform",
    [
        ({"MVIT2_ALLOCATOR": "system"}, "linux"),
        ({allocator.APPLIED_VAR: "glibc"}, "linux"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux"),
        ({}, "darwin"),
    ],
)
def test_nothing_changes(environ, platform):
    assert allocator.fast_allocator_env(environ, platform=platform) == {}


def test_bad_value_is_a_one_line_error():
    with pytest.raises(allocator.AllocatorError, match="MVIT2_ALLOCATOR='fast': use one of auto, tcmalloc, glibc, system"):
        allocator.fast_allocator_env({"MVIT2_ALLOCATOR": "fast"}, platform="linux")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the restart applies on Linux only")
def test_program_restarts_once_with_the_setting(tmp_path, subprocess_env):
    script = tmp_path / "prog.py"
    script.write_text(
        "import os, sys\n"
        "from mvit2_jax import allocator\n"
        "print('start', os.getpid(), flush=True)\n"
        "allocator.maybe_reexec()\n"
        "print('run', os.getpid(), os.environ.get(allocator.APPLIED_VAR), sys.argv[1:], allocator.describe())\n"
    )
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MVIT2_ALLOCATOR")}
    env["MVIT2_ALLOCATOR"] = "glibc"
    out = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["start", "start", "run"], out
    pid = lines[0].split()[1]
    assert lines[1].split()[1] == pid and lines[2].split()[1] == pid  # exec: the same process
    assert "glibc ['a', '--b=1'] glibc, glibc.malloc.mmap_max=0" in lines[2]
    env["MVIT2_ALLOCATOR"] = "nonsense"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: MVIT2_ALLOCATOR='nonsense': use one of auto, tcmalloc, glibc, system"]


HEAP_SCRIPT = """
import ctypes, json
from mvit2_jax import allocator
allocator.run_cpu_computations_inline()  # before JAX's first use, as the programs do
import jax, jax.numpy as jnp

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) >> 10  # MiB
used = lambda: libc.mallinfo2().uordblks >> 20

# 512 MiB freed in the middle of the heap: the tunables keep it resident...
block = libc.malloc(512 << 20)
ctypes.memset(block, 1, 512 << 20)
guard = libc.malloc(1 << 20)
libc.free(block)
out = {"registered": allocator.release_after_compiles(), "rss_freed": rss()}
# ... until the next compile is over.
f = jax.jit(lambda x: jnp.cumsum(x, 0) * jnp.cumsum(x, 1) + 1.0)
x = jax.block_until_ready(jnp.ones((4096, 4096)))
out["temp"] = f.lower(x).compile().memory_analysis().temp_size_in_bytes >> 20
out["rss_compiled"] = rss()
# Calls return with their temporaries freed (asynchronous dispatch frees them on a pool
# thread after the outputs are ready, so they would often still be held here).
held = []
for _ in range(5):
    base = used()
    y = jax.block_until_ready(f(x))
    held.append(used() - base - (y.nbytes >> 20))
    del y
y = f(x)
out["held_after_call"] = max(held)
out["value"] = float(y[1, 2])
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_compiles_hand_freed_memory_back_and_calls_free_their_temporaries(subprocess_env):
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MVIT2_ALLOCATOR")}
    env.update(GLIBC_TUNABLES=allocator.GLIBC_TUNABLES, **{allocator.APPLIED_VAR: "glibc"})
    proc = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["registered"] and out["value"] == 2 * 3 + 1.0
    # The freed 512 MiB went back (393 MiB net of what the compile itself keeps; 44 MiB more without the trim).
    assert out["rss_freed"] - out["rss_compiled"] >= 256, out
    assert out["temp"] >= 60 and out["held_after_call"] < out["temp"] // 4, out


def test_compiles_release_memory_only_under_the_glibc_tunables(monkeypatch):
    # glibc's default trims by itself and tcmalloc keeps its own pages: nothing to register.
    monkeypatch.setattr(allocator, "_release_registered", False)
    for environ in ({}, {allocator.APPLIED_VAR: "tcmalloc"}, {"MVIT2_ALLOCATOR": "glibc"}):
        assert allocator.release_after_compiles(environ) is False
    assert allocator._release_registered is False


def test_a_released_function_drops_its_programs_and_still_runs(monkeypatch):
    """release_compiled (the training loop's init, once it has run on the CPU): the jitted
    function's compiled programs are dropped, the heap trimmed only under the glibc tunables,
    and a later call compiles again with the same result."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    trims = []
    monkeypatch.setattr(allocator, "_malloc_trim", lambda: trims.append)
    f = jax.jit(lambda x: x * 2 + 1)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(f(x), [1, 3, 5, 7])
    assert f._cache_size() == 1  # jax's count of the function's compiled programs
    allocator.release_compiled(f, {allocator.APPLIED_VAR: "glibc"})
    assert f._cache_size() == 0 and trims == [0]
    np.testing.assert_array_equal(f(x), [1, 3, 5, 7])
    allocator.release_compiled(f, {})
    assert f._cache_size() == 0 and trims == [0]
