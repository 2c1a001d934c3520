"""Running a spec: lock the output, start the engine, fit, write, and the outputs beside the images."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from volnorm import _dims
from volnorm.engine import ClusterLostError, Engine, RunStalledError, current, eager_roots, faults, running
from volnorm.engine.faults import PoisonInputError, WorkerMemoryError
from volnorm.io.readers import open_images, open_mask, open_nifti, open_zarr
from volnorm.io.location import is_url, location
from volnorm.io.objectstore import staging_for
from volnorm.io.store import read_manifest
from volnorm.io.writers import write_staged
from volnorm.pipeline.outputs import atomic_write, statistics_alongside, write_statistics, write_voxel_histogram, written_statistics
from volnorm.pipeline.planner import MASK_GROUP, THREADS_PER_WORKER, chunk_mib, describe, plan, status
from volnorm.pipeline.spec import Spec, load_spec, public, steps_before_mask
from volnorm.pipeline.steps import load_history, replay, run_steps
from volnorm.transforms import threshold

logger = logging.getLogger(__name__)

@dataclass
class RunResult:
    """What :func:`run` did: ``status`` is ``"done"``, ``"up to date"`` or ``"planned"`` (dry run),
    the outputs ``written`` and ``skipped`` (already up to date), and the ``seconds`` it took.

    Examples
    --------
    >>> r = RunResult("done", {}, written=["/data/out.zarr"], seconds=1.5)
    >>> print(r)
    volnorm run: done (1.5 s)
      wrote   /data/out.zarr
    """

    status: str
    plan: dict[str, Any]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"volnorm run: {self.status} ({self.seconds:.1f} s)"]
        lines += [f"  wrote   {w}" for w in self.written]
        lines += [f"  kept    {s} (already up to date)" for s in self.skipped]
        return "\n".join(lines)


def open_input(spec: Spec) -> xr.DataArray:
    """The spec's input as one lazy stack (volumes of different shapes are refused)."""
    inp = spec["input"]
    chunks = chunk_mib(spec["engine"], inp.get("chunks"))
    if "nifti" in inp:
        data = open_nifti(inp["nifti"], chunks=chunks, storage_options=spec.options("input"))
    elif "images" in inp:
        data = open_images(inp["images"], chunks=chunks if isinstance(chunks, (dict, tuple)) else None)
    else:
        data = open_zarr(inp["store"], storage_options=spec.options("input"))
    if isinstance(data, xr.DataTree):
        raise ValueError(f"{spec.source}: the inputs have different shapes; a pipeline needs volumes on one grid (register them first)")
    return data


#: A mask not made yet.
_UNSET: Any = object()


def _mask(spec: Spec, data: xr.DataArray) -> xr.DataArray | None:
    m = spec.data.get("mask")
    if not m:
        return None
    if "file" in m:
        return open_mask(m["file"], like=data)
    opts = _dims.resolve(_dims.words(m["threshold"], "mask.threshold", warn=False), data)
    method = opts.pop("method", "otsu")
    return data > threshold(data, method=method, **opts)


def _transformed(spec: Spec, data: xr.DataArray, fitted: list | None, say: Callable[[str], None],
                 fields: dict[str, xr.DataArray] | None = None) -> tuple[xr.DataArray, xr.DataArray | None]:
    """Apply the steps, with saved parameters (a resumed run, ``params_from``) or fitting them:
    the output and the spec's mask (from the input, or with ``mask.after`` from that step's
    output, given to the steps after it only). n4's fields go into ``fields``."""
    k = steps_before_mask(spec)
    todo = fitted if fitted is not None else spec["steps"]
    out = _apply(data, todo[:k], None, fitted is not None, fields, say)
    mask = _mask(spec, out)
    return _apply(out, todo[k:], mask, fitted is not None, fields, say), mask


def _apply(data: xr.DataArray, todo: list, mask: xr.DataArray | None, saved: bool, fields: dict | None,
           say: Callable[[str], None]) -> xr.DataArray:
    if saved:
        return replay(data, todo, mask=mask, fields=fields) if todo else data
    out = data
    for st in todo:
        t0 = time.perf_counter()
        out = run_steps(out, [(st["name"], dict(st["options"]))], mask=mask, fields=fields)
        say(f"  fit {st['name']}: {time.perf_counter() - t0:.1f} s")
    return out


