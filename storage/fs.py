"""URIs and file systems: one code path for local folders and ``s3://`` prefixes (fsspec/s3fs).

Every artifact lives under a root URI. ``StorageOptions`` carries what s3fs needs (endpoint,
credentials); it is a plain dict so it travels to Ray workers inside job configs. The endpoint
can also come from the environment (``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import socket
import tempfile
import uuid
from typing import Any

import fsspec
import psutil

from storage.redaction import redact, strict

StorageOptions = dict[str, Any]


def protocol(uri: str) -> str:
    """``"s3"`` for ``s3://…``, ``"file"`` for local paths."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def s3_options(options: StorageOptions | None = None) -> StorageOptions:
    """s3fs keyword arguments: explicit options win, then the environment's endpoint."""
    opts = dict(options or {})
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in opts.get("client_kwargs", {}):
        opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system for ``uri`` and the path inside it (no ``s3://``; local absolute)."""
    proto = protocol(uri)
    if proto == "file":
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(path)
    if proto == "s3":
        fs = fsspec.filesystem("s3", **s3_options(options))
        return fs, uri[len("s3://") :]
    return fsspec.filesystem(proto, **(options or {})), uri.split("://", 1)[1]


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (POSIX separators for remote URIs)."""
    if protocol(uri) == "file":
        return os.path.join(uri, *parts)
    return posixpath.join(uri, *parts)


def canonical(uri: str) -> str:
    """One spelling per location: local paths absolute and normalised (``file://`` dropped), URIs as given."""
    if protocol(uri) != "file":
        return uri
    return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)


def is_inside(uri: str, root: str) -> bool:
    """True when ``uri`` names a location under ``root`` (both local, or both under one URI prefix)."""
    a, b = canonical(uri), canonical(root).rstrip("/")
    if protocol(uri) == "file" and protocol(root) == "file":
        a, b = os.path.realpath(a), os.path.realpath(b)
    return a.startswith(b + ("/" if protocol(root) != "file" else os.sep))


def relative_link(target: str, page_folder: str) -> str:
    """How a page in ``page_folder`` links to ``target``: a relative path when both live under one file system
    (one local tree, or one bucket), so the link resolves wherever the folder is opened or copied; else the URI."""
    if protocol(target) == "file" and protocol(page_folder) == "file":
        return os.path.relpath(canonical(target), canonical(page_folder)).replace(os.sep, "/")
    if protocol(target) == protocol(page_folder) and target.split("/")[2:3] == page_folder.split("/")[2:3]:
        return posixpath.relpath(target.split("://", 1)[1], page_folder.split("://", 1)[1].rstrip("/"))
    return target


def is_absolute(uri: str) -> bool:
    return "://" in uri or os.path.isabs(uri)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole file. Local paths must be regular files (a FIFO or device would block the reader)."""
    fs, path = filesystem(uri, options)
    if protocol(uri) == "file" and os.path.exists(path) and not os.path.isfile(path):
        raise (IsADirectoryError if os.path.isdir(path) else OSError)(f"{path} is not a regular file")
    with fs.open(path, "rb") as f:
        return f.read()


S3_PART = 50 * 2**20  # multipart upload part size


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` so that readers never see a partial file.

    Local: write a temporary sibling, then ``os.replace`` (atomic rename). S3: one PUT, or above
    ``S3_PART`` · 2 bytes a multipart upload that is completed only when every part is in and
    aborted on any failure (``pipe_file``), so an interrupted upload leaves no object.
    """
    fs, path = filesystem(uri, options)
    if protocol(uri) == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=temp_prefix())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts and reports are for others to read too
            os.replace(tmp, path)
        except BaseException:  # an interrupted write (SIGINT, SIGTERM, a full disk) leaves no temporary
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(path, data, chunksize=S3_PART)


def temp_prefix() -> str:
    """Name prefix of this process's temporary files: ``.tmp-<host>-<pid>-`` (see :func:`sweep_temporaries`)."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}-"


def sweep_temporaries(uri: str) -> int:
    """Remove the temporary files a killed writer on this host left in local folder ``uri`` (those of
    processes that no longer run; a live writer's are kept); returns how many. S3 writes leave none."""
    if protocol(uri) != "file" or not os.path.isdir(path := filesystem(uri)[1]):
        return 0
    host, removed = socket.gethostname(), 0
    for name in os.listdir(path):
        if not name.startswith(f".tmp-{host}-"):
            continue
        pid = name[len(f".tmp-{host}-") :].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, name))
                removed += 1
    return removed


def dumps(obj: Any, **kwargs: Any) -> str:
    """``obj`` as strict JSON with every credential redacted (:mod:`storage.redaction`): what jobs write and print."""
    data = json.loads(json.dumps(obj, default=str))  # numpy scalars, paths… as JSON sees them
    return json.dumps(strict(redact(data)), allow_nan=False, **kwargs)


def write_json(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    write_bytes(uri, dumps(obj, indent=2, sort_keys=True).encode(), options)


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, options))


def read_yaml(uri: str, options: StorageOptions | None = None) -> Any:
    """A YAML file (local or URI), parsed safely (plain data only)."""
    import yaml

    return yaml.safe_load(read_bytes(uri, options))


def read_many(uris: list[str], options: StorageOptions | None = None) -> list[bytes]:
    """The bytes of many small files under one file system, fetched concurrently where the file
    system can (s3fs batches the GETs); in the order given."""
    if not uris:
        return []
    fs, _ = filesystem(uris[0], options)
    paths = [filesystem(u, options)[1] for u in uris]
    data = fs.cat(paths)
    return [data[p] for p in paths]


def listdir(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Base names under ``uri`` (empty when it does not exist)."""
    fs, path = filesystem(uri, options)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if protocol(uri) == "s3" else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(uri: str, options: StorageOptions | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def local_copy(uri: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> str:
    """A local path holding ``uri``'s bytes: the path itself when local, else a cached download.

    Used to memory-map remote index files. The cache key is the URI plus its size and ETag/mtime,
    so a rewritten object is fetched again.
    """
    if protocol(uri) == "file":
        return filesystem(uri)[1]
    fs, path = filesystem(uri, options)
    info = fs.info(path)
    key = hashlib.sha1(
        f"{uri}|{info.get('size')}|{info.get('ETag', info.get('LastModified', ''))}".encode()
    ).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "retrieval-cache")
    os.makedirs(cache_dir, exist_ok=True)
    local = os.path.join(cache_dir, f"{key}-{posixpath.basename(path)}")
    if not os.path.exists(local):
        tmp = f"{local}.{uuid.uuid4().hex}"
        fs.get(path, tmp)
        os.replace(tmp, local)
    return local


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or during (each once, nearest first)."""
    seen: list[BaseException] = []
    while e is not None and all(e is not s for s in seen) and len(seen) < 20:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def storage_failure(e: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) when ``e`` is storage failing the job, None otherwise: credentials that are
    missing or refused are the user's to fix (2); an endpoint that cannot be reached is the machine's (1)."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - s3fs brings botocore
        return None
    for err in _chain(e):
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return 2, (
                f"storage: {first} (give credentials through the environment, e.g. AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, or --set storage.key=… --set storage.secret=…)"
            )
        if isinstance(err, PermissionError):
            return 2, f"storage refused access: {first}"
        if isinstance(
            err, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError, ConnectionRefusedError)
        ):
            return 1, f"storage cannot be reached: {first}"
    return None
