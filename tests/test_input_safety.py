"""Inputs that must fail clearly: an error naming the file and the problem, and nothing touched.

Every bad input runs through both ``vn.convert`` and the CLI (in process), and
the whole directory tree (names, sizes, SHA-256) is compared before and after:
every byte the run did not create is unchanged, no partial output is visible
(only volnorm's hidden staging directory may be left, for the resume), and an
existing store given with ``--overwrite`` is kept byte for byte.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import volnorm as vn
from volnorm.cli import main
from volnorm.io.nifti import expand_paths
from volnorm.testing import snapshot

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def assert_untouched(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """Nothing that existed changed; anything new is hidden (volnorm's staging), no lock left."""
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert not changed, f"changed or removed by the run: {changed}"
    new = sorted(set(after) - set(before))
    visible = [k for k in new if not any(part.startswith(".") for part in Path(k).parts)]
    assert not visible, f"partial output left visible: {visible}"
    assert not [k for k in new if k.endswith((".volnorm-lock", ".volnorm-old"))], new


def refuse_both(
    inputs: list, out: Path, match: str, root: Path, capsys, *, exc=(OSError, ValueError), overwrite: bool = False
) -> str:
    """``vn.convert`` and ``volnorm convert`` both fail with ``match`` and touch nothing under ``root``."""
    before = snapshot(root)
    with pytest.raises(exc, match=match) as e:
        vn.convert(inputs, out, scheduler="sync", overwrite=overwrite)
    assert_untouched(before, snapshot(root))
    capsys.readouterr()
    argv = ["convert", *map(str, inputs), str(out), "--scheduler", "sync"] + (["--overwrite"] if overwrite else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    # where it ran (once the engine started), then the one error; no traceback
    assert re.match(r"(volnorm convert: running on [^\n]*\n)?volnorm convert: error: ", err), err
    assert "Traceback" not in err
    assert re.search(match, err), err
    assert_untouched(before, snapshot(root))
    return str(e.value)


def small_volume(shape: tuple[int, ...] = (12, 10, 8), seed: int = 0) -> nib.Nifti1Image:
    data = np.random.default_rng(seed).integers(-500, 3000, size=shape).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
    img.header["vox_offset"] = 352
    return img


def nifti_bytes(img: nib.Nifti1Image) -> bytes:
    return img.header.binaryblock + b"\0" * 4 + np.asanyarray(img.dataobj).tobytes(order="F")


def gzip_member(parts: list[tuple[bytes, int]]) -> bytes:
    """One gzip member whose data are each ``bytes`` repeated ``n`` times, CRC and ISIZE correct.

    Each part is deflated once, ending with a full flush (byte-aligned, no
    reference back into earlier data), so its compressed form can be repeated:
    4 GiB of zeros cost 64 copies of the ~65 KB deflate of 64 MiB, not 4 GiB of work.
    """
    out = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"]
    crc = size = 0
    for data, n in parts:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        out.append((c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)) * n)
        for _ in range(n):
            crc = zlib.crc32(data, crc)
        size += len(data) * n
    out.append(zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # an empty final block
    out.append(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
    return b"".join(out)


@pytest.fixture
def good(tmp_path) -> Path:
    """A copy of nibabel's anatomical.nii inside the tree the tests snapshot."""
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    p = d / "anatomical.nii"
    shutil.copy(vn.datasets.nibabel_files()["anatomical.nii"], p)
    return p


@pytest.fixture
def existing_store(tmp_path, good) -> Path:
    """A complete volnorm store at the output path (for the ``overwrite=True`` runs)."""
    out = tmp_path / "out.zarr"
    vn.convert([good], out, scheduler="sync")
    return out


BOMB_EXTRA = 2**32  # gzip's ISIZE counts modulo 2**32: 4 GiB more leaves the trailer unchanged
ZERO_BLOCK = 64 * 2**20


@pytest.fixture(scope="session")
def bomb_payload() -> tuple[bytes, bytes]:
    """(the NIfTI bytes a 64^3 int16 header needs, a .nii.gz of them followed by 4 GiB of zeros)."""
    data = (np.arange(64**3) % 1000).astype(np.int16).reshape(64, 64, 64)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header["vox_offset"] = 352
    payload = nifti_bytes(img)
    bomb = gzip_member([(payload, 1), (bytes(ZERO_BLOCK), BOMB_EXTRA // ZERO_BLOCK)])
    return payload, bomb


# ---------------------------------------------------------------------------
# 1. gzip bombs, trailing data and other gzip damage
# ---------------------------------------------------------------------------


def test_bomb_helper_makes_a_valid_gzip_whose_trailer_matches(bomb_payload):
    payload, bomb = bomb_payload
    assert len(bomb) < 8 * 2**20  # a few MB on disk, 4 GiB inflated
    isize = struct.unpack("<I", bomb[-4:])[0]
    assert isize == len(payload) == (len(payload) + BOMB_EXTRA) % 2**32
    # the start decompresses to the NIfTI bytes: the bomb is a well-formed .nii.gz
    d = zlib.decompressobj(wbits=31)
    assert d.decompress(bomb, len(payload)) == payload
    small = gzip_member([(payload, 1), (bytes(1000), 3)])
    assert gzip.decompress(small) == payload + bytes(3000)  # CRC and ISIZE checked by gzip


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "overwrite"])
def test_gzip_bomb_with_matching_trailer_is_refused_fast(
    tmp_path, good, bomb_payload, capsys, existing, request
):
    payload, bomb = bomb_payload
    if existing:
        request.getfixturevalue("existing_store")
    p = tmp_path / "in" / "bomb.nii.gz"
    p.write_bytes(bomb)
    # header, size and trailer all look right: only the streaming read can tell
    info = vn.io.nifti.read_info(p)
    assert info.needed_bytes == len(payload)
    t0 = time.perf_counter()
    msg = refuse_both(
        [good, p], tmp_path / "out.zarr",
        r"bomb\.nii\.gz: the gzip data go on past the 524640 bytes the header needs", tmp_path, capsys,
        overwrite=existing,
    )
    seconds = time.perf_counter() - t0
    stopped = int(re.search(r"stopped after decompressing (\d+) bytes", msg).group(1))
    assert len(payload) < stopped <= len(payload) + 16 * 2**20  # not 4 GiB
    assert seconds < 20, seconds  # two runs; decompressing 2 x 4 GiB would take far longer
    if existing:
        assert "the existing store" in msg and "was kept unchanged" in msg
    else:
        assert "was not created" in msg


def test_gzip_bomb_with_other_trailer_stops_at_the_needed_size(tmp_path, capsys):
    """2 GiB past the data: the trailer disagrees, and the size check stops early too."""
    img = small_volume()
    payload = nifti_bytes(img)
    p = tmp_path / "bomb2.nii.gz"
    p.write_bytes(gzip_member([(payload, 1), (bytes(ZERO_BLOCK), 32)]))
    msg = refuse_both(
        [p], tmp_path / "out.zarr",
        rf"bomb2\.nii\.gz: the gzip data hold more than the {len(payload)} uncompressed bytes the header needs",
        tmp_path, capsys,
    )
    stopped = int(re.search(r"stopped after (\d+)\)", msg).group(1))
    assert stopped <= len(payload) + 16 * 2**20


def test_gzip_stream_may_end_exactly_at_the_needed_size(tmp_path):
    """The limit is exact: a .nii.gz holding header + extensions + data, no more, converts."""
    img = small_volume()
    img.header["vox_offset"] = 0  # nibabel places the data after the extension
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"an extension before vox_offset\0\0"))
    p = tmp_path / "ext.nii.gz"
    nib.save(img, p)
    info = vn.io.nifti.read_info(p)
    assert info.offset > 352 and len(gzip.decompress(p.read_bytes())) == info.needed_bytes
    vn.convert([p], tmp_path / "o.zarr", scheduler="sync")
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "o.zarr").values[0], np.asanyarray(img.dataobj).T)


