"""Whether the tracking server answers: the check before a run starts, the probe while values wait, and
MLflow's HTTP retries bounded so that a server that went away costs seconds, not minutes.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

from neuron_torch.tracking.uri import ENV

# MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) retry one request for about 4 minutes;
# values that cannot be sent wait in the spool instead, so one request gives up after a few seconds
# (retries sleep 0 s, then 2 s). The user's environment overrides each of these.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # seconds per connect or read, not per upload
}
CHECK_SECONDS = 5.0  # how long the check before a run waits for an answer


def bound_http_retries() -> None:
    """Set the project's defaults for MLflow's HTTP retries where the environment does not set them."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def why_silent(uri: str, timeout: float = CHECK_SECONDS) -> Optional[str]:
    """Why an http(s) tracking server does not answer (``"connection refused"``), or None when it answers.

    Any HTTP response counts as an answer, an error status included: the question is only whether a server
    is there. Other stores (sqlite, files) always answer.
    """
    if not is_http(uri):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout, allow_redirects=False)
    except requests.exceptions.RequestException as err:
        return reason(err, timeout)
    return None


def store_error(uri: str) -> Optional[str]:
    """Bound MLflow's HTTP retries, then the one-line error for a tracking server that does not answer."""
    bound_http_retries()
    silent = why_silent(uri)
    if silent is None:
        return None
    where = f"{ENV} (set in this environment)" if os.environ.get(ENV) else "--mlflow.tracking_uri"
    return f"tracking server {uri} does not answer ({silent}); start it, or choose another store with {where}"


def is_unreachable(err: BaseException) -> bool:
    """Whether a failed MLflow call failed because the server could not be reached (connection refused or
    reset, timed out, or only transient-failure statuses after MLflow's retries), as opposed to a server
    that answered and refused the request."""
    import requests
    import urllib3

    unreachable = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                   requests.exceptions.RetryError, urllib3.exceptions.MaxRetryError,
                   urllib3.exceptions.ProtocolError, ConnectionError, TimeoutError)
    return any(isinstance(e, unreachable) for e in causes(err))


def reason(err: BaseException, timeout: Optional[float] = None) -> str:
    """A few words for why a request got no answer: ``connection refused``, ``no answer within 5 s``, ..."""
    import requests

    chain = list(causes(err))
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in str(err):
        return "connection refused"
    if any(isinstance(e, (requests.exceptions.Timeout, TimeoutError)) for e in chain):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if "Name or service not known" in str(err) or "nodename nor servname" in str(err):
        return "host name not found"
    if any(isinstance(e, requests.exceptions.RetryError) for e in chain):
        return "only error statuses after retries"
    if is_unreachable(err):  # reset, broken pipe, aborted: it was there, and went
        return "connection lost"
    return type(err).__name__


def causes(err: Optional[BaseException]) -> Iterator[BaseException]:
    """``err`` and every exception it was raised from or while handling, or that it wraps (MLflow wraps the
    requests error, requests and urllib3 the error they met). Each once, however the chain loops back."""
    seen: set[int] = set()  # one for the whole walk: a wrapped error may also be the cause, or wrap its wrapper

    def walk(err: Optional[BaseException]) -> Iterator[BaseException]:
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            yield err
            for arg in getattr(err, "args", ()):  # requests and urllib3 keep the error they wrap as an argument
                if isinstance(arg, BaseException):
                    yield from walk(arg)
            reason_ = getattr(err, "reason", None)  # and as MaxRetryError.reason
            if isinstance(reason_, BaseException):
                yield from walk(reason_)
            err = err.__cause__ or err.__context__

    return walk(err)
