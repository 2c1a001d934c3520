"""gamma, log and auto_gamma equal the references they name, dtype for dtype: scikit-image's
``exposure.adjust_gamma`` / ``adjust_log`` and ImageMagick 6's ``-auto-gamma`` (Q16, through
PNG files, as a user runs it); ``rescale(out_range="uint8")`` against OpenCV's
``cv2.normalize(NORM_MINMAX)`` and ImageMagick's ``-auto-level``. Real small images shipped with
scikit-image, and hypothesis-generated arrays."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import dask.array as da
import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage import data as skdata
from skimage import exposure

import volnorm as vn
from volnorm.testing import raise_if_dask_computes

SETTINGS = settings(max_examples=30, deadline=None)


def _imagemagick() -> str | None:
    """ImageMagick's ``convert``, found by path (``/usr/local/bin/convert`` may be something
    else on PATH): the first candidate whose ``-version`` says ImageMagick."""
    for exe in ("/usr/bin/convert", "/usr/bin/convert-im6.q16", "/usr/bin/magick"):
        try:
            out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "ImageMagick" in out:
            return exe
    return None


CONVERT = _imagemagick()
needs_im = pytest.mark.skipif(CONVERT is None, reason="ImageMagick (Debian package imagemagick) is not installed: "
                                                      "no /usr/bin/convert whose -version says ImageMagick")


def _convert(tmp: Path, img: np.ndarray, *ops: str) -> np.ndarray:
    """``convert in.png OPS out.png``, read back with imageio (1-bit output as 0/255 or 0/65535)."""
    src, dst = tmp / "in.png", tmp / "out.png"
    iio.imwrite(src, img)
    subprocess.run([CONVERT, str(src), *ops, str(dst)], check=True, capture_output=True, timeout=60)
    out = iio.imread(dst)
    if out.dtype == bool:  # ImageMagick writes a two-level image as 1 bit
        out = out.astype(img.dtype) * np.iinfo(img.dtype).max
    return out.astype(img.dtype)


def _images() -> dict[str, np.ndarray]:
    cam = skdata.camera()
    return {"camera": cam, "moon": skdata.moon(), "coins": skdata.coins(),
            "dark": (cam * 0.7).astype(np.uint8), "grey60": np.full((16, 24), 60, np.uint8)}


IMAGES = _images()


def _as(img: np.ndarray, dtype: str) -> np.ndarray:
    """A uint8 image in another dtype, on that dtype's full scale as users hold it."""
    if dtype == "uint8":
        return img
    if dtype == "uint16":
        return img.astype(np.uint16) * 257 + (img % 7).astype(np.uint16)  # not only multiples of 257
    return (img / 255.0).astype(dtype)


def _da(a: np.ndarray, chunked: bool) -> xr.DataArray:
    x = xr.DataArray(a, dims=("y", "x"))
    return x.chunk({"y": 97, "x": 131}) if chunked else x


def _same(ours: xr.DataArray, ref: np.ndarray) -> None:
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    np.testing.assert_array_equal(ours.values, ref)


# ---------------------------------------------------------------------------
# scikit-image: adjust_gamma, adjust_log
# ---------------------------------------------------------------------------

DTYPES = ["uint8", "uint16", "float32", "float64"]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["camera", "moon", "coins", "dark"])
def test_gamma_equals_skimage_adjust_gamma(name, dtype, chunked):
    a = _as(IMAGES[name], dtype)
    for g, gain in [(0.3, 1.0), (0.5, 1.0), (1.0, 1.0), (2.2, 1.0), (0.8, 0.7), (1.7, 0.25)]:
        _same(vn.gamma(_da(a, chunked), g, gain=gain), exposure.adjust_gamma(a, g, gain))
    if dtype != "uint16":  # above uint16's max scikit-image's cast wraps (we clip: below)
        _same(vn.gamma(_da(a, chunked), 0.6, gain=1.5), exposure.adjust_gamma(a, 0.6, 1.5))


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["camera", "moon", "coins", "dark"])
def test_log_equals_skimage_adjust_log(name, dtype, chunked):
    a = _as(IMAGES[name], dtype)
    for gain in (1.0, 0.6, 0.25):
        for inv in (False, True):
            _same(vn.log(_da(a, chunked), gain=gain, inv=inv), exposure.adjust_log(a, gain, inv))


def test_integer_results_above_the_dtype_are_clipped_not_wrapped():
    """scikit-image casts gain * 65535 to uint16 unchecked (it wraps); we clip, as documented."""
    a = np.array([[0, 30000, 65535]], np.uint16)
    assert vn.gamma(_da(a, False), 1.0, gain=2.0).values.tolist() == [[0, 60000, 65535]]
    assert vn.log(_da(a, False), gain=3.0).values.tolist()[0][-1] == 65535
    assert vn.gamma(_da(a.astype(np.uint8), False), 1.0, gain=2.0).values.dtype == np.uint8


@SETTINGS
@given(a=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=24)),
       g=st.floats(0.05, 5.0), gain=st.floats(0.0, 2.0), inv=st.booleans())
