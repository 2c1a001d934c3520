"""volnorm equals numpy and scikit-image on real data shipped with our dependencies.

Data: nibabel's ``anatomical.nii`` (int16, 3-D) and ``example4d.nii.gz`` (int16, 4-D)
opened with :func:`volnorm.open_nifti`; scikit-image's camera/moon/coins cropped to one
shape (a uint8 stack) and at their native shapes (a collection); scikit-image's
``lfw_subset`` faces (200 x 25 x 25, float64 and float32).

Every statistic is checked for every ``dim`` (whole dataset, per volume, per slice),
without and with a mask that excludes a large part of the data, and on three
chunkings (one chunk, one volume per chunk, odd chunk sizes that cut the slices).
The references are computed independently with numpy / scikit-image on the very
same voxels. The ``slow`` tests repeat the computations on a process-based
``distributed`` cluster and require bit-identical results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import itertools
from collections.abc import Hashable
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data as skdata
from skimage import filters

import volnorm as vn

QS = [0.0, 0.02, 0.5, 0.98, 1.0]
EXTRA = ("nan", "posinf", "neginf", "below", "above", "masked_out")

SK = {
    "otsu": filters.threshold_otsu,
    "yen": filters.threshold_yen,
    "isodata": filters.threshold_isodata,
    "li": filters.threshold_li,
    "triangle": filters.threshold_triangle,
    "multiotsu": filters.threshold_multiotsu,
}


# ---------------------------------------------------------------------------
# the data sets
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One real data set: its values, a mask, the dims and chunkings to test."""

    name: str
    values: np.ndarray  # as the DataArray holds them (dims order `dims`)
    dims: tuple[str, ...]
    mask_values: np.ndarray
    mask_dims: tuple[str, ...]
    dim_options: dict  # "all" / "volume" / "slice" -> dim argument
    chunkings: dict  # id -> chunks mapping (None: numpy-backed, one chunk)
    path: Path | None = None
    affine: list | None = None

    @property
    def is_int(self) -> bool:
        return self.values.dtype.kind in "iu"

    def open(self, chunking: str) -> xr.DataArray:
        chunks = self.chunkings[chunking]
        if self.path is not None:
            return vn.open_nifti(self.path, chunks=chunks)
        x = xr.DataArray(self.values, dims=self.dims)
        return x if chunks is None else x.chunk(chunks)

    def mask(self, chunking: str) -> xr.DataArray:
        attrs = {"affine": self.affine} if self.affine is not None else {}
        m = xr.DataArray(self.mask_values, dims=self.mask_dims, attrs=attrs)
        # the odd chunking also gets a mask chunked unlike the data (unify_chunks)
        return m.chunk({self.mask_dims[-2]: (self.mask_values.shape[-2] + 1) // 2}) if chunking == "odd" else m

    def valid(self, masked: bool) -> np.ndarray:
        """The mask broadcast to the data's shape (all True without a mask)."""
        if not masked:
            return np.ones(self.values.shape, bool)
        m = xr.DataArray(self.mask_values, dims=self.mask_dims)
        return m.broadcast_like(xr.DataArray(self.values, dims=self.dims)).transpose(*self.dims).values


def _nifti(name: str) -> tuple[Path, np.ndarray, list]:
    path = vn.datasets.nibabel_files()[name]
    x = vn.open_nifti(path)
    return path, x.values, x.attrs["affine"]


def _skimage_stack() -> np.ndarray:
    return np.stack([im[:300, :300] for im in (skdata.camera(), skdata.moon(), skdata.coins())])


def _ellipse(ny: int, nx: int) -> np.ndarray:
    """A fixed region that keeps ~45% of a face and at least one voxel of every row."""
    yy, xx = np.mgrid[:ny, :nx]
    return ((yy - (ny - 1) / 2) / (ny / 2)) ** 2 + ((xx - (nx - 1) / 2) / 7.0) ** 2 <= 1


@functools.cache
def get_case(name: str) -> Case:
    if name == "anatomical_int16":  # (volume 1, z 25, y 41, x 33)
        path, v, aff = _nifti("anatomical.nii")
        return Case(
            name, v, ("volume", "z", "y", "x"), v[0] > v[0].mean(), ("z", "y", "x"),
            {"all": None, "volume": ("z", "y", "x"), "slice": ("y", "x")},
            # a single volume: "volume" chunking = one z-plane per chunk
            {"one": {"z": -1, "y": -1, "x": -1}, "volume": {"z": 1}, "odd": {"z": 9, "y": 15, "x": 13}},
            path, aff,
        )
    if name == "example4d_int16":  # (volume 1, t 2, z 24, y 96, x 128)
        path, v, aff = _nifti("example4d.nii.gz")
        frame = v[0, 0]
        return Case(
            name, v, ("volume", "t", "z", "y", "x"), frame > frame.mean(), ("z", "y", "x"),
            {"all": None, "volume": ("t", "z", "y", "x"), "slice": ("y", "x")},
            # "volume" chunking: one 3-D volume (time point) per chunk
            {"one": {"t": -1, "z": -1, "y": -1, "x": -1}, "volume": {"t": 1}, "odd": {"t": 1, "z": 10, "y": 77, "x": 50}},
            path, aff,
        )
    if name == "skimage_uint8":  # camera, moon, coins: (3, 300, 300)
        v = _skimage_stack()
        return Case(
            name, v, ("volume", "y", "x"), v[0] > v[0].mean(), ("y", "x"),
            {"all": None, "volume": ("y", "x"), "slice": "x"},  # slice of a 2-D image: a row
            {"one": None, "volume": {"volume": 1}, "odd": {"volume": 2, "y": 77, "x": 111}},
        )
    if name in ("lfw_float64", "lfw_float32"):  # (200, 25, 25)
        v = skdata.lfw_subset().astype(name[-7:])
        return Case(
            name, v, ("volume", "y", "x"), _ellipse(25, 25), ("y", "x"),
            # per "slice": one histogram per image row index, over all faces (kept dim in the middle)
            {"all": None, "volume": ("y", "x"), "slice": ("volume", "x")},
            {"one": None, "volume": {"volume": 1}, "odd": {"volume": 67, "y": 9, "x": 11}},
        )
    raise KeyError(name)


CASES = ["anatomical_int16", "example4d_int16", "skimage_uint8", "lfw_float64", "lfw_float32"]
DIMS = ["all", "volume", "slice"]
CHUNKINGS = ["one", "volume", "odd"]


def _cid(name: str, dimk: str, masked: bool, chunking: str) -> str:
    return f"{name}-{dimk}-{'mask' if masked else 'nomask'}-{chunking}"


def covering(names=CASES, marks: dict | None = None, skip: frozenset = frozenset()) -> list:
    """(name, dim, masked, chunking) with every dim x chunking pair, and every dim x mask and
    chunking x mask pair, for each data set: 9 cases instead of the 18 of the full product
    (lfw_float32: 6, without the one-face-per-chunk chunking that lfw_float64 covers)."""
    out = []
    for name in names:
        for i, dimk in enumerate(DIMS):
            for j, chunking in enumerate(CHUNKINGS):
                if name == "lfw_float32" and chunking == "volume":
                    continue  # 200 one-face chunks cost ~1 s a call; lfw_float64 covers them
                masked = (i + j) % 2 == 1
                cid = _cid(name, dimk, masked, chunking)
                if cid not in skip:
                    out.append(pytest.param(name, dimk, masked, chunking, id=cid, marks=(marks or {}).get(cid, ())))
    return out


def _reduced(case: Case, dim: Hashable | tuple | None) -> tuple[tuple, tuple]:
    if dim is None:
        return (), case.dims
    red = (dim,) if isinstance(dim, str) else tuple(dim)
    return tuple(d for d in case.dims if d not in red), red


def rows_of(values: np.ndarray, valid: np.ndarray, dims: tuple, kept: tuple, reduced: tuple):
    """Per index of the kept dims (C order, kept dims in data order): the valid voxels, and the
    number of masked-out voxels. This is the independent numpy view volnorm must agree with."""
    order = [dims.index(d) for d in kept] + [dims.index(d) for d in reduced]
    v = np.transpose(values, order)
    m = np.transpose(valid, order)
    kshape = v.shape[: len(kept)]
    n = int(np.prod(kshape)) if kept else 1
    v2, m2 = v.reshape(n, -1), m.reshape(n, -1)
    return kshape, [v2[i][m2[i]] for i in range(n)], (~m2).sum(axis=1)


def _float_edges(vals: np.ndarray, bins: int = 256) -> np.ndarray:
    return np.histogram(vals, bins=bins)[1]


def _centers(edges: np.ndarray) -> np.ndarray:
    e = edges.astype(np.float64)
    return (e[:-1] + e[1:]) / 2


# ---------------------------------------------------------------------------
# histogram, quantile, summarize: every data set x dim x mask x chunking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dimk", "masked", "chunking"), covering())
def test_histogram_equals_numpy(name, dimk, masked, chunking):
    case = get_case(name)
    dim = case.dim_options[dimk]
    x = case.open(chunking)
    h = vn.histogram(x, dim=dim, mask=case.mask(chunking) if masked else None)
    kept, reduced = _reduced(case, dim)
    assert h.dims == (*kept, "bin")
    h = h.compute()
    valid = case.valid(masked)
    _, rows, masked_out = rows_of(case.values, valid, case.dims, kept, reduced)
    allv = case.values[valid]
    counts = h.values.reshape(-1, h.sizes["bin"])
    if case.is_int:
        lo, hi = (0, 255) if case.values.dtype == np.uint8 else (int(allv.min()), int(allv.max()))
        np.testing.assert_array_equal(h["bin"].values, np.arange(lo, hi + 1))
        np.testing.assert_array_equal(h["bin_upper"].values - h["bin_lower"].values, 1.0)
        if not kept:
            np.testing.assert_array_equal(counts[0], np.bincount(allv.astype(np.int64) - lo, minlength=hi - lo + 1))
        for i, r in enumerate(rows):
            np.testing.assert_array_equal(counts[i], np.bincount(r.astype(np.int64) - lo, minlength=hi - lo + 1))
    else:
        ref, edges = np.histogram(allv, bins=256)
        assert h.sizes["bin"] == 256
        # numpy's edges, bit for bit (float32 data: float32 edges)
        np.testing.assert_array_equal(h["bin_lower"].values, edges[:-1].astype(np.float64))
        np.testing.assert_array_equal(h["bin_upper"].values, edges[1:].astype(np.float64))
        if not kept:
            np.testing.assert_array_equal(counts[0], ref)
        for i, r in enumerate(rows):
            np.testing.assert_array_equal(counts[i], np.histogram(r, bins=edges)[0])
    np.testing.assert_array_equal(h["n_masked_out"].values.reshape(-1), masked_out)
    for k in ("nan", "posinf", "neginf", "below", "above"):
        assert not h[f"n_{k}"].values.any(), k
    for k in ("n_masked_out", "n_nan"):
        assert h[k].dims == kept


# the 200-chunk lfw cases cost ~1.2 s each here; the per-row one (kept dim in the middle,
# masked, every row's refinement spread over all chunks) is the hardest and is kept
@pytest.mark.parametrize(
    ("name", "dimk", "masked", "chunking"),
    covering(skip=frozenset({"lfw_float64-all-mask-volume", "lfw_float64-volume-nomask-volume"})),
)
def test_quantile_equals_nanquantile(name, dimk, masked, chunking):
    case = get_case(name)
    dim = case.dim_options[dimk]
    got = vn.quantile(case.open(chunking), QS, dim=dim, mask=case.mask(chunking) if masked else None)
    kept, reduced = _reduced(case, dim)
    assert got.dims == (*kept, "quantile") and got.dtype == np.float64
    assert got.attrs["max_error"] == 0.0
    _, rows, _ = rows_of(case.values, case.valid(masked), case.dims, kept, reduced)
    ref = np.stack([np.nanquantile(r.astype(np.float64), QS) for r in rows])
    np.testing.assert_array_equal(got.values.reshape(-1, len(QS)), ref)


@functools.cache
def _summary_rows(name, dimk, masked, chunking, quantiles=()):
    """The summary (computed once, shared by the two summarize tests) and numpy's rows."""
    case = get_case(name)
    dim = case.dim_options[dimk]
    s = vn.summarize(case.open(chunking), dim=dim, mask=case.mask(chunking) if masked else None, quantiles=quantiles)
    kept, reduced = _reduced(case, dim)
    _, rows, masked_out = rows_of(case.values, case.valid(masked), case.dims, kept, reduced)
    assert s["mean"].dims == kept
    return s, [r.astype(np.float64) for r in rows], masked_out


def _summary_quantiles(chunking):
    # the quantile wiring is checked once per data set and dim; test_quantile covers the rest
    return (0.5,) if chunking == "odd" else ()


def _flat(s, v):
    return s[v].values.reshape(-1)


@pytest.mark.parametrize(("name", "dimk", "masked", "chunking"), covering())
def test_summarize_equals_numpy(name, dimk, masked, chunking):
    s, rows, masked_out = _summary_rows(name, dimk, masked, chunking, _summary_quantiles(chunking))
    np.testing.assert_array_equal(_flat(s, "count"), [r.size for r in rows])
    np.testing.assert_array_equal(_flat(s, "min"), [r.min() for r in rows])
    np.testing.assert_array_equal(_flat(s, "max"), [r.max() for r in rows])
    np.testing.assert_allclose(_flat(s, "mean"), [r.mean() for r in rows], rtol=1e-12)
    np.testing.assert_array_equal(_flat(s, "n_masked_out"), masked_out)
    for k in ("n_nan", "n_posinf", "n_neginf"):
        assert not _flat(s, k).any()
    if _summary_quantiles(chunking):
        np.testing.assert_array_equal(_flat(s, "q0.5"), [np.median(r) for r in rows])


# The "-one" chunkings put up to ~600 k voxels in one kernel row: the moments kernel sums in
# blocks, so its variance stays within 1e-12 of numpy's however long the row.


@pytest.mark.parametrize(
    ("name", "dimk", "masked", "chunking"),
    covering(),
)
def test_summarize_variance_equals_numpy(name, dimk, masked, chunking):
    s, rows, _ = _summary_rows(name, dimk, masked, chunking, _summary_quantiles(chunking))
    np.testing.assert_allclose(_flat(s, "var"), [r.var() for r in rows], rtol=1e-12)
    np.testing.assert_allclose(_flat(s, "std"), [r.std() for r in rows], rtol=1e-12)


@pytest.mark.parametrize("dtype", ["uint8", "float64"])
def test_variance_of_one_large_chunk_is_accurate(dtype):
    from fractions import Fraction

    image = skdata.camera()
    a = image.astype(np.int64).ravel()
    n = a.size
    exact = Fraction(n * int((a * a).sum()) - int(a.sum()) ** 2, n * n)
    assert abs(Fraction(float(image.astype(np.float64).var())) - exact) / exact < 1e-15  # numpy
    got = float(vn.summarize(xr.DataArray(image.astype(dtype), dims=("y", "x")), quantiles=())["var"])
    assert abs(Fraction(got) - exact) / exact < 1e-12, float(abs(Fraction(got) - exact) / exact)


# ---------------------------------------------------------------------------
# thresholds versus scikit-image
# ---------------------------------------------------------------------------


def _approx(got, ref, rel):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64), rtol=rel, atol=0)


