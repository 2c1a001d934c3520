"""Nyúl-Udupa standardization equals the peers' on the same real volumes: intensity-normalization
(a test dependency) and TorchIO (run when installed: it needs torch, which volnorm does not).

The volumes are nibabel's own ``functional.nii`` (20 time points of 17x21x3) and
``example4d.nii.gz`` (2 of 128x96x24), each time point one volume.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

import volnorm as vn

#: TorchIO's default landmarks (``HistogramStandardization``'s percentiles).
TIO_PERCENTILES = (1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99)


@pytest.fixture(scope="module", params=["functional.nii", "example4d.nii.gz"])
def cohort(request) -> xr.DataArray:
    return vn.open_nifti(vn.datasets.nibabel_files()[request.param]).chunk({"volume": 1})


def test_nyul_equals_intensity_normalization(cohort):
    inorm = pytest.importorskip("intensity_normalization")
    from intensity_normalization import NyulNormalizer
    from intensity_normalization.adapters.images import create_image

    vols = [np.asarray(v, dtype=np.float64) for v in cohort.values]
    # as nibabel images (read in float64, as from files: its numpy adapter would cast to float32)
    images = [create_image(nib.Nifti1Image(v, np.eye(4))) for v in vols]
    nn = NyulNormalizer()  # percentiles 1, 10..90, 99; range (1, 100); foreground = data > 0
    nn.fit_population(images)
    mask = cohort > 0
    p = vn.nyul_fit(cohort, mask=mask)
    np.testing.assert_allclose(p.values["standard"].values, nn.standard_scale, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(p.values["percentiles"].values, nn.percentiles)
    y = vn.nyul_apply(cohort, p, mask=mask).values
    for i, img in enumerate(images):  # every voxel, extrapolated linearly beyond the end landmarks as they do
        ref = np.asarray(nn.transform(img).get_data())
        np.testing.assert_allclose(y[i], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=f"{inorm.__name__} volume {i}")


def test_nyul_landmarks_equal_torchio(cohort, tmp_path):
    tio = pytest.importorskip("torchio")
    paths = []
    for i, v in enumerate(cohort.values):
        path = tmp_path / f"vol{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(v, dtype=np.float32), np.eye(4)), path)
        paths.append(path)
    ref = np.asarray(tio.HistogramStandardization.train(paths, progress=False))
    # TorchIO: its 13 landmarks, output range (0, 100), every voxel (its default mask is the whole image)
    p = vn.nyul_fit(cohort.astype(np.float32), percentiles=TIO_PERCENTILES, standard_range=(0.0, 100.0))
    np.testing.assert_allclose(p.values["standard"].values, ref, rtol=1e-9, atol=1e-9)
