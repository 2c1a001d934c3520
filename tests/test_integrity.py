"""A damaged store is an error naming the chunk, never a number.

Each store kind volnorm writes (a NIfTI-Zarr cohort from ``volnorm convert``, a per-voxel
histogram group inside a store, an image-stack store) is damaged one chunk at a time
(deleted, truncated, one byte flipped); every command that reads that chunk must fail
naming it, and ``volnorm verify`` must name it too. Nothing here may pass by reading fill
values or a corrupted number.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm.cli import main
from volnorm.integrity import DamagedStoreError, partial_files, verify
from volnorm.testing import snapshot

DAMAGES = ["delete", "truncate", "flip"]


def _damage(chunk: Path, how: str) -> None:
    data = chunk.read_bytes()
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:  # one bit in the middle of the compressed payload
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        chunk.write_bytes(bytes(b))


def _chunks(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


def _key(store: Path, chunk: Path) -> str:
    return chunk.relative_to(store).as_posix()


def _fails_naming(capsys, key: str, *argv: str) -> str:
    """Run the CLI in-process: exit code 1 and ``key`` (the chunk) in what it printed."""
    assert main(list(argv)) == 1
    out = capsys.readouterr()
    assert key in out.out + out.err, out.out + out.err
    return out.out + out.err


# ---------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    files = vn.datasets.make_cohort(d / "nii", n_subjects=3, shape=(24, 28, 20), compressed="mixed", seed=3)
    out = d / "c.zarr"
    assert main(["convert", *map(str, files), str(out), "--scheduler", "sync", "--no-progress"]) == 0
    vn.accumulate(out, vn.open_zarr(out), bins=8, range=(0, 2000))
    return out


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    from skimage import data

    cam = data.camera()[::4, ::4]  # (128, 128) uint8
    stack = xr.DataArray(np.stack([np.roll(cam, 7 * i, axis=1) for i in range(12)]), dims=("volume", "y", "x"))
    out = tmp_path_factory.mktemp("images") / "imgs.zarr"
    vn.to_zarr(stack.chunk({"volume": 4}), out)
    return out


@pytest.fixture
def fresh(tmp_path):
    def copy(store: Path) -> Path:
        dst = tmp_path / store.name
        shutil.copytree(store, dst)
        return dst

    return copy


def test_pristine_stores_verify_and_carry_checksums(cohort_store, image_store):
    for store in (cohort_store, image_store):
        r = verify(store)
        assert r.ok, str(r)
        assert r.checked == r.chunks == r.checksums > 0
        m = vn.io.store.read_manifest(store)
        assert set(m["arrays"]) <= {name for name, _ in vn.integrity._arrays(__import__("zarr").open_group(store, mode="r"))}
        assert partial_files(store) == []
    # every array of the cohort (voxels, headers, the voxel histogram's counts and coords) checksummed
    for meta in cohort_store.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            assert any(c["name"] == "crc32c" for c in doc["codecs"]), meta


# ---------------------------------------------------------------------------
# the NIfTI-Zarr cohort
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("which", ["voxels", "header"])
def test_damaged_cohort_chunk_fails_every_reader(cohort_store, fresh, tmp_path, capsys, how, which):
    store = fresh(cohort_store)
    array = store / "sub-002" / ("0" if which == "voxels" else "nifti")
    chunk = _chunks(array)[0]
    key = _key(store, chunk)
    _damage(chunk, how)
    before = snapshot(store)

    with pytest.raises(DamagedStoreError, match=key):
        vn.open_zarr(store).compute()
    _fails_naming(capsys, key, "stats", str(store), "--scheduler", "threads")
    _fails_naming(capsys, key, "export", str(store), str(tmp_path / "back"))
    assert "DAMAGED" in _fails_naming(capsys, key, "verify", str(store), "--no-progress")
    assert snapshot(store) == before  # reading never repairs or rewrites anything


def test_info_says_damaged_when_a_chunk_is_missing(cohort_store, fresh, capsys):
    store = fresh(cohort_store)
    assert main(["info", str(store)]) == 0
    assert "state       complete" in capsys.readouterr().out
    _damage(_chunks(store / "sub-001" / "0")[0], "delete")
    assert main(["info", str(store)]) == 0
    text = capsys.readouterr().out
    assert "DAMAGED" in text and "sub-001/0" in text and "state       complete" not in text
    assert main(["info", str(store), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["damaged"] is True and facts["missing_chunks"] == {"sub-001/0": 1}


def test_damage_on_a_distributed_cluster_names_the_chunk(cohort_store, fresh, cluster_client):
    store = fresh(cohort_store)
    chunk = _chunks(store / "sub-003" / "0")[0]
    _damage(chunk, "flip")
    with pytest.raises(DamagedStoreError, match=_key(store, chunk)):
        cluster_client.compute(vn.open_zarr(store).sum().data).result()


def test_verify_checks_sources_and_notices_a_missing_array(cohort_store, fresh):
    store = fresh(cohort_store)
    r = verify(store)
    assert r.ok and set(r.sources.values()) == {"matches"} and len(r.sources) == 3
    shutil.rmtree(store / "sub-001" / "nifti")
    r = verify(store, sources=False)
    assert not r.ok and any("sub-001/nifti: the array is missing" in d for d in r.damaged)


def test_a_zarr_temporary_never_survives_a_commit(cohort_store, tmp_path, monkeypatch):
    """zarr writes each chunk to ``<key>.<uuid>.partial`` then renames it: a killed task
    leaves one. A resumed run removes them before the store is committed."""
    files = sorted((cohort_store.parent / "nii").iterdir())
    out = tmp_path / "c.zarr"
    from volnorm.io.store import Staging

    real_commit = Staging.commit

    def leave_a_temporary(self, manifest):
        (self.path / "sub-001" / "0" / "c" / f"0.{'ab' * 16}.partial").write_bytes(b"\0" * 64)
        return real_commit(self, manifest)

    monkeypatch.setattr(Staging, "commit", leave_a_temporary)
    vn.convert(files, out, scheduler="sync")
    assert partial_files(out) == [] and verify(out).ok


# ---------------------------------------------------------------------------
# the per-voxel histogram group
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_voxel_histogram_chunk_fails_its_readers(cohort_store, fresh, tmp_path, capsys, how):
    store = fresh(cohort_store)
    chunk = _chunks(store / "voxel_histogram" / "counts")[0]
    key = _key(store / "voxel_histogram", chunk)
    _damage(chunk, how)
    with pytest.raises(DamagedStoreError, match=key):
        vn.open_voxel_histogram(store).compute()
    new = sorted((cohort_store.parent / "nii").iterdir())[0]
    _fails_naming(capsys, key, "normative", str(store), str(new), "--out", str(tmp_path / "ranks.nii.gz"), "--scheduler", "threads")
    assert not (tmp_path / "ranks.nii.gz").exists()
    _fails_naming(capsys, f"voxel_histogram/{key}", "verify", str(store), "--no-progress")


# ---------------------------------------------------------------------------
# the image-stack store
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_image_stack_chunk_fails_every_reader(image_store, fresh, tmp_path, capsys, how):
    store = fresh(image_store)
    chunks = _chunks(store / "image")
    assert len(chunks) == 3
    chunk = chunks[1]
    key = _key(store, chunk)
    _damage(chunk, how)
    with pytest.raises(DamagedStoreError, match=key):
        vn.open_zarr(store).compute()
    # the other chunks still read: the damage is local and named, not a store-wide refusal
    np.testing.assert_array_equal(vn.open_zarr(store)[:4].values, vn.open_zarr(image_store)[:4].values)
    _fails_naming(capsys, key, "stats", str(store), "--scheduler", "threads")
    _fails_naming(capsys, key, "export", str(store), str(tmp_path / "back"))
    _fails_naming(capsys, key, "verify", str(store), "--no-progress")


def test_stores_written_before_checksums_still_open(tmp_path):
    """A store without the crc32c codec (volnorm before checksums) opens and reads; a missing
    chunk is still an error; info says 'no checksums'."""
    import zarr

    from volnorm.io.store import compressors

    stack = xr.DataArray(np.arange(2 * 8 * 8, dtype="uint16").reshape(2, 8, 8), dims=("volume", "y", "x"))
    out = tmp_path / "old.zarr"
    vn.to_zarr(stack, out)
    # rewrite the image array the old way: blosc only, same values
    g = zarr.open_group(out, mode="r+")
    values = g["image"][...]
    attrs = dict(g["image"].attrs)
    del g["image"]
    a = g.create_array("image", shape=values.shape, chunks=(1, 8, 8), dtype=values.dtype, compressors=compressors("lz4", checksum=False),
                       dimension_names=["volume", "y", "x"], attributes=attrs, config={"write_empty_chunks": True})
    a[...] = values
    np.testing.assert_array_equal(vn.open_zarr(out).values, stack.values)
    r = verify(out)
    assert r.ok and r.checksums < r.chunks
    (out / "image" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(DamagedStoreError, match="image/c/1/0/0"):
        vn.open_zarr(out).compute()


def test_checked_store_pickles_for_workers(image_store):
    import pickle

    from volnorm.integrity import checked_store

    s = pickle.loads(pickle.dumps(checked_store(image_store)))
    assert s.where == os.fspath(image_store)
    x = vn.open_zarr(image_store)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(x.data)).compute(), x.values)


def test_the_crc32c_codec_is_zarrs_format_and_still_checks_outside_volnorm(image_store, fresh):
    """volnorm's crc32c implementation writes zarr's bytes (a plain zarr Crc32cCodec decodes
    them) and, for reads that do not go through CheckedStore, verifies as zarr does."""
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.codecs import Crc32cCodec as ZarrCrc32c

    from volnorm.integrity import Crc32cCodec

    store = fresh(image_store)
    chunk = _chunks(store / "image")[0]
    raw = np.frombuffer(chunk.read_bytes(), np.uint8)
    assert zarr.registry.get_codec_class("crc32c") is Crc32cCodec
    assert ZarrCrc32c()._decode_sync.__func__ is not Crc32cCodec._decode_single  # zarr's own, unchanged
    import google_crc32c

    assert np.uint32(google_crc32c.value(raw[:-4].tobytes())).tobytes() == raw[-4:].tobytes()
    meta = json.loads((store / "image" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-2:] == ["blosc", "crc32c"]
    assert isinstance(BloscCodec, type)
    _damage(chunk, "flip")
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(store / "image", mode="r")[...]
