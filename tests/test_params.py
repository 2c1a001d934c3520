"""``params=`` is checked in one place (volnorm.params.check): the method, the ``dim``, the fit's
options and the parts must agree with the data and the other arguments. Also: the public names
live at ``volnorm.<name>`` (``__module__``, pickles), and dither's ``dims=`` is deprecated."""

from __future__ import annotations

import inspect
import json
import pickle

import numpy as np
import pytest
import xarray as xr
from skimage import data as skdata

import volnorm as vn
from volnorm.params import ACCEPTS, check


@pytest.fixture(scope="module")
def stack() -> xr.DataArray:
    """Two real 2-D images as a stack, labelled volumes."""
    cam = skdata.camera()[:128, :160]
    return xr.DataArray(np.stack([cam, cam[::-1]]), dims=("volume", "y", "x"), coords={"volume": ["up", "down"]})


@pytest.fixture(scope="module")
def mri() -> xr.DataArray:
    """A real NIfTI volume (nibabel's test data), as a one-volume stack."""
    return vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"]).load()


@pytest.fixture(scope="module")
def rgb() -> xr.DataArray:
    return xr.DataArray(skdata.astronaut()[::8, ::8], dims=("y", "x", "channel"))


def _apply(name: str, data: xr.DataArray, p: vn.Params, **kw) -> xr.DataArray:
    """Call the function ``name`` with fitted parameters (its required arguments filled in)."""
    if name == "nyul_apply":
        return vn.nyul_apply(data, p, **kw)
    if name == "quantize":
        return vn.color.quantize(data, params=p, **kw)
    if name == "gamma":
        kw.setdefault("gamma", 2.0)
    return getattr(vn, name)(data, params=p, **kw)


#: each function with params=, and a fit of another method
def _other_fits(stack):
    return {"zscore": vn.fit_zscore(stack), "rescale": vn.fit_rescale(stack), "equalize": vn.fit_equalize(stack)}


@pytest.mark.parametrize("name", sorted(ACCEPTS))
def test_params_of_another_method_name_both_methods(stack, rgb, name):
    fits = _other_fits(stack)
    wrong = next(m for m in ("zscore", "rescale", "equalize") if m not in ACCEPTS[name])
    data = rgb if name == "quantize" else stack
    arg = "landmarks" if name == "nyul_apply" else "params"
    with pytest.raises(ValueError, match=rf"^{name}\({arg}=\.\.\.\): these parameters were fitted by '{wrong}', not {name}; "
                                         rf"{name} takes parameters fitted by "):
        _apply(name, data, fits[wrong])


def test_gamma_with_zscore_params_is_a_clear_error_not_a_key_error(stack):
    with pytest.raises(ValueError, match=r"fitted by 'zscore', not gamma; gamma takes parameters fitted by gamma / log / auto_gamma"):
        vn.gamma(stack, 2.0, params=vn.fit_zscore(stack))


def test_gamma_log_and_auto_gamma_share_their_fitted_maximum(stack):
    """With scale="data" (the data's max; the default is the dtype's full scale, which fits
    nothing) the three fit the same max and mean over dim: each takes the others' parameters."""
    g = vn.gamma(stack, 0.5, dim=("y", "x"), scale="data")
    for other in (vn.log, vn.auto_gamma):
        rec = json.loads(other(stack, dim=("y", "x"), scale="data").attrs["volnorm_params"])[-1]
        again = vn.gamma(stack, 0.5, params=vn.Params.from_dict(rec))
        xr.testing.assert_identical(again.drop_attrs(), g.drop_attrs())
        assert json.loads(again.attrs["volnorm_params"])[-1]["method"] == "gamma"  # recorded as what was applied
        assert json.loads(again.attrs["volnorm_params"])[-1]["options"] == {
            "gamma": 0.5, "gain": 1.0, "scale": "data", "out_range": None, "dim": ["y", "x"]}
    p = vn.Params.from_dict(json.loads(g.attrs["volnorm_params"])[-1])
    xr.testing.assert_identical(vn.log(stack, params=p).drop_attrs(), vn.log(stack, dim=("y", "x"), scale="data").drop_attrs())


