"""A conversion killed with SIGKILL leaves nothing a reader accepts; re-running finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr
import zarr

import volnorm as vn
from volnorm.io.store import IncompleteStoreError, staging_path

pytestmark = pytest.mark.slow


def _complete_volumes(staged):
    if not (staged / "zarr.json").exists():
        return 0
    root = zarr.open_group(staged, mode="r")
    return sum(bool(g.attrs.get("volnorm", {}).get("complete")) for _, g in root.groups())


def test_sigkill_then_rerun(tmp_path):
    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=8, shape=(48, 56, 40), compressed="mixed", seed=7)
    out = tmp_path / "cohort.zarr"
    child = textwrap.dedent(
        f"""
        import sys, time
        import volnorm.io.niftizarr as nz
        finish = nz.finish_volume
        def slow_finish(*a, **k):
            time.sleep(0.4)          # widen the window between data written and volume marked
            return finish(*a, **k)
        nz.finish_volume = slow_finish
        import volnorm as vn
        vn.convert({[str(f) for f in files]!r}, {str(out)!r}, scheduler="sync", progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": os.getcwd()})
    staged = staging_path(out.absolute())
    deadline = time.time() + 120
    while _complete_volumes(staged) < 3:
        assert proc.poll() is None, "the conversion ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    with pytest.raises(IncompleteStoreError, match="re-run the same command"):
        vn.open_zarr(out)
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        vn.open_zarr(staged)

    res = vn.convert(files, out, scheduler="sync")
    assert res.resumed >= 3
    assert not staged.exists()
    ref = tmp_path / "ref.zarr"
    vn.convert(files, ref, scheduler="sync")
    a, b = vn.open_zarr(out), vn.open_zarr(ref)
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    ma, mb = vn.io.store.read_manifest(out), vn.io.store.read_manifest(ref)
    assert ma["inputs"] == mb["inputs"] and ma["stats"] == mb["stats"]
    for name in a["volume"].values:
        np.testing.assert_array_equal(np.asarray(zarr.open_array(out / name / "0")), np.asarray(zarr.open_array(ref / name / "0")))
