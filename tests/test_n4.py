"""vn.n4: SimpleITK's N4 bias-field correction, one volume per task.

Equal to SimpleITK called directly with the same recipe on real data, lower coefficient of
variation on a phantom with a known bias, lazy with one N4 task per volume, each volume of a
stack corrected on its own, clear errors, and the same result through a pipeline spec and the
command line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import xarray as xr
from nibabel.testing import data_path

import volnorm as vn
from volnorm.cli import main
from volnorm.pipeline.steps import parse_step
from volnorm.testing import raise_if_dask_computes

from volnorm.transforms import bias as n4_module
FAST = {"shrink_factor": 2, "iterations": (5, 5)}


def sitk_n4(volume: np.ndarray, spacing, mask: np.ndarray | None = None, *, shrink_factor: int = 4, iterations=(50, 50, 50, 50)) -> np.ndarray:
    """SimpleITK's documented N4 example with shrinking, on a (z, y, x) array (float64: the log
    bias field SimpleITK returns is float64, and so is the division by its exponential)."""
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing([float(s) for s in spacing])
    if mask is None:
        mask_image = sitk.OtsuThreshold(image, 0, 1, 200)
    else:
        mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
        mask_image.CopyInformation(image)
    small, small_mask = image, mask_image
    if shrink_factor > 1:
        small = sitk.Shrink(image, [shrink_factor] * 3)
        small_mask = sitk.Shrink(mask_image, [shrink_factor] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return sitk.GetArrayFromImage(image / sitk.Exp(log_field))


def phantom(shape=(24, 32, 28), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tissues in an ellipsoid (values 100 and 60, mild noise) times a smooth bias field that
    spans about 0.6-1.5; the mask of the brighter tissue."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = x**2 + (y / 0.9) ** 2 + (z / 0.8) ** 2
    clean = np.where(r < 0.35, 100.0, np.where(r < 0.8, 60.0, 5.0))
    field = np.exp(0.35 * x + 0.2 * y - 0.15 * z + 0.1 * x * y)
    noise = np.random.default_rng(seed).normal(0, 1.0, shape)
    return ((clean + noise) * field).astype(np.float32), r < 0.35


def cv(a: np.ndarray, where: np.ndarray) -> float:
    return float(a[where].std() / a[where].mean())


# ---------------------------------------------------------------------------
# 1. equal to SimpleITK; a known bias removed
# ---------------------------------------------------------------------------


def test_defaults_are_simpleitks():
    c = sitk.N4BiasFieldCorrectionImageFilter()
    d = {k: p.default for k, p in __import__("inspect").signature(n4_module.n4).parameters.items()}
    assert tuple(d["iterations"]) == tuple(c.GetMaximumNumberOfIterations())
    assert d["convergence_threshold"] == c.GetConvergenceThreshold()
    assert (d["control_points"],) * 3 == tuple(c.GetNumberOfControlPoints())
    assert d["spline_order"] == c.GetSplineOrder()
    assert d["histogram_bins"] == c.GetNumberOfHistogramBins()
    assert d["bias_field_fwhm"] == c.GetBiasFieldFullWidthAtHalfMaximum()
    assert d["wiener_noise"] == c.GetWienerFilterNoise()


def test_equals_simpleitk_called_directly_on_real_data():
    path = os.path.join(data_path, "anatomical.nii")  # (33, 41, 25) int16, 2 mm voxels
    stack = vn.open_nifti(path)
    got = vn.n4(stack, **FAST)
    assert got.dtype == np.float32 and got.dims == stack.dims and got.shape == stack.shape
    assert "nifti_scaled" not in got.attrs and got.attrs["affine"] == stack.attrs["affine"]
    vol = stack.values[0]
    want = sitk_n4(vol, stack.attrs["zooms"][:3], **FAST)
    diff = np.abs(got.values[0] - want).max() / np.abs(want).max()
    assert diff <= 1e-5, diff  # 3.2e-8 here: the float32 rounding of SimpleITK's float64 result
    np.testing.assert_array_equal(got.values[0], want.astype(np.float32))  # bit for bit, once rounded
    # the correction did something: not the input
    assert np.abs(got.values[0] - vol).max() > 0.01 * np.abs(vol).max()
    # with a mask given: SimpleITK with the same mask
    m = vol > np.percentile(vol, 40)
    got_m = vn.n4(stack, mask=xr.DataArray(m, dims=("z", "y", "x")), **FAST)
    want_m = sitk_n4(vol, stack.attrs["zooms"][:3], m, **FAST)
    assert np.abs(got_m.values[0] - want_m).max() / np.abs(want_m).max() <= 1e-5
    np.testing.assert_array_equal(got_m.values[0], want_m.astype(np.float32))


def test_lowers_the_coefficient_of_variation_under_a_known_bias():
    img, inside = phantom()
    x = xr.DataArray(img[None], dims=("volume", "z", "y", "x"))
    out = vn.n4(x, shrink_factor=2, iterations=(20, 20, 20))
    before, after = cv(img, inside), cv(out.values[0], inside)
    assert after < 0.5 * before, (before, after)
    # the same with the tissue mask given
    masked = vn.n4(x, mask=xr.DataArray(inside, dims=("z", "y", "x")), shrink_factor=2, iterations=(20, 20, 20))
    assert cv(masked.values[0], inside) < 0.5 * before


# ---------------------------------------------------------------------------
# 2. lazy: nothing runs before compute, one N4 task per volume
# ---------------------------------------------------------------------------


def test_lazy_with_one_n4_task_per_volume(monkeypatch):
    img, _ = phantom((12, 16, 14))
    stack = xr.DataArray(np.stack([img, img * 1.5, img[::-1]]), dims=("volume", "z", "y", "x"),
                         coords={"volume": ["a", "b", "c"]}).chunk({"volume": 2, "z": 5, "y": 9})
    calls = []
    real = n4_module._correct
    monkeypatch.setattr(n4_module, "_correct", lambda *a, **k: calls.append(1) or real(*a, **k))
    with raise_if_dask_computes():
        out = vn.n4(stack, **FAST)
    assert calls == [] and out.chunks[0] == (1, 1, 1)
    layers = {name: layer for name, layer in out.data.dask.layers.items() if name.startswith("n4-")}
    assert len(layers) == 1 and len(next(iter(layers.values()))) == 3
    values = out.compute(scheduler="sync")
    assert len(calls) == 3
    assert values.dims == stack.dims and list(values["volume"].values) == ["a", "b", "c"]


# ---------------------------------------------------------------------------
# 3. a stack: each volume corrected on its own
# ---------------------------------------------------------------------------


def test_each_volume_of_a_stack_equals_n4_of_it_alone():
    vols = [phantom((12, 16, 14), seed=s)[0] * k for s, k in ((0, 1.0), (1, 3.0), (2, 0.5))]
    stack = xr.DataArray(np.stack(vols), dims=("volume", "z", "y", "x")).chunk({"volume": 1, "z": 4})
    got = vn.n4(stack, **FAST).values
    for i, v in enumerate(vols):
        alone = vn.n4(xr.DataArray(v, dims=("z", "y", "x")), **FAST).values
        np.testing.assert_array_equal(got[i], alone)
        # in memory (computed at once) and dask backed: the same bits
        np.testing.assert_array_equal(vn.n4(stack.compute(), **FAST).values[i], alone)


def test_a_time_series_is_corrected_frame_by_frame_with_each_volumes_voxel_sizes():
    stack = vn.open_nifti(os.path.join(data_path, "example4d.nii.gz"))  # (volume, t=2, z, y, x), 2 x 2 x 2.2 mm
    assert stack.dims == ("volume", "t", "z", "y", "x")
    got = vn.n4(stack, **FAST)
    assert got.dims == stack.dims
    for t in range(stack.sizes["t"]):
        frame = stack.values[0, t]
        want = sitk_n4(frame, stack.attrs["zooms"][:3], **FAST)
        assert np.abs(got.values[0, t] - want).max() / np.abs(want).max() <= 1e-5
        np.testing.assert_array_equal(got.values[0, t], want.astype(np.float32))
    # a mask without the volume and t dims broadcasts to every frame
    m = xr.DataArray(stack.values[0, 0] > np.percentile(stack.values[0, 0], 50), dims=("z", "y", "x"))
    got_m = vn.n4(stack, mask=m, **FAST)
    want_m = sitk_n4(stack.values[0, 1], stack.attrs["zooms"][:3], m.values, **FAST)
    assert np.abs(got_m.values[0, 1] - want_m).max() / np.abs(want_m).max() <= 1e-5


# ---------------------------------------------------------------------------
# 4. bad input
# ---------------------------------------------------------------------------


def test_a_mask_of_another_shape_is_refused_naming_both_shapes():
    x = xr.DataArray(np.ones((2, 8, 10, 12), np.float32), dims=("volume", "z", "y", "x"))
    bad = xr.DataArray(np.ones((8, 10, 11), bool), dims=("z", "y", "x"))
    with pytest.raises(ValueError, match=r"\(z, y, x\) shape \(8, 10, 12\).*shape \(8, 10, 11\)"):
        vn.n4(x, mask=bad)
    with pytest.raises(ValueError, match=r"shape \(3, 8, 10, 12\)"):
        vn.n4(x, mask=xr.DataArray(np.ones((3, 8, 10, 12), bool), dims=("volume", "z", "y", "x")))
    with pytest.raises(ValueError, match=r"dims \('z', 'y'\)"):
        vn.n4(x, mask=xr.DataArray(np.ones((8, 10), bool), dims=("z", "y")))


def test_data_without_z_is_refused():
    images = xr.DataArray(np.ones((2, 10, 12), np.float32), dims=("volume", "y", "x"))
    with pytest.raises(ValueError, match=r"n4 corrects 3-D volumes: the data need the dims \('z', 'y', 'x'\).*missing \('z',\)"):
        vn.n4(images)


@pytest.mark.parametrize(("options", "words"), [
    ({"shrink_factor": 0}, "`shrink_factor` must be an integer >= 1"),
    ({"iterations": ()}, "`iterations` must be a non-empty sequence"),
    ({"iterations": (5, 0)}, "`iterations` must be a non-empty sequence"),
    ({"control_points": 3}, "`control_points` must exceed `spline_order`"),
    ({"bias_field_fwhm": 0.0}, "`bias_field_fwhm` must be a finite number > 0"),
])
def test_options_out_of_range_are_refused(options, words):
    with pytest.raises(ValueError, match=words):
        vn.n4(xr.DataArray(np.ones((8, 8, 8), np.float32), dims=("z", "y", "x")), **options)


# ---------------------------------------------------------------------------
# 5. the pipeline step and the command line
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return vn.datasets.make_cohort(tmp_path_factory.mktemp("data"), n_subjects=2, shape=(24, 28, 20), seed=3)


def test_a_spec_step_equals_the_function(tmp_path, cohort):
    spec = {"version": 1, "input": {"nifti": [str(f) for f in cohort]},
            "steps": [{"n4": {"shrink_factor": 2, "iterations": [3, 3]}}],
            "output": {"store": str(tmp_path / "out.zarr")}, "engine": {"scheduler": "sync", "progress": False}}
    assert vn.pipeline.run(spec, echo=None).status == "done"
    got = vn.open_zarr(tmp_path / "out.zarr")
    want = vn.n4(vn.open_nifti(cohort), shrink_factor=2, iterations=(3, 3))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.values, want.values)
    # N4 -> mask -> normalize in one spec: the spec's mask goes to n4 and to the normalization
    spec2 = {**spec, "output": {"store": str(tmp_path / "chain.zarr")}, "mask": {"threshold": {"method": "otsu", "per": "volume"}},
             "steps": [{"n4": {"shrink_factor": 2, "iterations": [3, 3]}}, {"zscore": {"per": "volume"}}]}
    assert vn.pipeline.run(spec2, echo=None).status == "done"
    x = vn.open_nifti(cohort)
    m = x > vn.threshold(x, "otsu", dim=("z", "y", "x"))
    corrected = vn.n4(x, mask=m, shrink_factor=2, iterations=(3, 3))
    want2 = vn.zscore(corrected, dim=("z", "y", "x"), mask=m)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "chain.zarr").values, want2.values, rtol=0, atol=1e-5)


def test_the_command_line_step(tmp_path, cohort):
    assert parse_step("n4:shrink_factor=2:iterations=3,3") == ("n4", {"shrink_factor": 2, "iterations": (3, 3)})
    with pytest.raises(ValueError, match="shrink_factor: expected an integer >= 1"):
        parse_step("n4:shrink_factor=0")
    out = tmp_path / "cli.zarr"
    assert main(["convert", *map(str, cohort), str(out), "--step", "n4:shrink_factor=2:iterations=3,3", "--scheduler", "sync", "--no-progress"]) == 0
    want = vn.n4(vn.open_nifti(cohort), shrink_factor=2, iterations=(3, 3))
    np.testing.assert_array_equal(vn.open_zarr(out).values, want.values)
    # the recorded step replays (volnorm apply): same options, same result
    again = tmp_path / "again.zarr"
    assert main(["apply", *map(str, cohort), str(again), "--params", str(out), "--scheduler", "sync", "--no-progress"]) == 0
    np.testing.assert_array_equal(vn.open_zarr(again).values, want.values)


# ---------------------------------------------------------------------------
# 6. the estimated bias field: from the same tasks, written beside the images
# ---------------------------------------------------------------------------


class FilterSpy:
    """SimpleITK's N4 filter, counting its runs and recording the threads it ran with."""

    runs: list[int] = []  # the filter's number of threads at each Execute
    set_threads: list[int] = []

    def __init__(self):
        self._f = REAL_FILTER()

    def SetNumberOfThreads(self, n):
        FilterSpy.set_threads.append(n)
        self._f.SetNumberOfThreads(n)

    def Execute(self, *args):
        FilterSpy.runs.append(self._f.GetNumberOfThreads())
        return self._f.Execute(*args)

    def __getattr__(self, name):
        return getattr(self._f, name)


