"""Opening and building graphs reads no voxel data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import volnorm as vn
from volnorm.io.nifti import NiftiArray
from volnorm.testing import raise_if_dask_computes


@pytest.fixture
def no_voxel_reads(monkeypatch):
    def boom(self, key):
        raise AssertionError(f"voxel data of {self.path} was read")

    monkeypatch.setattr(NiftiArray, "_read_raw", boom)


def test_open_nifti_reads_no_voxels(nib_paths, cohort, no_voxel_reads):
    with raise_if_dask_computes():
        stack = vn.open_nifti(cohort)
        tree = vn.open_nifti(nib_paths)
        graph = (stack.astype("float32") * 2).mean("volume")
        _ = tree["functional"]["image"][:, 0] + 1
    assert graph.chunks is not None
    with pytest.raises(AssertionError, match="voxel data"):
        graph.compute(scheduler="sync")


def test_open_zarr_reads_only_metadata(cohort, tmp_path):
    store = tmp_path / "c.zarr"
    vn.convert(cohort, store, scheduler="sync")
    # remove every data chunk: opening and building graphs must still work
    for chunkdir in store.glob("*/0/c"):
        shutil.rmtree(chunkdir)
    with raise_if_dask_computes():
        stack = vn.open_zarr(store)
        graph = (stack - 1).sum(("z", "y", "x"))
    assert graph.sizes["volume"] == len(cohort)


def test_counting_scheduler_catches_computes():
    import dask.array as da

    x = da.ones(4, chunks=2)
    with pytest.raises(RuntimeError, match="compute"):
        with raise_if_dask_computes():
            x.sum().compute()


def test_graph_names_are_deterministic_across_processes(cohort, tmp_path):
    """A re-run in a new process must build the same graph (resume depends on it)."""
    import subprocess
    import sys

    import volnorm as vn

    np.save(tmp_path / "s.npy", np.zeros((3, 4, 5), np.uint8))
    code = (
        "import volnorm as vn, sys; "
        f"print(vn.open_nifti({[str(c) for c in cohort]!r}).data.name); "
        f"print(vn.open_images({str(tmp_path / 's.npy')!r}).data.name)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1]
    assert runs[0].split()[0] == vn.open_nifti(cohort).data.name