def run(
    spec: str | os.PathLike | Mapping[str, Any],
    client: Any = None,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
) -> RunResult:
    """Run a pipeline spec (a YAML file, YAML text or a dict) to completion.

    Parameters
    ----------
    spec : path, YAML text or mapping
        Validated strictly before any data is read (:func:`volnorm.pipeline.load_spec`).
    client : distributed.Client, optional
        Run on this cluster; else the spec's ``engine`` (default: a local cluster on
        127.0.0.1 sized to the machine).
    dry_run : bool
        Print the plan (inputs, passes, outputs, memory per worker) and stop.
    overwrite : bool
        Replace outputs written by another spec or from other inputs.
    progress : bool, optional
        Progress bars (default: the spec's ``engine.progress`` when stderr is a terminal).
    echo : callable or None
        Where the plan and each pass's timing go (``print``; None: nowhere).

    Returns
    -------
    RunResult
        ``status`` "done", "up to date" (nothing to do) or "planned" (dry run).

    Examples
    --------
    >>> import volnorm as vn, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> spec = {"version": 1, "input": {"nifti": str(vn.datasets.nibabel_files()["anatomical.nii"])},
    ...         "steps": [{"rescale": {"percentiles": [1, 99]}}], "output": {"store": os.path.join(d, "out.zarr")},
    ...         "engine": {"scheduler": "threads"}}
    >>> vn.pipeline.run(spec, echo=None).status
    'done'
    >>> vn.pipeline.run(spec, echo=None).status   # the same spec again: nothing to do
    'up to date'
    """
    t_start, t_wall = time.perf_counter(), time.time()
    say = echo or (lambda _s: None)
    spec = load_spec(spec)
    p = plan(spec)
    done = status(spec, p, overwrite)
    show = progress if progress is not None else (spec["engine"].get("progress", True) and sys.stderr.isatty())
    say(describe(p, done))
    if dry_run:
        return RunResult("planned", p, seconds=time.perf_counter() - t_start)
    wanted = [k for k in done if not done[k]]
    if not wanted:
        say("nothing to do: every output is up to date")
        return RunResult("up to date", p, skipped=list(done), seconds=time.perf_counter() - t_start)
    result = RunResult("done", p, skipped=[k for k in done if done[k]])
    staging = _lock_output(spec, p, done, overwrite)  # before the engine starts (a cluster takes seconds)
    try:
        with engine(spec["engine"], client) as eng:
            say(f"running on {eng.description}")
            try:
                _run(spec, p, done, result, overwrite, show, say, staging)
            except BaseException as e:
                poison = faults.poison(e, p, eng.client, since=t_wall)
                if poison is not None:
                    raise poison from e
                raise
    except (ClusterLostError, PoisonInputError, RunStalledError, WorkerMemoryError) as e:
        kept = f" Committed before it stopped, and kept: {', '.join(result.written)}." if result.written else ""
        e.args = (f"{e.args[0]} Nothing incomplete was committed.{kept}",)
        raise
    finally:
        if staging is not None:
            staging.release()
    result.seconds = time.perf_counter() - t_start
    say(str(result))
    return result


@contextlib.contextmanager
def engine(eng: Mapping[str, Any], client: Any = None) -> Iterator[Engine]:
    """Run the dask graphs computed inside the block where a spec's ``engine`` section says
    (:func:`volnorm.engine.running`, with the section's options); a given ``client`` wins.

    Parameters
    ----------
    eng : mapping
        A validated spec's ``engine`` section (``scheduler`` absent: the default engine).
    client : distributed.Client, optional
        Run there instead.

    Yields
    ------
    volnorm.engine.Engine
        Its ``description`` says where the graphs run.

    Examples
    --------
    >>> with engine({"scheduler": "sync"}) as eng:
    ...     eng.description
    'synchronous (this thread)'
    """
    with running(
        client if client is not None else eng.get("scheduler"), allow_insecure=bool(eng.get("allow_insecure")),
        n_workers=eng.get("n_workers"), memory_limit=eng.get("memory_limit", "auto"), threads_per_worker=THREADS_PER_WORKER,
        cluster=eng.get("cluster"), jobs=int(eng.get("jobs", 1)), min_workers=int(eng.get("min_workers", 1)),
        wait=float(eng.get("wait", 3600)), stall_timeout=float(eng.get("stall_timeout") or 600), what="engine.scheduler",
    ) as e:
        yield e.start()  # a run's output is locked: start now, and say where


