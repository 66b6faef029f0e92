"""The query service's requests and answers (``retrieval serve``, :mod:`jobs.serve`): ``POST /search`` with a JSON
body ``{"queries": [file or URI, …], "topk": K}``, answered ``{"results": [{"query", "files", "scores"}, …]}`` in query
order, or an HTTP status with ``{"error": one line}``. Pure: no Ray, no I/O."""

from __future__ import annotations

import json
import sys
import typing

from storage.errors import InputError
from storage.fs import is_absolute

KEYS = ("queries", "topk")  # a request body's keys, both required


class RequestError(InputError, ValueError):
    """A request the service answers with HTTP 400 and this one line."""


def parse_request(body: bytes, max_queries: int = 64, max_bytes: int = 2**20) -> tuple[list[str], int]:
    """The queries and ``topk`` of a ``POST /search`` body; a :class:`RequestError` (one line) when malformed."""
    if len(body) > max_bytes:
        raise RequestError(f"the body is {len(body)} bytes; at most {max_bytes} are taken")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"the body is not JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise RequestError('the body must be a JSON object {"queries": [file or URI, …], "topk": K}')
    unknown = sorted(set(data) - set(KEYS))
    missing = [k for k in KEYS if k not in data]
    if unknown or missing:
        said = [f"unknown key(s) {unknown}"] * bool(unknown) + [f"missing key(s) {missing}"] * bool(missing)
        raise RequestError(f"{'; '.join(said)}; the body takes exactly {list(KEYS)}")
    queries, topk = data["queries"], data["topk"]
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise RequestError(f"topk must be an integer >= 1, got {json.dumps(topk)[:50]}")
    if not isinstance(queries, list) or not queries:
        raise RequestError("queries must be a non-empty list of image files or URIs")
    if len(queries) > max_queries:
        raise RequestError(f"{len(queries)} queries; at most {max_queries} per request")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip() or "\0" in q or not is_absolute(q):
            raise RequestError(f"queries[{i}] must be an absolute file path or a URI, got {json.dumps(q)[:80]}")
    return queries, min(topk, 2**31 - 1)


def _no_constant(name: str) -> typing.NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def error_line(e: BaseException) -> str:
    """``e`` as one line (its first non-blank line, at most 300 characters)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return first[:300]


class Engine(typing.Protocol):
    def search(self, queries: list[str], topk: int) -> list[dict]: ...


def respond(
    engine: Engine, method: str, path: str, body: bytes, max_queries: int = 64, max_bytes: int = 2**20
) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one request: 200 and the results, 400 for a bad request (``error``: one line),
    404 / 405 for another path or method, 500 (one line, the traceback on the replica's stderr) for a bug."""
    if path.rstrip("/") != "/search":
        return 404, {"error": f"no such endpoint {path[:100]!r}; POST /search"}
    if method != "POST":
        return 405, {"error": f"{method} /search: use POST"}
    try:
        queries, topk = parse_request(body, max_queries, max_bytes)
        return 200, {"results": engine.search(queries, topk)}
    except InputError as e:
        return 400, {"error": error_line(e)}
    except Exception as e:  # noqa: BLE001 - the replica keeps serving; the traceback goes to its log
        import traceback

        traceback.print_exc(file=sys.stderr)
        return 500, {"error": f"internal error: {type(e).__name__}: {error_line(e)}"}
