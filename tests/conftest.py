from __future__ import annotations

from pathlib import Path

import pytest
from nibabel.testing import data_path

#: every NIfTI file in nibabel's test data that volnorm reads (3-D and 4-D, NIfTI-1/2,
#: big-endian, scaled, gzip, with extensions)
NIBABEL_FILES = [
    "anatomical.nii",
    "example4d.nii.gz",
    "example_nifti2.nii.gz",
    "functional.nii",
    "reoriented_anat_moved.nii",
    "resampled_anat_moved.nii",
    "standard.nii.gz",
]


@pytest.fixture(params=NIBABEL_FILES)
def nib_file(request) -> Path:
    return Path(data_path) / request.param


@pytest.fixture
def nib_paths() -> list[Path]:
    return [Path(data_path) / f for f in NIBABEL_FILES]


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> list[Path]:
    """Six small phantom subjects, .nii and .nii.gz mixed, same shape."""
    import volnorm as vn

    d = tmp_path_factory.mktemp("cohort")
    return vn.datasets.make_cohort(d, n_subjects=6, shape=(40, 48, 36), compressed="mixed", seed=1)


@pytest.fixture(scope="session")
def cluster_client():
    """A real process-based distributed cluster (2 workers), as on a laptop."""
    pytest.importorskip("distributed")
    from volnorm.engine import local_cluster

    client = local_cluster(2)
    yield client
    cluster = client.cluster
    client.close()
    cluster.close()


@pytest.fixture(autouse=True)
def _no_stray_default_client():
    yield
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return
    raise AssertionError("a test left a default distributed client behind")


def pytest_terminal_summary(terminalreporter):
    """The SLURM jobs the tests submitted: their ids, as SLURM numbered them."""
    from _clusters import SLURM_JOBS

    if SLURM_JOBS:
        terminalreporter.section("SLURM jobs submitted by the tests")
        for job, what in SLURM_JOBS:
            terminalreporter.write_line(f"job {job}: {what}")
