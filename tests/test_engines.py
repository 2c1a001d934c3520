"""engine.scheduler slurm / pbs / kubernetes: the job clusters of the optional extras.

SLURM runs for real: dask-jobqueue's SLURMCluster submits its job script with a stand-in
``sbatch`` that starts the script on this machine (a new session, as a job), and ``scancel``
kills it; the workers connect over TLS with the cluster's temporary certificates.
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import numpy as np
import pytest

import volnorm as vn
from volnorm.engine import import_keeping_sigint, job_cluster
from volnorm.pipeline.spec import SpecError, load_spec

pytestmark = pytest.mark.slow


def _fake_slurm(bin_dir: Path, jobs_dir: Path) -> None:
    bin_dir.mkdir()
    jobs_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        # stand-in sbatch: copy the job script (dask-jobqueue deletes it) and start it in its own session
        n=$(ls {jobs_dir} | wc -l)
        cp "$1" {jobs_dir}/job-$n.sh
        setsid bash {jobs_dir}/job-$n.sh > {jobs_dir}/job-$n.log 2>&1 < /dev/null &
        echo $! > {jobs_dir}/job-$n.pid
        echo "Submitted batch job $!"
    """))
    scancel = bin_dir / "scancel"
    scancel.write_text("#!/bin/bash\nfor j in \"$@\"; do kill -TERM -- -$j 2>/dev/null; done\nexit 0\n")
    for f in (sbatch, scancel):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)


def _need_jobqueue() -> None:
    """Skip without the extra; imported as volnorm does (SIGINT's handler kept)."""
    try:
        import_keeping_sigint("dask_jobqueue")
        import_keeping_sigint("cryptography")
    except ImportError as e:
        pytest.skip(f"the jobqueue extra is not installed: {e}")


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    _need_jobqueue()
    _fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "jobs"


def test_a_spec_runs_on_slurm_jobs_over_tls(slurm, tmp_path):
    files = vn.datasets.make_cohort(tmp_path / "data", n_subjects=3, shape=(20, 24, 16), seed=2)
    spec = {
        "version": 1, "input": {"nifti": str(tmp_path / "data" / "sub-*.nii")},
        "steps": [{"rescale": {"percentiles": [1, 99]}}], "output": {"store": str(tmp_path / "out.zarr")},
        "engine": {"scheduler": "slurm", "jobs": 1, "min_workers": 2, "wait": 120, "progress": False,
                   "cluster": {"cores": 2, "memory": "2GB", "walltime": "00:10:00",
                               "shared_temp_directory": str(tmp_path), "scheduler_options": {"host": "127.0.0.1"}}},
    }
    lines: list[str] = []
    assert vn.pipeline.run(spec, echo=lines.append).status == "done"
    assert any(line.startswith("running on slurm cluster tls://127.0.0.1:") for line in lines), lines
    got = vn.open_zarr(tmp_path / "out.zarr").values
    np.testing.assert_array_equal(got, vn.rescale(vn.open_nifti(files), percentiles=(1, 99)).values)
    script = (slurm / "job-0.sh").read_text()
    assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH -t 00:10:00" in script
    assert "--nthreads 1" in script and "--nworkers 2" in script and "--protocol tls://" in script
    assert "export OMP_NUM_THREADS=1" in script
    # the job was cancelled when the run ended
    pid = int((slurm / "job-0.pid").read_text())
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        __import__("time").sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_pbs_job_script_and_overrides():
    _need_jobqueue()
    c = job_cluster("pbs", {"cores": 4, "memory": "8GB", "walltime": "01:00:00", "queue": "short", "security": False,
                            "scheduler_options": {"host": "127.0.0.1"}})
    try:
        script = c.job_script()
    finally:
        c.close()
    assert "#PBS -q short" in script and "#PBS -l walltime=01:00:00" in script
    assert "--nworkers 4" in script and "--nthreads 1" in script and "tls://" not in script


def test_job_cluster_specs_are_validated():
    base = {"version": 1, "input": {"nifti": "a.nii"}, "output": {"store": "o.zarr"}}
    s = load_spec({**base, "engine": {"scheduler": "slurm", "jobs": 3, "cluster": {"cores": 8, "memory": "32GB"}}}, base="/b")
    assert s["engine"]["scheduler"] == "slurm" and s["engine"]["jobs"] == 3 and s["engine"]["min_workers"] == 1
    with pytest.raises(SpecError, match="engine.cluster: expected a mapping"):
        load_spec({**base, "engine": {"scheduler": "pbs", "cluster": ["cores", 8]}}, base="/b")
    with pytest.raises(SpecError, match="engine.jobs: expected a positive integer"):
        load_spec({**base, "engine": {"scheduler": "slurm", "jobs": 0}}, base="/b")


def test_kubernetes_needs_allow_insecure_and_the_extra(monkeypatch):
    with pytest.raises(ValueError, match="allow_insecure"), vn.pipeline.engine({"scheduler": "kubernetes"}):
        pass
    import sys

    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)  # not installed
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(ImportError, match=r"pip install 'volnorm\[kubernetes\]'"):
        with vn.pipeline.engine({"scheduler": "kubernetes", "allow_insecure": True}):
            pass


def test_a_job_cluster_without_tls_beyond_this_machine_is_refused(slurm):
    eng = {"scheduler": "slurm", "cluster": {"cores": 1, "security": False, "scheduler_options": {"host": "0.0.0.0"}}}
    with pytest.raises(ValueError, match="not encrypted"), vn.pipeline.engine(eng):
        pass
    assert not list(slurm.iterdir())  # nothing was submitted


def test_the_slurm_workflow_spec_runs_on_slurm_jobs(slurm, tmp_path):
    """workflows/cluster/normalize-on-slurm.yaml with this machine as its one-node SLURM."""
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


def test_importing_the_jobqueue_extra_keeps_the_sigint_handler():
    """dask-jobqueue 0.9 installs sys.exit as SIGINT's handler on import: Ctrl-C and the
    watchdog's wake-up would become SystemExit. The engine's import puts the handler back."""
    import subprocess
    import sys

    code = (
        "import signal, volnorm.engine as e\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "e.import_keeping_sigint('dask_jobqueue')\n"
        "assert signal.getsignal(signal.SIGINT) is before, signal.getsignal(signal.SIGINT)\n"
        "import dask_jobqueue.runner, importlib; importlib.reload(dask_jobqueue.runner)\n"
        "print('replaced' if signal.getsignal(signal.SIGINT) is not before else 'kept')\n"
    )
    _need_jobqueue()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "replaced"  # what the plain import does (the reason for the helper)
