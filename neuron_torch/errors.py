"""The project's one error family: what a user got wrong, told in one line.

Each is a ``ValueError`` (a bad value the user gave), so ``except ValueError`` still catches every one; the
commands print them as ``error: <message>`` and exit 2, with no traceback.
"""

from __future__ import annotations


class NeuronTorchError(ValueError):
    """Base of the project's user-facing errors: one line, naming the file, key, column or row."""


class DataError(NeuronTorchError):
    """A problem with the user's data, told in one line (file, column, row where it applies)."""


class ConfigError(NeuronTorchError):
    """A config value the run cannot use, told in one line that names the key."""


class ModelLoadError(NeuronTorchError):
    """A model URI that names nothing, or files that are not a model this package wrote; one line."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
