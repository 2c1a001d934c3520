#!/usr/bin/env python
"""Benchmark the normalize workflow (``vn.pipeline.run``) on the local engine against the
same workflow run through SLURM worker jobs: end-to-end time, the passes, the time until
the workers are up, peak RSS per worker, and whether both give the same output.

Data: the first N uncompressed ``.nii`` int16 phantoms of 256x256x192 voxels (24 MiB
each) that ``bench_scale.py`` made in ``/tmp/volnorm-bench-scale/cohort-256x256x192-nii``
(read only: hard links (``os.link``, no copy, no change to the originals) into
``<workdir>/input-<N>files``, so the cohort is one glob). ``--gb`` (default 1.0) sets N =
ceil(gb x 10^9 / 25,165,824) rounded up to an even number (40 files, 1.007 GB, at 1.0):
an even count splits evenly over the 2 workers. If that folder is missing, N phantoms
are generated with ``volnorm.datasets.make_cohort`` into ``<workdir>/phantoms``.

The workflow is ``bench_scale.spec_for``'s (the same steps and outputs, so the two
benchmarks time the same work)::

    input:   {nifti: <workdir>/input-<N>files/*.nii}
    steps:   [{rescale: {percentiles: [1, 99], out_range: uint16}}]
    output:  {store: <workdir>/out/<engine>-<k>.zarr, codec: lz4}
    outputs: {images: true, statistics: {path: <workdir>/out/<engine>-<k>.csv}}

with one of two engine sections (everything else identical):

* local: ``{scheduler: local, n_workers: 2, memory_limit: 1GiB}`` -- 2 single-threaded
  worker processes (spawned by nannies that live in this process), 1 GiB each;
* slurm: ``{scheduler: slurm, jobs: 1, min_workers: 2, wait: 300, cluster: {cores: 2,
  memory: 3GB, walltime: "00:30:00", queue: debug, shared_temp_directory: <workdir>,
  scheduler_options: {host: 127.0.0.1}, log_directory: <workdir>/worker-logs}}`` -- one
  sbatch job of 2 cores running ``python -m distributed.cli.dask_worker`` with 2
  single-threaded worker processes of 1.5 GB each (dask-jobqueue splits the job's 3 GB),
  TLS to a scheduler in this process on 127.0.0.1 (the node is this machine). The input
  chunks are the same in both runs (64 MiB: the 1 GiB limit's sixteenth, and volnorm's
  default without a numeric limit), so the two runs compute the same graph.

Each run starts its own cluster, as a user's ``volnorm run`` does: the end-to-end wall
time of ``vn.pipeline.run`` includes starting the cluster (local: processes spawned;
SLURM: the job submitted, scheduled, started, its workers connected) and closing it. No
warm-up: both engines pay their imports and numba compilation in fresh workers, once per
run. Measured per run:

* end-to-end: wall time of ``vn.pipeline.run(spec, echo=...)``;
* workers up: from the call until the echoed ``running on ...`` line, which the
  pipeline prints once the engine is started (SLURM: after ``wait_for_workers(2)``),
  i.e. plan + lock + cluster start (+ job queueing and worker start-up on SLURM);
* fit and write passes: as the run prints them (``  fit rescale: X s``, ``  write: X s
  -> ...``, 0.1 s resolution), parsed with ``bench_scale``'s ``Echo``/``passes_from``;
* rest: end-to-end - workers up - fit - write (between the passes, params, the
  statistics -- counted during the write pass since the fused write-and-count chain, so
  its echo line follows the write's within milliseconds; their time-stamp difference is
  in the JSON as ``stats`` -- the result, and closing the cluster);
* peak RSS per worker: a thread samples every 50 ms the RSS of every process that did
  not exist when the run started (``psutil``; this process excluded: it holds the
  client, the scheduler and the local nannies). SLURM workers are not children of
  this process (slurmstepd starts them), so the whole machine is scanned; a process
  counts when it descends from this process or its environment's ``SLURM_JOB_ID`` is
  one of this run's worker jobs (another user's jobs and tests running at the same
  time are left out and counted). The two largest peaks are reported as the workers'
  (the spawned worker processes; the SLURM job's ``dask_worker`` nanny host, its shell
  and slurmstepd are smaller and are listed in the JSON), named by their command line;
* the SLURM job id(s): ``squeue -h -n volnorm-worker -o %i`` from the echo callback
  once the ``running on`` line arrives (in a thread, so the run is not held up),
  minus the ids listed before the run, and the job's ``scontrol show job -o``
  resources (NumCPUs, MinMemoryNode, TimeLimit);
* slurm/local ratios of end-to-end time and of the larger worker peak, pairing each
  SLURM run with the local run before it.

Checks (ok/FAIL on every row): the run finished ("done"), and the SLURM run's store
holds the same voxels as the local run's (the sha256 of every chunk file of the two
stores; if bytes differ, the decoded arrays are compared with ``zarr``), and the two
statistics CSVs hold the same rows (the first line, a digest comment that depends on
the spec's paths, ignored).

Fairness: before each run the page cache is dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches`` when writable, i.e. as root), so each run's fit pass reads
from disk. Before each SLURM run the script waits until ``sinfo -h -o %T`` says idle and
``squeue -h`` is empty (polling every 10 s, up to 15 min; it says when it waits, and
runs anyway after that, marked in the output), because another job on the node's 2 CPUs
would slow this one. The engines alternate (local, slurm, local, slurm with ``--repeat
2``), so a drift in the machine's load hits both. Host (cores, RAM), versions and the
load average at the start and the end are printed: numbers from a shared machine are
noisy.

Output stores are removed before each run (the pipeline does not overwrite) and after
each pair is compared; at the end the workdir's outputs and worker logs are deleted,
and the hard-linked inputs too unless ``--keep``.

Usage (from the repository root, with a SLURM running: ``bash .ci/start-slurm``)::

    PYTHONPATH=. python benchmarks/bench_slurm.py                 # 1 GB, local then slurm, ~3 min
    PYTHONPATH=. python benchmarks/bench_slurm.py --gb 0.1        # smoke run
    PYTHONPATH=. python benchmarks/bench_slurm.py --repeat 2 --json /tmp/slurm.json

GB are 10^9 bytes of uncompressed voxels, MiB/GiB 2^20/2^30 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import Echo, clear_output, passes_from, spec_for  # noqa: E402

GB = 1e9
MiB = 2**20
SHAPE = (256, 256, 192)
FILE_BYTES = math.prod(SHAPE) * 2
PHANTOMS = Path("/tmp/volnorm-bench-scale/cohort-256x256x192-nii")
JOB_NAME = "volnorm-worker"  # volnorm.engine.job_cluster's default job_name
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
SLURM_WAIT = 15 * 60
SLURM_POLL = 10


def say(text: str = "") -> None:
    print(text, flush=True)


def fmt_mem(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def sh(*cmd: str, timeout: float = 30) -> str:
    """stdout of a command ('' if it fails or is missing)."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