REAL_FILTER = sitk.N4BiasFieldCorrectionImageFilter


@pytest.fixture
def spy(monkeypatch):
    FilterSpy.runs, FilterSpy.set_threads = [], []
    monkeypatch.setattr(sitk, "N4BiasFieldCorrectionImageFilter", FilterSpy)
    return FilterSpy


def sitk_field(volume: np.ndarray, spacing, **kw) -> np.ndarray:
    """exp(GetLogBiasFieldAsImage) of SimpleITK's recipe called directly (float64)."""
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing([float(s) for s in spacing])
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(kw["iterations"]))
    corrector.Execute(sitk.Shrink(image, [kw["shrink_factor"]] * 3), sitk.Shrink(mask, [kw["shrink_factor"]] * 3))
    return sitk.GetArrayFromImage(sitk.Exp(corrector.GetLogBiasFieldAsImage(image)))


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_the_field_comes_from_the_same_tasks_one_filter_run_per_volume(spy, scheduler):
    import dask

    img, _ = phantom((12, 16, 14))
    stack = xr.DataArray(np.stack([img, img * 2.0, img[::-1]]), dims=("volume", "z", "y", "x"),
                         coords={"volume": ["a", "b", "c"]}).chunk({"volume": 2, "z": 5})
    with raise_if_dask_computes():
        corrected, field = vn.n4(stack, **FAST, return_field=True)
    assert spy.runs == []
    assert corrected.dtype == field.dtype == np.float32 and field.name == "bias_field"
    assert corrected.dims == field.dims == stack.dims and list(field["volume"].values) == ["a", "b", "c"]
    c, f = dask.compute(corrected, field, scheduler=scheduler)
    assert len(spy.runs) == 3  # one N4 run per volume for both
    # corrected * field is the input, up to float32 rounding
    np.testing.assert_allclose(c.values * f.values, stack.values, rtol=2e-6, atol=0)
    # the same as corrected alone, and as the in-memory path
    np.testing.assert_array_equal(c.values, vn.n4(stack, **FAST).values)
    np.testing.assert_array_equal(f.values, vn.n4(stack.compute(), **FAST, return_field=True)[1].values)


