"""FSL compatibility, pinned to FSL's algorithm as written in its C++ (newimage ``find_thresholds``,
``find_histogram``, ``percentile``), transliterated below literally and in memory (float32 where
FSL's ``T`` is ``float``), on crafted distributions: uniform, long tails that need re-binning, a tail
that exhausts the ten passes, masks, constant images, float and integer data, several chunkings."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm import fsl
from volnorm.cli import main

f32 = np.float32


def fsl_find_histogram(vol, bins, vmin, vmax):
    hist = np.zeros(bins, dtype=np.int64)
    if vmax == vmin:
        return hist, -1
    fa = bins / float(f32(vmax - vmin))
    fb = bins * -float(vmin) / float(f32(vmax - vmin))
    for v in vol.astype(np.float32).astype(np.float64):
        binno = int(fa * v + fb)  # C's (int): truncation toward zero
        binno = min(max(binno, 0), bins - 1)
        hist[binno] += 1
    return hist, len(vol)


def fsl_find_thresholds(vol):
    """``find_thresholds`` of FSL's newimage, literally (vol: the masked voxels, 1-D)."""
    bins, max_passes = 1000, 10
    top_bin = bottom_bin = 0
    npass = 1
    lowest_bin, highest_bin = 0, bins - 1
    vmin, vmax = f32(vol.min()), f32(vol.max())
    thresh2 = thresh98 = f32(0)
    passes = 0
    while npass == 1 or float(f32(thresh98 - thresh2)) < float(f32(vmax - vmin)) / 10:
        if npass > 1:
            bottom_bin = max(bottom_bin - 1, 0)
            top_bin = min(top_bin + 1, bins - 1)
            tmpmin = f32(float(vmin) + (bottom_bin / bins) * float(f32(vmax - vmin)))
            vmax = f32(float(vmin) + ((top_bin + 1) / bins) * float(f32(vmax - vmin)))
            vmin = tmpmin
        if npass == max_passes or vmin == vmax:
            vmin, vmax = f32(vol.min()), f32(vol.max())
        hist, validsize = fsl_find_histogram(vol, bins, vmin, vmax)
        passes += 1
        if validsize < 1:
            return (vmin, vmax), passes
        if npass == max_passes:
            validsize -= hist[lowest_bin] + hist[highest_bin]
            lowest_bin += 1
            highest_bin -= 1
        if validsize < 0:
            return (vmin, vmin), passes
        fa = float(f32(vmax - vmin)) / bins
        count, bottom_bin = 0, lowest_bin
        while count < validsize // 50:
            count += hist[bottom_bin]
            bottom_bin += 1
        bottom_bin -= 1
        thresh2 = f32(vmin + f32(bottom_bin * fa))
        count, top_bin = 0, highest_bin
        while count < validsize // 50:
            count += hist[top_bin]
            top_bin -= 1
        top_bin += 1
        thresh98 = f32(vmin + f32((top_bin + 1) * fa))
        if npass == max_passes:
            break
        npass += 1
    return (thresh2, thresh98), passes


def fsl_percentile(vol, p):
    s = np.sort(vol.astype(np.float32))
    k = min(int(f32(len(s)) * f32(p / 100.0)), len(s) - 1)
    return s[k]


def _as_py(v):
    return float(str(f32(v)))


def crafted() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    brain = np.concatenate([np.zeros(60000), rng.normal(600, 90, 30000), rng.normal(300, 40, 10000)])
    return {
        "uniform-int": np.arange(1000, dtype=np.int16),
        "mri-like": brain.astype(np.float32),
        "long-tail": np.concatenate([rng.normal(100, 10, 50000), [1e6, 2e6, 5e6] * 100]).astype(np.float32),
        "very-long-tail": np.concatenate([np.zeros(20000), 10.0 ** rng.uniform(0, 12, 2000)]).astype(np.float32),
        # a spike with tails over 40 decades: every pass narrows, the tenth gives up
        "forty-decades": np.concatenate(
            [np.zeros(50000), -(10.0 ** rng.uniform(-20, 20, 1250)), 10.0 ** rng.uniform(-20, 20, 1250)]
        ).astype(np.float32),
        "cauchy": rng.standard_cauchy(40000).astype(np.float32),
        "uint16-tail": np.concatenate([rng.integers(0, 400, 50000), [65000] * 3000]).astype(np.uint16),
        "negative": (-rng.exponential(50, 30000) - 1000).astype(np.float32),
        "two-values": np.array([3.0] * 500 + [7.0] * 500, dtype=np.float32),
    }


CASES = crafted()


@pytest.mark.parametrize("name", list(CASES))
def test_robust_range_is_fsl_find_thresholds(name):
    v = CASES[name]
    (lo, hi), passes = fsl_find_thresholds(v)
    for chunks in (len(v), 4096, 777):
        x = xr.DataArray(v, dims="x").chunk(chunks)
        assert vn.fsl.robust_range(x) == (_as_py(lo), _as_py(hi)), (name, chunks, passes)


def test_the_crafted_cases_exercise_rebinning_and_the_last_pass():
    passes = {name: fsl_find_thresholds(v)[1] for name, v in CASES.items()}
    assert passes["uniform-int"] == 1
    assert passes["long-tail"] > 1
    assert passes["very-long-tail"] == 2
    assert passes["forty-decades"] == 10  # gives up: full range without its end bins
    assert max(passes.values()) == 10 and min(passes.values()) == 1


