"""The ready-made pipeline specs (workflows/examples) and cluster recipes (workflows/cluster).

Every spec in workflows/examples/ is validated, dry-run through the command line, and
run on small real data (a phantom cohort, scikit-image's sample images) on a real
process-based dask cluster; its outputs are checked against the same computation in
memory (numpy / scikit-image / the in-memory API), and running it again must change
nothing. A spec added to the folder is picked up by the parametrized tests; a
reference check for it goes into REFERENCE_CHECKS.

Specs use paths relative to their own directory (data/..., images/...): each test
copies the spec into a fresh workspace beside links to the shared sample data.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

import volnorm as vn
from volnorm.cli import main
from volnorm.pipeline.spec import Spec, load_spec
from volnorm.pipeline.steps import load_history

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
EXAMPLES = WORKFLOWS / "examples"
CLUSTER = WORKFLOWS / "cluster"
SPECS = sorted(EXAMPLES.glob("*.yaml"))
SBATCH = CLUSTER / "volnorm-run.sbatch"
K8S_JOB = CLUSTER / "volnorm-job.yaml"

#: 512x512 uint8 images that ship inside scikit-image; every 4th pixel -> a 128x128 stack
SKIMAGE_NAMES = ("camera", "moon", "brick", "grass", "gravel")
SPATIAL = ("z", "y", "x")


def _raw(spec: Path) -> dict:
    return yaml.safe_load(spec.read_text())


# ---------------------------------------------------------------------------
# sample data and workspaces
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_data(cohort, tmp_path_factory) -> Path:
    """The layout the example specs expect beside them:

    data/sub-00[1-6].nii[.gz]   the cohort (6 phantoms, 40x48x36, .nii and .nii.gz mixed)
    data/train/                 its first 4 subjects (Nyúl training set)
    data/test/                  its last 2 (Nyúl test set)
    images/*.png                5 scikit-image sample images, 128x128 uint8
    images-npy/stack.npy        the same 5 images as one (volume, y, x) array
    """
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("workflow-data")
    data = root / "data"
    for sub, files in (("", cohort), ("train", cohort[:4]), ("test", cohort[4:])):
        (data / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, data / sub / f.name)
    samples = vn.datasets.skimage_images()
    missing = [n for n in SKIMAGE_NAMES if n not in samples]
    if missing:  # pragma: no cover - they ship inside scikit-image's wheel
        pytest.skip(f"scikit-image sample images not available offline: {missing}")
    (root / "images").mkdir()
    (root / "images-npy").mkdir()
    stack = np.stack([samples[n][::4, ::4] for n in sorted(SKIMAGE_NAMES)])
    for name, img in zip(sorted(SKIMAGE_NAMES), stack):
        iio.imwrite(root / "images" / f"{name}.png", img)
    np.save(root / "images-npy" / "stack.npy", stack)
    return root


def _workspace(sample_data: Path, where: Path) -> Path:
    """A fresh directory with every example spec and links to the sample data."""
    where.mkdir(parents=True, exist_ok=True)
    for entry in sample_data.iterdir():
        (where / entry.name).symlink_to(entry, target_is_directory=True)
    for spec in SPECS:
        shutil.copy(spec, where / spec.name)
    return where


def _prerequisites(spec: Path) -> list[Path]:
    """The example specs whose outputs ``spec`` reads (``params_from`` / ``input.store``), in run order."""
    raw = _raw(spec)
    needs = [raw.get("params_from"), raw["input"].get("store")]
    out: list[Path] = []
    for other in SPECS:
        if other == spec:
            continue
        o = _raw(other)
        produced = {o["output"]["store"], (o.get("outputs") or {}).get("params")}
        if produced & {n for n in needs if n}:
            out += [p for p in _prerequisites(other) if p not in out] + [other]
    return out


def _snapshot(ws: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file and directory written in ``ws`` (the data links excluded)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(ws):  # does not follow the links to the data
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            st = p.stat()
            snap[str(p.relative_to(ws))] = (st.st_mtime_ns, st.st_size)
    return snap


def _threads(spec: Path) -> Spec:
    s = load_spec(spec)
    s.data["engine"]["scheduler"] = "threads"
    return s


def _read_stats(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
        return [{k: (v if k == "volume" else float(v)) for k, v in row.items()} for row in csv.DictReader(io.StringIO("\n".join(lines)))]
    return json.loads(path.read_text())["volumes"]


def _otsu_mask(d: xr.DataArray) -> xr.DataArray:
    """The specs' `mask: {threshold: {method: otsu, dim: volume}}`, in memory."""
    return d > vn.threshold(d, "otsu", dim=SPATIAL)


def _nifti(ws: Path, glob: str) -> xr.DataArray:
    return vn.open_nifti(sorted(ws.glob(glob))).compute()


# ---------------------------------------------------------------------------
# reference checks: each spec's outputs against the same computation in memory
# ---------------------------------------------------------------------------


def check_normalize_cohort(ws: Path) -> None:
    d = _nifti(ws, "data/sub-*.nii*")
    m = _otsu_mask(d)
    # numpy: the 1st/99th percentile of the masked voxels of the whole cohort, mapped to [0, 1], clipped
    lo, hi = np.percentile(d.values[m.values], [1, 99])
    out = vn.open_zarr(ws / "normalized.zarr")
    assert out.sizes["volume"] == 6 and out.dtype == np.float32
    np.testing.assert_array_equal(out["volume"].values, d["volume"].values)
    np.testing.assert_allclose(out.values, np.clip((d.values - lo) / (hi - lo), 0, 1), rtol=0, atol=1e-6)
    # the in-memory API, exactly
    xr.testing.assert_equal(out.drop_attrs().reset_coords(drop=True), vn.rescale(d, percentiles=(1, 99), mask=m).drop_attrs().reset_coords(drop=True))
    # the fitted window, in the params file and in the store's provenance
    steps = json.loads((ws / "normalized-params.json").read_text())["steps"]
    assert [s["method"] for s in steps] == ["rescale"]
    window = vn.Params.from_dict(steps[0]).values
    np.testing.assert_allclose([float(window["in_lo"]), float(window["in_hi"])], [lo, hi])
    assert load_history(ws / "normalized.zarr") == steps
    # per-volume statistics of the output inside the mask
    rows = _read_stats(ws / "normalized-statistics.csv")
    assert [r["volume"] for r in rows] == list(d["volume"].values)
    for i, r in enumerate(rows):
        inside = out.values[i][m.values[i]].astype(np.float64)
        assert r["count"] == inside.size
        np.testing.assert_allclose([r["mean"], r["min"], r["max"]], [inside.mean(), inside.min(), inside.max()], rtol=1e-5)
        np.testing.assert_allclose(r["q0.5"], np.percentile(inside, 50), rtol=1e-5)


def check_equalize_stack(ws: Path, store: str = "equalized.zarr", names: list[str] | None = None) -> None:
    import imageio.v3 as iio
    from skimage import exposure

    files = sorted(ws.glob("images/*.png"))
    stack = np.stack([iio.imread(f) for f in files])
    out = vn.open_zarr(ws / store)
    assert out.dims == ("volume", "y", "x") and out.shape == stack.shape
    assert list(out["volume"].values) == (names or [f.stem for f in files])
    # scikit-image on the stacked array: one CDF over every pixel of the stack
    np.testing.assert_allclose(out.values, exposure.equalize_hist(stack), rtol=0, atol=1e-6)
    # the in-memory API, exactly
    ref = vn.equalize(xr.DataArray(stack, dims=("volume", "y", "x")))
    np.testing.assert_array_equal(out.values, ref.values)


def check_voxel_histograms(ws: Path) -> None:
    d = _nifti(ws, "data/sub-*.nii*")
    out = vn.open_zarr(ws / "voxel-histograms.zarr")
    xr.testing.assert_equal(out.drop_attrs().reset_coords(drop=True),
                            vn.rescale(d, percentiles=(0.5, 99.5), dim=SPATIAL).drop_attrs().reset_coords(drop=True))
    h = vn.open_voxel_histogram(ws / "voxel-histograms.zarr").compute()
    assert h.attrs["n_volumes"] == 6 and h.sizes["bin"] == 50
    # the in-memory API: histograms over the volume dim of the written images
    ref = vn.histogram(out, bins=50, range=(0, 1), dim="volume").compute()
    np.testing.assert_array_equal(h.values, ref.values)
    # numpy: np.histogram(values of one voxel, bins=50, range=(0, 1)) for every voxel; vectorized:
    # its edges are linspace in the data's float type (float32 here), the last bin closed
    x = np.moveaxis(out.values, 0, -1).reshape(-1, 6)  # (voxel, volume)
    edges = np.linspace(0, 1, 51, dtype=x.dtype)
    b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, 49)
    counts = np.zeros((x.shape[0], 50), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(x.shape[0]), 6), b.ravel()), 1)
    got = h.transpose(*SPATIAL, "bin").values.reshape(-1, 50)
    np.testing.assert_array_equal(got, counts)
    for i in np.random.default_rng(0).choice(x.shape[0], 300, replace=False):  # np.histogram itself
        np.testing.assert_array_equal(got[i], np.histogram(x[i], bins=50, range=(0, 1))[0])


def _nyul_options() -> tuple[list[float], tuple[float, float]]:
    opts = next(s["nyul"] for s in _raw(EXAMPLES / "nyul-train.yaml")["steps"] if isinstance(s, dict) and "nyul" in s)
    return opts["percentiles"], tuple(opts["standard_range"])


def check_nyul_train(ws: Path) -> vn.Params:
    ps, srange = _nyul_options()
    d = _nifti(ws, "data/train/sub-*.nii*")
    m = _otsu_mask(d)
    # numpy: each volume's landmarks (percentiles of its masked voxels), mapped onto the standard range, averaged
    land = np.array([np.percentile(d.values[i][m.values[i]], ps) for i in range(d.sizes["volume"])])
    standard = (srange[0] + (land - land[:, :1]) / (land[:, -1:] - land[:, :1]) * (srange[1] - srange[0])).mean(axis=0)
    steps = load_history(ws / "nyul-train.zarr")
    assert [s["method"] for s in steps] == ["nyul"]
    fitted = vn.Params.from_dict(steps[0])
    np.testing.assert_allclose(fitted.values["standard"].values, standard, rtol=1e-9)
    out = vn.open_zarr(ws / "nyul-train.zarr")
    p = vn.nyul_fit(d, mask=m, percentiles=ps, standard_range=srange)
    ref = vn.nyul_apply(d, p, mask=m)
    np.testing.assert_array_equal(out.values, ref.values)
    # between its first and last landmark each volume is mapped by np.interp onto the standard landmarks
    for i in range(d.sizes["volume"]):
        v = d.values[i].astype(np.float64)
        inside = (v >= land[i, 0]) & (v <= land[i, -1])
        np.testing.assert_allclose(out.values[i][inside], np.interp(v[inside], land[i], standard), rtol=1e-5, atol=1e-4)
    assert json.loads((ws / "nyul-train-params.json").read_text())["steps"][0]["method"] == "nyul"
    return fitted


def check_nyul_apply(ws: Path) -> None:
    ps, srange = _nyul_options()
    # the landmarks learnt on the training set, fitted again in memory (not read from the store)
    train = _nifti(ws, "data/train/sub-*.nii*")
    landmarks = vn.nyul_fit(train, mask=_otsu_mask(train), percentiles=ps, standard_range=srange)
    d = _nifti(ws, "data/test/sub-*.nii*")
    m = _otsu_mask(d)
    out = vn.open_zarr(ws / "nyul-test.zarr")
    np.testing.assert_array_equal(out["volume"].values, d["volume"].values)
    np.testing.assert_array_equal(out.values, vn.nyul_apply(d, landmarks, mask=m).values)
    # the test volumes were mapped, not fitted: their masked landmarks land on the training standard
    std = landmarks.values["standard"].values
    for i in range(d.sizes["volume"]):
        np.testing.assert_allclose(np.percentile(out.values[i][m.values[i]], ps), std, atol=0.05)
    rows = _read_stats(ws / "nyul-test-statistics.json")
    assert [r["volume"] for r in rows] == list(d["volume"].values)
    assert [r["count"] for r in rows] == [int(m.values[i].sum()) for i in range(d.sizes["volume"])]


REFERENCE_CHECKS: dict[str, Callable[[Path], object]] = {
    "normalize-cohort": check_normalize_cohort,
    "equalize-stack": check_equalize_stack,
    "voxel-histograms": check_voxel_histograms,
    "nyul-train": check_nyul_train,
    "nyul-apply": check_nyul_apply,
}


def check_outputs(spec: Spec, res) -> None:
    """What holds for any spec: every output exists, is complete and is this run's."""
    from volnorm.io.store import read_manifest

    outs = spec["outputs"]
    store = Path(spec["output"]["store"])
    n = vn.pipeline.open_input(spec).sizes["volume"]
    if outs["images"]:
        m = read_manifest(store)
        assert m["complete"] is True and m["pipeline"]["digest"] == res.plan["digest"]
        out = vn.open_zarr(store)
        assert out.sizes["volume"] == n and bool(np.isfinite(out).all())
    if "voxel_histogram" in outs:
        assert vn.open_voxel_histogram(store, outs["voxel_histogram"]["name"]).attrs["n_volumes"] == n
    if "statistics" in outs:
        assert len(_read_stats(Path(outs["statistics"]["path"]))) == n
    if "params" in outs:
        steps = json.loads(Path(outs["params"]).read_text())["steps"]
        want = [s["name"] for s in spec["steps"]] or [s["method"] for s in load_history(spec["params_from"])]
        assert [s["method"] for s in steps] == want


# ---------------------------------------------------------------------------
# the example specs
# ---------------------------------------------------------------------------


def test_there_are_examples():
    assert {p.stem for p in SPECS} >= set(REFERENCE_CHECKS)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_spec_is_valid_and_documented(path):
    spec = load_spec(path)
    assert spec["version"] == 1
    # every path is relative to the spec (resolved into its directory): the spec is copied, not edited
    paths = [*spec["input"].get("nifti", []), *spec["input"].get("images", []), spec["input"].get("store"),
             spec["output"]["store"], spec.data.get("params_from"), spec["outputs"].get("params"),
             spec["outputs"].get("statistics", {}).get("path")]
    for p in filter(None, paths):
        assert Path(p).parent.resolve().is_relative_to(EXAMPLES.resolve()), p
    text = path.read_text()
    assert f"volnorm run workflows/examples/{path.name}" in text  # says how to run it
    assert sum(ln.lstrip().startswith("#") for ln in text.splitlines()) >= 5  # and explains itself
    assert path.name in (WORKFLOWS / "README.md").read_text()


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_dry_run_writes_nothing(path, sample_data, tmp_path, capsys):
    ws = _workspace(sample_data, tmp_path / "ws")
    for pre in _prerequisites(path):
        assert vn.pipeline.run(_threads(ws / pre.name), echo=None).status == "done"
    before = _snapshot(ws)
    assert main(["run", str(ws / path.name), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"volnorm run {_raw(path).get('name', path.stem)}" in text and "passes" in text
    assert _snapshot(ws) == before


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_runs_on_a_cluster_and_again_is_up_to_date(path, sample_data, cluster_client, tmp_path):
    ws = _workspace(sample_data, tmp_path / "ws")
    for pre in _prerequisites(path):
        assert vn.pipeline.run(ws / pre.name, client=cluster_client, echo=None).status == "done"
    spec = load_spec(ws / path.name)
    res = vn.pipeline.run(ws / path.name, client=cluster_client, echo=None)
    assert res.status == "done" and res.skipped == []
    check_outputs(spec, res)
    if path.stem in REFERENCE_CHECKS:
        REFERENCE_CHECKS[path.stem](ws)
    # the same spec again: nothing to do, nothing touched (not even the manifest)
    before = _snapshot(ws)
    manifest = (Path(spec["output"]["store"]) / "zarr.json").read_text()
    again = vn.pipeline.run(ws / path.name, client=cluster_client, echo=None)
    assert again.status == "up to date" and again.written == []
    assert _snapshot(ws) == before
    assert (Path(spec["output"]["store"]) / "zarr.json").read_text() == manifest


@pytest.mark.slow
def test_equalize_stack_from_one_npy_file(sample_data, cluster_client, tmp_path):
    """The same spec with `input.images` one (volume, y, x) .npy array: the same result."""
    ws = _workspace(sample_data, tmp_path / "ws")
    spec = load_spec(ws / "equalize-stack.yaml")
    spec.data["input"]["images"] = [str(ws / "images-npy" / "stack.npy")]
    spec.data["output"]["store"] = str(ws / "equalized-npy.zarr")
    spec.data["outputs"]["params"] = str(ws / "equalized-npy-params.json")
    assert vn.pipeline.run(spec, client=cluster_client, echo=None).status == "done"
    check_equalize_stack(ws, "equalized-npy.zarr", names=[f"stack[{i}]" for i in range(len(SKIMAGE_NAMES))])


def test_params_file_of_a_run_replays_like_its_store(sample_data, tmp_path, capsys):
    """outputs.params ('the fitted steps as JSON, for volnorm apply / params_from') replays as the store does."""
    ws = _workspace(sample_data, tmp_path / "ws")
    assert vn.pipeline.run(_threads(ws / "nyul-train.yaml"), echo=None).status == "done"
    assert vn.pipeline.run(_threads(ws / "nyul-apply.yaml"), echo=None).status == "done"
    spec = _threads(ws / "nyul-apply.yaml")
    spec.data["params_from"] = str(ws / "nyul-train-params.json")
    spec.data["output"]["store"] = str(ws / "from-json.zarr")
    spec.data["outputs"]["statistics"]["path"] = str(ws / "from-json.json")
    assert vn.pipeline.run(spec, echo=None).status == "done"
    np.testing.assert_array_equal(vn.open_zarr(ws / "from-json.zarr").values, vn.open_zarr(ws / "nyul-test.zarr").values)
    # and `volnorm apply --params FILE` (without the mask: each volume's landmarks over all its voxels)
    assert main(["apply", *map(str, sorted(ws.glob("data/test/sub-*"))), str(ws / "applied.zarr"),
                 "--params", str(ws / "nyul-train-params.json"), "--scheduler", "sync"]) == 0
    d = _nifti(ws, "data/test/sub-*.nii*")
    landmarks = vn.Params.from_dict(load_history(ws / "nyul-train.zarr")[0])
    np.testing.assert_array_equal(vn.open_zarr(ws / "applied.zarr").values, vn.nyul_apply(d, landmarks).values)


# ---------------------------------------------------------------------------
# the command line against a real `dask scheduler` and `dask worker`
# ---------------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it spawned (its process group)."""
    pgid = proc.pid  # start_new_session: the group is the process's own
    if proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:  # a nanny's worker may outlive it by a moment; nothing of the group may stay
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=20)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {pgid} are still running")


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory) -> Iterator[str]:
    """A `dask scheduler` and a `dask worker` (with its nanny) as separate processes on 127.0.0.1.

    The scheduler takes a free port itself (--port 0) and writes its address to a
    scheduler file: no race for a port picked beforehand. Both run in their own
    process groups, which are killed at the end whatever happened.
    """
    pytest.importorskip("distributed")
    from distributed import Client

    d = tmp_path_factory.mktemp("dask-processes")
    sched_file = d / "scheduler.json"
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(d / name, "wb")) for name in ("scheduler.log", "worker.log")]
        try:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                 "--no-dashboard", "--scheduler-file", str(sched_file), "--idle-timeout", "300s"],
                stdout=logs[0], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=d,
            ))
            deadline = time.monotonic() + 60
            while True:
                try:
                    address = json.loads(sched_file.read_text())["address"]
                    break
                except (OSError, ValueError, KeyError):  # not written yet, or not whole yet
                    if procs[0].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the dask scheduler did not start:\n{(d / 'scheduler.log').read_text()}") from None
                    time.sleep(0.1)
            assert address.startswith("tcp://127.0.0.1:")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1",
                 "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "2GiB", "--death-timeout", "60"],
                stdout=logs[1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=d,
            ))
            with Client(address, set_as_default=False, timeout=30) as c:
                c.wait_for_workers(1, timeout=60)
            yield address
        finally:
            errors = []
            for p in reversed(procs):  # the worker first, then the scheduler; each whatever the other did
                try:
                    _stop(p)
                except Exception as e:  # noqa: BLE001 - reported below, after stopping the others
                    errors.append(e)
            if errors:
                raise errors[0]


@pytest.mark.slow
def test_cli_run_on_dask_scheduler_and_worker_processes(dask_processes, sample_data, tmp_path, capsys):
    ws = _workspace(sample_data, tmp_path / "ws")
    spec = str(ws / "normalize-cohort.yaml")
    assert main(["run", spec, "--scheduler", dask_processes, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"running on scheduler {dask_processes}" in text and "volnorm run: done" in text
    check_normalize_cohort(ws)
    before = _snapshot(ws)
    assert main(["run", spec, "--scheduler", dask_processes]) == 0
    assert "nothing to do: every output is up to date" in capsys.readouterr().out
    assert _snapshot(ws) == before


# ---------------------------------------------------------------------------
# SLURM: the sbatch script (engine.scheduler slurm: tests/test_engines.py)
# ---------------------------------------------------------------------------


def test_sbatch_script_is_valid_bash_with_the_directives():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, check=False).returncode == 0
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.MULTILINE))
    assert re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", directives["time"])
    assert int(directives["cpus-per-task"]) >= 1
    assert re.fullmatch(r"\d+[KMGT]?", directives["mem"])
    assert directives["signal"].startswith("B:TERM@") and "requeue" in directives  # walltime: stop cleanly, resume
    assert "volnorm run" in text and "--scheduler" in text
    assert "SLURM_CPUS_PER_TASK" in text and "SLURM_MEM_PER_NODE" in text


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_sbatch_sizing_keeps_every_spec_the_same_but_its_engine(path, tmp_path, monkeypatch):
    """The script's embedded Python (the sized copy of the spec), on every example spec (in-process)."""
    code = re.search(r"<<'PY'\n(.*?)\nPY\n", SBATCH.read_text(), re.DOTALL).group(1)
    sized = tmp_path / "sized.yaml"
    monkeypatch.setattr(sys, "argv", ["-", str(path), str(sized), "3", str(5 * 2**30)])
    exec(compile(code, f"{SBATCH.name} (python heredoc)", "exec"), {"__name__": "__main__"})  # noqa: S102 - our own script
    a, b = load_spec(path), load_spec(sized)
    assert b["engine"] == {**a["engine"], "scheduler": "local", "n_workers": 3, "memory_limit": 5 * 2**30}
    assert {**a.data, "engine": None, "name": None} == {**b.data, "engine": None, "name": None}  # paths absolute, same
    assert b["name"] == a.data.get("name", path.stem)


def _sbatch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VOLNORM_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # volnorm and python of this venv
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


@pytest.mark.slow
def test_sbatch_script_sizes_the_local_cluster_from_slurm(sample_data, tmp_path):
    """Run as SLURM would (bash, SLURM_* set), with --dry-run passed on to volnorm run: the plan shows
    a local cluster of SLURM_CPUS_PER_TASK workers sharing 90 % of SLURM_MEM_PER_NODE, nothing written.
    (The run itself through the script: test_sbatch_script_with_an_existing_scheduler.)"""
    ws = _workspace(sample_data, tmp_path / "ws")
    before = _snapshot(ws)
    env = _sbatch_env(tmp_path, SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="3", SLURM_MEM_PER_NODE="6144")
    r = subprocess.run(["bash", str(SBATCH), str(ws / "normalize-cohort.yaml"), "--dry-run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engine  local, 3 workers" in r.stdout and "1.80 GiB" in r.stdout
    sized = load_spec(tmp_path / "volnorm-spec-4242.yaml")
    assert sized["engine"]["n_workers"] == 3 and sized["engine"]["memory_limit"] == 6144 * 2**20 * 9 // 10 // 3
    assert sized["name"] == "normalize-cohort"
    assert _snapshot(ws) == before
    # without a memory size SLURM would give, the script refuses (usage), before running anything
    env.pop("SLURM_MEM_PER_NODE")
    r = subprocess.run(["bash", str(SBATCH), str(ws / "normalize-cohort.yaml")], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "submit with --mem" in r.stderr


@pytest.mark.slow
def test_sbatch_script_with_an_existing_scheduler(dask_processes, sample_data, tmp_path):
    ws = _workspace(sample_data, tmp_path / "ws")
    env = _sbatch_env(tmp_path, VOLNORM_SCHEDULER=dask_processes)
    r = subprocess.run(["bash", str(SBATCH), str(ws / "voxel-histograms.yaml")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"running on scheduler {dask_processes}" in r.stdout and "volnorm run: done" in r.stdout
    check_voxel_histograms(ws)
    # the engine is not part of the outputs' identity: the spec run elsewhere finds them up to date
    assert vn.pipeline.run(_threads(ws / "voxel-histograms.yaml"), echo=None).status == "up to date"


def test_sbatch_script_refuses_a_missing_spec(tmp_path):
    r = subprocess.run(["bash", str(SBATCH), str(tmp_path / "nope.yaml")], env=_sbatch_env(tmp_path),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "no spec file" in r.stderr


def test_sbatch_script_passes_sigterm_on_and_requeues(tmp_path):
    """SLURM's `--signal=B:TERM@300` signals the batch shell only: the script must pass SIGTERM on to
    `volnorm run`, return its exit code 3 and requeue the job. Stand-ins for `volnorm` (stops with
    exit 3 on SIGTERM, as the real one does) and `scontrol` (records its arguments) on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "volnorm").write_text('#!/bin/bash\necho "volnorm $*" > "$TMPDIR/volnorm.args"\n'
                                  "trap 'echo stopping; exit 3' TERM\necho started\nwhile :; do sleep 0.05; done\n")
    (bin_ / "scontrol").write_text('#!/bin/bash\necho "$*" > "$TMPDIR/scontrol.args"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\n")
    env = _sbatch_env(tmp_path, SLURM_JOB_ID="777", VOLNORM_SCHEDULER="tcp://127.0.0.1:8786")
    env["PATH"] = f"{bin_}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen(["bash", str(SBATCH), str(spec), "--overwrite"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)  # to the batch shell only, as SLURM's B: does
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 3, out + err
        assert "stopping" in out and "requeueing job 777" in err
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "777"]
        assert (tmp_path / "volnorm.args").read_text().split() == [
            "volnorm", "run", str(spec), "--scheduler", "tcp://127.0.0.1:8786", "--no-progress", "--overwrite"]
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------
# Kubernetes: the Job manifest and the spec in its ConfigMap
# ---------------------------------------------------------------------------


def _k8s() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(K8S_JOB.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def _quantity(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_kubernetes_job_manifest():
    docs = _k8s()
    assert set(docs) == {"ConfigMap", "Job"}
    job = docs["Job"]
    assert job["apiVersion"] == "batch/v1"
    spec = job["spec"]
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    if "podFailurePolicy" in spec:
        assert pod["restartPolicy"] == "Never"  # Kubernetes refuses it otherwise
        fail = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
        assert {1, 2} <= set(fail[0]["onExitCodes"]["values"]) and 3 not in fail[0]["onExitCodes"]["values"]
    (c,) = pod["containers"]
    cmd = " ".join(c["command"] + c.get("args", []))
    assert "volnorm run" in cmd
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    # the spec path in the command is the ConfigMap's key, mounted where the command looks
    spec_path = next(a for a in c["command"] if a.endswith((".yaml", ".yml")))
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    cm_vol = next(n for n, v in vols.items() if "configMap" in v)
    assert vols[cm_vol]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert spec_path == f"{mounts[cm_vol]}/{Path(spec_path).name}" and Path(spec_path).name in docs["ConfigMap"]["data"]
    assert all(n in vols for n in mounts)


def test_kubernetes_configmap_spec_validates_and_fits_the_container():
    docs = _k8s()
    (c,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
    key = Path(next(a for a in c["command"] if a.endswith((".yaml", ".yml")))).name
    spec = load_spec(docs["ConfigMap"]["data"][key])
    eng = spec["engine"]
    lim = c["resources"]["limits"]
    assert eng["scheduler"] == "local"
    assert eng["n_workers"] <= _quantity(lim["cpu"])
    assert eng["n_workers"] * eng["memory_limit"] < _quantity(lim["memory"])  # room left for the driver
    data_mounts = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    for p in [*spec["input"]["nifti"], spec["output"]["store"]]:
        assert any(p.startswith(m + "/") for m in data_mounts), p  # on the writable data volume


@pytest.mark.slow
def test_kubernetes_configmap_spec_runs(sample_data, cluster_client, tmp_path):
    """The ConfigMap's spec with /data/ pointing at a local folder: it runs and normalizes the cohort."""
    docs = _k8s()
    text = next(iter(docs["ConfigMap"]["data"].values()))
    root = tmp_path / "pvc"
    (root / "cohort").mkdir(parents=True)
    for f in (sample_data / "data").glob("sub-*.nii*"):
        (root / "cohort" / f.name).symlink_to(f)
    res = vn.pipeline.run(text.replace("/data/", f"{root}/"), client=cluster_client, echo=None)
    assert res.status == "done"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(root / "cohort", target_is_directory=True)
    for name in ("normalized.zarr", "normalized-statistics.csv", "normalized-params.json"):
        (ws / name).symlink_to(root / name)
    check_normalize_cohort(ws)  # the same spec as workflows/examples/normalize-cohort.yaml
