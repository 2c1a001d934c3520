"""Resolution pyramids (volnorm.io.pyramid): each level is downscale_local_mean (images) or the
block mode (labels) of the level above, written with level 0, described by OME-Zarr 0.5
multiscales that ome-zarr-py validates and reads, with a NIfTI affine per level that maps its
voxel centres to the same world positions; nifti-zarr still reads level 0."""

from __future__ import annotations

import collections
import itertools
import math
from pathlib import Path

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.testing import data_path
from skimage.transform import downscale_local_mean

import volnorm as vn
from volnorm.cli import main
from volnorm.integrity import DamagedStoreError, verify
from volnorm.io import writers
from volnorm.io.nifti import NiftiError
from volnorm.io.pyramid import SlabLevels, downsample, level_affine, level_factors, pyramid
from volnorm.pipeline import SpecError, load_spec, run

ANAT = Path(data_path) / "anatomical.nii"
FUNC = Path(data_path) / "functional.nii"


def _reference_mean(above: np.ndarray, dims: tuple[str, ...]) -> np.ndarray:
    """downscale_local_mean of the level above (float64), cast back as the levels are stored."""
    step = tuple(2 if d in "zyx" and n > 1 else 1 for d, n in zip(dims, above.shape))
    mean = downscale_local_mean(above.astype(np.float64), step)
    return np.rint(mean).astype(above.dtype) if above.dtype.kind in "iu" else mean.astype(above.dtype)


def _reference_mode(above: np.ndarray, dims: tuple[str, ...]) -> np.ndarray:
    """The most frequent value of each block's real voxels, ties to the smallest: plain loops."""
    step = tuple(2 if d in "zyx" and n > 1 else 1 for d, n in zip(dims, above.shape))
    shape = tuple(math.ceil(n / s) for n, s in zip(above.shape, step))
    out = np.empty(shape, dtype=above.dtype)
    for idx in itertools.product(*(range(n) for n in shape)):
        block = above[tuple(slice(i * s, i * s + s) for i, s in zip(idx, step))].ravel().tolist()
        counts = collections.Counter(block)
        top = max(counts.values())
        out[idx] = min(v for v, c in counts.items() if c == top)
    return out


def _raw(store: Path, name: str, level: int) -> np.ndarray:
    return np.asarray(zarr.open_group(store / name, mode="r")[str(level)][:])


# ---------------------------------------------------------------------------
# the levels' values
# ---------------------------------------------------------------------------


def test_levels_equal_downscale_local_mean_of_the_level_above(tmp_path):
    """anatomical.nii (int16, every axis odd: 33 x 41 x 25): levels 1..3 are exactly
    downscale_local_mean (zero padding) of the level above, rounded back to int16; to_zarr and
    convert write the same bytes."""
    out, conv = tmp_path / "a.zarr", tmp_path / "c.zarr"
    vn.to_zarr(vn.open_nifti(ANAT, chunks={"z": 6}), out, levels=4)
    vn.convert(ANAT, conv, levels=4, chunks={"z": 6}, scheduler="sync")
    dims = ("z", "y", "x")
    shapes = []
    for k in range(1, 4):
        above, level = _raw(out, "anatomical", k - 1), _raw(out, "anatomical", k)
        assert level.dtype == np.int16
        np.testing.assert_array_equal(level, _reference_mean(above, dims))
        np.testing.assert_array_equal(_raw(conv, "anatomical", k), level)
        shapes.append(level.shape)
    assert shapes == [(13, 21, 17), (7, 11, 9), (4, 6, 5)]
    # read back through open_zarr: the scaled values of each level
    lvl = vn.open_zarr(out, level=2)
    assert lvl.dims == ("volume", "z", "y", "x") and lvl.attrs["level"] == 2
    np.testing.assert_array_equal(lvl.values[0], _raw(out, "anatomical", 2))
    ome = zarr.open_group(out / "anatomical", mode="r").attrs["ome"]["multiscales"][0]
    assert [d["path"] for d in ome["datasets"]] == ["0", "1", "2", "3"] and ome["type"] == "local_mean"


