"""The same answers on a real process-based dask.distributed cluster."""

from __future__ import annotations

import platform
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm.engine import eager_roots

pytestmark = pytest.mark.slow


def test_convert_on_cluster_equals_sync(cohort, nib_paths, cluster_client, tmp_path):
    res = vn.convert([*cohort, *nib_paths], tmp_path / "d.zarr", scheduler=cluster_client)
    assert "client" in res.engine
    vn.convert([*cohort, *nib_paths], tmp_path / "s.zarr", scheduler="sync")
    d, s = vn.open_zarr(tmp_path / "d.zarr"), vn.open_zarr(tmp_path / "s.zarr")
    for name in d.children:
        xr.testing.assert_identical(d[name]["image"].drop_attrs(), s[name]["image"].drop_attrs())


def test_lazy_pipeline_on_cluster(cohort, cluster_client, tmp_path):
    stack = vn.open_nifti(cohort, chunks={"z": 7})
    expected = stack.astype("float64").mean(("z", "y", "x")).compute(scheduler="sync")
    got = cluster_client.compute(stack.astype("float64").mean(("z", "y", "x"))).result()
    xr.testing.assert_allclose(got, expected)
    with cluster_client.as_current():
        vn.to_zarr(stack, tmp_path / "w.zarr")
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "w.zarr").values, stack.values)


def test_embedded_cluster_binds_loopback():
    from volnorm.engine import local_cluster

    client = local_cluster(1)
    try:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        for w in client.scheduler_info()["workers"]:
            assert w.startswith("tcp://127.0.0.1:")
        env = client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(env.values()) == {None}
        arenas = client.run(lambda: __import__("os").environ.get("MALLOC_ARENA_MAX"))
        assert set(arenas.values()) == {"2"}
        # the freed heap goes back to the system every second (glibc): the plugin runs in each worker
        trims = client.run(lambda dask_worker: dask_worker.plugins["volnorm-heap-trim"]._callback is not None)
        assert set(trims.values()) == {platform.libc_ver()[0] == "glibc"}
        # the pipeline's fused passes: every root task to the workers at once, then dask's default back
        saturation = lambda: client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION)  # noqa: E731
        default = saturation()
        with eager_roots(client) as changed:
            assert changed and saturation() == float("inf")
        assert saturation() == default != float("inf")
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_eager_roots_leaves_a_cluster_volnorm_did_not_start_alone():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster, set_as_default=False) as client:
        with eager_roots(client) as changed:
            assert not changed
            assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) != float("inf")


def test_two_converts_of_the_same_files_on_one_cluster(cohort, cluster_client, tmp_path):
    """Each output gets its own tasks: concurrent runs must not share work."""
    from concurrent.futures import ThreadPoolExecutor

    outs = [tmp_path / "A.zarr", tmp_path / "B.zarr"]
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda o: vn.convert(cohort, o, scheduler=cluster_client), outs))
    a, b = (vn.open_zarr(o) for o in outs)
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    np.testing.assert_array_equal(a.values, vn.open_nifti(cohort).values)


def test_colour_quantize_and_invert_on_cluster_equal_sync(cluster_client):
    """The nearest-colour tables are made on the workers (tasks carry only the palette)."""
    from skimage import data

    imgs = np.stack([data.astronaut(), data.astronaut()[::-1], data.astronaut()[:, ::-1]])
    stack = xr.DataArray(imgs, dims=("volume", "y", "x", "channel")).chunk({"volume": 1, "y": 128})
    p = vn.color.fit_quantize(stack, 12, sample=20_000, seed=2)
    with cluster_client.as_current():
        q = vn.color.quantize(stack, params=p, labels=True).compute()
        grey = vn.color.to_grey(stack)
        rgba = vn.color.apply_colormap(grey, "viridis", vmin=0, vmax=255)
        back = vn.color.invert_colormap(rgba, "viridis", vmin=0, vmax=255).compute()
        p2 = vn.color.fit_quantize(stack, 12, sample=20_000, seed=2)
    np.testing.assert_array_equal(p2.values["palette"].values, p.values["palette"].values)
    xr.testing.assert_identical(q, vn.color.quantize(stack, params=p, labels=True).compute(scheduler="sync"))
    xr.testing.assert_identical(back, vn.color.invert_colormap(rgba, "viridis", vmin=0, vmax=255).compute(scheduler="sync"))
    assert float(np.abs(back - grey.compute()).max()) <= back.attrs["max_error"] + 1e-9


