"""Every command runs where --scheduler says, and says where it ran.

One engine (volnorm.engine.running) turns the word into a running client for every command:
`local` starts a new local cluster, `threads`/`sync` use dask's local schedulers, an address
(here a real TLS scheduler with temporary certificates) connects there. What ran where is
observed, not assumed: dask's named local schedulers are wrapped to count their graphs, the
local cluster's and the TLS cluster's schedulers (in this process) carry a plugin that counts
finished tasks, and the per-file conversion records the thread it ran in.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import dask.base
import pytest

import volnorm as vn
import volnorm.conversion
import volnorm.engine
from volnorm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

distributed = pytest.importorskip("distributed")

class _Finished(distributed.diagnostics.plugin.SchedulerPlugin):
    """Counts tasks that finished on this scheduler."""

    def __init__(self) -> None:
        self.n = 0

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory":
            self.n += 1


@pytest.fixture(scope="module")
def inputs(cohort, tmp_path_factory):
    """Two phantom subjects, a store of them, its fitted steps, a store with per-voxel histograms."""
    d = tmp_path_factory.mktemp("engine")
    files = [str(f) for f in cohort[:2]]
    store = d / "in.zarr"
    with volnorm.engine.running("sync"):
        vn.convert(files, store, progress=False)
        out = vn.pipeline.steps.run_steps(vn.open_zarr(store), [("rescale", {})])
        (d / "params.json").write_text(out.attrs["volnorm_params"])
        hstore = d / "h.zarr"
        shutil.copytree(store, hstore)
        vn.accumulate(hstore, vn.open_zarr(hstore), bins=16, range=(0.0, 2000.0))
    spec = d / "spec.yaml"
    spec.write_text(f"version: 1\ninput:\n  store: {store}\nsteps:\n  - rescale\noutput:\n  store: OUT\n")
    return {"files": files, "store": str(store), "params": str(d / "params.json"), "hstore": str(hstore), "spec": spec}


@pytest.fixture(scope="module")
def tls_scheduler(tmp_path_factory):
    """A real scheduler speaking TLS (temporary certificates), with one worker process."""
    from distributed import LocalCluster
    from distributed.security import Security

    sec = Security.temporary()
    d = tmp_path_factory.mktemp("tls")
    for name, text in (("ca.pem", sec.tls_ca_file), ("cert.pem", sec.tls_client_cert), ("key.pem", sec.tls_client_key)):
        (d / name).write_text(text)
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, protocol="tls://", security=sec,
                           host="127.0.0.1", dashboard_address=":0")
    plugin = _Finished()
    cluster.scheduler.add_plugin(plugin, name="count-finished")
    config = {"distributed.comm.tls.ca-file": str(d / "ca.pem"), "distributed.comm.tls.client.cert": str(d / "cert.pem"),
              "distributed.comm.tls.client.key": str(d / "key.pem"), "distributed.comm.require-encryption": True}
    yield cluster.scheduler_address, plugin, config
    cluster.close()


@pytest.fixture
def observed(monkeypatch):
    """What ran where during one command."""
    seen = {"threads": 0, "sync": 0, "local_clusters": [], "ingest_threads": set()}
    for word, key in (("threads", "threads"), ("sync", "sync"), ("synchronous", "sync"), ("single-threaded", "sync")):
        get = dask.base.named_schedulers[word]

        def counted(*a, _get=get, _key=key, **k):
            seen[_key] += 1
            return _get(*a, **k)

        monkeypatch.setitem(dask.base.named_schedulers, word, counted)
    start = volnorm.engine.local_cluster

    def local_cluster(*a, **k):
        client = start(*a, **k)
        plugin = _Finished()
        client.cluster.scheduler.add_plugin(plugin, name="count-finished")
        seen["local_clusters"].append(plugin)
        return client

    monkeypatch.setattr(volnorm.engine, "local_cluster", local_cluster)
    ingest = volnorm.conversion.ingest_nifti

    def recording(*a, **k):
        seen["ingest_threads"].add(threading.current_thread() is threading.main_thread())
        return ingest(*a, **k)

    monkeypatch.setattr(volnorm.conversion, "ingest_nifti", recording)
    return seen


COMMANDS = {
    "convert": lambda i, t: ["convert", *i["files"], str(t / "c.zarr")],
    "convert --step": lambda i, t: ["convert", *i["files"], str(t / "s.zarr"), "--step", "zscore:per=volume"],
    "stats": lambda i, t: ["stats", i["store"], "--per", "volume"],
    "threshold": lambda i, t: ["threshold", i["store"]],
    "hist": lambda i, t: ["hist", i["store"], "--out", str(t / "h.png")],
    "preview": lambda i, t: ["preview", i["store"], "--out", str(t / "p.png"), "--volumes", "1", "--slices", "1"],
    "apply": lambda i, t: ["apply", i["store"], str(t / "a.zarr"), "--params", i["params"]],
    "voxel-hist": lambda i, t: ["voxel-hist", _copy(i["store"], t / "v.zarr"), "--bins", "8", "--range", "0,2000"],
    "normative": lambda i, t: ["normative", i["hstore"], i["files"][0], "--out", str(t / "n.nii.gz")],
    "export": lambda i, t: ["export", i["store"], str(t / "nifti")],
    "run": lambda i, t: ["run", _spec(i["spec"], t)],
    "demo": lambda i, t: ["demo", "--out", str(t / "demo"), "--subjects", "1"],
}
#: commands whose work is plain function calls (one per file), not dask graphs
EXECUTOR_COMMANDS = ("convert", "demo")


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _spec(template: Path, t: Path) -> str:
    p = t / "spec.yaml"
    p.write_text(template.read_text().replace("OUT", str(t / "r.zarr")))
    return str(p)


def _run(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("where", ["sync", "threads"])
def test_a_command_on_dask_local_schedulers_runs_there(command, where, inputs, observed, tmp_path, capsys):
    code, text = _run([*COMMANDS[command](inputs, tmp_path), "--scheduler", where], capsys)
    assert code == 0, text
    said = "synchronous (this thread)" if where == "sync" else f"{volnorm.engine.usable_cpus()} threads"
    assert f"running on {said}" in text
    assert observed["local_clusters"] == []
    other = "threads" if where == "sync" else "sync"
    if command in EXECUTOR_COMMANDS:
        assert observed["ingest_threads"] == {where == "sync"}  # sync: in the main thread; threads: a pool's
    else:
        assert observed[where] > 0 and observed[other] == 0, observed


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_on_local_runs_on_a_new_local_cluster(command, inputs, observed, tmp_path, capsys):
    code, text = _run([*COMMANDS[command](inputs, tmp_path), "--scheduler", "local"], capsys)
    assert code == 0, text
    assert "running on local cluster, " in text and "workers on 127.0.0.1" in text
    assert len(observed["local_clusters"]) == 1 and observed["local_clusters"][0].n > 0
    assert observed["threads"] == observed["sync"] == 0 and not observed["ingest_threads"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_on_a_tls_address_runs_on_that_scheduler(command, inputs, observed, tls_scheduler, tmp_path, capsys):
    import dask

    address, plugin, config = tls_scheduler
    assert address.startswith("tls://127.0.0.1:")
    before = plugin.n
    with dask.config.set(config):
        code, text = _run([*COMMANDS[command](inputs, tmp_path), "--scheduler", address], capsys)
    assert code == 0, text
    assert f"running on scheduler {address}" in text
    assert plugin.n > before
    assert observed["local_clusters"] == [] and observed["threads"] == observed["sync"] == 0 and not observed["ingest_threads"]


def test_without_scheduler_every_command_uses_the_default_word(inputs, observed, tmp_path, capsys, monkeypatch):
    """The default is the same for every command, with or without --step: $VOLNORM_SCHEDULER, else local."""
    monkeypatch.setenv("VOLNORM_SCHEDULER", "sync")
    for command in ("convert", "convert --step", "apply", "stats"):
        where = tmp_path / command.replace(" ", "")
        where.mkdir()
        code, text = _run(COMMANDS[command](inputs, where), capsys)
        assert code == 0, text
        assert "running on synchronous (this thread)" in text, (command, text)


def test_the_default_word_is_local(monkeypatch):
    monkeypatch.delenv("VOLNORM_SCHEDULER", raising=False)
    assert volnorm.engine.default_scheduler() == "local"
    monkeypatch.setenv("VOLNORM_SCHEDULER", "thread")
    with pytest.raises(ValueError, match=r"^\$VOLNORM_SCHEDULER: expected 'local', 'threads', 'sync'"):
        volnorm.engine.default_scheduler()


def test_a_bad_word_fails_the_same_way_on_the_command_line_and_in_a_spec(inputs, tmp_path, capsys):
    spec = Path(_spec(inputs["spec"], tmp_path))
    code, text = _run(["run", str(spec), "--scheduler", "foo", "--dry-run"], capsys)
    assert code == 1 and "--scheduler: expected 'local', 'threads', 'sync'" in text and "got 'foo'" in text
    spec.write_text(spec.read_text() + "engine:\n  scheduler: foo\n")
    code, text2 = _run(["run", str(spec), "--dry-run"], capsys)
    assert code == 1 and "engine.scheduler: expected 'local', 'threads', 'sync'" in text2 and "got 'foo'" in text2
    code, text3 = _run(["stats", inputs["store"], "--scheduler", "foo"], capsys)
    assert code == 1 and "--scheduler: expected 'local', 'threads', 'sync'" in text3


def test_python_convert_inside_a_running_block_uses_its_engine(inputs, observed, tmp_path):
    with volnorm.engine.running("sync") as eng:
        res = vn.convert(inputs["files"], tmp_path / "o.zarr", progress=False)
    assert res.engine == eng.description == "synchronous (this thread)"
    assert observed["ingest_threads"] == {True}


def test_image_stacks_convert_where_they_are_told(tmp_path, observed):
    """convert used to ignore the scheduler for image stacks."""
    import imageio.v3 as iio
    import numpy as np
    from skimage import data as skdata

    for i in range(3):
        iio.imwrite(tmp_path / f"im{i}.png", np.roll(skdata.camera(), i, axis=0))
    res = vn.convert([str(p) for p in sorted(tmp_path.glob("*.png"))], tmp_path / "s.zarr", scheduler="sync", progress=False)
    assert res.engine == "synchronous (this thread)" and observed["sync"] > 0 and observed["threads"] == 0


def test_json_output_stays_clean(inputs, tmp_path, capsys):
    """Where it ran goes to stderr: stdout stays machine-readable."""
    capsys.readouterr()
    assert main(["stats", inputs["store"], "--json", "--scheduler", "sync"]) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)
    assert "running on synchronous" in cap.err


def test_every_command_that_takes_a_scheduler_is_in_the_table():
    import argparse

    from volnorm.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_scheduler = {name for name, p in sub.choices.items() if any("--scheduler" in a.option_strings for a in p._actions)}
    assert with_scheduler == {c.split()[0] for c in COMMANDS}


def test_small_graphs_are_optimized_on_a_cluster_like_every_other_graph(monkeypatch):
    """dask#9888: the same collection's keys sent to one scheduler once optimized (fused into an
    alias) and once not make distributed warn "Detected different `run_spec`" (seen on 3 of 7
    ordinary `volnorm run` on a local cluster). compute_small skips optimization only where no
    scheduler keeps the keys: dask's local schedulers."""
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    from volnorm.engine import compute_small, running

    seen: list[bool] = []
    real = dask.compute

    def recording(*a, **k):
        seen.append(k.get("optimize_graph", True))
        return real(*a, **k)

    monkeypatch.setattr(dask, "compute", recording)
    x = da.ones(8, chunks=2).sum()
    with running("sync"):
        assert [float(v) for v in compute_small(x)] == [8.0]
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster, set_as_default=False) as client:
        with running(client):
            assert [float(v) for v in compute_small(x)] == [8.0]
    assert seen == [False, True]


def test_a_pipeline_on_a_cluster_sends_each_key_one_way(cohort, tmp_path, caplog):
    """An ordinary run (a mask from the data, a fitted step, statistics beside the images) on a
    real cluster: no "Detected different `run_spec`" from its scheduler."""
    import logging

    from distributed import Client, LocalCluster

    spec = {"version": 1, "input": {"nifti": [str(f) for f in cohort[:3]]}, "mask": {"threshold": {"method": "otsu", "per": "volume"}},
            "steps": [{"rescale": {"percentiles": [1, 99]}}], "output": {"store": str(tmp_path / "o.zarr")},
            "outputs": {"statistics": {"path": str(tmp_path / "s.csv")}, "params": str(tmp_path / "p.json")}}
    with caplog.at_level(logging.WARNING, logger="distributed.scheduler"):
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster, set_as_default=False) as client:
            assert vn.pipeline.run(spec, client=client, echo=None).status == "done"
    assert not [r for r in caplog.records if "Detected different `run_spec`" in r.getMessage()]
