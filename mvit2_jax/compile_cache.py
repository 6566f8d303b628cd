"""The persistent XLA compilation cache of the commands: a second run with unchanged shapes
loads its compiled programs instead of compiling them.

`python -m mvit2_jax.main`, `predict` and `export` turn it on before they compile anything:
JAX's file cache in `$XDG_CACHE_HOME/mvit2_jax/xla` (default `~/.cache/mvit2_jax/xla`), or in
`$JAX_COMPILATION_CACHE_DIR` when that is set. JAX keys each entry by the program, the compile
options and XLA flags, the devices, and the jax / jaxlib and backend versions, so an entry
of another version or machine is never loaded; with a size limit set (here 4 GiB, the least
recently used entries evicted) JAX takes a file lock around every read and write, so
several processes (a multi-process run, parallel jobs) share one directory safely.
`--compilation_cache=off` (main) or `MVIT2_COMPILATION_CACHE=off` turns it off; a path there
chooses another directory. Without either, JAX's own `JAX_ENABLE_COMPILATION_CACHE=false` turns
it off too (launch/local.sh sets it). Programs that compile in under a second are not stored.
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "MVIT2_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
ON = ("on", "1", "true", "yes", "")
MAX_BYTES = 4 << 30


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mvit2_jax", "xla")


def enable(setting: Optional[str] = None) -> Optional[str]:
    """Turn the cache on as `setting` says ("on", "off" or a directory; None: $MVIT2_COMPILATION_CACHE,
    else off where $JAX_ENABLE_COMPILATION_CACHE is false, else "on"); returns the directory in
    use, or None when off."""
    import jax

    if setting is None:
        jax_setting = os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "").strip().lower()
        setting = os.environ.get(ENV, "off" if jax_setting in OFF else "on")
    setting = setting.strip()
    if setting.lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = (os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()) if setting.lower() in ON else setting
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory
