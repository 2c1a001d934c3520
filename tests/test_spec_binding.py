"""Pipeline specs are checked whole before anything runs: each step's options are bound to the
signature of the function the step calls (volnorm.pipeline.steps.check_options), typed by its
annotations and range-checked as its docstring documents; booleans are YAML 1.2's (true /
false only); the voxel histogram's name is a plain name inside the store.

Every bad spec is refused twice, by ``vn.pipeline.load_spec`` and by ``volnorm run
--dry-run`` (exit code 1, the message on stderr), with the key path, its line and - for a
typo - the suggestion. Every shipped workflow spec still loads.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

import volnorm as vn
from volnorm._utils import VolnormDeprecationWarning
from volnorm.cli import main
from volnorm.pipeline.spec import SpecError, load_spec, parse_yaml
from volnorm.pipeline.steps import (
    OPTION_RULES,
    PIPELINE_STEPS,
    RUNNER_SUPPLIED,
    OptionError,
    check_options,
    parse_step,
    step_function,
    step_options,
)

ROOT = Path(__file__).resolve().parent.parent
#: a minimal valid spec, one key per line: the steps start on line 6, the first option on line 8
HEAD = """\
version: 1
input:
  nifti: scans/*.nii.gz
output:
  store: out.zarr
"""


def step(name: str, option: str, value: str) -> str:
    """``HEAD`` plus one step with one option (the option on line 8)."""
    return HEAD + f"steps:\n  - {name}:\n      {option}: {value}\n"


def refused(text: str) -> str:
    """The SpecError message of ``text`` at load time (fails if it loads)."""
    with pytest.raises(SpecError) as ei:
        vn.pipeline.load_spec(text, base="/b")
    return str(ei.value)


def refused_by_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> str:
    """``volnorm run spec.yaml --dry-run``'s stderr (exit code 1, nothing written)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    capsys.readouterr()
    assert main(["run", str(spec), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"volnorm run: error: {spec}, line "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
    return err


def both(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, *needles: str) -> None:
    """``text`` is refused by load_spec and by the CLI, each message holding every needle."""
    for msg in (refused(text), refused_by_cli(tmp_path, capsys, text)):
        for needle in needles:
            assert needle in msg, f"{needle!r} not in {msg!r}"


# ---------------------------------------------------------------------------
# the three cases of the issue
# ---------------------------------------------------------------------------


def test_misspelt_option_is_refused_with_the_suggestion(tmp_path, capsys):
    text = HEAD + "steps: [{rescale: {percentile: [1, 99]}}]\n"
    msg = refused(text)
    assert msg.startswith("<spec>, line 6: steps[0].rescale.percentile: unknown option 'percentile' of step 'rescale'; "
                          "did you mean 'percentiles'? (options: in_range, percentiles, out_range, dim, clip)")
    both(tmp_path, capsys, text, "line 6: steps[0].rescale.percentile", "did you mean 'percentiles'?", "in_range, percentiles")


def test_string_where_a_number_is_required(tmp_path, capsys):
    text = HEAD + 'steps: [{gamma: {gamma: ".5e3"}}]\n'
    assert refused(text) == "<spec>, line 6: steps[0].gamma.gamma: expected a number > 0, got str '.5e3'"
    both(tmp_path, capsys, text, "line 6: steps[0].gamma.gamma: expected a number > 0, got str '.5e3'")


@pytest.mark.parametrize("word", ["NO", "no", "No", "yes", "Yes", "YES", "on", "ON", "off", "Off", "y", "n", "Y", "N",
                                  "True", "FALSE", "False", "TRUE"])
def test_yaml11_booleans_are_refused_where_a_boolean_is_expected(tmp_path, capsys, word):
    text = step("rescale", "clip", word)
    assert refused(text).startswith(f"<spec>, line 8: steps[0].rescale.clip: expected true or false, got str {word!r}; "
                                    "write true or false")
    both(tmp_path, capsys, text, "steps[0].rescale.clip", "write true or false")


@pytest.mark.parametrize("word", ["yes", "NO", "On", "off"])
@pytest.mark.parametrize(
    "where",
    [
        "steps:\n  - mean_scale:\n      per_volume: {}\n",
        "steps:\n  - binarize:\n      invert: {}\n",
        "steps:\n  - binarize:\n      inclusive: {}\n",
        "outputs:\n  images: {}\n  statistics: {{path: s.csv}}\n",
        "engine:\n  progress: {}\n",
        "engine:\n  allow_insecure: {}\n",
    ],
)
def test_yaml11_booleans_anywhere_in_the_spec(tmp_path, capsys, word, where):
    text = HEAD + where.format(word)
    key = {"mean_scale": "steps[0].mean_scale.per_volume", "invert": "steps[0].binarize.invert",
           "inclusive": "steps[0].binarize.inclusive", "images": "outputs.images",
           "progress": "engine.progress", "allow_insecure": "engine.allow_insecure"}
    path = next(v for k, v in key.items() if k in where)
    both(tmp_path, capsys, text, f"line 7: {path}" if "engine" in where or "outputs" in where else f"line 8: {path}",
         f"'{word}'", "write true or false")


def test_lowercase_true_and_false_are_the_booleans():
    s = load_spec(HEAD + "steps:\n  - rescale: {clip: false}\n  - binarize: {invert: true}\n"
                  "outputs:\n  images: true\nengine:\n  progress: false\n", base="/b")
    assert s["steps"][0]["options"]["clip"] is False and s["steps"][1]["options"]["invert"] is True
    assert s["outputs"]["images"] is True and s["engine"]["progress"] is False


def test_the_resolver_is_yaml_1_2_for_booleans_everywhere():
    data, _ = parse_yaml("a: yes\nb: NO\nc: on\nd: true\ne: false\nf: [y, n, Off]\ng: True\n")
    assert data == {"a": "yes", "b": "NO", "c": "on", "d": True, "e": False, "f": ["y", "n", "Off"], "g": "True"}
    # a name that YAML 1.1 turned into a boolean is a name now
    assert load_spec(HEAD + "name: yes\n", base="/b")["name"] == "yes"
    # an explicit !!bool takes only true / false as well
    assert parse_yaml("a: !!bool true\n")[0] == {"a": True}
    for word in ("yes", "True", "off"):
        msg = refused(HEAD + f"name: !!bool {word}\n")
        assert msg == f"<spec>, line 6: {word!r} is not a valid !!bool (write true or false)"


# ---------------------------------------------------------------------------
# unknown options, on every step kind
# ---------------------------------------------------------------------------

#: for each step: a misspelt option and the one it should suggest
TYPOS = {
    "rescale": ("percentile", "percentiles"),
    "zscore": ("dims", "dim"),
    "mean_scale": ("targett", "target"),
    "equalize": ("nbin", "nbins"),
    "gamma": ("gama", "gamma"),
    "log": ("dimm", "dim"),
    "auto_gamma": ("dm", "dim"),
    "equalize_adaptive": ("cliplimit", "clip_limit"),
    "dither": ("methd", "method"),
    "binarize": ("inclusiv", "inclusive"),
    "nyul": ("standard_rang", "standard_range"),
    "n4": ("shrink_factr", "shrink_factor"),
    "whitestripe": ("widht", "width"),
    "kde": ("modalty", "modality"),
    "fcm": ("tisue", "tissue"),
    "lsq": ("norm_valu", "norm_value"),
}


def test_every_step_kind_has_a_typo_case():
    assert set(TYPOS) == set(PIPELINE_STEPS)


@pytest.mark.parametrize(("name", "typo", "meant"), [(n, *t) for n, t in TYPOS.items()])
def test_unknown_option_on_each_step_kind(tmp_path, capsys, name, typo, meant):
    text = step(name, typo, "1")
    msg = refused(text)
    options = ", ".join(step_options(name))
    assert msg == (f"<spec>, line 8: steps[0].{name}.{typo}: unknown option {typo!r} of step {name!r}; "
                   f"did you mean {meant!r}? (options: {options})")
    both(tmp_path, capsys, text, f"line 8: steps[0].{name}.{typo}", f"did you mean {meant!r}?", f"(options: {options})")


def test_unknown_option_without_a_close_match_lists_the_options():
    msg = refused(step("equalize", "zzzzzz", "1"))
    assert msg == ("<spec>, line 8: steps[0].equalize.zzzzzz: unknown option 'zzzzzz' of step 'equalize' "
                   "(options: nbins, dim, out_range)")


def test_options_are_the_signature_of_the_function_the_step_calls():
    for name in PIPELINE_STEPS:
        func = step_function(name)
        params = list(inspect.signature(func).parameters.values())[1:]
        named = [p.name for p in params if p.name not in RUNNER_SUPPLIED and p.kind is not p.VAR_KEYWORD]
        assert list(step_options(name))[: len(named)] == named, name
        assert not set(step_options(name)) & set(RUNNER_SUPPLIED)
    assert step_function("nyul") is vn.transforms.nyul_fit  # the strict DataArray function (vn.nyul_fit also takes numpy arrays)
    # binarize passes **kwargs on to vn.threshold: its keyword options are binarize's too
    assert {"bins", "classes", "q"} <= set(step_options("binarize"))
    assert "percentiles" not in step_options("zscore")


@pytest.mark.parametrize("option", ["data", "mask", "params"])
def test_options_the_runner_supplies_are_refused(option):
    msg = refused(step("zscore", option, "x"))
    assert msg.startswith(f"<spec>, line 8: steps[0].zscore.{option}: step 'zscore': {option!r} is set by the pipeline")


def test_n4s_return_field_is_the_runners_its_field_option_a_plain_name(tmp_path, capsys):
    assert refused(step("n4", "return_field", "true")) == (
        "<spec>, line 8: steps[0].n4.return_field: step 'n4': 'return_field' is set by the pipeline, not an option "
        "(use the step's `field: NAME`)")
    assert list(step_options("n4"))[-2:] == ["threads", "field"]
    for bad in ("../x", ".hidden", "a/b", "''"):
        both(tmp_path, capsys, step("n4", "field", bad), "line 8: steps[0].n4.field: expected a plain name (no path separators, not hidden)")
    assert refused(step("n4", "field", "3")) == (
        "<spec>, line 8: steps[0].n4.field: expected a plain name (no path separators, not hidden), e.g. 'bias_field' or null, got int 3")
    assert refused(step("n4", "threads", "0")).startswith("<spec>, line 8: steps[0].n4.threads: expected an integer >= 1 or null, got int 0")
    assert load_spec(step("n4", "field", "bias_field"), base="/b")["steps"][0]["options"] == {"field": "bias_field"}
    # one field per name; written beside the images only
    two = HEAD + "steps:\n  - n4: {field: f}\n  - n4: {field: f}\n"
    assert refused(two) == "<spec>, line 8: steps[1].n4.field: 'f' is already the field of steps[0]"
    nowhere = step("n4", "field", "f") + "outputs:\n  images: false\n  params: p.json\n"
    assert refused(nowhere) == ("<spec>, line 8: steps[0].n4.field: the bias field is written beside the images; "
                                "outputs.images is false")
    # the command line's --step n4 has no store to write it beside
    with pytest.raises(ValueError, match=r"^step 'n4:field=f': field: written beside the images by a pipeline spec only"):
        parse_step("n4:field=f")


MASK_AFTER = HEAD + "mask:\n  threshold: {method: otsu, per: volume}\n  after: %s\nsteps:\n%s"


@pytest.mark.parametrize(("after", "steps", "words"), [
    ("n4s", "  - n4\n  - zscore\n", "mask.after: 'n4s' is not one of the steps (n4, zscore); did you mean 'n4'?"),
    ("n4", "  - n4\n  - n4\n", "mask.after: step 'n4' is given 2 times: mask.after needs one"),
    ("n4", "  - fcm\n  - n4\n", "mask.after: 'n4': step 'fcm' needs the mask but runs before it is made"),
    ("n4", "  []\n", "mask.after: 'n4' is not one of the steps (none)"),
])
def test_mask_after_names_one_step(tmp_path, capsys, after, steps, words):
    text = MASK_AFTER % (after, steps)
    assert refused(text) == f"<spec>, line 8: {words}"
    both(tmp_path, capsys, text, f"line 8: {words}")


def test_mask_after_loads_and_says_how_many_steps_run_before_the_mask():
    from volnorm.pipeline.spec import steps_before_mask

    s = load_spec(MASK_AFTER % ("n4", "  - n4: {field: bias_field}\n  - zscore: {per: volume}\n"), base="/b")
    assert s["mask"]["after"] == "n4" and steps_before_mask(s) == 1
    assert steps_before_mask(load_spec(HEAD + "mask:\n  threshold: {method: otsu}\nsteps:\n  - n4\n", base="/b")) == 0
    pf = HEAD + "mask:\n  threshold: {method: otsu}\n  after: n4\nparams_from: old.zarr\n"
    assert refused(pf) == "<spec>, line 8: mask.after names one of the spec's `steps`; with params_from there are none"


def test_a_required_option_is_required(tmp_path, capsys):
    for text in (HEAD + "steps:\n  - gamma\n", HEAD + "steps:\n  - gamma: {}\n"):
        both(tmp_path, capsys, text, "line 7: steps[0]", "step 'gamma' needs the option 'gamma' (a number > 0)")


# ---------------------------------------------------------------------------
# types from the annotations, ranges from the docstrings
# ---------------------------------------------------------------------------

WRONG_TYPES = [
    ("gamma", "gamma", "true", "expected a number > 0, got bool True"),
    ("gamma", "gamma", "[1]", "expected a number > 0, got list [1]"),
    ("gamma", "gamma", ".inf", "expected a number > 0, got float inf"),
    ("rescale", "percentiles", "'1, 99'", "expected a list of 2 numbers (within [0, 100], increasing) or null, got str '1, 99'"),
    ("rescale", "percentiles", "[1, '99']", "expected a list of 2 numbers"),
    ("rescale", "percentiles", "[1, 2, 3]", "expected a list of 2 numbers"),
    ("rescale", "percentiles", "[true, 99]", "expected a list of 2 numbers"),
    ("rescale", "percentiles", "50", "expected a list of 2 numbers"),
    ("rescale", "in_range", "maxmin", "expected 'minmax' or a list of 2 numbers (non-decreasing), got str 'maxmin'"),
    ("rescale", "out_range", "float32", "expected a list of 2 numbers (increasing) or an integer dtype such as 'uint8'"),
    ("rescale", "out_range", "7", "expected a list of 2 numbers (increasing) or an integer dtype such as 'uint8', got int 7"),
    ("rescale", "dim", "[z, 3]", "expected a dim name or a list of dim names or null, got list ['z', 3]"),
    ("rescale", "clip", "1", "expected true or false, got int 1"),
    ("equalize", "nbins", "256.0", "expected an integer >= 2, got float 256.0"),
    ("equalize", "nbins", "'256'", "expected an integer >= 2, got str '256'"),
    ("mean_scale", "target", "lots", "expected a number, got str 'lots'"),
    ("equalize_adaptive", "kernel_size", "[8, a]", "expected an integer >= 1 or a list of integers (>= 1) or null"),
    ("equalize_adaptive", "dim", "y", "expected a list of dim names (2 or 3 entries), got str 'y'"),
    ("dither", "dims", "[y]", "expected a list of 2 dim names, got list ['y']"),
    ("binarize", "threshold", "high", "expected a number or null, got str 'high'"),
    ("binarize", "upper", "[1]", "expected a number or null, got list [1]"),
    ("binarize", "classes", "2.5", "expected an integer >= 2, got float 2.5"),
    ("nyul", "percentiles", "[1, x, 99]", "expected a list of numbers (within [0, 100], increasing, at least 2 entries)"),
    ("nyul", "standard_range", "{lo: 0, hi: 100}", "expected a list of 2 numbers (increasing), got dict"),
]


@pytest.mark.parametrize(("name", "option", "value", "expected"), WRONG_TYPES)
def test_wrong_types_are_refused(tmp_path, capsys, name, option, value, expected):
    text = step(name, option, value)
    msg = refused(text)
    assert msg.startswith(f"<spec>, line 8: steps[0].{name}.{option}: {expected}"), msg
    both(tmp_path, capsys, text, f"line 8: steps[0].{name}.{option}: {expected}")


OUT_OF_RANGE = [
    ("rescale", "percentiles", "[1, 150]"),
    ("rescale", "percentiles", "[-1, 99]"),
    ("rescale", "percentiles", "[99, 1]"),
    ("rescale", "percentiles", "[50, 50]"),
    ("rescale", "in_range", "[100, 0]"),
    ("rescale", "out_range", "[1, 0]"),
    ("equalize", "out_range", "[0, 0]"),
    ("gamma", "gamma", "0"),
    ("gamma", "gamma", "-0.5"),
    ("equalize", "nbins", "1"),
    ("equalize", "nbins", "0"),
    ("equalize_adaptive", "nbins", "-3"),
    ("equalize_adaptive", "clip_limit", "1.5"),
    ("equalize_adaptive", "clip_limit", "-0.01"),
    ("equalize_adaptive", "kernel_size", "0"),
    ("equalize_adaptive", "kernel_size", "[8, 0]"),
    ("equalize_adaptive", "dim", "[x]"),
    ("equalize_adaptive", "dim", "[t, z, y, x]"),
    ("dither", "method", "floyd"),
    ("binarize", "method", "multiotsu"),
    ("binarize", "method", "otsuu"),
    ("binarize", "q", "1.5"),
    ("binarize", "q", "-0.1"),
    ("binarize", "bins", "1"),
    ("binarize", "classes", "1"),
    ("nyul", "percentiles", "[10, 5, 50]"),
    ("nyul", "percentiles", "[50]"),
    ("nyul", "percentiles", "[0, 101]"),
    ("nyul", "standard_range", "[100, 0]"),
]


@pytest.mark.parametrize(("name", "option", "value"), OUT_OF_RANGE)
def test_values_out_of_the_documented_range_are_refused(tmp_path, capsys, name, option, value):
    text = step(name, option, value)
    msg = refused(text)
    assert msg.startswith(f"<spec>, line 8: steps[0].{name}.{option}: expected "), msg
    shown = yaml.safe_load(f"v: {value}")["v"]
    assert f"got {type(shown).__name__} {shown!r}" in msg, msg
    both(tmp_path, capsys, text, f"steps[0].{name}.{option}: expected ")


@pytest.mark.parametrize(
    ("name", "option", "value", "words"),
    [
        ("rescale", "percentiles", "[1, 150]", "within [0, 100], increasing"),
        ("gamma", "gamma", "0", "a number > 0"),
        ("equalize", "nbins", "1", "an integer >= 2"),
        ("equalize_adaptive", "clip_limit", "2", "a number within [0, 1]"),
        ("binarize", "q", "2", "a number within [0, 1]"),
        ("dither", "method", "bayr", "one of 'bayer', 'floyd-steinberg', 'random', got str 'bayr'; did you mean 'bayer'?"),
        ("binarize", "method", "otsuu", "did you mean 'otsu'?"),
    ],
)
def test_range_messages_say_the_rule(name, option, value, words):
    assert words in refused(step(name, option, value))


#: a few bad options and how the function itself refuses them when called: the spec
#: check moves these failures before the run, it does not invent them
RUNTIME_REFUSALS = [
    ("rescale", {"percentile": (1, 99)}, TypeError),
    ("rescale", {"percentiles": (1, 150)}, ValueError),
    ("rescale", {"out_range": "float32"}, ValueError),
    ("gamma", {"gamma": -1.0}, ValueError),
    ("gamma", {}, TypeError),
    ("equalize", {"nbins": 0}, ValueError),
    ("equalize_adaptive", {"clip_limit": 1.5}, ValueError),
    ("equalize_adaptive", {"dim": ("x",)}, ValueError),
    ("dither", {"method": "floyd"}, ValueError),
    ("binarize", {"method": "multiotsu"}, ValueError),
    ("nyul", {"percentiles": (10, 5, 50)}, ValueError),
    ("nyul", {"standard_range": (100, 0)}, ValueError),
]


@pytest.mark.parametrize(("name", "options", "error"), RUNTIME_REFUSALS)
def test_what_the_spec_refuses_the_function_refuses_too(name, options, error):
    data = xr.DataArray(np.arange(2 * 8 * 8, dtype="float64").reshape(2, 8, 8), dims=("volume", "y", "x"))
    with pytest.raises(OptionError):
        check_options(name, options)
    with pytest.raises(error):
        step_function(name)(data, **options)


def test_the_defaults_of_every_step_function_pass_its_own_check():
    """The rules are never stricter than the function: its own defaults (as a spec writes
    them: tuples as lists) are accepted, for every step and option."""
    required = {"gamma": {"gamma": 1.0}}  # the one option without a default
    for name in PIPELINE_STEPS:
        for key, p in step_options(name).items():
            if p.default is inspect.Parameter.empty:
                assert key in required.get(name, {}), (name, key)
                continue
            value = list(p.default) if isinstance(p.default, tuple) else p.default
            opts = {**required.get(name, {}), key: value}
            assert check_options(name, opts) == opts, (name, key)


def test_every_rule_names_an_option_some_step_or_the_mask_threshold_has():
    known = {k for n in PIPELINE_STEPS for k in step_options(n)} | set(inspect.signature(vn.threshold).parameters)
    for key in OPTION_RULES:
        step_name, _, option = key.rpartition(".")
        assert option in known, key
        if step_name and step_name != "threshold":
            assert option in step_options(step_name), key


VALID_STEPS = """\
steps:
  - rescale: {percentiles: [0.5, 99.5], out_range: uint8, dim: per-volume, clip: true}
  - rescale: {in_range: [0, 4095], out_range: [-1, 1]}
  - rescale: {in_range: minmax, dim: [z, y, x]}
  - zscore: {dim: volume}
  - mean_scale: {target: 10000, per_volume: false}
  - equalize: {nbins: 128, dim: [y, x], out_range: [0, 1]}
  - gamma: {gamma: 0.5}
  - gamma: {gamma: 2}
  - log
  - auto_gamma: {dim: null}
  - equalize_adaptive: {kernel_size: [8, 8], clip_limit: 0.02, nbins: 256, dim: [y, x]}
  - equalize_adaptive: {kernel_size: 16, clip_limit: 0, dim: per-volume}
  - dither: {method: floyd-steinberg, in_range: [0, 1], dims: [y, x]}
  - binarize: {threshold: 0.5, inclusive: true, upper: 0.9, invert: false}
  - binarize: {method: percentile, q: 0.9, bins: 512, dim: [z, y, x]}
  - nyul: {percentiles: [2, 25, 50, 75, 98], standard_range: [0, 100]}
  - n4: {shrink_factor: 2, iterations: [3, 3], threads: 1, field: bias_field}
  - whitestripe: {width: 0.1, modality: t2}
  - kde: {modality: pd}
  - fcm: {tissue: gm, max_iter: 100}
  - lsq: {norm_value: 2, standard: [1, 2, 3], seed: 4}
"""


def test_valid_options_of_every_step_load_unchanged():
    s = load_spec(HEAD + VALID_STEPS, base="/b")
    raw = yaml.safe_load(VALID_STEPS)["steps"]
    assert [st["name"] for st in s["steps"]] == [next(iter(r)) if isinstance(r, dict) else r for r in raw]
    assert [st["options"] for st in s["steps"]] == [next(iter(r.values())) if isinstance(r, dict) else {} for r in raw]
    assert {st["name"] for st in s["steps"]} == set(PIPELINE_STEPS)


def test_dict_specs_may_use_tuples_and_numpy_numbers():
    spec = {"version": 1, "input": {"nifti": "a.nii"}, "output": {"store": "o.zarr"},
            "steps": [{"rescale": {"percentiles": (1, np.float64(99))}}, {"equalize": {"nbins": np.int64(64)}}]}
    assert load_spec(spec, base="/b")["steps"][0]["options"]["percentiles"] == (1, 99.0)
    spec["steps"] = [{"rescale": {"percentile": (1, 99)}}]
    with pytest.raises(SpecError, match=r"^<spec>: steps\[0\]\.rescale\.percentile: unknown option .*did you mean 'percentiles'"):
        load_spec(spec, base="/b")


def test_an_error_in_a_later_step_names_that_step_and_its_line():
    text = HEAD + "steps:\n  - zscore\n  - equalize: {nbins: 64}\n  - rescale:\n      percentiles: [1, 99]\n      clip: off\n"
    assert refused(text).startswith("<spec>, line 11: steps[2].rescale.clip: expected true or false, got str 'off'")


# ---------------------------------------------------------------------------
# the mask from the data: mask.threshold is bound to vn.threshold
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "needle"),
    [
        ("{methd: otsu}", "line 7: mask.threshold.methd: unknown option 'methd' of mask.threshold; did you mean 'method'?"),
        ("{method: otsuu}", "line 7: mask.threshold.method: expected one of 'otsu', "),
        ("{method: multiotsu}", "line 7: mask.threshold.method: expected one of 'otsu', "),
        ("{method: percentile, q: 50}", "line 7: mask.threshold.q: expected a number within [0, 1], got int 50"),
        ("{method: otsu, bins: many}", "line 7: mask.threshold.bins: expected an integer >= 2 or null, got str 'many'"),
        ("{method: otsu, mask: x}", "line 7: mask.threshold.mask: mask.threshold: 'mask' is set by the pipeline"),
        ("otsu", "line 7: mask.threshold: expected dict, got str 'otsu'"),
    ],
)
def test_mask_threshold_options(tmp_path, capsys, threshold, needle):
    both(tmp_path, capsys, HEAD + f"mask:\n  threshold: {threshold}\n", needle)


def test_mask_threshold_per_volume_loads():
    s = load_spec(HEAD + "mask:\n  threshold: {method: li, per: volume, bins: 256}\n", base="/b")
    assert s["mask"]["threshold"] == {"method": "li", "per": "volume", "bins": 256}
    with pytest.warns(VolnormDeprecationWarning, match="write `per: volume`"):  # the earlier spelling, kept as written
        s = load_spec(HEAD + "mask:\n  threshold: {method: li, dim: volume, bins: 256}\n", base="/b")
    assert s["mask"]["threshold"] == {"method": "li", "dim": "volume", "bins": 256}


# ---------------------------------------------------------------------------
# outputs.voxel_histogram.name: a plain name inside the output store
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../victim.zarr", "/abs/path", "a/b", ".hidden", "..", ".", "a\\\\b", "c:d", "''"])
def test_voxel_histogram_name_must_be_a_plain_name(tmp_path, capsys, name):
    text = HEAD + f"outputs:\n  voxel_histogram:\n    range: [0, 1]\n    name: {name}\n"
    msg = refused(text)
    assert msg.startswith("<spec>, line 9: outputs.voxel_histogram.name "), msg
    assert "must be" in msg and msg.count("outputs.voxel_histogram.name") == 1
    both(tmp_path, capsys, text, "line 9: outputs.voxel_histogram.name ")


def test_voxel_histogram_name_that_is_not_a_string():
    msg = refused(HEAD + "outputs:\n  voxel_histogram:\n    range: [0, 1]\n    name: [a]\n")
    assert msg == "<spec>, line 9: outputs.voxel_histogram.name ['a']: must be a non-empty string"


def test_plain_voxel_histogram_names_load():
    s = load_spec(HEAD + "outputs:\n  voxel_histogram:\n    range: [0, 1]\n    name: hist_2024-v1\n", base="/b")
    assert s["outputs"]["voxel_histogram"]["name"] == "hist_2024-v1"
    s = load_spec(HEAD + "outputs:\n  voxel_histogram:\n    range: [0, 1]\n", base="/b")
    assert s["outputs"]["voxel_histogram"]["name"] == "voxel_histogram"


# ---------------------------------------------------------------------------
# the command line's --step is checked the same way
# ---------------------------------------------------------------------------


def test_parse_step_checks_the_options():
    assert parse_step("rescale:percentiles=1,99:out_range=uint8") == ("rescale", {"percentiles": (1, 99), "out_range": "uint8"})
    with pytest.warns(VolnormDeprecationWarning, match="write `per: volume`"):
        assert parse_step("equalize:dim=volume") == ("equalize", {"per": "volume"})
    with pytest.warns(VolnormDeprecationWarning, match="write `per: slice`"):
        assert parse_step("equalize_adaptive:dim=slice") == ("equalize_adaptive", {"per": "slice"})
    assert parse_step("equalize:per=volume") == ("equalize", {"per": "volume"})
    with pytest.raises(ValueError, match=r"percentile: unknown option 'percentile' of step 'rescale'; did you mean 'percentiles'\?"):
        parse_step("rescale:percentile=1,99")
    with pytest.raises(ValueError, match=r"^step 'gamma:gamma=-1': gamma: expected a number > 0, got int -1$"):
        parse_step("gamma:gamma=-1")


def test_cli_convert_refuses_a_bad_step_option_before_reading(tmp_path, capsys):
    out = tmp_path / "x.zarr"
    assert main(["convert", str(tmp_path / "missing.nii"), str(out), "--step", "rescale:percentile=1,99"]) == 1
    assert "did you mean 'percentiles'" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------
# the shipped workflows use real options: none is refused
# ---------------------------------------------------------------------------


def _k8s_spec() -> str:
    docs = [d for d in yaml.safe_load_all((ROOT / "workflows/cluster/volnorm-job.yaml").read_text()) if d]
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]["spec.yaml"]


WORKFLOW_SPECS = sorted(ROOT.glob("workflows/examples/*.yaml")) + sorted(
    p for p in ROOT.glob("workflows/cluster/*.yaml") if p.name != "volnorm-job.yaml"
)


def test_the_workflow_folders_have_specs():
    assert len(WORKFLOW_SPECS) >= 5 and any(p.parent.name == "cluster" for p in WORKFLOW_SPECS)


@pytest.mark.parametrize("path", WORKFLOW_SPECS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_workflow_spec_loads(path):
    s = load_spec(path)
    raw = yaml.safe_load(path.read_text())
    assert len(s["steps"]) == len(raw.get("steps") or [])
    for st in s["steps"]:
        check_options(st["name"], st["options"])


def test_the_kubernetes_job_spec_loads():
    s = load_spec(_k8s_spec())
    assert [st["name"] for st in s["steps"]] == ["rescale"]
    assert s["mask"]["threshold"]["per"] == "volume"


# ---------------------------------------------------------------------------
# garbage in real options: only ever a SpecError naming a line
# ---------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=8),
                    st.sampled_from(["minmax", "uint8", "float32", "per-volume", "otsu", "bayer", "y", "x"]))
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
                      max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(PIPELINE_STEPS))
def test_garbage_in_real_options_only_ever_raises_spec_error(data, name):
    keys = list(step_options(name))
    opts = data.draw(st.dictionaries(st.sampled_from(keys), _value, max_size=3))
    text = HEAD + yaml.safe_dump({"steps": [{name: opts}]}, sort_keys=False)
    try:
        s = load_spec(text, base="/b")
    except SpecError as e:
        assert str(e).startswith("<spec>, line "), str(e)
        return
    assert s["steps"][0]["options"] == yaml.safe_load(text)["steps"][0][name]
