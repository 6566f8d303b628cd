"""The fast-allocator choice of the command-line programs (mvit2_jax.allocator)."""

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
