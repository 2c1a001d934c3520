"""Tests of volnorm.datasets: shipped sample files, phantoms and cohorts."""

from __future__ import annotations

import doctest
import gzip

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volnorm import datasets
from volnorm.datasets import phantom

SMALL = (48, 56, 48)

# --------------------------------------------------------------------------
# Shipped files
# --------------------------------------------------------------------------


def test_nibabel_files_named_and_loadable() -> None:
    files = datasets.nibabel_files()
    named = {
        "anatomical.nii",
        "functional.nii",
        "example4d.nii.gz",
        "example_nifti2.nii.gz",
        "standard.nii.gz",
        "reoriented_anat_moved.nii",
        "resampled_anat_moved.nii",
    }
    assert named <= set(files)
    assert "row_major.dconn.nii" not in files  # CIFTI-2, checked with nibabel
    assert list(files) == sorted(files)
    for name, path in files.items():
        assert path.name == name
        assert path.is_file()
        img = nib.load(path)
        assert type(img) in (nib.Nifti1Image, nib.Nifti2Image)
        assert len(img.shape) in (3, 4)
    assert isinstance(nib.load(files["example_nifti2.nii.gz"]), nib.Nifti2Image)


def test_skimage_images_offline() -> None:
    images = datasets.skimage_images()
    for name in ("camera", "coins", "moon"):
        assert images[name].ndim == 2
        assert images[name].dtype == np.uint8
    assert images["camera"].shape == (512, 512)
    for name, image in images.items():
        assert image.ndim == (3 if name == "brain" else 2)
        assert image.size > 0


# --------------------------------------------------------------------------
# Brain phantom
# --------------------------------------------------------------------------


