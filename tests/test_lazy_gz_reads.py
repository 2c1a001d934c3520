"""Lazy .nii.gz reads: one task per file decompresses it whole (ISA-L, CRC and length checked),
the chunks are cut from it; the values are nibabel's, nothing is read before compute, and a
damaged file fails at compute time naming the file."""

from __future__ import annotations

import gzip
import os
import shutil
import struct

import dask
import distributed
import nibabel as nib
import numpy as np
import pytest

import volnorm as vn
from volnorm.io import readers
from volnorm.io.nifti import NiftiArray, NiftiError, read_info
from volnorm.testing import raise_if_dask_computes

FILES = vn.datasets.nibabel_files()


def gz_copy(src, dst):
    """``src`` gzip-compressed to ``dst`` (nibabel's shipped .nii files, so that scaled and
    big-endian data come as .nii.gz too)."""
    dst.write_bytes(gzip.compress(src.read_bytes(), mtime=0))
    return dst


@pytest.fixture(scope="module")
def gz_inputs(tmp_path_factory):
    """nibabel's .nii.gz files, gzipped copies of its scaled (functional) and big-endian
    (anatomical, float reoriented) files, and a scaled generated phantom."""
    d = tmp_path_factory.mktemp("gz")
    out = [FILES[n] for n in ("example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz")]
    out += [gz_copy(FILES[n], d / (n + ".gz")) for n in ("functional.nii", "anatomical.nii", "reoriented_anat_moved.nii")]
    out += vn.datasets.make_cohort(d / "cohort", 1, shape=(40, 48, 36), compressed=True, scaled=True, seed=3)
    return out


def whole_keys(x) -> list:
    """The keys of the tasks that decompress a whole file: ``("nifti-<stem>-<token>",)``."""
    return [k for k in dict(x.__dask_graph__()) if isinstance(k, tuple) and len(k) == 1 and k[0].startswith("nifti-")]


@pytest.fixture
def whole_reads(monkeypatch):
    """Counts the whole-file decompressions, by file name."""
    seen: list[str] = []
    orig = NiftiArray._read_whole_gz

    def counting(self):
        seen.append(os.path.basename(self.path))
        return orig(self)

    monkeypatch.setattr(NiftiArray, "_read_whole_gz", counting)
    return seen


CHUNKS = [None, 1, {"z": 5}, {"z": 3, "y": 7, "x": 9}]


@pytest.mark.parametrize("chunks", CHUNKS, ids=["default", "1MiB", "z5", "z3y7x9"])
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "raw"])
def test_values_are_nibabels(gz_inputs, chunks, scaled, whole_reads):
    for f in gz_inputs:
        img = nib.load(f)
        ref = (np.asarray(img.dataobj) if scaled else img.dataobj.get_unscaled()).T
        stack = vn.open_nifti(f, chunks=chunks, scaled=scaled)
        assert len(whole_keys(stack.data)) == 1, f
        got = stack.values[0]
        assert got.dtype == ref.dtype.newbyteorder("=") and got.dtype.isnative, f
        np.testing.assert_array_equal(got, ref, err_msg=str(f))
        if scaled:
            np.testing.assert_array_equal(got.astype(np.float64), img.get_fdata().T, err_msg=str(f))
    assert whole_reads == [f.name for f in gz_inputs]


