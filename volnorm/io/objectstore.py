"""The commit protocol on object storage, where nothing can be renamed.

On disk a store is written into a hidden staging directory and renamed into place
(:class:`volnorm.io.store.Staging`). An object store has no rename, so a store at a URL is
written **in place, under its final prefix**:

1. its root ``zarr.json`` is written first, with the manifest saying ``complete: false``
   (readers refuse the store from then on, exactly as they refuse a staging directory);
2. every chunk is written; an S3 ``PUT`` is atomic (an object is there whole or not at
   all), so there are no torn chunks and no temporaries; each volume is marked complete in
   the manifest after its chunks are confirmed written, so a killed run resumes from there;
3. the arrays are listed (every chunk present, :func:`volnorm.integrity.seal`), then the
   manifest with ``complete: true`` is written **last**.

``overwrite`` replaces only a store whose manifest says volnorm wrote it: its root is first
rewritten as incomplete, then its objects are deleted, then the new store is written (there
is no moment when a reader would take a half-replaced store for a complete one; there is one
when neither the old nor the new store can be read).

**The lock** is an object beside the store, ``.<name>.volnorm-lock`` under the same parent
prefix, holding the owner's host, pid, a random token and a lease end. It is created with a
conditional write (``If-None-Match: *``), so of two writers exactly one gets it where the
server supports conditional writes (AWS S3 since 2024, SeaweedFS, MinIO); a running writer
renews its lease every :data:`LEASE_SECONDS` / 4. **Stale-lock rule:** a lock whose lease
ended more than :data:`LEASE_SECONDS` ago, or whose owner is a dead process on this host, is
taken over (the takeover is logged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from volnorm.integrity import seal
from volnorm.io.location import Remote, location
from volnorm.io.manifest import FORMAT, FORMAT_VERSION, IncompleteStoreError, read_manifest
from volnorm.io.store import Staging, digest, now, pid_alive, versions

logger = logging.getLogger(__name__)

#: how long a lock stays valid without renewal (a writer renews it every quarter of this)
LEASE_SECONDS = 120.0


class RemoteStaging(Staging):
    """:class:`~volnorm.io.store.Staging` for a store at an object-store URL: written in place,
    the completion marker last, a leased lock object beside it (module docstring).

    Same interface as :class:`~volnorm.io.store.Staging`: :meth:`prepare`, :meth:`store`,
    :meth:`manifest`, :meth:`update_manifest`, :meth:`commit`, :meth:`release`; ``path`` is the
    final :class:`~volnorm.io.location.Remote` (there is no separate staging place).
    """

    def __post_init__(self) -> None:
        final = location(self.final)
        if not isinstance(final, Remote):
            raise TypeError(f"{self.final}: RemoteStaging is for URLs; use Staging for local paths")
        self.final = final
        self.path = final
        self.plan_digest = digest(self.plan)
        self.resumed = False
        self._lock: LeaseLock | None = None

    def store(self, read_only: bool = False) -> Any:
        return self.final.zarr_store(read_only=read_only)

    # -- checks --------------------------------------------------------------

    def check_output(self) -> None:
        final = self.final
        if not final.writable:
            raise ValueError(f"{final}: {final.scheme}:// is read-only; write the store to s3://, gs://, az:// or a local path")
        for p in self.inputs:
            src = str(p).rstrip("/")
            if src == final.url or src.startswith(final.url + "/"):
                raise ValueError(f"{final}: the output would overwrite or contain the input {p}")
        final.check_bucket()
        if not final.is_prefix():
            return
        m = read_manifest(final)
        if m is None:
            raise FileExistsError(f"{final}: objects exist under this prefix and volnorm did not write them; "
                                  "volnorm never deletes them. Choose another output URL.")
        if m.get("complete") and not self.overwrite:
            raise FileExistsError(f"{final}: a complete volnorm store already exists; pass overwrite=True (CLI: --overwrite) to replace it.")

    # -- the lock ------------------------------------------------------------

    @property
    def lock_path(self) -> Remote:  # type: ignore[override]
        return self.final.parent / f".{self.final.name}.volnorm-lock"

    def _acquire(self) -> None:
        if self._lock is None:
            self._lock = LeaseLock(self.lock_path, str(self.final))
        self._lock.acquire()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # -- writing -------------------------------------------------------------

    def _prepare(self, root_attrs: dict | None) -> "RemoteStaging":
        import zarr

        m = read_manifest(self.final) if self.final.is_prefix() else None
        if m is not None and not m.get("complete") and m.get("plan_digest") == self.plan_digest:
            self.resumed = True
            logger.info("resuming the interrupted run written at %s", self.final)
            return self
        if m is not None:  # volnorm's: an interrupted run of another plan, or overwrite=True of a complete store
            if m.get("complete"):  # readers refuse it from now on, before any object goes
                zarr.open_group(self.store(), mode="r+", zarr_format=3).attrs["volnorm"] = {**m, "complete": False, "replacing": True}
            logger.warning("%s: deleting the %s volnorm store there", self.final, "complete" if m.get("complete") else "interrupted")
            self.final.remove_tree()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, "plan_digest": self.plan_digest,
                    "started": now(), "kind": self.plan.get("kind")}
        if isinstance(self.plan.get("names"), list):
            manifest["volumes"] = list(self.plan["names"])
        zarr.open_group(self.store(), mode="w", zarr_format=3, attributes={**(root_attrs or {}), "volnorm": manifest})
        return self

    @contextlib.contextmanager
    def named_errors(self) -> Iterator[None]:
        """An error of the object store while writing (a server gone, a timeout, access
        denied) is re-raised naming this store's URL and saying that nothing was committed."""
        try:
            yield
        except (IncompleteStoreError, FileExistsError):
            raise
        except OSError as e:
            if self.final.url in str(e):
                raise
            raise type(e)(f"{self.final}: the object store failed while writing ({e or type(e).__name__}); nothing was "
                          "committed: run the same command again to resume") from e

    def manifest(self) -> dict:
        return read_manifest(self.final) or {}

    def update_manifest(self, **kv: Any) -> None:
        import zarr

        root = zarr.open_group(self.store(), mode="r+", zarr_format=3)
        root.attrs["volnorm"] = {**dict(root.attrs.get("volnorm", {})), **kv}

    def commit(self, manifest: dict) -> None:
        """Check every chunk is there, then write the manifest with ``complete: true`` last."""
        import zarr

        arrays = seal(self.final)
        root = zarr.open_group(self.store(), mode="r+", zarr_format=3)
        m = {**dict(root.attrs.get("volnorm", {})), **manifest}
        m.pop("replacing", None)
        m.update(format=FORMAT, format_version=FORMAT_VERSION, plan_digest=self.plan_digest, finished=now(),
                 versions=versions(), arrays=arrays, complete=True)
        root.attrs["volnorm"] = m
        self.release()
        logger.info("committed %s", self.final)


