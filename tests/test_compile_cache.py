"""mvit2_jax.compile_cache: the commands' persistent compilation cache, in fresh processes
(a cache is per process: each run here is a child Python with its own cache directory)."""

import json
import os
import subprocess
import sys

import pytest

PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from mvit2_jax import compile_cache

events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
directory = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
value = float(f(jnp.arange(64.0).reshape(8, 8) / 64))
print(json.dumps({"dir": directory, "value": value, "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0)}))
"""


@pytest.mark.slow
def test_a_second_run_loads_what_the_first_compiled_and_off_turns_it_off(tmp_path, subprocess_env):
    env = subprocess_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # (the test session's own cache)
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # store even this small program

    def run(*args, **extra):
        proc = subprocess.run([sys.executable, "-c", PROGRAM, *args], env={**env, **extra}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    directory = tmp_path / "mvit2_jax" / "xla"
    first, second = run(), run()
    assert first["dir"] == second["dir"] == str(directory)
    assert first["misses"] >= 1 and first["hits"] == 0 and any(name.endswith("-cache") for name in os.listdir(directory))
    assert second["hits"] >= 1 and second["misses"] == 0 and second["value"] == first["value"]
    entries = sorted(os.listdir(directory))
    off = run(MVIT2_COMPILATION_CACHE="off")
    assert off["dir"] is None and off["hits"] == off["misses"] == 0 and sorted(os.listdir(directory)) == entries
    jax_off = run(JAX_ENABLE_COMPILATION_CACHE="false")  # what launch/local.sh sets
    assert jax_off["dir"] is None and jax_off["hits"] == jax_off["misses"] == 0
    assert run(JAX_ENABLE_COMPILATION_CACHE="false", MVIT2_COMPILATION_CACHE="on")["hits"] >= 1  # ours decides where both are set
    elsewhere = run(str(tmp_path / "mine"))
    assert elsewhere["dir"] == str(tmp_path / "mine") and elsewhere["misses"] >= 1 and os.listdir(tmp_path / "mine")
