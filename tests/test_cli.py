"""The volnorm command, run in-process as a user would."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import volnorm as vn
from volnorm.cli import main


def test_convert_info_export(cohort, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    assert main(["convert", *map(str, cohort), str(out), "--scheduler", "sync", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"volnorm store: {out}" in text and "6 volumes" in text
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "state       complete" in text and "blake3" in text and "affine" in text
    assert main(["info", str(out), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["complete"] is True and len(facts["volumes"]) == 6
    assert main(["export", str(out), str(tmp_path / "nii")]) == 0
    first = tmp_path / "nii" / cohort[0].name.replace(".nii.gz", ".nii").replace(".nii", ".nii.gz")
    np.testing.assert_array_equal(nib.load(first).get_fdata(), nib.load(cohort[0]).get_fdata())
    # a second run refuses to overwrite, exit code 1 and a message naming the store
    assert main(["convert", *map(str, cohort), str(out), "--scheduler", "sync"]) == 1
    assert "already exists; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err


def test_info_on_a_nifti_file(capsys):
    f = vn.datasets.nibabel_files()["functional.nii"]
    assert main(["info", str(f)]) == 0
    text = capsys.readouterr().out
    assert "(17, 21, 3, 20)" in text and "float64 after scaling" in text


def test_dry_run_writes_nothing(cohort, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    assert main(["convert", *map(str, cohort), str(out), "--dry-run"]) == 0
    assert "6 valid inputs" in capsys.readouterr().out
    assert not out.exists()


def test_bad_input_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.nii"
    bad.write_text("nope" * 100)
    assert main(["convert", str(bad), str(tmp_path / "o.zarr"), "--scheduler", "sync"]) == 1
    err = capsys.readouterr().err
    assert "bad.nii: not a NIfTI file" in err and "Traceback" not in err


def test_stats_and_threshold_commands(cohort, tmp_path, capsys):
    import numpy as np
    from skimage.filters import threshold_otsu

    assert main(["stats", *map(str, cohort[:3]), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    data = np.stack([nib.load(p).get_fdata() for p in cohort[:3]])
    assert facts["data_vars"]["count"]["data"] == data.size
    assert facts["data_vars"]["q0.5"]["data"] == np.median(data)
    assert main(["stats", *map(str, cohort[:3]), "--per", "volume"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["volume", "count"] and len(out.splitlines()) == 4
    assert main(["threshold", str(cohort[0]), "--method", "otsu"]) == 0
    want = threshold_otsu(nib.load(cohort[0]).dataobj.get_unscaled())
    assert capsys.readouterr().out.strip() == f"otsu threshold: {float(want):.6g}"
    assert main(["threshold", str(cohort[0]), "--method", "ostu"]) == 1
    assert "Did you mean 'otsu'" in capsys.readouterr().err
    store = tmp_path / "c.zarr"
    vn.convert(cohort[:2], store, scheduler="sync")
    assert main(["stats", str(store), "--per", "slice"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 2 * nib.load(cohort[0]).shape[2]


def test_hist_writes_a_picture_and_never_overwrites(tmp_path, capsys):
    src = vn.datasets.nibabel_files()["anatomical.nii"]
    out = tmp_path / "h.png"
    assert main(["hist", str(src), "--out", str(out), "--mark", "otsu,li", "--log"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    before = out.read_bytes()
    assert main(["hist", str(src), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["hist", str(src), "--out", str(out), "--overwrite", "--mark", "none"]) == 0
    assert main(["hist", str(src), "--out", str(tmp_path / "h.txt")]) == 1


def test_plot_histogram_lines_per_volume():
    import xarray as xr

    x = xr.DataArray(np.random.default_rng(0).normal(size=(3, 400)), dims=("volume", "x"), coords={"volume": ["a", "b", "c"]})
    ax = vn.plot.plot_histogram(vn.histogram(x, dim="x", bins=30), thresholds={"otsu": 0.1})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c", "otsu = 0.1"]
    heights = [p.get_data().values for p in ax.patches]
    np.testing.assert_allclose([h.sum() for h in heights], 1.0)  # density: volumes compare


@pytest.mark.slow
def test_stats_on_a_local_cluster_equals_threads(capsys):
    src = str(vn.datasets.nibabel_files()["anatomical.nii"])
    assert main(["stats", src, "--json", "--scheduler", "sync"]) == 0
    sync = json.loads(capsys.readouterr().out)
    assert main(["stats", src, "--json", "--scheduler", "local"]) == 0
    assert json.loads(capsys.readouterr().out) == sync


def test_convert_with_steps_then_apply_to_new_data(tmp_path, capsys, cohort):

    train, test = [str(p) for p in cohort[:3]], [str(p) for p in cohort[3:]]
    params = tmp_path / "p.json"
    out = tmp_path / "train.zarr"
    assert main(["convert", *train, str(out), "--step", "rescale:percentiles=1,99:out_range=uint8",
                 "--step", "equalize:dim=volume", "--save-params", str(params), "--scheduler", "threads"]) == 0
    history = json.loads(params.read_text())
    assert [h["method"] for h in history] == ["rescale", "equalize"]
    stored = vn.open_zarr(out)
    ref = vn.equalize(vn.rescale(vn.open_nifti(train), percentiles=(1, 99), out_range="uint8"), dim=("z", "y", "x"))
    np.testing.assert_array_equal(stored.values, ref.values)
    # the dataset-wide window is reused on new data; the per-volume CDFs are fitted again there
    assert main(["apply", *test, str(tmp_path / "test.zarr"), "--params", str(params), "--scheduler", "sync"]) == 0
    new = vn.open_nifti(test)
    p = vn.Params.from_dict(history[0])
    want = vn.equalize(vn.rescale(new, params=p, out_range="uint8"), dim=("z", "y", "x"))
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "test.zarr").values, want.values)
    assert main(["apply", *test, str(tmp_path / "again.zarr"), "--params", str(out)]) == 0  # from the store's provenance
    capsys.readouterr()
    assert main(["convert", *train, str(tmp_path / "x.zarr"), "--step", "rescal"]) == 1
    assert "did you mean 'rescale'" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()


def test_voxel_hist_append_and_normative(cohort, tmp_path, capsys):
    """volnorm voxel-hist counts a store's volumes into it, --append adds new files (a file
    already counted is refused), volnorm normative writes percentile ranks and z-scores."""
    from volnorm.cli import main

    store = tmp_path / "c.zarr"
    assert main(["-q", "convert", *map(str, cohort[:4]), str(store)]) == 0
    assert main(["voxel-hist", str(store), "--bins", "32", "--range", "0,2000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["volumes"] == 4
    assert main(["voxel-hist", str(store), "--append", str(cohort[4]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["volumes"] == 5 and info["dtype"] == "uint8" and info["bins"] == 32
    assert main(["voxel-hist", str(store), "--append", str(cohort[0])]) == 1  # counted through the store already
    assert "already counted" in capsys.readouterr().err
    stack = vn.open_nifti(cohort[:5])
    ref = vn.histogram(stack, dim="volume", bins=32, range=(0, 2000)).values
    np.testing.assert_array_equal(vn.open_voxel_histogram(store).values, ref)
    out = tmp_path / "scores.nii.gz"
    assert main(["normative", str(store), str(cohort[5]), "--out", str(out)]) == 0
    pct = nib.load(out)
    z = nib.load(tmp_path / "scores_z.nii.gz")
    new = nib.load(cohort[5])
    np.testing.assert_allclose(pct.affine, new.affine)
    h = vn.open_voxel_histogram(store)
    vol = vn.open_nifti(cohort[5]).isel(volume=0, drop=True)
    expect = vn.normative_score(vol, h)
    np.testing.assert_allclose(np.asarray(pct.dataobj).T, expect["percentile"].values, equal_nan=True)
    np.testing.assert_allclose(np.asarray(z.dataobj).T, expect["zscore"].values, equal_nan=True)
    assert main(["normative", str(store), str(cohort[5]), "--out", str(out)]) == 1  # never overwritten without asking
    assert "exists" in capsys.readouterr().err
    zout = tmp_path / "scores.zarr"  # or both maps as NIfTI-Zarr, in one store
    assert main(["-q", "normative", str(store), str(cohort[5]), "--out", str(zout)]) == 0
    maps = vn.open_zarr(zout)
    assert maps["volume"].values.tolist() == ["percentile", "zscore"]
    np.testing.assert_allclose(maps.attrs["affine"], new.affine)
    np.testing.assert_array_equal(maps.sel(volume="percentile").values, expect["percentile"].values)
    np.testing.assert_array_equal(maps.sel(volume="zscore").values, expect["zscore"].values)
    assert main(["normative", str(store), str(cohort[5]), "--out", str(zout)]) == 1
