"""One vocabulary for `dim`: each `per` word means the same thing in Python, on the command
line and in a spec (volnorm._dims' table), and the earlier spellings still work with a
deprecation warning naming the new word."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm import _dims
from volnorm._utils import VolnormDeprecationWarning
from volnorm.cli import main
from volnorm.pipeline.steps import check_options, check_threshold_options, parse_step

STACK_DIMS = ("volume", "z", "y", "x")

#: per word -> the Python dim= it stands for, written out (not computed by the code under test)
TABLE = {
    "dataset": None,
    "volume": ("z", "y", "x"),
    "slice": ("y", "x"),
    "voxel": "volume",
}


@pytest.mark.parametrize("per", list(TABLE))
def test_the_table_is_the_one_in_the_module(per):
    assert per in _dims.PER
    assert _dims.dim_for(per, STACK_DIMS) == TABLE[per]


def test_every_word_of_the_module_is_in_the_table():
    assert set(_dims.PER) == set(TABLE)


@pytest.fixture(scope="module")
def stack_store(cohort, tmp_path_factory):
    """Three phantom subjects as one store (a stack with dims volume, z, y, x)."""
    out = tmp_path_factory.mktemp("dims") / "in.zarr"
    vn.convert(cohort[:3], out, scheduler="sync", progress=False)
    return out


def _python(data: xr.DataArray, per: str) -> xr.DataArray:
    return vn.zscore(data, dim=TABLE[per])


@pytest.mark.parametrize("per", list(TABLE))
def test_a_step_per_word_is_the_python_dim_on_the_command_line_and_in_a_spec(per, stack_store, tmp_path):
    data = vn.open_zarr(stack_store)
    want = _python(data, per).values

    cli_out = tmp_path / "cli.zarr"
    assert main(["-q", "convert", str(stack_store), str(cli_out), "--step", f"zscore:per={per}", "--scheduler", "sync"]) == 0
    np.testing.assert_allclose(vn.open_zarr(cli_out).values, want, rtol=1e-6)

    spec = {"version": 1, "input": {"store": str(stack_store)}, "steps": [{"zscore": {"per": per}}],
            "output": {"store": str(tmp_path / "yaml.zarr")}, "engine": {"scheduler": "sync"}}
    vn.pipeline.run(spec, echo=None)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "yaml.zarr").values, want, rtol=1e-6)


@pytest.mark.parametrize("per", ["dataset", "volume", "slice"])
def test_a_threshold_per_word_is_the_python_dim_on_the_command_line_and_in_a_spec_mask(per, stack_store, tmp_path, capsys):
    data = vn.open_zarr(stack_store)
    want = vn.threshold(data, "otsu", dim=TABLE[per])

    capsys.readouterr()
    assert main(["-q", "threshold", str(stack_store), "--per", per, "--json", "--scheduler", "sync"]) == 0
    got = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(np.asarray(got["data"], dtype=float), want.values)

    # the spec's mask from the data: the same thresholds, so the same masked statistics
    spec = {"version": 1, "input": {"store": str(stack_store)}, "mask": {"threshold": {"method": "otsu", "per": per}},
            "steps": [{"zscore": {}}], "output": {"store": str(tmp_path / "m.zarr")}, "engine": {"scheduler": "sync"}}
    vn.pipeline.run(spec, echo=None)
    ref = vn.zscore(data, mask=data > want)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "m.zarr").values, ref.values, rtol=1e-6)


def test_dim_as_names_means_what_it_means_in_python(stack_store, tmp_path):
    data = vn.open_zarr(stack_store)
    spec = {"version": 1, "input": {"store": str(stack_store)}, "steps": [{"zscore": {"dim": ["y", "x"]}}],
            "output": {"store": str(tmp_path / "o.zarr")}, "engine": {"scheduler": "sync"}}
    vn.pipeline.run(spec, echo=None)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "o.zarr").values, vn.zscore(data, dim=("y", "x")).values, rtol=1e-6)


# ---------------------------------------------------------------------------
# earlier spellings: still read, with a warning naming the new word
# ---------------------------------------------------------------------------

LEGACY = [
    ("volume", "volume"),
    ("per-volume", "volume"),
    ("slice", "slice"),
]


@pytest.mark.parametrize(("old", "per"), LEGACY)
def test_a_legacy_dim_word_of_a_step_becomes_its_per_word_with_a_warning(old, per):
    with pytest.warns(VolnormDeprecationWarning, match=rf"`dim: {old}` is deprecated; write `per: {per}`"):
        assert check_options("zscore", {"dim": old}) == {"per": per}
    with pytest.warns(VolnormDeprecationWarning, match=f"write `per: {per}`"):
        assert parse_step(f"zscore:dim={old}") == ("zscore", {"per": per})
    with pytest.warns(VolnormDeprecationWarning, match=f"write `per: {per}`"):
        assert check_threshold_options({"method": "otsu", "dim": old}) == {"per": per, "method": "otsu"}


def test_a_legacy_spec_runs_as_before(stack_store, tmp_path):
    """`dim: volume` in a spec's mask.threshold and steps meant one per volume: it still does."""
    data = vn.open_zarr(stack_store)
    spec = {"version": 1, "input": {"store": str(stack_store)}, "mask": {"threshold": {"method": "otsu", "dim": "volume"}},
            "steps": [{"rescale": {"dim": "volume"}}], "output": {"store": str(tmp_path / "o.zarr")}, "engine": {"scheduler": "sync"}}
    with pytest.warns(VolnormDeprecationWarning):
        vn.pipeline.run(spec, echo=None)
    mask = data > vn.threshold(data, "otsu", dim=("z", "y", "x"))
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "o.zarr").values,
                               vn.rescale(data, dim=("z", "y", "x"), mask=mask).values, rtol=1e-6)