def test_inflater_limit_is_exact():
    import io

    from volnorm.io.gzipstream import GzipTooLongError
    from volnorm.io.gzipstream import Inflater as _Inflater

    raw = gzip.compress(bytes(1000))
    buf = bytearray(4096)
    assert _Inflater(io.BytesIO(raw), limit=1000).readinto(buf) == 1000
    with pytest.raises(GzipTooLongError, match="more than 999 bytes"):
        _Inflater(io.BytesIO(raw), limit=999).readinto(buf)


@pytest.mark.parametrize(
    "tail, where",
    [
        (b"this is not gzip data at all", "trailer"),  # the last 4 bytes are no valid ISIZE
        (b"\0" * 512, "trailer"),  # zero padding: refused too (documented in volnorm.io.nifti)
        (b"GARBAGE!", "stream"),  # garbage ending in the right ISIZE: only the stream can tell
    ],
    ids=["text", "zero-padding", "garbage-with-matching-isize"],
)
def test_trailing_garbage_after_the_gzip_member_is_refused(tmp_path, good, capsys, tail, where):
    img = small_volume()
    payload = nifti_bytes(img)
    if where == "stream":
        tail = tail + struct.pack("<I", len(payload))
    p = tmp_path / "in" / "tail.nii.gz"
    p.write_bytes(gzip.compress(payload, mtime=0) + tail)
    msg = refuse_both(
        [good, p], tmp_path / "out.zarr",
        rf"tail\.nii\.gz: {len(tail)} bytes of trailing data after the end of the gzip data",
        tmp_path, capsys,
    )
    assert "not a gzip member" in msg


