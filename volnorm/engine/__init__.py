"""Where work runs: the one place that turns a scheduler word into a running engine.

Every command, :func:`volnorm.pipeline.run` and :func:`volnorm.convert` go through
:func:`running`; library functions (``vn.histogram`` ...) use whatever dask scheduler
is active, as dask does. The words, the same in Python, on the command line and in a
spec's ``engine.scheduler``:

- ``"local"`` (the default, unless ``$VOLNORM_SCHEDULER`` names another): a new local
  ``distributed`` cluster of one single-threaded worker process per usable core, bound
  to 127.0.0.1 (dask's own default binds to every interface), closed on exit;
- ``"threads"`` / ``"sync"``: dask's thread pool / this thread (no start-up cost);
- an address ``tcp://host:8786`` / ``tls://host:8786``: that scheduler (a plain
  ``tcp://`` one only on this machine unless ``allow_insecure``: :func:`check_address`);
- ``"slurm"``, ``"pbs"``, ``"kubernetes"``: workers as batch jobs or pods
  (:func:`job_cluster`);
- a ``distributed.Client``: used as it is (not closed).

Inside a :func:`running` block, ``running(None)`` (and so ``vn.convert(...)``,
``to_zarr(..., progress=True)``) uses the block's engine instead of starting another.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import dask
from dask.diagnostics import ProgressBar

from volnorm.engine.address import ENCRYPTED_SCHEMES, InsecureSchedulerError, check_address, is_loopback
from volnorm.engine.clusters import JOB_EXTRAS, WORKER_ENV, HeapTrim, QuietClose, eager_roots, import_keeping_sigint, job_cluster, local_cluster, usable_cpus
from volnorm.engine.faults import ClusterLostError, RunStalledError, is_lost, watchdog

logger = logging.getLogger(__name__)

#: How a block selects a ``distributed.Client`` for the graphs computed inside it: the client is
#: made current (``client.as_current()``) and dask's config names only this string. Putting the
#: client itself into dask's config broke the nannies of a local cluster: a nanny restarting a
#: killed worker pickles dask's config for the new process, and a Client does not pickle.
DISTRIBUTED = "dask.distributed"

#: The scheduler words that are not addresses.
WORDS = ("local", "threads", "sync")
#: Words that start workers through a batch system or Kubernetes (optional extras).
JOB_CLUSTERS = tuple(JOB_EXTRAS)
#: The environment variable that sets the default scheduler word (else ``"local"``).
ENV_VAR = "VOLNORM_SCHEDULER"

__all__ = [
    "DISTRIBUTED", "ENCRYPTED_SCHEMES", "compute_small", "ENV_VAR", "JOB_CLUSTERS", "WORDS", "ClusterLostError", "Engine", "Executor",
    "InsecureSchedulerError", "RunStalledError", "WORKER_ENV", "check_address", "check_scheduler", "compute", "current",
    "dask_scheduler", "default_scheduler", "eager_roots", "executor", "import_keeping_sigint", "is_loopback", "job_cluster",
    "local_cluster", "progress_bar", "running", "usable_cpus",
]

_ADDRESS = re.compile(r"[a-z][a-z0-9+]*://\S+")


def check_scheduler(value: Any, what: str = "--scheduler") -> Any:
    """The one check of a scheduler word (command line, spec, Python): return it, or raise.

    Parameters
    ----------
    value : str or distributed.Client
        A word of :data:`WORDS` or :data:`JOB_CLUSTERS`, an address with a scheme, or a client.
    what : str
        Where the value comes from, the start of the message (``"--scheduler"``; ``""``: none).

    Returns
    -------
    str or distributed.Client
        ``value``.

    Raises
    ------
    ValueError
        Naming ``what``, the words and the value.

    Examples
    --------
    >>> check_scheduler("threads")
    'threads'
    >>> check_scheduler("thread")
    Traceback (most recent call last):
    ...
    ValueError: --scheduler: expected 'local', 'threads', 'sync', 'slurm', 'pbs', 'kubernetes' or an address tcp://host:port / tls://host:port; got 'thread'
    """
    if isinstance(value, str):
        if value in WORDS or value in JOB_CLUSTERS or _ADDRESS.fullmatch(value):
            return value
    elif value is not None and hasattr(value, "scheduler"):  # a distributed.Client
        return value
    words = ", ".join(repr(w) for w in (*WORDS, *JOB_CLUSTERS))
    raise ValueError(f"{what + ': ' if what else ''}expected {words} or an address tcp://host:port / tls://host:port; got {value!r}")


def default_scheduler() -> str:
    """The scheduler word used when none is given: ``$VOLNORM_SCHEDULER``, else ``"local"``.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        When the environment variable holds no scheduler word.

    Examples
    --------
    >>> import os
    >>> default_scheduler() == (os.environ.get("VOLNORM_SCHEDULER") or "local")
    True
    """
    return check_scheduler(os.environ.get(ENV_VAR) or "local", f"${ENV_VAR}")


class _Sync(cf.Executor):
    """Runs each task when submitted, in this thread (for debugging and tests)."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:  # type: ignore[override]
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            fut.set_exception(e)
        return fut


