"""Starting clusters: the embedded local one (loopback only) and batch-job / Kubernetes ones."""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import dask
import dask.system

logger = logging.getLogger(__name__)

#: dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker. Setting glibc's
#: trim, top-pad or mmap variables turns off its adaptive mmap threshold, so every
#: large buffer becomes a fresh mmap (page faults on every chunk); measured
#: 2.7-3.7x slower histogram passes here (DESIGN.md). We keep those defaults.
#: MALLOC_ARENA_MAX does not touch the threshold: it bounds the arenas a worker's
#: threads (task thread, background writer, zarr's I/O pool, the event loop) spread
#: their buffers over, where freed memory of one arena was not reused by another:
#: peak worker RSS on a 28 GB cohort 581-651 MiB with glibc's default (8 arenas per
#: core), 550-579 MiB with 2 (benchmarks/README.md, bench_scale).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}

#: Seconds between two ``malloc_trim(0)`` in the workers volnorm starts (:class:`HeapTrim`).
HEAP_TRIM_INTERVAL = 1.0

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object  # type: ignore[assignment,misc]


class HeapTrim(WorkerPlugin):  # type: ignore[misc,valid-type]
    """Give the worker's freed heap memory back to the system every ``interval`` seconds
    (glibc's ``malloc_trim(0)``; a no-op elsewhere).

    With glibc's adaptive mmap threshold (kept: see :data:`WORKER_ENV`) a chunk-sized buffer
    comes from the heap, and the heap only shrinks from its top: the pages freed between
    small objects that live on stay counted in the worker's memory, which then grows with the
    run's length rather than its work. ``malloc_trim(0)`` releases every free page of every
    arena and leaves the threshold alone. Measured on 800 volumes of 64x64x48 through the
    normalize workflow: peak worker RSS 290 MiB without, 274 MiB with (262 MiB on 50 volumes);
    at 28 GB see ``benchmarks/README.md`` (bench_scale). Registered on the clusters volnorm
    starts (local, SLURM/PBS, Kubernetes), not on a scheduler given by address.

    Parameters
    ----------
    interval : float
        Seconds between two trims.

    Examples
    --------
    >>> client.register_plugin(HeapTrim())  # doctest: +SKIP
    """

    name = "volnorm-heap-trim"

    def __init__(self, interval: float = HEAP_TRIM_INTERVAL) -> None:
        self.interval = float(interval)
        self._callback: Any = None

    def setup(self, worker: Any) -> None:
        trim = _malloc_trim()
        if trim is None:
            return
        from tornado.ioloop import PeriodicCallback

        self._callback = PeriodicCallback(lambda: trim(0), self.interval * 1000)
        self._callback.start()

    def teardown(self, worker: Any) -> None:
        if self._callback is not None:
            self._callback.stop()


class QuietClose(WorkerPlugin):  # type: ignore[misc,valid-type]
    """Drop the one error a closing worker logs about itself: a heartbeat in flight when its
    own connection pool closes ("Failed to communicate with scheduler during heartbeat",
    ``CommClosedError: ConnectionPool closing``, a distributed race at shutdown). It printed a
    traceback at the end of a successful ``volnorm stats``; the same message from a worker
    that is not closing (a scheduler really gone) is kept. Registered where :class:`HeapTrim` is.

    Examples
    --------
    >>> client.register_plugin(QuietClose())  # doctest: +SKIP
    """

    name = "volnorm-quiet-close"

    def setup(self, worker: Any) -> None:
        def closing_heartbeat(record: logging.LogRecord) -> bool:
            heartbeat = record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")
            return not (heartbeat and str(getattr(worker, "status", "")).endswith(("closing", "closed", "closing_gracefully")))

        # kept until the process ends (not removed at teardown: the heartbeat races it)
        logging.getLogger("distributed.worker").addFilter(closing_heartbeat)