def test_the_field_equals_simpleitks_exp_log_field_on_real_data():
    stack = vn.open_nifti(os.path.join(data_path, "anatomical.nii"))
    corrected, field = vn.n4(stack, **FAST, return_field=True)
    want = sitk_field(stack.values[0], stack.attrs["zooms"][:3], **FAST)
    assert np.abs(field.values[0] - want).max() / np.abs(want).max() <= 1e-5
    np.testing.assert_array_equal(corrected.values[0], sitk_n4(stack.values[0], stack.attrs["zooms"][:3], **FAST).astype(np.float32))
    np.testing.assert_allclose(corrected.values * field.values, stack.values, rtol=2e-6, atol=0)
    assert field.attrs["affine"] == stack.attrs["affine"] and "nifti_scaled" not in field.attrs


def test_the_threads_option_reaches_the_filter(spy):
    x = xr.DataArray(phantom((12, 16, 14))[0], dims=("z", "y", "x"))
    vn.n4(x, **FAST, threads=2)
    assert spy.set_threads == [2] and spy.runs == [2]
    spy.runs.clear(), spy.set_threads.clear()
    vn.n4(x, **FAST)  # not on a cluster: SimpleITK's own default
    assert spy.set_threads == [] and spy.runs == [REAL_FILTER().GetNumberOfThreads()]
    with pytest.raises(ValueError, match="`threads` must be an integer >= 1"):
        vn.n4(x, threads=0)


