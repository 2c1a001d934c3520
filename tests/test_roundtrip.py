"""NIfTI -> Zarr -> NIfTI: bit-identical data (raw and scaled), identical affine and header."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import volnorm as vn


def _file_bytes(p):
    return gzip.open(p).read() if str(p).endswith(".gz") else open(p, "rb").read()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from conftest import NIBABEL_FILES
    from nibabel.testing import data_path

    out = tmp_path_factory.mktemp("rt") / "nib.zarr"
    res = vn.convert([f"{data_path}/{f}" for f in NIBABEL_FILES], out, scheduler="sync", progress=False)
    return out, res


def test_convert_roundtrip_every_nibabel_file(converted, nib_file, tmp_path):
    store, _ = converted
    name = nib_file.name.split(".")[0]
    img = nib.load(nib_file)
    tree = vn.open_zarr(store)
    vol = tree[name]["image"]
    np.testing.assert_array_equal(vol.values, np.asarray(img.dataobj).T)
    assert vol.dtype == np.asarray(img.dataobj).dtype.newbyteorder("=")
    raw = vn.open_zarr(store, scaled=False)[name]["image"]
    np.testing.assert_array_equal(raw.values, img.dataobj.get_unscaled().T)
    assert raw.dtype == img.get_data_dtype().newbyteorder("=")
    np.testing.assert_array_equal(np.asarray(vol.attrs["affine"]), img.affine)

    out = tmp_path / nib_file.name
    vn.to_nifti(vol, out)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
    np.testing.assert_array_equal(back.dataobj.get_unscaled(), img.dataobj.get_unscaled())
    np.testing.assert_array_equal(back.affine, img.affine)
    assert back.header.get_data_dtype() == img.header.get_data_dtype()
    # the whole file, header and extensions included, is byte for byte the original
    assert _file_bytes(out) == _file_bytes(nib_file)


def test_stores_open_in_nifti_zarr(converted, nib_file, tmp_path):
    niizarr = pytest.importorskip("niizarr")
    store, _ = converted
    name = nib_file.name.split(".")[0]
    ref = nib.load(nib_file)
    img = niizarr.zarr2nii(str(store / name))
    np.testing.assert_array_equal(np.asarray(img.dataobj), ref.dataobj.get_unscaled())
    np.testing.assert_array_equal(img.header.get_best_affine(), ref.affine)
    # the stored header keeps the scaling that zarr2nii itself drops
    import zarr

    hdr_bytes = np.asarray(zarr.open_group(store / name, mode="r")["nifti"][:]).tobytes()
    hdr = type(ref.header).from_fileobj(__import__("io").BytesIO(hdr_bytes + b"\0" * 4), check=False)
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    assert (slope if slope else 1.0, inter if slope else 0.0) == (ref.dataobj.slope, ref.dataobj.inter)
    ome = zarr.open_group(store / name, mode="r").attrs["ome"]
    assert ome["version"] == "0.5"
    names = [a["name"] for a in ome["multiscales"][0]["axes"]]
    assert names == list(vn.open_zarr(store)[name]["image"].dims)


def test_open_zarr_stack_equals_open_nifti(cohort, tmp_path):
    stack = vn.open_nifti(cohort)
    vn.to_zarr(stack, tmp_path / "c.zarr")
    back = vn.open_zarr(tmp_path / "c.zarr")
    assert isinstance(back, xr.DataArray)
    xr.testing.assert_identical(back.drop_vars("path", errors="ignore").reset_coords(drop=True),
                                stack.drop_vars("path").reset_coords(drop=True).assign_attrs(back.attrs))
    # convert gives the same data as to_zarr of the lazy stack
    vn.convert(cohort, tmp_path / "c2.zarr", scheduler="sync")
    xr.testing.assert_equal(vn.open_zarr(tmp_path / "c2.zarr"), back)


def test_to_zarr_of_changed_data_drops_scaling(tmp_path):
    f = vn.datasets.nibabel_files()["functional.nii"]
    stack = vn.open_nifti(f)
    doubled = stack * 2.0  # arithmetic drops attrs (xarray default)
    doubled.attrs = {k: v for k, v in stack.attrs.items() if k != "nifti_scaled"}
    vn.to_zarr(doubled, tmp_path / "d.zarr")
    back = vn.open_zarr(tmp_path / "d.zarr")
    np.testing.assert_array_equal(back.values, doubled.values)
    out = vn.to_nifti(back, tmp_path / "d.nii")[0]
    img = nib.load(out)
    np.testing.assert_array_equal(np.asarray(img.dataobj), doubled.values[0].T)
    np.testing.assert_array_equal(img.affine, nib.load(f).affine)


def test_changed_data_with_stale_scaling_attr_is_refused(tmp_path):
    f = vn.datasets.nibabel_files()["functional.nii"]
    stack = vn.open_nifti(f)
    bad = (stack + 0.001).assign_attrs(stack.attrs)  # values changed, attrs claim raw*slope+inter
    with pytest.raises(ValueError, match="no longer equal raw"):
        vn.to_nifti(bad, tmp_path / "bad.nii")
    assert not (tmp_path / "bad.nii").exists()


def test_to_nifti_stack_writes_one_file_per_volume(cohort, tmp_path):
    stack = vn.open_nifti(cohort)
    files = vn.to_nifti(stack, tmp_path / "out")
    assert [p.name for p in files] == [f"{v}.nii.gz" for v in stack["volume"].values]
    for src, dst in zip(cohort, files):
        assert _file_bytes(src) == _file_bytes(dst)
    with pytest.raises(FileExistsError, match="exists"):
        vn.to_nifti(stack, tmp_path / "out")


@pytest.mark.parametrize("kind", ["npy", "tiff", "png"])
def test_image_stacks(tmp_path, kind):
    stack = vn.datasets.make_image_stack(7, (40, 52), seed=3)
    if kind == "npy":
        np.save(tmp_path / "s.npy", stack)
        src = tmp_path / "s.npy"
    elif kind == "tiff":
        import tifffile

        tifffile.imwrite(tmp_path / "s.tif", stack)
        src = tmp_path / "s.tif"
    else:
        import imageio.v3 as iio

        for i, im in enumerate(stack):
            iio.imwrite(tmp_path / f"img{i:02d}.png", im)
        src = str(tmp_path / "img*.png")
    data = vn.open_images(src, chunks={"volume": 3})
    assert data.dims == ("volume", "y", "x") and data.chunks[0] == (3, 3, 1)
    np.testing.assert_array_equal(data.values, stack)
    vn.convert(src, tmp_path / "s.zarr", scheduler="sync")
    back = vn.open_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(back.values, stack)
    assert back.dims == ("volume", "y", "x")
    assert list(back["volume"].values) == list(data["volume"].values)


def test_manifest_digest_is_the_files_blake3(cohort, tmp_path):
    from blake3 import blake3

    vn.convert(cohort[:2], tmp_path / "c.zarr", scheduler="sync")
    m = vn.io.store.read_manifest(tmp_path / "c.zarr")
    for entry, path in zip(m["inputs"], cohort[:2]):
        assert entry["blake3"] == blake3(path.read_bytes()).hexdigest()
        assert entry["size"] == path.stat().st_size


def test_big_endian_multi_slab_convert(tmp_path):
    """Several slabs per file, big-endian, 4-D: the prefetching reader keeps order and bytes."""
    rng = np.random.default_rng(5)
    data = rng.integers(-3000, 3000, (20, 18, 16, 3), dtype=np.int16)
    img = nib.Nifti1Image(data, np.diag([1.0, 1.2, 1.4, 1.0]))
    img.header.set_data_dtype(">i2")
    p = tmp_path / "be.nii.gz"
    nib.save(img, p)
    vn.convert(p, tmp_path / "be.zarr", chunks=(1, 3, 18, 20), scheduler="sync")
    import zarr

    a = zarr.open_array(tmp_path / "be.zarr" / "be" / "0", mode="r")
    assert a.chunks == (1, 3, 18, 20)
    np.testing.assert_array_equal(a[:], data.T)


@pytest.mark.parametrize("how", ["convert", "to_zarr"])
def test_all_zero_chunks_are_written_and_verified(tmp_path, how):
    """Zero slices (padding, masked scans) make all-zero chunks; they must still be stored."""
    data = np.zeros((10, 12, 8), np.int16)
    data[:, :, 3] = 7
    p = tmp_path / "zeros.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)
    out = tmp_path / "z.zarr"
    if how == "convert":
        vn.convert(p, out, chunks={"z": 1}, scheduler="sync")
    else:
        vn.to_zarr(vn.open_nifti(p, chunks={"z": 1}), out)
    import zarr

    a = zarr.open_array(out / "zeros" / "0", mode="r")
    assert a.nchunks == 8 and a.nchunks_initialized == 8
    np.testing.assert_array_equal(a[:], data.T)


def test_a_task_run_twice_rewrites_the_same_group(cohort, tmp_path):
    from volnorm.io.nifti import read_info
    from volnorm.io.niftizarr import ingest_nifti
    from volnorm.io.store import Staging

    info = read_info(cohort[0])
    staging = Staging(tmp_path / "x.zarr", {"p": 1}).prepare()
    import zarr

    root = zarr.open_group(staging.path, mode="r+")
    chunks = (20, 48, 40)
    first = ingest_nifti(info, str(staging.path), "s", chunks, "lz4")
    # pretend the first copy had not marked the volume yet, then run it again
    v = dict(root["s"].attrs["volnorm"]); v["complete"] = False; root["s"].attrs["volnorm"] = v
    second = ingest_nifti(info, str(staging.path), "s", chunks, "lz4")
    assert first == second
    staging.release()


def test_collection_to_zarr_and_back(nib_paths, tmp_path):
    tree = vn.open_nifti(nib_paths)
    vn.to_zarr(tree, tmp_path / "t.zarr")
    back = vn.open_zarr(tmp_path / "t.zarr")
    assert set(back.children) == set(tree.children)
    for name in tree.children:
        a, b = tree[name]["image"], back[name]["image"]
        assert a.dims == b.dims and a.dtype == b.dtype
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.attrs["affine"], b.attrs["affine"])
