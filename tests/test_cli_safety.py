"""The command line's safety rules: one rule for remote schedulers (every command), SIGTERM as a
graceful interrupt, a second concurrent run refused early, workers killed by memory reported as
such, ``volnorm verify``, and plain ``--name`` values."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import volnorm as vn
from volnorm.cli import _parser, main
from volnorm.engine import faults, is_loopback

REMOTE = "tcp://192.0.2.1:8786"  # TEST-NET-1: never routed; a connection attempt would hang until its timeout


# ---------------------------------------------------------------------------
# 1. one security rule for every --scheduler
# ---------------------------------------------------------------------------


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_with_scheduler_has_allow_insecure_documented():
    with_scheduler = {name: p for name, p in _subparsers().items() if any("--scheduler" in a.option_strings for a in p._actions)}
    assert {"convert", "stats", "threshold", "apply", "voxel-hist", "hist", "preview", "normative", "run", "demo"} <= set(with_scheduler)
    for name, p in with_scheduler.items():
        flag = [a for a in p._actions if "--allow-insecure" in a.option_strings]
        assert flag, name
        assert "tls://" in flag[0].help and "unencrypted" in flag[0].help
        assert "--allow-insecure" in p.format_help()


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    """Real arguments for each command, so that only the scheduler can be the reason for a refusal."""
    f = str(vn.datasets.nibabel_files()["anatomical.nii"])
    store = tmp_path / "s.zarr"
    vn.convert([f], store, scheduler="sync")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\ninput: {{nifti: {f}}}\nsteps: [zscore]\noutput: {{store: {tmp_path / 'out.zarr'}}}\n")
    params = tmp_path / "p.json"
    params.write_text(json.dumps([vn.fit_zscore(vn.open_nifti(f)).to_dict()]))  # real fitted values
    return {"file": f, "store": str(store), "spec": str(spec), "params": str(params), "out": str(tmp_path / "o.zarr")}


def _commands(a: dict[str, str]) -> dict[str, list[str]]:
    return {
        "convert": ["convert", a["file"], a["out"]],
        "stats": ["stats", a["file"]],
        "threshold": ["threshold", a["file"]],
        "apply": ["apply", a["file"], a["out"], "--params", a["params"]],
        "voxel-hist": ["voxel-hist", a["store"]],
        "hist": ["hist", a["file"], "--out", a["out"] + ".png"],
        "normative": ["normative", a["store"], a["file"], "--out", a["out"] + ".nii.gz"],
        "run": ["run", a["spec"]],
    }


@pytest.mark.parametrize("command", ["convert", "stats", "threshold", "apply", "voxel-hist", "hist", "normative", "run"])
@pytest.mark.parametrize("address", [REMOTE, "tcp://10.255.255.1:8786", "ws://192.0.2.1:8786", "tcp://0.0.0.0:8786"])
def test_a_plain_remote_scheduler_is_refused_at_once(inputs, capsys, command, address):
    t0 = time.monotonic()
    rc = main([*_commands(inputs)[command], "--scheduler", address])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1, err
    assert took < 2, took
    assert err.startswith(f"volnorm {command}: error: ") and address in err
    assert "not encrypted" in err and "use tls://" in err and "--allow-insecure" in err
    assert not Path(inputs["out"]).exists() and not Path(inputs["out"]).with_name("out.zarr").exists()


def test_the_refusal_in_a_fresh_process_does_not_wait_for_a_connection(inputs):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "volnorm", *_commands(inputs)["convert"], "--scheduler", "tcp://10.255.255.1:8786"],
                       capture_output=True, text=True, timeout=60, check=False)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert "use tls://" in r.stderr and "--allow-insecure" in r.stderr and "Traceback" not in r.stderr
    assert took < 15, took  # the interpreter and volnorm's imports; dask's connect timeout would be 30-60 s


class WouldConnect(OSError):
    pass


@pytest.fixture
def no_connect(monkeypatch):
    """distributed.Client replaced by a stand-in that records the address and refuses to connect."""
    import distributed

    seen: list[str] = []

    def client(address, *a, **k):
        seen.append(address)
        raise WouldConnect(f"test: would connect to {address}")

    monkeypatch.setattr(distributed, "Client", client)
    return seen


@pytest.mark.parametrize("command", ["convert", "stats", "apply", "run"])
def test_allow_insecure_lets_the_address_through(inputs, capsys, no_connect, command):
    rc = main([*_commands(inputs)[command], "--scheduler", REMOTE, "--allow-insecure"])
    assert rc == 1
    assert no_connect == [REMOTE]  # past the rule, the connection was attempted to exactly that address
    assert "would connect" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["tls://192.0.2.1:8786", "wss://192.0.2.1:8786", "tcp://127.0.0.1:8786", "tcp://[::1]:8786", "tcp://localhost:8786"])
def test_encrypted_or_loopback_addresses_are_let_through(no_connect, address):
    from volnorm.engine import check_address, dask_scheduler, executor

    check_address(address)
    with pytest.raises(WouldConnect), executor(address):
        pass
    with pytest.raises(WouldConnect), dask_scheduler(address):
        pass
    assert no_connect == [address, address]


@pytest.mark.parametrize("address", [REMOTE, "tcp://10.255.255.1:8786", "tcp://:8786", "ucx://192.0.2.1:8786"])
def test_the_library_entry_points_apply_the_same_rule(no_connect, address, tmp_path):
    from volnorm.engine import InsecureSchedulerError, check_address, dask_scheduler, executor

    with pytest.raises(InsecureSchedulerError, match="use tls://"):
        check_address(address)
    with pytest.raises(ValueError, match="use tls://"), executor(address):
        pytest.fail("connected")
    with pytest.raises(ValueError, match="use tls://"), dask_scheduler(address):
        pytest.fail("connected")
    with pytest.raises(ValueError, match=r"^engine\.scheduler .*use tls://"), vn.pipeline.engine({"scheduler": address}):
        pytest.fail("connected")
    with pytest.raises(ValueError, match="use tls://"):
        vn.convert([vn.datasets.nibabel_files()["anatomical.nii"]], tmp_path / "x.zarr", scheduler=address)
    assert not (tmp_path / "x.zarr").exists()
    assert no_connect == []


def test_kubernetes_is_the_same_rule():
    from volnorm.engine import InsecureSchedulerError, check_address

    with pytest.raises(InsecureSchedulerError, match="allow_insecure"):
        check_address("kubernetes", what="engine.scheduler")
    check_address("kubernetes", allow_insecure=True)
    for name in (None, "local", "threads", "sync", "slurm", "pbs"):
        check_address(name)


def test_pipeline_keeps_its_names():
    from volnorm import engine

    assert is_loopback("tcp://127.0.0.1:1") and not is_loopback(REMOTE)
    assert engine.ENCRYPTED_SCHEMES == ("tls", "wss", "inproc")


# ---------------------------------------------------------------------------
# 6. --name is a plain name
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../victim.zarr", "/tmp/victim.zarr", "a/b", "..", ".", ".hidden", ""])
@pytest.mark.parametrize("command", ["voxel-hist", "normative"])
def test_name_must_be_a_plain_name(inputs, tmp_path, capsys, monkeypatch, command, name):
    import volnorm.engine

    started = []
    monkeypatch.setattr(volnorm.engine, "dask_scheduler", lambda *a, **k: started.append(a) or pytest.fail("started"))
    victim = tmp_path / "victim.zarr"
    victim.mkdir()
    (victim / "keep").write_text("x")
    before = sorted(p.name for p in Path(inputs["store"]).iterdir())
    argv = {"voxel-hist": ["voxel-hist", inputs["store"]], "normative": _commands(inputs)["normative"]}[command]
    assert main([*argv, "--name", name]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"volnorm {command}: error: --name"), err
    assert "plain name" in err or "non-empty" in err, err
    assert started == []
    assert (victim / "keep").read_text() == "x"
    assert sorted(p.name for p in Path(inputs["store"]).iterdir()) == before
    assert not Path(inputs["out"] + ".nii.gz").exists()


# ---------------------------------------------------------------------------
# 5. volnorm verify
# ---------------------------------------------------------------------------


def test_verify_arguments():
    p = _subparsers()["verify"]
    a = p.parse_args(["s.zarr"])
    assert (a.store, a.json, a.sources, a.progress) == ("s.zarr", False, True, None)
    a = p.parse_args(["s.zarr", "--json", "--no-sources", "--no-progress"])
    assert (a.json, a.sources, a.progress) == (True, False, False)
    assert p.parse_args(["s.zarr", "--progress"]).progress is True
    with pytest.raises(SystemExit):
        p.parse_args(["s.zarr", "--progress", "--no-progress"])
    assert "Exit codes" in p.format_help()


def test_verify_a_whole_store_then_a_damaged_one(tmp_path, capsys):
    import json

    store = tmp_path / "a.zarr"
    vn.convert([vn.datasets.nibabel_files()["anatomical.nii"]], store, scheduler="sync")
    assert main(["verify", str(store), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{store}: ok") and "source" in out
    assert main(["verify", str(store), "--json", "--no-sources"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["ok"] is True and facts["store"] == str(store)
    chunk = next(p for p in store.rglob("*") if p.is_file() and "/c/" in str(p) and p.parent.parent.name != "nifti")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert main(["verify", str(store)]) == 1
    cap = capsys.readouterr()
    assert "DAMAGED" in cap.out and "checksum mismatch" in cap.out and "is damaged" in cap.err
    assert main(["verify", str(store), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


@pytest.mark.parametrize("what", ["missing", "file", "plain directory"])
def test_verify_something_that_is_not_a_store(tmp_path, capsys, what):
    path = tmp_path / "x.zarr"
    if what == "file":
        path.write_text("not a store")
    elif what == "plain directory":
        path.mkdir()
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"volnorm verify: error: {path} ") and "volnorm store" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# 2. SIGTERM: a graceful interrupt, exit code 3, resumable
# ---------------------------------------------------------------------------

SLOW_CLI = textwrap.dedent(
    """
    # the volnorm command, each finished volume taking a little longer (a window to interrupt it in);
    # the patch runs in the worker processes too (they import this module as __mp_main__)
    import sys, time
    import volnorm.io.niftizarr as nz
    finish = nz.finish_volume
    def slow_finish(*a, **k):
        out = finish(*a, **k)
        time.sleep(0.3)
        return out
    nz.finish_volume = slow_finish
    if __name__ == "__main__":
        from volnorm.cli import main
        sys.exit(main(sys.argv[1:]))
    """
)


def _finished_volumes(staged: Path) -> int:
    import zarr

    if not (staged / "zarr.json").exists():
        return 0
    try:
        root = zarr.open_group(staged, mode="r")
        return sum(bool(g.attrs.get("volnorm", {}).get("complete")) for _, g in root.groups())
    except Exception:  # noqa: BLE001 - being written
        return 0


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["threads", "local"])
def test_sigterm_interrupts_convert_with_exit_code_3_and_a_rerun_completes(tmp_path, scheduler):
    import psutil

    from volnorm.io.store import staging_path

    files = vn.datasets.make_cohort(tmp_path / "in", n_subjects=10, shape=(40, 48, 36), compressed="mixed", seed=3)
    out = tmp_path / "c.zarr"
    (tmp_path / "slow_cli.py").write_text(SLOW_CLI)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(tmp_path / "slow_cli.py"), "convert", *map(str, files), str(out), "--scheduler", scheduler, "--no-progress"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staged = staging_path(out.absolute())
    try:
        t0 = time.monotonic()
        while _finished_volumes(staged) < 1:  # it is writing
            assert p.poll() is None, p.communicate()
            assert time.monotonic() - t0 < 120
            time.sleep(0.02)
        children = _children(p.pid)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 3, err
    assert "volnorm convert: interrupted: run the same command again to resume" in err, err
    assert "Traceback" not in err, err
    assert not out.exists()  # nothing a reader could take for the output
    assert staged.exists() and _finished_volumes(staged) < len(files)
    assert not (tmp_path / ".c.zarr.volnorm-lock").exists()  # the lock is given back
    deadline = time.monotonic() + 10  # the cluster it started was closed: no worker process outlives it
    while any(psutil.pid_exists(c) and psutil.Process(c).status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, [c for c in children if psutil.pid_exists(c)]
        time.sleep(0.1)
    r = subprocess.run([sys.executable, "-m", "volnorm", *cmd[2:]], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert vn.open_zarr(out).sizes["volume"] == len(files)
    assert not staged.exists()


@pytest.mark.parametrize(("command", "said"), [("stats", "interrupted: nothing was written"), ("threshold", "interrupted: nothing was written")])
def test_sigterm_during_a_read_only_command(monkeypatch, capsys, command, said):
    f = str(vn.datasets.nibabel_files()["anatomical.nii"])
    before = signal.getsignal(signal.SIGTERM)

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        pytest.fail("SIGTERM did not interrupt the command")

    monkeypatch.setattr(vn, "summarize", terminated)
    monkeypatch.setattr(vn, "threshold", terminated)
    t0 = time.monotonic()
    assert main([command, f, "--scheduler", "sync"]) == 3
    assert time.monotonic() - t0 < 4
    assert capsys.readouterr().err == f"volnorm {command}: {said}\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_the_exit_codes_are_in_the_top_level_help():
    text = _parser().format_help()
    assert "exit codes" in text and "3 interrupted" in text and "SIGTERM" in text


# ---------------------------------------------------------------------------
# 3. a second concurrent run is refused before its engine starts
# ---------------------------------------------------------------------------

BLOCKED_RUN = textwrap.dedent(
    """
    # volnorm run, sleeping (its output's lock held) once the first volume is written
    import os, sys, time
    from pathlib import Path
    import volnorm.io.writers as w
    from volnorm.io import niftizarr
    w.WRITE_BATCH_BYTES = 1
    finish = niftizarr.finish_volume
    def finish_then_block(grp, name, summary):
        finish(grp, name, summary)
        Path(os.environ["VN_BLOCKED"]).write_text(str(os.getpid()))
        time.sleep(120)
    niftizarr.finish_volume = w.finish_volume = finish_then_block  # the writer imports it by name
    if __name__ == "__main__":
        from volnorm.cli import main
        sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_a_second_concurrent_run_is_refused_before_its_cluster_starts(tmp_path, capsys, monkeypatch):
    import volnorm.engine

    vn.datasets.make_cohort(tmp_path / "data", n_subjects=3, shape=(40, 48, 36), seed=7)
    spec = tmp_path / "twice.yaml"
    spec.write_text(textwrap.dedent(f"""
        version: 1
        input: {{nifti: "{tmp_path}/data/sub-*.nii"}}
        steps: [{{rescale: {{percentiles: [1, 99]}}}}]
        output: {{store: {tmp_path}/twice.zarr}}
        engine: {{scheduler: threads, progress: false}}
    """))
    (tmp_path / "blocked_run.py").write_text(BLOCKED_RUN)
    blocked = tmp_path / "blocked"
    env = {**os.environ, "VN_BLOCKED": str(blocked),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, str(tmp_path / "blocked_run.py"), "run", str(spec)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = []
    monkeypatch.setattr(volnorm.engine, "local_cluster", lambda *a, **k: started.append(a) or pytest.fail("a cluster was started"))
    try:
        t0 = time.monotonic()
        while not blocked.exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        t0 = time.monotonic()
        rc = main(["run", str(spec), "--scheduler", "local"])  # would start a cluster: seconds to tens of seconds
        took = time.monotonic() - t0
    finally:
        p.kill()
        p.communicate()
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "another volnorm run" in err and f"pid {p.pid}" in err
    assert started == []
    assert took < 3, took


# ---------------------------------------------------------------------------
# 4. workers killed by memory are not a bad input; a stall names its workers
# ---------------------------------------------------------------------------

MiB = 2**20
FILES = ["/d/sub-001.nii", "/d/sub-002.nii.gz", "/d/sub-003.nii"]
PLAN = {"inputs": {"kind": "nifti"}, "files": FILES, "memory": 400 * MiB}


class FakeWorker:
    def __init__(self, address: str = "tcp://127.0.0.1:40000", memory_limit: int = 4096 * MiB) -> None:
        self.address, self.memory_limit = address, memory_limit


class FakeClient:
    """What _poison asks of a client: the workers' limits, the memory restarts, the task's inputs."""

    def __init__(self, limit: int | None = 4096 * MiB, restarts: list | None = None, sources: list[str] | None = None) -> None:
        self.limit, self.restarts, self.sources = limit, restarts or [], sources or []

    def scheduler_info(self):
        return {"workers": {} if self.limit is None else {"tcp://127.0.0.1:40001": {"memory_limit": self.limit}}}

    def get_events(self, topic):
        assert topic == "worker-restart-memory"
        return self.restarts

    def run_on_scheduler(self, fn, *args):
        return self.sources


def killed(key, limit: int = 4096 * MiB):
    from distributed.scheduler import KilledWorker

    return KilledWorker(key, FakeWorker(memory_limit=limit), 3)


READ_KEY = ("nifti-sub-original-nifti-sub-stack-sum-" + "a" * 32, 1, 0, 0, 0, 0)
FINALIZE_KEY = "clip-getitem-" + "b" * 32 + "-finalize-" + "c" * 32


def test_a_killed_worker_with_room_to_spare_names_the_input_from_the_scheduler():
    e = faults.poison(killed(FINALIZE_KEY), PLAN, FakeClient(sources=["/d/sub-003.nii"]), since=time.time())
    assert isinstance(e, vn.pipeline.PoisonInputError) and not isinstance(e, faults.WorkerMemoryError)
    assert str(e).startswith("/d/sub-003.nii: workers were killed 4 times") and "crash its reader" in str(e)
    assert "4.00 GiB" in str(e) and "400.00 MiB" in str(e)


def test_the_input_from_the_key_when_the_scheduler_has_forgotten_the_task():
    e = faults.poison(killed(READ_KEY), PLAN, FakeClient(), since=time.time())
    assert str(e).startswith("/d/sub-002.nii.gz: workers were killed 4 times")
    e = faults.poison(killed(("nifti-sub-003-" + "d" * 32, 0, 1, 0)), PLAN, None)
    assert str(e).startswith("/d/sub-003.nii: ")


@pytest.mark.parametrize("key", [FINALIZE_KEY, ("nifti-stack-getitem-" + "e" * 32, 2, 0, 0, 0), ("sum-aggregate-" + "f" * 32, 0)])
def test_a_task_not_tied_to_one_input_blames_none(key):
    e = faults.poison(killed(key), PLAN, FakeClient(), since=time.time())
    assert isinstance(e, vn.pipeline.PoisonInputError)
    assert not any(f in str(e) for f in FILES), str(e)
    assert "not tied to one input" in str(e) and "workers' logs" in str(e)


def test_several_inputs_are_named_as_such():
    e = faults.poison(killed(FINALIZE_KEY), PLAN, FakeClient(sources=FILES[:2]), since=time.time())
    assert "while combining 2 inputs (sub-001.nii, sub-002.nii.gz)" in str(e)
    assert not str(e).startswith("/d/")


def test_a_small_memory_limit_is_reported_as_memory_not_as_a_bad_file():
    e = faults.poison(killed(READ_KEY, limit=300 * MiB), PLAN, FakeClient(limit=300 * MiB, sources=["/d/sub-002.nii.gz"]), since=time.time())
    assert isinstance(e, faults.WorkerMemoryError)
    msg = str(e)
    assert msg.startswith("workers ran out of memory (limit 300.00 MiB, estimate 400.00 MiB")
    assert "raise engine.memory_limit or set smaller input.chunks" in msg and "the input is probably fine" in msg
    # every worker gone: the last worker's limit
    e = faults.poison(killed(READ_KEY, limit=300 * MiB), PLAN, FakeClient(limit=None), since=time.time())
    assert isinstance(e, faults.WorkerMemoryError) and "limit 300.00 MiB" in str(e)


def test_a_worker_restarted_for_its_memory_budget_is_reported_as_memory():
    t = time.time()
    restarts = [(t + 1, {"worker": "tcp://127.0.0.1:40000", "pid": 1, "rss": 3900 * MiB})]
    e = faults.poison(killed(READ_KEY), PLAN, FakeClient(restarts=restarts), since=t)
    assert isinstance(e, faults.WorkerMemoryError)
    assert "limit 4.00 GiB" in str(e) and "restarted for exceeding its memory budget" in str(e)
    # a restart of an earlier run (before this one started, another worker) does not count
    old = [(t - 3600, {"worker": "tcp://127.0.0.1:1", "pid": 1, "rss": 1})]
    assert not isinstance(faults.poison(killed(READ_KEY), PLAN, FakeClient(restarts=old), since=t), faults.WorkerMemoryError)


def test_other_errors_are_not_rewritten():
    assert faults.poison(RuntimeError("x"), PLAN, FakeClient()) is None


def _worker(address, status="running", memory=300 * MiB, limit=4096 * MiB, processing=()):
    return {"address": address, "status": status, "memory": memory, "limit": limit,
            "processing": list(processing)[:3], "n_processing": len(processing)}


def test_a_stall_with_paused_workers_blames_memory_and_names_them():
    state = {"tasks": 12, "paused": ["tcp://127.0.0.1:2"], "workers": [
        _worker("tcp://127.0.0.1:1", processing=["('a', 0)"]), _worker("tcp://127.0.0.1:2", "paused", 3400 * MiB)]}
    msg = faults.stall_message(state, 30)
    assert msg.startswith("no task finished for 30 s while 12 tasks waited; paused workers")
    assert "tcp://127.0.0.1:2 (3.32 GiB of 4.00 GiB)" in msg and "raise engine.memory_limit" in msg
    assert "tcp://127.0.0.1:1" not in msg


def test_a_stall_near_the_limit_blames_memory():
    state = {"tasks": 3, "paused": [], "workers": [_worker("tcp://127.0.0.1:1", memory=3000 * MiB, processing=["k"])]}
    msg = faults.stall_message(state, 30)
    assert "near their memory limit" in msg and "tcp://127.0.0.1:1" in msg and "raise engine.memory_limit" in msg


def test_a_stall_without_memory_pressure_names_the_stuck_tasks_and_does_not_blame_memory():
    state = {"tasks": 7, "paused": [], "workers": [
        _worker("tcp://127.0.0.1:1", processing=["('read-x', 0)", "('read-x', 1)", "('read-x', 2)", "('read-x', 3)"]),
        _worker("tcp://127.0.0.1:2")]}
    msg = faults.stall_message(state, 30)
    assert "stuck: tcp://127.0.0.1:1 running ('read-x', 0), ('read-x', 1), ('read-x', 2) and 1 more" in msg
    assert "memory is not the cause" in msg and "raise engine.memory_limit" not in msg
    msg = faults.stall_message({"tasks": 2, "paused": [], "workers": []}, 30)
    assert "no worker is connected" in msg


def memory_hog(path_endswith: str, nbytes: int):
    """A worker plugin: reading that file allocates ``nbytes`` and holds them (a worker over its budget)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class Hog(WorkerPlugin):
        def setup(self, worker):
            import numpy as np

            from volnorm.io.nifti import NiftiArray

            orig = NiftiArray.__getitem__
            if getattr(orig, "_hog", False):
                return

            def patched(obj, *args, **kwargs):
                if str(getattr(obj, "path", "")).endswith(path_endswith):
                    held = np.ones(nbytes, dtype=np.uint8)  # touched: resident
                    time.sleep(5)  # the nanny's monitor (every 0.1 s) restarts the worker meanwhile
                    del held
                return orig(obj, *args, **kwargs)

            patched._hog = True
            NiftiArray.__getitem__ = patched

    return Hog()


@pytest.mark.slow
def test_a_worker_killed_by_its_memory_budget_is_reported_as_memory(tmp_path):
    import dask
    import distributed  # noqa: F401 - its config defaults first

    from volnorm.engine import local_cluster

    vn.datasets.make_cohort(tmp_path / "data", n_subjects=3, shape=(40, 48, 36), seed=7)
    spec = {"version": 1, "input": {"nifti": f"{tmp_path}/data/sub-*.nii"}, "steps": [{"rescale": {"percentiles": [1, 99]}}],
            "output": {"store": str(tmp_path / "o.zarr")}, "engine": {"scheduler": "threads", "progress": False}}
    with dask.config.set({"distributed.worker.memory.pause": False, "distributed.worker.memory.spill": False,
                          "distributed.worker.memory.target": False, "distributed.scheduler.allowed-failures": 1}):
        client = local_cluster(1, memory_limit="1.2GB")
    try:
        client.register_plugin(memory_hog("sub-002.nii", 1_300_000_000), name="hog")
        t0 = time.monotonic()
        with pytest.raises(faults.WorkerMemoryError) as ei:
            vn.pipeline.run(spec, client=client, echo=None)
        assert time.monotonic() - t0 < 60
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    msg = str(ei.value)
    assert msg.startswith("workers ran out of memory (limit 1.12 GiB") and "restarted for exceeding its memory budget" in msg
    assert "raise engine.memory_limit or set smaller input.chunks" in msg
    assert not (tmp_path / "o.zarr").exists()
