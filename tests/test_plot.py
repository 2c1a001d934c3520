"""Pictures: montages, mask overlays, per-voxel maps and a store's one-page preview.

Each test checks what was drawn (the pixels of the panels are the data's slices, the mask
is coloured where it is true), not only that a file appeared.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture
def anat():
    return vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])


def test_montage_panels_are_the_slices_before_and_after(anat):
    after = vn.rescale(anat, percentiles=(1, 99))
    fig = vn.plot.plot_montage(anat, after, slices=3)
    axes = fig.axes
    assert len(axes) == 6
    z = anat.sizes["z"]
    want = sorted({int(round(f * (z - 1))) for f in np.linspace(0.25, 0.75, 3)})
    for c, k in enumerate(want):
        np.testing.assert_array_equal(axes[c].images[0].get_array(), anat.values[0, k].astype(np.float64))
        np.testing.assert_allclose(axes[3 + c].images[0].get_array(), after.values[0, k].astype(np.float64))
        assert axes[c].get_title().endswith(f"before z={k}") and axes[3 + c].get_title().endswith(f"after z={k}")


def test_montage_of_a_2d_image_stack_shows_each_image(tmp_path):
    x = xr.DataArray(np.random.default_rng(0).integers(0, 255, (5, 20, 30), dtype=np.uint8), dims=("volume", "y", "x"))
    fig = vn.plot.plot_montage(x, vn.equalize(x), volumes=[1, 4])
    assert len(fig.axes) == 4
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), x.values[4].astype(np.float64))
    assert fig.axes[1].get_title() == "4 before" and fig.axes[3].get_title() == "4 after"  # one column per image
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # Jupyter shows it
    with pytest.raises(ValueError, match="`volumes` must pick among 5"):
        vn.plot.plot_montage(x, volumes=[7])


def test_mask_overlay_colours_the_mask(anat):
    mask = anat > vn.threshold(anat, "otsu")
    fig = vn.plot.plot_mask_overlay(anat, mask, slices=1)
    (ax,) = fig.axes
    base, over = ax.images
    k = anat.sizes["z"] // 2
    np.testing.assert_array_equal(np.asarray(over.get_array()), mask.values[0, k])
    assert f"mask {100 * mask.values[0, k].mean():.0f}%" in ax.get_title()
    with pytest.raises(ValueError, match="not on the data's grid"):
        vn.plot.plot_mask_overlay(anat, mask.isel(x=slice(0, 10)), slices=1)


def test_map_has_a_colour_bar_with_the_name():
    m = xr.DataArray(np.arange(4 * 6 * 5, dtype=float).reshape(4, 6, 5), dims=("z", "y", "x"), name="mean")
    fig = vn.plot.plot_map(m, slices=2)
    assert len(fig.axes) == 3 and fig.axes[-1].get_ylabel() == "mean"


def test_preview_of_a_run_store_shows_sources_before_and_output_after(tmp_path, capsys):
    files = vn.datasets.make_cohort(tmp_path / "data", n_subjects=4, shape=(24, 28, 20), seed=1)
    spec = {"version": 1, "input": {"nifti": str(tmp_path / "data" / "sub-*.nii")}, "steps": ["zscore"],
            "output": {"store": str(tmp_path / "out.zarr")}, "engine": {"scheduler": "threads", "progress": False}}
    vn.pipeline.run(spec, echo=None)
    fig = vn.plot.preview(tmp_path / "out.zarr", volumes=2, slices=3)
    titles = [a.get_title() for a in fig.axes]
    assert sum("before" in t for t in titles) == 6 + 1 and sum("after" in t for t in titles) == 6 + 1  # + the histograms
    src = vn.open_nifti(files[:1])
    k = src.sizes["z"] // 2
    first_before = fig.axes[1]  # volume 1, before, the middle slice
    np.testing.assert_array_equal(first_before.images[0].get_array(), src.values[0, k].astype(np.float64))
    assert "zscore" in fig._suptitle.get_text()
    # the CLI: writes a PNG, refuses to overwrite it
    out = tmp_path / "preview.png"
    assert main(["preview", str(tmp_path / "out.zarr"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    before = out.read_bytes()
    assert main(["preview", str(tmp_path / "out.zarr"), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["preview", str(tmp_path / "data"), "--out", str(tmp_path / "p2.png")]) == 1
    assert "not a volnorm store" in capsys.readouterr().err


def test_params_and_summaries_show_as_tables_in_jupyter(anat):
    p = vn.fit_rescale(anat, percentiles=(1, 99))
    html = p._repr_html_()
    assert "volnorm Params: rescale" in html and f"{float(p.values['in_lo']):.6g}" in html and "percentiles" in html
    landmarks = vn.nyul_fit(anat)
    assert "over (&#x27;landmark&#x27;,)" in landmarks._repr_html_()
    s = vn.summarize(anat, quantiles=[0.5])
    assert f"{float(s['mean']):.6g}" in s._repr_html_() and "<table>" in s._repr_html_()
    per = vn.summarize(anat, dim=("z", "y", "x"), quantiles=[0.5])
    assert "<table" in per._repr_html_() and "anatomical" in per._repr_html_()


def test_preview_of_a_store_with_volumes_of_different_shapes(tmp_path):
    files = vn.datasets.nibabel_files()
    vn.convert([files["anatomical.nii"], files["example4d.nii.gz"]], tmp_path / "c.zarr", scheduler="threads", progress=False)
    fig = vn.plot.preview(tmp_path / "c.zarr", tmp_path / "p.png", volumes=2, slices=2)
    images = [a for a in fig.axes if a.images]
    assert len(images) == 4 and {a.get_title().split()[0] for a in images} == {"anatomical", "example4d"}
    (hist,) = [a for a in fig.axes if not a.images]
    assert len(hist.patches) == 2 and "different shapes" in fig._suptitle.get_text()
    assert (tmp_path / "p.png").stat().st_size > 20_000
