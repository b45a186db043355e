"""What the commands print: the project's log lines on the stderr of the moment, and one-line user errors."""

from __future__ import annotations

import logging
import sys
import warnings

log = logging.getLogger("neuron_torch")


def user_error(err: Exception | str) -> int:
    """Print ``error: <message>`` on stderr; returns the exit code of a user mistake (2)."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def setup_logging() -> None:
    # a deprecation inside Lightning itself, printed on every run, that users can do nothing about
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if not any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        log.addHandler(_StderrHandler())
        log.setLevel(logging.INFO)
        log.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Log lines to the ``sys.stderr`` of the moment, so a redirected or captured stderr gets them too."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the live sys.stderr is used instead
        pass
