"""Pipeline specs: YAML loaded safely and strictly, checked against the schema before any data is read.

The loader builds plain Python values from YAML's node tree itself, so that:

* only YAML's standard tags are accepted (``!!python/object`` and every other
  application tag is refused before anything is constructed);
* anchors and aliases are refused (no alias bombs, no shared mutable values);
* a key given twice in one mapping is refused (PyYAML keeps the last one silently);
* documents larger than :data:`MAX_SPEC_BYTES` are refused unread;
* every key path keeps its line, so an error says where it is;
* booleans are YAML 1.2's: only ``true`` and ``false`` (YAML 1.1's ``yes``/``no``/``on``/``off``
  and capitalised forms are strings, which a boolean option refuses with "write true or false").

Each step's options are bound to the function the step calls (:func:`volnorm.pipeline.steps.check_options`):
an unknown or misspelt option, a wrong type or a value out of the documented range is refused
here, with its key path and line, before anything runs.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volnorm._utils import plain_name
from volnorm.engine import check_scheduler
from volnorm.io.location import Remote, is_url, location
from volnorm.pipeline.steps import NEED_MASK, PIPELINE_STEPS, OptionError, check_options, check_threshold_options

#: Larger specs are refused before parsing (a spec is a page of text).
MAX_SPEC_BYTES = 256 * 1024
#: Deeper nesting is refused (a spec is a few levels deep).
MAX_DEPTH = 12

_STD_TAGS = {
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
}


_MERGE_TAG = "tag:yaml.org,2002:merge"
_BOOL_TAG = "tag:yaml.org,2002:bool"
#: the spec loader class, built on first use (yaml is imported lazily)
_LOADER: type | None = None


def _loader_class() -> type:
    """``yaml.SafeLoader`` with YAML 1.2's booleans: only ``true`` and ``false`` resolve (and
    construct, also under an explicit ``!!bool``) to booleans; ``yes``, ``No``, ``ON`` ... are strings."""
    import yaml

    global _LOADER
    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            yaml_implicit_resolvers = {
                first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
                for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
            }

            def construct_yaml_bool(self, node: Any) -> bool:
                value = self.construct_scalar(node)
                if value not in ("true", "false"):
                    raise ValueError(f"{value!r} is not a boolean: write true or false")
                return value == "true"

        Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|false)$"), list("tf"))
        Loader.add_constructor(_BOOL_TAG, Loader.construct_yaml_bool)
        _LOADER = Loader
    return _LOADER


class SpecError(ValueError):
    """An invalid pipeline spec: the message names the key path and the line."""


@dataclass
class Spec:
    """A validated pipeline spec: ``data`` (plain values, defaults filled in, paths resolved
    against ``base``), where it came from, and the line of every key path."""

    data: dict[str, Any]
    source: str
    base: Path
    lines: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def options(self, section: str) -> dict[str, Any] | None:
        """``input.storage_options`` or ``output.storage_options`` (None when not given)."""
        return self.data[section].get("storage_options")

    def store(self, section: str) -> Path | Remote:
        """``input.store`` or ``output.store`` as a local path or a :class:`Remote` with its options."""
        return location(self.data[section]["store"], self.options(section))


def _where(path: str, lines: Mapping[str, int], source: str) -> str:
    """``source, line N`` of ``path`` (or of its nearest parent that has a line)."""
    while path and path not in lines:
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
        path = "" if parent == path else parent
    line = lines.get(path)
    return f"{source}, line {line}" if line else source


def parse_yaml(text: str, source: str = "<spec>") -> tuple[Any, dict[str, int]]:
    """Parse ``text`` strictly: plain dicts, lists and scalars, and the line of every key path.

    Examples
    --------
    >>> parse_yaml("a: 1\\nb: [x, y]\\n")
    ({'a': 1, 'b': ['x', 'y']}, {'': 1, 'a': 1, 'b': 2, 'b[0]': 2, 'b[1]': 2})
    >>> parse_yaml("a: true\\nb: yes\\nc: NO\\n")[0]  # YAML 1.2: only true/false are booleans
    {'a': True, 'b': 'yes', 'c': 'NO'}
    >>> parse_yaml("a: &x 1\\nb: *x\\n")
    Traceback (most recent call last):
    ...
    volnorm.pipeline.spec.SpecError: <spec>, line 1: YAML anchors and aliases are not allowed in a spec
    """
    import yaml

    if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: the spec is larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a page of text")
    Loader = _loader_class()
    loader = Loader(text)
    depth = 0
    try:
        for ev in _events(loader):  # the parser is iterative: the depth is checked before the
            # composer, which recurses once per level, builds anything
            if isinstance(ev, (yaml.AliasEvent,)) or getattr(ev, "anchor", None):
                raise SpecError(f"{source}, line {ev.start_mark.line + 1}: YAML anchors and aliases are not allowed in a spec")
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH + 1:
                    raise SpecError(f"{source}, line {ev.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark else source
        raise SpecError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
    loader = Loader(text)
    try:
        nodes = loader.get_single_node()
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if nodes is None:
        raise SpecError(f"{source}: the spec is empty")
    lines: dict[str, int] = {}
    return _value(nodes, "", lines, source, Loader(""), 0), lines


def _events(loader: Any) -> Any:
    while loader.check_event():
        yield loader.get_event()


def _value(node: Any, path: str, lines: dict[str, int], source: str, ctor: Any, depth: int) -> Any:
    import yaml

    line = node.start_mark.line + 1
    lines.setdefault(path, line)
    if depth > MAX_DEPTH:
        raise SpecError(f"{source}, line {line}: nested more than {MAX_DEPTH} levels deep")
    if node.tag not in _STD_TAGS:
        raise SpecError(f"{source}, line {line}: the tag {node.tag!r} is not allowed in a spec (plain YAML values only)")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            if knode.tag == _MERGE_TAG or (isinstance(knode, yaml.ScalarNode) and knode.value == "<<"):
                raise SpecError(f"{source}, line {knode.start_mark.line + 1}: YAML merge keys (<<) are not allowed in a spec")
            if not isinstance(knode, yaml.ScalarNode) or knode.tag not in _STD_TAGS:
                raise SpecError(f"{source}, line {knode.start_mark.line + 1}: keys must be plain strings")
            key = str(_scalar(knode, source, ctor))
            sub = f"{path}.{key}" if path else key
            if key in out:
                raise SpecError(
                    f"{source}, line {knode.start_mark.line + 1}: {sub!r} is given twice "
                    f"(first on line {lines.get(sub)}); YAML would keep only the last one"
                )
            lines[sub] = knode.start_mark.line + 1
            out[key] = _value(vnode, sub, lines, source, ctor, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_value(n, f"{path}[{i}]", lines, source, ctor, depth + 1) for i, n in enumerate(node.value)]
    return _scalar(node, source, ctor)


def _scalar(node: Any, source: str, ctor: Any) -> Any:
    """A scalar node's value; a value its (standard) tag cannot make, e.g. ``!!int abc``, is a SpecError."""
    try:
        return ctor.construct_object(node)
    except Exception as e:  # noqa: BLE001 - KeyError (!!bool), ValueError (!!int), ... all mean a bad value
        tag = node.tag.rsplit(":", 1)[-1]
        why = "write true or false" if node.tag == _BOOL_TAG else type(e).__name__
        raise SpecError(f"{source}, line {node.start_mark.line + 1}: {node.value!r} is not a valid !!{tag} ({why})") from None