#: functions with dim= and params=, and their fit
DIM_FITS = {
    "rescale": lambda x, dim: vn.fit_rescale(x, dim=dim),
    "zscore": lambda x, dim: vn.fit_zscore(x, dim=dim),
    "equalize": lambda x, dim: vn.fit_equalize(x, dim=dim),
    # gamma and log fit a max over dim only on the data's scale (scale="dtype" fits nothing)
    "gamma": lambda x, dim: vn.Params.from_dict(json.loads(vn.gamma(x, 2.0, dim=dim, scale="data").attrs["volnorm_params"])[-1]),
    "log": lambda x, dim: vn.Params.from_dict(json.loads(vn.log(x, dim=dim, scale="data").attrs["volnorm_params"])[-1]),
    "auto_gamma": lambda x, dim: vn.Params.from_dict(json.loads(vn.auto_gamma(x, dim=dim).attrs["volnorm_params"])[-1]),
}


@pytest.mark.parametrize("name", sorted(DIM_FITS))
def test_a_conflicting_dim_names_both_dims(stack, name):
    dataset_wide = DIM_FITS[name](stack, None)
    with pytest.raises(ValueError, match=r"dim=\('y', 'x'\) was given, but these parameters were fitted over dim=None \(the whole dataset\)"):
        _apply(name, stack, dataset_wide, dim=("y", "x"))
    per_image = DIM_FITS[name](stack, ("y", "x"))
    with pytest.raises(ValueError, match=r"dim='volume' was given, but these parameters were fitted over dim=\['y', 'x'\]"):
        _apply(name, stack, per_image, dim="volume")


@pytest.mark.parametrize("name", sorted(DIM_FITS))
def test_a_matching_dim_is_accepted(stack, name):
    for fitted, given in [(None, ("volume", "y", "x")), (("y", "x"), ("y", "x")), (("y", "x"), ("x", "y"))]:
        p = DIM_FITS[name](stack, fitted)
        xr.testing.assert_identical(_apply(name, stack, p, dim=given), _apply(name, stack, p))


def test_params_without_dim_decide(stack):
    p = vn.fit_zscore(stack, dim=("y", "x"))
    xr.testing.assert_identical(vn.zscore(stack, params=p).drop_attrs(), vn.zscore(stack, dim=("y", "x")).drop_attrs())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: vn.rescale(x, percentiles=(2, 98), params=vn.fit_rescale(x, percentiles=(1, 99))),
         r"percentiles=\(2, 98\) was given, but these parameters were fitted with percentiles=\[1.0, 99.0\]"),
        (lambda x: vn.rescale(x, (0, 255), params=vn.fit_rescale(x)),
         r"in_range=\(0, 255\) was given, but these parameters were fitted with in_range='minmax'"),
        (lambda x: vn.rescale(x, percentiles=(1, 99), params=vn.fit_rescale(x)),
         r"percentiles=\(1, 99\) was given, but these parameters were fitted with percentiles=None"),
        (lambda x: vn.mean_scale(x, 100.0, params=vn.fit_mean_scale(x)),
         r"target=100.0 was given, but these parameters were fitted with target=10000.0"),
        (lambda x: vn.mean_scale(x, per_volume=False, params=vn.fit_mean_scale(x)),
         r"per_volume=False was given, but these parameters were fitted with per_volume=True"),
        (lambda x: vn.equalize(x, 64, params=vn.fit_equalize(x.astype("float32"))),
         r"nbins=64 was given, but these parameters were fitted with nbins=256"),
        (lambda x: vn.gamma(x, 3.0, params=vn.Params.from_dict(json.loads(vn.gamma(x, 2.0).attrs["volnorm_params"])[-1])),
         r"gamma=3.0 was given, but these parameters were fitted with gamma=2.0"),
    ],
)
def test_an_option_that_conflicts_with_the_fit_is_refused(stack, call, message):
    with pytest.raises(ValueError, match=message):
        call(stack)


