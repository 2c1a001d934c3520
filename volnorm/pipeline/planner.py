"""The plan of a run: inputs, digests, estimates, and what is already done."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volnorm._utils import plain_name
from volnorm.conversion import validate_inputs
from volnorm.engine import default_scheduler
from volnorm.engine.faults import format_size
from volnorm.io.location import Remote, is_url
from volnorm.io.nifti import expand_paths, file_stamp
from volnorm.io.readers import unique_names
from volnorm.io.store import digest, read_manifest
from volnorm.pipeline.spec import Spec, SpecError, load_spec
from volnorm.pipeline.steps import FITTED
from volnorm.voxel import open_voxel_histogram

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# the plan: inputs, digests, what is already done
# ---------------------------------------------------------------------------


def _identity(p: Path | Remote) -> list[Any]:
    size, mtime_ns = file_stamp(p)
    return [str(p), size, mtime_ns]


def _store_identity(p: Path) -> list[Any]:
    m = read_manifest(p) or {}
    if not m.get("complete"):
        raise ValueError(f"{p}: not a complete volnorm store")
    return [str(p), m.get("plan_digest"), m.get("finished")]


def _inputs(spec: Spec) -> tuple[str, list[Path], list[list[Any]], int, list[str], int]:
    """The kind of input, its files (or store), their identities, bytes of voxels, the names
    the output store will hold (its volume groups, or ``image``) and the voxels of the largest
    3-D volume (NIfTI input; else 0). Reads headers only."""
    inp = spec["input"]
    if "nifti" in inp:
        infos = validate_inputs(expand_paths(inp["nifti"], storage_options=spec.options("input")))
        files = [i.path if isinstance(i.path, Remote) else Path(i.path) for i in infos]
        voxels = max((math.prod(i.shape[:3]) for i in infos), default=0)
        return "nifti", files, [_identity(f) for f in files], sum(i.data_bytes for i in infos), unique_names(infos), voxels
    if "images" in inp:
        files = expand_paths(inp["images"], suffixes=(".png", ".tif", ".tiff", ".npy", ".jpg", ".jpeg", ".bmp"), what="image")
        return "images", files, [_identity(f) for f in files], sum(f.stat().st_size for f in files), ["image"], 0
    store = spec.store("input")
    if not (store / "zarr.json").exists():
        raise FileNotFoundError(f"{store}: no volnorm store here (input.store)")
    size = (sum(store.fs.du(store.path, total=False).values()) if isinstance(store, Remote)
            else sum(f.stat().st_size for f in store.rglob("*") if f.is_file()))
    m = read_manifest(store) or {}
    names = ["image"] if m.get("kind") == "images" else [str(v) for v in m.get("volumes") or []]
    return "store", [store], [_store_identity(store)], size, names, _store_voxels(store, names)


def _store_voxels(store: Path, names: list[str]) -> int:
    """The voxels of the largest 3-D volume of a store's volume groups (their arrays' metadata
    only); 0 for an image stack."""
    sizes = [0]
    for name in names if names != ["image"] else []:
        try:
            shape = json.loads((store / name / "0" / "zarr.json").read_text())["shape"]
        except (OSError, ValueError, KeyError):
            continue
        sizes.append(math.prod(shape[-3:]))
    return max(sizes)


def _digest(obj: Any) -> str:
    return digest(json.loads(json.dumps(obj, default=str)))


def plan(spec: str | os.PathLike | Mapping[str, Any] | Spec) -> dict[str, Any]:
    """The plan of a run, from the spec and the inputs' headers (no voxel is read).

    Parameters
    ----------
    spec : str, os.PathLike, mapping or Spec
        A pipeline spec as :func:`load_spec` takes it: a file, YAML text, a dict, or a loaded
        ``Spec``.

    Returns
    -------
    dict
        ``inputs`` (kind, count, bytes), ``passes`` (one fit pass per fitted step, then
        the write and the other outputs), ``digest`` (of everything the images depend on:
        spec, input identities, mask, parameters) and ``digests`` (one per output). Also
        ``files``, ``output`` (the store), ``engine``, the spec's ``name`` and source
        (``spec``), and the estimates ``chunk_bytes``, ``n4_bytes`` (an n4 task's whole volume and
        SimpleITK's copies of it; 0 without an n4 step) and ``memory`` (per worker).

    Examples
    --------
    >>> import volnorm as vn, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> f = vn.datasets.nibabel_files()["anatomical.nii"]
    >>> p = vn.pipeline.plan({"version": 1, "input": {"nifti": str(f)}, "steps": ["zscore"],
    ...                       "output": {"store": os.path.join(d, "out.zarr")}})
    >>> p["inputs"]["count"], [s for s, _ in p["passes"]]
    (1, ['fit zscore', 'write'])
    """
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    kind, files, ident, nbytes, names, voxels = _inputs(spec)
    fields = [st["options"]["field"] for st in spec["steps"] if st["name"] == "n4" and st["options"].get("field") is not None]
    if "after" in spec.data.get("mask", {}) and spec["outputs"]["images"]:  # the mask of a step's output is kept beside the images
        fields.append(MASK_GROUP)
    try:
        if "voxel_histogram" in spec["outputs"]:  # a group beside the volumes: never one of them
            plain_name(spec["outputs"]["voxel_histogram"]["name"], "outputs.voxel_histogram.name", taken=names + fields)
        for i, name in enumerate(fields):  # the bias fields' groups (and the mask's), beside the volumes too
            plain_name(name, "the n4 step's field", taken=names + fields[i + 1:])
    except ValueError as e:
        raise SpecError(f"{spec.source}: {e}") from None
    mask = dict(spec.data.get("mask", {}))
    if "file" in mask:
        mask["identity"] = _identity(Path(mask["file"]))
    params_id = None
    if "params_from" in spec.data:
        pf = Path(spec["params_from"])
        params_id = _store_identity(pf) if pf.is_dir() else _identity(pf)
    core = {
        "input": {k: v for k, v in spec["input"].items() if k != "storage_options"}, "identity": ident, "mask": mask,
        "steps": spec["steps"], "params_from": params_id, "codec": spec["output"]["codec"],
    }
    levels = spec["output"].get("levels", 1)
    if levels > 1 and "images" in spec["input"]:
        raise SpecError(f"{spec.source}: output.levels: {levels}: pyramids are written for volumes (NIfTI-Zarr groups); "
                        "a 2-D image stack is one array without levels")
    if levels > 1 or "downsample" in spec["output"]:  # without a pyramid: the digest it always had
        core["pyramid"] = [spec["output"].get("levels", 1), spec["output"].get("downsample")]
    images_digest = _digest(core)
    outs = spec["outputs"]
    passes: list[tuple[str, str]] = []
    mask_pass = ("fit mask threshold", f"{mask['threshold'].get('method', 'otsu')} over the "
                 + (f"output of step {mask['after']!r}" if "after" in mask else "input")) if "threshold" in mask else None
    if mask_pass and "after" not in mask:
        passes.append(mask_pass)
    again = ""  # each pass over the output of an n4 step runs N4 again (nothing is kept between passes)
    for st in spec["steps"]:
        if st["name"] in FITTED or st["name"] == "nyul":
            passes.append((f"fit {st['name']}", "statistics pass over the data so far" + again))
        again = again or (" (N4 runs again in this pass)" if st["name"] == "n4" else "")
        if mask_pass and st["name"] == mask.get("after"):
            passes.append((mask_pass[0], mask_pass[1] + again))
    if params_id is not None:
        passes.append(("load parameters", f"from {spec['params_from']}"))
    if outs["images"]:
        passes.append(("write", f"-> {spec['output']['store']}" + (f" ({levels} resolution levels)" if levels > 1 else "")
                       + "".join(f", bias fields -> {name}/<volume>" for name in fields if name != MASK_GROUP)
                       + (f", the mask -> {MASK_GROUP}/<volume>" if MASK_GROUP in fields else "")))
    if "voxel_histogram" in outs:
        passes.append(("voxel histogram", f"-> {spec['output']['store']}/{outs['voxel_histogram']['name']}"))
    if "statistics" in outs:
        passes.append(("statistics", f"-> {outs['statistics']['path']}"))
    digests = {"images": images_digest}
    for key in ("voxel_histogram", "statistics", "params"):
        if key in outs:
            digests[key] = _digest([images_digest, outs[key]])
    check_output_dirs(spec)
    cm = chunk_mib(spec["engine"], spec["input"].get("chunks"))
    volume = nbytes / max(1, len(files))
    chunk = min(volume, (cm if isinstance(cm, int) else 64) * 2**20)
    # a .nii.gz is decompressed whole by one task (open_nifti): the volume and the chunks cut
    # from it are held together until the chunks are consumed
    whole = 2 * volume if any(str(f).endswith(".gz") for f in files) else 0.0
    # an n4 task holds one whole volume as float32 in and out, and SimpleITK's copies
    n4 = N4_BYTES_PER_VOXEL * voxels if any(st["name"] == "n4" for st in spec["steps"]) else 0
    return {
        "chunk_bytes": chunk,
        "volume_bytes": whole / 2,
        # per worker: the process and its imports, then per thread the input chunk, float64
        # intermediates (up to 4x an int16 chunk) and the compressed output
        "memory": WORKER_BASE_BYTES + THREADS_PER_WORKER * (chunk * 10 + whole + n4),
        "n4_bytes": n4,
        "name": spec.data.get("name") or Path(spec.source).stem,
        "spec": spec.source,
        "inputs": {"kind": kind, "count": len(files), "bytes": nbytes, "first": str(files[0]) if files else None},
        "files": [str(f) for f in files],
        "passes": passes,
        "output": spec["output"]["store"],
        "digest": images_digest,
        "digests": digests,
        "engine": spec["engine"],
    }


#: Memory of an idle dask worker process after volnorm's imports (measured: 330-380 MiB).
WORKER_BASE_BYTES = 360 * 2**20
#: The group beside the images that a mask made from a step's output (``mask.after``) is
#: written into (``mask/<volume>``, uint8): the statistics and voxel histograms read it there
#: rather than running the steps up to it again.
MASK_GROUP = "mask"
#: Memory of one n4 task per voxel of its volume. Measured (psutil, RSS sampled every 5 ms) on a
#: 256x256x192 float32 phantom with the defaults (shrink 4, 4 x 50 iterations), SimpleITK
#: 2.5.7, one and two filter threads: 314 and 309 MiB over the process before the call, 26.2
#: bytes per voxel (6.5 x the float32 volume: the float32 image, its Otsu mask, the float64 log
#: field and its exponential, the float64 quotient, the two float32 results; 6.6 s). Plus the
#: task's float32 input block (4 bytes per voxel): 30, rounded up to 32.
N4_BYTES_PER_VOXEL = 32
#: Threads per worker of the local cluster (one: numpy and the kernels release the GIL in
#: large calls, and one thread keeps a worker's memory to one chunk's working set).
THREADS_PER_WORKER = 1


def check_output_dirs(spec: Spec) -> None:
    """Every output's parent directory exists (a run never creates directories above what
    the user named): said at plan time, before any data is read, dry runs included."""
    outs = spec["outputs"]
    named = [("output.store", spec["output"]["store"])]
    if "statistics" in outs:
        named.append(("outputs.statistics.path", outs["statistics"]["path"]))
    if "params" in outs:
        named.append(("outputs.params", outs["params"]))
    for key, path in named:
        if is_url(path):
            if key != "output.store":
                raise ValueError(f"{spec.source}: {key} {path}: only the output store may be a URL; write this file locally")
            spec.store("output").check_bucket()
            continue
        parent = Path(path).parent
        if not parent.is_dir():
            raise FileNotFoundError(f"{spec.source}: {key} {path}: the directory {parent} does not exist (create it first)")


def status(spec: Spec, p: dict[str, Any], overwrite: bool) -> dict[str, bool]:
    """Which outputs are already up to date; raise if one exists from another spec or input."""
    outs = spec["outputs"]
    done: dict[str, bool] = {}
    store = spec.store("output")
    if outs["images"] or "voxel_histogram" in outs:
        m = read_manifest(store) if store.exists() else None
        mine = (m or {}).get("pipeline", {}).get("digest")
        if m is not None and m.get("complete") and mine == p["digest"]:
            done["images"] = True
        elif m is not None and not overwrite:
            why = ("was written by another spec or from other inputs" if mine else "was not written by volnorm run") if m.get("complete") else "is incomplete"
            raise FileExistsError(f"{store}: {why}; pass overwrite=True (CLI: --overwrite) to replace it")
        else:
            done["images"] = False
    if "voxel_histogram" in outs:
        done["voxel_histogram"] = bool(done.get("images")) and _voxel_hist_done(store, outs["voxel_histogram"]["name"], p)
    for key in ("statistics", "params"):
        if key in outs:
            path = Path(outs[key]["path"] if key == "statistics" else outs[key])
            done[key] = _file_done(path, p["digests"][key], overwrite)
    return done


def _voxel_hist_done(store: Path, name: str, p: dict[str, Any]) -> bool:
    if not (store / name / "zarr.json").exists():
        return False
    h = open_voxel_histogram(store, name)
    return h.attrs.get("pipeline_digest") == p["digests"]["voxel_histogram"]


def _file_done(path: Path, want: str, overwrite: bool) -> bool:
    if not path.exists():
        return False
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        head = ""
    if want in head:
        return True
    if not overwrite:
        raise FileExistsError(f"{path}: exists and was not written by this spec; pass overwrite=True (CLI: --overwrite) to replace it")
    return False


def describe(p: dict[str, Any], done: Mapping[str, bool] | None = None) -> str:
    """The plan as text, for people."""
    inp = p["inputs"]
    eng = p["engine"]
    lines = [
        f"volnorm run {p['name']}  (spec {p['spec']})",
        f"  input   {inp['count']} {inp['kind']} input(s), {inp['bytes'] / 1e6:.1f} MB, first {inp['first']}",
        f"  output  {p['output']}",
        f"  engine  {eng.get('scheduler') or default_scheduler()}" + (f", {eng['n_workers']} workers" if eng.get("n_workers") else "")
        + (f", memory limit {format_size(eng['memory_limit'])} per worker" if eng.get("memory_limit") not in (None, "auto") else ""),
    ]
    if p.get("memory"):
        lines.append(
            f"  memory  ~{p['memory'] / 2**20:.0f} MiB per worker (estimate: {WORKER_BASE_BYTES / 2**20:.0f} MiB for the process, "
            f"then {THREADS_PER_WORKER} thread x 10 x {p['chunk_bytes'] / 2**20:.1f} MiB input chunks"
            + (f", and 2 x {p['volume_bytes'] / 2**20:.1f} MiB: a .nii.gz volume read whole and its chunks" if p.get("volume_bytes") else "")
            + (f", and {p['n4_bytes'] / 2**20:.0f} MiB: an n4 task's whole volume, {N4_BYTES_PER_VOXEL} bytes per voxel)" if p.get("n4_bytes") else ")")
        )
        limit = eng.get("memory_limit")
        if isinstance(limit, (int, float)) and p["memory"] > 0.8 * limit:
            lines.append(
                f"  WARNING the estimate is above the pause threshold ({0.8 * limit / 2**20:.0f} MiB = 0.8 x the memory limit): "
                "raise engine.memory_limit or set smaller input.chunks"
            )
    lines.append("  passes")
    for i, (name, what) in enumerate(p["passes"], 1):
        lines.append(f"    {i}. {name}: {what}")
    if done:
        have = [k for k, v in done.items() if v]
        if have:
            lines.append(f"  up to date: {', '.join(have)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


def chunk_mib(eng: Mapping[str, Any], given: Any) -> Any:
    """The input's chunks: as given, else sized from the worker memory limit (a sixteenth of
    it per thread, 8-64 MiB), else volnorm's default (~64 MiB slabs)."""
    if given not in (None, "auto"):
        return given
    limit = eng.get("memory_limit")
    if isinstance(limit, (int, float)) and limit > 0:
        return int(min(64, max(8, limit / 16 / 2**20)))
    return None

