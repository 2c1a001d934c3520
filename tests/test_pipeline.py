"""volnorm run: idempotent, refuses to mix results, never touches what it did not write."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import pytest

import volnorm as vn
from volnorm.pipeline.planner import WORKER_BASE_BYTES
from volnorm.cli import main


@pytest.fixture
def work(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    files = vn.datasets.make_cohort(data, n_subjects=4, shape=(40, 48, 36), seed=3)

    def spec(name: str, steps: str = "[{rescale: {percentiles: [1, 99]}}]", extra: str = "") -> Path:
        p = tmp_path / f"{name}.yaml"
        p.write_text(textwrap.dedent(f"""
            version: 1
            input: {{nifti: "data/sub-*.nii"}}
            steps: {steps}
            output: {{store: {name}.zarr}}
            engine: {{scheduler: threads, progress: false}}
        """) + textwrap.dedent(extra))
        return p

    return tmp_path, files, spec


def test_run_equals_the_python_api_and_records_its_spec(work):
    tmp, files, spec = work
    s = spec("out", extra="""
        outputs:
          statistics: {path: stats.json, quantiles: [0.5]}
          params: params.json
    """)
    res = vn.pipeline.run(s, echo=None)
    assert res.status == "done"
    got = vn.open_zarr(tmp / "out.zarr")
    want = vn.rescale(vn.open_nifti(files), percentiles=(1, 99))
    np.testing.assert_array_equal(got.values, want.values)
    m = json.loads((tmp / "out.zarr" / "zarr.json").read_text())["attributes"]["volnorm"]
    assert m["complete"] and m["pipeline"]["spec"]["steps"] == [{"name": "rescale", "options": {"percentiles": [1, 99]}}]
    assert [h["method"] for h in m["steps"]] == ["rescale"]
    for f in files:  # each volume names the file it came from (a path, not a printed array)
        vol = json.loads((tmp / "out.zarr" / Path(f).name.split(".")[0] / "zarr.json").read_text())["attributes"]["volnorm"]
        assert vol["source"] == {"path": str(f)}
    stats = json.loads((tmp / "stats.json").read_text())
    v = want.values
    assert [r["volume"] for r in stats["volumes"]] == ["sub-001", "sub-002", "sub-003", "sub-004"]
    np.testing.assert_allclose([r["mean"] for r in stats["volumes"]], v.reshape(4, -1).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose([r["max"] for r in stats["volumes"]], v.reshape(4, -1).max(axis=1))
    np.testing.assert_allclose([r["min"] for r in stats["volumes"]], v.reshape(4, -1).min(axis=1))
    np.testing.assert_allclose([r["std"] for r in stats["volumes"]], v.reshape(4, -1).std(axis=1), rtol=1e-5)
    assert [r["count"] for r in stats["volumes"]] == [v[0].size] * 4
    assert [r["q0.5"] for r in stats["volumes"]] == np.quantile(v.reshape(4, -1), 0.5, axis=1).tolist()  # exact
    params = json.loads((tmp / "params.json").read_text())
    assert params["steps"][0]["method"] == "rescale"
    # the saved parameters replay on new data through params_from: no refit, the same map
    s2 = spec("again", steps="[]", extra=f"params_from: {tmp / 'params.json'}\n")
    s2.write_text(s2.read_text().replace("steps: []\n", ""))
    assert vn.pipeline.run(s2, echo=None).status == "done"
    np.testing.assert_array_equal(vn.open_zarr(tmp / "again.zarr").values, got.values)


def test_a_finished_run_does_nothing_and_a_changed_one_is_refused(work, capsys):
    tmp, files, spec = work
    s = spec("out")
    assert main(["run", str(s)]) == 0
    before = (tmp / "out.zarr" / "zarr.json").read_bytes()
    assert main(["run", str(s)]) == 0
    assert "nothing to do: every output is up to date" in capsys.readouterr().out
    assert (tmp / "out.zarr" / "zarr.json").read_bytes() == before  # not rewritten
    # another spec onto the same output: refused, output untouched
    changed = spec("out", steps="[zscore]")
    assert main(["run", str(changed)]) == 1
    assert "another spec or from other inputs" in capsys.readouterr().err
    assert (tmp / "out.zarr" / "zarr.json").read_bytes() == before
    # changed input (a file rewritten): refused too
    s = spec("out")
    img = nib.load(files[0])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine, img.header), files[0])
    assert main(["run", str(s)]) == 1
    assert (tmp / "out.zarr" / "zarr.json").read_bytes() == before
    # --overwrite replaces it, after the new store is complete
    assert main(["-q", "run", str(s), "--overwrite"]) == 0
    np.testing.assert_array_equal(vn.open_zarr(tmp / "out.zarr").values, vn.rescale(vn.open_nifti(files), percentiles=(1, 99)).values)


def test_what_run_did_not_write_is_never_written_or_deleted(work, capsys):
    tmp, _, spec = work
    mine = tmp / "mine.zarr"  # a directory the user owns, not a volnorm store
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    s = spec("mine")
    for args in (["run", str(s)], ["run", str(s), "--overwrite"]):
        assert main(args) == 1
        assert "volnorm did not create" in capsys.readouterr().err
        assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    # a statistics file that exists and was not written by this spec
    (tmp / "stats.csv").write_text("mine\n")
    s = spec("other", extra="outputs: {statistics: {path: stats.csv}}\n")
    assert main(["run", str(s)]) == 1
    assert "stats.csv: exists and was not written by this spec" in capsys.readouterr().err
    assert (tmp / "stats.csv").read_text() == "mine\n"
    assert not (tmp / "other.zarr").exists()  # refused before anything was written


def test_dry_run_prints_the_plan_and_writes_nothing(work, capsys):
    tmp, _, spec = work
    s = spec("plan", extra="outputs: {voxel_histogram: {bins: 16, range: [0, 1]}}\n")
    assert main(["run", str(s), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 nifti input(s)" in out and "1. fit rescale" in out and "2. write" in out and "3. voxel histogram" in out
    assert "memory" in out
    assert not (tmp / "plan.zarr").exists() and not any(tmp.glob(".plan.zarr*"))


def test_a_stop_after_the_images_were_committed_says_they_are_kept(work, monkeypatch):
    tmp, files, spec = work
    s = spec("out", extra="""
        outputs:
          statistics: {path: stats.csv, quantiles: [0.5]}
    """)

    def stalled(*args, **kwargs):
        raise vn.pipeline.RunStalledError("no task finished for 600 s while 3 tasks waited; raise engine.memory_limit.")

    from volnorm.pipeline import runner

    monkeypatch.setattr(runner, "write_statistics", stalled)
    with pytest.raises(vn.pipeline.RunStalledError) as ei:
        vn.pipeline.run(s, echo=None)
    msg = str(ei.value)
    assert "Nothing incomplete was committed." in msg
    assert f"Committed before it stopped, and kept: {tmp / 'out.zarr'}." in msg
    assert not (tmp / "stats.csv").exists()
    monkeypatch.undo()
    lines: list[str] = []
    res = vn.pipeline.run(s, echo=lines.append)  # the re-run writes only the statistics
    assert res.status == "done" and res.written == [str(tmp / "stats.csv")]
    assert not any(line.startswith("  write:") for line in lines)


def test_an_output_in_a_missing_directory_is_refused_before_any_data_is_read(work, capsys):
    tmp, files, spec = work
    for extra, key in [
        ("", "output.store"),
        ("outputs:\n  statistics: {path: no/such/dir/stats.csv}\n", "outputs.statistics.path"),
        ("outputs:\n  params: nowhere/params.json\n", "outputs.params"),
    ]:
        s = spec("out", extra=extra)
        if key == "output.store":
            s.write_text(s.read_text().replace("out.zarr", "missing/out.zarr"))
        assert main(["run", str(s), "--dry-run"]) == 1
        err = capsys.readouterr().err
        assert key in err and "does not exist" in err
    assert sorted(p.name for p in tmp.iterdir()) == ["data", "out.yaml"]  # nothing created


def test_the_plan_estimates_memory_per_worker_and_warns_above_the_pause_threshold(work, capsys):
    tmp, files, spec = work
    s = spec("out", extra="engine: {scheduler: threads, progress: false, memory_limit: 400MiB}\n")
    s.write_text(s.read_text().replace("engine: {scheduler: threads, progress: false}\n", "", 1))
    p = vn.pipeline.plan(s)
    assert p["memory"] == WORKER_BASE_BYTES + 10 * p["chunk_bytes"]
    assert main(["run", str(s), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "MiB per worker" in out and "WARNING the estimate is above the pause threshold (320 MiB" in out
    s.write_text(s.read_text().replace("400MiB", "4GiB"))
    assert main(["run", str(s), "--dry-run"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_an_interrupted_image_stack_write_resumes_from_the_last_batch(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from volnorm.io import writers

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(12):
        iio.imwrite(tmp_path / "img" / f"im{i:02d}.png", rng.integers(0, 256, (32, 40), dtype=np.uint8))
    spec = {"version": 1, "input": {"images": str(tmp_path / "img" / "*.png"), "chunks": {"volume": 2}},
            "steps": ["equalize"], "output": {"store": str(tmp_path / "out.zarr")},
            "engine": {"scheduler": "threads", "progress": False}}
    clean = dict(spec, output={"store": str(tmp_path / "clean.zarr")})
    vn.pipeline.run(clean, echo=None)
    # batches of 4 volumes (two chunks); the third batch is interrupted
    monkeypatch.setattr(writers, "WRITE_BATCH_BYTES", 4 * 32 * 40 * 4)  # float32 output (equalize's default)
    real = writers.compute
    regions: list = []

    def compute(*targets, progress=False):
        regions.append(len(targets))
        if len(regions) == 3:
            raise KeyboardInterrupt
        return real(*targets, progress=progress)

    monkeypatch.setattr(writers, "compute", compute)
    with pytest.raises(KeyboardInterrupt):
        vn.pipeline.run(spec, echo=None)
    assert not (tmp_path / "out.zarr").exists()
    staged = vn.io.store.read_manifest(vn.io.store.staging_path(tmp_path / "out.zarr"))
    assert staged["written_volumes"] == 8 and not staged["complete"]
    regions.clear()
    monkeypatch.setattr(writers, "compute", lambda *t, progress=False: (regions.append(len(t)), real(*t, progress=progress))[1])
    assert vn.pipeline.run(spec, echo=None).status == "done"
    assert len(regions) == 1  # only the last 4 volumes again
    got, want = vn.open_zarr(tmp_path / "out.zarr"), vn.open_zarr(tmp_path / "clean.zarr")
    assert got.dtype == want.dtype and got.dims == want.dims
    np.testing.assert_array_equal(got.values, want.values)
    assert list(got["volume"].values) == list(want["volume"].values)


def test_write_batches_are_sized_by_the_time_they_take(tmp_path, monkeypatch):
    """A cohort's volumes are marked complete batch by batch; the first batch has 4 volumes,
    the next ones as many as took ~30 s so far: slow steps (N4) make small batches, and an
    interrupted run loses ~1 min of work, not a batch of 64 volumes."""
    from volnorm.io import writers

    sizer = writers._BatchSize(most=64, seconds=30, first=4)
    assert sizer.n == 4
    sizer.record(4, 40.0)  # 10 s per volume
    assert sizer.n == 3
    sizer.record(3, 0.03)  # fast volumes: up to the cap
    assert sizer.n == 64
    sizer.record(64, 1e4)
    assert sizer.n == 1
    items = [(f"v{i}", np.zeros(10, np.uint8)) for i in range(10)]
    sizer = writers._BatchSize(most=64, seconds=30, first=4)
    got = []
    for b in writers._batches(iter(items), limit=1 << 30, most=sizer):
        got.append(len(b))
        sizer.record(len(b), 20.0 * len(b))  # 20 s per volume: 1 per batch after the first
    assert got == [4, 1, 1, 1, 1, 1, 1]
    assert [len(b) for b in writers._batches(iter(items), limit=30, most=64)] == [3, 3, 3, 1]  # bytes first

    # a cohort run: batches of 4, then of what the timing allows; every volume complete, equal to one batch
    files = vn.datasets.make_cohort(tmp_path / "d", n_subjects=9, shape=(16, 18, 12), seed=3)
    seen: list[int] = []
    real = writers._with_statistics

    def spy(writes, *a, **k):
        seen.append(len(writes))
        return real(writes, *a, **k)

    monkeypatch.setattr(writers, "_with_statistics", spy)
    monkeypatch.setattr(writers._BatchSize.__init__, "__defaults__", (64, 1e-9, 4))  # every batch "slow": 1 volume each after the first
    vn.to_zarr(vn.open_nifti(files), tmp_path / "a.zarr")
    assert seen[:2] == [4, 4] and all(n == 1 for n in seen[2:]) and sum(seen) == 9
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "a.zarr").values, vn.open_nifti(files).values)


@pytest.mark.parametrize("kind", ["nifti", "images"])
def test_integer_output_statistics_are_computed_with_the_write(tmp_path, monkeypatch, kind):
    """8/16-bit outputs: the statistics come from the write's own graph (the store is not read
    back; summarize is never called) and equal numpy on the written voxels, inside a per-volume
    mask; they are kept with the volumes, so a lost statistics file is rewritten without a pass."""
    import imageio.v3 as iio

    if kind == "nifti":
        vn.datasets.make_cohort(tmp_path, n_subjects=3, shape=(24, 28, 20), seed=5)
        inp = {"nifti": str(tmp_path / "sub-*.nii")}
    else:
        rng = np.random.default_rng(1)
        (tmp_path / "img").mkdir()
        for i in range(5):
            iio.imwrite(tmp_path / "img" / f"im{i}.png", rng.integers(0, 256, (30, 20), dtype=np.uint8))
        inp = {"images": str(tmp_path / "img" / "*.png"), "chunks": {"volume": 2}}
    qs = [0.0, 0.1, 0.5, 0.97]
    spec = {"version": 1, "input": inp, "mask": {"threshold": {"method": "otsu", "dim": "volume"}},
            "steps": [{"rescale": {"percentiles": [2, 98], "out_range": "uint16"}}],
            "output": {"store": str(tmp_path / "out.zarr")},
            "outputs": {"statistics": {"path": str(tmp_path / "stats.json"), "quantiles": qs}},
            "engine": {"scheduler": "threads", "progress": False}}

    def no_pass(*a, **k):
        raise AssertionError("a statistics pass over the written store")

    monkeypatch.setattr(vn, "summarize", no_pass)
    assert vn.pipeline.run(spec, echo=None).status == "done"
    got = json.loads((tmp_path / "stats.json").read_text())["volumes"]
    out = vn.open_zarr(tmp_path / "out.zarr")
    assert out.dtype == np.uint16
    data = vn.open_nifti(inp["nifti"]) if kind == "nifti" else vn.open_images(inp["images"])
    spatial = tuple(d for d in data.dims if d != "volume")
    mask = (data > vn.threshold(data, method="otsu", dim=spatial)).values
    for i, row in enumerate(got):
        inside = out.values[i][mask[i]].astype(np.float64)
        assert row["volume"] == str(out["volume"].values[i])
        assert row["count"] == inside.size
        np.testing.assert_allclose([row["mean"], row["std"]], [inside.mean(), inside.std()], rtol=1e-12)
        assert [row["min"], row["max"]] == [inside.min(), inside.max()]
        assert [row[f"q{q:g}"] for q in qs] == np.quantile(inside, qs).tolist()
    # the file lost: rewritten from what the volumes keep, still without a pass
    (tmp_path / "stats.json").unlink()
    assert vn.pipeline.run(spec, echo=None).status == "done"
    assert json.loads((tmp_path / "stats.json").read_text())["volumes"] == got


@pytest.mark.parametrize("kind", ["nifti", "images"])
def test_statistics_with_the_write_are_one_task_chain_per_block(tmp_path, monkeypatch, kind):
    """The statistics taken with the write count the blocks the write task returns: read,
    transform, write and count fuse into one task per block (not a task for the data with two
    dependents, the write and the count). The values are checked against numpy above; here
    the graph's shape."""
    import imageio.v3 as iio

    from volnorm.io import writers

    if kind == "nifti":
        vn.datasets.make_cohort(tmp_path, n_subjects=4, shape=(24, 28, 20), seed=5)
        inp, n, blocks = {"nifti": str(tmp_path / "sub-*.nii")}, 4, 4
    else:
        rng = np.random.default_rng(1)
        (tmp_path / "img").mkdir()
        for i in range(6):
            iio.imwrite(tmp_path / "img" / f"im{i}.png", rng.integers(0, 256, (30, 20), dtype=np.uint8))
        inp, n, blocks = {"images": str(tmp_path / "img" / "*.png"), "chunks": {"volume": 2}}, 6, 3
    spec = {"version": 1, "input": inp, "steps": [{"rescale": {"out_range": "uint16"}}],
            "output": {"store": str(tmp_path / "out.zarr")},
            "outputs": {"statistics": {"path": str(tmp_path / "stats.json"), "quantiles": [0.5]}},
            "engine": {"scheduler": "threads", "progress": False}}
    real, tasks = writers.compute, []

    def compute(*targets, progress=False):
        graph = dask.base.collections_to_expr(targets, optimize_graph=True).__dask_graph__()
        _, dependents = dask.core.get_deps(dict(graph))
        # tasks whose output two tasks take (constants, such as the fitted range, aside)
        tasks.append(sorted(str(k) for k, d in dependents.items() if len(d) > 1 and type(graph[k]).__name__ != "DataNode"))
        return real(*targets, progress=progress)

    monkeypatch.setattr(writers, "compute", compute)
    assert vn.pipeline.run(spec, echo=None).status == "done"
    assert tasks == [[]]  # no task feeds two: each block's data go to the write, then the count
    got = json.loads((tmp_path / "stats.json").read_text())["volumes"]
    out = vn.open_zarr(tmp_path / "out.zarr").values.reshape(n, -1)
    assert [r["q0.5"] for r in got] == np.median(out, axis=1).tolist()
