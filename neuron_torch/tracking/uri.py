"""Which tracking store a run writes to, and MLflow's fluent API pointed at it for a while."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default; `mlflow ui` reads it with no flags
ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(configured: Optional[str]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the configured URI, else MLflow's default sqlite store."""
    return os.environ.get(ENV) or configured or DEFAULT_TRACKING_URI


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``, ``load_model``) at ``uri`` for a while.

    Inside, ``MLFLOW_TRACKING_URI`` is ``uri`` too, so a process started there follows it. On leaving, the
    variable and the URI set in the process (which outranks the variable) are put back as they were, so a
    later run in the same process still follows its own configuration. A URI set in the process as ``""``
    comes back as none set: MLflow's own ``is_tracking_uri_set`` counts ``""`` as unset.
    """
    import mlflow

    # with the variable out of the way, MLflow's getters answer for the URI set in the process alone
    previous_env = os.environ.pop(ENV, None)
    previous_set = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    os.environ[ENV] = uri  # set_tracking_uri sets it only when the URI changes
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_set)  # None: none set, as before (it also clears the variable)
        if previous_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous_env