def test_options_that_agree_with_the_fit_or_are_left_at_their_default_are_accepted(stack):
    p = vn.fit_rescale(stack, percentiles=(1, 99))
    expected = vn.rescale(stack, params=p)
    xr.testing.assert_identical(vn.rescale(stack, percentiles=[1.0, 99.0], params=p), expected)
    m = vn.fit_mean_scale(stack, 100.0)
    xr.testing.assert_identical(vn.mean_scale(stack, 100.0, params=m), vn.mean_scale(stack, params=m))
    # apply-time options are not fitted: they may differ from an earlier call's
    xr.testing.assert_identical(vn.rescale(stack, out_range="uint8", params=p).drop_attrs(), vn.rescale(stack, percentiles=(1, 99), out_range="uint8").drop_attrs())


def test_quantize_n_colors_must_match_the_palette(rgb):
    p = vn.color.fit_quantize(rgb, 4, sample=2000)
    with pytest.raises(ValueError, match=r"quantize\(params=\.\.\.\): n_colors=8 was given, but these parameters were fitted with n_colors=4"):
        vn.color.quantize(rgb, 8, params=p)
    np.testing.assert_array_equal(vn.color.quantize(rgb, 4, params=p).values, vn.color.quantize(rgb, params=p).values)


@pytest.mark.parametrize("name", ["rescale", "zscore", "equalize", "gamma"])
def test_per_part_params_belong_to_the_same_parts(stack, name):
    p = DIM_FITS[name](stack, ("y", "x"))
    with pytest.raises(ValueError, match=r"fitted per 'volume' on 2 of them; the data have 1: fit again"):
        _apply(name, stack.isel(volume=[0]), p)
    with pytest.raises(ValueError, match=r"fitted per 'volume' on \[up, down\]; the data's 'volume' are \[a, b\]"):
        _apply(name, stack.assign_coords(volume=["a", "b"]), p)
    with pytest.raises(ValueError, match=r"fitted per 'volume' on 2 of them; the data have 0"):
        _apply(name, stack.isel(volume=0), p)
    # the same parts without labels: applied by position, and the result keeps the data's coords
    out = _apply(name, stack.drop_vars("volume"), p)
    assert "volume" not in out.coords
    np.testing.assert_array_equal(out.values, _apply(name, stack, p).values)


def test_mean_scale_per_volume_on_a_real_volume(mri):
    p = vn.fit_mean_scale(mri)
    assert p.values["mean"].dims == ("volume",)
    with pytest.raises(ValueError, match="fitted per 'volume' on 1 of them; the data have 2"):
        vn.mean_scale(xr.concat([mri, mri], "volume"), params=p)
    with pytest.raises(ValueError, match=r"mean_scale\(per_volume=True\) works per volume: the data need a `volume` dim"):
        vn.fit_mean_scale(mri.isel(volume=0))


def test_nyul_landmarks_are_checked(stack):
    p = vn.nyul_fit(stack)
    vn.nyul_apply(stack.isel(volume=[0]), p)  # new volumes: landmarks are not per part
    with pytest.raises(ValueError, match=r"nyul_apply\(landmarks=\.\.\.\): these parameters were fitted by 'rescale', not nyul_apply"):
        vn.nyul_apply(stack, vn.fit_rescale(stack))
    with pytest.raises(ValueError, match="Nyúl standardization works per volume"):
        vn.nyul_apply(stack.isel(volume=0), p)


def test_params_must_be_params(stack):
    with pytest.raises(TypeError, match=r"zscore\(params=\.\.\.\): expected volnorm.Params .* got dict"):
        vn.zscore(stack, params=vn.fit_zscore(stack).to_dict())


def test_check_is_the_one_place(stack):
    """Every function that takes fitted parameters is in the table of the one check."""
    takers = {name for name in vn.__all__ if inspect.isfunction(getattr(vn, name))
              and {"params", "landmarks"} & set(inspect.signature(getattr(vn, name)).parameters)}
    takers |= {name for name in vn.color.__all__ if inspect.isfunction(getattr(vn.color, name))
               and "params" in inspect.signature(getattr(vn.color, name)).parameters}
    assert takers == set(ACCEPTS)
    p = vn.fit_zscore(stack)
    assert check(p, vn.zscore, stack) is p