def _sk_image(method: str, image: np.ndarray) -> np.ndarray:
    """scikit-image's threshold of an image (its own histogram)."""
    if method == "multiotsu":
        return np.asarray(SK[method](image, classes=3), dtype=np.float64)
    return np.atleast_1d(np.float64(SK[method](image)))


def _sk_hist(method: str, counts: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """scikit-image's threshold of a given histogram, with the empty end bins trimmed as
    volnorm (and scikit-image's own histogram(source_range='image')) does."""
    nz = np.flatnonzero(counts)
    counts, centers = counts[nz[0] : nz[-1] + 1], centers[nz[0] : nz[-1] + 1]
    if method == "multiotsu":
        return np.asarray(SK[method](classes=3, hist=(counts, centers)), dtype=np.float64)
    if method in ("otsu", "yen", "isodata"):
        return np.atleast_1d(np.float64(SK[method](hist=(counts, centers))))
    # li and triangle take no hist=: give scikit-image the integer image whose one-bin-per-value
    # histogram is exactly these counts (bin k holds the value k), then map its answer back
    index_image = np.repeat(np.arange(len(counts)), counts)
    t = float(SK[method](index_image))
    if method == "triangle":
        return np.atleast_1d(centers[int(t)])
    width = (centers[-1] - centers[0]) / (len(centers) - 1) if len(centers) > 1 else 0.0
    return np.atleast_1d(centers[0] + t * width)


METHODS = ["otsu", "li", "yen", "isodata", "triangle", "multiotsu"]


#: thresholds are functions of the histogram, whose chunk invariance is tested above:
#: a few (mask, chunking) pairs suffice here
MASK_CHUNK = [pytest.param(False, "one", id="nomask-one"), pytest.param(True, "odd", id="mask-odd")]


@pytest.mark.parametrize(("masked", "chunking"), [*MASK_CHUNK, pytest.param(True, "volume", id="mask-volume")])
@pytest.mark.parametrize("dimk", ["all", "volume"])
@pytest.mark.parametrize("method", METHODS)
def test_uint8_threshold_equals_skimage_on_the_image(method, dimk, masked, chunking):
    """uint8: scikit-image histograms an image with one bin per value over its min..max;
    volnorm must give scikit-image's threshold of the stacked array and of each volume."""
    case = get_case("skimage_uint8")
    dim = case.dim_options[dimk]
    got = vn.threshold(case.open(chunking), method, dim=dim, mask=case.mask(chunking) if masked else None)
    v = case.values
    m = case.mask_values
    if dimk == "all":
        ref = _sk_image(method, v[:, m] if masked else v)
        _approx(np.atleast_1d(got.values), ref, 1e-12)
    else:
        assert got.dims[0] == "volume"
        for i in range(v.shape[0]):
            ref = _sk_image(method, v[i][m] if masked else v[i])
            _approx(np.atleast_1d(got.values[i]), ref, 1e-12)


@pytest.mark.parametrize(
    ("dimk", "masked", "chunking"),
    [pytest.param("all", False, "odd", id="all-nomask-odd"), pytest.param("slice", True, "one", id="slice-mask-one")],
)
@pytest.mark.parametrize("method", ["otsu", "li", "yen", "isodata", "triangle"])
@pytest.mark.parametrize("name", ["anatomical_int16", "example4d_int16"])
def test_int16_threshold_equals_skimage_on_the_image(name, method, dimk, masked, chunking):
    """int16 NIfTI: one bin per integer in both libraries; per slice, volnorm shares the bins
    of the whole dataset and trims the empty end bins, which is scikit-image's histogram of
    the slice. (Each file holds a single volume, so per volume == the whole dataset.)"""
    case = get_case(name)
    dim = case.dim_options[dimk]
    got = vn.threshold(case.open(chunking), method, dim=dim, mask=case.mask(chunking) if masked else None)
    kept, reduced = _reduced(case, dim)
    _, rows, _ = rows_of(case.values, case.valid(masked), case.dims, kept, reduced)
    if not masked and not kept:
        rows = [case.values]  # the image itself, as a user would call scikit-image
    ref = np.concatenate([_sk_image(method, r) for r in rows])
    _approx(got.values.reshape(-1), ref, 1e-12)


def _float_threshold_setup(name, dimk, masked, keep=None):
    """The reference histograms: numpy's 256 bins over the whole (masked) data, shared by every
    index of the kept dims, as volnorm does. ``keep``: only these volumes."""
    case = get_case(name)
    dim = case.dim_options[dimk]
    kept, reduced = _reduced(case, dim)
    values, valid = case.values, case.valid(masked)
    if keep is not None:
        values, valid = values[keep], valid[keep]
    edges = _float_edges(values[valid])
    _, rows, _ = rows_of(values, valid, case.dims, kept, reduced)
    hists = [np.histogram(r, bins=edges)[0] for r in rows]
    return case, dim, edges, rows, hists


@pytest.mark.parametrize(
    ("dimk", "masked", "chunking"),
    [pytest.param("all", True, "one", id="all-mask-one"), pytest.param("volume", False, "odd", id="volume-nomask-odd")],
)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["lfw_float64", "lfw_float32"])
def test_float_threshold_equals_skimage_on_the_same_histogram(name, method, dimk, masked, chunking):
    case, dim, edges, rows, hists = _float_threshold_setup(name, dimk, masked)
    x = case.open(chunking)
    mask = case.mask(chunking) if masked else None
    if method in ("otsu", "multiotsu") and dimk == "volume":
        # a face whose voxels occupy fewer bins than there are classes cannot be split: for
        # multiotsu both libraries raise scikit-image's ValueError; for otsu see
        # test_otsu_of_an_almost_black_face_is_its_own. Face 152 is almost black.
        need = 2 if method == "otsu" else 3
        keep = [i for i, c in enumerate(hists) if np.count_nonzero(c) >= need]
        assert 0 < len(hists) - len(keep) <= 3
        x = x.isel(volume=keep)
        case, dim, edges, rows, hists = _float_threshold_setup(name, dimk, masked, keep)
    got = vn.threshold(x, method, dim=dim, mask=mask, bins=256)
    if dimk == "volume":
        # per group, each face on bins over its own range: scikit-image's threshold of the face
        ref = np.stack([_sk_image(method, r) for r in rows])
        _approx(got.values.reshape(ref.shape), ref, 1e-12 if name == "lfw_float64" else 1e-6)
        return
    if method == "li":  # Li iterates on the values, not on bins: scikit-image's of the image itself
        _approx(np.atleast_1d(got.values), _sk_image(method, rows[0]), 1e-12 if name == "lfw_float64" else 1e-6)
        return
    centers = _centers(edges)
    ref = np.stack([_sk_hist(method, c, centers) for c in hists])
    _approx(got.values.reshape(ref.shape), ref, 1e-12)
    if dimk == "all" and method != "li":
        # and scikit-image's own histogram of the image gives the same answer (float32 data:
        # scikit-image's bin centres are float32, ours float64)
        image = rows[0]
        _approx(np.atleast_1d(got.values), _sk_image(method, image), 1e-12 if name == "lfw_float64" else 1e-6)