def test_phantom_defaults_dtype_shape_affine() -> None:
    data, affine = datasets.brain_phantom()
    assert data.shape == (96, 112, 96)
    assert data.dtype == np.int16
    assert affine.shape == (4, 4)
    assert affine.dtype == np.float64
    # RAS, isotropic 2 mm (covers ~ 190 x 224 x 190 mm), centre at the origin
    np.testing.assert_allclose(np.diag(affine), [2.0, 2.0, 2.0, 1.0])
    assert np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))) == 0
    centre = affine @ np.array([(n - 1) / 2 for n in data.shape] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    # a head in the middle, background at the corners
    assert data[48, 56, 48] > 200
    assert data[:3, :3, :3].mean() < 0.1 * data.max()
    assert data.min() >= 0


def test_phantom_custom_affine_and_float() -> None:
    aff = np.array([[0, 0, 3.0, -10], [-3.0, 0, 0, 5], [0, 3.0, 0, 0], [0, 0, 0, 1]])
    data, affine = datasets.brain_phantom((40, 44, 36), affine=aff, dtype="float32")
    assert data.dtype == np.float32
    np.testing.assert_array_equal(affine, aff)
    assert affine is not aff
    data64, _ = datasets.brain_phantom((40, 44, 36), affine=aff, dtype=np.float64)
    np.testing.assert_array_equal(data64, data.astype(np.float64))


def test_phantom_deterministic() -> None:
    a, aff_a = datasets.brain_phantom(SMALL, seed=3)
    b, aff_b = datasets.brain_phantom(SMALL, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(aff_a, aff_b)
    c, _ = datasets.brain_phantom(SMALL, seed=4)
    assert not np.array_equal(a, c)


def _bias_ratio(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bias field as measured on the data: biased / unbiased phantom."""
    kw = dict(seed=seed, dtype="float32", noise=0.0)
    with_bias, _ = datasets.brain_phantom(SMALL, bias_strength=0.3, **kw)
    without, _ = datasets.brain_phantom(SMALL, bias_strength=0.0, **kw)
    head = without > 0.2 * without.max()
    return with_bias[head] / without[head], head


def test_phantom_bias_field_differs_per_seed() -> None:
    r0, head0 = _bias_ratio(0)
    r1, head1 = _bias_ratio(1)
    for r in (r0, r1):
        assert r.min() >= 1 - 0.3 - 1e-3
        assert r.max() <= 1 + 0.3 + 1e-3
        assert r.max() - r.min() > 0.15  # a real, not negligible, field
    # compare the two fields where both heads are
    both = head0 & head1
    f0 = np.full(head0.shape, np.nan)
    f1 = np.full(head1.shape, np.nan)
    f0[head0], f1[head1] = r0, r1
    assert np.nanmean(np.abs(f0[both] - f1[both])) > 0.05
    # and the same seed gives the same field
    np.testing.assert_array_equal(_bias_ratio(0)[0], r0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bias", [0.0, 0.3])
def test_phantom_tissue_intensities_ordered(seed: int, bias: float) -> None:
    kw = dict(
        seed=seed, dtype="int16", bias_strength=bias, noise=0.03, intensity_scale=1.0, affine=None
    )
    data, _, labels = phantom._phantom(SMALL, labels=True, **kw)
    public, _ = datasets.brain_phantom(SMALL, **kw)
    np.testing.assert_array_equal(data, public)  # measured on the public data
    lab = phantom._LABELS
    med = {k: float(np.median(public[labels == lab[k]])) for k in ("csf", "gm", "wm")}
    assert med["wm"] > 1.25 * med["gm"] > 1.25 * 1.25 * med["csf"]
    counts = {k: int((labels == v).sum()) for k, v in lab.items()}
    assert all(counts[k] > 0 for k in lab)
    assert counts["gm"] > 0.25 * counts["wm"]  # a real cortical ribbon
    bg = public[labels == lab["background"]]
    assert 0 < bg.mean() < 0.1 * med["wm"]  # Rayleigh background, not zeros


def test_phantom_intensity_scale_varies_per_subject() -> None:
    wm = []
    for seed in range(6):
        data, _, labels = phantom._phantom(
            SMALL, seed=seed, dtype="float32", bias_strength=0.0, noise=0.0,
            intensity_scale=1.0, affine=None, labels=True,
        )
        wm.append(np.median(data[labels == phantom._LABELS["wm"]]))
    assert max(wm) / min(wm) > 1.3
    doubled, _ = datasets.brain_phantom(SMALL, seed=0, dtype="float32", intensity_scale=2.0)
    base, _ = datasets.brain_phantom(SMALL, seed=0, dtype="float32")
    assert 1.9 < np.median(doubled) / np.median(base) < 2.1


def test_phantom_head_size_varies() -> None:
    sizes = [
        int((datasets.brain_phantom(SMALL, seed=s, noise=0.0)[0] > 0).sum()) for s in range(5)
    ]
    assert max(sizes) / min(sizes) > 1.05


def test_phantom_int16_clips_not_wraps() -> None:
    kw = dict(seed=0, intensity_scale=40.0)  # WM ~ 40000: beyond int16
    f32, _ = datasets.brain_phantom(SMALL, dtype="float32", **kw)
    i16, _ = datasets.brain_phantom(SMALL, dtype="int16", **kw)
    assert f32.max() > 32767
    expected = np.clip(np.rint(f32), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(i16, expected)
    assert i16.min() >= 0
    assert (i16 == 32767).sum() > 1000


def test_phantom_uint8_clips_not_wraps() -> None:
    data, _, labels = phantom._phantom(
        SMALL, seed=0, dtype="uint8", bias_strength=0.3, noise=0.03,
        intensity_scale=10.0, affine=None, labels=True,
    )
    assert data.dtype == np.uint8
    wm = data[labels == phantom._LABELS["wm"]]
    assert (wm == 255).mean() > 0.99  # saturated, not wrapped to low values
    # the default scale fits the 8-bit range without saturation
    normal, _ = datasets.brain_phantom(SMALL, seed=0, dtype="uint8")
    assert 50 < normal.max() < 255


@pytest.mark.parametrize("dtype", ["int8", "uint16", "int32", "uint64"])
def test_phantom_other_integer_dtypes(dtype: str) -> None:
    data, _ = datasets.brain_phantom((24, 28, 24), dtype=dtype, intensity_scale=1e20)
    info = np.iinfo(dtype)
    assert data.dtype == np.dtype(dtype)
    assert data.min() >= 0
    assert data.max() >= info.max * 0.999  # saturated at the top, no wrap


@settings(max_examples=15, deadline=None, database=None)
@given(
    shape=st.tuples(*[st.integers(1, 20)] * 3),
    dtype=st.sampled_from(["uint8", "int16", "float32"]),
    seed=st.integers(0, 2**32),
)
def test_phantom_any_small_shape(shape: tuple[int, int, int], dtype: str, seed: int) -> None:
    data, affine = datasets.brain_phantom(shape, seed=seed, dtype=dtype)
    assert data.shape == shape
    assert data.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(data.astype(np.float64)))
    assert data.min() >= 0
    assert np.all(np.isfinite(affine))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shape=(10, 10)),
        dict(shape=(10, 0, 10)),
        dict(seed=-1),
        dict(dtype=bool),
        dict(dtype=np.complex64),
        dict(noise=-0.1),
        dict(bias_strength=float("nan")),
        dict(intensity_scale=0.0),
        dict(affine=np.eye(3)),
    ],
)
def test_phantom_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        datasets.brain_phantom(**kwargs)


# --------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------


def test_make_cohort_files_headers_and_data(tmp_path) -> None:
    out = tmp_path / "new" / "dir"
    paths = datasets.make_cohort(out, 3, shape=SMALL, compressed="mixed", seed=5)
    assert [p.name for p in paths] == ["sub-001.nii", "sub-002.nii.gz", "sub-003.nii"]
    assert paths == sorted(paths)
    assert sorted(out.iterdir()) == paths
    with gzip.open(paths[1]) as f:  # really gzip
        f.read(10)
    descrips = set()
    for path in paths:
        img = nib.load(path)
        assert type(img) is nib.Nifti1Image
        assert img.shape == SMALL
        assert img.get_data_dtype() == np.int16
        hdr = img.header
        assert hdr.get_xyzt_units() == ("mm", "sec")
        assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
        descrip = hdr["descrip"].item().decode()
        assert descrip.startswith("volnorm brain phantom seed=")
        descrips.add(descrip)
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and data.max() > 200
    assert len(descrips) == 3  # a different seed per subject

    # the stored seed reproduces the data with brain_phantom
    img = nib.load(paths[0])
    sub_seed = int(img.header["descrip"].item().decode().split("seed=")[1].split()[0])
    data, affine = datasets.brain_phantom(SMALL, seed=sub_seed)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)


def test_make_cohort_deterministic_bytes(tmp_path) -> None:
    kw = dict(shape=(32, 36, 32), seed=7)
    a = datasets.make_cohort(tmp_path / "a", 2, compressed=True, **kw)
    b = datasets.make_cohort(tmp_path / "b", 2, compressed=True, **kw)
    assert [p.suffixes for p in a] == [[".nii", ".gz"]] * 2
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    c = datasets.make_cohort(tmp_path / "c", 2, compressed=False, **kw)
    d = datasets.make_cohort(tmp_path / "d", 2, compressed=False, **kw)
    for pc, pd in zip(c, d):
        assert pc.read_bytes() == pd.read_bytes()
    for pa, pc in zip(a, c):  # same voxels, compressed or not
        np.testing.assert_array_equal(nib.load(pa).dataobj, nib.load(pc).dataobj)
    e = datasets.make_cohort(tmp_path / "e", 2, compressed=True, shape=(32, 36, 32), seed=8)
    assert a[0].read_bytes() != e[0].read_bytes()


def test_make_cohort_scaled(tmp_path) -> None:
    paths = datasets.make_cohort(tmp_path, 2, shape=(32, 36, 32), scaled=True, compressed="mixed")
    for path in paths:
        img = nib.load(path)
        assert img.get_data_dtype() == np.int16
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        assert slope not in (0.0, 1.0) and np.isfinite(slope)
        assert inter != 0.0 and np.isfinite(inter)
        scaled = np.asarray(img.dataobj)
        assert scaled.dtype.kind == "f"
        raw = np.asarray(img.dataobj.get_unscaled())
        assert raw.dtype == np.int16
        assert int(raw.max()) - int(raw.min()) > 20000  # uses the int16 range
        # the scaled values reproduce the float phantom to within half a step
        sub_seed = int(img.header["descrip"].item().decode().split("seed=")[1].split()[0])
        ref, _ = datasets.brain_phantom((32, 36, 32), seed=sub_seed, dtype="float32")
        assert np.abs(scaled - ref).max() <= 0.51 * slope + 1e-3 * ref.max()


def test_make_cohort_scaled_needs_integer_dtype(tmp_path) -> None:
    with pytest.raises(ValueError, match="integer"):
        datasets.make_cohort(tmp_path, 1, shape=(8, 8, 8), scaled=True, dtype="float32")


def test_make_cohort_nifti2_and_dtype(tmp_path) -> None:
    paths = datasets.make_cohort(tmp_path, 2, shape=(24, 28, 24), nifti2=True, dtype="uint8")
    for path in paths:
        img = nib.load(path)
        assert type(img) is nib.Nifti2Image
        assert img.get_data_dtype() == np.uint8
        assert img.shape == (24, 28, 24)


def test_make_cohort_vary_shape(tmp_path) -> None:
    base = (40, 50, 40)
    paths = datasets.make_cohort(tmp_path, 4, shape=base, vary_shape=True, prefix="subj")
    assert [p.name for p in paths] == [f"subj{i:03d}.nii" for i in range(1, 5)]
    shapes = [nib.load(p).shape for p in paths]
    assert len(set(shapes)) > 1
    for shape in shapes:
        for n, b in zip(shape, base):
            assert 0.9 * b - 1 <= n <= 1.1 * b + 1
    zooms = {nib.load(p).header.get_zooms() for p in paths}
    assert len(zooms) == 1  # same voxel size, varying field of view
    again = datasets.make_cohort(tmp_path / "again", 4, shape=base, vary_shape=True)
    assert [nib.load(p).shape for p in again] == shapes


def test_make_cohort_refuses_to_overwrite(tmp_path) -> None:
    existing = tmp_path / "sub-002.nii.gz"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="sub-002.nii.gz"):
        datasets.make_cohort(tmp_path, 3, shape=(8, 8, 8), compressed=True)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub-002.nii.gz"]  # nothing written
    # a file of the other kind (.nii) is no conflict
    paths = datasets.make_cohort(tmp_path, 3, shape=(8, 8, 8), compressed=False)
    assert [p.name for p in paths] == ["sub-001.nii", "sub-002.nii", "sub-003.nii"]
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_subjects=0), dict(compressed="yes"), dict(prefix="a/b"), dict(seed=-3)],
)
def test_make_cohort_rejects_bad_arguments(tmp_path, kwargs: dict) -> None:
    kwargs = {"n_subjects": 1, **kwargs}
    with pytest.raises(ValueError):
        datasets.make_cohort(tmp_path, shape=(8, 8, 8), **kwargs)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# 2-D image stacks
# --------------------------------------------------------------------------


def test_make_image_stack() -> None:
    stack = datasets.make_image_stack()
    assert stack.shape == (16, 96, 96)
    assert stack.dtype == np.uint8
    np.testing.assert_array_equal(stack, datasets.make_image_stack())
    assert not np.array_equal(stack, datasets.make_image_stack(seed=1))
    means = stack.reshape(16, -1).mean(axis=1)
    assert means.std() > 5  # brightness varies between images
    assert all(not np.array_equal(stack[0], s) for s in stack[1:])
    assert stack.std(axis=(1, 2)).min() > 10  # real image content, not flat


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_make_image_stack_dtypes(dtype: str) -> None:
    stack = datasets.make_image_stack(3, (20, 30), seed=2, dtype=dtype)
    assert stack.shape == (3, 20, 30)
    assert stack.dtype == np.dtype(dtype)
    top = 1.0 if dtype == "float32" else 65535
    assert stack.min() >= 0 and stack.max() <= top
    assert stack.max() > 0.5 * top


def test_docstring_examples() -> None:
    result = doctest.testmod(datasets, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
