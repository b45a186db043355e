"""Which tracking store a run writes to, and MLflow's fluent API pointed at it for a while."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
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


# Query parameters whose values are credentials: named like a token, key, secret or password
# (``?token=``, ``api_key=``, ``X-Amz-Signature=``, ``sslpassword=``, ``access_token=``, ...).
_SECRET_NAME = re.compile(r"token|key|secret|passw|pwd|signature|credential|auth", re.IGNORECASE)
MASK = "***"
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:)([^/]*)(@)")


def secrets_of(uri: Optional[str]) -> list[str]:
    """The credentials a URI carries: its password, and the values of query parameters named like a token,
    key, secret or password. Longest first, so that replacing them one after another never leaves a part."""
    if not uri or "://" not in uri:
        return []
    found = []
    try:
        parts = urllib.parse.urlsplit(uri)
        password = parts.password
    except ValueError:  # a malformed port or netloc: the part after ':' and before '@' is still a password
        parts, password = None, None
        match = _USERINFO.match(uri)
        if match:
            password = match.group(2)
    if password:
        found += [password, urllib.parse.unquote(password)]
    query = parts.query if parts is not None else uri.partition("?")[2]
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=False):
        if _SECRET_NAME.search(name) and value:
            found += [value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)]
    return sorted({s for s in found if s and s != MASK}, key=len, reverse=True)


def redact_uri(uri: Optional[str]) -> Optional[str]:
    """``uri`` with its password and credential-like query values replaced by ``***``:
    ``http://u:pw@host:5000/?token=t`` is ``http://u:***@host:5000/?token=***``. Structural, so a password
    that also spells the host name leaves the host alone."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a malformed port or netloc
    except ValueError:  # still a password between the scheme's "//", a ':' and the last '@'
        return _USERINFO.sub(rf"\1{MASK}\3", uri)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_NAME.search(name) and value for name, value in pairs):
            query = "&".join(f"{urllib.parse.quote(name, safe='')}="
                             f"{MASK if _SECRET_NAME.search(name) and value else urllib.parse.quote(value, safe='')}"
                             for name, value in pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # as given: urlunsplit would also rewrite "sqlite:///x" as "sqlite:/x"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: Optional[str], *uris: Optional[str]) -> Optional[str]:
    """``text`` with every credential that ``uris`` carry replaced by ``***`` (see :func:`secrets_of`): for
    messages, logs, configs and files that may quote a URI, whole or in parts. The process's own connection
    is the one place a URI is kept as given."""
    if not text:
        return text
    secrets = {secret for uri in uris for secret in secrets_of(uri)}
    for secret in sorted(secrets, key=len, reverse=True):
        # whole words only: a short password must not eat the letters of everything else
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    return text
