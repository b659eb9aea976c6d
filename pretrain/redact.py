"""Strip credentials from URIs before they are logged (MLflow params, messages) or written (YAML).

A URI carries secrets in two places: ``user:password@`` before the host and the query string
(``?X-Amz-Signature=...`` of a signed URL, ``?token=...``). Both go; the fragment goes too, since
some schemes put tokens there. MLflow's own convention keeps credentials out of the URI altogether:
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``_TOKEN``) in the environment.
"""
from __future__ import annotations

import re
from typing import Any

# \S+ rather than a strict URI grammar: a password holding an unencoded quote or bracket must not
# end the match early and leave its tail in the text.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_QUERY = re.compile(r"[?#]")


def redact_uri(uri: str) -> str:
    """``https://user:pw@host/p?sig=x#t`` -> ``https://host/p``; text without ``://`` is returned as is."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    # The authority ends at the first "/", not at "?" or "#": an unencoded "?" or "#" in a password
    # would otherwise end the host early and leave the password's tail in the result.
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return _QUERY.split(f"{scheme}://{host}{slash}{path}", maxsplit=1)[0]


def redact(value: Any) -> Any:
    """``value`` with every URI inside it redacted: strings (also free text holding URIs), and the
    strings within lists, tuples and dicts (keys untouched); anything else is returned unchanged."""
    if isinstance(value, str):
        return _URI.sub(lambda m: redact_uri(m.group(0)), value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
