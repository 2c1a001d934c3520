"""Reading NIfTI: validated headers, lazy views bit-identical to nibabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import volnorm as vn
from volnorm.io.nifti import NiftiArray, read_info


def test_read_info_matches_nibabel(nib_file):
    info = read_info(nib_file)
    img = nib.load(nib_file)
    assert info.shape == img.shape
    assert info.raw_dtype == img.get_data_dtype()
    np.testing.assert_array_equal(info.affine, img.affine)
    assert info.scaled_dtype == np.asarray(img.dataobj).dtype.newbyteorder("=")
    assert info.header_bytes[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")


@pytest.mark.parametrize("scaled", [True, False])
def test_view_equals_nibabel(nib_file, scaled):
    img = nib.load(nib_file)
    ref = np.asarray(img.dataobj) if scaled else img.dataobj.get_unscaled()
    view = NiftiArray(read_info(nib_file), scaled=scaled)
    got = view[(slice(None),) * view.ndim]
    assert got.dtype == view.dtype == ref.dtype.newbyteorder("=")
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, ref.T)
    # a slab in the slowest axis and an odd sub-box read the same bits
    np.testing.assert_array_equal(view[1:2], ref.T[1:2])
    box = tuple(slice(s // 3, max(s // 3 + 1, s - 1)) for s in view.shape)
    np.testing.assert_array_equal(view[box], ref.T[box])


def test_open_nifti_scaled_is_nibabel():
    f = vn.datasets.nibabel_files()["functional.nii"]
    stack = vn.open_nifti(f)
    assert stack.dims == ("volume", "t", "z", "y", "x")
    ref = np.asarray(nib.load(f).dataobj)
    assert stack.dtype == ref.dtype
    np.testing.assert_array_equal(stack.values[0], ref.T)
    raw = vn.open_nifti(f, scaled=False)
    assert raw.dtype == np.int16
    assert raw.attrs["nifti_scaled"] is False


@pytest.mark.parametrize("chunks", [None, {"z": 7}, (1, 5, 9, 11), 1])
def test_chunking_does_not_change_values(chunks):
    f = vn.datasets.nibabel_files()["anatomical.nii"]
    ref = np.asarray(nib.load(f).dataobj).T
    stack = vn.open_nifti(f, chunks=chunks)
    np.testing.assert_array_equal(stack.values[0], ref)


def test_gzip_slabs_read_in_any_order():
    f = vn.datasets.nibabel_files()["example4d.nii.gz"]
    ref = np.asarray(nib.load(f).dataobj).T
    stack = vn.open_nifti(f, chunks={"t": 1, "z": 5})
    assert len(stack.chunks[2]) == 5
    # reverse order forces backward seeks through the indexed_gzip handle
    for z in reversed(range(0, 24, 5)):
        np.testing.assert_array_equal(stack[0, :, z : z + 5].values, ref[:, z : z + 5])


def test_stack_and_collection(nib_paths, cohort):
    stack = vn.open_nifti(cohort)
    assert stack.sizes["volume"] == 6
    assert list(stack["volume"].values) == [p.name.split(".")[0] for p in cohort]
    assert "affine" not in stack.attrs or len(stack.attrs["affine"]) == 4
    tree = vn.open_nifti(nib_paths)
    assert isinstance(tree, vn.open_nifti.__globals__["xr"].DataTree)
    assert set(tree.children) == {p.name.split(".")[0] for p in nib_paths}
    assert tree["functional"]["image"].dims == ("t", "z", "y", "x")


def test_same_basename_in_two_folders(tmp_path):
    f = vn.datasets.nibabel_files()["anatomical.nii"]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "anatomical.nii").write_bytes(f.read_bytes())
    stack = vn.open_nifti(sorted(tmp_path.glob("*/anatomical.nii")))
    assert list(stack["volume"].values) == ["a_anatomical", "b_anatomical"]