# ---------------------------------------------------------------------------
# machine-wide RSS sampler
# ---------------------------------------------------------------------------


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    cmd: str
    job: str | None  # SLURM_JOB_ID from its environment
    ours: bool  # descends from this process
    parent_cmd: str = ""
    peak: int = 0
    cpu: float = 0.0  # user + system seconds, as last seen


class NewProcessSampler(threading.Thread):
    """Every ``interval`` s, the RSS of every process on the machine that did not exist at
    ``start()`` (this process excluded); keeps each one's peak, command line, SLURM job id
    and whether it descends from this process."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.me = os.getpid()
        self.baseline = set(psutil.pids())
        self.procs: dict[int, ProcInfo] = {}
        self.samples = 0
        self.stop_event = threading.Event()
        self.cpu_machine0 = psutil.cpu_times()
        self.cpu_self0 = sum(psutil.Process().cpu_times()[:2])
        self.busy = self.self_cpu = 0.0

    def _info(self, p: Any) -> ProcInfo:
        ps = self.psutil
        cmd, job, ours, ppid = "?", None, False, 0
        with contextlib.suppress(ps.Error):
            ppid = p.ppid()
            cmd = " ".join(p.cmdline()) or p.name()
        with contextlib.suppress(ps.Error):
            job = p.environ().get("SLURM_JOB_ID")
        with contextlib.suppress(ps.Error):
            ours = any(a.pid == self.me for a in p.parents())
        parent = ""
        with contextlib.suppress(ps.Error):
            parent = "this process" if ppid == self.me else " ".join(ps.Process(ppid).cmdline())
        return ProcInfo(p.pid, ppid, cmd, job, ours, parent)

    def sample(self) -> None:
        ps = self.psutil
        for p in ps.process_iter():
            if p.pid in self.baseline or p.pid == self.me:
                continue
            try:
                rss = p.memory_info().rss
                cpu = sum(p.cpu_times()[:2])
            except ps.Error:
                continue
            info = self.procs.get(p.pid)
            if info is None:
                info = self.procs[p.pid] = self._info(p)
            info.peak = max(info.peak, rss)
            info.cpu = max(info.cpu, cpu)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        t0, t1 = self.cpu_machine0, self.psutil.cpu_times()
        idle = ("idle", "iowait")
        self.busy = sum(getattr(t1, f) - getattr(t0, f) for f in t1._fields if f not in idle and f not in ("guest", "guest_nice"))
        self.self_cpu = sum(self.psutil.Process().cpu_times()[:2]) - self.cpu_self0

    def relevant(self, jobs: set[str]) -> tuple[list[ProcInfo], int]:
        """This run's processes (descendants of this one, or in one of ``jobs``), largest
        peak first; and how many new processes were left out (not this run's)."""
        mine = [i for i in self.procs.values() if i.ours or (i.job is not None and i.job in jobs)]
        return sorted(mine, key=lambda i: -i.peak), len(self.procs) - len(mine)


def short_cmd(cmd: str, parent: str = "", words: int = 4) -> str:
    """The first words of a command line, the program by its base name; a multiprocessing
    spawn child (``python -c 'from multiprocessing.spawn import spawn_main ...'``) as
    ``spawn child of`` its parent's first words."""
    if "spawn_main" in cmd:
        return "spawn child of " + (short_cmd(parent, words=3) if parent and parent != "this process" else "this process")
    parts = cmd.split()
    if not parts:
        return "?"
    parts[0] = os.path.basename(parts[0])
    s = " ".join(parts[:words])
    return s if len(s) <= 60 else s[:57] + "..."


# ---------------------------------------------------------------------------
# SLURM helpers
# ---------------------------------------------------------------------------


def slurm_busy() -> str | None:
    """Why the node is not free for this benchmark, or None when idle with an empty queue."""
    states = sh("sinfo", "-h", "-o", "%T").split()
    queue = sh("squeue", "-h", "-o", "%i %j %u %T")
    if not states:
        return "sinfo answered nothing (is slurmctld up? bash .ci/start-slurm)"
    if queue:
        return f"jobs in the queue: {'; '.join(queue.splitlines())}"
    if "idle" not in states:
        return f"node state {' '.join(states)}"
    return None


def wait_for_slurm() -> dict:
    """Wait (poll every 10 s, up to 15 min) until the node is idle and the queue empty."""
    t0 = time.perf_counter()
    why = slurm_busy()
    first = why
    while why is not None and time.perf_counter() - t0 < SLURM_WAIT:
        say(f"  SLURM busy ({why}): waiting, {time.perf_counter() - t0:.0f} s so far")
        time.sleep(SLURM_POLL)
        why = slurm_busy()
    waited = time.perf_counter() - t0
    if first is not None:
        say(f"  waited {waited:.0f} s for SLURM: " + ("now idle" if why is None else f"still busy, running anyway ({why})"))
    return {"waited": waited, "busy_at_start": first, "busy_when_run": why}


def job_resources(job: str) -> dict[str, str]:
    """``scontrol show job -o JOB``: the fields of interest (empty once SLURM forgot it)."""
    out = sh("scontrol", "show", "job", "-o", job)
    fields: dict[str, str] = {}
    for k, v in re.findall(r"(\w[\w:/]*)=(\S*)", out):
        fields.setdefault(k, v)
    keep = ("JobId", "JobName", "JobState", "NumCPUs", "MinMemoryNode", "TimeLimit", "Partition", "NodeList", "SubmitTime", "StartTime",
            "Command", "StdOut")
    return {k: fields[k] for k in keep if k in fields}


# ---------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------


@dataclass
class Run:
    engine: str
    k: int
    store: str
    wall: float = math.nan
    up: float = math.nan
    fit: float = math.nan
    write: float = math.nan
    stats: float = math.nan
    status: str = "failed"
    error: str | None = None
    peaks: list[dict] = field(default_factory=list)  # this run's processes, largest first
    left_out: int = 0
    jobs: list[str] = field(default_factory=list)
    other_jobs: list[str] = field(default_factory=list)  # another user's volnorm-worker jobs seen during the run
    cpu: dict = field(default_factory=dict)
    queue_during: str = ""
    job_resources: dict[str, dict] = field(default_factory=dict)
    slurm_wait: dict | None = None
    cache_dropped: bool = False
    running_on: str = ""
    passes: list = field(default_factory=list)
    check: str = ""

    @property
    def worker_peak(self) -> int:
        return self.peaks[0]["peak"] if self.peaks else 0


class RunEcho(Echo):
    """``bench_scale.Echo`` that also notes when the ``running on`` line arrives and, on
    SLURM, looks up this run's worker jobs (in a thread, not holding up the run)."""

    def __init__(self, slurm: bool, known_jobs: set[str]) -> None:
        super().__init__(live=False)
        self.slurm = slurm
        self.known = known_jobs
        self.t_up: float | None = None
        self.running_on = ""
        self.jobs: list[str] = []
        self.resources: dict[str, dict] = {}
        self.thread: threading.Thread | None = None
        self.queue = ""

    def __call__(self, text: str) -> None:
        super().__call__(text)
        for line in text.splitlines():
            if self.t_up is None and line.startswith("running on"):
                self.t_up = time.perf_counter()
                self.running_on = line
                say(f"  | {line}")
                self.thread = threading.Thread(target=self._lookup, daemon=True)
                self.thread.start()
            elif re.match(r"\s+(fit \S+|write): ", line) or re.match(r"\s+statistics -> ", line):
                say(f"  | {line.strip()[:100]}")

    def _lookup(self) -> None:
        ids = [j for j in sh("squeue", "-h", "-n", JOB_NAME, "-o", "%i").split() if j not in self.known]
        self.queue = sh("squeue", "-h", "-o", "%i %j %T")
        if not self.slurm:
            return
        self.jobs = ids  # candidates: another user's volnorm-worker jobs may be listed too (checked later)
        self.resources = {j: job_resources(j) for j in ids}


def drop_caches() -> bool:
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    time.sleep(0.2)
    return True


def engine_section(name: str, workdir: Path) -> dict:
    if name == "local":
        return {"scheduler": "local", "n_workers": 2, "memory_limit": "1GiB"}
    return {
        "scheduler": "slurm", "jobs": 1, "min_workers": 2, "wait": 300,
        "cluster": {
            "cores": 2, "memory": "3GB", "walltime": "00:30:00", "queue": "debug",
            "shared_temp_directory": str(workdir), "scheduler_options": {"host": "127.0.0.1"},
            "log_directory": str(workdir / "worker-logs"),
        },
    }


def run_once(name: str, k: int, cohort: Path, workdir: Path) -> Run:
    import volnorm as vn
    from volnorm.io.store import DEFAULT_CODEC

    out = workdir / "out" / f"{name}-{k}.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_output(out)
    spec = spec_for(cohort, out, "1GiB", DEFAULT_CODEC, f"bench-slurm-{name}-{k}")
    spec["engine"] = engine_section(name, workdir)
    R = Run(name, k, str(out))
    say(f"\n== run {k + 1}, {name}")
    R.slurm_wait = wait_for_slurm()
    known = set(sh("squeue", "-h", "-n", JOB_NAME, "-o", "%i").split())
    R.cache_dropped = drop_caches()
    echo = RunEcho(name == "slurm", known)
    sampler = NewProcessSampler(0.05)
    sampler.start()
    t0 = time.perf_counter()
    try:
        R.status = vn.pipeline.run(spec, echo=echo).status
    except Exception as e:  # noqa: BLE001 - a failed run is a result
        R.error = f"{type(e).__name__}: {e}"
    t1 = time.perf_counter()
    sampler.stop()
    if echo.thread is not None:
        echo.thread.join(30)
    R.wall = t1 - t0
    R.running_on = echo.running_on
    R.up = (echo.t_up - t0) if echo.t_up is not None else math.nan
    R.jobs, R.job_resources = echo.jobs, echo.resources
    passes, problems = passes_from(echo, t0, t1)
    R.passes = passes
    for pname, sec in passes:
        if pname.startswith("pass 1"):
            R.fit = sec if math.isnan(R.fit) else R.fit + sec
        elif pname.startswith("pass 2"):
            R.write = sec
        elif pname.startswith("passes 3-4"):
            R.stats = sec
    if problems and R.error is None:
        R.error = "; ".join(problems)
    # the jobs as the workers' environments name them too (a cross-check of squeue's answer)
    # squeue's answer lists every volnorm-worker job submitted since the run started, another
    # user's too: ours are those that log to this run's log_directory or whose script our
    # sbatch submitted, else those whose workers we saw (SLURM_JOB_ID of a dask_worker process)
    scripts = {i.cmd.split()[-1] for i in sampler.procs.values() if i.ours and i.cmd.split()[:1] and os.path.basename(i.cmd.split()[0]) == "sbatch"}
    env_jobs = {i.job for i in sampler.procs.values() if i.job and "dask_worker" in i.cmd} if name == "slurm" else set()
    candidates = set(R.jobs) | (env_jobs - known)
    logs = str(workdir / "worker-logs") + "/"
    info = {j: job_resources(j) for j in candidates}
    ours = ({j for j in candidates if info[j].get("StdOut", "").startswith(logs) or info[j].get("Command") in scripts}
            or (candidates & env_jobs))
    R.other_jobs = sorted(candidates - ours, key=int)
    R.jobs = sorted(ours, key=int)
    R.job_resources = {j: R.job_resources.get(j) or info[j] for j in R.jobs}
    jobs = ours
    mine, R.left_out = sampler.relevant(jobs)
    ours_cpu = sampler.self_cpu + sum(i.cpu for i in mine)
    R.cpu = {"machine_busy": sampler.busy, "this_run": ours_cpu, "other": max(0.0, sampler.busy - ours_cpu),
             "other_share": max(0.0, sampler.busy - ours_cpu) / (R.wall * (os.cpu_count() or 1))}
    R.queue_during = echo.queue
    R.peaks = [{"pid": i.pid, "peak": i.peak, "cmd": short_cmd(i.cmd, i.parent_cmd), "job": i.job, "child_of_this": i.ours} for i in mine]
    say(f"  {R.status}: end-to-end {R.wall:.1f} s, workers up at {R.up:.1f} s, fit {R.fit:.1f} s, write {R.write:.1f} s; "
        f"peaks {', '.join(fmt_mem(p['peak']) + ' (' + p['cmd'] + ')' for p in R.peaks[:2])}; {sampler.samples} samples"
        + (f"; jobs {', '.join(R.jobs)}" if R.jobs else "") + (f"; {R.left_out} other new processes left out" if R.left_out else ""))
    say(f"  CPU during the run: machine {R.cpu['machine_busy']:.1f} s busy, this run's processes {R.cpu['this_run']:.1f} s, "
        f"others {R.cpu['other']:.1f} s ({100 * R.cpu['other_share']:.0f} % of the {os.cpu_count()} cores x wall)"
        + (f"; other volnorm-worker jobs: {', '.join(R.other_jobs)}" if R.other_jobs else "")
        + (f"; queue at workers up: {'; '.join(R.queue_during.splitlines())}" if R.queue_during else ""))
    if R.error:
        say(f"  PROBLEM: {R.error}")
    return R


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------


def chunk_digests(store: Path) -> dict[str, str]:
    """sha256 of every chunk file of a Zarr store, by path (metadata aside)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.rglob("*"))
            if p.is_file() and "/c/" in f"/{p.relative_to(store)}"}


def same_voxels(a: Path, b: Path) -> str:
    """'' when the two stores hold the same voxels, else why not."""
    import numpy as np
    import zarr

    if not (a / "zarr.json").exists() or not (b / "zarr.json").exists():
        return "a store is missing"
    da, db = chunk_digests(a), chunk_digests(b)
    if not da:
        return "no chunk files"
    if da == db:
        return ""
    # bytes differ (another compressor state?): compare the decoded volumes
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    va, vb = sorted(k for k, _ in ga.groups()), sorted(k for k, _ in gb.groups())
    if va != vb:
        return f"volumes differ: {len(va)} vs {len(vb)}"
    for v in va:
        if not np.array_equal(ga[v]["0"][...], gb[v]["0"][...]):
            return f"volume {v} differs"
    return ""


def csv_rows(store: Path) -> list[str]:
    p = store.with_suffix(".csv")
    return p.read_text().splitlines()[1:] if p.exists() else []


def check_pair(local: Run, slurm: Run, n: int) -> str:
    problems = []
    for r in (local, slurm):
        if r.status != "done":
            problems.append(f"{r.engine} {r.status}: {r.error}")
    why = same_voxels(Path(local.store), Path(slurm.store))
    if why:
        problems.append(f"voxels: {why}")
    rl, rs = csv_rows(Path(local.store)), csv_rows(Path(slurm.store))
    if rl != rs:
        problems.append(f"statistics CSVs differ ({len(rl)} vs {len(rs)} rows)")
    elif len([r for r in rl if r and not r.startswith(("#", "volume,"))]) != n:
        problems.append(f"statistics: {len(rl)} lines, expected {n} rows")
    return "ok" if not problems else "FAIL " + "; ".join(problems)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def n_files(gb: float) -> int:
    n = max(2, math.ceil(gb * GB / FILE_BYTES))
    return 2 * math.ceil(n / 2)


def link_inputs(workdir: Path, n: int) -> tuple[Path, str]:
    """A fresh folder of hard links to the first ``n`` phantoms (made if missing)."""
    src = sorted(PHANTOMS.glob("*.nii")) if PHANTOMS.is_dir() else []
    origin = f"hard links to the first {n} of {len(src)} files in {PHANTOMS}"
    if len(src) < n:
        import volnorm as vn

        gen = workdir / "phantoms"
        have = sorted(gen.glob("*.nii")) if gen.is_dir() else []
        if len(have) < n:
            shutil.rmtree(gen, ignore_errors=True)
            say(f"  {PHANTOMS} has {len(src)} files: making {n} phantoms with volnorm.datasets.make_cohort in {gen}")
            vn.datasets.make_cohort(gen, n, shape=SHAPE)
        src = sorted(gen.glob("*.nii"))
        origin = f"hard links to {n} phantoms made by volnorm.datasets.make_cohort in {gen}"
    d = workdir / f"input-{n}files"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for p in src[:n]:
        os.link(p, d / p.name)
    return d, origin


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def table(runs: list[Run], checks: dict[int, str]) -> list[str]:
    head = (f"{'run':<9} {'end-to-end s':>12} {'workers up s':>12} {'fit s':>6} {'write s':>7} {'rest s':>6} "
            f"{'peak wkr 1':>10} {'peak wkr 2':>10} {'wall s/l':>8} {'mem s/l':>7} {'other CPU':>9}  {'job':<5} check")
    lines = [head]
    by = {(r.engine, r.k): r for r in runs}
    for r in runs:
        pk = [p["peak"] for p in r.peaks[:2]] + [0, 0]
        ratio_w = ratio_m = ""
        local = by.get(("local", r.k))
        if r.engine == "slurm" and local is not None:
            ratio_w = f"{r.wall / local.wall:.2f}x"
            ratio_m = f"{r.worker_peak / local.worker_peak:.2f}x" if local.worker_peak else ""
        check = checks.get(r.k, "") if r.engine == "slurm" else ("ok" if r.status == "done" else f"FAIL {r.error}")
        lines.append(
            f"{r.engine + ' ' + str(r.k + 1):<9} {r.wall:12.1f} {r.up:12.1f} {r.fit:6.1f} {r.write:7.1f} {r.wall - r.up - r.fit - r.write:6.1f} "
            f"{pk[0] / MiB:7.0f} Mi {pk[1] / MiB:7.0f} Mi {ratio_w:>8} {ratio_m:>7} {100 * r.cpu.get('other_share', math.nan):8.0f}%  {','.join(r.jobs) or '-':<5} {check}"
        )
    lines.append("rest = end-to-end - workers up - fit - write: between the passes, the statistics, closing the cluster")
    lines.append("other CPU = CPU time of processes not of this run during it, in % of 2 cores x the run's wall time")
    lines.append("")
    for r in runs:
        names = "; ".join(f"{fmt_mem(p['peak'])} {p['cmd']}" for p in r.peaks[:2])
        lines.append(f"{r.engine} {r.k + 1} workers: {names}")
        for j, res in r.job_resources.items():
            lines.append(f"{r.engine} {r.k + 1} job {j}: NumCPUs={res.get('NumCPUs', '?')} MinMemoryNode={res.get('MinMemoryNode', '?')} "
                         f"TimeLimit={res.get('TimeLimit', '?')} Partition={res.get('Partition', '?')} NodeList={res.get('NodeList', '?')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="voxel GB (10^9 bytes) of the cohort (default 1.0: 40 files)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench-slurm"), help="inputs, outputs, worker logs")
    ap.add_argument("--keep", action="store_true", help="keep the hard-linked inputs (the outputs are always deleted)")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs, local then slurm each (default 1)")
    ap.add_argument("--json", type=Path, help="also write every number as JSON here")
    args = ap.parse_args(argv)

    import dask
    import dask_jobqueue
    import distributed
    import psutil

    import volnorm as vn

    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    n = n_files(args.gb)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    host = {"cores": os.cpu_count(), "ram": psutil.virtual_memory().total, "platform": platform.platform()}
    versions = {"volnorm": vn.__version__, "dask": dask.__version__, "distributed": distributed.__version__,
                "dask_jobqueue": dask_jobqueue.__version__, "slurm": sh("sinfo", "--version"),
                "python": platform.python_version()}
    say(f"host    : {host['cores']} cores, {host['ram'] / 2**30:.1f} GiB RAM, {host['platform']}")
    say(f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    say(f"load    : {' '.join(f'{x:.2f}' for x in load0)} (1, 5, 15 min) at start")
    cohort, origin = link_inputs(workdir, n)
    say(f"data    : {n} x int16 {'x'.join(map(str, SHAPE))} .nii = {n * FILE_BYTES / GB:.3f} GB ({origin})")

    runs: list[Run] = []
    checks: dict[int, str] = {}
    try:
        for k in range(args.repeat):
            local = run_once("local", k, cohort, workdir)
            runs.append(local)
            slurm = run_once("slurm", k, cohort, workdir)
            runs.append(slurm)
            checks[k] = check_pair(local, slurm, n)
            say(f"  check local {k + 1} vs slurm {k + 1}: {checks[k]}")
            for r in (local, slurm):
                clear_output(Path(r.store))
    finally:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        shutil.rmtree(workdir / "worker-logs", ignore_errors=True)
        for p in workdir.glob("*.pem"):  # TLS halves dask-jobqueue may leave in shared_temp_directory
            p.unlink(missing_ok=True)
        if not args.keep:
            shutil.rmtree(cohort, ignore_errors=True)
            shutil.rmtree(workdir / "phantoms", ignore_errors=True)
    load1 = os.getloadavg()

    say("\n" + "=" * 100)
    say(f"host    : {host['cores']} cores, {host['ram'] / 2**30:.1f} GiB RAM; "
        f"{', '.join(f'{k} {v}' for k, v in versions.items())}")
    say(f"data    : {n} files, {n * FILE_BYTES / GB:.3f} GB; load {load0[0]:.2f} at start, {load1[0]:.2f} at end; "
        f"page cache dropped before each run: {'yes' if all(r.cache_dropped for r in runs) else 'no'}")
    waits = [r.slurm_wait for r in runs if r.slurm_wait and r.slurm_wait["busy_at_start"]]
    for w in waits:
        say(f"waited  : {w['waited']:.0f} s for SLURM ({w['busy_at_start']})" + (f"; ran while busy: {w['busy_when_run']}" if w["busy_when_run"] else ""))
    for line in table(runs, checks):
        say(line)
    say(f"time: {time.perf_counter() - t_all:.0f} s in all")

    if args.json:
        args.json.write_text(json.dumps({
            "host": host, "versions": versions, "files": n, "bytes": n * FILE_BYTES, "load_start": load0, "load_end": load1,
            "runs": [asdict(r) for r in runs], "checks": {str(k + 1): v for k, v in checks.items()},
            "engines": {e: engine_section(e, workdir) for e in ("local", "slurm")},
        }, indent=1, default=str))
        say(f"JSON: {args.json}")
    ok = all(r.status == "done" for r in runs) and all(c == "ok" for c in checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