class Executor:
    """A thin uniform face over a ``distributed.Client`` or a ``concurrent.futures`` pool
    (``submit``, ``as_completed``); :func:`executor` makes one.

    Examples
    --------
    >>> import concurrent.futures as cf
    >>> with cf.ThreadPoolExecutor(1) as pool:
    ...     Executor(pool, "1 thread").submit(pow, 2, 10).result()
    1024
    """

    def __init__(self, backend: Any, description: str) -> None:
        self.backend = backend
        self.description = description
        self.distributed = not isinstance(backend, cf.Executor)

    def submit(self, fn: Callable, *args: Any, key: str | None = None) -> Any:
        if self.distributed:
            return self.backend.submit(fn, *args, key=key, pure=False, retries=0)
        return self.backend.submit(fn, *args)

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        if self.distributed:
            from distributed import as_completed

            return iter(as_completed(list(futures), loop=self.backend.loop))
        return cf.as_completed(list(futures))

    def __repr__(self) -> str:
        return f"<Executor {self.description}>"


class Engine:
    """Where the graphs of a :func:`running` block run; started on first use.

    A cluster starts (or a scheduler is connected) when the block's first graph runs, or when
    :attr:`description`, :attr:`client`, :attr:`executor` or :meth:`compute` is first asked
    for: a command that fails on its input never starts one.

    Attributes
    ----------
    scheduler : str
        The word or address it was asked for (``"client"`` for a given client).
    progress : bool
        Show progress bars by default.

    Examples
    --------
    >>> with running("sync") as eng:
    ...     eng.description, eng.compute(dask.delayed(sum)([1, 2]))
    ('synchronous (this thread)', [3])
    """

    def __init__(self, scheduler: str, start: Callable[[], contextlib.AbstractContextManager], progress: bool = False,
                 stall_timeout: float | None = None, on_start: Callable[[str], None] | None = None) -> None:
        self.scheduler = scheduler
        self.progress = progress
        self._start = start
        self._stall_timeout = stall_timeout
        self._on_start = on_start
        self._stack = contextlib.ExitStack()
        self._started = False
        self._description = ""
        self._client: Any = None
        self._pool: cf.Executor | None = None

    def start(self) -> Engine:
        """Start the cluster (connect to the scheduler) now, if not yet; returns the engine."""
        if not self._started:
            self._started = True
            self._description, self._client = self._stack.enter_context(self._start())
            if self._client is not None:
                self._stack.enter_context(self._client.as_current())
                if self._stall_timeout:
                    self._stack.enter_context(watchdog(self._client, self._stall_timeout))
            if self._on_start is not None:
                self._on_start(self._description)
        return self

    @property
    def started(self) -> bool:
        """Whether the engine was started (a cluster is up, a scheduler connected)."""
        return self._started

    @property
    def description(self) -> str:
        """Where, for people: ``"2 threads"``, ``"local cluster, 2 workers on 127.0.0.1 (dashboard ...)"``."""
        return self.start()._description

    @property
    def client(self) -> Any:
        """The cluster's ``distributed.Client`` (None for ``"threads"`` / ``"sync"``)."""
        return self.start()._client

    @property
    def distributed(self) -> bool:
        """Whether a ``distributed`` cluster runs the graphs."""
        return self.client is not None

    @property
    def executor(self) -> Executor:
        """An :class:`Executor` submitting plain function calls to the same place."""
        if self.client is not None:
            return Executor(self.client, self.description)
        if self._pool is None:
            self._pool = _Sync() if self.scheduler == "sync" else cf.ThreadPoolExecutor(usable_cpus())
        return Executor(self._pool, self.description)

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """dask's scheduler interface: run a graph here (dask calls it through :func:`dispatch`)."""
        client = self.client
        if client is not None:
            return client.get(dsk, keys, **kwargs)
        return dask.base.named_schedulers[self.scheduler](dsk, keys, **kwargs)

    def compute(self, *targets: Any, progress: bool | None = None) -> list:
        """``dask.compute(*targets)`` here, as a list, with a progress bar on stderr when asked
        (default: the engine's ``progress``): dask's for threads/sync, distributed's for a cluster."""
        show = self.progress if progress is None else progress
        client = self.client
        if client is not None:
            return _on_client(client, targets, show)
        with ProgressBar(minimum=1.0, out=sys.stderr) if show else contextlib.nullcontext():
            return list(dask.compute(*targets, scheduler=self.get))

    def close(self, error: BaseException | None = None) -> None:
        """Stop what was started here. ``error``: the block ended with it; a pool's waiting tasks
        are dropped and the engine's own contexts see it (the watchdog turns the SIGINT it sent
        into :class:`RunStalledError`, raised from here)."""
        if self._pool is not None:
            # interrupted or failed: the tasks not started are dropped (the running ones, which
            # cannot be stopped, finish), instead of running every task left
            self._pool.shutdown(wait=True, cancel_futures=error is not None)
        if error is None:
            self._stack.close()
        else:
            self._stack.__exit__(type(error), error, error.__traceback__)

    def __repr__(self) -> str:
        return f"<Engine {self._description if self._started else self.scheduler + ' (not started)'}>"


