"""Declarative runs: a YAML spec -> fit passes -> one lazy graph -> a committed store.

A spec (see ``workflows/``) names the input, an optional mask, the steps (the
Python API's transforms, by name, with their options), the outputs and the engine.
:func:`run` validates it before any data is read, prints the plan, runs each
step's fit pass, builds one lazy graph and writes it with the store's commit
protocol (staging directory, every chunk verified, completion marker last). A
run is idempotent: run again, it does nothing and says so; interrupted, it
resumes (volumes already written are not written again, fitted parameters are
reused); a changed spec or changed inputs never mix with an existing output
unless ``overwrite=True``.

Exit codes of ``volnorm run``: 0 done (or already up to date), 1 refused or
failed (bad spec, bad input, an output that exists), 2 command-line usage,
3 interrupted (SIGINT/SIGTERM: run again to resume), 4 the cluster was lost.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from volnorm._spec import JOB_CLUSTERS, Spec, SpecError, load_spec

logger = logging.getLogger(__name__)

__all__ = ["ClusterLostError", "PoisonInputError", "RunResult", "RunStalledError", "SpecError", "WorkerMemoryError", "load_spec", "plan", "run"]


class ClusterLostError(RuntimeError):
    """The dask scheduler or every worker went away during a run. The message says which
    outputs, if any, were committed before (whole; a re-run writes only the rest)."""


class RunStalledError(RuntimeError):
    """No task finished for ``engine.stall_timeout`` seconds while work was waiting (typically
    every worker paused above its memory threshold): the run was stopped; outputs already
    committed are kept (the message names them)."""


class PoisonInputError(RuntimeError):
    """Workers died again and again on one input (a file that crashes its reader, or one too
    large for worker memory): the run stops with its name (and the outputs committed before)."""


class WorkerMemoryError(RuntimeError):
    """Workers were killed again and again because they ran out of memory (their memory limit is
    small for the plan's per-worker estimate, or a worker was restarted for exceeding its memory
    budget): not a bad input. Raise ``engine.memory_limit`` or set smaller ``input.chunks``."""


@dataclass
class RunResult:
    """What :func:`run` did: ``status`` is ``"done"``, ``"up to date"`` or ``"planned"`` (dry run),
    the outputs ``written`` and ``skipped`` (already up to date), and the ``seconds`` it took.

    Examples
    --------
    >>> r = RunResult("done", {}, written=["/data/out.zarr"], seconds=1.5)
    >>> print(r)
    volnorm run: done (1.5 s)
      wrote   /data/out.zarr
    """

    status: str
    plan: dict[str, Any]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"volnorm run: {self.status} ({self.seconds:.1f} s)"]
        lines += [f"  wrote   {w}" for w in self.written]
        lines += [f"  kept    {s} (already up to date)" for s in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# the plan: inputs, digests, what is already done
# ---------------------------------------------------------------------------


def _identity(p: Path) -> list[Any]:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _store_identity(p: Path) -> list[Any]:
    from volnorm.io.store import read_manifest

    m = read_manifest(p) or {}
    if not m.get("complete"):
        raise ValueError(f"{p}: not a complete volnorm store")
    return [str(p), m.get("plan_digest"), m.get("finished")]


def _inputs(spec: Spec) -> tuple[str, list[Path], list[list[Any]], int, list[str]]:
    """The kind of input, its files (or store), their identities, bytes of voxels and the names
    the output store will hold (its volume groups, or ``image``). Reads headers only."""
    from volnorm.conversion import validate_inputs
    from volnorm.io.nifti import expand_paths
    from volnorm.io.readers import _unique_names
    from volnorm.io.store import read_manifest

    inp = spec["input"]
    if "nifti" in inp:
        infos = validate_inputs(expand_paths(inp["nifti"]))
        files = [Path(i.path) for i in infos]
        return "nifti", files, [_identity(f) for f in files], sum(i.data_bytes for i in infos), _unique_names(infos)
    if "images" in inp:
        files = expand_paths(inp["images"], suffixes=(".png", ".tif", ".tiff", ".npy", ".jpg", ".jpeg", ".bmp"), what="image")
        return "images", files, [_identity(f) for f in files], sum(f.stat().st_size for f in files), ["image"]
    store = Path(inp["store"])
    if not (store / "zarr.json").exists():
        raise FileNotFoundError(f"{store}: no volnorm store here (input.store)")
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    m = read_manifest(store) or {}
    names = ["image"] if m.get("kind") == "images" else [str(v) for v in m.get("volumes") or []]
    return "store", [store], [_store_identity(store)], size, names


def _digest(obj: Any) -> str:
    from volnorm.io.store import digest

    return digest(json.loads(json.dumps(obj, default=str)))


def plan(spec: str | os.PathLike | Mapping[str, Any] | Spec) -> dict[str, Any]:
    """The plan of a run, from the spec and the inputs' headers (no voxel is read).

    Parameters
    ----------
    spec : str, os.PathLike, mapping or Spec
        A pipeline spec as :func:`load_spec` takes it: a file, YAML text, a dict, or a loaded
        ``Spec``.

    Returns
    -------
    dict
        ``inputs`` (kind, count, bytes), ``passes`` (one fit pass per fitted step, then
        the write and the other outputs), ``digest`` (of everything the images depend on:
        spec, input identities, mask, parameters) and ``digests`` (one per output). Also
        ``files``, ``output`` (the store), ``engine``, the spec's ``name`` and source
        (``spec``), and the estimates ``chunk_bytes`` and ``memory`` (per worker).

    Examples
    --------
    >>> import volnorm as vn, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> f = vn.datasets.nibabel_files()["anatomical.nii"]
    >>> p = vn.pipeline.plan({"version": 1, "input": {"nifti": str(f)}, "steps": ["zscore"],
    ...                       "output": {"store": os.path.join(d, "out.zarr")}})
    >>> p["inputs"]["count"], [s for s, _ in p["passes"]]
    (1, ['fit zscore', 'write'])
    """
    from volnorm.steps import FITTED

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    kind, files, ident, nbytes, names = _inputs(spec)
    if "voxel_histogram" in spec["outputs"]:  # a group beside the volumes: never one of them
        from volnorm._utils import plain_name

        try:
            plain_name(spec["outputs"]["voxel_histogram"]["name"], "outputs.voxel_histogram.name", taken=names)
        except ValueError as e:
            raise SpecError(f"{spec.source}: {e}") from None
    mask = dict(spec.data.get("mask", {}))
    if "file" in mask:
        mask["identity"] = _identity(Path(mask["file"]))
    params_id = None
    if "params_from" in spec.data:
        pf = Path(spec["params_from"])
        params_id = _store_identity(pf) if pf.is_dir() else _identity(pf)
    core = {
        "input": {k: v for k, v in spec["input"].items()}, "identity": ident, "mask": mask,
        "steps": spec["steps"], "params_from": params_id, "codec": spec["output"]["codec"],
    }
    images_digest = _digest(core)
    outs = spec["outputs"]
    passes: list[tuple[str, str]] = []
    if "threshold" in mask:
        passes.append(("fit mask threshold", f"{mask['threshold'].get('method', 'otsu')} over the input"))
    for st in spec["steps"]:
        if st["name"] in FITTED or st["name"] == "nyul":
            passes.append((f"fit {st['name']}", "statistics pass over the data so far"))
    if params_id is not None:
        passes.append(("load parameters", f"from {spec['params_from']}"))
    if outs["images"]:
        passes.append(("write", f"-> {spec['output']['store']}"))
    if "voxel_histogram" in outs:
        passes.append(("voxel histogram", f"-> {spec['output']['store']}/{outs['voxel_histogram']['name']}"))
    if "statistics" in outs:
        passes.append(("statistics", f"-> {outs['statistics']['path']}"))
    digests = {"images": images_digest}
    for key in ("voxel_histogram", "statistics", "params"):
        if key in outs:
            digests[key] = _digest([images_digest, outs[key]])
    _check_output_dirs(spec)
    cm = _chunk_mib(spec["engine"], spec["input"].get("chunks"))
    chunk = min(nbytes / max(1, len(files)), (cm if isinstance(cm, int) else 64) * 2**20)
    return {
        "chunk_bytes": chunk,
        # per worker: the process and its imports, then per thread the input chunk, float64
        # intermediates (up to 4x an int16 chunk) and the compressed output
        "memory": WORKER_BASE_BYTES + THREADS_PER_WORKER * chunk * 10,
        "name": spec.data.get("name") or Path(spec.source).stem,
        "spec": spec.source,
        "inputs": {"kind": kind, "count": len(files), "bytes": nbytes, "first": str(files[0]) if files else None},
        "files": [str(f) for f in files],
        "passes": passes,
        "output": spec["output"]["store"],
        "digest": images_digest,
        "digests": digests,
        "engine": spec["engine"],
    }


#: Memory of an idle dask worker process after volnorm's imports (measured: 330-380 MiB).
WORKER_BASE_BYTES = 360 * 2**20
#: Threads per worker of the local cluster (one: numpy and the kernels release the GIL in
#: large calls, and one thread keeps a worker's memory to one chunk's working set).
THREADS_PER_WORKER = 1


def _check_output_dirs(spec: Spec) -> None:
    """Every output's parent directory exists (a run never creates directories above what
    the user named): said at plan time, before any data is read, dry runs included."""
    outs = spec["outputs"]
    named = [("output.store", spec["output"]["store"])]
    if "statistics" in outs:
        named.append(("outputs.statistics.path", outs["statistics"]["path"]))
    if "params" in outs:
        named.append(("outputs.params", outs["params"]))
    for key, path in named:
        parent = Path(path).parent
        if not parent.is_dir():
            raise FileNotFoundError(f"{spec.source}: {key} {path}: the directory {parent} does not exist (create it first)")


def _status(spec: Spec, p: dict[str, Any], overwrite: bool) -> dict[str, bool]:
    """Which outputs are already up to date; raise if one exists from another spec or input."""
    from volnorm.io.store import read_manifest

    outs = spec["outputs"]
    done: dict[str, bool] = {}
    store = Path(spec["output"]["store"])
    if outs["images"] or "voxel_histogram" in outs:
        m = read_manifest(store) if store.exists() else None
        mine = (m or {}).get("pipeline", {}).get("digest")
        if m is not None and m.get("complete") and mine == p["digest"]:
            done["images"] = True
        elif m is not None and not overwrite:
            why = ("was written by another spec or from other inputs" if mine else "was not written by volnorm run") if m.get("complete") else "is incomplete"
            raise FileExistsError(f"{store}: {why}; pass overwrite=True (CLI: --overwrite) to replace it")
        else:
            done["images"] = False
    if "voxel_histogram" in outs:
        done["voxel_histogram"] = bool(done.get("images")) and _voxel_hist_done(store, outs["voxel_histogram"]["name"], p)
    for key in ("statistics", "params"):
        if key in outs:
            path = Path(outs[key]["path"] if key == "statistics" else outs[key])
            done[key] = _file_done(path, p["digests"][key], overwrite)
    return done


def _voxel_hist_done(store: Path, name: str, p: dict[str, Any]) -> bool:
    if not (store / name / "zarr.json").exists():
        return False
    from volnorm.voxel import open_voxel_histogram

    h = open_voxel_histogram(store, name)
    return h.attrs.get("pipeline_digest") == p["digests"]["voxel_histogram"]


def _file_done(path: Path, want: str, overwrite: bool) -> bool:
    if not path.exists():
        return False
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        head = ""
    if want in head:
        return True
    if not overwrite:
        raise FileExistsError(f"{path}: exists and was not written by this spec; pass overwrite=True (CLI: --overwrite) to replace it")
    return False


def _bytes(n: Any) -> str:
    from dask.utils import format_bytes

    return format_bytes(int(n)) if isinstance(n, (int, float)) else str(n)


def describe(p: dict[str, Any], done: Mapping[str, bool] | None = None) -> str:
    """The plan as text, for people."""
    inp = p["inputs"]
    eng = p["engine"]
    lines = [
        f"volnorm run {p['name']}  (spec {p['spec']})",
        f"  input   {inp['count']} {inp['kind']} input(s), {inp['bytes'] / 1e6:.1f} MB, first {inp['first']}",
        f"  output  {p['output']}",
        f"  engine  {eng['scheduler']}" + (f", {eng['n_workers']} workers" if eng.get("n_workers") else "")
        + (f", memory limit {_bytes(eng['memory_limit'])} per worker" if eng.get("memory_limit") not in (None, "auto") else ""),
    ]
    if p.get("memory"):
        lines.append(
            f"  memory  ~{p['memory'] / 2**20:.0f} MiB per worker (estimate: {WORKER_BASE_BYTES / 2**20:.0f} MiB for the process, "
            f"then {THREADS_PER_WORKER} thread x 10 x {p['chunk_bytes'] / 2**20:.1f} MiB input chunks)"
        )
        limit = eng.get("memory_limit")
        if isinstance(limit, (int, float)) and p["memory"] > 0.8 * limit:
            lines.append(
                f"  WARNING the estimate is above the pause threshold ({0.8 * limit / 2**20:.0f} MiB = 0.8 x the memory limit): "
                "raise engine.memory_limit or set smaller input.chunks"
            )
    lines.append("  passes")
    for i, (name, what) in enumerate(p["passes"], 1):
        lines.append(f"    {i}. {name}: {what}")
    if done:
        have = [k for k, v in done.items() if v]
        if have:
            lines.append(f"  up to date: {', '.join(have)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------


def _loopback(address: str) -> bool:
    """Whether ``address`` is on this machine (:func:`volnorm.engine.is_loopback`; kept for callers of this name)."""
    from volnorm.engine import is_loopback

    return is_loopback(address)


#: Schemes of ``distributed`` addresses whose traffic is encrypted (:data:`volnorm.engine.ENCRYPTED_SCHEMES`).
ENCRYPTED_SCHEMES = ("tls", "wss", "inproc")


@contextlib.contextmanager
def engine(eng: Mapping[str, Any], client: Any = None) -> Iterator[str]:
    """Run the dask graphs computed inside the block where the spec's ``engine`` says; yields a
    description (with the dashboard link). A given ``client`` wins. An unencrypted address
    (``tcp://``, ``ws://``) that is not on this machine is refused unless ``allow_insecure``
    (use ``tls://``), before any connection: :func:`volnorm.engine.check_address`."""
    import dask

    from volnorm.engine import DISTRIBUTED, check_address, dask_scheduler, local_cluster

    timeout = float(eng.get("stall_timeout") or 600)
    if client is not None:
        with client.as_current(), dask.config.set(scheduler=DISTRIBUTED), watchdog(client, timeout):
            yield f"client {client.scheduler.address}" + (f" (dashboard {client.dashboard_link})" if getattr(client, "dashboard_link", None) else "")
        return
    sched = eng.get("scheduler", "local")
    check_address(sched, allow_insecure=bool(eng.get("allow_insecure")), what="engine.scheduler")
    if sched in JOB_CLUSTERS:
        yield from _on_job_cluster(sched, eng, timeout)
        return
    if sched == "local" or "://" in sched:
        from distributed import Client

        c = local_cluster(eng.get("n_workers"), threads_per_worker=THREADS_PER_WORKER, memory_limit=eng.get("memory_limit", "auto")) if sched == "local" else Client(sched, set_as_default=False)
        try:
            with c.as_current(), dask.config.set(scheduler=DISTRIBUTED), watchdog(c, timeout):
                n = len(c.scheduler_info()["workers"])
                kind = f"local cluster, {n} workers on 127.0.0.1" if sched == "local" else f"scheduler {sched}, {n} workers"
                yield f"{kind} (dashboard {c.dashboard_link})"
        finally:
            cluster = c.cluster if sched == "local" else None
            c.close()
            if cluster is not None:
                cluster.close()
        return
    with dask_scheduler(sched, progress=bool(eng.get("progress"))) as where:
        yield where


def _on_job_cluster(kind: str, eng: Mapping[str, Any], timeout: float) -> Iterator[str]:
    """The body of :func:`engine` for SLURM, PBS and Kubernetes: submit ``engine.jobs`` jobs
    (pods), wait up to ``engine.wait`` s for ``engine.min_workers``, run, then cancel them."""
    import dask
    from distributed import Client

    from volnorm.engine import DISTRIBUTED, check_address, job_cluster

    cluster = job_cluster(kind, dict(eng.get("cluster") or {}))
    try:
        if kind != "kubernetes":  # kubernetes: refused above unless allow_insecure
            # nothing is submitted before this check (the cluster is scaled below)
            check_address(cluster.scheduler_address, allow_insecure=bool(eng.get("allow_insecure")),
                          what=f"engine.cluster (security: false): the {kind} cluster's scheduler")
        if kind == "kubernetes":
            cluster.scale(int(eng.get("jobs", 1)))
        else:
            cluster.scale(jobs=int(eng.get("jobs", 1)))
        with Client(cluster, set_as_default=False) as c:
            c.wait_for_workers(int(eng.get("min_workers", 1)), timeout=float(eng.get("wait", 3600)))
            with c.as_current(), dask.config.set(scheduler=DISTRIBUTED), watchdog(c, timeout):
                n = len(c.scheduler_info()["workers"])
                yield f"{kind} cluster {c.scheduler.address}, {n} workers so far (dashboard {c.dashboard_link})"
    finally:
        cluster.close()


def _scheduler_state(dask_scheduler: Any = None) -> dict[str, Any]:
    """Runs on the scheduler: how far it got, whether work waits, and each worker's state
    (status, process memory and limit, a few of the tasks it is running)."""
    s = dask_scheduler
    workers = []
    for ws in list(s.workers.values()):
        processing = list(ws.processing)
        workers.append({
            "address": ws.address,
            "status": ws.status.name,
            "memory": int(ws.memory.process),
            "limit": int(ws.memory_limit or 0),
            "processing": [str(ts.key) for ts in processing[:3]],
            "n_processing": len(processing),
        })
    return {
        "transitions": s.transition_counter,
        "tasks": len(s.tasks),
        "paused": sorted(w["address"] for w in workers if w["status"] == "paused"),
        "workers": workers,
    }


#: A worker whose process memory is above this fraction of its limit is "near its limit" (dask
#: pauses it at 0.8 and restarts it at 0.95).
NEAR_LIMIT = 0.7


def _stall_message(state: Mapping[str, Any], timeout: float) -> str:
    """Why a run stalled, from :func:`_scheduler_state`: the paused workers and those near their
    memory limit (then memory is the cause), else the stuck workers and their tasks.

    Examples
    --------
    >>> w = {"address": "tcp://127.0.0.1:1", "status": "running", "memory": 300 * 2**20, "limit": 4 * 2**30,
    ...      "processing": ["('read-1', 0)"], "n_processing": 1}
    >>> print(_stall_message({"tasks": 5, "paused": [], "workers": [w]}, 600))  # doctest: +NORMALIZE_WHITESPACE
    no task finished for 600 s while 5 tasks waited; stuck: tcp://127.0.0.1:1 running ('read-1', 0) (300.00 MiB
    of 4.00 GiB); no worker was paused or near its memory limit, so memory is not the cause: a task hangs (a slow or
    unreachable file system, a stuck reader?); look at the workers' call stacks on the dashboard, then run again.
    """
    workers = list(state.get("workers") or [])
    paused = [w for w in workers if w["status"] == "paused"] or [
        {"address": a, "status": "paused", "memory": 0, "limit": 0, "processing": [], "n_processing": 0} for a in state.get("paused", [])
    ]
    near = [w for w in workers if w["status"] != "paused" and w["limit"] and w["memory"] >= NEAR_LIMIT * w["limit"]]

    def mem(w: Mapping[str, Any]) -> str:
        return f"{_bytes(w['memory'])} of {_bytes(w['limit'])}" if w.get("limit") else "no memory limit"

    head = f"no task finished for {timeout:.0f} s while {state['tasks']} tasks waited"
    if paused or near:
        parts = []
        if paused:
            parts.append("paused workers (memory above the pause threshold): " + ", ".join(f"{w['address']} ({mem(w)})" for w in paused))
        if near:
            parts.append(f"workers near their memory limit (above {NEAR_LIMIT:.0%}): " + ", ".join(f"{w['address']} ({mem(w)})" for w in near))
        return (f"{head}; {'; '.join(parts)}; the workers ran out of memory: raise engine.memory_limit, use smaller "
                "input.chunks or fewer threads per worker, then run again.")
    busy = [w for w in workers if w["n_processing"]]
    if busy:
        stuck = ", ".join(
            f"{w['address']} running {', '.join(w['processing'])}"
            + (f" and {w['n_processing'] - len(w['processing'])} more" if w["n_processing"] > len(w["processing"]) else "")
            + f" ({mem(w)})"
            for w in busy
        )
        where = f"stuck: {stuck}"
    elif workers:
        where = "no worker is running a task (" + ", ".join(f"{w['address']} {w['status']}" for w in workers) + ")"
    else:
        where = "no worker is connected to the scheduler"
    return (f"{head}; {where}; no worker was paused or near its memory limit, so memory is not the cause: a task hangs "
            "(a slow or unreachable file system, a stuck reader?); look at the workers' call stacks on the dashboard, then run again.")


@contextlib.contextmanager
def watchdog(client: Any, timeout: float, poll: float = 1.0) -> Iterator[None]:
    """Stop the block (``RunStalledError``) when the scheduler holds tasks but none changes
    state for ``timeout`` seconds: workers paused on memory never resume by themselves, and
    dask would wait forever. The main thread is woken with SIGINT, then the error replaces
    the KeyboardInterrupt; its message names the paused workers (memory) or, when none is
    paused or near its limit, the stuck workers and their tasks (:func:`_stall_message`)."""
    import signal
    import threading

    stop = threading.Event()
    stalled: list[dict[str, Any]] = []
    with contextlib.suppress(Exception):  # best effort: a scheduler without volnorm cannot load it
        if not client.run_on_scheduler(_has_plugin, _ErredSources.name):
            client.register_plugin(_ErredSources(), name=_ErredSources.name)

    def loop() -> None:
        last, since = None, time.monotonic()
        while not stop.wait(poll):
            try:
                state = client.run_on_scheduler(_scheduler_state)
            except Exception:  # noqa: BLE001 - the scheduler may be gone; the run itself will say so
                continue
            key = (state["transitions"], state["tasks"])
            if key != last or not state["tasks"]:
                last, since = key, time.monotonic()
            elif time.monotonic() - since > timeout:
                stalled.append(state)
                if threading.current_thread() is not threading.main_thread():
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    t = threading.Thread(target=loop, name="volnorm-watchdog", daemon=True)
    t.start()
    try:
        yield
    except KeyboardInterrupt:
        if stalled:
            raise RunStalledError(_stall_message(stalled[0], timeout)) from None
        raise
    finally:
        stop.set()


def _current_client() -> Any:
    """The ``distributed.Client`` the graphs of this block run on (``engine`` makes it current), or None."""
    try:
        from distributed import Client

        return Client.current(allow_global=False)
    except (ImportError, ValueError):
        return None


def _sources_of(scheduler: Any, key: Any, limit: int = 500) -> list[str]:
    """On the scheduler: the NIfTI files read by task ``key`` and the tasks it depends on (up to
    ``limit`` tasks), found in their specs (a ``NiftiArray`` carries its file)."""
    import io
    import pickle

    found: set[str] = set()

    class Finder(pickle.Pickler):
        def persistent_id(self, obj: Any) -> None:
            if type(obj).__name__ == "NiftiArray":
                path = getattr(obj, "path", None) or getattr(getattr(obj, "info", None), "path", None)
                if path is not None:
                    found.add(str(path))
            return None

    ts = scheduler.tasks.get(key)
    seen: set[Any] = set()
    todo = [ts] if ts is not None else []
    while todo and len(seen) < limit:
        t = todo.pop()
        if t.key in seen:
            continue
        seen.add(t.key)
        try:
            Finder(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(t.run_spec)
        except Exception:  # noqa: BLE001, S110 - an unpicklable part: what was found so far stands
            pass
        todo.extend(t.dependencies)
    return sorted(found)


try:
    from distributed.diagnostics.plugin import SchedulerPlugin as _SchedulerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    _SchedulerPlugin = object  # type: ignore[assignment,misc]


class _ErredSources(_SchedulerPlugin):  # type: ignore[misc,valid-type]
    """A scheduler plugin: when a task errs (e.g. ``KilledWorker``), record the input files it
    reads while the scheduler still holds it (the client forgets it as the error propagates)."""

    name = "volnorm-erred-sources"

    def __init__(self) -> None:
        self.sources: dict[str, list[str]] = {}
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "erred" and self.scheduler is not None and len(self.sources) < 1000:
            try:
                self.sources[str(key)] = _sources_of(self.scheduler, key)
            except Exception:  # noqa: BLE001 - never disturb the scheduler
                pass


def _has_plugin(name: str, dask_scheduler: Any = None) -> bool:
    """Runs on the scheduler: whether a plugin of that name is registered."""
    return name in getattr(dask_scheduler, "plugins", {})


def _task_sources(key: Any, dask_scheduler: Any = None) -> list[str]:
    """Runs on the scheduler: the input files of task ``key``, as :class:`_ErredSources`
    recorded them when it erred, else from the task if the scheduler still holds it."""
    key = tuple(key) if isinstance(key, list) else key
    plugin = getattr(dask_scheduler, "plugins", {}).get(_ErredSources.name)
    recorded = getattr(plugin, "sources", {}).get(str(key))
    return list(recorded) if recorded is not None else _sources_of(dask_scheduler, key)


#: Layers after which a block's first index is no longer the volume (slices, rechunks, reductions' later stages).
_NOT_PER_VOLUME = ("getitem", "rechunk", "aggregate", "combine", "concatenate", "transpose", "reshape", "finalize")


def _key_inputs(key: Any, p: Mapping[str, Any]) -> list[str]:
    """The inputs a task key names, from how volnorm's graphs name their keys: a NIfTI reader's
    block is ``("nifti-<file stem>-<token>", z, y, x)``; a block of the stack (and of the
    element-wise and per-block steps fused with it: ``"...-stack-..."``) is ``(name, volume,
    ...)``, one volume per block. Anything else (a reduction's later stages, a slice, a
    ``finalize``) is not tied to one input: empty.

    Examples
    --------
    >>> p = {"inputs": {"kind": "nifti"}, "files": ["/d/sub-001.nii", "/d/sub-002.nii.gz"]}
    >>> _key_inputs(("nifti-sub-002-" + "a" * 32, 0, 1, 0), p), _key_inputs(("nifti-original-stack-sum-" + "b" * 32, 0, 0, 0, 0, 0), p)
    (['/d/sub-002.nii.gz'], ['/d/sub-001.nii'])
    >>> _key_inputs("clip-getitem-" + "c" * 32 + "-finalize-" + "d" * 32, p), _key_inputs(("nifti-stack-getitem-" + "e" * 32, 1, 0), p)
    ([], [])
    """
    import re

    files = [str(f) for f in p.get("files", [])]
    if p.get("inputs", {}).get("kind") != "nifti" or not isinstance(key, tuple) or not key or not isinstance(key[0], str):
        return []
    name = key[0]
    m = re.fullmatch(r"nifti-(.+)-[0-9a-f]{32}", name)
    if m and "-stack" not in name and len(key) <= 4:
        stem = m.group(1)
        return [f for f in files if re.sub(r"\.nii(\.gz)?$", "", Path(f).name) == stem]
    after = name.split("stack", 1)[1] if "stack" in name else None
    if after is not None and not any(w in after for w in _NOT_PER_VOLUME) and len(key) > 1 and isinstance(key[1], int) and 0 <= key[1] < len(files):
        return [files[key[1]]]
    return []


def _memory_facts(client: Any, e: Any, since: float | None) -> tuple[int | None, bool]:
    """(the smallest worker memory limit, whether a worker was restarted for exceeding its
    memory budget since ``since``): what the cluster says, best effort."""
    limit, restarted = None, False
    if client is None:
        last_limit = getattr(getattr(e, "last_worker", None), "memory_limit", None)
        return (int(last_limit) if isinstance(last_limit, (int, float)) and last_limit > 0 else None), restarted
    try:
        limits = [int(w.get("memory_limit") or 0) for w in client.scheduler_info()["workers"].values()]
        limit = min((v for v in limits if v > 0), default=None)
    except Exception:  # noqa: BLE001 - the scheduler may be gone
        pass
    if limit is None:  # every worker gone (all killed): the last one's limit
        last_limit = getattr(getattr(e, "last_worker", None), "memory_limit", None)
        limit = int(last_limit) if isinstance(last_limit, (int, float)) and last_limit > 0 else None
    try:
        events = client.get_events("worker-restart-memory")
        last = getattr(getattr(e, "last_worker", None), "address", None)
        restarted = any((since is None or t >= since - 1) or ev.get("worker") == last for t, ev in events)
    except Exception:  # noqa: BLE001
        pass
    return limit, restarted


def _poison(e: BaseException, p: Mapping[str, Any], client: Any = None, since: float | None = None) -> RuntimeError | None:
    """A ``KilledWorker`` as what it most likely is, for people.

    Memory (:class:`WorkerMemoryError`), when the workers' memory limit is small for the plan's
    per-worker estimate (``p["memory"]`` above the pause threshold, 0.8 x the limit) or a worker
    was restarted for exceeding its memory budget (the nanny's ``worker-restart-memory``
    event). Otherwise a :class:`PoisonInputError` naming the input the task reads: found in the
    task's spec on the scheduler (the NIfTI reader it holds), else from its key
    (:func:`_key_inputs`); a task that reads several inputs, or none, blames none of them.
    """
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    if not isinstance(e, KilledWorker):
        return None
    key = e.task
    sources: list[str] = []
    if client is not None and p.get("inputs", {}).get("kind") == "nifti":
        try:
            sources = list(client.run_on_scheduler(_task_sources, key))
        except Exception:  # noqa: BLE001 - the scheduler may be gone: fall back on the key
            sources = []
    if not sources:
        sources = _key_inputs(key, p)
    times = e.allowed_failures + 1
    if len(sources) == 1:
        where, what = sources[0], f"while processing {sources[0]}"
    elif sources:
        shown = ", ".join(Path(s).name for s in sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
        where, what = "several inputs", f"while combining {len(sources)} inputs ({shown})"
    else:
        where, what = "a task", "on a task that is not tied to one input"
    limit, restarted = _memory_facts(client, e, since)
    estimate = p.get("memory")
    small = bool(limit and estimate and estimate > 0.8 * limit)
    if small or restarted:
        why = []
        if restarted:
            why.append("a worker was restarted for exceeding its memory budget")
        if small:
            why.append("the estimate is above the pause threshold (0.8 x the limit)")
        return WorkerMemoryError(
            f"workers ran out of memory (limit {_bytes(limit) if limit else 'unknown'}, estimate {_bytes(estimate) if estimate else 'unknown'} "
            f"per worker; {' and '.join(why)}): raise engine.memory_limit or set smaller input.chunks. "
            f"They were killed {times} times {what} (task {key!r}); the input is probably fine."
        )
    if len(sources) == 1:
        return PoisonInputError(
            f"{where}: workers were killed {times} times while processing it (task {key!r}); "
            + (f"the memory limit ({_bytes(limit)}) is above the estimate ({_bytes(estimate) if estimate else 'unknown'}) and " if limit else "")
            + "no worker was restarted for exceeding its memory budget, so the file may crash its reader: "
            "check or remove that input and run again."
        )
    return PoisonInputError(
        f"workers were killed {times} times {what} (task {key!r}); neither the memory limit "
        f"({_bytes(limit) if limit else 'unknown'}, estimate {_bytes(estimate) if estimate else 'unknown'}) nor the workers' "
        "restarts point at memory: look at the workers' logs (the dashboard) for what killed them, then run again."
    )


def _lost(e: BaseException) -> bool:
    try:
        from distributed.client import FutureCancelledError
        from distributed.comm.core import CommClosedError
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(e, (CommClosedError, FutureCancelledError)) or "scheduler" in str(e).lower() and isinstance(e, (OSError, TimeoutError))


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


def _chunk_mib(eng: Mapping[str, Any], given: Any) -> Any:
    """The input's chunks: as given, else sized from the worker memory limit (a sixteenth of
    it per thread, 8-64 MiB), else volnorm's default (~64 MiB slabs)."""
    if given not in (None, "auto"):
        return given
    limit = eng.get("memory_limit")
    if isinstance(limit, (int, float)) and limit > 0:
        return int(min(64, max(8, limit / 16 / 2**20)))
    return None


def open_input(spec: Spec) -> xr.DataArray:
    """The spec's input as one lazy stack (volumes of different shapes are refused)."""
    import volnorm as vn

    inp = spec["input"]
    chunks = _chunk_mib(spec["engine"], inp.get("chunks"))
    if "nifti" in inp:
        data = vn.open_nifti(inp["nifti"], chunks=chunks)
    elif "images" in inp:
        data = vn.open_images(inp["images"], chunks=chunks if isinstance(chunks, (dict, tuple)) else None)
    else:
        data = vn.open_zarr(inp["store"])
    if isinstance(data, xr.DataTree):
        raise ValueError(f"{spec.source}: the inputs have different shapes; a pipeline needs volumes on one grid (register them first)")
    return data


def open_mask(path: str | os.PathLike) -> xr.DataArray:
    """A mask from a NIfTI file: non-zero voxels are inside (a leading volume of one is dropped)."""
    import volnorm as vn

    m = vn.open_nifti(path)
    if "volume" in m.dims:
        if m.sizes["volume"] != 1:
            raise ValueError(f"{path}: a mask is one volume")
        m = m.isel(volume=0, drop=True)
    return m != 0


def _mask(spec: Spec, data: xr.DataArray) -> xr.DataArray | None:
    import volnorm as vn

    m = spec.data.get("mask")
    if not m:
        return None
    if "file" in m:
        mask = open_mask(m["file"])
        spatial = {d: n for d, n in data.sizes.items() if d != "volume"}
        if dict(mask.sizes) != {d: n for d, n in spatial.items() if d in mask.dims} or set(mask.dims) - set(spatial):
            raise ValueError(f"{m['file']}: the mask's grid {dict(mask.sizes)} is not the input's {spatial}")
        return mask.drop_vars([c for c in mask.coords if c not in mask.dims])
    opts = dict(m["threshold"])
    method = opts.pop("method", "otsu")
    dim = opts.pop("dim", None)
    if dim == "volume":
        dim = tuple(d for d in data.dims if d != "volume")
    t = vn.threshold(data, method=method, dim=dim, **opts)
    return data > t


def _transformed(spec: Spec, data: xr.DataArray, mask: xr.DataArray | None, fitted: list | None, say: Callable[[str], None]) -> xr.DataArray:
    """Apply the steps: with saved parameters (a resumed run, ``params_from``) or fitting them."""
    from volnorm.steps import replay, run_steps

    if fitted is not None:
        return replay(data, fitted, mask=mask) if fitted else data
    out = data
    for st in spec["steps"]:
        t0 = time.perf_counter()
        out = run_steps(out, [(st["name"], dict(st["options"]))], mask=mask)
        say(f"  fit {st['name']}: {time.perf_counter() - t0:.1f} s")
    return out


def run(
    spec: str | os.PathLike | Mapping[str, Any],
    client: Any = None,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
) -> RunResult:
    """Run a pipeline spec (a YAML file, YAML text or a dict) to completion.

    Parameters
    ----------
    spec : path, YAML text or mapping
        Validated strictly before any data is read (:func:`volnorm.pipeline.load_spec`).
    client : distributed.Client, optional
        Run on this cluster; else the spec's ``engine`` (default: a local cluster on
        127.0.0.1 sized to the machine).
    dry_run : bool
        Print the plan (inputs, passes, outputs, memory per worker) and stop.
    overwrite : bool
        Replace outputs written by another spec or from other inputs.
    progress : bool, optional
        Progress bars (default: the spec's ``engine.progress`` when stderr is a terminal).
    echo : callable or None
        Where the plan and each pass's timing go (``print``; None: nowhere).

    Returns
    -------
    RunResult
        ``status`` "done", "up to date" (nothing to do) or "planned" (dry run).

    Examples
    --------
    >>> import volnorm as vn, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> spec = {"version": 1, "input": {"nifti": str(vn.datasets.nibabel_files()["anatomical.nii"])},
    ...         "steps": [{"rescale": {"percentiles": [1, 99]}}], "output": {"store": os.path.join(d, "out.zarr")},
    ...         "engine": {"scheduler": "threads"}}
    >>> vn.pipeline.run(spec, echo=None).status
    'done'
    >>> vn.pipeline.run(spec, echo=None).status   # the same spec again: nothing to do
    'up to date'
    """
    t_start, t_wall = time.perf_counter(), time.time()
    say = echo or (lambda _s: None)
    spec = load_spec(spec)
    p = plan(spec)
    done = _status(spec, p, overwrite)
    show = progress if progress is not None else (spec["engine"].get("progress", True) and sys.stderr.isatty())
    say(describe(p, done))
    if dry_run:
        return RunResult("planned", p, seconds=time.perf_counter() - t_start)
    wanted = [k for k in done if not done[k]]
    if not wanted:
        say("nothing to do: every output is up to date")
        return RunResult("up to date", p, skipped=list(done), seconds=time.perf_counter() - t_start)
    result = RunResult("done", p, skipped=[k for k in done if done[k]])
    staging = _lock_output(spec, p, done, overwrite)  # before the engine starts (a cluster takes seconds)
    try:
        with engine(spec["engine"], client) as where:
            say(f"running on {where}")
            try:
                _run(spec, p, done, result, overwrite, show, say, staging)
            except BaseException as e:
                poison = _poison(e, p, client if client is not None else _current_client(), since=t_wall)
                if poison is not None:
                    raise poison from e
                if _lost(e):
                    raise ClusterLostError(f"the cluster was lost during the run ({type(e).__name__}: {e}); run again.") from e
                raise
    except (ClusterLostError, PoisonInputError, RunStalledError, WorkerMemoryError) as e:
        kept = f" Committed before it stopped, and kept: {', '.join(result.written)}." if result.written else ""
        e.args = (f"{e.args[0]} Nothing incomplete was committed.{kept}",)
        raise
    finally:
        if staging is not None:
            staging.release()
    result.seconds = time.perf_counter() - t_start
    say(str(result))
    return result


def _lock_output(spec: Spec, p: dict, done: Mapping[str, bool], overwrite: bool) -> Any:
    """The output store's :class:`~volnorm.io.store.Staging`, its lock taken (None when the
    images are up to date): a second run on the same output is refused here, in a second,
    not after its cluster has started. Release it when the run ends."""
    if done.get("images", True):
        return None
    from volnorm.io.store import Staging

    staging = Staging(Path(spec["output"]["store"]), {"kind": "pipeline", "digest": p["digest"]}, overwrite=overwrite,
                      inputs=[Path(f) for f in p["files"]])
    staging.check_output()
    staging._acquire()
    return staging


def _run(spec: Spec, p: dict, done: dict, result: RunResult, overwrite: bool, show: bool, say: Callable[[str], None],
         staging: Any = None) -> None:
    import volnorm as vn
    from volnorm.io.store import read_manifest
    from volnorm.io.writers import write_staged
    from volnorm.steps import load_history

    outs = spec["outputs"]
    store = Path(spec["output"]["store"])
    data = open_input(spec)
    mask = _mask(spec, data)
    fitted = load_history(spec["params_from"]) if "params_from" in spec.data else None
    if not done.get("images", True):
        if staging is None:
            staging = _lock_output(spec, p, done, overwrite)
        try:
            staging._prepare(None)  # the lock is held since _lock_output: create or resume the staging group
            saved = staging.manifest().get("pipeline_fitted") if staging.resumed else None
            if saved is not None:
                say("  resuming: the fitted parameters of the interrupted run are reused")
            out = _transformed(spec, data, mask, saved if saved is not None else fitted, say)
            history = json.loads(out.attrs.get("volnorm_params", "[]"))
            staging.update_manifest(pipeline_fitted=history)
            t0 = time.perf_counter()
            along = _statistics_alongside(out, outs["statistics"], mask, p["digests"]["statistics"]) if "statistics" in outs and not done.get("statistics") else None
            write_staged(out, staging, codec=spec["output"]["codec"], steps=history, progress=show, statistics=along,
                         manifest={"pipeline": {"digest": p["digest"], "spec": spec.data, "source": spec.source, "inputs": p["files"]}})
            say(f"  write: {time.perf_counter() - t0:.1f} s -> {store}")
            result.written.append(str(store))
        finally:
            staging.release()
    if outs["images"]:  # the written images (opened only when read: 300 volumes take seconds), their steps
        output = functools.cache(lambda: vn.open_zarr(store))
        history = list((read_manifest(store) or {}).get("steps", []))
    else:  # statistics / params only: the transformed data, lazily
        out = _transformed(spec, data, mask, fitted, say)
        output = functools.cache(lambda: out)
        history = json.loads(out.attrs.get("volnorm_params", "[]"))
    if "voxel_histogram" in outs and not done.get("voxel_histogram"):
        _voxel_histogram(store, output(), outs["voxel_histogram"], mask, p, show, say)
        result.written.append(f"{store}/{outs['voxel_histogram']['name']}")
    if "statistics" in outs and not done.get("statistics"):
        rows = _written_statistics(store, p["digests"]["statistics"]) if outs["images"] else None
        path = _statistics(output if rows is None else None, outs["statistics"], mask, p["digests"]["statistics"], rows)
        say(f"  statistics -> {path}")
        result.written.append(str(path))
    if "params" in outs and not done.get("params"):
        path = Path(outs["params"])
        _atomic_write(path, json.dumps({"volnorm_params": p["digests"]["params"], "steps": history}, indent=1, default=str))
        result.written.append(str(path))


def _voxel_histogram(store: Path, data: xr.DataArray, opts: Mapping[str, Any], mask: Any, p: dict, show: bool, say: Callable[[str], None]) -> None:
    import zarr

    import volnorm as vn

    t0 = time.perf_counter()
    name = opts["name"]
    # a histogram of an earlier run of another spec is replaced (only a volnorm per-voxel
    # histogram, and only once the new one is complete: accumulate's overwrite rule)
    vn.accumulate(store, data, bins=opts["bins"], range=tuple(opts["range"]), mask=mask, name=name, progress=show, overwrite=True)
    g = zarr.open_group(store / name, mode="r+", zarr_format=3)
    g.attrs["pipeline_digest"] = p["digests"]["voxel_histogram"]
    say(f"  voxel histogram: {time.perf_counter() - t0:.1f} s -> {store / name}")


def _statistic_rows(s: Any, names: Sequence[str], qs: Sequence[float], digest_: str) -> list[dict[str, Any]]:
    """One dict per volume of a per-volume :class:`volnorm.stats.Summary`."""
    import numpy as np

    cols = ["count", "mean", "std", "min", "max", *(f"q{q:g}" for q in qs)]
    values = {c: np.atleast_1d(s[c].values) for c in cols}
    return [
        {"volume": str(name), **{c: (int if c == "count" else float)(values[c][i]) for c in cols}, "digest": digest_}
        for i, name in enumerate(names)
    ]


def _names(data: xr.DataArray) -> list[str]:
    import numpy as np

    return [str(v) for v in np.atleast_1d(data["volume"].values)] if "volume" in data.coords else [str(i) for i in range(data.sizes.get("volume", 1))]


def _statistics_alongside(data: xr.DataArray, opts: Mapping[str, Any], mask: Any, digest_: str) -> Any:
    """The statistics output computed with the write, batch by batch (the output is made once
    and not read back): for 8/16-bit integer outputs, whose quantiles need no other pass.
    None otherwise (float outputs: the statistics pass reads the written store)."""
    from volnorm.stats import summary_graph

    if not (data.dtype.kind in "iub" and data.dtype.itemsize <= 2):
        return None
    qs = list(opts["quantiles"])
    spatial = tuple(d for d in data.dims if d != "volume")

    def along(batch: xr.DataArray, index: Any) -> tuple[list, Callable[[Sequence[Any]], list[dict]]]:
        m = mask.isel(volume=index) if isinstance(mask, xr.DataArray) and "volume" in mask.dims else mask
        lazy, finish = summary_graph(batch, dim=spatial, mask=m, quantiles=qs)
        return lazy, lambda values: _statistic_rows(finish(values), _names(batch), qs, digest_)

    return along


def _written_statistics(store: Path, digest_: str) -> list[dict[str, Any]] | None:
    """The per-volume statistics a write kept with the volumes (this spec's, every volume's),
    else None."""
    import zarr

    from volnorm.io.store import read_manifest

    m = read_manifest(store) or {}
    if m.get("kind") == "images":
        rows = list(m.get("volume_statistics", []))
        if len(rows) != len(m.get("volumes", [])):
            return None
    else:
        root = zarr.open_group(store, mode="r", zarr_format=3)
        rows = [root[name].attrs.get("volnorm", {}).get("statistics") for name in m.get("volumes", [])]
    if not rows or any(not r or r.get("digest") != digest_ for r in rows):
        return None
    return rows


def _statistics(output: Callable[[], xr.DataArray] | None, opts: Mapping[str, Any], mask: Any, digest_: str, rows: list[dict] | None = None) -> Path:
    """Per-volume count, mean, std, min, max and quantiles (inside the mask), as JSON or CSV:
    the ``rows`` computed with the write, else :func:`volnorm.summarize` of ``output()`` (memory
    bounded by the chunks, not the number of volumes)."""
    import volnorm as vn

    qs = list(opts["quantiles"])
    if rows is None:
        data = output()
        spatial = tuple(d for d in data.dims if d != "volume")
        rows = _statistic_rows(vn.summarize(data, dim=spatial, mask=mask, quantiles=qs), _names(data), qs, digest_)
    rows = [{k: v for k, v in r.items() if k != "digest"} for r in rows]
    path = Path(opts["path"])
    if path.suffix == ".csv":
        cols = list(rows[0])
        text = f"# volnorm statistics {digest_}\n" + ",".join(cols) + "\n" + "\n".join(",".join(repr(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols) for r in rows) + "\n"
    else:
        text = json.dumps({"volnorm_statistics": digest_, "volumes": rows}, indent=1)
    _atomic_write(path, text)
    return path


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: the output's parent directory does not exist")
    tmp = path.with_name(f".{path.name}.volnorm-tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