def test_one_decompression_per_file_and_chunks_as_before(cohort, monkeypatch, whole_reads):
    """A mixed cohort: one whole-file task per .nii.gz (none for a .nii, still read by ranges);
    the chunk keys, chunks and values are those of the ranged reads (``da.from_array``)."""
    gz = [p for p in cohort if p.name.endswith(".gz")]
    assert 0 < len(gz) < len(cohort)
    stack = vn.open_nifti(cohort, chunks={"z": 7, "y": 20})
    assert stack.data.numblocks[1:] == (6, 3, 1)
    keys = whole_keys(stack.data)
    assert sorted(k[0].rsplit("-", 1)[0] for k in keys) == sorted(f"nifti-{p.name[:-7]}" for p in gz)
    h = vn.histogram(stack, dim=("z", "y", "x"))
    assert h.values.sum() == stack.size
    assert sorted(whole_reads) == sorted(p.name for p in gz)  # once each, for 18 chunks each
    values = stack.values
    # deterministic names: opening again gives the same keys
    assert set(dict(vn.open_nifti(cohort, chunks={"z": 7, "y": 20}).data.__dask_graph__())) == set(dict(stack.data.__dask_graph__()))
    whole_reads.clear()
    monkeypatch.setattr(readers, "WHOLE_READ_MAX", 0)  # every .nii.gz over the bound: ranged reads
    ranged = vn.open_nifti(cohort, chunks={"z": 7, "y": 20})
    assert not whole_keys(ranged.data)
    assert ranged.data.chunks == stack.data.chunks
    def chunk_keys(x):
        return {k for k in dict(x.__dask_graph__()) if isinstance(k, tuple) and len(k) > 1}

    assert chunk_keys(stack.data) == chunk_keys(ranged.data)
    np.testing.assert_array_equal(ranged.values, values)
    assert whole_reads == []  # a ranged chunk smaller than the file does not read it whole


def test_nothing_is_read_before_compute(cohort, monkeypatch):
    def boom(self, key):
        raise AssertionError(f"voxel data of {self.path} was read")

    monkeypatch.setattr(NiftiArray, "_read_raw", boom)
    with raise_if_dask_computes():
        stack = vn.open_nifti(cohort, chunks={"z": 9})
        graph = (stack.astype("float32") * 2).mean("volume")
        assert len(whole_keys(stack.data)) == 3
    with pytest.raises(AssertionError, match="voxel data"):
        graph.compute(scheduler="sync")


def _gz_with_isize_of(payload: bytes, cut: int) -> bytes:
    """The first ``cut`` bytes of the gzip stream of ``payload``, then the right ISIZE:
    the trailer check at opening passes, the data are truncated."""
    gz = gzip.compress(payload, mtime=0)
    return gz[:cut] + struct.pack("<I", len(payload) % 2**32)


