"""Shared test set-up: one persistent XLA compilation cache for the whole session.

Compiles dominate the suite's time on CPU; with the cache, a function compiled once (in this
process or in a subprocess started by a test) is loaded, not compiled, the next time.
"""

import os
import tempfile

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mvit2_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
