"""Where work runs: the embedded local ``distributed`` cluster, or another scheduler.

Library functions use whatever dask scheduler is active. Runners (``convert``,
the CLI) call :func:`executor`, which uses a ``distributed.Client`` that is
already active, connects to an address, or starts the embedded default: a
local cluster of one single-threaded worker process per core, bound to
127.0.0.1 (dask's own default binds to every interface).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dask

logger = logging.getLogger(__name__)

#: dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker. Setting any
#: glibc malloc variable turns off glibc's adaptive mmap threshold, so every
#: large buffer becomes a fresh mmap (page faults on every chunk); measured
#: 2.7-3.7x slower histogram passes here (DESIGN.md). We keep glibc's defaults.
#: How a block selects a ``distributed.Client`` for the graphs computed inside it: the client is
#: made current (``client.as_current()``) and dask's config names only this string. Putting the
#: client itself into dask's config broke the nannies of a local cluster: a nanny restarting a
#: killed worker pickles dask's config for the new process, and a Client does not pickle.
DISTRIBUTED = "dask.distributed"

__all__ = [
    "DISTRIBUTED", "ENCRYPTED_SCHEMES", "Executor", "InsecureSchedulerError", "check_address", "dask_scheduler", "executor",
    "import_keeping_sigint", "is_loopback", "job_cluster", "local_cluster", "usable_cpus",
]

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


#: Schemes of ``distributed`` addresses whose traffic is encrypted (``inproc``: this process only).
ENCRYPTED_SCHEMES = ("tls", "wss", "inproc")


class InsecureSchedulerError(ValueError):
    """A scheduler address that would carry the data in clear text to another machine."""


def is_loopback(address: str) -> bool:
    """Whether every address the host of ``address`` resolves to is a loopback address.

    Parameters
    ----------
    address : str
        A ``distributed`` address such as ``"tcp://127.0.0.1:8786"``.

    Returns
    -------
    bool
        False for an empty host (``tcp://:8786``, every interface), ``0.0.0.0``, a name that
        does not resolve, or anything that is not an address.

    Examples
    --------
    >>> is_loopback("tcp://127.0.0.1:8786"), is_loopback("tcp://[::1]:8786"), is_loopback("tcp://192.0.2.1:8786")
    (True, True, False)
    """
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    try:
        host = urlsplit(address).hostname or ""
        if not host:
            return False
        try:  # a literal IP needs no resolver (and no wait for one)
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_address(address: Any, *, allow_insecure: bool = False, what: str = "scheduler") -> None:
    """The one security rule for where volnorm sends data: refuse, before any connection, a
    scheduler that would carry it in clear text beyond this machine.

    Allowed: names that are not addresses (``"local"``, ``"threads"``, ``"sync"``, ``"slurm"``,
    ``"pbs"``, ``None``), a ``distributed.Client`` (connected by the caller), an encrypted
    address (``tls://``, ``wss://``, ``inproc://``) and any address on the loopback interface.
    Refused unless ``allow_insecure``: a plain ``tcp://``, ``ws://`` (or other unencrypted)
    address of another machine, and ``"kubernetes"`` (the dask-kubernetes operator's
    scheduler and workers talk plain ``tcp://`` inside the cluster network). Only a literal
    IP address or a host name is looked at: the check itself never connects.

    Parameters
    ----------
    address : str, distributed.Client or None
        What the user named as the scheduler.
    allow_insecure : bool
        The user's explicit opt-in (CLI ``--allow-insecure``, YAML ``engine.allow_insecure``)
        for a trusted network.
    what : str
        How the user named it, for the message (``"--scheduler"``, ``"engine.scheduler"``;
        default ``"scheduler"``, the Python argument).

    Returns
    -------
    None
        Returns only when the address may be used.

    Raises
    ------
    InsecureSchedulerError
        A ``ValueError`` saying to use ``tls://`` or ``--allow-insecure``.

    Examples
    --------
    >>> check_address("tls://192.0.2.1:8786")
    >>> check_address("tcp://127.0.0.1:8786")
    >>> check_address("tcp://192.0.2.1:8786", allow_insecure=True)
    >>> check_address("tcp://192.0.2.1:8786")
    Traceback (most recent call last):
    ...
    volnorm.engine.InsecureSchedulerError: scheduler tcp://192.0.2.1:8786: a plain tcp:// connection to another machine is not encrypted; use tls:// (dask's TLS config), or on a trusted network --allow-insecure (YAML: engine.allow_insecure: true; Python: allow_insecure=True)
    """
    if allow_insecure or not isinstance(address, str):
        return
    if address == "kubernetes":
        raise InsecureSchedulerError(
            f"{what} kubernetes: the dask-kubernetes operator's scheduler and workers talk plain tcp:// inside the "
            "Kubernetes network; if that network is trusted: --allow-insecure (YAML: engine.allow_insecure: true; Python: allow_insecure=True)"
        )
    if "://" not in address:
        return
    scheme = address.split("://", 1)[0].lower()
    if scheme in ENCRYPTED_SCHEMES or is_loopback(address):
        return
    raise InsecureSchedulerError(
        f"{what} {address}: a plain {scheme}:// connection to another machine is not encrypted; "
        "use tls:// (dask's TLS config), or on a trusted network --allow-insecure (YAML: engine.allow_insecure: true; Python: allow_insecure=True)"
    )


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
    import dask.system

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
    return Client(cluster, set_as_default=False)


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
    import importlib
    import signal
    import threading

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
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


@contextlib.contextmanager
def executor(scheduler: Any = None, *, allow_insecure: bool = False) -> Iterator[Executor]:
    """Yield an :class:`Executor` for ``scheduler``.

    Parameters
    ----------
    scheduler : None, str or distributed.Client
        ``None``: the active ``distributed.Client`` if any, else a new local
        cluster (closed on exit). ``"local"``: always a new local cluster.
        ``"threads"``/``"sync"``: a thread pool / this thread. A string with
        ``://`` is a scheduler address (``tls://`` works with dask's TLS config).
        A ``distributed.Client`` is used as is.
    allow_insecure : bool
        Connect to a plain ``tcp://`` address of another machine (see :func:`check_address`,
        checked before any connection).

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
    if isinstance(scheduler, str) and "://" in scheduler:  # before any connection
        check_address(scheduler, allow_insecure=allow_insecure)
    if scheduler is None:
        try:
            from distributed import get_client

            client = get_client()
            yield Executor(client, f"distributed client {client.scheduler.address}")
            return
        except (ImportError, ValueError):
            scheduler = "local"
    if isinstance(scheduler, str):
        if scheduler == "sync":
            yield Executor(_Sync(), "synchronous (this thread)")
        elif scheduler == "threads":
            pool = cf.ThreadPoolExecutor(usable_cpus())
            try:
                yield Executor(pool, f"{usable_cpus()} threads")
            except BaseException:
                # interrupted or failed: the tasks not started are dropped (the running ones,
                # which cannot be stopped, finish), instead of running every task left
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            else:
                pool.shutdown(wait=True)
        elif scheduler == "local":
            client = local_cluster()
            try:
                n = len(client.scheduler_info()["workers"])
                yield Executor(client, f"local cluster, {n} workers on 127.0.0.1")
            finally:
                cluster = client.cluster
                client.close()
                cluster.close()
        elif "://" in scheduler:
            from distributed import Client

            client = Client(scheduler, set_as_default=False)
            try:
                yield Executor(client, f"scheduler {scheduler}")
            finally:
                client.close()
        else:
            raise ValueError(
                f"`scheduler` must be None, 'local', 'threads', 'sync', an address like "
                f"'tcp://host:8786', or a distributed.Client; got {scheduler!r}."
            )
    else:
        yield Executor(scheduler, f"client {getattr(scheduler, 'scheduler', scheduler)}")


@contextlib.contextmanager
def dask_scheduler(scheduler: Any = "threads", *, progress: bool = False, allow_insecure: bool = False) -> Iterator[str]:
    """Run the dask graphs computed inside the block on ``scheduler``; yields its description.

    Parameters
    ----------
    scheduler : str, distributed.Client or None
        ``"threads"`` (default: no start-up cost) or ``"sync"``: dask's local
        schedulers, with a progress bar on stderr when ``progress``; ``"local"``:
        a new local cluster (127.0.0.1, closed on exit); an address
        (``tcp://``/``tls://``) or a ``distributed.Client``: that cluster (its
        dashboard shows the progress). ``None`` is ``"threads"``.
    progress : bool
        Show dask's progress bar on stderr for computations longer than a second (``"threads"``
        and ``"sync"`` only).
    allow_insecure : bool
        Connect to a plain ``tcp://`` address of another machine (see :func:`check_address`,
        checked before any connection).

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
    import dask

    if isinstance(scheduler, str) and "://" in scheduler:  # before any connection
        check_address(scheduler, allow_insecure=allow_insecure)
    if scheduler in (None, "threads", "sync"):
        name = scheduler or "threads"
        where = "synchronous (this thread)" if name == "sync" else f"{usable_cpus()} threads"
        with dask.config.set(scheduler=name), contextlib.ExitStack() as stack:
            if progress:
                from dask.diagnostics import ProgressBar

                stack.enter_context(ProgressBar(minimum=1.0, out=sys.stderr))
            yield where
        return
    with executor(scheduler, allow_insecure=allow_insecure) as ex:
        if not ex.distributed:  # pragma: no cover - executor() maps these names above
            raise ValueError(f"unknown scheduler {scheduler!r}")
        client = ex.backend
        link = getattr(client, "dashboard_link", None)
        with client.as_current(), dask.config.set(scheduler=DISTRIBUTED):
            yield ex.description + (f" (dashboard {link})" if link else "")