@pytest.fixture
def phantom(tmp_path):
    (p,) = vn.datasets.make_cohort(tmp_path / "src", 1, shape=(30, 34, 28), seed=5)
    return p


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("crc", r"bad\.nii\.gz: corrupt compressed data .*CRC|bad\.nii\.gz: corrupt compressed data"),
        ("flip", r"bad\.nii\.gz: corrupt compressed data"),
        ("cut", r"bad\.nii\.gz: corrupt compressed data"),
        ("changed", r"bad\.nii\.gz: the file changed on disk since it was opened"),
    ],
)
def test_damaged_file_fails_at_compute_naming_it(tmp_path, phantom, how, match):
    payload = phantom.read_bytes()
    raw = bytearray(gzip.compress(payload, mtime=0))
    p = tmp_path / "bad.nii.gz"
    if how == "crc":
        raw[-8] ^= 0xFF  # the CRC itself: header, data and ISIZE fine
    elif how == "flip":
        raw[len(raw) // 2] ^= 0x10
    elif how == "cut":
        raw = bytearray(_gz_with_isize_of(payload, len(raw) // 2))
    p.write_bytes(bytes(raw))
    read_info(p)  # passes validation: only the read checks the data
    stack = vn.open_nifti(p, chunks={"z": 4})
    if how == "changed":
        p.write_bytes(bytes(raw[:-100]))
    with pytest.raises(NiftiError, match=match):
        vn.histogram(stack).compute(scheduler="sync")


def test_bound_is_kept(tmp_path, phantom, monkeypatch):
    """A volume over the bound keeps the ranged (indexed_gzip) reads; the bound counts the
    scaled copy too."""
    p = gz_copy(phantom, tmp_path / "v.nii.gz")
    view = NiftiArray(read_info(p))
    assert view.whole_read_bytes == read_info(p).data_bytes  # int16, unscaled: one copy
    monkeypatch.setattr(readers, "WHOLE_READ_MAX", view.whole_read_bytes)
    assert len(whole_keys(vn.open_nifti(p).data)) == 1
    monkeypatch.setattr(readers, "WHOLE_READ_MAX", view.whole_read_bytes - 1)
    ranged = vn.open_nifti(p, chunks={"z": 5})
    assert not whole_keys(ranged.data)
    np.testing.assert_array_equal(ranged.values[0], np.asarray(nib.load(phantom).dataobj).T)
    f = read_info(gz_copy(FILES["functional.nii"], tmp_path / "f.nii.gz"))  # int16 scaled to float64
    assert NiftiArray(f).whole_read_bytes == f.data_bytes + np.prod(f.shape) * 8


@pytest.mark.slow
def test_on_a_process_cluster(cluster_client, tmp_path, phantom):
    """The graph pickles to worker processes; the chunks run where their volume is; a damaged
    file's error crosses back naming it."""
    workers = cluster_client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == 2 and all(w.get("pid") != os.getpid() for w in workers.values())
    with cluster_client.as_current():
        limit = readers.whole_read_limit()
    assert limit <= min(int(w["memory_limit"]) for w in workers.values()) // 4 or limit == readers.WHOLE_READ_MAX
    d = tmp_path / "c"
    files = vn.datasets.make_cohort(d, 4, shape=(40, 48, 36), compressed=True, seed=9)
    stack = vn.open_nifti(files, chunks={"z": 6})
    ref = np.stack([np.asarray(nib.load(f).dataobj).T for f in files])
    with dask.config.set(scheduler=cluster_client):
        np.testing.assert_array_equal(stack.values, ref)
        h = vn.histogram(stack)
        np.testing.assert_array_equal(h.values, np.bincount((ref - int(h["bin"][0])).ravel(), minlength=h.sizes["bin"]))
        # each volume is decompressed once, on one worker; its chunks are cut where it is (their
        # only dependency): no chunk moves, and a volume at most once (work stealing balances the
        # end of a run by moving tasks, with the small volumes here; 24 MiB ones stayed put)
        cluster_client.run(lambda dask_worker: dask_worker.transfer_outgoing_log.clear())
        with distributed.get_task_stream(cluster_client) as stream:
            vn.histogram(stack, dim=("z", "y", "x"), range=(0, 2000)).compute()
        ran = [t["key"] for t in stream.data if t["key"] in set(whole_keys(stack.data))]
        assert sorted(ran) == sorted(whole_keys(stack.data))
        logs = cluster_client.run(lambda dask_worker: [list(t["keys"]) for t in dask_worker.transfer_outgoing_log])
        moved = [k for log in logs.values() for keys in log for k in keys if "nifti-" in str(k)]
        assert all(len(k) == 1 for k in moved) and len(moved) == len(set(moved)), moved
        bad = tmp_path / "bad.nii.gz"
        raw = bytearray(gzip.compress(gzip.decompress(files[0].read_bytes()), mtime=0))
        raw[-8] ^= 0xFF
        bad.write_bytes(bytes(raw))
        with pytest.raises(NiftiError, match=r"bad\.nii\.gz: corrupt compressed data"):
            vn.open_nifti([*files[1:], bad], chunks={"z": 6}).max().compute()
    shutil.rmtree(d)


def test_limit_is_a_quarter_of_the_current_clients_worker_memory(monkeypatch):
    class FakeClient:
        def scheduler_info(self, n_workers=-1):
            return {"workers": {"a": {"memory_limit": 2**30}, "b": {"memory_limit": 2**31}, "c": {"memory_limit": 0}}}

    assert readers.whole_read_limit() == readers.WHOLE_READ_MAX  # no client
    monkeypatch.setattr(distributed.Client, "current", classmethod(lambda cls, allow_global=True: FakeClient()))
    assert readers.whole_read_limit() == 2**28
    monkeypatch.setattr(readers, "WHOLE_READ_MAX", 2**20)
    assert readers.whole_read_limit() == 2**20