def test_multi_member_gzip_is_still_accepted(tmp_path):
    """Several members in a row are one gzip stream (bgzip): accepted, also past the trailer check."""
    img = small_volume()
    payload = nifti_bytes(img)
    p = tmp_path / "multi.nii.gz"
    p.write_bytes(gzip.compress(payload[:500], mtime=0) + gzip.compress(payload[500:], mtime=0))
    vn.convert([p], tmp_path / "o.zarr", scheduler="sync")
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "o.zarr").values[0], np.asanyarray(img.dataobj).T)


def test_truncated_gz(tmp_path, good, capsys):
    p = tmp_path / "in" / "cut.nii.gz"
    p.write_bytes(gzip.compress(nifti_bytes(small_volume()), mtime=0)[:-200])
    refuse_both([good, p], tmp_path / "out.zarr", r"cut\.nii\.gz: .*truncated or corrupt", tmp_path, capsys)


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "overwrite"])
def test_corrupt_crc_is_caught_while_streaming(tmp_path, good, capsys, existing, request):
    if existing:
        request.getfixturevalue("existing_store")
    raw = bytearray(gzip.compress(nifti_bytes(small_volume()), mtime=0))
    raw[-8] ^= 0xFF  # the CRC itself: header, size and trailer's ISIZE all fine
    p = tmp_path / "in" / "crc.nii.gz"
    p.write_bytes(bytes(raw))
    vn.io.nifti.read_info(p)  # passes validation: only the read pass checks the CRC
    msg = refuse_both(
        [good, p], tmp_path / "out.zarr", r"crc\.nii\.gz: corrupt compressed data", tmp_path, capsys,
        overwrite=existing,
    )
    assert ("kept unchanged" in msg) if existing else ("was not created" in msg)


def test_non_nifti_file(tmp_path, good, capsys):
    p = tmp_path / "in" / "photo.nii"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(600))
    refuse_both([good, p], tmp_path / "out.zarr", r"photo\.nii: not a NIfTI file", tmp_path, capsys)


# ---------------------------------------------------------------------------
# 2. relative paths on workers started elsewhere
# ---------------------------------------------------------------------------


def test_expand_paths_returns_absolute_paths(tmp_path, good, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "link.nii").symlink_to("../in/anatomical.nii")
    nib.save(small_volume(), tmp_path / "in" / "b.nii.gz")
    for given in (["in"], ["in/*.nii*"], ["in/b.nii.gz"], [Path("in") / "b.nii.gz"]):
        files = expand_paths(given)
        assert files and all(p.is_absolute() for p in files), (given, files)
        assert all(p.parent == tmp_path / "in" for p in files)
    # symlink names are kept as given (not resolved to their targets)
    assert expand_paths("links/link.nii") == [tmp_path / "links" / "link.nii"]


def test_relative_paths_work_on_a_worker_in_another_folder(tmp_path, good, monkeypatch, capsys):
    import volnorm.conversion as conversion

    nib.save(small_volume(seed=1), tmp_path / "in" / "b.nii.gz")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    real = conversion._ingest
    seen: list[str] = []

    def ingest_elsewhere(info, store_path, *args):
        """A worker started in another folder: relative paths would name other files."""
        here = os.getcwd()
        os.chdir(elsewhere)
        try:
            seen.append(str(info.path))
            return real(info, store_path, *args)
        finally:
            os.chdir(here)

    monkeypatch.setattr(conversion, "_ingest", ingest_elsewhere)
    monkeypatch.chdir(tmp_path)
    vn.convert(["in/anatomical.nii", "in/b.nii.gz"], "api.zarr", scheduler="sync")
    assert main(["-q", "convert", "in", "cli.zarr", "--scheduler", "sync"]) == 0, capsys.readouterr().err
    assert seen and all(Path(s).is_absolute() for s in seen)
    for out in ("api.zarr", "cli.zarr"):
        tree = vn.open_zarr(tmp_path / out)
        np.testing.assert_array_equal(tree["anatomical"]["image"].values, nib.load(good).get_fdata().T)
    assert not list(elsewhere.iterdir())


# ---------------------------------------------------------------------------
# 3. dangling symlinks and missing explicit paths
# ---------------------------------------------------------------------------


def test_dangling_symlink_in_a_folder_is_an_error(tmp_path, good, capsys):
    (tmp_path / "in" / "ghost.nii.gz").symlink_to(tmp_path / "gone" / "ghost.nii.gz")
    # before: the folder converted without ghost, silently
    refuse_both(
        [tmp_path / "in"], tmp_path / "out.zarr",
        r"ghost\.nii\.gz: is a symlink to .*gone/ghost\.nii\.gz, which does not exist", tmp_path, capsys,
        exc=FileNotFoundError,
    )


