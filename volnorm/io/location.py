"""Where data lives: local paths, and object-store URLs (``s3://``, ``gs://``, ``az://``,
``https://``) through fsspec.

A URL is held as a :class:`Remote`: the URL (never its credentials) and the fsspec
``storage_options`` that reach it. Credentials come the way the ecosystem does it: the
standard AWS environment variables and config/profile files (botocore reads them, with
``AWS_ENDPOINT_URL`` for S3-compatible servers), ``storage_options={"anon": True}`` for public
buckets, or explicit ``storage_options`` (``key``, ``secret``, ``client_kwargs``...). A
:class:`Remote`'s ``repr`` and ``str`` show the URL only, so secrets in ``storage_options``
never reach a message, a log or a store's provenance.

Tested against a real S3-compatible server (SeaweedFS); other fsspec schemes go through the
same code, untested here.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.*)$")
_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")
#: schemes volnorm reads but never writes
READ_ONLY_SCHEMES = ("http", "https")


def is_url(where: Any) -> bool:
    """Whether ``where`` is an object-store URL (a ``str`` with a scheme other than ``file``).

    >>> is_url("s3://bucket/cohort.zarr"), is_url("/data/cohort.zarr"), is_url("file:///data/x.zarr")
    (True, False, False)
    """
    if isinstance(where, Remote):
        return True
    if not isinstance(where, str):
        return False
    m = _URL.match(where)
    return m is not None and m["scheme"].lower() != "file"


def redact(url: str) -> str:
    """``url`` without a ``user:password@`` part (what messages and provenance show).

    >>> redact("s3://KEY:SECRET@bucket/x.zarr")
    's3://bucket/x.zarr'
    """
    return _USERINFO.sub(r"\g<scheme>", url)


@dataclass(frozen=True)
class Remote:
    """An object in (or a prefix of) an object store: ``url`` plus the fsspec ``storage_options``.

    Path-like where volnorm needs it: ``/`` joins, :attr:`name`, :attr:`parent`, :meth:`exists`,
    :meth:`read_bytes` / :meth:`write_bytes`. Picklable (workers rebuild the filesystem from the
    options; fsspec caches one per options).

    Examples
    --------
    >>> r = Remote("s3://bucket/study/anat.zarr", {"anon": True})
    >>> str(r / "sub-01" / "zarr.json"), r.name, str(r.parent)
    ('s3://bucket/study/anat.zarr/sub-01/zarr.json', 'anat.zarr', 's3://bucket/study')
    >>> r
    Remote('s3://bucket/study/anat.zarr')
    """

    url: str
    storage_options: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        m = _URL.match(self.url)
        if m is None:
            raise ValueError(f"{self.url!r} is not a URL")
        object.__setattr__(self, "url", redact(self.url).rstrip("/"))

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, other: str) -> "Remote":
        return Remote(f"{self.url}/{str(other).strip('/')}", self.storage_options)

    def absolute(self) -> "Remote":
        return self

    def resolve(self) -> "Remote":
        return self

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Remote":
        head = self.url.rsplit("/", 1)[0]
        return Remote(head if "://" in head and head.split("://", 1)[1] else self.url, self.storage_options)

    @property
    def writable(self) -> bool:
        return self.scheme not in READ_ONLY_SCHEMES

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (cached by fsspec per options)."""
        import fsspec

        return fsspec.filesystem(self.scheme, **self.storage_options)

    @property
    def path(self) -> str:
        """The filesystem's path for this URL (``bucket/key`` for s3)."""
        return self.fs._strip_protocol(self.url)

    def check_bucket(self) -> None:
        """Raise, naming this URL, when its bucket is missing or the credentials cannot list it."""
        bucket = self.path.split("/", 1)[0]
        try:
            self.fs.ls(bucket, detail=False, refresh=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: the bucket {bucket!r} does not exist (create it first)") from None
        except PermissionError as e:
            raise PermissionError(f"{self.url}: access denied ({e}); check the credentials "
                                  "(AWS_ACCESS_KEY_ID / AWS_PROFILE / storage_options)") from None

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_prefix(self) -> bool:
        """Whether any object lies under this URL as a prefix (objects only: SeaweedFS keeps
        and lists the empty "folders" of deleted objects, which a listing by delimiter took for
        objects, refusing to write where a deleted store had been)."""
        self.fs.invalidate_cache(self.path)
        try:
            found = self.fs.find(self.path, withdirs=False, detail=True)
            return any(info.get("type") != "directory" for info in found.values())
        except (FileNotFoundError, NotADirectoryError):
            return False

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes, *, exclusive: bool = False) -> None:
        """Write an object; ``exclusive``: only if none is there (a conditional write,
        ``If-None-Match: *``), else :class:`FileExistsError`."""
        if not exclusive:
            self.fs.pipe_file(self.path, data)
            return
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except Exception as e:  # noqa: BLE001 - s3fs raises botocore's ClientError for 412
            text = str(e).lower()
            if isinstance(e, FileExistsError) or any(w in text for w in ("precondition", "pre-condition", "412")):
                raise FileExistsError(f"{self.url}: exists") from None
            raise

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        """Delete every object under this prefix."""
        try:
            self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def zarr_store(self, *, read_only: bool = True) -> Any:
        """A zarr v3 store over this prefix (zarr's ``FsspecStore``)."""
        from zarr.storage import FsspecStore

        if not read_only and not self.writable:
            raise ValueError(f"{self.url}: {self.scheme}:// is read-only; write to s3://, gs://, az:// or a local path")
        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)


