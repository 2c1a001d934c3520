"""volnorm deletes or replaces only what its own marker proves it wrote, inside the output
the user named. Each case below is a careless or hostile name, or a folder volnorm did not
create placed where volnorm writes; each must fail clearly and leave every byte untouched
(a snapshot of names, sizes and hashes before and after)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

import volnorm as vn
from volnorm.cli import main
from volnorm.testing import snapshot


def _victim(where: Path) -> Path:
    """A user's folder that merely looks like a zarr store (it holds a zarr.json)."""
    where.mkdir(parents=True)
    (where / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (where / "precious.txt").write_text("years of work")
    (where / "sub").mkdir()
    (where / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    return where


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    files = vn.datasets.make_cohort(d / "nii", n_subjects=3, shape=(16, 18, 14), seed=5)
    out = d / "c.zarr"
    vn.convert(files, out, scheduler="sync")
    return out


@pytest.fixture
def store(small_store, tmp_path) -> Path:
    dst = tmp_path / "work" / "c.zarr"
    shutil.copytree(small_store, dst)
    return dst


def _stack(store: Path) -> xr.DataArray:
    return vn.open_zarr(store)


@pytest.mark.parametrize("name", ["../../victim.zarr", "../victim.zarr", "..", ".", "a/b", ".hidden", "a\\b", ""])
def test_voxel_histogram_name_outside_the_store_is_refused(store, tmp_path, name):
    _victim(tmp_path / "victim.zarr")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="plain name|non-empty"):
        vn.accumulate(store, _stack(store), bins=4, range=(0, 2000), name=name)
    assert snapshot(tmp_path) == before


def test_absolute_voxel_histogram_name_is_refused(store, tmp_path):
    victim = _victim(tmp_path / "victim.zarr")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="plain name"):
        vn.accumulate(store, _stack(store), bins=4, range=(0, 2000), name=str(victim))
    assert main(["voxel-hist", str(store), "--bins", "4", "--range", "0,2000", "--name", str(victim)]) == 1
    assert snapshot(tmp_path) == before


def test_voxel_histogram_named_like_a_volume_is_refused(store):
    before = snapshot(store)
    with pytest.raises(ValueError, match="already has a volume"):
        vn.accumulate(store, _stack(store), bins=4, range=(0, 2000), name="sub-001")
    assert snapshot(store) == before
    assert vn.verify(store).ok and vn.open_zarr(store).sizes["volume"] == 3


def test_a_folder_volnorm_did_not_create_is_never_replaced(store):
    notes = store / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    before = snapshot(store)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a volnorm per-voxel histogram"):
            vn.accumulate(store, _stack(store), bins=4, range=(0, 2000), name="notes", overwrite=overwrite)
        assert snapshot(store) == before


def test_overwrite_replaces_a_histogram_only_once_the_new_one_is_complete(store, monkeypatch):
    x = _stack(store)
    h1 = vn.accumulate(store, x, bins=4, range=(0, 2000)).values
    before = snapshot(store)
    import volnorm.voxel as voxel

    def boom(*a, **k):
        raise RuntimeError("killed while counting")

    monkeypatch.setattr(voxel, "compute", boom)
    with pytest.raises(RuntimeError, match="killed"):
        vn.accumulate(store, x.isel(volume=[0]), bins=8, range=(0, 1000), overwrite=True)
    assert snapshot(store) == before  # the previous histogram, byte for byte; no staging left
    monkeypatch.undo()
    np.testing.assert_array_equal(vn.open_voxel_histogram(store).values, h1)
    h2 = vn.accumulate(store, x.isel(volume=[0]), bins=8, range=(0, 1000), overwrite=True)
    assert h2.sizes["bin"] == 8 and h2.attrs["n_volumes"] == 1
    assert vn.verify(store).ok