def compute_small(*targets: Any) -> tuple:
    """``dask.compute(*targets)`` for small graphs run many times (a 1-byte histogram, a pick
    pass): without graph optimization on dask's local schedulers, where optimizing costs more
    than it saves; optimized on a cluster like every other graph, because the scheduler must see
    one spec per key: the same collection's keys sent once optimized (fused into an alias) and
    once not make ``distributed`` warn "Detected different `run_spec`" (dask#9888), seen on
    3 of 7 ordinary ``volnorm run`` on a local cluster before this rule.

    Parameters
    ----------
    targets : dask collections
        What to compute.

    Returns
    -------
    tuple
        The computed values, as ``dask.compute`` returns them.

    Examples
    --------
    >>> import dask.array as da
    >>> [float(v) for v in compute_small(da.ones(4, chunks=2).sum())]
    [4.0]
    """
    eng = current()
    if eng is not None:
        on_cluster = eng.client is not None  # the graph runs now: starting the engine is no waste
    else:
        on_cluster = dask.config.get("scheduler", None) in (None, DISTRIBUTED) and _active_client() is not None
    return dask.compute(*targets, optimize_graph=on_cluster)


def progress_bar(total: float, desc: str, *, show: bool = True, unit: str = "B") -> Any:
    """The progress bar of work that is not a dask graph (one future per file): tqdm on stderr,
    in bytes by default; with ``show=False`` a bar that prints nothing. Use it as a context manager.

    Parameters
    ----------
    total : float
        The amount of work (bytes, files ...).
    desc : str
        What is done, shown before the bar.
    show : bool
        Print the bar (else a silent one).
    unit : str
        The unit of ``total`` (``"B"``: scaled to KiB, MiB ...).

    Returns
    -------
    tqdm.tqdm
        Call ``update(n)`` as work finishes.

    Examples
    --------
    >>> with progress_bar(10, "copy", show=False) as bar:
    ...     bar.update(10)
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1024, desc=desc, file=sys.stderr, disable=not show)


def _on_client(client: Any, targets: tuple, progress: bool) -> list:
    futs = client.compute([_culled(t) for t in dask.optimize(*targets)], optimize_graph=False)
    if progress:
        from distributed import progress as dprogress

        dprogress(futs)
    return list(client.gather(futs))


def _culled(target: Any) -> Any:
    """``target`` (optimized: blockwise and low-level fusion done) over the tasks its keys need.

    dask culls before it fuses, layer by layer; a layer whose dependencies it does not know (a
    stack of the input's volumes) keeps every key, and fusion then leaves each unused one as an
    alias of a fused task. The writers compute two batches at once: both graphs held every
    volume's alias, one batch's alias and the other's task under the same key, and the scheduler
    lost the fused key (a KeyError in half the runs of the scaling notebook). Culled after
    fusion, a batch's graph holds its own volumes' tasks only.
    """
    if not dask.is_dask_collection(target):
        return target
    from dask._task_spec import cull, convert_legacy_graph
    from dask.core import flatten

    dsk = cull(convert_legacy_graph(dict(target.__dask_graph__())), list(flatten(target.__dask_keys__())))
    rebuild, args = target.__dask_postpersist__()
    return rebuild(dsk, *args)


def dispatch(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """The dask scheduler of a :func:`running` block (dask's ``scheduler=`` config): the block's
    engine, started on the first graph. Outside a block (a worker process that inherited the
    config), dask's threads.

    Parameters
    ----------
    dsk, keys, **kwargs
        As dask's schedulers take them.

    Returns
    -------
    The computed keys.

    Examples
    --------
    >>> import dask.array as da
    >>> with running("sync"):
    ...     int(da.ones(4, chunks=2).sum().compute())
    4
    """
    eng = current()
    if eng is None:
        return dask.base.named_schedulers["threads"](dsk, keys, **kwargs)
    return eng.get(dsk, keys, **kwargs)


_CURRENT: contextvars.ContextVar[Engine | None] = contextvars.ContextVar("volnorm_engine", default=None)


def current() -> Engine | None:
    """The engine of the innermost :func:`running` block, or None outside one.

    Returns
    -------
    Engine or None

    Examples
    --------
    >>> current() is None
    True
    """
    return _CURRENT.get()


def compute(*targets: Any, progress: bool = False) -> list:
    """``dask.compute(*targets)`` as a list, on the current engine if any (else the active dask
    scheduler), with a progress bar when ``progress``.

    Parameters
    ----------
    targets : dask collections
        What to compute (as ``dask.compute`` takes them).
    progress : bool
        A progress bar on stderr.

    Returns
    -------
    list
        The computed values.

    Examples
    --------
    >>> import dask.array as da
    >>> [float(v) for v in compute(da.ones(4, chunks=2).sum())]
    [4.0]
    """
    eng = current()
    if eng is not None:
        return eng.compute(*targets, progress=progress)
    client = _active_client() if progress and dask.config.get("scheduler", None) in (None, DISTRIBUTED) else None
    if client is not None:
        return _on_client(client, targets, True)
    with ProgressBar(minimum=1.0, out=sys.stderr) if progress else contextlib.nullcontext():
        return list(dask.compute(*targets))


@contextlib.contextmanager
def running(
    scheduler: Any = None,
    *,
    allow_insecure: bool = False,
    progress: bool = False,
    n_workers: int | None = None,
    memory_limit: Any = "auto",
    threads_per_worker: int = 1,
    cluster: Mapping[str, Any] | None = None,
    jobs: int = 1,
    min_workers: int = 1,
    wait: float = 3600,
    stall_timeout: float | None = None,
    what: str = "--scheduler",
    on_start: Callable[[str], None] | None = None,
) -> Iterator[Engine]:
    """Run the dask graphs computed inside the block on ``scheduler``; yields the :class:`Engine`.

    Parameters
    ----------
    scheduler : str, distributed.Client or None
        A word (module docs), an address or a client. ``None``: the engine of an enclosing
        block, else an active ``distributed.Client`` (``with Client(...)``), else
        :func:`default_scheduler`.
    allow_insecure : bool
        Connect to a plain ``tcp://`` address of another machine (:func:`check_address`,
        checked before any connection or cluster start).
    progress : bool
        Progress bars on stderr for :meth:`Engine.compute` (and dask's bar for threads/sync).
    n_workers : int, optional
        ``"local"``: worker processes (default: one per usable core).
    memory_limit : str, float or None
        ``"local"``: per worker, as dask's ``LocalCluster`` takes it (default ``"auto"``).
    threads_per_worker : int
        ``"local"``: threads in each worker process (default 1).
    cluster : mapping, optional
        ``"slurm"``/``"pbs"``/``"kubernetes"``: the cluster's options (:func:`job_cluster`).
    jobs : int
        Job clusters: worker jobs (pods) to submit.
    min_workers : int
        Job clusters: start once this many workers are up.
    wait : float
        Job clusters: seconds to wait for ``min_workers``.
    stall_timeout : float, optional
        On a cluster, stop the block with :class:`RunStalledError` when no task changes state
        for this many seconds while tasks wait (:func:`~volnorm.engine.faults.watchdog`).
    what : str
        Where ``scheduler`` came from, for messages.
    on_start : callable, optional
        Called with the engine's description when it starts (the first graph, or first use).

    Yields
    ------
    Engine
        Started on first use (a command that fails on its input starts no cluster); its
        ``description`` says where the graphs run. A cluster or client started here is
        closed on exit; a lost cluster raises :class:`ClusterLostError`.

    Examples
    --------
    >>> import dask.array as da
    >>> with running("threads") as eng:
    ...     float(da.ones(10, chunks=5).sum().compute()), eng.description.endswith("threads")
    (10.0, True)
    """
    if scheduler is None and current() is not None:
        yield current()  # type: ignore[misc]
        return
    if scheduler is None:
        client = _active_client()
        scheduler = client if client is not None else default_scheduler()
    check_scheduler(scheduler, what)
    check_address(scheduler, allow_insecure=allow_insecure, what=what)  # before any connection
    word = scheduler if isinstance(scheduler, str) else "client"
    eng = Engine(word, functools.partial(_start, scheduler, allow_insecure, n_workers, memory_limit, threads_per_worker,
                                         cluster, jobs, min_workers, wait), progress, stall_timeout, on_start)
    token = _CURRENT.set(eng)
    try:
        with dask.config.set(scheduler=dispatch), ProgressBar(minimum=1.0, out=sys.stderr) if progress else contextlib.nullcontext():
            yield eng
    except BaseException as e:
        _CURRENT.reset(token)
        eng.close(e)  # may raise what the engine makes of it (RunStalledError)
        if isinstance(e, Exception) and eng.started and eng._client is not None and is_lost(e):
            raise ClusterLostError(f"the cluster was lost ({type(e).__name__}: {e}); run again.") from e
        raise
    _CURRENT.reset(token)
    eng.close()


def _active_client() -> Any:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


@contextlib.contextmanager
def _start(scheduler: Any, allow_insecure: bool, n_workers: int | None, memory_limit: Any, threads_per_worker: int,
           cluster: Mapping[str, Any] | None, jobs: int, min_workers: int, wait: float) -> Iterator[tuple[str, Any]]:
    """Start ``scheduler`` (checked): yields (description, client or None); closes on exit what it started."""
    from distributed import Client

    if not isinstance(scheduler, str):  # a client: the caller's, not closed
        yield f"client {scheduler.scheduler.address}" + _dashboard(scheduler), scheduler
    elif scheduler == "sync":
        yield "synchronous (this thread)", None
    elif scheduler == "threads":
        yield f"{usable_cpus()} threads", None
    elif scheduler == "local":
        client = local_cluster(n_workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit)
        try:
            n = len(client.scheduler_info()["workers"])
            yield f"local cluster, {n} workers on 127.0.0.1" + _dashboard(client), client
        finally:
            local = client.cluster
            client.close()
            local.close()
    elif scheduler in JOB_CLUSTERS:
        job = job_cluster(scheduler, dict(cluster or {}))
        try:
            if scheduler != "kubernetes":  # kubernetes: refused by check_address unless allow_insecure
                # nothing is submitted before this check (the cluster is scaled below)
                check_address(job.scheduler_address, allow_insecure=allow_insecure,
                              what=f"engine.cluster (security: false): the {scheduler} cluster's scheduler")
            if scheduler == "kubernetes":
                job.scale(int(jobs))
            else:
                job.scale(jobs=int(jobs))
            with Client(job, set_as_default=False) as client:
                client.register_plugin(HeapTrim())  # the workers to come get it too
                client.register_plugin(QuietClose())
                client.wait_for_workers(int(min_workers), timeout=float(wait))
                n = len(client.scheduler_info()["workers"])
                yield f"{scheduler} cluster {client.scheduler.address}, {n} workers so far" + _dashboard(client), client
        finally:
            job.close()
    else:
        client = Client(scheduler, set_as_default=False)
        try:
            n = len(client.scheduler_info()["workers"])
            yield f"scheduler {scheduler}, {n} workers" + _dashboard(client), client
        finally:
            client.close()


def _dashboard(client: Any) -> str:
    link = getattr(client, "dashboard_link", None)
    return f" (dashboard {link})" if link else ""


@contextlib.contextmanager
def executor(scheduler: Any = None, *, allow_insecure: bool = False) -> Iterator[Executor]:
    """Yield an :class:`Executor` for ``scheduler`` (:func:`running`'s words and defaults).

    Parameters
    ----------
    scheduler : None, str or distributed.Client
        As :func:`running` takes it.
    allow_insecure : bool
        Connect to a plain ``tcp://`` address of another machine (:func:`check_address`).

    Yields
    ------
    Executor
        Submits tasks there. A cluster, client or thread pool this call started is closed on exit.

    Examples
    --------
    >>> with executor("threads") as ex:
    ...     fut = ex.submit(sum, [1, 2, 3])
    ...     [f.result() for f in ex.as_completed([fut])]
    [6]
    """
    with running(scheduler, allow_insecure=allow_insecure) as eng:
        yield eng.executor


@contextlib.contextmanager
def dask_scheduler(scheduler: Any = None, *, progress: bool = False, allow_insecure: bool = False) -> Iterator[str]:
    """Run the dask graphs computed inside the block on ``scheduler``; yields where, for people
    (:func:`running`, for callers that need only the description).

    Parameters
    ----------
    scheduler : str, distributed.Client or None
        As :func:`running` takes it.
    progress : bool
        Show a progress bar on stderr.
    allow_insecure : bool
        Connect to a plain ``tcp://`` address of another machine (:func:`check_address`).

    Yields
    ------
    str
        Where the graphs run, e.g. ``"8 threads"``, or a cluster's description with its
        dashboard link.

    Examples
    --------
    >>> import dask.array as da
    >>> with dask_scheduler("sync") as where:
    ...     int(da.ones(10, chunks=5).sum().compute()), where
    (10, 'synchronous (this thread)')
    """
    with running(scheduler, progress=progress, allow_insecure=allow_insecure) as eng:
        yield eng.description
