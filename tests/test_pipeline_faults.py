"""volnorm run under faults: killed runs, killed workers, a poison input, SIGTERM, a second
concurrent run, a retry in the same process; and the default cluster's sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import volnorm as vn
from volnorm.cli import main
from volnorm.io.store import staging_path

pytestmark = pytest.mark.slow

WRAPPER = textwrap.dedent(
    """
    # volnorm run, with a fault injected at a known point (VN_FAULT)
    import os, signal, sys, time
    from pathlib import Path
    import volnorm.io.writers as w
    from volnorm.io import niftizarr

    fault = os.environ.get("VN_FAULT", "")
    w.WRITE_BATCH_BYTES = 1  # a batch per volume: each volume is marked complete on its own
    done = []
    finish = niftizarr.finish_volume

    def finish_then_fault(grp, name, summary):
        finish(grp, name, summary)
        done.append(name)
        Path(os.environ["VN_LOG"]).write_text("\\n".join(done))
        if fault == "kill-after-2" and len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "block-after-1" and len(done) == 1:
            Path(os.environ["VN_LOG"] + ".blocked").write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("VN_BLOCK", "120")))

    niftizarr.finish_volume = w.finish_volume = finish_then_fault  # the writer imports it by name
    from volnorm.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def setup(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    vn.datasets.make_cohort(data, n_subjects=5, shape=(40, 48, 36), seed=7)
    (tmp_path / "wrapper.py").write_text(WRAPPER)

    def spec(name: str, **engine) -> Path:
        p = tmp_path / f"{name}.yaml"
        p.write_text(textwrap.dedent(f"""
            version: 1
            input: {{nifti: "data/sub-*.nii"}}
            steps: [{{rescale: {{percentiles: [1, 99]}}}}]
            output: {{store: {name}.zarr}}
            engine: {{scheduler: {engine.get("scheduler", "threads")}, progress: false}}
        """))
        return p

    return tmp_path, spec


def run_wrapped(tmp_path: Path, spec: Path, fault: str, *args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "VN_FAULT": fault, "VN_LOG": str(tmp_path / f"{spec.stem}.log")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(tmp_path / "wrapper.py"), "run", str(spec), *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_blocked(p: subprocess.Popen, blocked: Path) -> None:
    """Wait until the wrapped run has written its first volume and sleeps (holding its lock)."""
    t0 = time.monotonic()
    while not blocked.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)


def chunk_files(store: Path) -> dict[str, bytes]:
    """Every stored chunk, by path: the bytes a reader gets (metadata, with its timestamps, apart)."""
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file() and f.name != "zarr.json"}


def test_killed_run_leaves_no_store_and_resumes_to_identical_bytes(setup):
    tmp, spec = setup
    clean = spec("clean")
    assert main(["-q", "run", str(clean)]) == 0
    killed = spec("killed")
    r = run_wrapped(tmp, killed, "kill-after-2")
    assert r.returncode == -signal.SIGKILL, r.stderr
    store = tmp / "killed.zarr"
    assert not store.exists()  # nothing that looks like a store
    assert staging_path(store.absolute()).exists()
    with pytest.raises((OSError, ValueError)):
        vn.open_zarr(staging_path(store.absolute()))  # the staging is refused: no completion marker
    assert (tmp / "killed.log").read_text().split() == ["sub-001", "sub-002"]
    # the re-run reuses the fitted parameters and writes only the three volumes left
    r = run_wrapped(tmp, killed, "")
    assert r.returncode == 0, r.stderr
    assert "resuming: the fitted parameters of the interrupted run are reused" in r.stdout
    assert (tmp / "killed.log").read_text().split() == ["sub-003", "sub-004", "sub-005"]
    assert chunk_files(store) == chunk_files(tmp / "clean.zarr")
    np.testing.assert_array_equal(vn.open_zarr(store).values, vn.open_zarr(tmp / "clean.zarr").values)


def test_sigterm_stops_gracefully_and_a_rerun_completes(setup):
    tmp, spec = setup
    s = spec("term")
    p = run_wrapped(tmp, s, "block-after-1", wait=False)
    try:
        wait_until_blocked(p, tmp / "term.log.blocked")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 3, err
    assert "interrupted" in err and "again to resume" in err
    store = tmp / "term.zarr"
    assert not store.exists() and not (tmp / ".term.zarr.volnorm-lock").exists()  # the lock is given back
    assert main(["-q", "run", str(s)]) == 0
    assert vn.open_zarr(store).sizes["volume"] == 5