def test_user_folders_named_like_volnorm_leftovers_are_kept(store, tmp_path):
    """``.NAME.old-*`` / ``.NAME.partial-*`` (accumulate's) and ``.NAME.volnorm-old`` (commit's)
    are removed only when volnorm's marker is inside."""
    x = _stack(store)
    vn.accumulate(store, x, bins=4, range=(0, 2000))
    for leftover in (".voxel_histogram.old-1234abcd", ".voxel_histogram.partial-1234abcd"):
        (store / leftover).mkdir()
        (store / leftover / "keep.txt").write_text("mine")
    before = {k: v for k, v in snapshot(store).items() if k.startswith(".voxel_histogram.")}
    vn.accumulate(store, x, bins=4, range=(0, 2000), overwrite=True)
    after = {k: v for k, v in snapshot(store).items() if k.startswith(".voxel_histogram.")}
    assert after == before

    # a user's folder where commit would park the old store during --overwrite
    parked = store.parent / f".{store.name}.volnorm-old"
    parked.mkdir()
    (parked / "keep.txt").write_text("mine")
    files = sorted((tmp_path / "nii2").glob("*")) or vn.datasets.make_cohort(tmp_path / "nii2", n_subjects=2, shape=(8, 8, 8))
    before = snapshot(store.parent)
    with pytest.raises(FileExistsError, match="volnorm did not create"):
        vn.convert(files, store, scheduler="sync", overwrite=True)
    after = snapshot(store.parent)
    assert {k: v for k, v in after.items() if not k.startswith(f".{store.name}.volnorm-partial")} == before


def test_a_failed_runs_staging_never_blocks_the_corrected_command(tmp_path, monkeypatch):
    """An interrupted conversion of other inputs is volnorm's own staging: the corrected
    command replaces it (the plan's digest decides what is reused), no --overwrite needed."""
    a = vn.datasets.make_cohort(tmp_path / "a", n_subjects=2, shape=(8, 9, 10), seed=1)
    b = vn.datasets.make_cohort(tmp_path / "b", n_subjects=3, shape=(8, 9, 10), seed=2)
    out = tmp_path / "out.zarr"
    from volnorm.io.store import Staging

    def interrupted(self, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(Staging, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vn.convert(a, out, scheduler="sync")
    assert (tmp_path / ".out.zarr.volnorm-partial").is_dir() and not out.exists()
    monkeypatch.undo()
    res = vn.convert(b, out, scheduler="sync")
    assert len(res.volumes) == 3 and not (tmp_path / ".out.zarr.volnorm-partial").exists()
    assert vn.verify(out).ok


def _spec(tmp_path: Path, files: list[Path], **hist) -> Path:
    spec = {
        "version": 1,
        "input": {"nifti": [str(f) for f in files]},
        "steps": [{"rescale": {"percentiles": [1, 99]}}],
        "output": {"store": str(tmp_path / "out" / "norm.zarr")},
        "outputs": {"voxel_histogram": {"bins": 4, "range": [0, 1], **hist}},
        "engine": {"scheduler": "threads"},
    }
    (tmp_path / "out").mkdir(exist_ok=True)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", ["../../victim.zarr", "ABSOLUTE", "sub/x"])
def test_a_spec_cannot_name_a_voxel_histogram_outside_its_store(tmp_path, capsys, name):
    files = vn.datasets.make_cohort(tmp_path / "nii", n_subjects=2, shape=(8, 9, 10))
    victim = _victim(tmp_path / "victim.zarr")
    spec = _spec(tmp_path, files, name=str(victim) if name == "ABSOLUTE" else name)
    before = snapshot(tmp_path)
    assert main(["run", str(spec), "--dry-run"]) == 1
    assert "outputs.voxel_histogram.name" in capsys.readouterr().err
    assert main(["run", str(spec)]) == 1
    assert snapshot(tmp_path) == before


def test_a_spec_cannot_name_its_voxel_histogram_after_a_volume(tmp_path, capsys):
    files = vn.datasets.make_cohort(tmp_path / "nii", n_subjects=2, shape=(8, 9, 10))
    spec = _spec(tmp_path, files, name="sub-001")
    before = snapshot(tmp_path)
    assert main(["run", str(spec), "--dry-run"]) == 1
    assert "sub-001" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_overwrite_that_fails_at_the_last_rename_keeps_the_old_store(store, tmp_path, monkeypatch):
    files = vn.datasets.make_cohort(tmp_path / "new", n_subjects=2, shape=(8, 8, 8))
    before = snapshot(store)
    import volnorm.io.store as st

    real = st.os.replace

    def fail_into_place(src, dst):
        if Path(src).name.endswith(".volnorm-partial"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(st.os, "replace", fail_into_place)
    with pytest.raises(OSError):
        vn.convert(files, store, scheduler="sync", overwrite=True)
    assert snapshot(store) == before and vn.verify(store).ok


def test_convert_refuses_a_plain_remote_scheduler_before_writing(tmp_path):
    files = vn.datasets.make_cohort(tmp_path / "nii", n_subjects=1, shape=(8, 8, 8))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="not encrypted"):
        vn.convert(files, tmp_path / "x.zarr", scheduler="tcp://192.0.2.1:8786")
    assert snapshot(tmp_path) == before
