"""``volnorm info``: describe a NIfTI file or a volnorm store for a person."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from volnorm._utils import format_bytes
from volnorm.integrity import DamagedStoreError, checked_store, quick_check
from volnorm.io.manifest import read_manifest
from volnorm.io.nifti import header_from_bytes, read_info
from volnorm.io.niftizarr import group_header
from volnorm.io.readers import open_nifti
from volnorm.io.location import Remote, location
from volnorm.io.store import staging_path
from volnorm.stats import summarize


def _affine_lines(affine: Any, indent: str = "    ") -> list[str]:
    a = np.asarray(affine, dtype=float)
    return [indent + "  ".join(f"{v:9.3f}" for v in row) for row in a]


def _stats_text(s: dict) -> str:
    if not s:
        return "not recorded"
    bad = ", ".join(f"{k} {s[k]}" for k in ("nan", "posinf", "neginf") if s.get(k))
    return f"min {s.get('min')}  max {s.get('max')}" + (f"  NON-FINITE: {bad}" if bad else "  (all finite)")


def describe(path: Path) -> tuple[str, dict]:
    """Return a text description and the same facts as a dict.

    Examples
    --------
    >>> from volnorm import datasets
    >>> text, facts = describe(datasets.nibabel_files()["standard.nii.gz"])
    >>> facts["shape"]
    [4, 5, 7]
    """
    where = location(path)
    if isinstance(where, Remote):  # an object-store URL: a store if it has a zarr.json
        return _describe_store(where) if (where / "zarr.json").exists() or where.url.endswith(".zarr") else _describe_nifti(where)
    path = Path(path)
    if path.is_dir() or str(path).endswith(".zarr"):
        return _describe_store(path)
    return _describe_nifti(path)


def _describe_nifti(path: Path) -> tuple[str, dict]:
    info = read_info(path)
    data = open_nifti(path)
    s = summarize(data, quantiles=())  # one GIL-free pass: min/max of finite voxels, NaN/±Inf counts
    cast = int if data.dtype.kind in "iub" else float
    stats = {
        "min": cast(s["min"]), "max": cast(s["max"]),
        **{k: int(s[f"n_{k}"]) for k in ("nan", "posinf", "neginf")},
    }
    facts = {
        "path": str(path),
        "format": f"NIfTI-{info.version}" + (" (gzip)" if info.compressed else ""),
        "shape": list(info.shape),
        "dims (volnorm, C order)": list(info.dims),
        "dtype on disk": info.raw_dtype.str,
        "dtype scaled": info.scaled_dtype.name,
        "scaling": {"slope": info.slope, "inter": info.inter},
        "chunks": list(data.data.chunksize[1:]),
        "voxel size": list(info.zooms),
        "units": list(info.units),
        "affine": info.affine.tolist(),
        "file size": info.file_size,
        "stats": stats,
    }
    lines = [
        f"{path}",
        f"  format      {facts['format']}, {format_bytes(info.file_size)} on disk",
        f"  shape       {tuple(info.shape)} (i, j, k[, t]) -> dims {info.dims}",
        f"  dtype       {info.raw_dtype.str} on disk; {info.scaled_dtype.name} after scaling"
        + (f" (slope {info.slope:g}, inter {info.inter:g})" if info.scaled else " (no scaling)"),
        f"  chunks      {tuple(data.data.chunksize[1:])} by default (whole-plane slabs, ~64 MiB)",
        f"  voxel size  {info.zooms} {info.units[0]}",
        "  affine",
        *_affine_lines(info.affine),
        f"  values      {_stats_text(stats)}",
    ]
    return "\n".join(lines), facts


def _describe_store(path: Path) -> tuple[str, dict]:
    import zarr

    m = read_manifest(path)
    if m is None and isinstance(path, Remote):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such store")
        raise ValueError(f"{path}: not a volnorm store (no volnorm manifest in its zarr.json)")
    if m is None:
        staged = staging_path(path.absolute())
        if not path.exists() and staged.exists():
            return _describe_store(staged)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or store")
        if (path / ".zgroup").exists() or (path / ".zarray").exists():
            raise ValueError(f"{path}: a Zarr v2 store, not a volnorm store (volnorm writes Zarr v3; "
                             "`volnorm convert` or vn.to_zarr makes one from its data)")
        raise ValueError(f"{path}: not a volnorm store (no volnorm manifest in its zarr.json)")
    complete = bool(m.get("complete"))
    check = quick_check(path)  # listing only: every chunk present?
    damaged = complete and bool(check["missing"])
    root = zarr.open_group(checked_store(path), mode="r", zarr_format=3)
    if damaged:
        missing = ", ".join(f"{a} ({n} missing)" for a, n in sorted(check["missing"].items())[:5])
        state = f"DAMAGED: chunks missing in {missing} (`volnorm verify {path}` lists them)"
    elif complete:
        state = "complete"
    else:
        state = "INCOMPLETE (interrupted run: re-run the command to finish it)"
    crc = {"all": "CRC-32C on every chunk (checked on every read; `volnorm verify` checks them all)",
           "none": "no checksums (written before volnorm checksummed chunks: missing chunks are still detected)",
           "some": "on some arrays only"}[check["checksums"]]
    lines = [
        f"{path}",
        f"  state       {state}",
        f"  kind        {m.get('kind', '?')}, volnorm format {m.get('format_version')}",
        f"  checksums   {crc}",
    ]
    if check["partial"]:
        lines.append(f"  note        {len(check['partial'])} temporary file(s) of a killed writer inside (not data)")
    if m.get("finished"):
        lines.append(f"  written     {m.get('started')} .. {m.get('finished')} by volnorm {m.get('versions', {}).get('volnorm')}")
    facts: dict[str, Any] = {"path": str(path), "complete": complete, "damaged": damaged, "state": state.split(":")[0].split(" (")[0].lower(),
                             "checksums": check["checksums"], "missing_chunks": check["missing"], "manifest": m, "volumes": {}}
    if m.get("kind") == "images":
        arr = root["image"]
        lines.append(f"  image       shape {arr.shape} {arr.dtype}, chunks {arr.chunks}")
        return "\n".join(lines), facts
    inputs = {i["name"]: i for i in m.get("inputs", []) if isinstance(i, dict) and "name" in i}
    names = m.get("volumes") or [k for k, _ in root.groups()]
    done = 0
    for name in names:
        if name not in root:
            lines.append(f"  {name}: missing")
            continue
        grp = root[name]
        v = grp.attrs.get("volnorm", {})
        done += bool(v.get("complete"))
        arr = grp["0"]
        hdr_json = dict(grp["nifti"].attrs) if "nifti" in grp else {}
        codecs = [c.get("name") + (f"/{c['configuration'].get('cname')}" if c.get("configuration", {}).get("cname") else "")
                  for c in arr.metadata.to_dict()["codecs"] if c.get("name") != "bytes"]
        vf = {
            "complete": bool(v.get("complete")),
            "shape": list(arr.shape),
            "dims": list(arr.metadata.dimension_names or ()),
            "dtype": str(arr.dtype),
            "chunks": list(arr.chunks),
            "codec": codecs,
            "voxel size": hdr_json.get("VoxelSize"),
            "affine": hdr_json.get("Affine"),
            "scaling": {"slope": hdr_json.get("ScaleSlope"), "inter": hdr_json.get("ScaleOffset")},
            "stats": v.get("stats", {}),
            "source": inputs.get(name, v.get("source")),
            "levels": [list(grp[str(k)].shape) for k in range(int(v.get("pyramid", {}).get("levels", 1))) if str(k) in grp],
        }
        if "nifti" in grp:
            try:
                vf["affine"] = header_from_bytes(group_header(grp)).get_best_affine().tolist()
            except DamagedStoreError as e:
                vf["damaged"] = str(e)
                lines.append(f"  {name}: DAMAGED header: {e}")
        facts["volumes"][name] = vf
        lines += [
            f"  {name}{'' if vf['complete'] else '  [INCOMPLETE]'}",
            f"    shape {tuple(arr.shape)} {tuple(vf['dims'])} {arr.dtype}, chunks {arr.chunks}, codec {'+'.join(codecs) or 'none'}",
            f"    voxel size {vf['voxel size']}, scaling slope {vf['scaling']['slope']} inter {vf['scaling']['inter']}",
            f"    values {_stats_text(vf['stats'])}",
        ]
        if len(vf["levels"]) > 1:
            lines.append(f"    levels {len(vf['levels'])} ({v['pyramid'].get('downsample')}): " + ", ".join(f"{k} {tuple(s)}" for k, s in enumerate(vf["levels"])))
        src = vf["source"] or {}
        if src.get("blake3"):
            lines.append(f"    source {src.get('path')} ({format_bytes(src.get('size', 0))}, blake3 {src['blake3'][:16]}...)")
        if vf["affine"]:
            lines += ["    affine", *_affine_lines(vf["affine"], "      ")]
    lines.insert(4, f"  volumes     {len(names)} ({done} complete)")
    json.dumps(facts, default=str)
    return "\n".join(lines), facts