def test_a_second_concurrent_run_is_refused(setup, capsys):
    tmp, spec = setup
    s = spec("twice")
    p = run_wrapped(tmp, s, "block-after-1", wait=False)
    try:
        wait_until_blocked(p, tmp / "twice.log.blocked")
        assert main(["run", str(s)]) == 1
        err = capsys.readouterr().err
        assert "another volnorm run" in err and f"pid {p.pid}" in err
    finally:
        p.kill()
        p.communicate()
    # the first run died (SIGKILL, lock left behind by a dead process): the next run takes over and completes
    assert main(["-q", "run", str(s)]) == 0


def fault_plugin(target: str, action: str, flag: str, path_endswith: str | None = None):
    """A worker plugin that patches, in each worker process, the reading of a NIfTI chunk
    (``target="read"``) or the writing of a zarr chunk (``"write"``) to ``action``:
    ``"kill"`` (SIGKILL the worker) or ``"raise"``; once in the cluster's life (a flag file),
    or, with ``path_endswith``, every time that file is read (a poison input)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class Fault(WorkerPlugin):
        def setup(self, worker):
            import zarr

            from volnorm.io.nifti import NiftiArray

            cls, meth = (NiftiArray, "__getitem__") if target == "read" else (zarr.Array, "__setitem__")
            orig = getattr(cls, meth)
            if getattr(orig, "_fault", False):
                return

            def patched(obj, *args, **kwargs):
                if path_endswith is not None:
                    hit = str(getattr(obj, "path", "")).endswith(path_endswith)
                else:
                    try:
                        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                        hit = True
                    except FileExistsError:
                        hit = False
                if hit and action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if hit and action == "raise":
                    raise RuntimeError("injected failure")
                return orig(obj, *args, **kwargs)

            patched._fault = True
            setattr(cls, meth, patched)

    return Fault()


@pytest.fixture
def own_cluster():
    from volnorm.engine import local_cluster

    client = local_cluster(2)
    yield client
    cluster = client.cluster
    client.close()
    cluster.close()


@pytest.mark.parametrize("phase", ["fit", "write"])
def test_worker_killed_mid_run_gives_the_same_bytes(setup, own_cluster, phase):
    tmp, spec = setup
    clean = spec("clean")
    assert main(["-q", "run", str(clean)]) == 0
    flag = tmp / f"killed-{phase}"
    # the fit pass reads the files first; the write pass is where zarr chunks are written
    own_cluster.register_plugin(fault_plugin("read" if phase == "fit" else "write", "kill", str(flag)), name=f"kill-{phase}")
    pids = set(own_cluster.run(os.getpid).values())
    res = vn.pipeline.run(spec(f"k{phase}"), client=own_cluster, echo=None)
    assert res.status == "done"
    assert flag.exists()  # a worker was killed during that pass
    own_cluster.wait_for_workers(2, timeout=60)
    assert set(own_cluster.run(os.getpid).values()) != pids  # and replaced by the nanny
    assert chunk_files(tmp / f"k{phase}.zarr") == chunk_files(tmp / "clean.zarr")


def test_a_poison_input_ends_the_run_with_an_error_naming_it(setup, own_cluster):
    tmp, spec = setup
    own_cluster.register_plugin(fault_plugin("read", "kill", "", path_endswith="sub-003.nii"), name="poison")
    with pytest.raises(vn.pipeline.PoisonInputError, match=r"sub-003\.nii"):
        vn.pipeline.run(spec("poison"), client=own_cluster, echo=None)
    assert not (tmp / "poison.zarr").exists()


def test_a_retry_in_the_same_process_runs_again(setup, own_cluster):
    """A failed run, then the same spec on the same client: the tasks run again (dask would
    hand back the erred keys of an identical graph it still holds)."""
    tmp, spec = setup
    s = spec("retry")
    own_cluster.register_plugin(fault_plugin("write", "raise", str(tmp / "failed")), name="fail-once")
    with pytest.raises(RuntimeError, match="injected failure"):
        vn.pipeline.run(s, client=own_cluster, echo=None)
    assert (tmp / "failed").exists()
    assert vn.pipeline.run(s, client=own_cluster, echo=None).status == "done"
    np.testing.assert_array_equal(vn.open_zarr(tmp / "retry.zarr").sizes["volume"], 5)


def test_the_default_cluster_listens_on_loopback_only():
    import psutil

    from volnorm.engine import local_cluster

    client = local_cluster(2)
    try:
        pids = [os.getpid(), *client.run(os.getpid).values()]
        listening = [
            c.laddr for pid in pids for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    assert listening  # the scheduler, the dashboard, the workers and nannies listen
    assert all(a.ip in ("127.0.0.1", "::1") for a in listening), listening


def test_workers_paused_on_memory_stop_the_run_instead_of_hanging(setup):
    import dask
    import distributed  # noqa: F401 - its config defaults first, or leaving dask.config.set below drops them

    from volnorm.engine import local_cluster
    from volnorm.pipeline.spec import load_spec

    tmp, spec = setup
    # a worker process alone is above 80% of 60 MB: paused from the start, never restarted
    with dask.config.set({"distributed.worker.memory.terminate": False, "distributed.worker.memory.pause": 0.8}):
        client = local_cluster(1, memory_limit="60MB")
    try:
        s = load_spec(spec("stall"))
        s.data["engine"]["stall_timeout"] = 3
        t0 = time.monotonic()
        with pytest.raises(vn.pipeline.RunStalledError, match=r"no task finished for 3 s.*paused workers"):
            vn.pipeline.run(s, client=client, echo=None)
        assert time.monotonic() - t0 < 60  # stopped, not hung
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    assert not (tmp / "stall.zarr").exists()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_scheduler_and_worker(tmp: Path) -> tuple[str, list[subprocess.Popen]]:
    """A real ``dask scheduler`` and ``dask worker`` on 127.0.0.1, as on a cluster."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_cli = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen([*dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([*dask_cli, "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                                   "--no-dashboard", "--local-directory", str(tmp / "dask-worker")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    t0 = time.monotonic()
    while True:
        try:
            with Client(address, timeout=5) as c:
                c.wait_for_workers(1, timeout=30)
            return address, procs
        except OSError:
            assert time.monotonic() - t0 < 60, "the scheduler did not start"
            time.sleep(0.5)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        p.kill()
        p.wait(timeout=30)


