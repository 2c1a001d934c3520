"""The ``volnorm`` command: thin subcommands over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

import volnorm as vn
from volnorm import pipeline
from volnorm._dims import PER, dim_for
from volnorm._utils import plain_name
from volnorm.conversion import validate_inputs
from volnorm.engine import ENV_VAR, ClusterLostError, check_address, check_scheduler, current, running
from volnorm.info import describe
from volnorm.integrity import verify
from volnorm.io.location import is_url, location
from volnorm.io.nifti import expand_paths
from volnorm.io.readers import open_mask, open_nifti, open_zarr
from volnorm.normative import scores_stack
from volnorm.pipeline.spec import load_spec
from volnorm.pipeline.steps import load_history, parse_step, replay, run_steps

logger = logging.getLogger(__name__)


SCHEDULER_HELP = (
    "where to run (the same words as a spec's engine.scheduler): 'local' (a new local dask cluster on 127.0.0.1), "
    "'threads', 'sync', 'slurm', 'pbs', 'kubernetes', or a scheduler address such as tls://host:8786 "
    f"(default: ${ENV_VAR} if set, else local); a plain tcp:// address of another machine is refused "
    "(unencrypted) unless --allow-insecure"
)


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, help=SCHEDULER_HELP)
    _add_allow_insecure(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _add_per(p: argparse.ArgumentParser, words: tuple[str, ...], what: str) -> None:
    """``--per``: the words of :mod:`volnorm._dims` (the same as a spec's ``per:``) this command takes."""
    p.add_argument("--per", choices=words, default=None,
                   help=f"{what} (default: the whole dataset); " + "; ".join(f"{w}: {PER[w]}" for w in words))


def _add_allow_insecure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-insecure", action="store_true",
        help="allow a plain (unencrypted) tcp:// or ws:// --scheduler on another machine, on a network you trust; "
        "without it only tls:// (wss://) or an address on this machine is accepted",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="volnorm",
        description="Exact dataset-wide intensity statistics and normalization for MRI volumes and image stacks, out of core.",
        epilog="exit codes: 0 done (or already up to date); 1 refused or failed (bad input, an output that exists, "
        "an insecure scheduler, a damaged store); 2 command-line usage; 3 interrupted (Ctrl-C or SIGTERM: the "
        "command stops cleanly, closes any cluster it started and leaves no incomplete output that looks complete; "
        "run the same command again to resume); 4 the cluster was lost (volnorm run: run it again).",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("convert", help="convert NIfTI files (or an image stack) into a Zarr store")
    c.add_argument("inputs", nargs="+", help=".nii/.nii.gz files, globs or folders; then the output store")
    c.add_argument("--chunks", type=int, default=None, metavar="MIB", help="target chunk size in MiB (default 64)")
    c.add_argument("--codec", default="lz4", choices=["lz4", "zstd", "zarr-default", "none"], help="compression (default lz4)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing volnorm store")
    c.add_argument("--levels", type=int, default=1, metavar="N",
                   help="resolution levels per volume, level 0 included (default 1: no pyramid); each halves x, y, z: "
                   "an OME-Zarr multiscale for napari and neuroglancer")
    c.add_argument("--downsample", default=None, choices=["mean", "mode"],
                   help="how a level is made from the one above: mean (images) or mode (labels, masks); default: mode for "
                   "masks and for files whose NIfTI intent is a label image (intent_code 1002/1003), else mean")
    c.add_argument("--dry-run", action="store_true", help="validate the inputs and print the plan; write nothing")
    c.add_argument(
        "--step", action="append", default=[], metavar="NAME[:KEY=VALUE...]",
        help="normalize while converting, e.g. --step rescale:percentiles=1,99 --step equalize "
        "(steps: rescale, zscore, mean_scale, equalize, gamma, log, auto_gamma, equalize_adaptive, dither, binarize, whitestripe, kde, fcm, lsq, n4; "
        "per=volume|slice|voxel for per-volume/per-slice/per-voxel fits, as a spec's per:); the fitted parameters go "
        "into the store's provenance",
    )
    c.add_argument("--mask", default=None, metavar="NIFTI",
                   help="a NIfTI brain mask for the steps that take one (statistics inside it; fcm and lsq need one): one file "
                   "for every volume, or a glob/folder of one per volume in the inputs' order")
    c.add_argument("--save-params", default=None, metavar="FILE", help="also write the fitted steps as JSON (for volnorm apply)")
    _add_engine(c)

    i = sub.add_parser("info", help="describe a NIfTI file or a volnorm store")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")

    ve = sub.add_parser(
        "verify", help="check a whole store: every chunk present and matching its checksum, the recorded sources unchanged",
        description="Check a whole store: every chunk present and matching its checksum, every recorded array present, "
        "and (unless --no-sources) the source files recorded in its manifest unchanged. "
        "Exit codes: 0 ok; 1 damaged (the report names each problem) or not a store; 2 usage; 3 interrupted.",
    )
    ve.add_argument("store", help="a volnorm store")
    ve.add_argument("--json", action="store_true", help="print the report as JSON")
    ve.add_argument("--no-sources", dest="sources", action="store_false", help="do not re-hash the source files recorded in the manifest")
    gv = ve.add_mutually_exclusive_group()
    gv.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar (default: when stderr is a terminal)")
    gv.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")

    e = sub.add_parser("export", help="write the volumes of a store back to NIfTI")
    e.add_argument("store")
    e.add_argument("output", help="a .nii/.nii.gz file for one volume, or a folder")
    e.add_argument("--overwrite", action="store_true")
    _add_engine(e)

    st = sub.add_parser("stats", help="exact statistics: count, min, max, mean, std, quantiles")
    _add_engine(st)
    st.add_argument("path", nargs="+", help="a volnorm store, or NIfTI files")
    _add_per(st, ("dataset", "volume", "slice"), "one row per volume or per slice")
    st.add_argument("--mask", default=None, help="a NIfTI mask on the same grid (non-zero = inside)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--brightness", action="store_true",
                    help="an exposure report of image files (PNG, JPEG, TIFF, NPY): mean, RMS contrast, perceived "
                    "brightness, under/over-exposed fractions, a 0-10 level per image")
    st.add_argument("--csv", default=None, help="--brightness: also write the table to this CSV file")
    st.add_argument("--plot", default=None, help="--brightness: also draw it to this PNG/SVG/PDF")
    st.add_argument(
        "--fsl", action="store_true",
        help="fslstats options follow, with FSL's letters and numbers: -r -R -p N -P N -m -M -s -S -v -V -k MASK "
        "(e.g. `volnorm stats T1.nii.gz --fsl -k brain.nii.gz -r -p 50`); must come last",
    )

    hi = sub.add_parser("hist", help="plot the exact histogram (volumes overlaid, thresholds marked) to a PNG/SVG/PDF")
    _add_engine(hi)
    hi.add_argument("path", nargs="+", help="a volnorm store, or NIfTI files")
    hi.add_argument("--out", required=True, help="the picture to write (.png, .svg, .pdf)")
    _add_per(hi, ("dataset", "volume"), "one line per volume")
    hi.add_argument("--mask", default=None, help="a NIfTI mask on the same grid (non-zero = inside)")
    hi.add_argument("--bins", type=int, default=256, help="display bins (default 256)")
    hi.add_argument("--log", action="store_true", help="logarithmic count axis")
    hi.add_argument("--mark", default="otsu", help="thresholds to mark, comma-separated (default otsu; 'none' for none)")
    hi.add_argument("--overwrite", action="store_true", help="replace an existing picture")

    pv = sub.add_parser("preview", help="a one-page picture of a store: slices and histograms before/after its steps")
    _add_engine(pv)
    pv.add_argument("store", help="a volnorm store")
    pv.add_argument("--out", required=True, help="the picture to write (.png, .svg, .pdf)")
    pv.add_argument("--volumes", type=int, default=3, help="how many volumes (the first ones; default 3)")
    pv.add_argument("--slices", type=int, default=3, help="slices per volume (default 3)")
    pv.add_argument("--overwrite", action="store_true", help="replace an existing picture")

    th = sub.add_parser("threshold", help="a threshold computed from the exact histogram")
    _add_engine(th)
    th.add_argument("path", nargs="+", help="a volnorm store, or NIfTI files")
    th.add_argument("--method", default="otsu", help="otsu, multiotsu, li, yen, triangle, isodata, mean, minimum, percentile")
    _add_per(th, ("dataset", "volume", "slice"), "one threshold per volume or per slice")
    th.add_argument("--mask", default=None)
    th.add_argument("--classes", type=int, default=3, help="for multiotsu")
    th.add_argument("--q", type=float, default=0.5, help="for percentile, in [0, 1]")
    th.add_argument("--json", action="store_true")

    ap = sub.add_parser("apply", help="apply the fitted steps of a store or a --save-params file to new data")
    ap.add_argument("inputs", nargs="+", help="a volnorm store or NIfTI files; then the output store")
    ap.add_argument("--params", required=True, help="a JSON file from --save-params, or a store whose provenance has the steps")
    ap.add_argument("--mask", default=None, metavar="NIFTI",
                    help="a NIfTI brain mask for the steps that take one (statistics inside it; fcm and lsq need one): one file "
                    "for every volume, or a glob/folder of one per volume in the inputs' order")
    ap.add_argument("--overwrite", action="store_true")
    _add_engine(ap)

    vh = sub.add_parser("voxel-hist", help="per-voxel histograms across a store's volumes (or --append new ones) into the store")
    vh.add_argument("store", help="a volnorm store: its volumes are counted (unless --append) and the histogram is kept in it")
    vh.add_argument("--bins", type=int, default=None, help="number of bins (integers: one per value by default; floats: 256)")
    vh.add_argument("--range", default=None, help="LO,HI of the bins (needed for float data when the histogram is created)")
    vh.add_argument("--append", nargs="+", default=None, metavar="NEW", help="NIfTI files (or a store) to add to the stored histogram")
    vh.add_argument("--mask", default=None, help="a boolean NIfTI mask on the volumes' grid")
    vh.add_argument("--name", default="voxel_histogram", help="the histogram's group in the store (a plain name: no '/', '..' or leading '.')")
    vh.add_argument("--json", action="store_true")
    _add_engine(vh)

    nm = sub.add_parser("normative", help="score a new volume voxel by voxel against a store's per-voxel histograms")
    nm.add_argument("store", help="a store holding per-voxel histograms (volnorm voxel-hist)")
    nm.add_argument("volume", help="the new volume (NIfTI) on the cohort's grid")
    nm.add_argument("--out", required=True, help="NIfTI file for the percentile ranks (0-100), the z-scores beside it as <name>_z.nii.gz; "
                    "or a .zarr store (NIfTI-Zarr) holding both")
    nm.add_argument("--name", default="voxel_histogram", help="the histogram's group in the store (a plain name: no '/', '..' or leading '.')")
    nm.add_argument("--overwrite", action="store_true")
    _add_engine(nm)

    r = sub.add_parser("run", help="run a pipeline spec (YAML): fit, transform, write; resumable",
                       description="Run a pipeline spec. Exit codes: 0 done or already up to date; 1 refused or failed; "
                       "2 usage; 3 interrupted (run again to resume); 4 the cluster was lost (run again).")
    r.add_argument("spec", help="the YAML spec (see workflows/)")
    r.add_argument("--scheduler", default=None, help=SCHEDULER_HELP.replace("(default:", "(default: the spec's engine.scheduler, else"))
    _add_allow_insecure(r)
    r.add_argument("--dry-run", action="store_true", help="validate, print the plan, write nothing")
    r.add_argument("--overwrite", action="store_true", help="replace outputs written by another spec or from other inputs")
    r.add_argument("--resume", action="store_true", help="resume an interrupted run (the default; accepted for clarity)")
    r.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress bars")
    r.add_argument("--no-progress", dest="progress", action="store_false")

    d = sub.add_parser("demo", help="convert sample MRI data shipped with nibabel plus a generated cohort")
    d.add_argument("--out", default="volnorm-demo", help="folder for the sample files and the store (default ./volnorm-demo)")
    d.add_argument("--subjects", type=int, default=8, help="generated phantom subjects (default 8)")
    _add_engine(d)
    return p


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a batch system's walltime, ``kill``): stop like Ctrl-C, leaving a resumable run."""


#: What an interrupted command says (exit code 3), by command.
INTERRUPTED = {
    "convert": "interrupted: run the same command again to resume (nothing incomplete was left as a store)",
    "apply": "interrupted: run the same command again to resume (nothing incomplete was left as a store)",
    "demo": "interrupted: run the same command again to resume",
    "voxel-hist": "interrupted: the stored histogram is unchanged; run the same command again",
    "run": "interrupted; nothing incomplete was committed; run the same command again to resume",
    "stats": "interrupted: nothing was written",
    "threshold": "interrupted: nothing was written",
    "info": "interrupted: nothing was written",
    "verify": "interrupted: nothing was written; the store was not fully checked",
    "export": "interrupted: the files already written are complete and no partial file was left; "
    "run the same command with --overwrite to write them all",
    "hist": "interrupted: run the same command again (with --overwrite if a picture was left)",
    "preview": "interrupted: run the same command again (with --overwrite if a picture was left)",
    "normative": "interrupted: no incomplete map was left; run the same command again",
}


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` in the main thread, as Ctrl-C raises
    ``KeyboardInterrupt``: the command unwinds (clusters closed, locks released, staging kept
    for a resume). Later SIGTERMs, while it unwinds, are ignored (SIGKILL still ends it);
    the previous handler is put back on exit. Nothing is changed outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def on_term(signum: int, frame: Any) -> None:
        if fired:
            return  # already stopping: let the clean-up finish
        fired.append(signum)
        raise Interrupted

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``volnorm`` command line; returns the exit code."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    fsl_ops: list[str] = []
    if "--fsl" in argv:  # fslstats' own letters follow; argparse must not see them
        at = argv.index("--fsl")
        argv, fsl_ops = argv[: at + 1], argv[at + 1 :]
    args = parser.parse_args(argv)
    args.fsl_ops = fsl_ops
    level = logging.ERROR if args.quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "scheduler", None) is not None:  # the one rule, before anything is read, started or imported
        try:
            check_scheduler(args.scheduler, "--scheduler")
            check_address(args.scheduler, allow_insecure=args.allow_insecure, what="engine.scheduler" if args.command == "run" else "--scheduler")
        except ValueError as e:
            print(f"volnorm {args.command}: error: {e}", file=sys.stderr)
            return 1
    if args.command in ("voxel-hist", "normative"):  # a group inside the store: a plain name, checked before anything runs
        try:
            plain_name(args.name, "--name")
        except ValueError as e:
            print(f"volnorm {args.command}: error: {e}", file=sys.stderr)
            return 1
    _quiet_distributed(logging.DEBUG if args.verbose >= 2 else max(level, logging.WARNING))
    if args.version:
        print(f"volnorm {vn.__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        commands = {
            "convert": _convert, "info": _info, "export": _export, "demo": _demo, "stats": _stats, "threshold": _threshold,
            "hist": _hist, "preview": _preview, "apply": _apply, "voxel-hist": _voxel_hist, "normative": _normative, "run": _run,
            "verify": _verify,
        }
        with _sigterm_interrupts():
            if not hasattr(args, "scheduler") or args.command == "run" or getattr(args, "dry_run", False):
                return commands[args.command](args)  # no engine (run: the spec's, volnorm.pipeline.run's)
            show = args.progress if args.progress is not None else sys.stderr.isatty()
            # the engine starts on the first graph: a command that fails on its input starts no cluster
            said = None if args.quiet else functools.partial(_say_where, args.command)
            with running(args.scheduler, allow_insecure=args.allow_insecure, progress=show, on_start=said):
                return commands[args.command](args)
    except ClusterLostError as e:
        print(f"volnorm {args.command}: error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Interrupted), after every cluster and lock was given back
        print(f"volnorm {args.command}: {INTERRUPTED.get(args.command, INTERRUPTED['convert'])}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # e.g. `volnorm info ... | head`
        sys.stderr.close()
        return 0
    except (OSError, ValueError, TypeError) as e:
        print(f"volnorm {args.command}: error: {e}", file=sys.stderr)
        return 1


def _say_where(command: str, description: str) -> None:
    print(f"volnorm {command}: running on {description}", file=sys.stderr)


def _quiet_distributed(level: int) -> None:
    """dask.distributed logs every worker start and stop at INFO; show that only with -vv.

    Its loggers carry their own levels (from dask's config), so each is set.
    """
    try:
        import distributed  # noqa: F401 - creates its loggers
    except ImportError:
        return
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(level)


def _convert(args: argparse.Namespace) -> int:
    if len(args.inputs) < 2:
        print("volnorm convert: error: give at least one input and the output store", file=sys.stderr)
        return 2
    *inputs, store = args.inputs
    if args.dry_run:
        infos = validate_inputs(expand_paths(inputs))
        total = sum(i.data_bytes for i in infos)
        print(f"{len(infos)} valid inputs, {total / 1e6:.1f} MB of voxels -> {store} (nothing written)")
        return 0
    if args.step:
        return _convert_with_steps(args, inputs, store)
    if args.mask:
        raise ValueError("--mask is for the --step steps (their statistics inside the mask); give a --step, or convert without it")
    result = vn.convert(inputs, store, chunks=args.chunks, overwrite=args.overwrite, codec=args.codec, progress=args.progress,
                        levels=args.levels, downsample=args.downsample)
    if not args.quiet:
        print(result)
    return 0


def _convert_with_steps(args: argparse.Namespace, inputs: list[str], store: str) -> int:
    """Open the inputs lazily, fit and apply the steps, write the result with its provenance."""
    steps = [parse_step(s) for s in args.step]  # all checked before any data is read
    if args.save_params and Path(args.save_params).exists() and not args.overwrite:
        raise ValueError(f"{args.save_params} exists; pass --overwrite to replace it")
    data = _open_stack(inputs, "--step")
    out = run_steps(data, steps, mask=open_mask(args.mask, like=data) if args.mask else None)
    history = json.loads(out.attrs.get("volnorm_params", "[]"))
    vn.to_zarr(out, store, overwrite=args.overwrite, steps=history, progress=current().progress, levels=args.levels,
               downsample=args.downsample)
    if args.save_params:
        Path(args.save_params).write_text(json.dumps(history, indent=1))
    if not args.quiet:
        print(f"wrote {store}: {dict(out.sizes)} {out.dtype}, steps {', '.join(h['method'] for h in history)}")
    return 0


def _is_store(path: str) -> bool:
    """Whether ``path`` (a folder or an object-store URL) is a Zarr store rather than NIfTI input."""
    return (location(path) / "zarr.json").exists()


def _open_stack(inputs: list[str], what: str):
    """A store or NIfTI files as one stack; volumes of different shapes are refused."""

    data = vn.open_zarr(inputs[0]) if len(inputs) == 1 and _is_store(inputs[0]) else vn.open_nifti(inputs)
    if isinstance(data, xr.DataTree):
        raise ValueError(f"{what} needs volumes of one shape (a stack); these differ: register them first")
    return data


def _pair(text: str | None, what: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be LO,HI (two numbers); got {text!r}") from None
    return lo, hi


def _voxel_hist(args: argparse.Namespace) -> int:
    rng = _pair(args.range, "--range")
    data = _open_stack(args.append or [args.store], "voxel-hist")
    mask = open_mask(args.mask, like=data) if args.mask else None
    h = vn.accumulate(args.store, data, bins=args.bins, range=rng, mask=mask, name=args.name, progress=bool(args.progress))
    g = h.attrs["grid"]
    info = {
        "store": str(location(args.store) / args.name), "volumes": h.attrs["n_volumes"], "added": int(data.sizes["volume"]),
        "grid": dict(zip(g["dims"], g["shape"])), "bins": int(h.sizes["bin"]),
        "range": [float(h["bin_lower"][0]), float(h["bin_upper"][-1])], "dtype": str(h.dtype),
    }
    if args.json:
        print(json.dumps(info))
    elif not args.quiet:
        print(f"{info['store']}: {info['volumes']} volumes counted ({info['added']} added), grid {info['grid']}, "
              f"{info['bins']} bins over {info['range']}, counts {info['dtype']}")
    return 0


def _normative(args: argparse.Namespace) -> int:
    out = Path(args.out)
    to_store = out.suffix == ".zarr"
    suffix = "".join(out.suffixes[-2:]) if out.name.endswith(".nii.gz") else out.suffix
    z_out = out if to_store else out.with_name(out.name[: len(out.name) - len(suffix)] + "_z" + (suffix or ".nii.gz"))
    for p in (out, z_out):
        if p.exists() and not args.overwrite:
            raise ValueError(f"{p} exists; pass --overwrite to replace it")
    h = vn.open_voxel_histogram(args.store, args.name)
    vol = vn.open_nifti(args.volume)
    if "volume" in vol.dims:
        if vol.sizes["volume"] != 1:
            raise ValueError(f"{args.volume}: give one volume")
        vol = vol.isel(volume=0, drop=True).assign_attrs(vol.attrs)
    score = vn.normative_score(vol, h)
    if to_store:  # one NIfTI-Zarr store, a group per map
        vn.to_zarr(scores_stack(score), out, overwrite=args.overwrite)
        if not args.quiet:
            print(f"percentile ranks and z-scores -> {out} (volumes 'percentile', 'zscore')")
        return 0
    vn.to_nifti(score["percentile"], out, overwrite=args.overwrite)
    vn.to_nifti(score["zscore"], z_out, overwrite=args.overwrite)
    if not args.quiet:
        print(f"percentile ranks -> {out}\nz-scores -> {z_out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.scheduler:
        spec.data["engine"]["scheduler"] = args.scheduler
    if args.allow_insecure:
        spec.data["engine"]["allow_insecure"] = True
    if args.progress is not None:
        spec.data["engine"]["progress"] = args.progress

    try:  # SIGTERM arrives as KeyboardInterrupt (main's _sigterm_interrupts)
        res = pipeline.run(spec, dry_run=args.dry_run, overwrite=args.overwrite, echo=None if args.quiet else print)
    except pipeline.ClusterLostError as e:
        print(f"volnorm run: error: {e}", file=sys.stderr)
        return 4
    except (pipeline.PoisonInputError, pipeline.RunStalledError, pipeline.WorkerMemoryError) as e:
        print(f"volnorm run: error: {e}", file=sys.stderr)
        return 1
    return 0 if res.status in ("done", "up to date", "planned") else 1


def _apply(args: argparse.Namespace) -> int:
    if len(args.inputs) < 2:
        raise ValueError("give the input (a store or NIfTI files) and the output store")
    *inputs, store = args.inputs
    history = load_history(args.params)
    data = _open_stack(inputs, "apply")
    out = replay(data, history, mask=open_mask(args.mask, like=data) if args.mask else None)
    vn.to_zarr(out, store, overwrite=args.overwrite, steps=json.loads(out.attrs.get("volnorm_params", "[]")), progress=current().progress)
    if not args.quiet:
        print(f"wrote {store}: {dict(out.sizes)} {out.dtype}, steps {', '.join(h['method'] for h in history)} (parameters from {args.params})")
    return 0


def _info(args: argparse.Namespace) -> int:
    text, data = describe(args.path if is_url(args.path) else Path(args.path))
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return 0


def _verify(args: argparse.Namespace) -> int:
    """``volnorm verify STORE``: 0 when the store is whole, 1 (with the report) when it is damaged."""
    store = location(args.store)
    if is_url(store):
        if not (store / "zarr.json").exists():
            raise ValueError(f"{store}: no Zarr store there (no zarr.json); give the URL of a volnorm store")
    elif not store.is_dir() or not (store / "zarr.json").is_file():
        what = "does not exist" if not store.exists() else "is not a Zarr store (no zarr.json)"
        raise ValueError(f"{store} {what}; give the path of a volnorm store (a .zarr directory)")
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    report = verify(store, progress=show, sources=args.sources)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, default=str))
    else:
        print(report)
    if not report.ok:
        print(f"volnorm verify: {store} is damaged (see the report above)", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    written = vn.to_nifti(vn.open_zarr(args.store), args.output, overwrite=args.overwrite)
    for w in written:
        print(w)
    return 0


def _open_for_stats(paths: list[str], mask_path: str | None, per: str | None):
    """(data, mask, dim) for the stats/threshold/hist commands; ``per`` is :mod:`volnorm._dims`' word."""
    if len(paths) == 1 and _is_store(paths[0]):
        data = open_zarr(paths[0])
    else:
        data = open_nifti(paths)
    if isinstance(data, xr.DataTree):
        if mask_path is not None:
            raise ValueError("the volumes have different shapes (a collection): one --mask cannot fit them all")
        if per == "slice":
            raise ValueError("--per slice over volumes of different shapes: run it on each file")
    mask = open_mask(mask_path, like=data) if mask_path is not None else None
    return data, mask, dim_for(per, data)


def _table(ds, kept) -> str:
    """A plain text table: one row per index of the kept dims, one column per statistic."""
    cols = list(ds.data_vars)
    df = ds.to_dataframe()[cols] if kept else None
    if df is None:
        return repr(ds)
    head = "  ".join([f"{'/'.join(map(str, kept)):>16}"] + [f"{c:>11}" for c in cols])
    lines = [head]
    for idx, row in df.iterrows():
        label = "/".join(map(str, idx if isinstance(idx, tuple) else (idx,)))
        vals = [f"{v:>11.5g}" if isinstance(v, (float, np.floating)) else f"{v:>11}" for v in row.values]
        lines.append("  ".join([f"{label:>16}"] + vals))
    return "\n".join(lines)


def _stats(args: argparse.Namespace) -> int:
    if args.brightness:
        return _brightness(args)
    data, mask, dim = _open_for_stats(args.path, args.mask, args.per)
    if args.fsl:
        return _fsl(args, data, mask)
    s = vn.summarize(data, dim=dim, mask=mask)
    kept = [d for d in s.dims]
    if args.json:
        print(json.dumps(s.to_dict(data="list"), indent=2, default=str))
    else:
        print(_table(s, kept) if kept else repr(s))
    return 0


def _brightness(args: argparse.Namespace) -> int:
    """``volnorm stats --brightness IMAGES``: the exposure report as a table (or JSON)."""
    outs = [Path(p) for p in (args.csv, args.plot) if p]
    for out in outs:
        if out.exists():
            raise ValueError(f"{out} exists; choose another name (volnorm never overwrites it)")
        if not out.parent.is_dir():
            raise ValueError(f"{out}: the directory {out.parent} does not exist")
    report = vn.color.exposure(vn.open_images(args.path))
    table = report.to_dataframe()
    if args.json:
        print(json.dumps({"images": table.reset_index().to_dict(orient="records"), **report.attrs}, indent=1, default=str))
    else:
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    if args.csv:
        table.to_csv(args.csv, float_format="%.6g")
        print(f"wrote {args.csv}")
    if args.plot:
        vn.plot.plot_exposure(report, title=", ".join(Path(p).name for p in args.path)).savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return 0


def _fsl(args: argparse.Namespace, data, mask) -> int:
    """``--fsl``: fslstats' options, one output line (per volume with ``--per volume``, like ``-t``)."""

    if not args.fsl_ops:
        raise ValueError("--fsl needs fslstats options after it, e.g. --fsl -r -p 50")
    if mask is not None:
        args.fsl_ops = ["-k", "--mask"] + args.fsl_ops
    masks = {"--mask": mask} if mask is not None else {}
    ops = args.fsl_ops
    for i, op in enumerate(ops[:-1]):
        if op == "-k" and ops[i + 1] not in masks:
            masks[ops[i + 1]] = open_mask(ops[i + 1], like=data)
    if args.per == "slice":
        raise ValueError("--fsl works over the whole data or --per volume (fslstats -t)")
    if isinstance(data, xr.DataTree) or args.per in (None, "dataset") or "volume" not in data.dims:
        rows = [("all", vn.fsl.fslstats(data, ops, masks=masks))]
    else:
        rows = [(str(v), vn.fsl.fslstats(data.isel(volume=i), ops, masks=masks)) for i, v in enumerate(data["volume"].values)]
    if args.json:
        print(json.dumps({name: vals for name, vals in rows}, indent=2))
    else:
        for name, vals in rows:
            print(("" if len(rows) == 1 else f"{name} ") + " ".join(f"{v:.6g}" for v in vals))
    return 0


def _hist(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise ValueError(f"--out {out}: use a .png, .svg or .pdf name")
    data, mask, dim = _open_for_stats(args.path, args.mask, args.per)
    h = vn.histogram(data, bins=args.bins, dim=dim, mask=mask)
    marks = {}
    for method in [m.strip() for m in args.mark.split(",") if m.strip() and m.strip() != "none"]:
        marks[method] = float(vn.threshold(data, method, mask=mask))  # dataset-wide, on the exact histogram
    name = ", ".join(Path(p).name for p in args.path)
    ax = vn.plot.plot_histogram(h, log=args.log, thresholds=marks, title=name)
    ax.figure.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise ValueError(f"--out {out}: use a .png, .svg or .pdf name")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the directory {out.parent} does not exist")
    vn.plot.preview(args.store, out, volumes=args.volumes, slices=args.slices, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _threshold(args: argparse.Namespace) -> int:
    data, mask, dim = _open_for_stats(args.path, args.mask, args.per)
    t = vn.threshold(data, args.method, dim=dim, mask=mask, classes=args.classes, q=args.q)
    if args.json:
        print(json.dumps(t.to_dict(data="list"), indent=2, default=str))
    elif t.ndim == 0:
        print(f"{args.method} threshold: {float(t):.6g}")
    else:
        print(_table(t.to_dataset(name=args.method) if "threshold" not in t.dims else t.to_dataset(dim="threshold"), list(d for d in t.dims if d != "threshold")))
    return 0


def _demo(args: argparse.Namespace) -> int:

    out = Path(args.out)
    src = out / "inputs"
    src.mkdir(parents=True, exist_ok=True)
    for name, path in vn.datasets.nibabel_files().items():
        if not (src / name).exists():
            shutil.copy(path, src / name)
    cohort = src / "phantoms"
    if not cohort.exists():
        vn.datasets.make_cohort(cohort, n_subjects=args.subjects, compressed="mixed", seed=0)
    store = out / "cohort.zarr"
    result = vn.convert([src, cohort], store, overwrite=True, progress=args.progress)
    print(result)
    print(f"\nopen it in Python:  vn.open_zarr({str(store)!r})")
    print(f"or inspect it:      volnorm info {store}")
    return 0
