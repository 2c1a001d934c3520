"""Transform steps by name, as the command line and pipeline specs give them.

``"rescale:percentiles=1,99"`` is ``vn.rescale(x, percentiles=(1.0, 99.0))``; steps run
left to right, each fitting on the output of the previous one (or taking ``params=``
from a saved list), and each records its fitted parameters, so a list of steps is
reproducible on new data (``volnorm apply``).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xarray as xr

logger = logging.getLogger(__name__)

#: Steps that take fitted parameters (``params=``) and can be replayed on new data.
FITTED = {"rescale": "rescale", "zscore": "zscore", "mean_scale": "mean_scale", "equalize": "equalize",
          "gamma": "gamma", "log": "log", "auto_gamma": "auto_gamma"}
#: Steps applied without fitting (or refitted on each dataset by design).
UNFITTED = ("equalize_adaptive", "dither", "binarize")
STEPS = tuple(FITTED) + UNFITTED
#: A pipeline spec's steps: the command line's, and Nyúl standardization (fit, then apply).
PIPELINE_STEPS = (*STEPS, "nyul")


def _value(text: str) -> Any:
    """``1,99`` -> (1.0, 99.0); ``3`` -> 3; ``0.5`` -> 0.5; ``true`` -> True; else the text."""
    if "," in text:
        return tuple(_value(t) for t in text.split(",") if t != "")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_step(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,...;key=value"`` (``;`` or ``:`` between keys) -> ``(name, kwargs)``.

    Examples
    --------
    >>> parse_step("rescale:percentiles=1,99:out_range=uint8")
    ('rescale', {'percentiles': (1, 99), 'out_range': 'uint8'})
    >>> parse_step("equalize")
    ('equalize', {})
    """
    name, _, rest = text.partition(":")
    name = name.strip().replace("-", "_")
    if name not in STEPS:
        hint = difflib.get_close_matches(name, STEPS, n=1)
        raise ValueError(f"unknown step {name!r} (steps: {', '.join(STEPS)})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    kwargs: dict[str, Any] = {}
    for part in [p for chunk in rest.split(";") for p in chunk.split(":")]:
        if not part:
            continue
        key, eq, val = part.partition("=")
        if not eq:
            raise ValueError(f"step {text!r}: {part!r} is not key=value")
        kwargs[key.strip().replace("-", "_")] = _value(val.strip())
    if kwargs.get("dim") in ("volume", "slice"):  # the command line's words for per volume / per slice
        kwargs["dim"] = {"volume": "per-volume", "slice": ("y", "x")}[kwargs["dim"]]
    return name, kwargs


def _resolve_dim(data: xr.DataArray, kwargs: dict[str, Any]) -> dict[str, Any]:
    if kwargs.get("dim") == "per-volume":
        kwargs = {**kwargs, "dim": tuple(d for d in data.dims if d != "volume")}
    return kwargs


def run_steps(data: xr.DataArray, steps: Sequence[tuple[str, dict[str, Any]]], *, mask: xr.DataArray | None = None) -> xr.DataArray:
    """Fit and apply ``steps`` left to right; the fitted parameters accumulate in
    ``attrs["volnorm_params"]``. ``mask`` goes to every step that takes one (its
    statistics are taken inside the mask). Computes: each step's fit pass."""
    import inspect

    import volnorm as vn

    for name, kwargs in steps:
        kwargs = _resolve_dim(data, kwargs)
        if name == "nyul":  # fit the landmarks on these data, then map them
            fit_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            data = vn.nyul_apply(data, vn.nyul_fit(data, mask=mask, **fit_kw), mask=mask)
            continue
        func = getattr(vn, name)
        if mask is not None and "mask" in inspect.signature(func).parameters:
            kwargs = {**kwargs, "mask": mask}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # YAML lists: the API's tuples
        data = func(data, **kwargs)
    return data


def replay(data: xr.DataArray, history: Sequence[dict[str, Any]], *, mask: xr.DataArray | None = None) -> xr.DataArray:
    """Apply recorded steps (``attrs["volnorm_params"]`` / a store's ``steps``) with their fitted
    parameters: no fit pass for fitted steps. Lazy except for the unfitted ones' own passes
    (and Nyúl's per-volume landmarks, taken inside ``mask``)."""
    import volnorm as vn
    from volnorm._transforms import Params

    for rec in history:
        name = rec["method"]
        opts = dict(rec.get("options", {}))
        p = Params.from_dict(rec) if rec.get("values") is not None else None
        per_part = opts.get("dim") is not None or (name == "mean_scale" and opts.get("per_volume"))
        if name in FITTED and per_part:
            # per-volume/per-slice parameters belong to the volumes they were fitted on: refit
            # the same step on these data (dataset-wide parameters are reused as they are)
            logger.info("step %s was fitted per %s: fitting it again on the new data", name, opts.get("dim") or "volume")
            data = getattr(vn, name)(data, **_refit_kwargs(name, opts))
        elif name in FITTED and p is None:
            raise ValueError(f"step {name!r} was recorded without its fitted values (too large); fit it again")
        elif name in FITTED:
            extra: dict[str, Any] = {}
            if name in ("rescale", "equalize"):
                if opts.get("out_dtype"):
                    extra["out_range"] = opts["out_dtype"]
                elif opts.get("out_range"):
                    extra["out_range"] = tuple(opts["out_range"])
            if name == "rescale":
                extra["clip"] = opts.get("clip", True)
            if name == "gamma":
                extra["gamma"] = opts["gamma"]
            if name == "mean_scale":
                extra["target"] = opts["target"]
            data = getattr(vn, name)(data, params=p, **extra)
        elif name == "nyul":  # the standard landmarks; each volume's own come from these data
            vals = p.values.drop_vars("volume_landmarks", errors="ignore") if p is not None else None
            if vals is None:
                raise ValueError("step 'nyul' was recorded without its landmarks; fit it again")
            data = vn.nyul_apply(data, Params("nyul", vals, p.options), mask=mask)
        elif name == "equalize_adaptive":
            data = vn.equalize_adaptive(data, opts.get("kernel_size"), opts.get("clip_limit", 0.01), opts.get("nbins", 256), dim=tuple(opts.get("dim", ("y", "x"))))
        else:
            raise ValueError(f"step {name!r} cannot be replayed from saved parameters")
    return data


def _refit_kwargs(name: str, opts: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if opts.get("dim") is not None:
        kw["dim"] = tuple(opts["dim"])
    if name == "rescale":
        if opts.get("percentiles"):
            kw["percentiles"] = tuple(opts["percentiles"])
        elif isinstance(opts.get("in_range"), list):
            kw["in_range"] = tuple(opts["in_range"])
        kw["clip"] = opts.get("clip", True)
    if name in ("rescale", "equalize"):
        kw["out_range"] = opts["out_dtype"] if opts.get("out_dtype") else tuple(opts.get("out_range", (0.0, 1.0)))
    if name == "equalize":
        kw["nbins"] = opts.get("nbins", 256)
    if name == "gamma":
        kw["gamma"] = opts["gamma"]
    if name == "mean_scale":
        kw.update(target=opts["target"], per_volume=opts.get("per_volume", True))
    return kw


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """Saved steps: a JSON list (``volnorm convert --save-params``), a ``volnorm run`` params file
    (``{"steps": [...]}``) or a volnorm store's manifest."""
    p = Path(path)
    if p.is_dir():
        meta = json.loads((p / "zarr.json").read_text())["attributes"].get("volnorm", {})
        steps = meta.get("steps")
        if not steps:
            raise ValueError(f"{p}: this store records no fitted steps")
        return list(steps)
    try:
        history = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: not a parameter file ({e})") from None
    if isinstance(history, dict) and "steps" in history:  # the params output of volnorm run
        history = history["steps"]
    if not isinstance(history, list) or not all(isinstance(h, dict) and "method" in h for h in history):
        raise ValueError(f"{p}: expected a JSON list of fitted steps (as written by --save-params)")
    return history
