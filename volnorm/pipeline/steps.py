"""Transform steps by name, as the command line and pipeline specs give them.

``"rescale:percentiles=1,99"`` is ``vn.rescale(x, percentiles=(1.0, 99.0))``; steps run
left to right, each fitting on the output of the previous one (or taking ``params=``
from a saved list), and each records its fitted parameters, so a list of steps is
reproducible on new data (``volnorm apply``).

A step's options are checked whole before any data is read (:func:`check_options`): they
are bound to the signature of the function the step calls (:data:`STEP_FUNCTIONS`), typed
by its annotations, and range-checked by :data:`OPTION_RULES`, the ranges the functions'
docstrings document.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
import numbers
import types
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import xarray as xr

from volnorm import _dims, transforms
from volnorm._utils import plain_name
from volnorm.params import Params
from volnorm.transforms import threshold
from volnorm.transforms.thresholds import METHODS

logger = logging.getLogger(__name__)

#: Steps that take fitted parameters (``params=``) and can be replayed on new data.
FITTED = {"rescale": "rescale", "zscore": "zscore", "mean_scale": "mean_scale", "equalize": "equalize",
          "gamma": "gamma", "log": "log", "auto_gamma": "auto_gamma", "whitestripe": "whitestripe", "kde": "kde",
          "fcm": "fcm", "lsq": "lsq"}
#: Steps that cluster tissues inside a brain mask: they need the spec's ``mask``.
NEED_MASK = ("fcm", "lsq")
#: Steps applied without fitting (or refitted on each dataset by design); ``n4`` corrects each
#: volume on its own (N4 bias field, inside the spec's mask when it has one).
UNFITTED = ("equalize_adaptive", "dither", "binarize", "n4")
STEPS = tuple(FITTED) + UNFITTED
#: A pipeline spec's steps: the command line's, and Nyúl standardization (fit, then apply).
PIPELINE_STEPS = (*STEPS, "nyul")

# ---------------------------------------------------------------------------
# options: bound to the signature of the function a step calls
# ---------------------------------------------------------------------------

#: The ``volnorm`` function each step calls: its signature is the step's options.
STEP_FUNCTIONS: dict[str, str] = {**{name: name for name in STEPS}, "nyul": "nyul_fit"}
#: Arguments the runner gives a step itself; never options (n4's ``return_field``: from its
#: ``field`` option).
RUNNER_SUPPLIED = ("data", "mask", "params", "return_field")
#: Options of a step that its function lacks, acted on by the runner: n4's ``field`` names the
#: group beside the images that each volume's estimated bias field is written into
#: (``NAME/<volume>``; :func:`run_steps` ``fields``).
RUNNER_OPTIONS: dict[str, dict[str, tuple[inspect.Parameter, Any]]] = {
    "n4": {"field": (inspect.Parameter("field", inspect.Parameter.KEYWORD_ONLY, default=None), Union[str, None])},
}
#: Steps whose ``**kwargs`` go on to another function: its keyword options are the step's too.
PASSED_ON = {"binarize": "threshold"}
#: The ``per`` words (:mod:`volnorm._dims`) a step takes besides ``dim``: ``mean_scale``'s
#: ``per_volume`` says per volume or over the dataset.
PER_VOLUME_WORDS = {"volume": True, "dataset": False}
#: Steps whose ``dim`` is the plane (or block) they work on, not dims reduced over: the ``per``
#: words that name such a plane (``slice``: each ``(y, x)`` image; ``volume``: 3-D CLAHE).
PLANE_STEPS = {"equalize_adaptive": ("slice", "volume"), "dither": ("slice",)}


def per_words(name: str) -> tuple[str, ...]:
    """The ``per`` words step ``name`` takes (:mod:`volnorm._dims`); empty: none.

    Parameters
    ----------
    name : str
        A step of :data:`PIPELINE_STEPS`.

    Returns
    -------
    tuple of str

    Examples
    --------
    >>> per_words("zscore"), per_words("mean_scale"), per_words("dither"), per_words("nyul")
    (('dataset', 'volume', 'slice', 'voxel'), ('volume', 'dataset'), ('slice',), ())
    """
    if name in PLANE_STEPS:
        return PLANE_STEPS[name]
    if name == "mean_scale":
        return tuple(PER_VOLUME_WORDS)
    return tuple(_dims.PER) if "dim" in step_options(name) else ()
#: YAML 1.1's booleans, strings in a spec (only ``true`` / ``false`` are booleans).
YAML11_BOOLEANS = frozenset({"yes", "no", "on", "off", "y", "n", "true", "false"})


def _is_plain(name: str) -> bool:
    try:
        plain_name(name)
        return True
    except ValueError:
        return False


def _integer_dtype(name: str) -> bool:
    try:
        return np.dtype(name).kind in "iu"
    except Exception:  # noqa: BLE001 - numpy refuses a name that is no dtype in several ways
        return False


@dataclass(frozen=True)
class Rule:
    """What a step function's docstring documents about one option beyond its annotation.

    Numbers (the value, or each number of a list) lie within ``lo``..``hi`` (``open_lo`` /
    ``open_hi``: the bound itself excluded); a list's numbers increase (``increasing``:
    ``"<"`` strictly, ``"<="`` or equal); a list has ``length`` = (min, max or None)
    entries; a string is one of ``words`` (a tuple, or a test described by ``words_text``).
    """

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    increasing: str = ""
    length: tuple[int, int | None] | None = None
    words: tuple[str, ...] | Callable[[str], bool] | None = None
    words_text: str = ""

    def describe(self) -> str:
        """The rule in words.

        Returns
        -------
        str
            E.g. ``'within [0, 100], increasing'``.

        Examples
        --------
        >>> Rule(lo=0, hi=100, increasing="<").describe()
        'within [0, 100], increasing'
        >>> Rule(lo=0, open_lo=True).describe()
        '> 0'
        """
        parts = []
        if self.lo is not None and self.hi is not None:
            parts.append(f"within {'(' if self.open_lo else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.open_hi else ']'}")
        elif self.lo is not None:
            parts.append(f"{'>' if self.open_lo else '>='} {_num(self.lo)}")
        elif self.hi is not None:
            parts.append(f"{'<' if self.open_hi else '<='} {_num(self.hi)}")
        if self.increasing:
            parts.append("increasing" if self.increasing == "<" else "non-decreasing")
        if self.length is not None:
            lo, hi = self.length
            parts.append(f"{lo} entries" if lo == hi else f"{lo} or {hi} entries" if hi == lo + 1
                         else f"at least {lo} entries" if hi is None else f"{lo} to {hi} entries")
        return ", ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


#: The ranges and choices the step functions' docstrings document (their types come from the
#: signatures). Keyed by option, or ``"step.option"`` where one step's option differs; a
#: function's own check at run time stays (these only move the refusal before the run).
OPTION_RULES: dict[str, Rule] = {
    # rescale: "percentiles : (lo, hi) - In 0-100" (and lo < hi); nyul_fit: "The landmarks,
    # increasing within [0, 100], at least two"
    "percentiles": Rule(lo=0, hi=100, increasing="<", length=(2, None)),
    # rescale / dither: 'in_range : "minmax" or (lo, hi)' (lo <= hi: a constant window is allowed)
    "in_range": Rule(increasing="<=", words=("minmax",)),
    # rescale / equalize: "out_range : (lo, hi) or integer dtype" (a float range: lo < hi)
    "out_range": Rule(increasing="<", words=_integer_dtype, words_text="an integer dtype such as 'uint8'"),
    # nyul_fit: "standard_range : (lo, hi) - ... lo < hi"
    "standard_range": Rule(increasing="<"),
    # gamma: "The exponent, a positive number"
    "gamma": Rule(lo=0, open_lo=True),
    # equalize / equalize_adaptive: "nbins : int - Histogram bins"; threshold: "bins : int -
    # Histogram bins": a histogram of one bin maps (or splits) nothing
    "nbins": Rule(lo=2),
    "bins": Rule(lo=2),
    # equalize_adaptive: "clip_limit : float - Contrast clipping limit in [0, 1]" (0: no clipping)
    "clip_limit": Rule(lo=0, hi=1),
    # equalize_adaptive: "kernel_size : int or sequence of int - Shape of the contextual regions"
    "kernel_size": Rule(lo=1),
    # equalize_adaptive: "dim : sequence of str - The 2 or 3 dims of each plane or volume"
    "equalize_adaptive.dim": Rule(length=(2, 3)),
    # dither: 'method : {"bayer", "floyd-steinberg", "random"}'
    "dither.method": Rule(words=("bayer", "floyd-steinberg", "random")),
    # binarize: "method : str - One of volnorm.threshold's methods that gives one threshold (not
    # "multiotsu")"; the pipeline's mask threshold (mask.threshold) is one threshold too
    "binarize.method": Rule(words=tuple(m for m in METHODS if m != "multiotsu")),
    "threshold.method": Rule(words=tuple(m for m in METHODS if m != "multiotsu")),
    # threshold: "q : float - For percentile and robust_range*, in [0, 1]"; "classes : int - For
    # multiotsu" (an int >= 2 at run time)
    "q": Rule(lo=0, hi=1),
    "classes": Rule(lo=2),
    # n4: "shrink_factor : int - ... At least 1"; "iterations : sequence of int - ... Each at least 1";
    # "convergence_threshold : float - ... At least 0"; "control_points : int - ... more than
    # spline_order" (checked by n4 itself); "spline_order : int - ... At least 1"; "histogram_bins :
    # int - ... At least 2"; "bias_field_fwhm" and "wiener_noise : float - ... Greater than 0"
    "n4.shrink_factor": Rule(lo=1),
    "n4.iterations": Rule(lo=1, length=(1, None)),
    "n4.convergence_threshold": Rule(lo=0),
    "n4.control_points": Rule(lo=2),
    "n4.spline_order": Rule(lo=1),
    "n4.histogram_bins": Rule(lo=2),
    "n4.bias_field_fwhm": Rule(lo=0, open_lo=True),
    "n4.wiener_noise": Rule(lo=0, open_lo=True),
    # n4: "threads : int, optional - ... At least 1"; the spec's `field`: a plain name inside the store
    "n4.threads": Rule(lo=1),
    "n4.field": Rule(words=_is_plain, words_text="a plain name (no path separators, not hidden), e.g. 'bias_field'"),
    # fcm / lsq: "fuzziness : float - skfuzzy's m (> 1)"; "error : float - ... (> 0)"; "max_iter :
    # int - ... (>= 1)"; lsq: "standard : sequence of 3 float"; "norm_value : float - The standard
    # CSF mean" (0 would leave no scale to fit); the seed of numpy's generator is >= 0
    "fuzziness": Rule(lo=1, open_lo=True),
    "error": Rule(lo=0, open_lo=True),
    "max_iter": Rule(lo=1),
    "fcm.seed": Rule(lo=0),
    "lsq.seed": Rule(lo=0),
    "lsq.standard": Rule(length=(3, 3)),
    "lsq.norm_value": Rule(lo=0, open_lo=True),
}


class OptionError(ValueError):
    """A step option that the step's function would refuse; ``option`` is its key (``None``:
    the step as a whole, e.g. a required option missing)."""

    def __init__(self, option: str | None, message: str) -> None:
        super().__init__(message)
        self.option = option


def step_function(name: str) -> Callable[..., Any]:
    """The ``volnorm`` function step ``name`` calls (:data:`STEP_FUNCTIONS`).

    Parameters
    ----------
    name : str
        A step of :data:`PIPELINE_STEPS`.

    Returns
    -------
    callable
        E.g. :func:`volnorm.rescale`; :func:`volnorm.nyul_fit` for ``"nyul"``.

    Raises
    ------
    ValueError
        For an unknown step, with the closest one.

    Examples
    --------
    >>> step_function("nyul").__name__, step_function("rescale").__name__
    ('nyul_fit', 'rescale')
    """
    if name not in STEP_FUNCTIONS:
        hint = difflib.get_close_matches(str(name), PIPELINE_STEPS, n=1)
        raise ValueError(f"unknown step {name!r} (steps: {', '.join(PIPELINE_STEPS)})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return getattr(transforms, STEP_FUNCTIONS[name])


def step_options(name: str) -> dict[str, inspect.Parameter]:
    """The options step ``name`` takes: its function's parameters but the ones the runner
    supplies (:data:`RUNNER_SUPPLIED`), plus the keyword options of a function its ``**kwargs``
    go on to (:data:`PASSED_ON`).

    Parameters
    ----------
    name : str
        A step of :data:`PIPELINE_STEPS`.

    Returns
    -------
    dict of str to inspect.Parameter
        In the function's order (then the passed-on function's keyword options).

    Examples
    --------
    >>> list(step_options("rescale"))
    ['in_range', 'percentiles', 'out_range', 'dim', 'clip']
    >>> list(step_options("binarize"))[-3:]
    ['bins', 'classes', 'q']
    """
    return _options(step_function(name), PASSED_ON.get(name), name)


def _options(func: Callable[..., Any], passed_on: str | None = None, step: str = "") -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(func).parameters.values())[1:]  # the first one is the data
    out = {p.name: p for p in params if p.name not in RUNNER_SUPPLIED and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    out.update({k: p for k, (p, _) in RUNNER_OPTIONS.get(step, {}).items()})
    if passed_on is not None and any(p.kind is p.VAR_KEYWORD for p in params):
        for p in list(inspect.signature(getattr(transforms, passed_on)).parameters.values())[1:]:
            if p.name not in out and p.name not in RUNNER_SUPPLIED and p.kind is p.KEYWORD_ONLY:
                out[p.name] = p
    return out


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check step ``name``'s ``options`` against the function it calls, before any data is read.

    Every key must be a parameter of the function (:func:`step_options`; the runner's own
    arguments ``data``, ``mask`` and ``params`` are refused), every required parameter must be
    given, every value must have the parameter's annotated type (a number is not a boolean or
    a string; a boolean is ``true`` or ``false``; a tuple is a list of that length) and lie
    in the range the function's docstring documents (:data:`OPTION_RULES`).

    Parameters
    ----------
    name : str
        A step of :data:`PIPELINE_STEPS`.
    options : mapping
        The step's options as a spec (lists) or the command line (tuples) gives them.

    Returns
    -------
    dict
        ``options`` (a new dict), an earlier ``dim`` word (``dim: volume``) turned into its
        ``per`` word with a deprecation warning (:func:`volnorm._dims.words`).

    Raises
    ------
    OptionError
        Naming the option (``.option``) and the problem: for an unknown key the step's options
        and the closest one.

    Examples
    --------
    >>> check_options("rescale", {"percentiles": [1, 99]})
    {'percentiles': [1, 99]}
    >>> check_options("rescale", {"percentile": [1, 99]})
    Traceback (most recent call last):
    ...
    volnorm.pipeline.steps.OptionError: unknown option 'percentile' of step 'rescale'; did you mean 'percentiles'? (options: in_range, percentiles, out_range, dim, clip)
    >>> check_options("gamma", {"gamma": ".5e3"})
    Traceback (most recent call last):
    ...
    volnorm.pipeline.steps.OptionError: expected a number > 0, got str '.5e3'
    """
    what = f"step {name!r}"
    opts = _per_words(options, what, per_words(name))
    _bind(step_function(name), {k: v for k, v in opts.items() if k != "per"}, rules=name, what=what, passed_on=PASSED_ON.get(name), step=name)
    return opts