def test_otsu_of_an_almost_black_face_is_its_own():
    """Face 152 is almost black: on bins shared with the dataset it occupied one bin; per group,
    on bins over its own range, it is thresholded as scikit-image thresholds it alone."""
    case, dim, _, rows, _ = _float_threshold_setup("lfw_float64", "volume", False)
    got = vn.threshold(case.open("one"), "otsu", dim=dim, bins=256).values
    for i, r in enumerate(rows):
        assert got[i] == pytest.approx(float(SK["otsu"](r)), rel=1e-12)


# ---------------------------------------------------------------------------
# a collection: camera, moon, coins at their native (different) shapes
# ---------------------------------------------------------------------------


@functools.cache
def _collection_images() -> dict[str, np.ndarray]:
    return {n: getattr(skdata, n)() for n in ("camera", "moon", "coins")}


def _collection(chunking: str) -> xr.DataTree:
    nodes = {}
    for n, im in _collection_images().items():
        a = xr.DataArray(im, dims=("y", "x"))
        a = a if chunking == "one" else a.chunk(-1 if chunking == "volume" else {"y": 177, "x": 111})
        nodes[n] = xr.Dataset({"image": a})
    return xr.DataTree.from_dict(nodes)


def _collection_mask() -> xr.DataTree:
    return xr.DataTree.from_dict(
        {n: xr.Dataset({"mask": (("y", "x"), im > im.mean())}) for n, im in _collection_images().items()}
    )