def test_on_a_distributed_worker_the_filter_gets_one_thread(spy):
    distributed = pytest.importorskip("distributed")
    x = xr.DataArray(phantom((12, 16, 14))[0][None], dims=("volume", "z", "y", "x")).chunk()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        vn.n4(x, **FAST).compute()
    assert spy.set_threads == [1] and spy.runs == [1]


def n4_spec(cohort, store, **extra):
    return {"version": 1, "input": {"nifti": [str(f) for f in cohort]},
            "steps": [{"n4": {"shrink_factor": 2, "iterations": [3, 3], "field": "bias_field"}}],
            "output": {"store": str(store)}, "engine": {"scheduler": "sync", "progress": False}, **extra}


def test_a_spec_writes_the_field_beside_the_images_in_the_same_pass(spy, tmp_path, cohort):
    import json

    store = tmp_path / "out.zarr"
    assert vn.pipeline.run(n4_spec(cohort, store), echo=None).status == "done"
    assert len(spy.runs) == len(cohort)  # images and fields: one N4 run per volume
    x = vn.open_nifti(cohort)
    corrected, field = vn.n4(x, shrink_factor=2, iterations=(3, 3), return_field=True)
    np.testing.assert_array_equal(vn.open_zarr(store).values, corrected.values)
    got = vn.open_zarr(store, group="bias_field")
    assert got.dtype == np.float32 and list(got["volume"].values) == list(x["volume"].values)
    np.testing.assert_array_equal(got.values, field.values)
    assert got.attrs["affine"] == x.attrs["affine"] and got.attrs["zooms"] == x.attrs["zooms"]
    # committed with the store: in its manifest, every array checksummed, each volume group complete
    m = json.loads((store / "zarr.json").read_text())["attributes"]["volnorm"]
    assert m["beside"] == ["bias_field"] and m["complete"]
    for name in x["volume"].values:
        assert m["arrays"][f"bias_field/{name}/0"]["checksum"] == "crc32c"
        assert json.loads((store / "bias_field" / name / "zarr.json").read_text())["attributes"]["volnorm"]["complete"]
    assert vn.verify(store, sources=False).ok
    with pytest.raises(ValueError, match=r"no group 'bias' beside the volumes \(groups beside them: bias_field\)"):
        vn.open_zarr(store, group="bias")
    # the recorded step says where its field went; replayed without a store it is only the correction
    steps = json.loads((store / "zarr.json").read_text())["attributes"]["volnorm"]["steps"]
    assert steps[0]["options"]["field"] == "bias_field"
    # the Python API: to_zarr(..., beside=)
    py = tmp_path / "py.zarr"
    vn.to_zarr(corrected, py, beside={"bias_field": field})
    np.testing.assert_array_equal(vn.open_zarr(py, group="bias_field").values, got.values)
    with pytest.raises(ValueError, match="must have the data's volumes and shapes"):
        vn.to_zarr(corrected, tmp_path / "bad.zarr", beside={"bias_field": field.isel(volume=[0])})
    with pytest.raises(ValueError, match="volume"):
        vn.to_zarr(corrected, tmp_path / "bad.zarr", beside={str(x["volume"].values[0]): field})