def _per_words(options: Mapping[str, Any], what: str, allowed: tuple[str, ...], warn: bool = True) -> dict[str, Any]:
    """:func:`volnorm._dims.words` as an :class:`OptionError` naming ``per`` (or ``dim``)."""
    if "per" in options and not allowed:
        raise OptionError("per", f"{what} has no `per` option (it is applied voxel by voxel or over its own dims)")
    try:
        return _dims.words(options, what, allowed=allowed, warn=warn)
    except ValueError as e:
        raise OptionError("per" if "per" in options else "dim", str(e).removeprefix(f"{what}: ")) from None


def check_threshold_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check the options of a mask from the data (a spec's ``mask.threshold``) against
    :func:`volnorm.threshold`, as :func:`check_options` does for a step (``per: volume`` is one
    threshold per volume: :mod:`volnorm._dims`).

    Parameters
    ----------
    options : mapping
        ``method``, ``per`` (or ``dim``) and the keyword options of :func:`volnorm.threshold`
        (``bins``, ``classes``, ``q``).

    Returns
    -------
    dict
        ``options`` (a new dict), an earlier ``dim`` word turned into its ``per`` word.

    Raises
    ------
    OptionError
        Naming the option and the problem; ``method`` must give one threshold (not ``multiotsu``).

    Examples
    --------
    >>> check_threshold_options({"method": "otsu", "per": "volume"})
    {'method': 'otsu', 'per': 'volume'}
    >>> check_threshold_options({"method": "otsuu"})
    Traceback (most recent call last):
    ...
    volnorm.pipeline.steps.OptionError: expected one of 'otsu', 'li', 'yen', 'triangle', 'isodata', 'mean', 'minimum', 'percentile', 'robust_range', 'robust_range_positive', got str 'otsuu'; did you mean 'otsu'?
    """
    opts = _per_words(options, "mask.threshold", tuple(_dims.PER))
    _bind(threshold, {k: v for k, v in opts.items() if k != "per"}, rules="threshold", what="mask.threshold")
    return opts


def _bind(func: Callable[..., Any], options: Mapping[str, Any], *, rules: str, what: str, passed_on: str | None = None,
          step: str = "") -> dict[str, Any]:
    params = _options(func, passed_on, step)
    hints = {**_hints(func), **{k: tp for k, (_, tp) in RUNNER_OPTIONS.get(step, {}).items()}}
    if passed_on is not None:
            hints = {**_hints(getattr(transforms, passed_on)), **hints}
    for key in options:
        if key in RUNNER_SUPPLIED:
            use = "the step's `field: NAME`" if key == "return_field" else "the spec's `mask` / `params_from`"
            raise OptionError(key, f"{what}: {key!r} is set by the pipeline, not an option (use {use})")
        if key not in params:
            hint = difflib.get_close_matches(str(key), list(params), n=1)
            raise OptionError(
                str(key), f"unknown option {key!r} of {what}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (options: {', '.join(params) or 'none'})"
            )
    for key, p in params.items():
        rule = OPTION_RULES.get(f"{rules}.{key}") or OPTION_RULES.get(key) or Rule()
        tp = hints.get(key, Any)
        if key not in options:
            if p.default is inspect.Parameter.empty:
                raise OptionError(None, f"{what} needs the option {key!r} ({_expected(tp, rule)})")
            continue
        problem = _problem(options[key], tp, rule)
        if problem:
            raise OptionError(key, problem)
    return dict(options)


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve is not checked
        return {}


#: (one, many) for the types a spec can write
_NOUNS: dict[Any, tuple[str, str]] = {
    bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
    str: ("a string", "strings"), Hashable: ("a dim name", "dim names"),
}


def _is(v: Any, tp: Any) -> bool:
    """Whether a spec value ``v`` has the annotated type ``tp`` (lists for tuples and sequences;
    types a spec cannot write, e.g. a DataArray, match nothing)."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_is(v, a) for a in args)
    if tp is type(None):
        return v is None
    if origin is Literal:
        return any(type(v) is type(a) and v == a for a in args)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if tp is float:
        try:
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        except OverflowError:  # an integer too large for a float
            return False
    if tp is str or tp is Hashable:
        return isinstance(v, str)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return isinstance(v, (list, tuple)) and len(v) == len(args) and all(_is(x, a) for x, a in zip(v, args))
    if origin in (tuple, list, Sequence):
        return isinstance(v, (list, tuple)) and all(_is(x, args[0] if args else Any) for x in v)
    return False


def _expected(tp: Any, rule: Rule) -> str:
    """What the option takes, in words: ``'a number > 0'``, ``'a list of 2 numbers'``, ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [d for a in args if a is not type(None) for d in [_expected(a, rule)] if d]
        parts = list(dict.fromkeys(parts))
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal and not isinstance(rule.words, tuple):
        return "one of " + ", ".join(map(repr, args))
    if (tp is str or origin is Literal) and isinstance(rule.words, tuple):
        return ("one of " if len(rule.words) > 1 else "") + ", ".join(map(repr, rule.words))
    if tp is str and rule.words is not None:
        return rule.words_text
    ranged = rule.describe() if rule.lo is not None or rule.hi is not None else ""
    if tp in _NOUNS:
        return _NOUNS[tp][0] + (f" {ranged}" if ranged and tp in (int, float) else "")
    if origin is tuple and args and args[-1] is not Ellipsis or origin in (tuple, list, Sequence):
        elem = args[0] if args else Any
        many = _NOUNS.get(elem, ("", "values"))[1]
        fixed = origin is tuple and args[-1] is not Ellipsis
        n = f"{len(args)} " if fixed else ""
        extra = (replace(rule, length=None) if fixed else rule).describe()
        return f"a list of {n}{many}" + (f" ({extra})" if extra else "")
    return ""


def _problem(v: Any, tp: Any, rule: Rule) -> str | None:
    """Why ``v`` does not fit the annotation ``tp`` and ``rule``; ``None`` if it does."""
    got = f"{type(v).__name__} {v!r}" if v is not None else "null"
    if not _is(v, tp):
        msg = f"expected {_expected(tp, rule) or 'a value a spec cannot write'}, got {got}"
        choices = rule.words if isinstance(rule.words, tuple) else [
            a for t in (typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,))
            if typing.get_origin(t) is Literal for a in typing.get_args(t)]
        hint = difflib.get_close_matches(v, choices, n=1) if isinstance(v, str) and choices else []
        if hint:
            msg += f"; did you mean {hint[0]!r}?"
        if isinstance(v, str) and _is(True, tp):
            msg += "; write true or false" + (" (YAML 1.1's yes/no/on/off are not booleans in a spec)"
                                              if v.lower() in YAML11_BOOLEANS else "")
        return msg
    if isinstance(v, str) and rule.words is not None:
        ok = v in rule.words if isinstance(rule.words, tuple) else rule.words(v)
        if not ok:
            hint = difflib.get_close_matches(v, rule.words, n=1) if isinstance(rule.words, tuple) else []
            return f"expected {_expected(tp, rule)}, got {got}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        return None
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    nums = [x for x in values if isinstance(x, numbers.Real) and not isinstance(x, bool)]
    bad = [x for x in nums if (rule.lo is not None and (x <= rule.lo if rule.open_lo else x < rule.lo))
           or (rule.hi is not None and (x >= rule.hi if rule.open_hi else x > rule.hi))]
    if isinstance(v, (list, tuple)):
        n_lo, n_hi = rule.length or (0, None)
        if len(v) < n_lo or (n_hi is not None and len(v) > n_hi):
            bad.append(v)
        if rule.increasing and len(nums) == len(v):
            step_ok = (lambda a, b: a < b) if rule.increasing == "<" else (lambda a, b: a <= b)
            if not all(step_ok(a, b) for a, b in zip(nums, nums[1:])):
                bad.append(v)
    if bad:
        return f"expected {_expected(tp, rule)}, got {got}"
    return None


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
    """``"name:key=value,...;key=value"`` (``;`` or ``:`` between keys) -> ``(name, kwargs)``,
    the options checked as a spec's are (:func:`check_options`).

    Examples
    --------
    >>> parse_step("rescale:percentiles=1,99:out_range=uint8")
    ('rescale', {'percentiles': (1, 99), 'out_range': 'uint8'})
    >>> parse_step("equalize")
    ('equalize', {})
    >>> parse_step("rescale:percentile=1,99")
    Traceback (most recent call last):
    ...
    ValueError: step 'rescale:percentile=1,99': percentile: unknown option 'percentile' of step 'rescale'; did you mean 'percentiles'? (options: in_range, percentiles, out_range, dim, clip)
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
    try:
        kwargs = check_options(name, kwargs)
        if set(kwargs) & set(RUNNER_OPTIONS.get(name, {})):
            raise OptionError(next(iter(set(kwargs) & set(RUNNER_OPTIONS[name]))), "written beside the images by a pipeline spec only (volnorm run)")
    except OptionError as e:
        raise ValueError(f"step {text!r}: " + (f"{e.option}: " if e.option else "") + str(e)) from None
    return name, kwargs


def _resolve_dim(name: str, data: xr.DataArray, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A checked step's ``per`` (or legacy ``dim`` word) as the function's own argument."""
    kwargs = _dims.words(kwargs, f"step {name!r}", warn=False)
    if name == "mean_scale" and "per" in kwargs:
        kwargs = {**kwargs, "per_volume": PER_VOLUME_WORDS[kwargs.pop("per")]}
    return _dims.resolve(kwargs, data)


def run_steps(data: xr.DataArray, steps: Sequence[tuple[str, dict[str, Any]]], *, mask: xr.DataArray | None = None,
              fields: dict[str, xr.DataArray] | None = None) -> xr.DataArray:
    """Fit and apply ``steps`` left to right; the fitted parameters accumulate in
    ``attrs["volnorm_params"]``. ``mask`` goes to every step that takes one (its
    statistics are taken inside the mask). n4's ``field: NAME`` puts the lazy bias field in
    ``fields[NAME]`` (made by the same tasks as the corrected data) and is recorded with the
    step; without ``fields`` it is not made. Computes: each step's fit pass."""
    for name, kwargs in steps:
        field = kwargs.get("field")
        kwargs = _resolve_dim(name, data, {k: v for k, v in kwargs.items() if k not in RUNNER_OPTIONS.get(name, {})})
        if name == "n4":
            data = _n4(data, mask, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}, field, fields)
            continue
        if name == "nyul":  # fit the landmarks on these data, then map them
            fit_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            data = transforms.nyul_apply(data, transforms.nyul_fit(data, mask=mask, **fit_kw), mask=mask)
            continue
        func = getattr(transforms, name)
        if mask is None and name in NEED_MASK:
            raise ValueError(f"step {name!r} needs a brain mask: a pipeline spec's `mask:` (a file, or a threshold per volume), "
                             "or --mask on the command line")
        if mask is not None and "mask" in inspect.signature(func).parameters:
            kwargs = {**kwargs, "mask": mask}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # YAML lists: the API's tuples
        data = func(data, **kwargs)
    return data


def _n4(data: xr.DataArray, mask: xr.DataArray | None, kwargs: dict[str, Any], field: str | None,
        fields: dict[str, xr.DataArray] | None) -> xr.DataArray:
    """The n4 step: with ``field`` (and ``fields`` to put it in), its bias field from the same
    tasks, and ``field`` recorded in the step's options (a replay writes it again)."""
    if field is None or fields is None:
        return transforms.n4(data, mask=mask, **kwargs)
    out, fields[field] = transforms.n4(data, mask=mask, return_field=True, **kwargs)
    history = json.loads(out.attrs["volnorm_params"])
    history[-1]["options"]["field"] = field
    out.attrs["volnorm_params"] = json.dumps(history)
    return out


def replay(data: xr.DataArray, history: Sequence[dict[str, Any]], *, mask: xr.DataArray | None = None,
           fields: dict[str, xr.DataArray] | None = None) -> xr.DataArray:
    """Apply recorded steps (``attrs["volnorm_params"]`` / a store's ``steps``) with their fitted
    parameters: no fit pass for fitted steps. Lazy except for the unfitted ones' own passes
    (and Nyúl's per-volume landmarks, taken inside ``mask``). A recorded n4 ``field`` goes
    into ``fields`` as :func:`run_steps` puts it (ignored without ``fields``)."""
    for rec in history:
        name = rec["method"]
        opts = dict(rec.get("options", {}))
        p = Params.from_dict(rec) if rec.get("values") is not None else None
        per_part = opts.get("dim") is not None or (name == "mean_scale" and opts.get("per_volume"))
        if name in NEED_MASK:
            # each volume's tissues are clustered again inside the mask; lsq keeps its standard means
            kw = _refit_kwargs(name, opts)
            if name == "lsq":
                if p is None or "standard" not in p.values:
                    raise ValueError("step 'lsq' was recorded without its standard tissue means; fit it again")
                kw["standard"] = tuple(float(v) for v in p.values["standard"].values)
            data = getattr(transforms, name)(data, mask=mask, **kw)
        elif name in FITTED and per_part:
            # per-volume/per-slice parameters belong to the volumes they were fitted on: refit
            # the same step on these data (dataset-wide parameters are reused as they are)
            logger.info("step %s was fitted per %s: fitting it again on the new data", name, opts.get("dim") or "volume")
            data = getattr(transforms, name)(data, **_refit_kwargs(name, opts))
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
            data = getattr(transforms, name)(data, params=p, **extra)
        elif name == "nyul":  # the standard landmarks; each volume's own come from these data
            vals = p.values.drop_vars("volume_landmarks", errors="ignore") if p is not None else None
            if vals is None:
                raise ValueError("step 'nyul' was recorded without its landmarks; fit it again")
            data = transforms.nyul_apply(data, Params("nyul", vals, p.options), mask=mask)
        elif name == "dither":  # the recorded window, so the same data give the same bits
            window = opts.get("in_range")
            data = transforms.dither(data, opts.get("method", "bayer"), in_range=tuple(window) if isinstance(window, list) else window,
                                     dim=tuple(opts.get("dim", ("y", "x"))), seed=opts.get("seed", 0))
        elif name == "n4":  # nothing fitted: the same options, each volume corrected on its own (its field too)
            field = opts.pop("field", None)
            data = _n4(data, mask, {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}, field, fields)
        elif name == "equalize_adaptive":
            data = transforms.equalize_adaptive(data, opts.get("kernel_size"), opts.get("clip_limit", 0.01), opts.get("nbins", 256), dim=tuple(opts.get("dim", ("y", "x"))))
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
    if name in ("gamma", "log", "auto_gamma"):  # records from before `scale` existed scaled by the data's max
        kw["scale"] = opts.get("scale", "data")
        for key in ("gain", "inv"):
            if key in opts and (name != "auto_gamma"):
                kw[key] = opts[key]
        if opts.get("out_range") is not None:
            out = opts["out_range"]
            kw["out_range"] = tuple(out) if isinstance(out, list) else out
    if name == "mean_scale":
        kw.update(target=opts["target"], per_volume=opts.get("per_volume", True))
    if name in ("whitestripe", "kde"):  # always per volume: no `dim` argument
        kw = {k: opts[k] for k in ("width_l", "width_u", "modality") if k in opts}
    if name in NEED_MASK:
        keys = ("tissue", "fuzziness", "error", "max_iter", "seed") if name == "fcm" else ("norm_value", "fuzziness", "error", "max_iter", "seed")
        kw = {k: opts[k] for k in keys if k in opts}
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
