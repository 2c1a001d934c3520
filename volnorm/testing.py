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