def test_a_killed_run_leaves_no_store_and_resumes_with_the_fields(spy, tmp_path, cohort, monkeypatch):
    from volnorm.io import writers

    store = tmp_path / "out.zarr"
    monkeypatch.setattr(writers, "WRITE_BATCH_BYTES", 1)  # one volume per batch, each marked complete when done
    real = n4_module._correct
    seen = []

    def dies_on_the_second(*a, **k):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(n4_module, "_correct", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        vn.pipeline.run(n4_spec(cohort, store), echo=None)
    assert not store.exists()
    monkeypatch.setattr(n4_module, "_correct", real)
    spy.runs.clear()
    assert vn.pipeline.run(n4_spec(cohort, store), echo=None).status == "done"
    assert len(spy.runs) == 1  # the first volume and its field were complete: only the second is corrected
    _, field = vn.n4(vn.open_nifti(cohort), shrink_factor=2, iterations=(3, 3), return_field=True)
    np.testing.assert_array_equal(vn.open_zarr(store, group="bias_field").values, field.values)


def test_n4_then_mask_then_normalize_equals_the_steps_in_python(spy, tmp_path, cohort):
    spec = {**n4_spec(cohort, tmp_path / "chain.zarr"), "mask": {"threshold": {"method": "otsu", "per": "volume"}, "after": "n4"},
            "outputs": {"statistics": {"path": str(tmp_path / "stats.json")}}}
    spec["steps"] = [spec["steps"][0], {"zscore": {"per": "volume"}}]
    assert vn.pipeline.run(spec, echo=None).status == "done"
    # N4 in each pass over its output: the mask's threshold (its range, then its histogram), the zscore fit, the write
    # (images, fields and the mask); the statistics read the mask written beside the images
    assert len(spy.runs) == 4 * len(cohort)
    written_mask = vn.open_zarr(tmp_path / "chain.zarr", group="mask")
    assert written_mask.dtype == np.uint8 and written_mask.attrs["affine"] == vn.open_nifti(cohort).attrs["affine"]
    x = vn.open_nifti(cohort)
    corrected = vn.n4(x, shrink_factor=2, iterations=(3, 3))  # n4 without the mask: its own Otsu mask
    m = corrected > vn.threshold(corrected, "otsu", dim=("z", "y", "x"))  # the mask of the corrected images
    want = vn.zscore(corrected, dim=("z", "y", "x"), mask=m)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "chain.zarr").values, want.values, rtol=0, atol=1e-5)
    import json
    rows = json.loads((tmp_path / "stats.json").read_text())["volumes"]
    assert [r["count"] for r in rows] == [int(m.values[i].sum()) for i in range(len(cohort))]
    np.testing.assert_array_equal(written_mask.values, m.values)
    # the statistics again (their file removed), the images up to date: from the mask written, no N4 run
    (tmp_path / "stats.json").unlink()
    spy.runs.clear()
    assert vn.pipeline.run(spec, echo=None).status == "done" and spy.runs == []
    assert json.loads((tmp_path / "stats.json").read_text())["volumes"] == rows
    p = vn.pipeline.plan(spec)
    assert [s for s, _ in p["passes"]][:2] == ["fit mask threshold", "fit zscore"]
    assert "output of step 'n4'" in p["passes"][0][1] and "N4 runs again" in p["passes"][1][1]