def _lock_output(spec: Spec, p: dict, done: Mapping[str, bool], overwrite: bool) -> Any:
    """The output store's :class:`~volnorm.io.store.Staging`, its lock taken (None when the
    images are up to date): a second run on the same output is refused here, in a second,
    not after its cluster has started. Release it when the run ends."""
    if done.get("images", True):
        return None
    staging = staging_for(spec.store("output"), {"kind": "pipeline", "digest": p["digest"]}, overwrite=overwrite,
                          inputs=[location(f, spec.options("input")) if is_url(f) else Path(f) for f in p["files"]])
    staging.check_output()
    staging._acquire()
    return staging


def _run(spec: Spec, p: dict, done: dict, result: RunResult, overwrite: bool, show: bool, say: Callable[[str], None],
         staging: Any = None) -> None:
    outs = spec["outputs"]
    store = spec.store("output")
    data = open_input(spec)
    mask: Any = _UNSET  # made with the steps (with mask.after: from that step's output)
    fitted = load_history(spec["params_from"]) if "params_from" in spec.data else None
    if not done.get("images", True):
        stack = contextlib.ExitStack()
        if staging is None:
            staging = _lock_output(spec, p, done, overwrite)
        eng = current()
        try:
            # the fit and write passes are fused chains of tasks: every root task to the workers at once
            stack.enter_context(eager_roots(eng.client if eng is not None else None))
            staging._prepare(None)  # the lock is held since _lock_output: create or resume the staging group
            saved = staging.manifest().get("pipeline_fitted") if staging.resumed else None
            if saved is not None:
                say("  resuming: the fitted parameters of the interrupted run are reused")
            fields: dict[str, xr.DataArray] = {}
            out, mask = _transformed(spec, data, saved if saved is not None else fitted, say, fields)
            if steps_before_mask(spec):  # a mask of a step's output: written beside the images, from the same tasks
                fields[MASK_GROUP] = mask.assign_attrs({k: v for k, v in out.attrs.items() if k not in ("nifti_scaled", "volnorm_params")})
            history = json.loads(out.attrs.get("volnorm_params", "[]"))
            staging.update_manifest(pipeline_fitted=history)
            t0 = time.perf_counter()
            along = statistics_alongside(out, outs["statistics"], mask, p["digests"]["statistics"]) if "statistics" in outs and not done.get("statistics") else None
            with staging.named_errors():
                write_staged(out, staging, codec=spec["output"]["codec"], steps=history, progress=show, statistics=along, beside=fields,
                             levels=spec["output"].get("levels", 1), downsample=spec["output"].get("downsample"),
                             manifest={"pipeline": {"digest": p["digest"], "spec": public(spec.data), "source": spec.source, "inputs": p["files"]}})
            say(f"  write: {time.perf_counter() - t0:.1f} s -> {store}")
            result.written.append(str(store))
        finally:
            stack.close()
            staging.release()
    if outs["images"]:  # the written images (opened only when read: 300 volumes take seconds), their steps
        output = functools.cache(lambda: open_zarr(store))
        history = list((read_manifest(store) or {}).get("steps", []))
        if steps_before_mask(spec):  # the mask of a step's output, as written (not made again from that step)
            mask = open_zarr(store, group=MASK_GROUP) != 0
        elif mask is _UNSET:  # the images were up to date: the mask of the input
            mask = _mask(spec, data)
    else:  # statistics / params only: the transformed data, lazily
        out, mask = _transformed(spec, data, fitted, say)
        output = functools.cache(lambda: out)
        history = json.loads(out.attrs.get("volnorm_params", "[]"))
    if "voxel_histogram" in outs and not done.get("voxel_histogram"):
        write_voxel_histogram(store, output(), outs["voxel_histogram"], mask, p, show, say)
        result.written.append(f"{store}/{outs['voxel_histogram']['name']}")
    if "statistics" in outs and not done.get("statistics"):
        rows = written_statistics(store, p["digests"]["statistics"]) if outs["images"] else None
        path = write_statistics(output if rows is None else None, outs["statistics"], mask, p["digests"]["statistics"], rows)
        say(f"  statistics -> {path}")
        result.written.append(str(path))
    if "params" in outs and not done.get("params"):
        path = Path(outs["params"])
        atomic_write(path, json.dumps({"volnorm_params": p["digests"]["params"], "steps": history}, indent=1, default=str))
        result.written.append(str(path))