@pytest.mark.parametrize("z, streams", [(6, True), (25, True), (5, False), (1, False)])
def test_convert_reduces_the_slabs_as_it_reads_them(tmp_path, z, streams):
    """convert makes the levels from each slab as the file is read (even chunk lengths along the
    slab axis), else from the level 0 it has written; the same bytes either way, and the same as
    to_zarr's. functional.nii is 4-D: t is never halved."""
    for src, name, dims in ((ANAT, "anatomical", ("z", "y", "x")), (FUNC, "functional", ("t", "z", "y", "x"))):
        out = tmp_path / f"{name}.zarr"
        chunks = {"z": z} if name == "anatomical" else {"t": 1, "z": min(z, 3)}
        vn.convert(src, out, levels=3, chunks=chunks, scheduler="sync")
        level0 = zarr.open_group(out / name, mode="r")["0"]
        if name == "anatomical":
            assert SlabLevels([level0], level0.shape, dims, level0.chunks).streams is streams
        for k in (1, 2):
            np.testing.assert_array_equal(_raw(out, name, k), _reference_mean(_raw(out, name, k - 1), dims))
        vn.to_zarr(vn.open_nifti(src), tmp_path / f"{name}-t.zarr", levels=3)
        for k in (1, 2):
            np.testing.assert_array_equal(_raw(out, name, k), _raw(tmp_path / f"{name}-t.zarr", name, k))


