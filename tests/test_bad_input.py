"""Bad input: a clear error naming the file and the problem, and nothing damaged."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import volnorm as vn
from volnorm.io.store import IncompleteStoreError


@pytest.fixture
def good(tmp_path) -> Path:
    src = vn.datasets.nibabel_files()["anatomical.nii"]
    p = tmp_path / "good.nii"
    shutil.copy(src, p)
    return p


def _write_with_header(tmp_path, name, edit, data=None):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) if data is None else data
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["vox_offset"] = 352
    edit(img.header)
    p = tmp_path / name
    raw = img.header.binaryblock + b"\0" * 4 + np.asfortranarray(data).tobytes(order="F")
    p.write_bytes(raw)
    return p


def _gz(path: Path, payload: bytes) -> Path:
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(payload)
    return path


def _assert_refused(inputs, match, tmp_path, exc=(ValueError, OSError)):
    out = tmp_path / "out.zarr"
    with pytest.raises(exc, match=match) as info:
        vn.convert(inputs, out, scheduler="sync")
    assert not out.exists()
    return info


def test_missing_file(tmp_path):
    _assert_refused([tmp_path / "nope.nii"], r"nope\.nii: no such file", tmp_path, FileNotFoundError)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.nii"
    p.touch()
    _assert_refused([p], r"empty\.nii: the file is empty \(0 bytes\)", tmp_path)


def test_not_nifti(tmp_path):
    p = tmp_path / "notes.nii"
    p.write_text("this is a text file, not an image\n" * 20)
    _assert_refused([p], r"notes\.nii: not a NIfTI file", tmp_path)


def test_gz_name_but_not_gzip(good, tmp_path):
    p = tmp_path / "plain.nii.gz"
    shutil.copy(good, p)
    _assert_refused([p], r"plain\.nii\.gz: has a \.gz name but is not gzip", tmp_path)


def test_truncated_nii(good, tmp_path):
    p = tmp_path / "trunc.nii"
    p.write_bytes(good.read_bytes()[:-1000])
    # nibabel alone loads this silently
    nib.load(p)
    _assert_refused([p], r"trunc\.nii: truncated: the header needs 68002 bytes .* the file has 67002", tmp_path)


def test_truncated_gz(good, tmp_path):
    full = _gz(tmp_path / "full.nii.gz", good.read_bytes())
    p = tmp_path / "trunc.nii.gz"
    p.write_bytes(full.read_bytes()[:-300])
    _assert_refused([p], r"trunc\.nii\.gz: .*truncated or corrupt", tmp_path)


def test_flipped_byte_in_gz_is_caught_by_the_crc(good, tmp_path, cohort):
    full = _gz(tmp_path / "full.nii.gz", good.read_bytes())
    raw = bytearray(full.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    p = tmp_path / "flipped.nii.gz"
    p.write_bytes(bytes(raw))
    out = tmp_path / "out.zarr"
    with pytest.raises(vn.NiftiError, match=r"flipped\.nii\.gz: (corrupt|.*CRC)") as e:
        vn.convert([*cohort[:2], p], out, scheduler="sync")
    assert "was not created" in str(e.value)
    assert not out.exists()
    # the good volumes are kept for the resume; the bad one can be replaced and the run finished
    shutil.copy(full, p)
    vn.convert([*cohort[:2], p], out, scheduler="sync")
    np.testing.assert_array_equal(vn.open_zarr(out)["flipped"]["image"].values, nib.load(good).get_fdata().T)


def test_absurd_dims(tmp_path):
    def edit(h):
        h["dim"][1] = -4

    _assert_refused([_write_with_header(tmp_path, "dims.nii", edit)], r"dims\.nii: absurd dimensions", tmp_path)

    def edit0(h):
        h["dim"][0] = 9

    _assert_refused([_write_with_header(tmp_path, "ndim.nii", edit0)], r"ndim\.nii: absurd number of dimensions", tmp_path)


def test_huge_dims_fail_on_size(tmp_path):
    def edit(h):
        h["dim"][1:4] = [30000, 30000, 30000]

    _assert_refused([_write_with_header(tmp_path, "huge.nii", edit)], r"huge\.nii: truncated: the header needs", tmp_path)


def test_zero_affine(tmp_path):
    def edit(h):
        h["sform_code"] = 1
        h["srow_x"][:] = 0
        h["srow_y"][:] = 0
        h["srow_z"][:] = 0

    _assert_refused([_write_with_header(tmp_path, "zero.nii", edit)], r"zero\.nii: invalid affine", tmp_path)


def test_nan_voxel_size(tmp_path):
    def edit(h):
        h["qform_code"] = 0
        h["sform_code"] = 0
        h["pixdim"][2] = np.nan

    _assert_refused([_write_with_header(tmp_path, "nanvox.nii", edit)], r"nanvox\.nii: invalid voxel sizes", tmp_path)


def test_unsupported_dtype(tmp_path):
    p = tmp_path / "cplx.nii"
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.complex64), np.eye(4)), p)
    _assert_refused([p], r"cplx\.nii: unsupported datatype complex64", tmp_path)


def test_glob_matching_nothing(tmp_path):
    _assert_refused([str(tmp_path / "*.nii.gz")], r"the pattern matches no file", tmp_path, FileNotFoundError)


def test_same_file_twice(good, tmp_path):
    _assert_refused([good, str(good)], r"good\.nii: the same file is given twice", tmp_path)


def test_all_bad_files_listed_at_once(good, tmp_path):
    a = tmp_path / "a.nii"
    a.touch()
    b = tmp_path / "b.nii"
    b.write_text("x" * 400)
    e = _assert_refused([good, a, b], "2 of 3 inputs are invalid; nothing was written", tmp_path)
    assert "a.nii: the file is empty" in str(e.value) and "b.nii: not a NIfTI" in str(e.value)


def test_existing_complete_store_needs_overwrite(cohort, tmp_path):
    out = tmp_path / "c.zarr"
    vn.convert(cohort[:2], out, scheduler="sync")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match="a complete volnorm store already exists; pass overwrite=True"):
        vn.convert(cohort[2:4], out, scheduler="sync")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    vn.convert(cohort[2:4], out, scheduler="sync", overwrite=True)
    assert list(vn.open_zarr(out)["volume"].values) == [p.name.split(".")[0] for p in cohort[2:4]]


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_directory_is_never_deleted(cohort, tmp_path, overwrite):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="volnorm did not create; volnorm never deletes it"):
        vn.convert(cohort[:1], out, scheduler="sync", overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "years of work"
    with pytest.raises(FileExistsError, match="never deletes"):
        vn.to_zarr(vn.open_nifti(cohort[:1]), out, overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_output_is_an_input(good, tmp_path):
    with pytest.raises(ValueError, match="would overwrite or contain the input"):
        vn.convert([good], good, scheduler="sync", overwrite=True)
    assert nib.load(good).shape == (33, 41, 25)


def test_nan_inf_voxels_are_converted_and_reported(tmp_path, capsys):
    data = np.ones((6, 7, 8), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    data[2, 2, 2] = -np.inf
    p = tmp_path / "nans.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)
    out = tmp_path / "n.zarr"
    res = vn.convert([p], out, scheduler="sync")
    stats = res.volumes[0]["stats"]
    assert (stats["nan"], stats["posinf"], stats["neginf"]) == (1, 1, 1)
    assert (stats["min"], stats["max"]) == (1.0, 1.0)
    np.testing.assert_array_equal(vn.open_zarr(out).values[0], data.T)
    from volnorm.cli import main

    assert main(["info", str(out)]) == 0
    assert "NON-FINITE: nan 1, posinf 1, neginf 1" in capsys.readouterr().out
    assert main(["info", str(p)]) == 0
    assert "NON-FINITE: nan 1, posinf 1, neginf 1" in capsys.readouterr().out


def test_incomplete_store_is_refused(cohort, tmp_path):
    out = tmp_path / "c.zarr"
    vn.convert(cohort[:2], out, scheduler="sync")
    import zarr

    root = zarr.open_group(out, mode="r+")
    m = dict(root.attrs["volnorm"])
    m["complete"] = False
    root.attrs["volnorm"] = m
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        vn.open_zarr(out)
    assert vn.open_zarr(out, allow_incomplete=True).sizes["volume"] == 2


def test_file_changed_between_validation_and_read(good, tmp_path):
    from volnorm.io.nifti import NiftiError, read_info
    from volnorm.io.niftizarr import ingest_nifti

    info = read_info(good)
    with open(good, "ab") as f:
        f.write(b"\0")
    staging = vn.io.store.Staging(tmp_path / "x.zarr", {"p": 1}).prepare()
    with pytest.raises(NiftiError, match="changed on disk"):
        ingest_nifti(info, str(staging.path), "good", (25, 41, 33), "lz4")


def test_multi_member_gzip_is_valid(good, tmp_path):
    """bgzip-style files hold several gzip members; the trailer only knows the last one."""
    raw = good.read_bytes()
    p = tmp_path / "multi.nii.gz"
    with open(p, "wb") as f:
        for part in (raw[:20000], raw[20000:50000], raw[50000:]):
            f.write(gzip.compress(part, mtime=0))
    out = tmp_path / "m.zarr"
    vn.convert([p], out, scheduler="sync")
    np.testing.assert_array_equal(vn.open_zarr(out).values[0], nib.load(good).get_fdata().T)
    np.testing.assert_array_equal(vn.open_nifti(p).values[0], nib.load(good).get_fdata().T)
    # truncating it inside the last member is still caught before anything is written
    cut = tmp_path / "multicut.nii.gz"
    cut.write_bytes(p.read_bytes()[:-5000])
    _assert_refused([cut], r"multicut\.nii\.gz: .*truncated or corrupt", tmp_path)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(cohort, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    out = tmp_path / "c.zarr"
    lock = tmp_path / ".c.zarr.volnorm-lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "started": "now"}))
        with pytest.raises(FileExistsError, match=f"another volnorm run \\(pid {sleeper.pid}"):
            vn.convert(cohort[:1], out, scheduler="sync")
        assert lock.exists() and not out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone (killed): its lock is stale and taken over
    vn.convert(cohort[:1], out, scheduler="sync")
    assert not lock.exists()
    assert vn.open_zarr(out).sizes["volume"] == 1