def test_float_passes_are_counted_reads(monkeypatch):
    """Integer data: every pass regrouped from one exact histogram; float data: one read per pass."""
    calls = []
    orig = fsl._kernels.hist_fsl

    def spy(*a):
        calls.append(1)
        return orig(*a)

    monkeypatch.setattr(fsl._kernels, "hist_fsl", spy)
    v = CASES["long-tail"]
    passes = fsl_find_thresholds(v)[1]
    vn.fsl.robust_range(xr.DataArray(v, dims="x").chunk(len(v)))
    assert len(calls) == passes
    calls.clear()
    vn.fsl.robust_range(xr.DataArray(CASES["uint16-tail"], dims="x").chunk(10000))
    assert calls == []


def test_masked_and_positive():
    v = CASES["mri-like"]
    m = np.zeros(v.shape, bool)
    m[::3] = True
    x = xr.DataArray(v, dims="x").chunk(5000)
    mask = xr.DataArray(m, dims="x")
    (lo, hi), _ = fsl_find_thresholds(v[m])
    assert vn.fsl.robust_range(x, mask=mask) == (_as_py(lo), _as_py(hi))
    (lo, hi), _ = fsl_find_thresholds(v[v > 0])
    assert vn.fsl.robust_range(x, positive=True) == (_as_py(lo), _as_py(hi))
    # -thrP: FSL's lower limit from the robust range of the voxels > 0
    assert vn.fsl.thrp_threshold(x, 10, positive=True) == _as_py(float(lo) + 0.1 * float(f32(hi - lo)))
    assert vn.threshold(x, "robust_range_positive", q=0.1) == pytest.approx(vn.fsl.thrp_threshold(x, 10, positive=True))


def test_constant_image_returns_its_value():
    x = xr.DataArray(np.full(100, 5.0, np.float32), dims="x")
    assert vn.fsl.robust_range(x) == (5.0, 5.0)


@pytest.mark.parametrize("name", ["mri-like", "uint16-tail", "cauchy", "two-values"])
@pytest.mark.parametrize("p", [0, 2, 25, 50, 98, 100])
def test_percentiles_are_fsl_nearest_rank(name, p):
    v = CASES[name]
    x = xr.DataArray(v, dims="x").chunk(3001)
    assert vn.fsl.percentile(x, p) == _as_py(fsl_percentile(v, p))
    nz = v[v != 0]
    assert vn.fsl.percentile(x, p, nonzero=True) == _as_py(fsl_percentile(nz, p))


def test_fslstats_options_in_order():
    v = CASES["mri-like"]
    x = xr.DataArray(v, dims="x").chunk(7000)
    nz = v[v != 0].astype(np.float64)
    out = vn.fsl.fslstats(x, ["-R", "-m", "-M", "-s", "-S", "-V", "-p", "50"])
    ref = [_as_py(v.min()), _as_py(v.max()), v.astype(np.float64).mean(), nz.mean(), v.astype(np.float64).std(ddof=1), nz.std(ddof=1), len(nz), len(nz)]
    np.testing.assert_allclose(out[:-1], ref, rtol=1e-12)
    assert out[-1] == _as_py(fsl_percentile(v, 50))
    with pytest.raises(ValueError, match="did you mean -r"):
        vn.fsl.fslstats(x, ["-rr"])
    with pytest.raises(ValueError, match="0, 100"):
        vn.fsl.fslstats(x, ["-p", "150"])


def test_cli_fsl_letters(tmp_path, capsys):
    rng = np.random.default_rng(3)
    vol = np.zeros((20, 24, 16), np.float32)
    vol[4:16, 5:19, 3:13] = rng.normal(500, 80, (12, 14, 10))
    vol[0, 0, 0] = 1e5  # a hot voxel: the long tail
    mask = (vol > 0).astype(np.uint8)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(mask, aff), tmp_path / "brain.nii.gz")
    assert main(["stats", str(tmp_path / "t1.nii.gz"), "--fsl", "-r", "-p", "50", "-k", str(tmp_path / "brain.nii.gz"), "-r", "-V"]) == 0
    got = [float(t) for t in capsys.readouterr().out.split()]
    flat = vol.transpose(2, 1, 0).ravel()  # volnorm's C order of the NIfTI axes; FSL's statistics do not depend on it
    inside = flat[mask.transpose(2, 1, 0).ravel() > 0]
    (lo, hi), _ = fsl_find_thresholds(flat)
    (mlo, mhi), _ = fsl_find_thresholds(inside)
    ref = [lo, hi, fsl_percentile(flat, 50), mlo, mhi, len(inside), len(inside) * 8.0]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert main(["stats", str(tmp_path / "t1.nii.gz"), "--json", "--fsl", "-R"]) == 0
    assert json.loads(capsys.readouterr().out) == {"all": [0.0, 1e5]}
    assert main(["stats", str(tmp_path / "t1.nii.gz"), "--fsl", "-q"]) == 1
    assert "unknown fslstats option '-q'" in capsys.readouterr().err
