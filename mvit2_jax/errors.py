"""The errors a user can fix, and how the command-line programs report them.

`ConfigError` and `DataError` carry one line that says what to change; the programs print
that line and exit with status 2. Every other exception is a bug or an environment failure
and keeps its traceback. `NonFiniteError` (exit 3) and a preemption (exit 143) are outcomes
of a run, not mistakes.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

EXIT_USAGE = 2  # a configuration, flag or data error: the message says what to change
EXIT_NONFINITE = 3  # training stopped after too many consecutive non-finite steps
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a preemption, checkpoint saved


class ConfigError(ValueError):
    """A configuration value, flag or path that cannot work (one line: what to change)."""


class DataError(ValueError):
    """A dataset that is unknown, not prepared, empty or holds bad files (one line)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


USAGE_ERRORS = (ConfigError, DataError)


@contextlib.contextmanager
def usage_errors_exit(prog: str = "error") -> Iterator[None]:
    """Turn a ConfigError or DataError into `PROG: message` on stderr and exit status 2."""
    try:
        yield
    except USAGE_ERRORS as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