@pytest.mark.parametrize(
    ("dimk", "masked", "chunking"),
    [pytest.param(*p.values[1:], id=p.id.removeprefix("collection-")) for p in covering(["collection"])],
)
def test_collection_equals_numpy_and_skimage(dimk, masked, chunking):
    ims = _collection_images()
    names = list(ims)
    coll = _collection(chunking)
    mask = _collection_mask() if masked else None
    sel = {n: (im[im > im.mean()] if masked else im.ravel()) for n, im in ims.items()}
    dim = {"all": None, "volume": ("y", "x"), "slice": "x"}[dimk]
    h = vn.histogram(coll, dim=dim, mask=mask)
    if dimk == "all":
        allv = np.concatenate(list(sel.values()))
        h = h.compute()
        np.testing.assert_array_equal(h.values, np.bincount(allv, minlength=256))
        assert int(h["n_masked_out"]) == sum(im.size for im in ims.values()) - allv.size
        q = vn.quantile(coll, QS, mask=mask)
        np.testing.assert_array_equal(q.values, np.nanquantile(allv.astype(np.float64), QS))
        s = vn.summarize(coll, mask=mask, quantiles=(0.5,))
        a64 = allv.astype(np.float64)
        assert int(s["count"]) == allv.size and float(s["min"]) == a64.min() and float(s["max"]) == a64.max()
        np.testing.assert_allclose(float(s["mean"]), a64.mean(), rtol=1e-12)  # var: see below
        assert float(s["q0.5"]) == np.median(a64)
        for m in ("otsu", "li", "multiotsu"):
            _approx(np.atleast_1d(vn.threshold(coll, m, mask=mask).values), _sk_image(m, allv), 1e-12)
    elif dimk == "volume":
        assert isinstance(h, xr.DataArray) and h.dims == ("volume", "bin")
        assert list(h["volume"].values) == names
        h = h.compute()
        q = vn.quantile(coll, QS, dim=dim, mask=mask)
        s = vn.summarize(coll, dim=dim, mask=mask, quantiles=())
        t = vn.threshold(coll, "otsu", dim=dim, mask=mask)
        for i, n in enumerate(names):
            v = sel[n]
            np.testing.assert_array_equal(h.values[i], np.bincount(v, minlength=256))
            np.testing.assert_array_equal(q.values[i], np.nanquantile(v.astype(np.float64), QS))
            np.testing.assert_allclose(float(s["mean"][i]), v.astype(np.float64).mean(), rtol=1e-12)
            assert int(s["count"][i]) == v.size
            assert float(t[i]) == filters.threshold_otsu(v if masked else ims[n])
    else:  # one histogram per row: a DataTree with a node per volume
        assert isinstance(h, xr.DataTree) and set(h.children) == set(names)
        for n, im in ims.items():
            hn = h[n]["histogram"].compute()
            assert hn.dims == ("y", "bin")
            valid = im > im.mean() if masked else np.ones(im.shape, bool)
            for j in range(0, im.shape[0], 37):
                np.testing.assert_array_equal(hn.values[j], np.bincount(im[j][valid[j]], minlength=256))
            np.testing.assert_array_equal(hn["n_masked_out"].values, (~valid).sum(axis=1))