# ---------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One key: its check (a type, a tuple of types, or a callable that raises ValueError),
    whether it is required, its default, and for a mapping its own fields."""

    check: Any = None
    required: bool = False
    default: Any = None
    fields: Mapping[str, Field] | None = None
    help: str = ""


def _str_or_list(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
        return v
    raise ValueError("expected a path or glob, or a list of them")


def _chunks(v: Any) -> Any:
    if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return v
    if isinstance(v, dict) and all(isinstance(n, int) and not isinstance(n, bool) and (n > 0 or n == -1) for n in v.values()):
        return v
    raise ValueError("expected 'auto', a size in MiB, or a mapping dim -> chunk length (e.g. {z: 64})")


def _pair(v: Any) -> list[float]:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and v[0] < v[1]:
        return [float(x) for x in v]
    raise ValueError("expected [lo, hi] with lo < hi")


def _storage_options(v: Any) -> dict[str, Any]:
    """``input.storage_options`` / ``output.storage_options``: fsspec options of the URL (its
    values are never shown: they may hold secrets)."""
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return dict(v)
    raise ValueError("expected a mapping of fsspec options, e.g. {profile: lab, endpoint_url: 'https://s3.example.org'}")


def public(data: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's data as provenance and messages may show it: the values of every
    ``storage_options`` replaced (their keys are kept, so a reader sees which were given).

    Examples
    --------
    >>> public({"input": {"nifti": ["s3://b/*.nii"], "storage_options": {"secret": "x", "key": "y"}}})
    {'input': {'nifti': ['s3://b/*.nii'], 'storage_options': {'secret': '<redacted>', 'key': '<redacted>'}}}
    """
    out = {k: (public(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for sec in out.values():
        if isinstance(sec, dict) and isinstance(sec.get("storage_options"), dict):
            sec["storage_options"] = {k: "<redacted>" for k in sec["storage_options"]}
    return out


def _positive_int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    raise ValueError("expected a positive integer")


def _quantiles(v: Any) -> list[float]:
    if isinstance(v, list) and v and all(isinstance(q, (int, float)) and not isinstance(q, bool) and 0 <= q <= 1 for q in v):
        return [float(q) for q in v]
    raise ValueError("expected a list of quantiles in [0, 1]")


def _memory(v: Any) -> Any:
    import math

    if v is None or v == "auto":
        return v
    n = v
    if isinstance(v, str):
        from dask.utils import parse_bytes

        try:
            n = parse_bytes(v)
        except (ValueError, OverflowError):
            n = None
    if isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n > 0:
        return n
    raise ValueError("expected a size such as '2GiB', a number of bytes, or 'auto'")


def _scheduler(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a scheduler word or address, got {type(v).__name__} {v!r}")
    return check_scheduler(v, "")


def _cluster_options(v: Any) -> dict[str, Any]:
    ok = (str, int, float, bool, type(None))
    if isinstance(v, dict) and all(isinstance(k, str) for k in v) and all(
        isinstance(x, ok) or (isinstance(x, list) and all(isinstance(i, ok) for i in x)) or isinstance(x, dict) for x in v.values()
    ):
        return v
    raise ValueError("expected a mapping of the cluster class's options, e.g. {cores: 8, memory: 32GB, walltime: '02:00:00'}")


class _At(ValueError):
    """A field check's error about a part of the value: ``at`` is that part's path below the
    field's (``"[0].rescale.percentiles"``), so the message names it and its line."""

    def __init__(self, at: str, message: str) -> None:
        super().__init__(message)
        self.at = at


def _steps(v: Any) -> list[dict[str, Any]]:
    """Each step: ``name`` or ``{name: {option: value, ...}}`` -> ``{"name": ..., "options": {...}}``,
    its options bound to the function the step calls (:func:`volnorm.pipeline.steps.check_options`)."""
    if not isinstance(v, list):
        raise ValueError("expected a list of steps, e.g. [{rescale: {percentiles: [1, 99]}}, equalize]")
    out = []
    for i, item in enumerate(v):
        if isinstance(item, str):
            name, opts, at = item, {}, f"[{i}]"
        elif isinstance(item, dict) and len(item) == 1:
            name, opts = next(iter(item.items()))
            opts = {} if opts is None else opts
            at = f"[{i}].{name}"
            if not isinstance(opts, dict):
                raise _At(at, f"the options of step {name!r} must be a mapping, e.g. {{{name}: {{option: value}}}}")
        else:
            raise _At(f"[{i}]", "a step is a name or a one-key mapping {name: {options}}")
        if name not in PIPELINE_STEPS:
            hint = difflib.get_close_matches(str(name), PIPELINE_STEPS, n=1)
            raise _At(f"[{i}]", f"unknown step {name!r} (steps: {', '.join(PIPELINE_STEPS)})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        try:
            check_options(name, opts)
        except OptionError as e:
            raise _At(at if e.option is None else f"{at}.{e.option}", str(e)) from None
        out.append({"name": name, "options": opts})
    return out


def _threshold_options(v: Any) -> dict[str, Any]:
    """``mask.threshold``: options of :func:`volnorm.threshold` (``dim: volume`` = one per volume)."""
    if not isinstance(v, dict):
        raise ValueError(f"expected dict, got {type(v).__name__} {v!r}")
    try:
        check_threshold_options(v)  # kept as written (the plan's digest); `per` is resolved when it runs
        return dict(v)
    except OptionError as e:
        raise _At("" if e.option is None else f".{e.option}", str(e)) from None


def _store_name(v: Any) -> str:
    """``outputs.voxel_histogram.name``: a plain name inside the output store."""
    return plain_name(v, "outputs.voxel_histogram.name")


SCHEMA: dict[str, Field] = {
    "version": Field(lambda v: v if type(v) is int and v == 1 else (_ for _ in ()).throw(ValueError("only version 1 exists")), required=True,
                     help="the spec format version: 1"),
    "name": Field(str, help="a name for the run, shown in the plan"),
    "input": Field(required=True, fields={
        "nifti": Field(_str_or_list, help="NIfTI files: paths, globs or directories"),
        "images": Field(_str_or_list, help="2-D image files (PNG, TIFF, NPY): paths or globs"),
        "store": Field(str, help="a volnorm Zarr store"),
        "chunks": Field(_chunks, help="'auto', MiB per chunk, or {dim: length}"),
        "storage_options": Field(_storage_options, help="fsspec options of URL inputs (s3://...), e.g. {profile: lab} or "
                                 "{endpoint_url: ...}; default: the AWS environment variables and config files"),
    }),
    "mask": Field(fields={
        "file": Field(str, help="a NIfTI mask on the input's grid, applied to every volume"),
        "threshold": Field(_threshold_options, help="a mask from the data: {method: otsu|li|yen|..., dim: volume}"),
        "after": Field(str, help="a step's name: the threshold is taken on that step's output and the mask goes to the steps "
                       "after it only, and is written beside the images as mask/<volume> (e.g. after: n4, for N4 -> mask -> "
                       "normalize); default: from the input, to every step"),
    }),
    "steps": Field(_steps, default=[], help="transforms, in order, as in the Python API"),
    "params_from": Field(str, help="a previous run's output store (or --save-params JSON): its fitted steps are applied, not refitted"),
    "output": Field(required=True, fields={
        "store": Field(str, required=True, help="the output Zarr store (NIfTI-Zarr for NIfTI input), a path or a URL"),
        "storage_options": Field(_storage_options, help="fsspec options of a URL output store, as input.storage_options"),
        "codec": Field(lambda v: v if v in ("lz4", "zstd", "zarr-default", "none") else (_ for _ in ()).throw(
            ValueError("expected lz4, zstd, zarr-default or none")), default="lz4"),
        "levels": Field(_positive_int, help="resolution levels per volume, level 0 included (default 1: no pyramid); "
                        "each halves x, y, z: an OME-Zarr multiscale for napari and neuroglancer"),
        "downsample": Field(lambda v: v if v in ("mean", "mode") else (_ for _ in ()).throw(
            ValueError("expected mean (images) or mode (labels, masks)")),
            help="how a level is made from the one above; default: mode for boolean output (masks) and label images "
            "(NIfTI intent_code 1002/1003), else mean"),
    }),
    "outputs": Field(default={}, fields={
        "images": Field(bool, default=True, help="write the normalized images into output.store"),
        "voxel_histogram": Field(fields={
            "bins": Field(_positive_int, default=100),
            "range": Field(_pair, required=True),
            "name": Field(_store_name, default="voxel_histogram"),
        }, help="per-voxel histograms across volumes, into output.store"),
        "statistics": Field(fields={
            "path": Field(str, required=True, help="a .json or .csv file"),
            "quantiles": Field(_quantiles, default=[0.01, 0.5, 0.99]),
        }, help="per-volume statistics of the output"),
        "params": Field(str, help="the fitted steps as JSON (for volnorm apply / params_from)"),
    }),
    "engine": Field(default={}, fields={
        "scheduler": Field(_scheduler, help="where to run (volnorm.engine): local, threads, sync, slurm, pbs, kubernetes or an "
                           "address; default: $VOLNORM_SCHEDULER, else local"),
        "n_workers": Field(_positive_int),
        "memory_limit": Field(_memory, default="auto", help="per worker, e.g. '2GiB'"),
        "allow_insecure": Field(bool, default=False, help="allow plain tcp:// to a non-loopback scheduler"),
        "progress": Field(bool, default=True),
        "stall_timeout": Field(_positive_int, default=600,
                               help="seconds without a finished task (workers paused on memory) before the run stops"),
        "jobs": Field(_positive_int, default=1, help="slurm/pbs: worker jobs to submit; kubernetes: worker pods"),
        "min_workers": Field(_positive_int, default=1, help="slurm/pbs/kubernetes: start once this many workers are up"),
        "wait": Field(_positive_int, default=3600, help="slurm/pbs/kubernetes: seconds to wait for min_workers"),
        "cluster": Field(_cluster_options, help="slurm/pbs: dask_jobqueue.SLURMCluster/PBSCluster options "
                         "(cores, memory, walltime, queue, account, ...); kubernetes: dask_kubernetes make_cluster_spec options"),
    }),
}


def _check_value(f: Field, v: Any) -> Any:
    chk = f.check
    if chk is None:
        return v
    if isinstance(chk, (type, tuple)):
        types = chk if isinstance(chk, tuple) else (chk,)
        if isinstance(v, bool) and bool not in types:
            raise ValueError(f"expected {' or '.join(t.__name__ for t in types)}, got a boolean")
        if not isinstance(v, types):
            write = "; write true or false" if bool in types and isinstance(v, str) else ""
            raise ValueError(f"expected {' or '.join(t.__name__ for t in types)}, got {type(v).__name__} {v!r}{write}")
        return v
    return chk(v)


def _validate(fields: Mapping[str, Field], data: Any, path: str, lines: Mapping[str, int], source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(f"{_where(path, lines, source)}: {path or 'the spec'} must be a mapping of keys, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise SpecError(f"{_where(path, lines, source)}: {path or 'the spec'}: keys must be strings; got {type(key).__name__} {key!r}")
        if key not in fields:
            sub = f"{path}.{key}" if path else key
            hint = difflib.get_close_matches(key, list(fields), n=1)
            raise SpecError(
                f"{_where(sub, lines, source)}: unknown key {sub!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else f" (keys here: {', '.join(fields)})")
            )
    out: dict[str, Any] = {}
    for key, f in fields.items():
        sub = f"{path}.{key}" if path else key
        if key not in data or data[key] is None and f.fields is None:
            if f.required:
                raise SpecError(f"{_where(path, lines, source)}: {sub!r} is required" + (f" ({f.help})" if f.help else ""))
            if f.fields is not None and isinstance(f.default, dict) and key not in data:
                out[key] = _validate(f.fields, {}, sub, lines, source) if f.default == {} else f.default
            elif f.default is not None:
                out[key] = f.default
            continue
        v = data[key]
        if f.fields is not None:
            out[key] = _validate(f.fields, {} if v is None else v, sub, lines, source)
            continue
        try:
            out[key] = _check_value(f, v)
        except ValueError as e:
            at = sub + getattr(e, "at", "")
            text = str(e)  # a message that already names the key is not prefixed again
            raise SpecError(f"{_where(at, lines, source)}: " + (text if text.startswith(f"{at} ") else f"{at}: {text}")) from None
    return out


def _one_of(section: dict, keys: tuple[str, ...], path: str, lines: Mapping[str, int], source: str, required: bool = True) -> None:
    given = [k for k in keys if k in section]
    if len(given) > 1 or (required and not given):
        raise SpecError(f"{_where(path, lines, source)}: {path} needs exactly one of {', '.join(keys)}" + (f"; got {', '.join(given)}" if given else ""))


def load_spec(spec: str | os.PathLike | Mapping[str, Any] | Spec, *, base: str | os.PathLike | None = None) -> Spec:
    """Load and validate a pipeline spec: a YAML file, YAML text, or a dict.

    Nothing is read but the spec.

    Parameters
    ----------
    spec : str, os.PathLike, mapping or Spec
        A YAML file's path, YAML text (a string with a line break), or a dict; a loaded
        ``Spec`` is returned as it is.
    base : str or os.PathLike, optional
        Relative paths in it are taken from the spec file's directory (YAML text and dicts:
        ``base``, default the current directory). Given with a file, ``base`` is used instead.

    Returns
    -------
    Spec
        The validated spec, defaults filled in and paths resolved; ``spec["input"]`` etc. give
        its sections.

    Examples
    --------
    >>> s = load_spec({"version": 1, "input": {"nifti": "scans/*.nii.gz"},
    ...                "steps": [{"rescale": {"percentiles": [1, 99]}}], "output": {"store": "out.zarr"}}, base="/data")
    >>> s["input"]["nifti"], s["steps"], s["output"]["store"]
    (['/data/scans/*.nii.gz'], [{'name': 'rescale', 'options': {'percentiles': [1, 99]}}], '/data/out.zarr')
    >>> load_spec({"version": 1, "input": {"nifti": "a.nii"}, "output": {"stor": "o.zarr"}})
    Traceback (most recent call last):
    ...
    volnorm.pipeline.spec.SpecError: <spec>: unknown key 'output.stor'; did you mean 'store'?
    """
    if isinstance(spec, Spec):
        return spec
    lines: dict[str, int] = {}
    if isinstance(spec, Mapping):
        data, source, root = dict(spec), "<spec>", Path(base or os.getcwd())
    else:
        if isinstance(spec, str) and "\n" in spec:  # YAML text
            data, lines = parse_yaml(str(spec))
            source, root = "<spec>", Path(base or os.getcwd())
        else:
            p = Path(spec)
            try:
                size = p.stat().st_size
            except OSError as e:
                raise SpecError(f"{p}: cannot read the spec ({e.strerror or e})") from None
            if size > MAX_SPEC_BYTES:
                raise SpecError(f"{p}: the spec is larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a page of text")
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise SpecError(f"{p}: not a UTF-8 text file") from None
            data, lines = parse_yaml(text, str(p))
            source, root = str(p), (Path(base) if base else p.resolve().parent)
    out = _validate(SCHEMA, data, "", lines, source)
    _one_of(out["input"], ("nifti", "images", "store"), "input", lines, source)
    if "mask" in out:
        _one_of(out["mask"], ("file", "threshold"), "mask", lines, source)
        if "after" in out["mask"]:
            steps_before_mask(out, lines, source)
    _check_fields(out, lines, source)
    if "params_from" in out and out["steps"]:
        raise SpecError(f"{_where('params_from', lines, source)}: give either `steps` (fitted here) or `params_from` (fitted before), not both")
    o = out["outputs"]
    if not (o["images"] or "voxel_histogram" in o or "statistics" in o):
        raise SpecError(f"{_where('outputs', lines, source)}: outputs asks for nothing (images: false and no voxel_histogram or statistics)")
    for sec, keys in (("input", ("nifti", "images", "store")), ("output", ("store",))):
        given = [v for k in keys for v in ([out[sec][k]] if isinstance(out[sec].get(k), str) else out[sec].get(k) or [])]
        if "storage_options" in out[sec] and not all(is_url(v) for v in given):
            raise SpecError(f"{_where(f'{sec}.storage_options', lines, source)}: {sec}.storage_options are for URLs (s3://...); "
                            f"{sec} names a local path")
    _resolve_paths(out, root)
    return Spec(out, source, root, lines)


def steps_before_mask(spec: Spec | Mapping[str, Any], lines: Mapping[str, int] | None = None, source: str = "<spec>") -> int:
    """How many of the spec's steps run before its mask is made (and without it): 0 (the mask
    is made from the input and goes to every step), or with ``mask.after: NAME`` the steps up
    to and including the one step called NAME. Raises :class:`SpecError` for a name that is no
    step or is two, and when a step before the mask needs one (fcm, lsq).

    Examples
    --------
    >>> steps_before_mask({"mask": {"threshold": {}, "after": "n4"}, "steps": [{"name": "n4"}, {"name": "zscore"}]})
    1
    >>> steps_before_mask({"mask": {"threshold": {}, "after": "n4s"}, "steps": [{"name": "n4"}, {"name": "zscore"}]})
    Traceback (most recent call last):
    ...
    volnorm.pipeline.spec.SpecError: <spec>: mask.after: 'n4s' is not one of the steps (n4, zscore); did you mean 'n4'?
    """
    data = spec.data if isinstance(spec, Spec) else spec
    after = data.get("mask", {}).get("after")
    if after is None:
        return 0
    where = _where("mask.after", lines or {}, source)
    names = [st["name"] for st in data.get("steps") or []]
    if names.count(after) != 1:
        if "params_from" in data:
            raise SpecError(f"{where}: mask.after names one of the spec's `steps`; with params_from there are none")
        hint = difflib.get_close_matches(str(after), names, n=1)
        why = (f"step {after!r} is given {names.count(after)} times: mask.after needs one" if after in names
               else f"{after!r} is not one of the steps ({', '.join(names) or 'none'})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        raise SpecError(f"{where}: mask.after: {why}")
    k = names.index(after) + 1
    early = [n for n in names[:k] if n in NEED_MASK]
    if early:
        raise SpecError(f"{where}: mask.after: {after!r}: step {early[0]!r} needs the mask but runs before it is made")
    return k


def _check_fields(out: dict[str, Any], lines: Mapping[str, int], source: str) -> None:
    """n4's ``field`` names: written into the output store beside the images, each once."""
    seen: dict[str, int] = {}
    for i, st in enumerate(out["steps"]):
        name = st["options"].get("field")
        if st["name"] != "n4" or name is None:
            continue
        at = f"steps[{i}].n4.field"
        if not out["outputs"]["images"]:
            raise SpecError(f"{_where(at, lines, source)}: {at}: the bias field is written beside the images; outputs.images is false")
        if name in seen:
            raise SpecError(f"{_where(at, lines, source)}: {at}: {name!r} is already the field of steps[{seen[name]}]")
        seen[name] = i


def _resolve_paths(d: dict[str, Any], root: Path) -> None:
    def res(p: str) -> str:
        if "://" in p:
            return p
        q = Path(os.path.expanduser(p))
        return str(q if q.is_absolute() else root / q)

    fix: list[tuple[dict, str, Callable[[Any], Any]]] = [
        (d["input"], "nifti", lambda v: [res(s) for s in v]),
        (d["input"], "images", lambda v: [res(s) for s in v]),
        (d["input"], "store", res),
        (d["output"], "store", res),
        (d, "params_from", res),
        (d.get("mask", {}), "file", res),
        (d["outputs"], "params", res),
        (d["outputs"].get("statistics", {}), "path", res),
    ]
    for sec, key, f in fix:
        if key in sec:
            sec[key] = f(sec[key])