@contextlib.contextmanager
def eager_roots(client: Any) -> Iterator[bool]:
    """Inside the block, the scheduler of a cluster volnorm started sends every ready root task
    to the workers at once (``distributed.scheduler.worker-saturation: inf``) instead of ~1.1
    per thread; yields whether it did. For passes whose root tasks are fused chains that end
    small (read, transform, write, count: the pipeline's fit and write passes).

    With one thread per worker, dask's default makes each task wait for a round trip to the
    scheduler before the next root task reaches the worker. Measured at 28 GB
    (``benchmarks/README.md``, bench_scale): end-to-end 112-120 s against 134-136 s. Not
    cluster-wide: graphs whose root tasks feed a large combine (per-voxel histograms) would
    read ahead of it and hold more memory (dask's "root task overproduction"). A scheduler
    volnorm did not start (a client or an address given to it, shared with others) is not
    changed; nor is one without ``client`` (threads).

    Parameters
    ----------
    client : distributed.Client or None
        The engine's client.

    Yields
    ------
    bool
        Whether the setting was changed (and is put back on exit).

    Examples
    --------
    >>> with eager_roots(None) as changed:
    ...     changed
    False
    """
    before = None
    if client is not None:
        before = client.run_on_scheduler(_set_saturation, float("inf"))
    try:
        yield before is not None
    finally:
        if before is not None:
            with contextlib.suppress(Exception):  # the cluster may be gone: nothing to put back
                client.run_on_scheduler(_set_saturation, before)


