"""Run a volnorm pipeline spec on dask workers that are SLURM jobs (dask-jobqueue).

    pip install dask-jobqueue cryptography   # cryptography: the temporary TLS certificates
    python workflows/cluster/slurm_jobqueue.py spec.yaml --jobs 4 --cores 8 --memory 32GB \\
        --walltime 02:00:00 [--queue PARTITION] [--account ACCOUNT]

Run it where jobs can be submitted (a login node, or inside a small long-lived
``sbatch`` job): it starts a dask scheduler in this process, submits ``--jobs``
SLURM jobs that each run ``--cores`` single-threaded dask worker processes sharing
``--memory``, and runs the spec on them with ``vn.pipeline.run(spec, client=client)``.
The scheduler and the workers talk over TLS with temporary certificates
(``security=True``; the worker's half is written to ``--shared-temp-directory``,
which the compute nodes must see). Inputs and outputs must be on a file system that
every worker sees.

Workers that arrive late join the run as they come; the run starts once
``--min-workers`` are there. The exit codes are those of ``volnorm run``: 0 done (or
already up to date), 1 refused or failed, 2 usage, 3 interrupted (run again to
resume), 4 the cluster was lost (run again: fitted parameters and written volumes are
reused).

The same cluster from Python (e.g. a notebook)::

    from dask_jobqueue import SLURMCluster
    from distributed import Client
    import volnorm as vn

    cluster = SLURMCluster(cores=8, processes=8, memory="32GB", walltime="02:00:00", security=True)
    cluster.scale(jobs=4)
    client = Client(cluster)
    result = vn.pipeline.run("spec.yaml", client=client)
    client.close()
    cluster.close()

Or, with the cluster's address, from the command line or the sbatch script beside
this file: ``volnorm run spec.yaml --scheduler tls://HOST:PORT`` (TLS needs dask's TLS
configuration; a plain ``tcp://`` address of another host needs
``engine.allow_insecure: true`` in the spec).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def slurm_cluster(*, cores: int, memory: str, walltime: str, queue: str | None = None, account: str | None = None,
                  shared_temp_directory: str | None = None, **extra: Any) -> Any:
    """A dask-jobqueue ``SLURMCluster``: per job ``cores`` single-threaded worker processes sharing ``memory``."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        cores=cores,
        processes=cores,  # one single-threaded worker per core, as volnorm's local cluster
        memory=memory,
        walltime=walltime,
        queue=queue,
        account=account,
        job_name="volnorm-worker",
        # numpy's own threads would compete with the worker processes
        job_script_prologue=["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1"],
        security=True,  # TLS between the scheduler and the workers, temporary certificates
        shared_temp_directory=shared_temp_directory,
        **extra,
    )


def run_on_slurm(spec: str, *, jobs: int, min_workers: int = 1, wait: float = 3600.0, dry_run: bool = False,
                 overwrite: bool = False, **cluster_options: Any) -> Any:
    """Start the cluster, run ``spec`` on it with :func:`volnorm.pipeline.run`, close the cluster."""
    from distributed import Client

    import volnorm as vn

    spec_ = vn.pipeline.load_spec(spec)  # a bad spec fails here, before any job is submitted
    if dry_run:
        return vn.pipeline.run(spec_, dry_run=True)
    cluster = slurm_cluster(**cluster_options)
    try:
        cluster.scale(jobs=jobs)
        with Client(cluster) as client:
            print(f"dask scheduler {client.scheduler.address}, dashboard {client.dashboard_link}", flush=True)
            client.wait_for_workers(min_workers, timeout=wait)  # jobs wait in the queue first
            return vn.pipeline.run(spec_, client=client, overwrite=overwrite)
    finally:
        cluster.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="the pipeline spec (YAML)")
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs of workers (default 2)")
    p.add_argument("--cores", type=int, default=8, help="CPUs per job = worker processes per job (default 8)")
    p.add_argument("--memory", default="32GB", help="memory per job, shared by its workers (default 32GB)")
    p.add_argument("--walltime", default="02:00:00", help="time limit of each worker job (default 02:00:00)")
    p.add_argument("--queue", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--shared-temp-directory", default=None,
                   help="a directory the compute nodes see, for the workers' TLS certificates (default: here)")
    p.add_argument("--min-workers", type=int, default=1, help="start once this many workers are up (default 1)")
    p.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for --min-workers (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="validate the spec, print the plan, submit nothing")
    p.add_argument("--overwrite", action="store_true", help="replace outputs written by another spec or from other inputs")
    args = p.parse_args(argv)

    import volnorm as vn

    try:
        run_on_slurm(
            args.spec, jobs=args.jobs, min_workers=args.min_workers, wait=args.wait, dry_run=args.dry_run,
            overwrite=args.overwrite, cores=args.cores, memory=args.memory, walltime=args.walltime,
            queue=args.queue, account=args.account, shared_temp_directory=args.shared_temp_directory,
        )
    except vn.pipeline.ClusterLostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was committed; run again to resume", file=sys.stderr)
        return 3
    except (OSError, ValueError, TypeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