@pytest.mark.parametrize(
    ("dimk", "masked", "chunking"),
    [
        pytest.param(d, m, c, id=f"{d}-{'mask' if m else 'nomask'}-{c}")
        for d in ("all", "volume") for m in (False, True) for c in ("one", "odd")
    ],
)
def test_collection_variance_equals_numpy(dimk, masked, chunking):
    ims = _collection_images()
    sel = [im[im > im.mean()] if masked else im.ravel() for im in ims.values()]
    dim = None if dimk == "all" else ("y", "x")
    s = vn.summarize(_collection(chunking), dim=dim, mask=_collection_mask() if masked else None, quantiles=())
    rows = [np.concatenate(sel)] if dimk == "all" else sel
    rows = [r.astype(np.float64) for r in rows]
    np.testing.assert_allclose(s["var"].values.reshape(-1), [r.var() for r in rows], rtol=1e-12)
    np.testing.assert_allclose(s["std"].values.reshape(-1), [r.std() for r in rows], rtol=1e-12)


# ---------------------------------------------------------------------------
# weights, serialization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", ["one", "odd"])
@pytest.mark.parametrize("dimk", ["all", "volume"])
def test_weights_equal_numpy_histogram_weights(dimk, chunking):
    case = get_case("lfw_float64")
    x = case.open(chunking)
    w = np.random.default_rng(0).gamma(2.0, size=case.values.shape)
    wa = xr.DataArray(w, dims=case.dims)
    if chunking == "odd":
        wa = wa.chunk({"volume": 50, "y": 5})  # chunked unlike the data
    dim = case.dim_options[dimk]
    h = vn.histogram(x, bins=256, dim=dim, weights=wa).compute()
    assert h.dtype == np.float64
    ref, edges = np.histogram(case.values, bins=256, weights=w)
    np.testing.assert_array_equal(h["bin_lower"].values, edges[:-1])
    if dimk == "all":
        np.testing.assert_allclose(h.values, ref, rtol=1e-12)
    else:
        for i in range(case.values.shape[0]):
            np.testing.assert_allclose(h.values[i], np.histogram(case.values[i], bins=edges, weights=w[i])[0], rtol=1e-12, atol=1e-12)
    # the counters still count voxels, not weights
    assert h["n_masked_out"].dtype == np.int64 and not h["n_nan"].values.any()