def test_per_volume_float_quantiles_of_many_volumes_on_a_cluster(cluster_client, tmp_path):
    """Exact per-volume quantiles of 120 float32 volumes (the two-pass key path) on process
    workers: each task of the pick pass carries the wanted key bins of its own volume, not a
    table of every volume's (256 KiB per volume: a 25 MiB graph for 100 volumes, and a worker
    of 1.8 GiB paused at its memory limit in a pipeline's statistics pass)."""
    rng = np.random.default_rng(7)
    v = rng.lognormal(4, 1, (120, 6, 5, 4)) * (rng.random((120, 6, 5, 4)) < 0.5)  # half background
    x = xr.DataArray(v.astype("float32"), dims=("volume", "z", "y", "x"))
    qs = [0.01, 0.5, 0.99]
    x.chunk({"volume": 1}).data.to_zarr(str(tmp_path / "x.zarr"))  # read from disk, as a pipeline's output
    on_disk = x.copy(data=da.from_zarr(str(tmp_path / "x.zarr")))
    with cluster_client.as_current(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s = vn.summarize(on_disk, dim=("z", "y", "x"), quantiles=qs)
    assert not [w for w in seen if "large graph" in str(w.message)], [str(w.message) for w in seen]
    got = np.stack([s[f"q{q:g}"].values for q in qs], axis=1)
    ref = np.stack([np.quantile(v.astype(np.float64), qs) for v in x.values])
    np.testing.assert_array_equal(got, ref)



def test_a_graph_goes_to_a_cluster_with_only_the_tasks_it_needs(cohort, cluster_client, monkeypatch):
    """dask culls before it fuses, layer by layer, and a stack of the volumes keeps every key:
    fusion left each volume not needed as an alias of a fused task. The writers compute two
    batches at once, each graph held the other's volumes as aliases, and the scheduler lost a
    fused key (a KeyError in about half the runs of the scaling notebook; a race). This checks
    its cause on the pipeline's own graphs: every task sent is one the results need."""
    from dask._task_spec import convert_legacy_graph, cull
    from dask.core import flatten

    sent: list[tuple[int, int]] = []
    compute = type(cluster_client).compute

    def recording(self, collections, *args, **kwargs):
        for c in collections:
            dsk = convert_legacy_graph(dict(c.__dask_graph__()))
            sent.append((len(dsk), len(cull(dsk, list(flatten(c.__dask_keys__()))))))
        return compute(self, collections, *args, **kwargs)

    monkeypatch.setattr(type(cluster_client), "compute", recording)
    spec = {"version": 1, "input": {"nifti": [str(p) for p in cohort]}, "mask": {"threshold": {"method": "otsu", "per": "volume"}},
            "steps": [{"rescale": {"percentiles": [1, 99], "out_range": "uint16"}}], "output": {"store": str(cohort[0].parent / "culled.zarr")},
            "outputs": {"statistics": {"path": str(cohort[0].parent / "culled.csv")}}, "engine": {"progress": False}}
    try:
        monkeypatch.setattr("volnorm.io.writers.WRITE_BATCH_BYTES", 2 * vn.open_nifti(cohort[0]).nbytes)  # several batches
        vn.pipeline.run(spec, client=cluster_client, echo=None)
    finally:
        import shutil

        shutil.rmtree(cohort[0].parent / "culled.zarr", ignore_errors=True)
        (cohort[0].parent / "culled.csv").unlink(missing_ok=True)
    assert sent and all(n == needed for n, needed in sent), sent


def test_a_closing_worker_keeps_quiet_about_its_own_heartbeat_race():
    """QuietClose drops the heartbeat error only while the worker closes itself."""
    import logging

    from volnorm.engine.clusters import QuietClose

    class Worker:
        status = "Status.running"

    w = Worker()
    log = logging.getLogger("distributed.worker")
    before = list(log.filters)
    QuietClose().setup(w)
    try:
        (quiet,) = [f for f in log.filters if f not in before]
        record = logging.LogRecord("distributed.worker", logging.ERROR, "", 0, "Failed to communicate with scheduler during heartbeat.", (), None)
        assert quiet(record)  # a running worker that cannot reach its scheduler: said
        w.status = "Status.closing"
        assert not quiet(record)
        other = logging.LogRecord("distributed.worker", logging.ERROR, "", 0, "Compute Failed", (), None)
        assert quiet(other)
    finally:
        log.removeFilter(quiet)
