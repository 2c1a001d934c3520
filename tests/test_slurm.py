"""SLURM for real: slurmctld and slurmd on this machine (``.ci/start-slurm`` starts them in CI).

- a spec with ``engine.scheduler: slurm``: dask-jobqueue worker jobs that SLURM schedules
  (TLS between scheduler and workers), the resources read back from ``scontrol``, the output
  byte-identical to the local engine's; a worker job cancelled with ``scancel`` mid-run;
- ``workflows/cluster/volnorm-run.sbatch`` submitted with ``sbatch``: a spec completes; a job
  at its time limit gets SIGTERM, exits 3, is requeued and resumes to the same output; a job
  without volnorm in its environment says so in its log;
- the recipe's resources checked before submission (``sbatch --test-only``).

Without SLURM these skip with the reason (a laptop); ``.ci/run`` sets ``VOLNORM_REQUIRE_SLURM``
so that in CI they fail instead. The job ids are listed in pytest's summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import volnorm as vn
from volnorm.engine import ClusterLostError, import_keeping_sigint
from volnorm.io.store import staging_path
from volnorm.pipeline.spec import load_spec

from _clusters import SLURM_JOBS, job_info, need_slurm, sbatch, store_chunks, wait_job, worker_jobs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "workflows" / "cluster" / "volnorm-run.sbatch"
VENV = Path(sys.prefix)  # the tests' virtual environment: the jobs' volnorm


@pytest.fixture
def slurm():
    need_slurm()
    try:
        import_keeping_sigint("dask_jobqueue")
        import_keeping_sigint("cryptography")
    except ImportError as e:  # a dependency of the test extras: a broken install, not a skip
        pytest.fail(f"the jobqueue extra is missing from the test environment: {e}")


def _spec(tmp_path: Path, data: Path, name: str, engine: dict | None = None, steps: list | None = None) -> dict:
    return {
        "version": 1, "name": name,
        "input": {"nifti": str(data / "sub-*.nii")},
        "steps": steps or [{"rescale": {"percentiles": [1, 99], "out_range": "uint16"}}],
        "output": {"store": str(tmp_path / f"{name}.zarr")},
        "outputs": {"statistics": {"path": str(tmp_path / f"{name}.csv")}},
        "engine": engine or {"scheduler": "sync"},
    }


def _same_output(tmp_path: Path, a: str, b: str) -> None:
    """Byte-identical chunks, equal voxels and the same statistics rows."""
    za, zb = tmp_path / f"{a}.zarr", tmp_path / f"{b}.zarr"
    np.testing.assert_array_equal(vn.open_zarr(za).values, vn.open_zarr(zb).values)
    chunks = store_chunks(za)
    assert chunks and chunks == store_chunks(zb)
    rows = [(tmp_path / f"{n}.csv").read_text().splitlines()[1:] for n in (a, b)]  # the digest line names the spec
    assert rows[0] and rows[0] == rows[1]


def _slurm_engine(tmp_path: Path, jobs: int, cores: int, **more) -> dict:
    return {"scheduler": "slurm", "jobs": jobs, "min_workers": jobs * cores, "wait": 180, "progress": False,
            "cluster": {"cores": cores, "memory": "2GB", "walltime": "00:10:00", "queue": "debug", "account": "volnorm-ci",
                        "shared_temp_directory": str(tmp_path), "scheduler_options": {"host": "127.0.0.1"},
                        "log_directory": str(tmp_path / "worker-logs"), **more}}


def test_a_spec_runs_through_slurm_worker_jobs_as_on_the_local_engine(slurm, tmp_path):
    vn.datasets.make_cohort(tmp_path / "data", n_subjects=4, shape=(40, 48, 36), seed=2)
    seen: dict[str, dict] = {}

    def echo(line: str) -> None:  # once the workers are up: read the jobs back from SLURM
        if line.startswith("running on slurm cluster"):
            for job in worker_jobs():
                seen[job] = job_info(job)
                SLURM_JOBS.append((job, "dask-jobqueue worker job of a spec with engine.scheduler: slurm"))

    spec = _spec(tmp_path, tmp_path / "data", "slurm", _slurm_engine(tmp_path, jobs=1, cores=2))
    assert vn.pipeline.run(spec, echo=echo).status == "done"
    assert len(seen) == 1, seen
    (job, info), = seen.items()
    # the resources the spec asked for, as SLURM granted them
    assert info["JobState"] == "RUNNING" and info["JobName"] == "volnorm-worker"
    assert info["NumCPUs"] == "2" and info["TimeLimit"] == "00:10:00"
    assert info["Partition"] == "debug" and info["Account"] == "volnorm-ci"
    assert info["MinMemoryNode"] == "2G"  # memory: 2GB, as dask-jobqueue writes it (#SBATCH --mem=2G)
    # cancelled when the run ended
    assert wait_job(job, timeout=60)["JobState"] in ("CANCELLED", "COMPLETED")
    # the same spec on the local engine: the same bytes
    assert vn.pipeline.run(_spec(tmp_path, tmp_path / "data", "local", {"scheduler": "local", "n_workers": 2}), echo=None).status == "done"
    _same_output(tmp_path, "slurm", "local")


def test_a_worker_job_cancelled_mid_run(slurm, tmp_path):
    """``scancel`` of one of two worker jobs while the volumes are written: the run finishes on
    the other one, or stops with ClusterLostError and a second run resumes; the same output."""
    vn.datasets.make_cohort(tmp_path / "data", n_subjects=40, shape=(96, 112, 96), seed=3)
    spec = _spec(tmp_path, tmp_path / "data", "slurm", _slurm_engine(tmp_path, jobs=2, cores=1))
    staging = staging_path(tmp_path / "slurm.zarr")
    cancelled: list[str] = []

    def cancel_one() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if staging.exists() and any(any(c.iterdir()) for c in staging.glob("sub-*/*/c")):
                jobs = worker_jobs()
                if jobs:
                    subprocess.run(["scancel", jobs[0]], check=True, timeout=30)
                    cancelled.append(jobs[0])
                    SLURM_JOBS.append((jobs[0], "worker job cancelled with scancel mid-run"))
                return
            time.sleep(0.05)

    import threading

    t = threading.Thread(target=cancel_one, daemon=True)
    t.start()
    try:
        status = vn.pipeline.run(spec, echo=None).status
    except ClusterLostError:  # the documented alternative (exit 4): run again, it resumes
        t.join(60)
        status = vn.pipeline.run(spec, echo=None).status
    t.join(60)
    assert cancelled, "the run ended before any volume was written: nothing was cancelled"
    assert status == "done"
    assert wait_job(cancelled[0], timeout=60)["JobState"] == "CANCELLED"
    assert vn.pipeline.run(_spec(tmp_path, tmp_path / "data", "ref"), echo=None).status == "done"
    _same_output(tmp_path, "slurm", "ref")


def _write_spec(tmp_path: Path, spec: dict) -> Path:
    import yaml

    p = tmp_path / f"{spec['name']}.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in spec.items() if k != "engine"}, sort_keys=False))
    return p


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "SLURM_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(VENV)))
    return {**env, **more}


def test_the_sbatch_recipe_completes_a_spec(slurm, tmp_path):
    vn.datasets.make_cohort(tmp_path / "data", n_subjects=3, shape=(40, 48, 36), seed=4)
    spec = _write_spec(tmp_path, _spec(tmp_path, tmp_path / "data", "recipe"))
    log = tmp_path / "job.log"
    job = sbatch("-c", "2", "--mem=3G", "--time=00:10:00", f"--chdir={tmp_path}", f"--output={log}",
                 str(RECIPE), str(spec), what="workflows/cluster/volnorm-run.sbatch (a spec completes)",
                 env=_env(VOLNORM_VENV=str(VENV)))
    info = wait_job(job, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert info["NumCPUs"] == "2" and info["MinMemoryNode"] == "3G"
    assert "volnorm-run: 2 workers x" in text
    assert vn.pipeline.run(_spec(tmp_path, tmp_path / "data", "ref"), echo=None).status == "done"
    _same_output(tmp_path, "recipe", "ref")


def test_a_job_without_volnorm_says_so_in_its_log(slurm, tmp_path):
    spec = _write_spec(tmp_path, _spec(tmp_path, tmp_path / "data", "nope"))
    log = tmp_path / "job.log"
    job = sbatch("-c", "1", "--mem=1G", "--time=00:05:00", f"--chdir={tmp_path}", f"--output={log}", str(RECIPE), str(spec),
                 what="the recipe without VOLNORM_VENV (fails with a clear message)", env=_env())
    info = wait_job(job, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), (info, text)
    assert "volnorm is not installed in this job's environment" in text and "VOLNORM_VENV" in text, text
    assert "Traceback" not in text and "ModuleNotFoundError" not in text, text


def test_the_recipes_resources_are_checked_before_submission(slurm, tmp_path):
    """The README's check: ``sbatch --test-only`` with the recipe's own #SBATCH lines (8 CPUs,
    32 GB) on a node that cannot give them is refused at once, not left pending; with
    resources the node has it says when the job would start."""
    spec = _write_spec(tmp_path, _spec(tmp_path, tmp_path / "data", "check"))
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, timeout=30).stdout.split()
    cpus, mem_mb = int(node[0]), int(node[1])
    asks_more = cpus < 8 or mem_mb < 32 * 1024
    r = subprocess.run(["sbatch", "--test-only", f"--chdir={tmp_path}", str(RECIPE), str(spec)], capture_output=True, text=True, timeout=60)
    if asks_more:
        assert r.returncode != 0 and "Requested node configuration is not available" in r.stderr, r.stderr
    r = subprocess.run(["sbatch", "--test-only", "-c", "1", "--mem=1G", f"--chdir={tmp_path}", str(RECIPE), str(spec)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr


def test_a_job_at_its_time_limit_is_requeued_and_resumes(slurm, tmp_path):
    """A short ``--time`` and a slow spec (N4 bias correction of 80 volumes, ~0.7 s each on
    one CPU): SLURM sends SIGTERM before the limit (``--signal=B:TERM@60``: 60 to 90 s before
    it, as SLURM checks every 30 s), volnorm stops cleanly and exits 3, the script requeues the
    job, and the next run resumes (the volumes of the finished batches kept) until the spec is
    done (attempts of 30-60 s here, about 40 volumes each). N4 alone: a fitted step after
    it would run N4 in its fit pass too, which a resumed run repeats. Before the statistics
    pass's pick tasks stopped carrying every volume's key table, the last attempt's pass
    paused its worker at the memory limit and the job never finished."""
    vn.datasets.make_cohort(tmp_path / "data", n_subjects=80, shape=(32, 36, 30), seed=6)
    steps = [{"n4": {"shrink_factor": 1}}]
    spec = _write_spec(tmp_path, _spec(tmp_path, tmp_path / "data", "timed", steps=steps))
    log = tmp_path / "job.log"
    job = sbatch("-c", "1", "--mem=2G", "--time=00:02:00", "--signal=B:TERM@60", f"--chdir={tmp_path}", f"--output={log}",
                 str(RECIPE), str(spec), what="the recipe at its time limit (SIGTERM, exit 3, requeued, resumed)",
                 env=_env(VOLNORM_VENV=str(VENV)))
    info = wait_job(job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=900)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert int(info["Restarts"]) >= 1, text
    assert f"requeueing job {job} to resume" in text, text
    assert text.count("volnorm run: interrupted; nothing incomplete was committed") >= 1, text
    assert vn.pipeline.run({**_spec(tmp_path, tmp_path / "data", "ref", steps=steps)}, echo=None).status == "done"
    _same_output(tmp_path, "timed", "ref")


def test_the_slurm_workflow_spec_runs_on_slurm_jobs(slurm, tmp_path):
    """workflows/cluster/normalize-on-slurm.yaml on the real one-node SLURM (the jobs scheduled by slurmctld)."""
    spec = load_spec(Path(__file__).parents[1] / "workflows" / "cluster" / "normalize-on-slurm.yaml")
    assert spec["engine"]["scheduler"] == "slurm" and spec["engine"]["cluster"]["cores"] == 8
    files = vn.datasets.make_cohort(tmp_path / "data", n_subjects=3, shape=(20, 24, 16), seed=4)
    spec.data["input"]["nifti"] = [str(tmp_path / "data" / "sub-*.nii")]
    spec.data["output"]["store"] = str(tmp_path / "normalized.zarr")
    spec.data["outputs"]["statistics"]["path"] = str(tmp_path / "stats.csv")
    spec.data["outputs"]["params"] = str(tmp_path / "params.json")
    spec.data["engine"].update(jobs=1, min_workers=2, wait=120, progress=False)
    spec.data["engine"]["cluster"].update(cores=2, memory="2GB", shared_temp_directory=str(tmp_path),
                                          scheduler_options={"host": "127.0.0.1"})
    assert vn.pipeline.run(spec, echo=None).status == "done"
    assert vn.open_zarr(tmp_path / "normalized.zarr").sizes["volume"] == len(files)
    assert (tmp_path / "stats.csv").read_text().count("\n") == 2 + len(files)