def _netcdf_engine() -> str | None:
    for engine, module in (("netcdf4", "netCDF4"), ("h5netcdf", "h5netcdf"), ("scipy", "scipy")):
        if importlib.util.find_spec(module) is not None:
            return engine
    return None


@pytest.mark.parametrize("fmt", ["zarr", "netcdf"])
def test_histogram_roundtrips_through_a_file_and_still_merges(tmp_path, fmt):
    case = get_case("lfw_float32")
    x = case.open("odd")
    mask = case.mask("odd")
    kw = {"bins": 64, "range": (0.0, 1.0), "dim": ("volume", "x"), "mask": mask}  # counters per row y
    first = vn.histogram(x.isel(volume=slice(0, 120)), **kw).compute()
    if fmt == "zarr":
        first.to_dataset().to_zarr(tmp_path / "h.zarr", consolidated=False)
        back = xr.open_zarr(tmp_path / "h.zarr", consolidated=False)["histogram"]
    else:
        engine = _netcdf_engine()
        if engine is None:
            pytest.skip("no netCDF engine installed (netCDF4, h5netcdf or scipy)")
        first.to_dataset().to_netcdf(tmp_path / "h.nc", engine=engine)
        with xr.open_dataset(tmp_path / "h.nc", engine=engine) as ds:
            back = ds["histogram"].load()
    # counts, edges and every counter survive (netCDF-3 stores int64 as int32: values only)
    np.testing.assert_array_equal(back.values, first.values)
    for c in ("bin", "bin_lower", "bin_upper", *(f"n_{k}" for k in EXTRA)):
        np.testing.assert_array_equal(back[c].values, first[c].values, err_msg=c)
        assert back[c].dims == first[c].dims
    assert int(back["n_masked_out"].sum()) > 0
    # ... and it merges with a histogram computed now into the histogram of the whole
    rest = vn.histogram(x.isel(volume=slice(120, None)), **kw)
    merged = vn.merge_histograms([back, rest]).compute()
    whole = vn.histogram(x, **kw).compute()
    np.testing.assert_array_equal(merged.values, whole.values)
    for k in EXTRA:
        np.testing.assert_array_equal(merged[f"n_{k}"].values, whole[f"n_{k}"].values, err_msg=k)
    np.testing.assert_array_equal(merged["bin_lower"].values, whole["bin_lower"].values)