class LeaseLock:
    """A lock object at ``lock`` (a :class:`~volnorm.io.location.Remote`) with a lease, for one
    writer of ``what`` across hosts (module docstring: conditional create, renewal every
    :data:`LEASE_SECONDS` / 4 on a thread, the stale-lock rule). Also a context manager.

    Examples
    --------
    >>> with LeaseLock(Remote("s3://bucket/.h.volnorm-lock"), "s3://bucket/h"):   # doctest: +SKIP
    ...     pass   # only this process writes s3://bucket/h here
    """

    def __init__(self, lock: Remote, what: str) -> None:
        self.lock, self.what = lock, what
        self._token = secrets.token_hex(8)
        self._started = now()  # kept by the lease renewals
        self._locked = False
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self._token, "started": self._started,
                           "lease_until": time.time() + LEASE_SECONDS}).encode()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FileExistsError` naming the holder."""
        lock = self.lock
        for _ in range(3):
            try:
                lock.write_bytes(self._body(), exclusive=True)
            except FileExistsError:
                try:
                    other = json.loads(lock.read_bytes())
                except (OSError, ValueError):
                    other = {}
                if _stale(other):
                    logger.warning("%s: taking over a stale lock (%s)", self.what, {k: other.get(k) for k in ("host", "pid", "started")})
                    lock.unlink(missing_ok=True)
                    continue
                raise FileExistsError(
                    f"{self.what}: another volnorm run (pid {other.get('pid')} on {other.get('host')}, started "
                    f"{other.get('started')}) is writing this output; wait for it to finish, or delete {lock} if that "
                    f"run is dead (a lock whose lease ended {LEASE_SECONDS:.0f} s ago is taken over by itself)."
                ) from None
            self._locked = True
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew, name="volnorm-lock-lease", daemon=True)
            self._renewer.start()
            return
        raise FileExistsError(f"{lock}: could not take the lock")

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                self.lock.write_bytes(self._body())
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried; the run goes on
                logger.warning("%s: could not renew the lock's lease: %s", self.what, e)

    def release(self) -> None:
        """Stop renewing and delete the lock object if it is still this one's."""
        if not self._locked:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        try:
            mine = json.loads(self.lock.read_bytes()).get("token") == self._token
        except (OSError, ValueError):
            mine = False
        if mine:
            self.lock.unlink(missing_ok=True)
        self._locked = False


def _stale(lock: dict) -> bool:
    """A lock nobody holds any more: its lease ended :data:`LEASE_SECONDS` ago or more, or its
    owner is a dead process on this host (an unreadable lock is not stale: a writer may be
    creating it)."""
    until = lock.get("lease_until")
    if isinstance(until, (int, float)) and time.time() > until + LEASE_SECONDS:
        return True
    return lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int) and not pid_alive(lock["pid"])


def staging_for(final: Any, plan: dict, *, overwrite: bool = False, inputs: Sequence[Any] = (),
                storage_options: dict | None = None) -> Staging:
    """The commit protocol for an output: :class:`~volnorm.io.store.Staging` (a local path,
    staged and renamed) or :class:`RemoteStaging` (a URL, written in place)."""
    where = location(final, storage_options)
    if isinstance(where, Remote):
        return RemoteStaging(where, plan, overwrite=overwrite, inputs=inputs)
    return Staging(where, plan, overwrite=overwrite, inputs=inputs)
