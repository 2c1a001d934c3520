"""Helpers of the tests that run on real clusters (SLURM, an external TLS dask cluster)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

#: SLURM job ids the tests submitted (shown in pytest's summary: proof they ran for real)
SLURM_JOBS: list[tuple[str, str]] = []

#: set by .ci/run: a missing SLURM fails the SLURM tests instead of skipping them
REQUIRE_SLURM = "VOLNORM_REQUIRE_SLURM"


def store_chunks(store: Path) -> dict[str, bytes]:
    """Every chunk file of a Zarr store, by path: the bytes written (metadata aside)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and "/c/" in f"/{p.relative_to(store)}"}


def slurm_missing() -> str | None:
    """Why no SLURM can run the tests here, or None when a node is up."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM on this machine (sbatch/sinfo not on PATH); as root, .ci/start-slurm installs and starts one"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: no slurmctld running (.ci/start-slurm starts it)"
    states = out.stdout.split()
    if not any(re.match(r"(idle|mixed|allocated|completing)$", s) for s in states):
        return f"no SLURM node up (sinfo: {' '.join(states) or out.stderr.strip() or 'nothing'}); .ci/start-slurm starts one"
    return None


def need_slurm() -> None:
    """Skip with the reason when no SLURM is up; fail instead under .ci/run (never skipped in CI)."""
    why = slurm_missing()
    if why is None:
        return
    if os.environ.get(REQUIRE_SLURM):
        pytest.fail(f"{REQUIRE_SLURM} is set but {why}")
    pytest.skip(why)


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job -o JOB`` as a dict (empty once SLURM has forgotten the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    if out.returncode:
        return {}
    fields: dict[str, str] = {}
    for tok in re.findall(r"(\w[\w:/]*)=(\S*)", out.stdout):
        fields.setdefault(tok[0], tok[1])
    return fields


def wait_job(job: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"),
             timeout: float = 600) -> dict[str, str]:
    """Poll until the job reaches one of ``states``; its fields then."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"SLURM job {job} did not reach {states} in {timeout} s: {info}")


def sbatch(*args: str, what: str, env: dict[str, str] | None = None) -> str:
    """Submit with ``sbatch --parsable`` (the job gets ``env``, as sbatch exports the submitting
    environment); the job id (recorded for the summary)."""
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    SLURM_JOBS.append((job, what))
    return job


def worker_jobs() -> list[str]:
    """The dask-jobqueue worker jobs SLURM runs now (job name ``volnorm-worker``)."""
    out = subprocess.run(["squeue", "-h", "-n", "volnorm-worker", "-o", "%i"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()