# ---------------------------------------------------------------------------
# hypothesis
# ---------------------------------------------------------------------------


@settings(deadline=None, max_examples=20)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 3),
    n=st.integers(1, 200),
    dtype=st.sampled_from(["float32", "float64"]),
    tail=st.sampled_from(["normal", "cauchy", "pareto"]),
    nan_frac=st.sampled_from([0.0, 0.1, 0.5]),
    per_row=st.booleans(),
    chunk=st.integers(8, 64),
    q=st.lists(st.floats(0, 1), min_size=1, max_size=5),
)
def test_quantile_estimate_within_its_bound_and_exact_equals_numpy(seed, rows, n, dtype, tail, nan_frac, per_row, chunk, q):
    rng = np.random.default_rng(seed)
    v = {"normal": rng.normal(3.0, 2.0, (rows, n)), "cauchy": rng.standard_cauchy((rows, n)),
         "pareto": rng.pareto(0.7, (rows, n))}[tail].astype(dtype)  # heavy tails: cauchy, pareto
    v[rng.random(v.shape) < nan_frac] = np.nan
    v[:, 0] = rng.normal(size=rows)  # every row keeps a finite value
    x = xr.DataArray(v, dims=("volume", "x")).chunk({"x": chunk})
    dim = "x" if per_row else None
    v64 = v.astype(np.float64)
    ref = np.nanquantile(v64, q, axis=1).T if per_row else np.nanquantile(v64.ravel(), q)
    exact = vn.quantile(x, q, dim=dim)
    np.testing.assert_array_equal(exact.values, ref)
    assert exact.attrs["max_error"] == 0
    rough = vn.quantile(x, q, dim=dim, exact=False)
    bound = rough.attrs["max_error"]
    assert bound > 0
    assert np.all(np.abs(rough.values - ref) <= bound), (rough.values, ref, bound)


@pytest.mark.parametrize(
    ("values", "q"),
    [
        pytest.param([1.0, 2.0, np.inf], [0.5, 1.0], id="median-next-to-inf"),
        pytest.param([-np.inf, 1.0, 2.0], [0.0], id="min-is-minus-inf"),
        pytest.param([1.0, np.inf, np.inf], [0.5], id="on-an-inf"),
    ],
)
def test_quantile_with_infinities_returns_the_order_statistic(values, q):
    """Documented difference: where numpy's interpolation computes inf * 0 (NaN), volnorm returns
    the order statistic the quantile falls on; everywhere else the two agree."""
    v = np.array(values)
    with np.errstate(invalid="ignore"):
        ref = np.nanquantile(v, q)
    got = vn.quantile(xr.DataArray(v, dims="x"), q).values
    pos = (len(v) - 1) * np.asarray(q)
    on_rank = pos == np.floor(pos)
    np.testing.assert_array_equal(got[on_rank], np.sort(v)[pos[on_rank].astype(int)])
    np.testing.assert_array_equal(got[~np.isnan(ref)], ref[~np.isnan(ref)])
    assert np.isnan(ref).any() and not np.isnan(got).any()


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**32 - 1),
    nvol=st.integers(2, 6),
    ny=st.integers(1, 8),
    nx=st.integers(1, 8),
    dtype=st.sampled_from(["float32", "float64", "int16", "uint8"]),
    bins=st.integers(1, 40),
    use_mask=st.booleans(),
    data=st.data(),
)
def test_merge_of_random_splits_equals_the_whole(seed, nvol, ny, nx, dtype, bins, use_mask, data):
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 30, (nvol, ny, nx))
    if dtype.startswith("float"):
        v[rng.random(v.shape) < 0.1] = np.nan
        v[rng.random(v.shape) < 0.05] = np.inf
        v[rng.random(v.shape) < 0.05] = -np.inf
    v = np.abs(v).astype(dtype) if dtype == "uint8" else v.astype(dtype)
    x = xr.DataArray(v, dims=("volume", "y", "x"))
    mask = xr.DataArray(rng.random((ny, nx)) > 0.3, dims=("y", "x")) if use_mask else None
    kw = {"bins": bins, "range": (-40.0, 40.0), "mask": mask}
    cuts = sorted(data.draw(st.sets(st.integers(1, nvol - 1), min_size=1, max_size=nvol - 1)))
    bounds = [0, *cuts, nvol]
    parts = [vn.histogram(x.isel(volume=slice(a, b)).chunk({"y": 3}), **kw) for a, b in itertools.pairwise(bounds)]
    merged = vn.merge_histograms(parts).compute()
    whole = vn.histogram(x, **kw).compute()
    np.testing.assert_array_equal(merged.values, whole.values)
    for c in ("bin", "bin_lower", "bin_upper", *(f"n_{k}" for k in EXTRA)):
        np.testing.assert_array_equal(merged[c].values, whole[c].values, err_msg=c)
    # nothing lost: every voxel is in exactly one counter
    assert int(whole.sum()) + sum(int(whole[f"n_{k}"]) for k in EXTRA) == v.size


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**32 - 1),
    shapes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4),
    family=st.sampled_from(["int", "float"]),
    data=st.data(),
)
def test_collection_histogram_equals_histogram_of_concatenated_values(seed, shapes, family, data):
    rng = np.random.default_rng(seed)
    dtypes = ["uint8", "int16"] if family == "int" else ["float32", "float64"]
    images = []
    for shape in shapes:
        dt = data.draw(st.sampled_from(dtypes))
        im = rng.normal(100, 40, shape)
        if family == "float":
            im[rng.random(shape) < 0.1] = np.nan
        images.append(np.clip(im, 0, 255).astype(dt) if dt == "uint8" else im.astype(dt))
    if family == "float":
        images[0].flat[0] = 1.5  # at least one finite value
    coll = xr.DataTree.from_dict({f"v{i}": xr.Dataset({"image": (("y", "x"), im)}) for i, im in enumerate(images)})
    allv = np.concatenate([im.ravel() for im in images])
    h = vn.histogram(coll).compute()
    # the histogram of the concatenated values, by volnorm and by numpy
    flat = vn.histogram(xr.DataArray(allv, dims="x")).compute()
    np.testing.assert_array_equal(h.values, flat.values)
    np.testing.assert_array_equal(h["bin_lower"].values, flat["bin_lower"].values)
    if family == "int":
        lo = int(h["bin"].values[0])
        assert lo == (0 if all(im.dtype == np.uint8 for im in images) else int(allv.min()))
        np.testing.assert_array_equal(h.values, np.bincount(allv.astype(np.int64) - lo, minlength=h.sizes["bin"]))
    else:
        fin = allv[np.isfinite(allv)]
        ref, edges = np.histogram(fin, bins=256)
        np.testing.assert_array_equal(h.values, ref)
        np.testing.assert_array_equal(h["bin_lower"].values, edges[:-1].astype(np.float64))
        assert int(h["n_nan"]) == np.isnan(allv).sum()