def test_the_example_spec_on_real_files_equals_the_steps_in_python(tmp_path):
    import shutil

    from volnorm.pipeline import load_spec

    example = os.path.join(os.path.dirname(__file__), "..", "workflows", "examples", "n4-normalize.yaml")
    (tmp_path / "data").mkdir()
    shutil.copy(os.path.join(data_path, "anatomical.nii"), tmp_path / "data" / "sub-01.nii")
    shutil.copy(example, tmp_path)
    spec = load_spec(tmp_path / "n4-normalize.yaml")
    spec.data["engine"]["scheduler"] = "sync"
    assert vn.pipeline.run(spec, echo=None).status == "done"
    x = vn.open_nifti(tmp_path / "data" / "sub-01.nii")
    corrected, field = vn.n4(x, shrink_factor=4, iterations=(50, 50, 50, 50), return_field=True)
    m = corrected > vn.threshold(corrected, "otsu", dim=("z", "y", "x"))
    want = vn.zscore(corrected, dim=("z", "y", "x"), mask=m)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "n4-normalized.zarr").values, want.values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "n4-normalized.zarr", group="bias_field").values, field.values)


def test_the_planner_counts_n4s_memory(tmp_path, cohort):
    from volnorm.pipeline.planner import N4_BYTES_PER_VOXEL, describe

    p = vn.pipeline.plan(n4_spec(cohort, tmp_path / "o.zarr"))
    assert p["n4_bytes"] == N4_BYTES_PER_VOXEL * 24 * 28 * 20
    plain = vn.pipeline.plan({**n4_spec(cohort, tmp_path / "o.zarr"), "steps": ["zscore"]})
    assert p["memory"] - plain["memory"] == p["n4_bytes"]
    assert "an n4 task's whole volume, 32 bytes per voxel" in describe(p)
