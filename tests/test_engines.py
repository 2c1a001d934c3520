"""engine.scheduler slurm / pbs / kubernetes: the job clusters of the optional extras, as far
as they go without a batch system (the job scripts, the checks before anything is submitted).
SLURM runs for real in ``tests/test_slurm.py``.
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

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