def test_dangling_symlink_given_or_globbed_is_an_error(tmp_path, good, capsys):
    ghost = tmp_path / "in" / "ghost.nii"
    ghost.symlink_to("nowhere.nii")
    match = r"ghost\.nii: is a symlink to nowhere\.nii, which does not exist"
    refuse_both([good, ghost], tmp_path / "out.zarr", match, tmp_path, capsys, exc=FileNotFoundError)
    refuse_both([str(tmp_path / "in" / "*.nii")], tmp_path / "out.zarr", match, tmp_path, capsys, exc=FileNotFoundError)


def test_dangling_symlinks_with_other_suffixes_are_not_inputs(tmp_path, good):
    (tmp_path / "in" / "notes.txt").symlink_to("deleted.txt")
    assert expand_paths(tmp_path / "in") == [good]


def test_missing_explicit_paths_are_all_named(tmp_path, good, capsys):
    msg = refuse_both(
        [good, tmp_path / "a.nii", tmp_path / "b.nii.gz"], tmp_path / "out.zarr",
        r"2 inputs are missing", tmp_path, capsys, exc=FileNotFoundError,
    )
    assert f"{tmp_path / 'a.nii'}: no such file" in msg and f"{tmp_path / 'b.nii.gz'}: no such file" in msg


# ---------------------------------------------------------------------------
# 4. disk full while writing
# ---------------------------------------------------------------------------


def _fail_writes(monkeypatch, when: Callable[[Path, bytes], bool], code: int = errno.ENOSPC) -> list[Path]:
    """Make zarr's local writes raise ``OSError(code)`` (as ``write()`` does: no file name) when ``when``."""
    import zarr.storage._local as local

    real = local._put
    hits: list[Path] = []

    def put(path: Path, value, exclusive: bool = False) -> int:
        if when(Path(path), value.to_bytes()):
            hits.append(Path(path))
            raise OSError(code, os.strerror(code))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    return hits


def _is_chunk(path: Path, data: bytes) -> bool:
    return "c" in path.parts and path.parent.parent.name != "nifti"


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "overwrite"])
def test_disk_full_while_writing_chunks(tmp_path, good, capsys, monkeypatch, existing, request):
    if existing:
        request.getfixturevalue("existing_store")
    b = tmp_path / "in" / "b.nii.gz"
    nib.save(small_volume(), b)
    hits = _fail_writes(monkeypatch, _is_chunk)
    staging = re.escape(str(tmp_path / ".out.zarr.volnorm-partial"))
    msg = refuse_both(
        [good, b], tmp_path / "out.zarr",
        rf"{staging}: cannot write the new store: no space left on device \(converting .*(anatomical\.nii|b\.nii\.gz)",
        tmp_path, capsys, exc=OSError, overwrite=existing,
    )
    assert hits
    if existing:
        assert f"the existing store {tmp_path / 'out.zarr'} was kept unchanged" in msg
        assert "was not created" not in msg
        assert vn.open_zarr(tmp_path / "out.zarr").shape == (1, 25, 41, 33)
    else:
        assert f"the output {tmp_path / 'out.zarr'} was not created" in msg
    assert "free space and re-run to resume" in msg
    # space back: the same command finishes the job
    monkeypatch.undo()
    vn.convert([good, b], tmp_path / "out.zarr", scheduler="sync", overwrite=existing)
    assert sorted(vn.open_zarr(tmp_path / "out.zarr").children) == ["anatomical", "b"]


def test_disk_full_while_committing_keeps_the_old_store(tmp_path, good, existing_store, capsys, monkeypatch):
    """The disk fills as the final manifest is written: the old store is still the one in place."""
    b = tmp_path / "in" / "b.nii.gz"
    nib.save(small_volume(), b)
    staging = tmp_path / ".out.zarr.volnorm-partial"

    def final_manifest(path: Path, data: bytes) -> bool:
        if path != staging / "zarr.json":
            return False
        return json.loads(data).get("attributes", {}).get("volnorm", {}).get("complete") is True

    hits = _fail_writes(monkeypatch, final_manifest, errno.EDQUOT)
    msg = refuse_both(
        [good, b], existing_store,
        rf"{re.escape(str(staging))}: cannot write the new store: disk quota exceeded",
        tmp_path, capsys, exc=OSError, overwrite=True,
    )
    assert hits and "was kept unchanged" in msg


def test_output_write_error_keeps_the_errno():
    """The errno survives, so callers can tell a full disk from bad input."""
    from volnorm.conversion import OutputWriteError

    e = OutputWriteError("x: cannot write", errno.ENOSPC)
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and str(e) == "x: cannot write"