def _set_saturation(value: float, dask_scheduler: Any = None) -> float | None:
    """Runs on the scheduler: set ``WORKER_SATURATION`` if volnorm started the cluster (its
    workers get :class:`HeapTrim`); the value before, or None when not changed."""
    if HeapTrim.name not in getattr(dask_scheduler, "worker_plugins", {}):
        return None
    before = float(dask_scheduler.WORKER_SATURATION)
    dask_scheduler.WORKER_SATURATION = float(value)
    return before


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask and a container's CPU quota (dask's
    count), not every CPU of the machine (a SLURM job or a Kubernetes pod gets a share).

    Returns
    -------
    int
        ``dask.system.CPU_COUNT``, at least 1.

    Examples
    --------
    >>> import os
    >>> 1 <= usable_cpus() <= os.cpu_count()
    True
    """
    return max(1, int(dask.system.CPU_COUNT))


def local_cluster(n_workers: int | None = None, *, threads_per_worker: int = 1, memory_limit: str | float | None = "auto") -> Any:
    """Start the embedded default cluster (loopback only) and return a ``Client``.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: :func:`usable_cpus`).
    threads_per_worker : int
        Threads in each worker process.
    memory_limit : str, float or None
        ``memory_limit`` is per worker (dask's ``"auto"``: the machine's memory shared out);
        a worker pauses at 80% of it and is restarted at 95% (dask's thresholds). As dask's
        ``LocalCluster`` takes it: ``"auto"``, a size such as ``"4GB"``, a fraction of the
        machine's memory, or ``None`` (no limit).

    Returns
    -------
    distributed.Client
        A client of a new ``LocalCluster``, not set as dask's default; close the client, then
        ``client.cluster``.

    Examples
    --------
    >>> client = local_cluster(1)          # doctest: +SKIP
    >>> client.close(); client.cluster.close()   # doctest: +SKIP
    """
    from distributed import Client, LocalCluster

    n = n_workers or usable_cpus()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": dict(WORKER_ENV)}), _workers_ignore_sigint():
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            # loopback only; a random port so several clusters can coexist
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
            memory_limit=memory_limit,
        )
    client = Client(cluster, set_as_default=False)
    client.register_plugin(HeapTrim())
    client.register_plugin(QuietClose())
    return client


def import_keeping_sigint(name: str) -> Any:
    """Import ``name``, then put back the SIGINT handler it may have replaced: dask-jobqueue
    (0.9) sets ``sys.exit`` as the handler when imported, which would turn Ctrl-C and the
    pipeline watchdog's wake-up into a bare ``SystemExit``.

    Parameters
    ----------
    name : str
        The module's dotted name, as ``importlib.import_module`` takes it.

    Returns
    -------
    module
        The imported module. The handler is put back only when called from the main thread.

    Examples
    --------
    >>> import signal
    >>> before = signal.getsignal(signal.SIGINT)
    >>> import_keeping_sigint("json").__name__, signal.getsignal(signal.SIGINT) is before
    ('json', True)
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return importlib.import_module(name)
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


#: ``pip install volnorm[NAME]`` for each job cluster kind.
JOB_EXTRAS = {"slurm": "jobqueue", "pbs": "jobqueue", "kubernetes": "kubernetes"}


def job_cluster(kind: str, options: dict[str, Any] | None = None) -> Any:
    """A dask cluster whose workers are batch jobs (``"slurm"``, ``"pbs"``: dask-jobqueue) or
    Kubernetes pods (``"kubernetes"``: the dask-kubernetes operator). Nothing is submitted
    until the cluster is scaled. The libraries are optional extras, imported only here.

    SLURM/PBS: one single-threaded worker process per core of each job (as the local
    cluster), numpy's threads at 1, TLS between scheduler and workers with temporary
    certificates (``security=True``; the workers' half goes to ``shared_temp_directory``,
    which the compute nodes must see). ``options`` go to ``SLURMCluster``/``PBSCluster``
    (``cores``, ``memory``, ``walltime``, ``queue``, ``account``, ...) and override these
    defaults. Kubernetes: ``options`` go to ``dask_kubernetes.operator.make_cluster_spec``
    (``image``, ``resources``, ``env``, ...); the operator does not set up TLS.

    Parameters
    ----------
    kind : {"slurm", "pbs", "kubernetes"}
        The batch system or Kubernetes.
    options : dict, optional
        Keyword arguments for the cluster (see above); for SLURM/PBS they override the defaults.

    Returns
    -------
    dask_jobqueue.SLURMCluster, dask_jobqueue.PBSCluster or dask_kubernetes.operator.KubeCluster
        The cluster; connect a ``distributed.Client`` to it and scale it (``cluster.scale``).

    Examples
    --------
    >>> cluster = job_cluster("slurm", {"cores": 8, "memory": "32GB", "walltime": "02:00:00"})  # doctest: +SKIP
    >>> cluster.scale(jobs=4)  # doctest: +SKIP
    """
    opts = dict(options or {})
    extra = JOB_EXTRAS.get(kind)
    if extra is None:
        raise ValueError(f"unknown job cluster {kind!r}; expected one of {', '.join(JOB_EXTRAS)}")
    try:
        if kind == "kubernetes":
            from dask_kubernetes.operator import KubeCluster, make_cluster_spec
        else:
            dask_jobqueue = import_keeping_sigint("dask_jobqueue")
    except ImportError as e:
        raise ImportError(f"engine.scheduler {kind!r} needs the optional extra: pip install 'volnorm[{extra}]' ({e})") from None
    if kind == "kubernetes":
        env = {**WORKER_ENV, **opts.pop("env", {})}
        spec = make_cluster_spec(name=opts.pop("name", "volnorm"), env=env, **opts)
        return KubeCluster(custom_cluster_spec=spec)
    cores = int(opts.get("cores", 1))
    defaults: dict[str, Any] = {
        "cores": cores,
        "processes": cores,  # one single-threaded worker per core, as the local cluster
        "memory": "4GB",
        "job_name": "volnorm-worker",
        "job_script_prologue": [f"export {k}={v}" for k, v in WORKER_ENV.items()],
        "security": True,
    }
    if opts.get("security") is False:  # dask-jobqueue's "no TLS" is None
        opts["security"] = None
    cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
    return cls(**{**defaults, **opts})


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Spawn worker processes with SIGINT ignored (the disposition survives exec).

    Ctrl-C in a terminal goes to the whole process group: the workers would
    each print a traceback. Only the main process should handle it (the CLI
    says how to resume) and then close the cluster.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
