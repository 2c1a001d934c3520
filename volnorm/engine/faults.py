"""When a run goes wrong on a cluster: stalls (the watchdog), lost clusters, killed workers.

The errors say what happened in words a user can act on: which workers paused on
memory, which input the killed tasks read, what to change before running again.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dask.utils import format_bytes

try:
    from distributed.diagnostics.plugin import SchedulerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    SchedulerPlugin = object  # type: ignore[assignment,misc]

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



def format_size(n: Any) -> str:
    """``n`` bytes for people (dask's units), or ``str(n)`` when it is not a number.

    Examples
    --------
    >>> format_size(3 * 2**20), format_size(None)
    ('3.00 MiB', 'None')
    """
    return format_bytes(int(n)) if isinstance(n, (int, float)) else str(n)


def scheduler_state(dask_scheduler: Any = None) -> dict[str, Any]:
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


def stall_message(state: Mapping[str, Any], timeout: float) -> str:
    """Why a run stalled, from :func:`scheduler_state`: the paused workers and those near their
    memory limit (then memory is the cause), else the stuck workers and their tasks.

    Examples
    --------
    >>> w = {"address": "tcp://127.0.0.1:1", "status": "running", "memory": 300 * 2**20, "limit": 4 * 2**30,
    ...      "processing": ["('read-1', 0)"], "n_processing": 1}
    >>> print(stall_message({"tasks": 5, "paused": [], "workers": [w]}, 600))  # doctest: +NORMALIZE_WHITESPACE
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
        return f"{format_size(w['memory'])} of {format_size(w['limit'])}" if w.get("limit") else "no memory limit"

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
    paused or near its limit, the stuck workers and their tasks (:func:`stall_message`)."""
    stop = threading.Event()
    stalled: list[dict[str, Any]] = []
    with contextlib.suppress(Exception):  # best effort: a scheduler without volnorm cannot load it
        if not client.run_on_scheduler(has_plugin, ErredSources.name):
            client.register_plugin(ErredSources(), name=ErredSources.name)

    def loop() -> None:
        last, since = None, time.monotonic()
        while not stop.wait(poll):
            try:
                state = client.run_on_scheduler(scheduler_state)
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
            raise RunStalledError(stall_message(stalled[0], timeout)) from None
        raise
    finally:
        stop.set()


def current_client() -> Any:
    """The ``distributed.Client`` the graphs of this block run on (``engine`` makes it current), or None."""
    try:
        from distributed import Client

        return Client.current(allow_global=False)
    except (ImportError, ValueError):
        return None


def sources_of(scheduler: Any, key: Any, limit: int = 500) -> list[str]:
    """On the scheduler: the NIfTI files read by task ``key`` and the tasks it depends on (up to
    ``limit`` tasks), found in their specs (a ``NiftiArray`` carries its file)."""
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


class ErredSources(SchedulerPlugin):  # type: ignore[misc,valid-type]
    """A scheduler plugin: when a task errs (e.g. ``KilledWorker``), record the input files it
    reads while the scheduler still holds it (the client forgets it as the error propagates)."""

    name = "volnorm-erred-sources"

    def __init__(self) -> None:
        self.sources: dict[str, list[str]] = {}
        self.when: dict[str, float] = {}
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "erred" and self.scheduler is not None and len(self.sources) < 1000:
            try:
                self.sources[str(key)] = sources_of(self.scheduler, key)
                self.when[str(key)] = time.time()
            except Exception:  # noqa: BLE001 - never disturb the scheduler
                pass


def erred_inputs(since: float | None = None, dask_scheduler: Any = None) -> list[str]:
    """Runs on the scheduler: the inputs of every task that erred (since ``since``, a
    ``time.time()``) and reads exactly one input, as :class:`ErredSources` recorded them: the
    other victims of the same worker deaths."""
    plugin = getattr(dask_scheduler, "plugins", {}).get(ErredSources.name)
    when = getattr(plugin, "when", {})
    return sorted({
        s[0] for k, s in getattr(plugin, "sources", {}).items()
        if len(s) == 1 and (since is None or when.get(k, 0.0) >= since - 1)
    })


def has_plugin(name: str, dask_scheduler: Any = None) -> bool:
    """Runs on the scheduler: whether a plugin of that name is registered."""
    return name in getattr(dask_scheduler, "plugins", {})


def task_sources(key: Any, dask_scheduler: Any = None) -> list[str]:
    """Runs on the scheduler: the input files of task ``key``, as :class:`ErredSources`
    recorded them when it erred, else from the task if the scheduler still holds it."""
    key = tuple(key) if isinstance(key, list) else key
    plugin = getattr(dask_scheduler, "plugins", {}).get(ErredSources.name)
    recorded = getattr(plugin, "sources", {}).get(str(key))
    return list(recorded) if recorded is not None else sources_of(dask_scheduler, key)


#: Layers after which a block's first index is no longer the volume (slices, rechunks, reductions' later stages).
NOT_PER_VOLUME = ("getitem", "rechunk", "aggregate", "combine", "concatenate", "transpose", "reshape", "finalize")


def key_inputs(key: Any, p: Mapping[str, Any]) -> list[str]:
    """The inputs a task key names, from how volnorm's graphs name their keys: a NIfTI reader's
    block is ``("nifti-<file stem>-<token>", z, y, x)``; a block of the stack (and of the
    element-wise and per-block steps fused with it: ``"...-stack-..."``) is ``(name, volume,
    ...)``, one volume per block. Anything else (a reduction's later stages, a slice, a
    ``finalize``) is not tied to one input: empty.

    Examples
    --------
    >>> p = {"inputs": {"kind": "nifti"}, "files": ["/d/sub-001.nii", "/d/sub-002.nii.gz"]}
    >>> key_inputs(("nifti-sub-002-" + "a" * 32, 0, 1, 0), p), key_inputs(("nifti-original-stack-sum-" + "b" * 32, 0, 0, 0, 0, 0), p)
    (['/d/sub-002.nii.gz'], ['/d/sub-001.nii'])
    >>> key_inputs("clip-getitem-" + "c" * 32 + "-finalize-" + "d" * 32, p), key_inputs(("nifti-stack-getitem-" + "e" * 32, 1, 0), p)
    ([], [])
    """
    files = [str(f) for f in p.get("files", [])]
    if p.get("inputs", {}).get("kind") != "nifti" or not isinstance(key, tuple) or not key or not isinstance(key[0], str):
        return []
    name = key[0]
    m = re.fullmatch(r"nifti-(.+)-[0-9a-f]{32}", name)
    if m and "-stack" not in name and len(key) <= 4:
        stem = m.group(1)
        return [f for f in files if re.sub(r"\.nii(\.gz)?$", "", Path(f).name) == stem]
    after = name.split("stack", 1)[1] if "stack" in name else None
    if after is not None and not any(w in after for w in NOT_PER_VOLUME) and len(key) > 1 and isinstance(key[1], int) and 0 <= key[1] < len(files):
        return [files[key[1]]]
    return []


def memory_facts(client: Any, e: Any, since: float | None) -> tuple[int | None, bool]:
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


def poison(e: BaseException, p: Mapping[str, Any], client: Any = None, since: float | None = None) -> RuntimeError | None:
    """A ``KilledWorker`` as what it most likely is, for people.

    Memory (:class:`WorkerMemoryError`), when the workers' memory limit is small for the plan's
    per-worker estimate (``p["memory"]`` above the pause threshold, 0.8 x the limit) or a worker
    was restarted for exceeding its memory budget (the nanny's ``worker-restart-memory``
    event). Otherwise a :class:`PoisonInputError` naming the input the task reads: found in the
    task's spec on the scheduler (the NIfTI reader it holds), else from its key
    (:func:`key_inputs`); a task that reads several inputs, or none, blames none of them.
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
            sources = list(client.run_on_scheduler(task_sources, key))
        except Exception:  # noqa: BLE001 - the scheduler may be gone: fall back on the key
            sources = []
    if not sources:
        sources = key_inputs(key, p)
    times = e.allowed_failures + 1
    if len(sources) == 1:
        where, what = sources[0], f"while processing {sources[0]}"
    elif sources:
        shown = ", ".join(Path(s).name for s in sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
        where, what = "several inputs", f"while combining {len(sources)} inputs ({shown})"
    else:
        where, what = "a task", "on a task that is not tied to one input"
    limit, restarted = memory_facts(client, e, since)
    estimate = p.get("memory")
    small = bool(limit and estimate and estimate > 0.8 * limit)
    if small or restarted:
        why = []
        if restarted:
            why.append("a worker was restarted for exceeding its memory budget")
        if small:
            why.append("the estimate is above the pause threshold (0.8 x the limit)")
        return WorkerMemoryError(
            f"workers ran out of memory (limit {format_size(limit) if limit else 'unknown'}, estimate {format_size(estimate) if estimate else 'unknown'} "
            f"per worker; {' and '.join(why)}): raise engine.memory_limit or set smaller input.chunks. "
            f"They were killed {times} times {what} (task {key!r}); the input is probably fine."
        )
    if len(sources) == 1:
        # a worker's death counts against every task it held, running or queued: another
        # input's task on the same worker can reach the limit first, or with the culprit
        others: list[str] = []
        if client is not None:
            try:
                others = [f for f in client.run_on_scheduler(erred_inputs, since) if f not in sources]
            except Exception:  # noqa: BLE001 - the scheduler may be gone
                others = []
        also = ""
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            also = f"; tasks of {shown} were on the same workers when they died, so it may be {'that one' if len(others) == 1 else 'one of those'} instead"
        return PoisonInputError(
            f"{where}: workers were killed {times} times while processing it (task {key!r}){also}; "
            + (f"the memory limit ({format_size(limit)}) is above the estimate ({format_size(estimate) if estimate else 'unknown'}) and " if limit else "")
            + "no worker was restarted for exceeding its memory budget, so the file may crash its reader: "
            "check or remove that input and run again."
        )
    return PoisonInputError(
        f"workers were killed {times} times {what} (task {key!r}); neither the memory limit "
        f"({format_size(limit) if limit else 'unknown'}, estimate {format_size(estimate) if estimate else 'unknown'}) nor the workers' "
        "restarts point at memory: look at the workers' logs (the dashboard) for what killed them, then run again."
    )


def is_lost(e: BaseException) -> bool:
    try:
        from distributed.client import FutureCancelledError
        from distributed.comm.core import CommClosedError
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(e, (CommClosedError, FutureCancelledError)) or "scheduler" in str(e).lower() and isinstance(e, (OSError, TimeoutError))

