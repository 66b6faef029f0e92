"""Secrets never written: credentials are redacted from every record, summary, log line and page.

Storage options carry credentials (``--set storage='{"key": …, "secret": …}'``, s3fs's
``client_kwargs``); job configs carry storage options; records and summaries carry configs. Every
JSON a job writes or prints passes :func:`redact` (through :func:`storage.fs.write_json` and the job
summary), so a credential given on the command line reaches no file. The endpoint stays (it is no
secret) but credentials written into a URL (``https://user:pass@host``) do not.

:func:`strict` makes the same objects strict JSON: NaN and ±infinity (not JSON) become ``null``.
"""

from __future__ import annotations

import math
import re
from typing import Any

REDACTED = "***"
SENSITIVE = re.compile(
    r"(^|[_\-.])(key|secret|token|password|passwd|credentials?|session|signature)(_?id)?$", re.IGNORECASE
)
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)


def is_sensitive(name: str) -> bool:
    """True for a setting that names a credential: ``key``, ``secret``, ``token``, ``aws_secret_access_key``,
    ``aws_access_key_id``, ``aws_session_token``, ``password``…"""
    return bool(SENSITIVE.search(str(name)))


def redact(obj: Any) -> Any:
    """``obj`` with the value of every sensitive key (at any depth) replaced by ``***`` and credentials
    removed from URLs; other values unchanged. Returns new containers, never mutates ``obj``."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_sensitive(k) and v not in (None, "", {}, []) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return URL_USERINFO.sub(r"\g<scheme>***@", obj)
    return obj


def strict(obj: Any) -> Any:
    """``obj`` as strict JSON data: non-finite floats become None (``null``), at any depth."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj
