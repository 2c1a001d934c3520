"""Per-voxel histograms stored beside the images and appended subject by subject: the appended
result equals the all-at-once one; inputs counted twice, other grids and other bins are refused;
an interrupted append leaves the stored histogram as it was."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from skimage import data as skdata

import volnorm as vn
from volnorm import voxel


def faces(lo: int, hi: int) -> xr.DataArray:
    f = skdata.lfw_subset()[lo:hi]
    return xr.DataArray(f, dims=("volume", "y", "x"), coords={"volume": [f"face{i:03d}" for i in range(lo, hi)]}).chunk({"volume": 32})


def test_appended_equals_all_at_once_and_widens(tmp_path):
    whole = vn.histogram(faces(0, 200), dim="volume", bins=16, range=(0.0, 1.0)).compute()
    vn.accumulate(tmp_path, faces(0, 70), bins=16, range=(0.0, 1.0))
    vn.accumulate(tmp_path, faces(70, 150))
    h = vn.accumulate(tmp_path, faces(150, 200))
    assert h.dtype == np.uint8 and h.attrs["n_volumes"] == 200
    xr.testing.assert_equal(h.compute().drop_attrs(), whole.drop_attrs())
    assert [i["name"] for i in h.attrs["inputs"]] == [f"face{i:03d}" for i in range(200)]
    assert [e["added"] for e in h.attrs["history"]] == [70, 80, 50] and "volnorm" in h.attrs["history"][0]["versions"]
    # past 255 volumes the counts widen to uint16 (no wrap)
    more = faces(0, 100).assign_coords(volume=[f"again{i:03d}" for i in range(100)])
    h2 = vn.accumulate(tmp_path, more).compute()
    assert h2.dtype == np.uint16 and h2.attrs["n_volumes"] == 300
    np.testing.assert_array_equal(h2.values, whole.values + vn.histogram(faces(0, 100), dim="volume", bins=16, range=(0.0, 1.0)).values)


@pytest.fixture()
def nifti_cohort(tmp_path):
    """nibabel's functional.nii time points as separate int16 NIfTI files (one grid)."""
    img = nib.load(vn.datasets.nibabel_files()["functional.nii"])
    data = np.rint(np.asarray(img.dataobj)).astype(np.int16)
    paths = []
    for t in range(data.shape[-1]):
        p = tmp_path / f"sub-{t:02d}.nii"
        nib.save(nib.Nifti1Image(data[..., t], img.affine), p)
        paths.append(p)
    return img, paths


def test_nifti_inputs_beside_the_images_and_twice_refused(tmp_path, nifti_cohort):
    img, paths = nifti_cohort
    store = tmp_path / "cohort.zarr"
    vn.convert(paths[:12], store)
    h = vn.accumulate(store, paths[:12], range=(0, 3000))  # integers: one bin per value in the range
    assert h.attrs["grid"]["affine"] == np.asarray(img.affine, dtype=np.float64).tolist()
    h = vn.accumulate(store, paths[12:])
    stack = vn.open_nifti(paths)
    np.testing.assert_array_equal(h.values, vn.histogram(stack, dim="volume", range=(0, 3000)).values)
    assert vn.open_zarr(store).sizes["volume"] == 12  # the image store still opens, unchanged
    with pytest.raises(ValueError, match="already counted"):
        vn.accumulate(store, paths[3:5])
    assert vn.open_voxel_histogram(store).attrs["n_volumes"] == len(paths)


def test_other_grid_bins_or_dtype_refused(tmp_path, nifti_cohort):
    img, paths = nifti_cohort
    vn.accumulate(tmp_path, paths[:4], range=(0, 3000))
    data = np.rint(np.asarray(img.dataobj)[..., 0]).astype(np.int16)
    moved = tmp_path / "moved.nii"
    nib.save(nib.Nifti1Image(data, img.affine @ np.diag([2.0, 1.0, 1.0, 1.0])), moved)
    with pytest.raises(ValueError, match="affine differs.*register"):
        vn.accumulate(tmp_path, [moved])
    small = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(data[:-1], img.affine), small)
    with pytest.raises(ValueError, match="grid .* is not the histogram's.*register"):
        vn.accumulate(tmp_path, [small])
    with pytest.raises(ValueError, match="not on one grid"):
        vn.accumulate(tmp_path / "other", [paths[5], small])
    with pytest.raises(ValueError, match="bins"):
        vn.accumulate(tmp_path, paths[4:6], bins=7)
    as_float = vn.open_nifti(paths[6]).astype(np.float32)
    with pytest.raises(ValueError, match="integer values one bin per value"):
        vn.accumulate(tmp_path, as_float)
    with pytest.raises(ValueError, match="range="):
        vn.accumulate(tmp_path / "f", faces(0, 3), bins=4)  # float data: the bins must be fixed at creation


def test_interrupted_append_keeps_the_old_histogram(tmp_path, monkeypatch):
    before = vn.accumulate(tmp_path, faces(0, 40), bins=8, range=(0.0, 1.0)).compute()

    def boom(*a, **k):
        raise KeyboardInterrupt

    from volnorm import voxel

    monkeypatch.setattr(voxel, "compute", boom)  # the count pass (volnorm.engine.compute) is interrupted
    with pytest.raises(KeyboardInterrupt):
        vn.accumulate(tmp_path, faces(40, 60))
    monkeypatch.undo()
    after = vn.open_voxel_histogram(tmp_path).compute()
    xr.testing.assert_identical(after, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voxel_histogram"]  # no staging, no lock left
    h = vn.accumulate(tmp_path, faces(40, 60))  # and the same append then works
    assert h.attrs["n_volumes"] == 60


def test_a_failed_swap_puts_the_previous_version_back(tmp_path, monkeypatch):
    import os

    before = vn.accumulate(tmp_path, faces(0, 10), bins=8, range=(0.0, 1.0)).compute()
    real = os.rename
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new version's rename into place
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="disk full"):
        vn.accumulate(tmp_path, faces(10, 20))
    monkeypatch.undo()
    xr.testing.assert_identical(vn.open_voxel_histogram(tmp_path).compute(), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voxel_histogram"]
    # a kill between the renames leaves only the old version aside: the next call restores it
    (tmp_path / "voxel_histogram").rename(tmp_path / ".voxel_histogram.old-dead")
    assert vn.accumulate(tmp_path, faces(10, 20)).attrs["n_volumes"] == 20


def test_a_second_writer_is_refused(tmp_path):
    vn.accumulate(tmp_path, faces(0, 5), bins=4, range=(0.0, 1.0))
    (tmp_path / ".voxel_histogram.lock").write_text(str(__import__("os").getpid()))  # a live owner
    with pytest.raises(RuntimeError, match="another process"):
        vn.accumulate(tmp_path, faces(5, 8))
    (tmp_path / ".voxel_histogram.lock").write_text("999999999")  # a dead one is taken over
    assert vn.accumulate(tmp_path, faces(5, 8)).attrs["n_volumes"] == 8
    assert voxel.FORMAT == vn.open_voxel_histogram(tmp_path).attrs["format"]