@st.composite
def _volumes(draw):
    ndim = draw(st.sampled_from([3, 4]))
    dims = ("t", "z", "y", "x")[4 - ndim:]
    shape = tuple(draw(st.integers(1, 9)) for _ in dims)
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    dtype = draw(st.sampled_from(["uint8", "int16", "float32"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == "float32":  # multiples of 1/16: every sum of 8 is exact, so float32(mean) is one number
        x = (rng.integers(-4000, 4000, shape) / 16).astype(np.float32)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)
    return x, dims, chunks


@settings(max_examples=60, deadline=None)
@given(_volumes(), st.integers(2, 4))
def test_levels_property_random_shapes(vol, levels):
    """Any shape (odd sizes, axes of 1, a t axis never halved) and any chunking: each level is
    downscale_local_mean of the level above (up to the stated cast), or for labels the mode."""
    x, dims, chunks = vol
    possible = 1 + max(math.ceil(math.log2(n)) for d, n in zip(dims, x.shape) if d != "t")  # halvings to 1
    if levels > possible:
        with pytest.raises(ValueError, match=f"has only {possible} level"):
            level_factors(x.shape, dims, levels)
        return
    factors = level_factors(x.shape, dims, levels)
    for method, reference in (("mean", _reference_mean), ("mode", _reference_mode)):
        made = pyramid(da.from_array(x, chunks=chunks), dims, levels, method, chunks)
        above = x
        for k, lvl in enumerate(made, start=1):
            got = lvl.compute()
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(got, reference(above, dims))
            assert got.shape == tuple(math.ceil(n / f) for n, f in zip(x.shape, factors[k]))
            if "t" in dims:
                assert got.shape[0] == x.shape[0]
            above = got


def test_labels_use_the_mode(tmp_path):
    """A mask (boolean) gets the mode automatically; integer labels with downsample='mode'."""
    rng = np.random.default_rng(0)
    data = vn.open_nifti(ANAT)
    labels = xr.DataArray(rng.integers(0, 4, data.shape).astype(np.int16), dims=data.dims, coords=data.coords, attrs=data.attrs)
    labels.attrs["nifti_scaled"] = False
    vn.to_zarr(labels, tmp_path / "l.zarr", levels=3, downsample="mode")
    level1 = _raw(tmp_path / "l.zarr", "anatomical", 1)
    np.testing.assert_array_equal(level1, _reference_mode(labels.values[0], ("z", "y", "x")))
    assert set(np.unique(level1)) <= {0, 1, 2, 3}
    # a 2x2x2 block of 1, 1, 1, 3, 3, 3, 3, 0: the mode is 3 where the mean would be 2
    block = np.array([1, 1, 1, 3, 3, 3, 3, 0], dtype=np.int16).reshape(1, 2, 2, 2)
    assert downsample(da.from_array(block), ("volume", "z", "y", "x"), "mode").compute().item() == 3
    mask = data > 100  # boolean: stored as uint8, levels by the mode
    vn.to_zarr(mask, tmp_path / "m.zarr", levels=2)
    g = zarr.open_group(tmp_path / "m.zarr" / "anatomical", mode="r")
    assert g.attrs["ome"]["multiscales"][0]["type"] == "mode" and g.attrs["volnorm"]["pyramid"]["downsample"] == "mode"
    np.testing.assert_array_equal(g["1"][:], _reference_mode(mask.values[0].astype(np.uint8), ("z", "y", "x")))
    assert set(np.unique(g["1"][:])) <= {0, 1}


def test_nifti_label_intent_means_mode(tmp_path):
    """A file whose NIfTI intent is a label image (NIFTI_INTENT_LABEL) gets the mode by itself,
    in convert and in to_zarr; an explicit downsample wins."""
    rng = np.random.default_rng(1)
    img = nib.Nifti1Image(rng.integers(0, 6, (9, 8, 7)).astype(np.int16), np.diag([1.5, 1.5, 2.0, 1.0]))
    img.header.set_intent("label")
    nib.save(img, tmp_path / "seg.nii")
    ref = _reference_mode(np.asarray(img.dataobj).T, ("z", "y", "x"))
    vn.convert(tmp_path / "seg.nii", tmp_path / "c.zarr", levels=2, scheduler="sync")
    vn.to_zarr(vn.open_nifti(tmp_path / "seg.nii"), tmp_path / "t.zarr", levels=2)
    for out in ("c.zarr", "t.zarr"):
        np.testing.assert_array_equal(_raw(tmp_path / out, "seg", 1), ref)
        assert zarr.open_group(tmp_path / out / "seg", mode="r").attrs["ome"]["multiscales"][0]["type"] == "mode"
    vn.convert(tmp_path / "seg.nii", tmp_path / "m.zarr", levels=2, downsample="mean", scheduler="sync")
    np.testing.assert_array_equal(_raw(tmp_path / "m.zarr", "seg", 1), _reference_mean(_raw(tmp_path / "m.zarr", "seg", 0), "zyx"))


def test_bad_options_are_refused_before_writing(tmp_path):
    data = vn.open_nifti(ANAT)
    with pytest.raises(ValueError, match="`downsample` must be 'mean'"):
        vn.to_zarr(data, tmp_path / "x.zarr", levels=2, downsample="median")
    with pytest.raises(ValueError, match="`levels` must be a positive integer"):
        vn.to_zarr(data, tmp_path / "x.zarr", levels=0)
    with pytest.raises(ValueError, match="has only 7 level"):  # 41 -> 21 -> 11 -> 6 -> 3 -> 2 -> 1
        vn.convert(ANAT, tmp_path / "x.zarr", levels=8, scheduler="sync")
    with pytest.raises(ValueError, match="anatomical: levels=8: shape .* has only 7 level"):
        vn.to_zarr(data, tmp_path / "x.zarr", levels=8)
    assert not (tmp_path / ".x.zarr.volnorm-partial").exists()
    stack = xr.DataArray(np.zeros((2, 8, 8), np.uint8), dims=("volume", "y", "x"))
    with pytest.raises(ValueError, match="2-D image stack"):
        vn.to_zarr(stack, tmp_path / "x.zarr", levels=2)
    assert not (tmp_path / "x.zarr").exists()


# ---------------------------------------------------------------------------
# geometry: affine, header, OME metadata
# ---------------------------------------------------------------------------


def test_the_affine_of_each_level_maps_its_voxel_centres_to_the_same_world_positions(tmp_path):
    """A level-k voxel is the mean of a 2x2x2 block of the level above: its centre is the mean of
    the centres of the block's voxels (2i, 2j, 2k) and (2i+1, 2j+1, 2k+1), whose affines nibabel
    gives by slicing (``img.slicer[::2, ::2, ::2]`` and ``img.slicer[1::2, 1::2, 1::2]``)."""
    niizarr = pytest.importorskip("niizarr")
    out = tmp_path / "a.zarr"
    vn.to_zarr(vn.open_nifti(ANAT), out, levels=3)
    above = nib.load(ANAT)
    for k in (1, 2):
        ref = (above.slicer[::2, ::2, ::2].affine + above.slicer[1::2, 1::2, 1::2].affine) / 2
        lvl = vn.open_zarr(out, level=k)
        np.testing.assert_allclose(np.asarray(lvl.attrs["affine"]), ref, atol=1e-9)
        np.testing.assert_allclose(lvl.attrs["zooms"], np.asarray(nib.load(ANAT).header.get_zooms()) * 2**k)
        # the same from the level's own header, and from nifti-zarr reading the OME metadata
        headers = lvl.attrs["nifti_headers"]
        hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(headers["anatomical"] + b"\0" * 4), check=False)
        np.testing.assert_allclose(hdr.get_best_affine(), ref, atol=1e-5)
        assert hdr.get_data_shape() == tuple(reversed(lvl.shape[1:]))
        np.testing.assert_allclose(niizarr.zarr2nii(str(out / "anatomical"), level=k).header.get_best_affine(), ref, atol=1e-5)
        # a level exported to NIfTI carries its own geometry and values
        vn.to_nifti(lvl, tmp_path / f"l{k}.nii")
        back = nib.load(tmp_path / f"l{k}.nii")
        np.testing.assert_allclose(back.affine, ref, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(back.dataobj), lvl.values[0].T)  # NIfTI order (x, y, z)
        above = nib.Nifti1Image(np.zeros(back.shape, np.int16), ref)
    # level k's voxel (0, 0, 0) is centred on level 0's voxels 0 .. 2^k - 1
    for k in (1, 2, 3):
        np.testing.assert_allclose(level_affine(nib.load(ANAT).affine, (2**k,) * 3, "zyx") @ [0, 0, 0, 1],
                                   nib.load(ANAT).affine @ ([(2**k - 1) / 2] * 3 + [1]))


def test_level_affines_of_every_nibabel_file(nib_file, tmp_path):
    """Oblique, 4-D, big-endian, NIfTI-2, scaled: level 1's affine, zooms and values, each file."""
    out = tmp_path / "c.zarr"
    vn.convert(nib_file, out, levels=2, scheduler="sync")
    img = nib.load(nib_file)
    lvl = vn.open_zarr(out, level=1)
    halved = [n > 1 for n in img.shape[:3]]
    even = tuple(slice(None, None, 2) if h else slice(None) for h in halved)
    odd = tuple(slice(1, None, 2) if h else slice(None) for h in halved)
    ref = (img.slicer[even].affine + img.slicer[odd].affine) / 2
    np.testing.assert_allclose(np.asarray(lvl.attrs["affine"]), ref, atol=1e-5)
    factors = [2 if h else 1 for h in halved] + [1] * (len(img.header.get_zooms()) - 3)
    np.testing.assert_allclose(lvl.attrs["zooms"], np.asarray(img.header.get_zooms()) * factors, rtol=1e-6)
    name = nib_file.name.split(".")[0]
    above = _raw(out, name, 0)
    np.testing.assert_array_equal(_raw(out, name, 1), _reference_mean(above, lvl.dims[1:]))
    raw = vn.open_zarr(out, level=1, scaled=False).values[0]
    np.testing.assert_array_equal(raw, _raw(out, name, 1))


def test_ome_zarr_validates_and_reads_every_level(tmp_path):
    """ome-zarr-models validates the group as an OME-Zarr 0.5 image; ome-zarr-py (napari-ome-zarr's
    reader) opens it with every level."""
    models = pytest.importorskip("ome_zarr_models")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    out = tmp_path / "c.zarr"
    vn.convert([ANAT, FUNC], out, levels=3, scheduler="sync")
    for name in ("anatomical", "functional"):
        grp = zarr.open_group(out / name, mode="r")
        image = models.open_ome_zarr(grp)
        ms = image.attributes.ome.multiscales[0]
        assert [d.path for d in ms.datasets] == ["0", "1", "2"]
        node = next(iter(Reader(parse_url(str(out / name)))()))
        assert node.load(Multiscales) is not None
        assert [a.shape for a in node.data] == [grp[str(k)].shape for k in range(3)]
        np.testing.assert_array_equal(np.asarray(node.data[2]), grp["2"][:])


def test_nifti_zarr_still_opens_level_0(tmp_path):
    niizarr = pytest.importorskip("niizarr")
    out = tmp_path / "a.zarr"
    vn.to_zarr(vn.open_nifti(ANAT), out, levels=3)
    ref = nib.load(ANAT)
    img = niizarr.zarr2nii(str(out / "anatomical"))
    np.testing.assert_array_equal(np.asarray(img.dataobj), ref.dataobj.get_unscaled())
    np.testing.assert_array_equal(img.header.get_best_affine(), ref.affine)
    # level 0 reads as before, through volnorm too
    xr.testing.assert_identical(vn.open_zarr(out).reset_coords(drop=True),
                                vn.open_nifti(ANAT).reset_coords(drop=True).assign_attrs(vn.open_zarr(out).attrs))


# ---------------------------------------------------------------------------
# reading, laziness, integrity
# ---------------------------------------------------------------------------


def test_open_zarr_level_errors_name_the_file(tmp_path):
    out = tmp_path / "a.zarr"
    vn.to_zarr(vn.open_nifti(ANAT), out, levels=2)
    with pytest.raises(ValueError, match=r"a\.zarr/anatomical: no resolution level 2; the volume has levels 0\.\.1"):
        vn.open_zarr(out, level=2)
    with pytest.raises(ValueError, match="`level` must be"):
        vn.open_zarr(out, level=-1)
    vn.to_zarr(vn.open_nifti(ANAT), tmp_path / "b.zarr")
    with pytest.raises(ValueError, match="level 0 only"):
        vn.open_zarr(tmp_path / "b.zarr", level=1)


class _Boom:
    shape, dtype, ndim = (9, 10, 11), np.dtype("int16"), 3

    def __getitem__(self, key):
        raise AssertionError("computed")


def test_nothing_is_computed_before_asked(tmp_path):
    x = da.from_array(_Boom(), chunks=(4, 5, 6))
    made = pyramid(x, ("z", "y", "x"), 3, "mean", (4, 5, 6))
    made += pyramid(x, ("z", "y", "x"), 3, "mode", (4, 5, 6))
    assert [m.shape for m in made[:2]] == [(5, 5, 6), (3, 3, 3)]
    out = tmp_path / "a.zarr"
    vn.to_zarr(vn.open_nifti(ANAT), out, levels=3)
    lvl = vn.open_zarr(out, level=2)
    assert isinstance(lvl.data, da.Array)


def test_the_data_are_read_once_for_every_level(tmp_path):
    """to_zarr computes level 0 and its levels in one graph: each input block is made once."""
    reads: collections.Counter = collections.Counter()

    def counted(block, block_info=None):
        reads[tuple(block_info[0]["chunk-location"])] += 1
        return block

    stack = vn.open_nifti(ANAT, chunks={"z": 6})
    data = stack.copy(data=stack.data.map_blocks(counted, dtype=stack.dtype))
    with vn.engine.running("threads"):
        vn.to_zarr(data, tmp_path / "a.zarr", levels=4)
    assert len(reads) == stack.data.npartitions and set(reads.values()) == {1}
    assert verify(tmp_path / "a.zarr").ok


def test_verify_checks_the_levels(tmp_path):
    out = tmp_path / "a.zarr"
    vn.to_zarr(vn.open_nifti(ANAT, chunks={"z": 6}), out, levels=3)
    report = verify(out)
    assert report.ok and report.arrays == 4 and report.checksums == report.chunks
    chunk = out / "anatomical" / "2" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    report = verify(out)
    assert not report.ok and any("anatomical/2/c/0/0/0" in d for d in report.damaged)
    assert main(["verify", str(out)]) == 1
    with pytest.raises(DamagedStoreError, match="anatomical/2"):
        vn.open_zarr(out, level=2).values
    vn.open_zarr(out, level=1).values  # the other levels still read


def test_an_interrupted_write_resumes_with_every_level(tmp_path, monkeypatch, cohort):
    monkeypatch.setattr(writers, "WRITE_BATCH_BYTES", 1)  # a batch per volume, each marked complete on its own
    stack = vn.open_nifti(cohort)
    state = {"fail": True}

    def maybe_fail(block, block_info=None):
        if state["fail"] and block_info[0]["chunk-location"][0] == 3:
            raise RuntimeError("killed")
        return block

    data = stack.copy(data=stack.data.map_blocks(maybe_fail, dtype=stack.dtype))
    out = tmp_path / "c.zarr"
    with vn.engine.running("threads"), pytest.raises(RuntimeError, match="killed"):
        vn.to_zarr(data, out, levels=3)
    staged = tmp_path / ".c.zarr.volnorm-partial"
    done = [n for n in stack["volume"].values if zarr.open_group(staged, mode="r")[n].attrs["volnorm"].get("complete")]
    assert 0 < len(done) < 6 and not out.exists()
    state["fail"] = False
    with vn.engine.running("threads"):
        vn.to_zarr(data, out, levels=3)
    assert verify(out).ok
    for name in stack["volume"].values:
        for k in (1, 2):
            np.testing.assert_array_equal(_raw(out, name, k), _reference_mean(_raw(out, name, k - 1), ("z", "y", "x")))
    np.testing.assert_array_equal(vn.open_zarr(out, level=0).values, stack.values)


@pytest.mark.slow
def test_levels_on_a_distributed_cluster(cohort, nib_paths, cluster_client, tmp_path):
    """Worker processes write the levels (of to_zarr's graph, and in convert's tasks) as threads do."""
    vn.convert([*cohort, *nib_paths], tmp_path / "d.zarr", levels=2, scheduler=cluster_client)
    vn.convert([*cohort, *nib_paths], tmp_path / "s.zarr", levels=2, scheduler="sync")
    with vn.engine.running(cluster_client):
        vn.to_zarr(vn.open_nifti(cohort), tmp_path / "t.zarr", levels=3)
    assert verify(tmp_path / "d.zarr").ok and verify(tmp_path / "t.zarr").ok
    for p in [*cohort, *nib_paths]:
        name = p.name.split(".")[0]
        np.testing.assert_array_equal(_raw(tmp_path / "d.zarr", name, 1), _raw(tmp_path / "s.zarr", name, 1))
    for p in cohort:
        name = p.name.split(".")[0]
        for k in (1, 2):
            above = _raw(tmp_path / "t.zarr", name, k - 1)
            np.testing.assert_array_equal(_raw(tmp_path / "t.zarr", name, k), _reference_mean(above, ("z", "y", "x")))


def test_an_interrupted_conversion_resumes_with_every_level(tmp_path, monkeypatch):
    """A volume is complete only once its levels are written: one whose levels failed is
    converted again by the next run, the others are kept."""
    real = SlabLevels.feed

    def failing(self, region, slab, level=0):
        if "functional" in self.targets[0].path and level == 1:  # level 1 written, level 2 not
            raise OSError("the levels could not be written")
        real(self, region, slab, level)

    monkeypatch.setattr(SlabLevels, "feed", failing)
    out = tmp_path / "c.zarr"
    with pytest.raises(NiftiError, match="1 of 2 inputs failed"):
        vn.convert([ANAT, FUNC], out, levels=3, scheduler="sync")
    monkeypatch.setattr(SlabLevels, "feed", real)
    res = vn.convert([ANAT, FUNC], out, levels=3, scheduler="sync")
    assert res.resumed == 1 and verify(out).ok
    for name in ("anatomical", "functional"):
        dims = vn.open_zarr(out)[name]["image"].dims
        for k in (1, 2):
            np.testing.assert_array_equal(_raw(out, name, k), _reference_mean(_raw(out, name, k - 1), dims))


# ---------------------------------------------------------------------------
# the CLI and a spec, on real files
# ---------------------------------------------------------------------------


def test_cli_convert_with_levels(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    assert main(["convert", str(ANAT), str(FUNC), str(out), "--levels", "2", "--scheduler", "sync", "--no-progress"]) == 0
    for name in ("anatomical", "functional"):
        np.testing.assert_array_equal(_raw(out, name, 1), _reference_mean(_raw(out, name, 0), vn.open_zarr(out)[name]["image"].dims))
    assert main(["verify", str(out)]) == 0
    masks = tmp_path / "m.zarr"
    assert main(["convert", str(ANAT), str(masks), "--levels", "3", "--step", "binarize", "--scheduler", "sync"]) == 0
    g = zarr.open_group(masks / "anatomical", mode="r")
    assert g.attrs["ome"]["multiscales"][0]["type"] == "mode" and set(np.unique(g["2"][:])) <= {0, 1}
    with pytest.raises(SystemExit):  # argparse refuses it
        main(["convert", str(ANAT), str(tmp_path / "x.zarr"), "--levels", "2", "--downsample", "median"])
    assert main(["convert", str(ANAT), str(tmp_path / "x.zarr"), "--levels", "9", "--scheduler", "sync"]) != 0
    assert not (tmp_path / "x.zarr").exists()
    capsys.readouterr()


def test_spec_output_levels(tmp_path):
    out = tmp_path / "out.zarr"
    spec = {"version": 1, "input": {"nifti": [str(ANAT)]}, "steps": [{"rescale": {"percentiles": [1, 99]}}],
            "output": {"store": str(out), "levels": 3}, "engine": {"scheduler": "sync", "progress": False}}
    assert run(spec, echo=None).status == "done"
    for k in (1, 2):
        np.testing.assert_array_equal(_raw(out, "anatomical", k), _reference_mean(_raw(out, "anatomical", k - 1), ("z", "y", "x")))
    assert vn.open_zarr(out, level=2).shape == (1, 7, 11, 9)
    assert run(spec, echo=None).status == "up to date"
    # another number of levels is another output
    assert run({**spec, "output": {"store": str(out), "levels": 2}}, echo=None, overwrite=True).status == "done"
    assert "2" not in zarr.open_group(out / "anatomical", mode="r")
    for bad, match in (({"levels": 0}, "output.levels: expected a positive integer"),
                       ({"levels": True}, "output.levels"),
                       ({"downsample": "median"}, "output.downsample: expected mean")):
        with pytest.raises(SpecError, match=match):
            load_spec({**spec, "output": {"store": str(out), **bad}})
    npy = tmp_path / "s.npy"
    np.save(npy, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(SpecError, match="2-D image stack"):
        run({**spec, "input": {"images": str(npy)}, "steps": []}, echo=None)


def test_info_lists_each_volumes_levels(tmp_path, capsys):
    """`volnorm info` says how many levels a volume has, how they were made and their shapes
    (and the JSON facts give the shapes); a store without a pyramid shows no levels line."""
    main(["convert", str(ANAT), str(tmp_path / "p.zarr"), "--levels", "3", "--scheduler", "sync"])
    main(["convert", str(ANAT), str(tmp_path / "flat.zarr"), "--scheduler", "sync"])
    capsys.readouterr()
    main(["info", str(tmp_path / "p.zarr")])
    assert "levels 3 (mean): 0 (25, 41, 33), 1 (13, 21, 17), 2 (7, 11, 9)" in capsys.readouterr().out
    _, facts = vn.info.describe(tmp_path / "p.zarr")
    assert facts["volumes"]["anatomical"]["levels"] == [[25, 41, 33], [13, 21, 17], [7, 11, 9]]
    main(["info", str(tmp_path / "flat.zarr")])
    assert "levels" not in capsys.readouterr().out
