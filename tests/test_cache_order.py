"""The write pass takes the volumes whose input files are in the page cache first."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import volnorm as vn
from volnorm._utils import cached_fraction
from volnorm.datasets import make_cohort
from volnorm.io import writers

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise(DONTNEED) and mincore as on Linux")


@linux
def test_cached_fraction_follows_the_page_cache(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(4 * 2**20))
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
        dropped = cached_fraction(p)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
        os.pread(fd, 2**20, 0)  # the first quarter read back
        part = cached_fraction(p)
    finally:
        os.close(fd)
    p.read_bytes()
    assert dropped < 0.1
    assert 0.2 <= part <= 0.3
    assert cached_fraction(p) == 1.0


def test_cached_fraction_unknown_is_zero(tmp_path):
    (tmp_path / "empty").touch()
    assert cached_fraction(tmp_path / "empty") == 0.0
    assert cached_fraction(tmp_path / "missing") == 0.0
    assert cached_fraction(tmp_path) == 0.0  # a folder


def test_write_order_is_cached_first_and_the_store_the_same(tmp_path, monkeypatch):
    paths = make_cohort(tmp_path / "in", 5, shape=(12, 10, 8), seed=3)
    data = vn.open_nifti(sorted(paths))
    share = {str(p): s for p, s in zip(sorted(paths), [0.0, 1.0, 0.2, 1.0, 0.5])}
    monkeypatch.setattr(writers, "cached_fraction", lambda p: share[str(p)])
    order: list[str] = []
    real = writers.create_volume_group
    monkeypatch.setattr(writers, "create_volume_group", lambda root, name, **kw: (order.append(name), real(root, name, **kw))[1])
    monkeypatch.setattr(writers, "METADATA_THREADS", 1)  # groups made one after another: their order is the write order
    vn.to_zarr(data, tmp_path / "a.zarr")
    names = list(data["volume"].values)
    assert order == [names[i] for i in (1, 3, 4, 2, 0)]
    monkeypatch.setattr(writers, "cached_fraction", lambda p: 0.0)
    vn.to_zarr(data, tmp_path / "b.zarr")
    a, b = vn.open_zarr(tmp_path / "a.zarr"), vn.open_zarr(tmp_path / "b.zarr")
    assert list(a["volume"].values) == list(b["volume"].values) == names  # the store keeps the cohort's order
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.values, data.values)