def test_per_and_dim_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        check_options("zscore", {"per": "volume", "dim": ["y", "x"]})


def test_an_unknown_per_word_is_refused_with_the_words():
    with pytest.raises(ValueError, match="per must be one of dataset, volume, slice, voxel; got 'volumes'"):
        check_options("zscore", {"per": "volumes"})


def test_a_step_without_dims_has_no_per():
    """Nyúl's landmarks are always per volume: the step takes no `per`."""
    assert "dim" not in vn.pipeline.steps.step_options("nyul")
    with pytest.raises(ValueError, match="step 'nyul' has no `per` option"):
        check_options("nyul", {"per": "volume"})


def test_mean_scale_takes_per_volume_or_dataset(stack_store):
    data = vn.open_zarr(stack_store)
    assert check_options("mean_scale", {"per": "dataset"}) == {"per": "dataset"}
    with pytest.raises(ValueError, match="per must be one of volume, dataset"):
        check_options("mean_scale", {"per": "slice"})
    out = vn.pipeline.steps.run_steps(data, [("mean_scale", {"per": "dataset"})])
    np.testing.assert_allclose(out.values, vn.mean_scale(data, per_volume=False).values, rtol=1e-6)


def test_python_dim_volume_is_still_across_the_volumes(stack_store):
    """The Python meaning is xarray's and does not change (no warning)."""
    data = vn.open_zarr(stack_store)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VolnormDeprecationWarning)
        h = vn.histogram(data, dim="volume", bins=4)
    assert h.dims == ("z", "y", "x", "bin")


def test_plane_steps_take_only_the_words_that_name_a_plane():
    """CLAHE and dithering work on planes: their dim is the plane, so only plane words apply."""
    assert check_options("equalize_adaptive", {"per": "slice"}) == {"per": "slice"}
    assert check_options("equalize_adaptive", {"per": "volume"}) == {"per": "volume"}
    with pytest.raises(ValueError, match="per must be one of slice; got 'volume'"):
        check_options("dither", {"per": "volume"})
    with pytest.raises(ValueError, match="per must be one of slice, volume; got 'voxel'"):
        check_options("equalize_adaptive", {"per": "voxel"})
