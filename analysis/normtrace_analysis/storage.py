"""Runs on object storage (``s3://…``, ``gs://…``, ``abfs://…``): listing, ``meta.json`` and shard
footers are read through pyarrow's file systems, and the rows are scanned by Polars with the same
``storage_options``, so a remote run loads as lazily as a local one and keeps the same checks (shard
names, footers, required columns, no glob expansion of shard paths).

``storage_options`` are Polars' (``pl.scan_ipc(..., storage_options=...)``, object_store's keys such as
``aws_endpoint_url``, ``aws_access_key_id``, ``aws_region``, ``aws_allow_http``); for S3 the same keys
configure pyarrow's ``S3FileSystem``. Without them both use the standard credential chains
(environment variables, ``~/.aws``, instance metadata). Other schemes go through
``pyarrow.fs.FileSystem.from_uri`` with its default credentials, or pass ``filesystem=`` to ``load``.
"""

from __future__ import annotations

import fnmatch
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

import pyarrow.fs as pafs

from .errors import RunNotFoundError

T = TypeVar("T")
R = TypeVar("R")

StorageOptions = Mapping[str, Any]

_WORKERS = 16
"""Requests in flight while loading remote runs: each shard footer is a request, and their latency, not
their size, is what a load of many remote shards waits for."""


def is_url(path: object) -> TypeGuard[str]:
    """Whether ``path`` names a location on a remote file system (``scheme://…``, not ``file://``)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


@dataclass(frozen=True)
class _Stat:
    st_size: int


class ObjectPath:
    """A file or folder of a remote file system, with the part of ``pathlib.Path`` that loading uses.

    ``str()`` is the URL Polars scans; there is deliberately no ``__fspath__``: this is not a local path,
    and a local file named after it (``./s3:/…``) is the mistake this class exists to avoid.
    """

    __slots__ = ("_info", "fs", "key", "scheme")

    def __init__(self, fs: pafs.FileSystem, scheme: str, key: str, info: pafs.FileInfo | None = None) -> None:
        self.fs = fs
        self.scheme = scheme
        self.key = key.rstrip("/")
        self._info = info

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.fs, self.scheme, f"{self.key}/{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.fs, self.scheme, self.key.rsplit("/", 1)[0])

    def resolve(self) -> ObjectPath:
        return self

    def is_relative_to(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self == other or str(self).startswith(f"{other}/"))

    def _file_info(self) -> pafs.FileInfo:
        if self._info is None:
            self._info = self.fs.get_file_info(self.key)
        return self._info

    def _type(self) -> pafs.FileType:
        return self._file_info().type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def stat(self) -> _Stat:
        info = self._file_info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"no such object: {self}")
        return _Stat(int(info.size or 0))

    def iterdir(self) -> list[ObjectPath]:
        """The folder's entries (one listing request; their types and sizes come with it)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True))
        return [ObjectPath(self.fs, self.scheme, i.path, i) for i in infos]

    def glob(self, pattern: str) -> list[ObjectPath]:
        """Entries matching ``pattern``, one ``fnmatch`` pattern per path component (``*/meta.json``)."""
        found = [self]
        for part in pattern.split("/"):
            found = [e for f in found if f.is_dir() for e in f.iterdir() if fnmatch.fnmatchcase(e.name, part)]
        return found

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open_input_file(self) -> Any:
        """A random-access file (reads are range requests): opening a large shard's footer reads the footer."""
        return self.fs.open_input_file(self.key)


def filesystem(url: str, storage_options: StorageOptions | None) -> tuple[pafs.FileSystem, str, str]:
    """``(file system, scheme, key)`` for ``url``; S3 is configured from Polars-style ``storage_options``."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme in ("s3", "s3a"):
        return _s3(storage_options or {}), scheme, rest
    try:
        fs, key = pafs.FileSystem.from_uri(url)
    except (ValueError, OSError) as exc:
        raise RunNotFoundError(
            f"cannot open {url}: {exc}; pass load(..., filesystem=<a pyarrow.fs.FileSystem>) for this storage",
            url,
        ) from exc
    return fs, scheme, key


_S3_KEYS = {
    "access_key_id": "access_key",
    "secret_access_key": "secret_key",
    "session_token": "session_token",
    "token": "session_token",
    "region": "region",
    "default_region": "region",
    "endpoint": "endpoint_override",
    "endpoint_url": "endpoint_override",
}


def _s3(options: StorageOptions) -> pafs.S3FileSystem:
    """pyarrow's S3 client configured from object_store's option names (with or without ``aws_``)."""
    kwargs: dict[str, Any] = {}
    allow_http = False
    for key, value in options.items():
        name = key.lower().removeprefix("aws_")
        if name in _S3_KEYS:
            kwargs[_S3_KEYS[name]] = str(value)
        elif name == "allow_http":
            allow_http = str(value).lower() in ("1", "true", "yes")
        elif name == "skip_signature" and str(value).lower() in ("1", "true", "yes"):
            kwargs["anonymous"] = True
    endpoint = kwargs.get("endpoint_override")
    if endpoint:
        parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
        if parsed.scheme == "http" and not allow_http:
            raise ValueError(
                f"storage_options: the endpoint {endpoint} is plain http; add 'aws_allow_http': 'true' "
                "(Polars refuses http endpoints without it too)"
            )
    return pafs.S3FileSystem(**kwargs)


def expand(
    url: str, storage_options: StorageOptions | None, fs: pafs.FileSystem | None = None
) -> list[ObjectPath]:
    """The run folders ``url`` names: itself, or the folders its glob components (``*?[``) match."""
    found_fs, scheme, key = (
        filesystem(url, storage_options)
        if fs is None
        else (fs, url.partition("://")[0], url.partition("://")[2])
    )
    parts = key.strip("/").split("/")
    magic = [i for i, p in enumerate(parts) if any(c in p for c in "*?[")]
    if not magic:
        run = ObjectPath(found_fs, scheme, key)
        if not run.is_dir():
            raise RunNotFoundError(f"run directory not found: {url}", url)
        return [run]
    base = ObjectPath(found_fs, scheme, "/".join(parts[: magic[0]]))
    matches = sorted((m for m in base.glob("/".join(parts[magic[0] :])) if m.is_dir()), key=str)
    if not matches:
        raise RunNotFoundError(f"no run directory matches {url!r}", url)
    return matches


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` with requests in flight together (remote listings and footers)."""
    items = list(items)
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(_WORKERS, len(items))) as pool:
        return list(pool.map(fn, items))
