"""Every colour function equals the reference it names, on scikit-image's colour samples and
on generated data: matplotlib's colormaps (applied and inverted within the stated bound), the
HSP perceived brightness, OpenCV's BGR order, random dithering, a palette made by cv2.kmeans."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from hypothesis import example, given, settings
from hypothesis import strategies as st

import volnorm as vn

matplotlib = pytest.importorskip("matplotlib")
skimage_data = pytest.importorskip("skimage.data")

CMAPS = ["jet", "viridis", "gray", "magma"]


def _photo(name: str) -> np.ndarray:
    try:
        return getattr(skimage_data, name)()
    except Exception as e:  # noqa: BLE001 - a sample that is not shipped offline
        pytest.skip(f"{name} not available: {e}")


# ---------------------------------------------------------------------------
# colormaps: apply equals matplotlib; invert within attrs["max_error"]
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cmap", CMAPS)
def test_apply_colormap_bytes_equal_matplotlib_on_camera(cmap):
    cam = _photo("camera").astype(np.float32) * 7.5 + 100  # a 16-bit-like range
    got = vn.apply_colormap(xr.DataArray(cam, dims=("y", "x")).chunk({"y": 128}), cmap, vmin=300, vmax=1800)
    want = matplotlib.colormaps[cmap](matplotlib.colors.Normalize(300, 1800)(cam), bytes=True)
    np.testing.assert_array_equal(got.values, want)


def _renders(cmap: str, x: np.ndarray, lo: float, hi: float) -> dict[str, np.ndarray]:
    cm = matplotlib.colormaps[cmap]
    norm = matplotlib.colors.Normalize(lo, hi)(x)
    f = cm(norm)
    b = cm(norm, bytes=True)
    return {"uint8": b, "float64": f, "float32": f.astype(np.float32), "uint8/255": b / 255.0,
            "uint8/255 float32": (b / 255.0).astype(np.float32)}


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), cmap=st.sampled_from(CMAPS), lo=st.floats(-1e4, 1e4), width=st.floats(1e-2, 1e5),
       render=st.sampled_from(["uint8", "float64", "float32", "uint8/255", "uint8/255 float32"]), n_channels=st.sampled_from([3, 4]))
def test_invert_colormap_stays_within_its_stated_bound(seed, cmap, lo, width, render, n_channels):
    """matplotlib's renders (its default float RGBA, bytes=True, and what plt.imread gives of a
    PNG), RGB or RGBA: ``|inverted - x| <= attrs["max_error"]`` for every x in [vmin, vmax].
    Before, float renders broke it: jet 35.2 > 23.4, viridis 17.6 > 11.7 (10.5 % of values)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(lo, lo + width, 400), lo + (np.arange(256) + 0.5) * width / 256, [lo, lo + width]])
    rgb = _renders(cmap, x, lo, lo + width)[render][:, :n_channels]
    back = vn.invert_colormap(xr.DataArray(rgb, dims=("x", "channel")), cmap, lo, lo + width)
    err = np.abs(back.values - x)
    assert np.max(err) <= back.attrs["max_error"] * (1 + 1e-9) + 1e-9 * abs(lo)
    assert float(back["distance"].max()) < 1e-3  # every render is one of the colours looked at


@pytest.mark.parametrize("cmap", CMAPS)
def test_invert_colormap_bound_over_every_entry_and_the_old_failure(cmap):
    lo, hi = 1500.0, 4500.0
    x = np.linspace(lo, hi, 20001)
    for render, rgb in _renders(cmap, x, lo, hi).items():
        back = vn.invert_colormap(xr.DataArray(rgb, dims=("x", "channel")), cmap, lo, hi)
        err = np.abs(back.values - x)
        assert err.max() <= back.attrs["max_error"] + 1e-9, (render, err.max(), back.attrs["max_error"])
        if render == "float64":  # matplotlib's own float output: the float colours are matched exactly
            assert err.max() <= (1.5 if cmap == "jet" else 0.5) * back.attrs["step"] + 1e-9


def test_invert_colormap_reads_what_apply_colormap_wrote():
    x = xr.DataArray(np.linspace(-40.0, 120.0, 501), dims="x")
    rgba = vn.apply_colormap(x, "magma", vmin=-40, vmax=120)
    assert rgba.attrs["colormap"] == "magma" and rgba.attrs["colormap_n"] == 256
    back = vn.invert_colormap(rgba)  # colormap, vmin, vmax: from attrs (before: viridis over 0-1)
    assert back.attrs["from_attrs"] == ["colormap", "vmin", "vmax"]
    assert back.attrs["colormap"] == "magma" and back.attrs["vmin"] == -40 and back.attrs["vmax"] == 120
    assert np.max(np.abs(back.values - x.values)) <= back.attrs["max_error"] + 1e-9
    explicit = vn.invert_colormap(rgba, "magma", -40, 120)
    np.testing.assert_array_equal(explicit.values, back.values)
    assert explicit.attrs["from_attrs"] == []
    # a resampled colormap (quantize_grey) is inverted with its own number of colours
    q = vn.color.quantize_grey(x, 8, "viridis", vmin=-40, vmax=120)
    qb = vn.invert_colormap(q)
    assert qb.attrs["step"] == pytest.approx(160 / 8)
    assert np.max(np.abs(qb.values - x.values)) <= qb.attrs["max_error"] + 1e-9
    # no attrs: the documented defaults
    bare = vn.invert_colormap(rgba.copy(data=rgba.values).drop_attrs())
    assert bare.attrs["from_attrs"] == [] and bare.attrs["colormap"] == "viridis" and bare.attrs["vmax"] == 1.0