# ---------------------------------------------------------------------------
# a process-based distributed cluster gives bit-identical results
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _on_cluster(client):
    """Run every dask.compute inside on the cluster; fail if nothing ran there."""
    from distributed import get_task_stream

    with dask.config.set(scheduler=client), get_task_stream(client=client) as ts:
        yield
    workers = set(client.scheduler_info()["workers"])
    assert ts.data, "no task ran on the cluster"
    assert {t["worker"] for t in ts.data} <= workers


def _threaded():
    return dask.config.set(scheduler="threads")


def _cluster_data():
    """Few but several chunks per array (each pass on the cluster costs a round trip per task wave)."""
    f32 = get_case("lfw_float32")
    x = xr.DataArray(f32.values, dims=f32.dims).chunk({"volume": 50, "y": 13})
    m = xr.DataArray(f32.mask_values, dims=f32.mask_dims)
    return f32, x, m


@pytest.mark.slow
def test_cluster_histograms_equal_threaded(cluster_client):
    u8, anat = get_case("skimage_uint8"), get_case("anatomical_int16")
    _, x, m = _cluster_data()
    jobs = [
        lambda: vn.histogram(u8.open("volume"), dim=("y", "x"), mask=u8.mask("one")).compute(),  # int
        lambda: vn.histogram(x, dim=("volume", "x"), mask=m).compute(),  # float, range pass too
        lambda: vn.histogram(vn.open_nifti(anat.path, chunks={"z": 9}), dim=("y", "x")).compute(),  # the NIfTI reader on workers
        lambda: vn.histogram(_collection("volume"), mask=_collection_mask()).compute(),  # a collection
    ]
    for job in jobs:
        with _threaded():
            local = job()
        with _on_cluster(cluster_client):
            remote = job()
        xr.testing.assert_identical(remote, local)


@pytest.mark.slow
def test_cluster_quantile_summarize_threshold_equal_threaded(cluster_client):
    f32, x, m = _cluster_data()
    jobs = [
        lambda: vn.quantile(x, QS, mask=m),  # float, exact: range, histogram and refinement passes
        lambda: vn.quantile(x, QS, dim=("y", "x"), mask=m),  # ... per volume
        lambda: vn.summarize(x, dim=("y", "x"), mask=m, quantiles=(0.5,)),
        lambda: vn.threshold(x, "li", mask=m, bins=256),
        lambda: vn.threshold(_collection("volume"), "otsu", dim=("y", "x"), mask=_collection_mask()),
    ]
    remote = []
    for job in jobs:
        with _threaded():
            local = job()
        with _on_cluster(cluster_client):
            remote.append(job())
        xr.testing.assert_identical(remote[-1], local)
    # and the cluster's answer is numpy's
    ref = np.nanquantile(f32.values[f32.valid(True)].astype(np.float64), QS)
    np.testing.assert_array_equal(remote[0].values, ref)
