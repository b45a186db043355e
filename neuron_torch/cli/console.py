"""What the commands print: the project's log lines on the stderr of the moment, and one-line user errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("neuron_torch")


def user_error(err: Exception | str) -> int:
    """Print ``error: <message>`` on stderr; returns the exit code of a user mistake (2)."""
    print(f"error: {err}", file=sys.stderr)
    return 2


# Loggers whose INFO lines are about the libraries, not the run: "Seed set to 0", "GPU available: False",
# Lightning's litlogger tip, "`Trainer.fit` stopped", MLflow's table creation and "Validating input example".
# Their warnings stay visible (Lightning's rank_zero_warn goes through `warnings`, which is not touched here).
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "mlflow")


def setup_logging() -> None:
    """The project's INFO lines on stderr; the libraries' own INFO chatter off; real warnings kept."""
    # a deprecation inside Lightning itself, printed on every run, that users can do nothing about
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # ModelCheckpoint(every_n_train_steps) under manual optimization warns, in 12 lines, that the checkpoint
    # holds the state *after* the optimizer step: for hand-written updates that is the state the update
    # count names, the one a resumed run must start from. Only that message is ignored.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    for name in QUIET_LOGGERS:  # Lightning documents this switch: logging.getLogger("lightning.pytorch")
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow sets its loggers' level when it is imported, from its own switch; and it has one for its
    # "Downloading artifacts" bars (log_model reads the model back once). A user's setting wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at" for a tracking server whenever a run ends; the summary prints the run's
    # address itself, in the UI's model-training view
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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