def test_hypothesis_uint8_gamma_and_log_equal_skimage(a, g, gain, inv):
    x = _da(a, False).chunk({"y": 7})
    _same(vn.gamma(x, g, gain=gain), exposure.adjust_gamma(a, g, gain))
    _same(vn.log(x, gain=min(gain, 1.0), inv=inv), exposure.adjust_log(a, min(gain, 1.0), inv))


@SETTINGS
@given(a=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=16),
                    elements=st.floats(0, 1, width=32)),
       g=st.floats(0.05, 5.0), gain=st.floats(0.0, 2.0), inv=st.booleans())
def test_hypothesis_float32_gamma_and_log_equal_skimage(a, g, gain, inv):
    x = _da(a, False)
    _same(vn.gamma(x, g, gain=gain), exposure.adjust_gamma(a, g, gain))
    _same(vn.log(x, gain=gain, inv=inv), exposure.adjust_log(a, gain, inv))


def test_gamma_and_log_compute_nothing_when_called():
    cam = da.from_array(skdata.camera(), chunks=128)
    for dtype in DTYPES:
        x = xr.DataArray(cam.astype(dtype) / (255 if dtype.startswith("float") else 1), dims=("y", "x"))
        with raise_if_dask_computes():
            ys = [vn.gamma(x, 0.5), vn.gamma(x, 2.0, gain=0.5, out_range="uint8"), vn.log(x), vn.log(x, inv=True),
                  vn.log(x, out_range=(0.0, 1.0))]
        assert all(isinstance(y.data, da.Array) for y in ys)


def test_negative_data_raise_when_computed():
    a = np.array([[0.5, -0.25]], np.float32)
    x = xr.DataArray(da.from_array(a), dims=("y", "x"))
    y = vn.gamma(x, 2.0)  # lazy: no error yet
    with pytest.raises(ValueError, match="gamma needs non-negative data; a chunk holds -0.25"):
        y.compute()
    with pytest.raises(ValueError, match="log needs non-negative data"):
        vn.log(x).compute()
    with pytest.raises(ValueError, match="non-negative"):
        exposure.adjust_log(a)  # the reference refuses them too, when called


def test_negative_data_in_memory_raise_when_called():
    """In-memory data are computed at once, so the error comes at the call, as scikit-image's."""
    x = xr.DataArray(np.array([[0.5, -0.25]], np.float32), dims=("y", "x"))
    with pytest.raises(ValueError, match="gamma needs non-negative data; a chunk holds -0.25"):
        vn.gamma(x, 2.0)
    with pytest.raises(ValueError, match="log needs non-negative data"):
        vn.log(x.values)


def test_out_range_gives_another_dtype_without_truncation():
    cam = skdata.camera()
    x = _da(cam, False)
    f = (cam / 255.0) ** 0.5
    np.testing.assert_allclose(vn.gamma(x, 0.5, out_range=(0.0, 1.0)).values, f, rtol=1e-6)
    assert vn.gamma(x, 0.5, out_range=(0.0, 1.0)).dtype == np.float32
    _same(vn.gamma(x, 0.5, out_range="uint16"), np.rint(f * 65535).astype(np.uint16))
    x16 = _da(_as(cam, "uint16"), False)
    _same(vn.log(x16, out_range="uint8"), np.rint(np.log2(1 + x16.values / 65535.0) * 255).astype(np.uint8))


def test_scale_data_keeps_the_data_max_behaviour():
    a = IMAGES["dark"].astype(np.float64)
    x = _da(IMAGES["dark"], False)
    mx = a.max()
    np.testing.assert_allclose(vn.gamma(x, 0.4, scale="data").values, mx * (a / mx) ** 0.4, rtol=1e-6)
    np.testing.assert_allclose(vn.log(x, scale="data").values, mx * np.log1p(a) / np.log1p(mx), rtol=1e-6)
    np.testing.assert_allclose(vn.log(vn.log(x, scale="data"), scale="data", inv=True).values, a, atol=1e-3)
    g = np.log(0.5) / np.log(a.mean() / mx)
    np.testing.assert_allclose(vn.auto_gamma(x, scale="data").values, mx * (a / mx) ** g, rtol=1e-5)
    assert vn.gamma(x, 0.4, scale="data").dtype == np.float32


# ---------------------------------------------------------------------------
# parameters: recorded, replayed, checked
# ---------------------------------------------------------------------------


def _rec(y: xr.DataArray) -> vn.Params:
    return vn.Params.from_dict(json.loads(y.attrs["volnorm_params"])[-1])