def _close_sessions() -> None:
    """At exit, close the sessions of the async s3fs filesystems zarr's stores used (made with
    ``asynchronous=True``, they have no finalizer: aiohttp printed "Unclosed client session"
    from every worker process that had read a store), on zarr's loop where they were made."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is None:
        return
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(fs, "_s3", None)
        if not getattr(fs, "asynchronous", False) or client is None:
            continue
        try:
            sync(client.close(), timeout=5)
        except Exception:  # noqa: BLE001 - the loop may be gone at exit: nothing more to do
            pass


atexit.register(_close_sessions)


def location(where: Any, storage_options: dict | None = None) -> Path | Remote:
    """A local :class:`~pathlib.Path` or a :class:`Remote` for a path, URL or :class:`Remote`.

    ``storage_options`` for a local path is an error (it would be silently ignored).

    >>> location("/data/cohort.zarr")
    PosixPath('/data/cohort.zarr')
    >>> location("s3://bucket/cohort.zarr", {"anon": True})
    Remote('s3://bucket/cohort.zarr')
    """
    if isinstance(where, Remote):
        return where if storage_options is None else Remote(where.url, storage_options)
    if is_url(where):
        return Remote(where, dict(storage_options or {}))
    if storage_options:
        raise ValueError(f"{where}: storage_options are for URLs (s3://...), not local paths")
    if isinstance(where, str) and where.startswith("file://"):
        where = where[len("file://"):]
    return Path(os.fspath(where))


def zarr_target(where: Path | Remote, *, read_only: bool = True) -> Any:
    """What ``zarr.open_group`` takes for a place: a local path as is, a URL's zarr store."""
    return where.zarr_store(read_only=read_only) if isinstance(where, Remote) else where


def glob(pattern: str, storage_options: dict | None = None) -> list[Remote]:
    """The objects matching a URL glob (``s3://bucket/cohort/*.nii.gz``), sorted, by listing.

    A URL without a wildcard is returned as is if it exists, or as the objects under it when it
    is a prefix.
    """
    r = Remote(pattern, dict(storage_options or {}))
    fs = r.fs
    scheme = r.scheme
    if any(c in r.path for c in "*?["):
        found = fs.glob(r.path)
    elif fs.isdir(r.path):
        found = [p for p in fs.ls(r.path, detail=False)]
    elif fs.exists(r.path):
        found = [r.path]
    else:
        found = []
    # s3fs lists bucket/key; fsspec's HTTP filesystem lists whole URLs
    return [Remote(p if "://" in p else f"{scheme}://{p}", r.storage_options) for p in sorted(found)]