# ---------------------------------------------------------------------------
# perceived brightness (HSP), luma, channel labels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_perceived_brightness_is_the_hsp_formula(name):
    img = _photo(name)
    f = img.astype(np.float64)
    hsp = np.sqrt(0.241 * f[..., 0] ** 2 + 0.691 * f[..., 1] ** 2 + 0.068 * f[..., 2] ** 2)
    got = vn.color.to_grey(xr.DataArray(img, dims=("y", "x", "channel")).chunk({"y": 97}), method="perceived")
    np.testing.assert_allclose(got.values, hsp, rtol=2e-6, atol=1e-3)
    rep = vn.color.exposure(xr.DataArray(img[None], dims=("volume", "y", "x", "channel")))
    np.testing.assert_allclose(rep["brightness"].values, [hsp.mean() / 255], rtol=1e-5)
    # custom weights: a weighted sum (were refused)
    w = (0.25, 0.5, 0.25)
    got_w = vn.color.to_grey(xr.DataArray(img, dims=("y", "x", "channel")), method=w)
    np.testing.assert_allclose(got_w.values, w[0] * f[..., 0] + w[1] * f[..., 1] + w[2] * f[..., 2], rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="3 finite weights"):
        vn.color.to_grey(xr.DataArray(img, dims=("y", "x", "channel")), method=(1.0, 2.0))


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_bgr_labelled_channels_equal_opencv(name):
    cv2 = pytest.importorskip("cv2")
    bgr = np.ascontiguousarray(_photo(name)[..., ::-1])  # as cv2.imread gives it
    x = xr.DataArray(bgr, dims=("y", "x", "channel"), coords={"channel": ["B", "G", "R"]})
    got = vn.color.to_grey(x)
    # OpenCV's float path: 0.299 R + 0.587 G + 0.114 B in float32
    want = cv2.cvtColor(bgr.astype(np.float32), cv2.COLOR_BGR2GRAY)
    np.testing.assert_allclose(got.values, want, rtol=1e-6, atol=1e-3)
    # its uint8 path rounds a 14-bit fixed-point sum: within one grey level of ours rounded
    want8 = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(int)
    diff = np.abs(np.round(got.values).astype(int) - want8)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # before, the labels were ignored: B read as R (an error of tens of grey levels)
    unlabelled = vn.color.to_grey(x.drop_vars("channel"))
    assert float(np.abs(unlabelled - got).max()) > 20
    # RGBA labelled in another order, full names, any case
    rgba = np.concatenate([bgr, np.full(bgr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    y = xr.DataArray(rgba, dims=("y", "x", "channel"), coords={"channel": ["blue", "Green", "RED", "alpha"]})
    np.testing.assert_array_equal(vn.color.to_grey(y).values, got.values)


def test_unknown_channel_labels_are_refused():
    x = xr.DataArray(np.zeros((2, 2, 3), np.uint8), dims=("y", "x", "channel"), coords={"channel": ["Y", "Cb", "Cr"]})
    with pytest.raises(ValueError, match="do not name R, G, B once each"):
        vn.color.to_grey(x)
    with pytest.raises(ValueError, match="do not name R, G, B once each"):
        vn.color.to_grey(x.assign_coords(channel=["R", "R", "B"]))
    with pytest.raises(ValueError, match="do not name R, G, B, A once each"):
        vn.color.to_grey(xr.DataArray(np.zeros((2, 4), np.uint8), dims=("x", "channel"), coords={"channel": ["R", "G", "B", "X"]}))
    ok = x.assign_coords(channel=[0, 1, 2])  # positions: R, G, B
    assert vn.color.to_grey(ok).shape == (2, 2)


def test_bgr_labels_are_honoured_by_the_colour_space_functions():
    img = _photo("astronaut")[:64, :64]
    rgb = xr.DataArray(img, dims=("y", "x", "channel"))
    bgr = xr.DataArray(np.ascontiguousarray(img[..., ::-1]), dims=("y", "x", "channel"), coords={"channel": ["B", "G", "R"]})
    d_rgb, d_bgr = vn.color.desaturate(rgb, 0.3), vn.color.desaturate(bgr, 0.3)
    assert d_bgr["channel"].values.tolist() == ["R", "G", "B"]  # RGB order, labelled
    np.testing.assert_array_equal(d_bgr.values, d_rgb.values)
    np.testing.assert_array_equal(vn.color.equalize_color(bgr).values, vn.color.equalize_color(rgb).values)


# ---------------------------------------------------------------------------
# random (binomial) dithering
# ---------------------------------------------------------------------------


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**32), level=st.floats(0.0, 1.0), ny=st.integers(8, 80), nx=st.integers(8, 80),
       cy=st.integers(1, 40), cx=st.integers(1, 40))
@example(seed=0, level=5.212675509453934e-207, ny=8, nx=8, cy=1, cx=1)  # seed 0's first draw had been exactly 0
def test_random_dither_is_binomial_and_chunk_independent(seed, level, ny, nx, cy, cx):
    x = xr.DataArray(np.full((2, ny, nx), level), dims=("volume", "y", "x"))
    bits = vn.dither(x, "random", in_range=(0, 1), seed=seed)
    n = bits.size
    sd = np.sqrt(level * (1 - level) / n)
    assert abs(float(bits.mean()) - level) <= 5 * sd + 1e-12  # binomial: 5 sd
    if level in (0.0, 1.0):
        assert bool(bits.all()) == (level == 1.0) and bool(bits.any()) == (level == 1.0)
    chunked = vn.dither(x.chunk({"volume": 1, "y": cy, "x": cx}), "random", in_range=(0, 1), seed=seed)
    np.testing.assert_array_equal(chunked.values, bits.values)  # the same bits whatever the chunking


def test_random_dither_on_camera_keeps_the_mean_and_is_recorded():
    cam = _photo("camera")
    x = xr.DataArray(cam, dims=("y", "x"))
    bits = vn.dither(x, "random", seed=7)
    g = (cam.astype(np.float64) - cam.min()) / (cam.max() - cam.min())
    sd = np.sqrt((g * (1 - g)).sum()) / g.size  # the sum of independent Bernoulli(g)
    assert abs(float(bits.mean()) - g.mean()) <= 5 * sd
    # local means too: 16x16 blocks within 5 sd of their values' mean
    b = bits.values.reshape(32, 16, 32, 16).mean(axis=(1, 3))
    gb = g.reshape(32, 16, 32, 16)
    sdb = np.sqrt((gb * (1 - gb)).sum(axis=(1, 3))) / 256
    assert np.all(np.abs(b - gb.mean(axis=(1, 3))) <= 5 * sdb + 1e-12)
    # independent of the value: bits of two seeds agree as two independent draws would
    other = vn.dither(x, "random", seed=8).values
    assert not np.array_equal(other, bits.values)
    np.testing.assert_array_equal(vn.dither(x.chunk({"y": 100, "x": 77}), "random", seed=7).values, bits.values)
    # provenance: the step, its window and its seed (dither was missing from the recorded steps)
    steps = json.loads(bits.attrs["volnorm_params"])
    assert [s["method"] for s in steps] == ["dither"]
    assert steps[0]["options"] == {"method": "random", "in_range": "minmax", "dim": ["y", "x"], "seed": 7}
    assert steps[0]["values"]["data_vars"]["in_lo"]["data"] == cam.min()
    assert [s["method"] for s in json.loads(vn.dither(vn.rescale(x)).attrs["volnorm_params"])] == ["rescale", "dither"]


def test_dither_step_survives_a_store(tmp_path):
    x = xr.DataArray(_photo("camera")[None, :64, :64], dims=("volume", "y", "x"))
    bits = vn.dither(x, "random", seed=2)
    vn.to_zarr(bits, tmp_path / "d.zarr")
    back = vn.open_zarr(tmp_path / "d.zarr")
    assert [s["method"] for s in json.loads(back.attrs["volnorm_params"])] == ["dither"]
    np.testing.assert_array_equal(back.values.astype(bool), bits.values)


# ---------------------------------------------------------------------------
# quantize with a palette made elsewhere
# ---------------------------------------------------------------------------


def test_quantize_with_a_cv2_kmeans_palette_equals_numpy_nearest_colour():
    cv2 = pytest.importorskip("cv2")
    img = _photo("astronaut")
    pts = img.reshape(-1, 3).astype(np.float32)
    cv2.setRNGSeed(0)
    _, _, centres = cv2.kmeans(pts, 8, None, (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0), 1, cv2.KMEANS_PP_CENTERS)
    x = xr.DataArray(img, dims=("y", "x", "channel")).chunk({"y": 128})
    labels = vn.color.quantize(x, params=centres, labels=True)
    c = centres.astype(np.float64)
    d = ((img.reshape(-1, 1, 3).astype(np.float64) - c[None]) ** 2).sum(-1)
    want = d.argmin(axis=1).reshape(img.shape[:2])
    np.testing.assert_array_equal(labels.values, want)
    colours = vn.color.quantize(x, params=centres)
    np.testing.assert_array_equal(colours.values, c.round().clip(0, 255).astype(np.uint8)[want])
    rec = json.loads(colours.attrs["volnorm_params"])[-1]
    assert rec["method"] == "quantize" and rec["options"] == {"n_colors": 8, "source": "palette"}
    with pytest.raises(ValueError, match="channels"):
        vn.color.quantize(x, params=centres[:, :2])