# ---------------------------------------------------------------------------
# dither: dim=, and the deprecated dims=
# ---------------------------------------------------------------------------


def test_dither_dims_is_deprecated_for_dim(stack):
    expected = vn.dither(stack, dim=("y", "x")).values
    np.testing.assert_array_equal(vn.dither(stack).values, expected)
    with pytest.warns(vn.VolnormDeprecationWarning, match=r"dither\(dims=\.\.\.\) is deprecated; write dim=\('y', 'x'\)"):
        old = vn.dither(stack, dims=("y", "x"))
    np.testing.assert_array_equal(old.values, expected)
    for dim in (("x", "y"), ("y", "x")):  # both given, even alike
        with pytest.raises(ValueError, match="give `dim` only"):
            vn.dither(stack, dim=dim, dims=("y", "x"))
    t = vn.dither(stack.transpose("volume", "x", "y"), dim=("x", "y"))
    assert t.dims == ("volume", "x", "y")
    with pytest.raises(ValueError, match="dither works over the plane"):
        vn.dither(stack, dim=("volume", "z"))


# ---------------------------------------------------------------------------
# public homes
# ---------------------------------------------------------------------------


def _is_error(obj) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException) and not issubclass(obj, Warning)


def test_every_public_function_and_class_lives_at_volnorm():
    names = [n for n in vn.__all__ if inspect.isfunction(getattr(vn, n)) or inspect.isclass(getattr(vn, n))]
    assert {"zscore", "rescale", "equalize", "threshold", "Params", "VolnormDeprecationWarning"} <= set(names)
    wrong = {n: getattr(vn, n).__module__ for n in names if getattr(vn, n).__module__ != "volnorm" and not _is_error(getattr(vn, n))}
    assert not wrong
    # error classes keep the module a traceback prints (doctests and logs match it)
    assert vn.DamagedStoreError.__module__ == "volnorm.integrity"
    assert vn.transforms.__name__ == "volnorm.transforms" and vn.params.__name__ == "volnorm.params"  # modules keep theirs


def test_public_names_pickle_by_reference(stack):
    for name in ("zscore", "equalize", "nyul_apply", "threshold", "dither", "Params"):
        obj = getattr(vn, name)
        assert pickle.loads(pickle.dumps(obj)) is obj
    p = vn.fit_equalize(stack, dim=("y", "x"))
    again = pickle.loads(pickle.dumps(p))
    assert type(again) is vn.Params and again == p
    xr.testing.assert_identical(vn.equalize(stack, params=again), vn.equalize(stack, params=p))


def test_fcm_and_lsq_params_round_trip_and_are_checked(stack):
    """The tissue table (``tissue``: csf, gm, wm) is not a part of the data; ``volume`` is."""
    mask = stack > 0
    for fit, fn in ((vn.fit_fcm, vn.fcm), (vn.fit_lsq, vn.lsq)):
        p = fit(stack, mask=mask)
        again = vn.Params.from_dict(json.loads(json.dumps(p.to_dict())))
        xr.testing.assert_identical(fn(stack, params=again), fn(stack, params=p))
        with pytest.raises(ValueError, match=rf"{fn.__name__}\(params=\.\.\.\): these {fit.__name__[4:]} parameters were fitted per 'volume'"):
            fn(stack.isel(volume=[0]), params=p)
        with pytest.raises(ValueError, match=r"seed=3 was given, but these parameters were fitted with seed=0"):
            fn(stack, params=p, seed=3)
    p = vn.fit_lsq(stack, mask=mask)
    assert p.values["standard"].dims == ("tissue",) and list(p.values["tissue"].values) == ["csf", "gm", "wm"]
    with pytest.raises(ValueError, match=r"standard=\[1.0, 2.0, 3.0\] was given, but these parameters were fitted with standard=None"):
        vn.lsq(stack, params=p, standard=(1, 2, 3))