def test_options_are_recorded_and_the_record_decides():
    x = _da(IMAGES["moon"], False)
    y = vn.gamma(x, 0.5, gain=0.8, out_range="uint16")
    p = _rec(y)
    assert p.options == {"gamma": 0.5, "gain": 0.8, "scale": "dtype", "out_range": "uint16", "dim": None}
    xr.testing.assert_identical(vn.gamma(x, 0.5, params=p), y)
    with pytest.raises(ValueError, match=r"gain=0.5 was given, but these parameters were fitted with gain=0.8"):
        vn.gamma(x, 0.5, gain=0.5, params=p)
    with pytest.raises(ValueError, match=r"scale='data' was given, but these parameters were fitted with scale='dtype'"):
        vn.gamma(x, 0.5, scale="data", params=p)
    lg = vn.log(x, inv=True, gain=0.5)
    xr.testing.assert_identical(vn.log(x, params=_rec(lg)), lg)
    ag = vn.auto_gamma(x, dim=("y", "x"))
    assert _rec(ag).options["full_scale"] == 255.0 and _rec(ag).options["scale"] == "dtype"
    xr.testing.assert_identical(vn.auto_gamma(x, params=_rec(ag)), ag)
    with pytest.raises(ValueError, match="hold no fitted mean"):
        vn.auto_gamma(x, params=p)  # gamma on the dtype's scale fitted nothing


def test_records_from_before_scale_are_data_max():
    x = _da(IMAGES["coins"], False)
    p = vn.Params("gamma", xr.Dataset({"max": 200.0, "mean": 100.0}), {"gamma": 2.0, "dim": None})
    np.testing.assert_allclose(vn.gamma(x, 2.0, params=p).values, 200 * (x.values / 200.0) ** 2, rtol=1e-6)
    assert _rec(vn.log(x, params=p)).options["scale"] == "data"


# ---------------------------------------------------------------------------
# ImageMagick: -auto-gamma, -auto-level
# ---------------------------------------------------------------------------


@needs_im
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_auto_gamma_equals_imagemagick_on_uint8_pngs(tmp_path, name, chunked):
    a = IMAGES[name]
    ref = _convert(tmp_path, a, "-auto-gamma")
    _same(vn.auto_gamma(_da(a, chunked)), ref)


@needs_im
def test_auto_gamma_equals_imagemagick_on_uint16_pngs_and_ends(tmp_path):
    for a in (_as(IMAGES["moon"], "uint16"), _as(IMAGES["dark"], "uint16")[::4, ::4]):
        _same(vn.auto_gamma(_da(a, False)), _convert(tmp_path, a, "-auto-gamma"))
    for const in (0, 255, 200):  # black turns white in ImageMagick: gamma is infinite
        a = np.full((4, 6), const, np.uint8)
        _same(vn.auto_gamma(_da(a, False)), _convert(tmp_path, a, "-auto-gamma"))


@needs_im
@settings(max_examples=25, deadline=None)
@given(a=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12)))
def test_hypothesis_auto_gamma_equals_imagemagick(tmp_path_factory, a):
    _same(vn.auto_gamma(_da(a, False)), _convert(tmp_path_factory.mktemp("im"), a, "-auto-gamma"))


def test_auto_gamma_float_is_the_exact_formula():
    a = IMAGES["dark"] / 255.0
    g = np.log(a.mean()) / np.log(0.5)
    y = vn.auto_gamma(_da(a, True))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.values, a ** (1 / g), rtol=1e-12)
    np.testing.assert_allclose(vn.auto_gamma(_da(a.astype(np.float32), False)).values, a ** (1 / g), rtol=1e-6)


@needs_im
@pytest.mark.parametrize("name", ["camera", "moon", "coins", "dark"])
def test_rescale_uint8_vs_imagemagick_auto_level_and_opencv(tmp_path, name):
    """rescale(out_range="uint8") rounds the exact map half to even; OpenCV's normalize rounds
    it too (equal); ImageMagick -auto-level rounds in 16 bits and stores q // 257 (up to 1 below,
    as rescale's docstring says)."""
    a = IMAGES[name]
    ours = vn.rescale(_da(a, True), out_range="uint8").values
    np.testing.assert_array_equal(ours, cv2.normalize(a, None, 0, 255, cv2.NORM_MINMAX))
    im = _convert(tmp_path, a, "-auto-level")
    lo, hi = float(a.min()), float(a.max())
    q16 = np.floor((a - lo) * 257.0 * (65535.0 / ((hi - lo) * 257.0)) + 0.5)
    np.testing.assert_array_equal(im, (q16 // 257).astype(np.uint8))
    assert 0 <= (ours.astype(int) - im).min() and (ours.astype(int) - im).max() <= 1


@SETTINGS
@given(a=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=24)))
def test_hypothesis_rescale_uint8_vs_opencv_normalize(a):
    """Equal except where the scaled value is an exact half (found by this test: (142 - 29) / 226 *
    255 = 127.5): OpenCV's float arithmetic (x * scale + shift) lands a rounding step away from
    127.5 and rounds up; ours rounds the exact half to even. Never more than 1 apart."""
    ours = vn.rescale(_da(a, False), out_range="uint8").values.astype(np.int64)
    ref = cv2.normalize(a, None, 0, 255, cv2.NORM_MINMAX).astype(np.int64)  # constant: 0 in both
    lo, hi = int(a.min()), int(a.max())
    exact = (a.astype(np.float64) - lo) * 255 / (hi - lo) if hi > lo else np.zeros(a.shape)
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-9
    np.testing.assert_array_equal(ours[~tie], ref[~tie])
    assert np.abs(ours - ref).max(initial=0) <= 1