def test_the_scheduler_lost_mid_run_is_a_clear_error_and_a_rerun_completes(setup):
    tmp, spec = setup
    s = spec("lost")
    address, procs = start_scheduler_and_worker(tmp)
    try:
        env_block = {"VN_BLOCK": "3"}
        os.environ.update(env_block)
        try:
            p = run_wrapped(tmp, s, "block-after-1", "--scheduler", address, wait=False)
        finally:
            del os.environ["VN_BLOCK"]
        wait_until_blocked(p, tmp / "lost.log.blocked")
        stop(procs[:1])  # the scheduler goes away while the run waits between two volumes
        _, err = p.communicate(timeout=240)
    finally:
        stop(procs)
    assert p.returncode == 4, err
    assert "the cluster was lost" in err
    assert not (tmp / "lost.zarr").exists()
    address, procs = start_scheduler_and_worker(tmp)
    try:
        assert main(["-q", "run", str(s), "--scheduler", address]) == 0
    finally:
        stop(procs)
    assert vn.open_zarr(tmp / "lost.zarr").sizes["volume"] == 5


def test_a_poison_diagnosis_names_the_other_inputs_killed_with_it():
    """A worker's death counts against every task it held, running or queued: when another
    input's task reaches the limit first (or with the culprit), the error names both inputs
    (seen once in CI: the bystander sub-004 was named, the poisonous sub-003 not)."""
    from distributed.scheduler import KilledWorker

    from volnorm.engine import faults

    files = ["/d/sub-003.nii", "/d/sub-004.nii"]

    class Client:
        def run_on_scheduler(self, func, *args):
            return {"task_sources": ["/d/sub-004.nii"], "erred_inputs": files}[func.__name__]

        def scheduler_info(self):
            return {"workers": {"w": {"memory_limit": 8 * 2**30}}}

        def get_events(self, topic):
            return []

    e = KilledWorker(("sum-" + "a" * 32, 3, 0, 0, 0), None, 3)
    err = faults.poison(e, {"inputs": {"kind": "nifti"}, "files": files, "memory": 400 * 2**20}, Client(), since=0.0)
    assert isinstance(err, faults.PoisonInputError)
    assert str(err).startswith("/d/sub-004.nii: workers were killed 4 times")
    assert "tasks of /d/sub-003.nii were on the same workers when they died, so it may be that one instead" in str(err)
