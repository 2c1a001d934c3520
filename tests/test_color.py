"""Colour: greyscale and colormaps against matplotlib and scikit-image, on scikit-image's
colour samples and generated data; lazy and chunking-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import volnorm as vn

matplotlib = pytest.importorskip("matplotlib")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(params=["astronaut", "coffee", "chelsea"])
def photo(request):
    try:
        img = getattr(skimage_data, request.param)()
    except Exception as e:  # noqa: BLE001 - a sample that is not shipped offline
        pytest.skip(f"{request.param} not available: {e}")
    return xr.DataArray(img, dims=("y", "x", "channel"))


@pytest.mark.parametrize("method", ["rec601", "rec709", "perceived"])
def test_grey_equals_the_formula_and_skimage(photo, method):
    g = vn.color.to_grey(photo.chunk({"y": 100}), method=method)
    assert g.chunks is not None and g.dims == ("y", "x")  # lazy, chunks kept
    f = photo.values.astype(np.float64)
    if method == "perceived":
        want = np.sqrt(0.241 * f[..., 0] ** 2 + 0.691 * f[..., 1] ** 2 + 0.068 * f[..., 2] ** 2)
    else:
        w = vn.color.LUMA[method]
        want = w[0] * f[..., 0] + w[1] * f[..., 1] + w[2] * f[..., 2]
    np.testing.assert_allclose(g.values, want, rtol=1e-6, atol=1e-3)
    if method == "rec709":  # scikit-image's rgb2gray: 0.2125, 0.7154, 0.0721 on [0, 1]
        from skimage.color import rgb2gray

        np.testing.assert_allclose(g.values / 255, rgb2gray(photo.values), atol=2e-3)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float16", "float32", "float64"])
@pytest.mark.parametrize("method", ["rec601", "rec709", "perceived"])
def test_grey_is_numpys_formula_bit_for_bit_in_any_layout(dtype, method):
    rng = np.random.default_rng(7)
    px = (rng.random((3, 4, 20, 30)) * 255).astype(dtype)  # channel first: it need not be last
    x = xr.DataArray(px, dims=("channel", "volume", "y", "x"))
    ft = np.float32 if px.dtype.itemsize <= 2 or px.dtype == np.float32 else np.float64
    c = [px[i].astype(ft) for i in range(3)]
    w = vn.color.PERCEIVED if method == "perceived" else vn.color.LUMA[method]  # HSP (was the BT.601 weights)
    want = np.sqrt(w[0] * c[0] ** 2 + w[1] * c[1] ** 2 + w[2] * c[2] ** 2) if method == "perceived" else w[0] * c[0] + w[1] * c[1] + w[2] * c[2]
    got = vn.color.to_grey(x.chunk({"channel": 1, "y": 7}), method=method)  # channels in separate chunks too
    assert got.dims == ("volume", "y", "x") and got.dtype == ft and got.chunks is not None
    np.testing.assert_array_equal(got.values, want.astype(ft))


@pytest.mark.parametrize("cmap", ["viridis", "jet", "gray", "magma", "tab10"])
def test_apply_colormap_equals_matplotlib(cmap):
    rng = np.random.default_rng(1)
    x = rng.normal(3000, 900, (40, 50)).astype(np.float32)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = np.nan, 1500.0, 4500.0, -1e9  # bad, the ends, under
    da_ = xr.DataArray(x, dims=("y", "x")).chunk({"y": 7})
    got = vn.color.apply_colormap(da_, cmap, vmin=1500, vmax=4500)
    assert got.dims == ("y", "x", "channel") and got.dtype == np.uint8 and got.chunks is not None
    cm = matplotlib.colormaps[cmap]
    want = cm(matplotlib.colors.Normalize(1500, 4500)(x), bytes=True)
    np.testing.assert_array_equal(got.values, want)


@settings(deadline=None, max_examples=150)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(["float16", "float32", "float64", "uint8", "int16", "int32", "int64"]),
       cmap=st.sampled_from(["viridis", "jet", "tab20"]), lo=st.floats(-300, 300), width=st.one_of(st.sampled_from([0.0, 1e-3, 1.0]), st.floats(0.01, 700)))
def test_apply_colormap_equals_matplotlib_for_any_dtype_and_range(seed, dtype, cmap, lo, width):
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo - width - 5, lo + 2 * width + 5, 300)
    x[:4] = lo, lo + width, np.nextafter(lo + width, np.inf), np.nextafter(lo, -np.inf)  # the ends and just past them
    x = x.astype(dtype) if dtype.startswith("float") else x.clip(np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    if dtype.startswith("float"):
        x[4:7] = np.nan, np.inf, -np.inf
    got = vn.color.apply_colormap(xr.DataArray(x, dims="x").chunk({"x": 64}), cmap, vmin=lo, vmax=lo + width)
    ref = x.astype(np.float32) if dtype == "float16" else x  # volnorm computes float16 in float32
    with np.errstate(over="ignore"):  # matplotlib's own overflow to inf (then "over")
        want = matplotlib.colormaps[cmap](matplotlib.colors.Normalize(lo, lo + width)(ref), bytes=True)
    np.testing.assert_array_equal(got.values, want)


def test_apply_colormap_on_integers_and_default_range():
    x = xr.DataArray(np.arange(0, 1000, 7, dtype=np.int16), dims="x")
    got = vn.color.apply_colormap(x, "viridis")
    want = matplotlib.colormaps["viridis"](matplotlib.colors.Normalize(0, 994)(x.values), bytes=True)
    np.testing.assert_array_equal(got.values, want)
    assert got.attrs["vmin"] == 0 and got.attrs["vmax"] == 994


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**16), cmap=st.sampled_from(["jet", "viridis", "plasma", "cividis"]),
       lo=st.floats(-1e4, 1e4), width=st.floats(1e-2, 1e5))
def test_round_trip_is_within_half_a_step(seed, cmap, lo, width):
    x = np.random.default_rng(seed).uniform(lo, lo + width, 300)
    rgba = vn.color.apply_colormap(xr.DataArray(x, dims="x"), cmap, vmin=lo, vmax=lo + width)
    back = vn.color.invert_colormap(rgba, cmap, vmin=lo, vmax=lo + width)
    step = width / 256
    assert back.attrs["step"] == pytest.approx(step)
    assert np.max(np.abs(back.values - x)) <= back.attrs["max_error"] * (1 + 1e-9) + 1e-9 * abs(lo)
    assert float(back["distance"].max()) == 0.0
    # the bound: half a step where every colour is distinct, one step where two entries
    # share a uint8 colour (viridis, cividis), two for jet's runs of four
    assert back.attrs["max_error"] == pytest.approx(step * {"plasma": 0.5, "viridis": 1.0, "cividis": 1.0, "jet": 2.0}[cmap])


def test_invert_jet_quantization_error_and_nearest_colour():
    x = xr.DataArray(np.linspace(1500, 4500, 1001), dims="x")
    rgba = vn.apply_colormap(x, "jet", vmin=1500, vmax=4500)  # the top-level names, as in vn.color
    back = vn.invert_colormap(rgba, "jet", 1500, 4500)
    xr.testing.assert_identical(back, vn.color.invert_colormap(rgba, "jet", vmin=1500, vmax=4500))
    assert back.attrs["step"] == pytest.approx(3000 / 256) and round(back.attrs["step"], 1) == 11.7
    assert np.max(np.abs(back.values - x.values)) <= back.attrs["max_error"] + 1e-9
    # colours that are not exactly in the colormap (JPEG-like noise): the nearest entry
    noisy = (rgba.astype(np.int16) + np.random.default_rng(0).integers(-2, 3, rgba.shape)).clip(0, 255).astype(np.uint8)
    back2 = vn.color.invert_colormap(noisy, "jet", vmin=1500, vmax=4500)
    assert np.median(np.abs(back2.values - x.values)) <= 2 * back.attrs["step"]
    # each noisy pixel: the distance to the nearest of jet's 8-bit colours, and a value of an entry at that distance
    table = vn.color.colormap_table("jet")[0][:256, :3].astype(np.float64)
    d = np.sqrt(((noisy.values[:, None, :3].astype(np.float64) - table[None]) ** 2).sum(-1))
    assert back2["distance"].dtype == np.float32
    np.testing.assert_allclose(back2["distance"].values, d.min(1), rtol=1e-6)
    entry = np.floor((back2.values - 1500) / back.attrs["step"]).astype(int)  # the run of equal colours' middle
    assert np.all(np.abs(d[np.arange(len(d)), entry.clip(0, 255)] - d.min(1)) < 1e-9)
    assert float(back2["distance"].max()) > 0
    # float colours (0-1) are compared with jet's float colours and its 8-bit ones / 255 (this
    # test asserted the 8-bit answer before, when float input met only the 8-bit colours): the
    # noise-free picture / 255 comes back within the float bound, the noisy one as close as 8-bit
    exact = vn.color.invert_colormap(rgba / 255.0, "jet", vmin=1500, vmax=4500)
    assert np.max(np.abs(exact.values - x.values)) <= exact.attrs["max_error"] + 1e-9
    back3 = vn.color.invert_colormap(noisy / 255.0, "jet", vmin=1500, vmax=4500)
    assert np.median(np.abs(back3.values - x.values)) <= 2 * back.attrs["step"]
    assert np.all(back3["distance"].values <= back2["distance"].values + 1e-4)  # more colours to be near
    holes = (noisy / 255.0).where(xr.DataArray(np.arange(noisy.sizes["x"]) % 7 != 0, dims="x"))  # NaN pixels
    back4 = vn.color.invert_colormap(holes, "jet", vmin=1500, vmax=4500)
    assert np.isnan(back4.values[::7]).all() and np.isnan(back4["distance"].values[::7]).all()
    np.testing.assert_allclose(back4.values[1::7], back3.values[1::7])


def test_chunking_invariance_and_laziness():
    from volnorm.testing import raise_if_dask_computes

    x = xr.DataArray(np.random.default_rng(3).random((30, 40)), dims=("y", "x"))
    with raise_if_dask_computes():
        a = vn.color.apply_colormap(x.chunk({"y": 4}), "magma", vmin=0, vmax=1)
        g = vn.color.to_grey(a)
        b = vn.color.invert_colormap(a, "magma", vmin=0, vmax=1)
    np.testing.assert_array_equal(a.values, vn.color.apply_colormap(x, "magma", vmin=0, vmax=1).values)
    np.testing.assert_array_equal(b.values, vn.color.invert_colormap(a.compute(), "magma", vmin=0, vmax=1).values)
    assert g.shape == (30, 40)


def test_bad_colour_input_is_refused():
    with pytest.raises(ValueError, match="'channel' dim of size 3"):
        vn.color.to_grey(xr.DataArray(np.zeros((4, 4)), dims=("y", "x")))
    with pytest.raises(ValueError, match="method"):
        vn.color.to_grey(xr.DataArray(np.zeros((4, 3)), dims=("x", "channel")), method="hsl")
    with pytest.raises(ValueError, match="vmin <= vmax"):
        vn.color.apply_colormap(xr.DataArray(np.zeros(3), dims="x"), vmin=2, vmax=1)


def _stack(photo_names=("astronaut", "coffee", "chelsea"), size=(120, 160)):
    from skimage.transform import resize

    imgs = []
    for name in photo_names:
        try:
            img = getattr(skimage_data, name)()
        except Exception as e:  # noqa: BLE001 - a sample not shipped offline
            pytest.skip(f"{name} not available: {e}")
        imgs.append((resize(img, size, anti_aliasing=True) * 255).round().astype(np.uint8))
    return xr.DataArray(np.stack(imgs), dims=("volume", "y", "x", "channel"))


def test_quantize_palette_is_a_kmeans_fixed_point_as_good_as_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    from volnorm.color import _pixels_sample

    stack = _stack().chunk({"volume": 1, "y": 60})
    p = vn.color.fit_quantize(stack, 8, sample=20_000, seed=1)
    sample = _pixels_sample(stack, 20_000, 1, "channel")
    ours = p.values["palette"].values
    # scikit-learn started from our palette does not move it: ours is a Lloyd fixed point
    km = sklearn_cluster.KMeans(8, init=ours, n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(sample)
    np.testing.assert_allclose(km.cluster_centers_, ours, atol=1e-6)
    # and scikit-learn's best of 10 k-means++ starts is not much better on the same sample
    best = sklearn_cluster.KMeans(8, n_init=10, random_state=0).fit(sample)
    inertia = float(((sample - ours[km.predict(sample)]) ** 2).sum())
    assert inertia <= best.inertia_ * 1.05


def test_quantize_assigns_the_nearest_palette_colour_lazily_and_reuses_the_palette():
    stack = _stack()
    p = vn.color.fit_quantize(stack, 6, sample=5000, seed=0)
    q = vn.color.quantize(stack.chunk({"volume": 1, "y": 50}), params=p)
    lab = vn.color.quantize(stack.chunk({"volume": 1, "y": 50}), params=p, labels=True)
    assert q.chunks is not None and q.dims == stack.dims and q.dtype == np.uint8 and lab.dims == ("volume", "y", "x")
    pal = p.values["palette"].values
    f = stack.values.reshape(-1, 3).astype(np.float64)
    want = np.argmin(((f[:, None, :] - pal[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(lab.values.ravel(), want)
    np.testing.assert_array_equal(q.values.reshape(-1, 3), pal.round().astype(np.uint8)[want])
    # new frames, the same palette: only palette colours come out
    frames = _stack(("astronaut",)).isel(x=slice(None, None, -1))
    out = vn.color.quantize(frames, params=p).values.reshape(-1, 3)
    assert {tuple(c) for c in np.unique(out, axis=0)} <= {tuple(c) for c in pal.round().astype(np.uint8)}
    # the palette saved as JSON (e.g. next to a video's first frames) gives the same labels
    again = vn.Params.from_json(p.to_json())
    np.testing.assert_array_equal(vn.color.quantize(frames, params=again, labels=True).values,
                                  vn.color.quantize(frames, params=p, labels=True).values)
    # chunking does not change the sample's blocks' draws within a chunk layout, nor the result
    np.testing.assert_array_equal(q.values, vn.color.quantize(stack, params=p).values)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 40), integral=st.booleans(), dup=st.booleans())
def test_nearest_colour_table_equals_the_distance_argmin(seed, k, integral, dup):
    """The 24-bit table (with its per-cell shortcut) gives for every 8-bit colour what the
    exact distance argmin gives, ties to the lowest index included (integral centres tie often)."""
    from volnorm.color import _nearest

    rng = np.random.default_rng(seed)
    centres = rng.uniform(-20, 275, (k, 3))
    if integral:
        centres = centres.round()
    if dup and k > 1:
        centres[-1] = centres[0]  # the same colour twice: the first one wins
    pts = rng.integers(0, 256, (20_000, 3), dtype=np.uint8)
    pts[:8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [7, 8, 15], [8, 7, 16], [127, 128, 129]]
    want = np.argmin(((pts[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(_nearest(pts, centres), want)  # the table
    np.testing.assert_array_equal(_nearest(pts.astype(np.float64), centres), want)  # point by point
    rgba = np.concatenate([pts, rng.integers(0, 256, (len(pts), 1), dtype=np.uint8)], axis=1)
    np.testing.assert_array_equal(_nearest(rgba, centres), want)  # alpha ignored against an RGB palette


def test_quantize_rgba_clusters_alpha_and_float_data_use_the_same_rule():
    rng = np.random.default_rng(3)
    px = rng.integers(0, 256, (2, 40, 30, 4), dtype=np.uint8)
    stack = xr.DataArray(px, dims=("volume", "y", "x", "channel"))
    p = vn.color.fit_quantize(stack, 5, seed=1)
    pal = p.values["palette"].values
    assert pal.shape == (5, 4)
    want = np.argmin(((px.reshape(-1, 4)[:, None, :].astype(np.float64) - pal[None]) ** 2).sum(-1), axis=1)
    lab = vn.color.quantize(stack.chunk({"y": 7}), params=p, labels=True)
    np.testing.assert_array_equal(lab.values.ravel(), want)
    f = (stack / 255.0).astype(np.float32)
    pf = vn.color.fit_quantize(f, 5, seed=1)
    np.testing.assert_allclose(pf.values["palette"].values, pal / 255.0, rtol=1e-5)  # the same sample, the same fit
    np.testing.assert_array_equal(vn.color.quantize(f, params=pf, labels=True).values.ravel(), want)
    holes = f.where(f.x != 3)  # NaN pixels keep NaN colours
    qh = vn.color.quantize(holes.chunk({"y": 9}), params=pf).values
    assert np.isnan(qh[:, :, 3]).all() and not np.isnan(np.delete(qh, 3, axis=2)).any()
    h = f.astype(np.float16)  # numba has no float16: the same rule on its exact float32 values
    hv = h.values.reshape(-1, 4).astype(np.float64)
    want_h = np.argmin(((hv[:, None, :] - pf.values["palette"].values[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(vn.color.quantize(h.chunk({"x": 8}), params=pf, labels=True).values.ravel(), want_h)


def test_fit_quantize_is_reproducible_and_checks_its_input():
    stack = _stack(("coffee",))
    a = vn.color.fit_quantize(stack, 4, sample=3000, seed=5)
    b = vn.color.fit_quantize(stack, 4, sample=3000, seed=5)
    np.testing.assert_array_equal(a.values["palette"].values, b.values["palette"].values)
    with pytest.raises(ValueError, match="n_colors"):
        vn.color.fit_quantize(stack, 1)


def test_exposure_report_equals_numpy_and_orders_exposures(tmp_path, capsys):
    import imageio.v3 as iio

    from volnorm.cli import main

    a = skimage_data.astronaut()
    gammas = [0.3, 1.0, 3.0]
    for i, g in enumerate(gammas):
        iio.imwrite(tmp_path / f"img{i}.png", (255 * (a / 255) ** g).astype(np.uint8))
    stack = vn.open_images(str(tmp_path / "*.png"))
    assert stack.dims == ("volume", "y", "x", "channel")
    r = vn.color.exposure(stack)
    f = stack.values.astype(np.float64) / 255
    luma = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    perceived = np.sqrt(0.241 * f[..., 0] ** 2 + 0.691 * f[..., 1] ** 2 + 0.068 * f[..., 2] ** 2)
    ax = (1, 2)
    np.testing.assert_allclose(r["mean"].values, luma.mean(ax), rtol=1e-5)
    np.testing.assert_allclose(r["rms_contrast"].values, luma.std(ax), rtol=1e-4)
    np.testing.assert_allclose(r["brightness"].values, perceived.mean(ax), rtol=1e-5)
    np.testing.assert_allclose(r["underexposed"].values, (luma < 0.1).mean(ax), atol=1e-6)
    np.testing.assert_allclose(r["overexposed"].values, (luma > 0.9).mean(ax), atol=1e-6)
    assert r["level"].values.tolist() == np.round(10 * perceived.mean(ax)).astype(int).tolist()
    assert list(r["level"].values) == sorted(r["level"].values, reverse=True)  # darker with gamma
    # the CLI: a table, a CSV and a picture; never overwrites
    csv, png = tmp_path / "e.csv", tmp_path / "e.png"
    assert main(["stats", "--brightness", str(tmp_path / "*.png"), "--csv", str(csv), "--plot", str(png)]) == 0
    assert "rms_contrast" in capsys.readouterr().out
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("volume,mean,rms_contrast") and len(lines) == 4
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["stats", "--brightness", str(tmp_path / "*.png"), "--csv", str(csv)]) == 1
    assert "never overwrites" in capsys.readouterr().err


def test_exposure_of_grey_and_float_images():
    x = xr.DataArray(np.array([[0.05, 0.95], [0.5, 0.5]]), dims=("y", "x"))
    r = vn.color.exposure(x)
    assert float(r["mean"]) == pytest.approx(0.5) and float(r["underexposed"]) == 0.25 and float(r["overexposed"]) == 0.25
    assert int(r["level"]) == 5


@pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB:UserWarning")  # the reference's own clipping
@pytest.mark.parametrize("space", ["hsv", "lab"])
def test_luminance_equalization_equals_the_scikit_image_pipeline(photo, space):
    from skimage import color, exposure

    to, back, li = {"hsv": (color.rgb2hsv, color.hsv2rgb, 2), "lab": (color.rgb2lab, color.lab2rgb, 0)}[space]
    unit = photo.values / 255.0
    conv = to(unit)
    light = conv[..., li]
    eq = exposure.equalize_hist(light, nbins=256)
    conv[..., li] = eq * (100.0 if space == "lab" else 1.0)
    want = np.clip(np.round(back(conv).clip(0, 1) * 255), 0, 255).astype(np.uint8)
    got = vn.color.equalize_color(photo.chunk({"y": 128}), space=space)
    assert got.chunks is not None
    g = got.values
    # equal but for the last float bits of the colour-space round trip (a few uint8 steps at most, rarely)
    assert np.mean(g == want) > 0.99 and np.abs(g.astype(int) - want).max() <= 2
    if space == "hsv":  # hue kept where there is colour
        h0, h1 = color.rgb2hsv(photo.values)[..., 0], color.rgb2hsv(g)[..., 0]
        sat = (color.rgb2hsv(photo.values)[..., 1] > 0.3) & (color.rgb2hsv(g)[..., 2] > 0.2)
        dh = np.abs(h0 - h1)[sat]
        assert np.median(np.minimum(dh, 1 - dh)) < 0.01


def test_per_channel_equalization_equals_skimage_per_channel(photo):
    from skimage import exposure

    got = vn.color.equalize_color(photo, mode="channels").values
    for c in range(3):
        want = np.round(exposure.equalize_hist(photo.values[..., c] / 255.0, nbins=256) * 255).astype(np.uint8)
        assert np.abs(got[..., c].astype(int) - want).max() <= 1


def test_per_image_cdfs_and_dataset_wide_cdfs_differ_as_they_should():
    stack = _stack(("astronaut", "coffee"))
    dark = (stack // 3).astype(np.uint8)
    both = xr.concat([stack, dark], dim="volume")
    per = vn.color.equalize_color(both, space="hsv", dim=("y", "x"))
    whole = vn.color.equalize_color(both, space="hsv")
    xr.testing.assert_identical(whole, vn.color.equalize_color(both, space="hsv", dim=("volume", "y", "x")))
    with pytest.raises(ValueError, match="channel"):
        vn.color.equalize_color(both, dim=("channel", "y"))
    v = lambda a: a.astype(float).max("channel").mean(("y", "x")).values
    assert abs(v(per)[0] - v(per)[2]) < 0.1 * 255  # each image equalized on its own: alike
    assert v(whole)[2] < v(whole)[0] - 0.2 * 255  # one CDF: the dark copies stay darker


def test_desaturate_fades_to_grey_in_hsv_keeping_hue_and_value():
    from skimage import color

    img = _stack(("astronaut",)).isel(volume=0)
    w = vn.color.radial_weight(img, (60, 80), 20, 50)
    out = vn.color.desaturate(img.chunk({"y": 40}), w).values
    hsv_in, hsv_out = color.rgb2hsv(img.values), color.rgb2hsv(out)
    far = w.values == 0
    assert np.abs(out[far].astype(int).max(-1) - out[far].astype(int).min(-1)).max() <= 1  # grey
    near = w.values == 1
    assert np.abs(out[near].astype(int) - img.values[near].astype(int)).max() <= 1  # untouched
    np.testing.assert_allclose(hsv_out[..., 2], hsv_in[..., 2], atol=1 / 255 + 1e-9)  # value kept
    mid = (w.values > 0.3) & (w.values < 0.7) & (hsv_in[..., 1] > 0.3) & (hsv_in[..., 2] > 0.25)  # uint8 rounding: S unstable when dark
    np.testing.assert_allclose(hsv_out[..., 1][mid], (hsv_in[..., 1] * w.values)[mid], atol=0.03)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vn.color.desaturate(img, 1.5)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_quantize_grey_equals_matplotlib_resampled_and_has_n_colours(photo, n):
    grey = vn.color.to_grey(photo)
    got = vn.color.quantize_grey(grey.chunk({"y": 100}), n, "viridis", vmin=0, vmax=255)
    cm = matplotlib.colormaps["viridis"].resampled(n)
    want = cm(matplotlib.colors.Normalize(0, 255)(grey.values), bytes=True)
    np.testing.assert_array_equal(got.values, want)
    assert len(np.unique(got.values.reshape(-1, 4), axis=0)) <= n
