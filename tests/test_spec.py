"""Pipeline specs (volnorm.pipeline.spec): safe and strict YAML loading, schema validation,
defaults and path resolution, and the engine's security rule (volnorm.pipeline.engine).

Every refusal is checked for its exception type *and* for what its message says
(source, line, key path), and every "nothing happened" claim is checked on the
file system. Tests that would hang if a regression made the loader loop forever
run under a watchdog (SIGALRM) that turns a hang into a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volnorm import pipeline
from volnorm.cli import main
from volnorm.engine import is_loopback
from volnorm.pipeline.spec import (
    MAX_DEPTH,
    MAX_SPEC_BYTES,
    SCHEMA,
    Spec,
    SpecError,
    load_spec,
    parse_yaml,
)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

#: a minimal valid spec (YAML text), one key per line so line numbers are easy to state
VALID = """\
version: 1
input:
  nifti: scans/*.nii.gz
output:
  store: out.zarr
"""


class Hang(Exception):
    """Raised by the watchdog: the code under test did not return in time."""


@contextlib.contextmanager
def watchdog(seconds: float = 20.0):
    """Turn a hang (an endless loop in pure Python) into a test failure."""

    def on_alarm(signum, frame):
        raise Hang(f"did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused(text: str, *, base: str | os.PathLike | None = "/base") -> str:
    """The SpecError message for spec ``text`` (fails if the spec is accepted or raises anything else)."""
    with watchdog(), pytest.raises(SpecError) as ei:
        load_spec(text, base=base)
    return str(ei.value)


def nib_file(name: str = "anatomical.nii") -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / name


# ---------------------------------------------------------------------------
# 1. security: application tags are refused, nothing is constructed or executed
# ---------------------------------------------------------------------------


def _payloads(sentinel: Path) -> dict[str, tuple[str, str]]:
    """name -> (YAML value, the tag the error must name)."""
    cmd = f'["touch {sentinel}"]'
    return {
        "apply": (f"!!python/object/apply:os.system {cmd}", "tag:yaml.org,2002:python/object/apply:os.system"),
        "new": (f"!!python/object/new:os.system {cmd}", "tag:yaml.org,2002:python/object/new:os.system"),
        "name": ("!!python/name:os.system ''", "tag:yaml.org,2002:python/name:os.system"),
        "module": ("!!python/module:os ''", "tag:yaml.org,2002:python/module:os"),
        "custom": ("!foo bar", "!foo"),
        "custom-map": ("!foo {a: 1}", "!foo"),
        "binary": ("!!binary aGVsbG8=", "tag:yaml.org,2002:binary"),
        "set": ("!!set {a, b}", "tag:yaml.org,2002:set"),
    }


def test_payload_is_live_under_an_unsafe_loader(tmp_path):
    """Control: the os.system payload used below really runs under yaml.unsafe_load, so the
    sentinel checks in the refusal tests can detect execution."""
    sentinel = tmp_path / "SENTINEL"
    value, _ = _payloads(sentinel)["apply"]
    yaml.unsafe_load(f"name: {value}\n")
    assert sentinel.exists()


@pytest.mark.parametrize("kind", list(_payloads(Path("/x"))))
@pytest.mark.parametrize("where", ["name", "unknown_key", "nested", "in_list"])
def test_application_tags_are_refused_and_nothing_runs(tmp_path, kind, where):
    sentinel = tmp_path / "SENTINEL"
    value, tag = _payloads(sentinel)[kind]
    if where == "name":
        text = VALID + f"name: {value}\n"
        line = 6
    elif where == "unknown_key":  # the tag check comes before the schema check
        text = f"evil: {value}\n" + VALID
        line = 1
    elif where == "nested":
        text = VALID + f"engine:\n  scheduler: {value}\n"
        line = 7
    else:
        text = VALID + f"steps:\n  - equalize\n  - {value}\n"
        line = 8
    msg = refused(text)
    assert f"<spec>, line {line}:" in msg
    assert repr(tag) in msg
    assert "not allowed" in msg
    assert not sentinel.exists()


def test_application_tag_in_a_key_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    text = VALID + f'? !!python/object/apply:os.system ["touch {sentinel}"]\n: 1\n'
    msg = refused(text)
    assert "line 6" in msg and "keys must be plain strings" in msg
    assert not sentinel.exists()


def test_application_tag_in_a_spec_file_names_the_file_and_runs_nothing(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    f = tmp_path / "spec.yaml"
    f.write_text(VALID + f'name: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    with pytest.raises(SpecError, match=r"python/object/apply:os\.system") as ei:
        load_spec(f)
    assert str(ei.value).startswith(f"{f}, line 6:")
    assert not sentinel.exists()


def test_parse_yaml_refuses_tags_directly(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    with pytest.raises(SpecError, match=r"^src\.yaml, line 2: the tag .*python/object/new:os\.system"):
        parse_yaml(f'a: 1\nb: !!python/object/new:os.system ["touch {sentinel}"]\n', "src.yaml")
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", ["apply", "new", "name", "custom"])
def test_pipeline_run_refuses_tagged_spec_before_planning(tmp_path, monkeypatch, kind):
    sentinel = tmp_path / "SENTINEL"
    value, tag = _payloads(sentinel)[kind]
    store = tmp_path / "out.zarr"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nname: {value}\ninput:\n  nifti: {nib_file()}\noutput:\n  store: {store}\n")

    def no_plan(*a, **k):
        raise AssertionError("plan() reached with an invalid spec")

    from volnorm.pipeline import runner

    monkeypatch.setattr(runner, "plan", no_plan)
    said: list[str] = []
    with pytest.raises(SpecError, match=re.escape(repr(tag))):
        pipeline.run(str(spec), dry_run=True, echo=said.append)
    assert said == []
    assert not sentinel.exists()
    assert not store.exists()


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("kind", ["apply", "new", "name", "custom"])
def test_cli_run_refuses_tagged_spec(tmp_path, capsys, kind, dry_run):
    sentinel = tmp_path / "SENTINEL"
    value, tag = _payloads(sentinel)[kind]
    store = tmp_path / "out.zarr"
    stats = tmp_path / "stats.json"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"version: 1\ninput:\n  nifti: {nib_file()}\nsteps:\n  - rescale: {value}\n"
        f"output:\n  store: {store}\noutputs:\n  statistics: {{path: {stats}}}\n"
    )
    rc = main(["run", str(spec)] + (["--dry-run"] if dry_run else []))
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"volnorm run: error: {spec}, line 5:")
    assert repr(tag) in err
    assert not sentinel.exists()
    assert not store.exists()
    assert not stats.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


# ---------------------------------------------------------------------------
# 2. anchors, aliases, merge keys
# ---------------------------------------------------------------------------


def _billion_laughs(levels: int = 9) -> str:
    names = "abcdefghijklmnop"[:levels]
    out = [f'{names[0]}: &{names[0]} ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, cur in itertools.pairwise(names):
        out.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(out) + "\n"


def test_billion_laughs_is_refused():
    text = _billion_laughs(9)
    assert text.count("*") == 8 * 9  # 9 levels of 9-fold aliases: 9**9 "lol"s if expanded
    msg = refused(text)
    assert msg == "<spec>, line 1: YAML anchors and aliases are not allowed in a spec"


def test_billion_laughs_in_a_file_through_the_cli(tmp_path, capsys):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(VALID + "name: x\n" + _billion_laughs(9).replace("a: &a", "outputs: &a", 1))
    with watchdog():
        rc = main(["run", str(spec), "--dry-run"])
    assert rc == 1
    assert "anchors and aliases are not allowed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("version: 1\nname: &n run\n", 2),  # an anchor alone
        ("version: &v 1\nname: *v\n", 1),  # anchor + alias
        ("version: 1\nname: *undefined\n", 2),  # an alias alone
        ("version: 1\nsteps: &s [equalize]\n", 2),  # an anchor on a collection
        ("version: 1\noutput: &o\n  store: a\n", 2),
    ],
)
def test_anchors_and_aliases_are_refused(text, line):
    assert refused(text) == f"<spec>, line {line}: YAML anchors and aliases are not allowed in a spec"


def test_aliased_mapping_would_otherwise_be_shared():
    """Control for the rule above: PyYAML's safe_load would share one dict between two keys."""
    d = yaml.safe_load("a: &x {k: 1}\nb: *x\n")
    assert d["a"] is d["b"]
    with pytest.raises(SpecError, match="anchors and aliases"):
        parse_yaml("a: &x {k: 1}\nb: *x\n")


@pytest.mark.parametrize(
    "text",
    [
        VALID + "outputs:\n  <<: {images: true}\n",
        "<<: {version: 1}\n" + VALID.replace("version: 1\n", ""),
    ],
)
def test_merge_key_is_refused(text):
    msg = refused(text)
    assert msg.startswith("<spec>, line ")
    assert "<<" in text.splitlines()[int(msg.split("line ")[1].split(":")[0]) - 1]


def test_merge_key_message_says_merge():
    msg = refused(VALID + "outputs:\n  <<: {images: true}\n")
    assert "merge" in msg


# ---------------------------------------------------------------------------
# 3. duplicate keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "first", "second"),
    [
        (VALID + "version: 1\n", "version", 1, 6),
        ("version: 1\ninput:\n  nifti: a.nii\noutput:\n  store: a.zarr\n  codec: lz4\n  store: b.zarr\n", "output.store", 5, 7),
        (VALID + "steps:\n  - rescale:\n      percentiles: [1, 99]\n      percentiles: [2, 98]\n",
         "steps[0].rescale.percentiles", 8, 9),
        (VALID + "outputs: {images: true, images: false}\n", "outputs.images", 6, 6),
        (VALID + "output:\n  store: again.zarr\n", "output", 4, 6),
    ],
)
def test_duplicate_keys_are_refused(text, path, first, second):
    msg = refused(text)
    assert msg.startswith(f"<spec>, line {second}: {path!r} is given twice (first on line {first})")
    assert yaml.safe_load(text) is not None  # plain PyYAML would silently keep the last one


def test_duplicate_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("version: 1\ninput:\n  nifti: a.nii\n  nifti: b.nii\noutput:\n  store: o.zarr\n")
    with pytest.raises(SpecError) as ei:
        load_spec(f)
    assert str(ei.value).startswith(f"{f}, line 4: 'input.nifti' is given twice (first on line 3)")


def test_same_key_in_different_mappings_is_not_a_duplicate():
    s = load_spec(VALID + "steps:\n  - rescale: {dim: volume}\n  - rescale: {dim: volume}\n", base="/b")
    assert [st["name"] for st in s["steps"]] == ["rescale", "rescale"]


# ---------------------------------------------------------------------------
# 4. size and depth limits
# ---------------------------------------------------------------------------


def _padded(text: str, total_bytes: int) -> str:
    pad = total_bytes - len(text.encode()) - 3
    return text + "#" + "x" * pad + "\n\n"


def test_max_spec_bytes_boundary_for_text():
    ok = _padded(VALID, MAX_SPEC_BYTES)
    assert len(ok.encode()) == MAX_SPEC_BYTES
    assert load_spec(ok, base="/b")["version"] == 1
    big = _padded(VALID, MAX_SPEC_BYTES + 1)
    assert refused(big) == f"<spec>: the spec is larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a page of text"


def test_oversized_text_is_refused_before_parsing(monkeypatch, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    text = _padded(VALID + f'name: !!python/object/apply:os.system ["touch {sentinel}"]\n', MAX_SPEC_BYTES + 10)

    def no_loader(*a, **k):
        raise AssertionError("the YAML parser was started on an oversized spec")

    monkeypatch.setattr(yaml, "SafeLoader", no_loader)
    msg = refused(text)
    assert "larger than" in msg and "tag" not in msg
    assert not sentinel.exists()


def test_oversized_text_counts_bytes_not_characters():
    text = VALID + "name: " + "é" * (MAX_SPEC_BYTES // 2) + "\n"
    assert len(text) < MAX_SPEC_BYTES < len(text.encode())
    assert "larger than" in refused(text)


def test_oversized_file_is_refused_unread(monkeypatch, tmp_path):
    f = tmp_path / "big.yaml"
    # not even UTF-8: reading it would give a different error
    f.write_bytes(VALID.encode() + b"#" + b"\xff" * MAX_SPEC_BYTES + b"\n")

    def no_parse(*a, **k):
        raise AssertionError("parse_yaml called on an oversized file")

    monkeypatch.setattr("volnorm.pipeline.spec.parse_yaml", no_parse)
    monkeypatch.setattr(Path, "read_text", no_parse)
    with pytest.raises(SpecError) as ei:
        load_spec(f)
    assert str(ei.value) == f"{f}: the spec is larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a page of text"


def test_file_of_exactly_max_bytes_is_read(tmp_path):
    f = tmp_path / "edge.yaml"
    f.write_text(_padded(VALID, MAX_SPEC_BYTES))
    assert f.stat().st_size == MAX_SPEC_BYTES
    assert load_spec(f)["output"]["store"] == str(tmp_path / "out.zarr")


def test_oversized_file_through_the_cli(tmp_path, capsys):
    f = tmp_path / "big.yaml"
    f.write_text(_padded(VALID, MAX_SPEC_BYTES + 1))
    assert main(["run", str(f), "--dry-run"]) == 1
    assert "larger than 256 KiB" in capsys.readouterr().err


def _nested(levels: int, flow: bool) -> str:
    if flow:
        return "name: " + "{a: " * levels + "1" + "}" * levels + "\n"
    return "name:\n" + "".join("  " * i + "a:\n" for i in range(1, levels)) + "  " * levels + "a: 1\n"


@pytest.mark.parametrize("flow", [True, False])
def test_too_deep_nesting_is_refused(flow):
    msg = refused(VALID + _nested(MAX_DEPTH + 5, flow))
    assert re.fullmatch(rf"<spec>, line \d+: nested more than {MAX_DEPTH} levels deep", msg)


@pytest.mark.parametrize("flow", [True, False])
def test_nesting_at_the_limit_reaches_the_schema(flow):
    """MAX_DEPTH levels below the root are parsed; the schema then refuses `name` (not a string)."""
    msg = refused(VALID + _nested(MAX_DEPTH - 1, flow))
    assert "name: expected str, got dict" in msg


def test_too_deep_lists_are_refused():
    msg = refused(VALID + "name: " + "[" * 40 + "]" * 40 + "\n")
    assert msg == f"<spec>, line 6: nested more than {MAX_DEPTH} levels deep"


def test_very_deep_nesting_is_a_spec_error_not_recursion_error():
    text = VALID + _nested(1000, flow=True)
    assert len(text.encode()) < MAX_SPEC_BYTES
    with watchdog():
        try:
            load_spec(text, base="/b")
        except SpecError as e:
            assert "nested more than" in str(e)
        else:
            pytest.fail("accepted")


# ---------------------------------------------------------------------------
# 5. unknown keys and typos
# ---------------------------------------------------------------------------


def test_unknown_nested_key_names_path_line_and_suggestion():
    text = "version: 1\ninput:\n  nifti: a.nii\noutput:\n  stor: out.zarr\n"
    assert refused(text) == "<spec>, line 5: unknown key 'output.stor'; did you mean 'store'?"


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text(VALID + "engine:\n  n_worker: 2\n")
    with pytest.raises(SpecError) as ei:
        load_spec(f)
    assert str(ei.value) == f"{f}, line 7: unknown key 'engine.n_worker'; did you mean 'n_workers'?"


@pytest.mark.parametrize(
    ("extra", "path", "line", "hint"),
    [
        ("stepz: [equalize]\n", "stepz", 6, "steps"),
        ("outputs:\n  voxel_histogram:\n    bin: 10\n    range: [0, 1]\n", "outputs.voxel_histogram.bin", 8, "bins"),
        ("outputs:\n  statistics:\n    path: s.json\n    quantile: [0.5]\n", "outputs.statistics.quantile", 9, "quantiles"),
        ("mask:\n  fille: m.nii\n", "mask.fille", 7, "file"),
    ],
)
def test_unknown_keys_with_suggestions(extra, path, line, hint):
    msg = refused(VALID + extra)
    assert msg == f"<spec>, line {line}: unknown key {path!r}; did you mean {hint!r}?"


def test_unknown_key_without_a_close_match_lists_the_keys():
    msg = refused(VALID + "zzzzzz: 1\n")
    assert msg.startswith("<spec>, line 6: unknown key 'zzzzzz' (keys here: version, name, input, mask, steps,")
    assert "did you mean" not in msg


def test_step_name_typo_suggests_the_step():
    msg = refused(VALID + "steps:\n  - equalize\n  - rescal: {percentiles: [1, 99]}\n")
    assert msg.startswith("<spec>, line 8: steps[1]: unknown step 'rescal' (steps: rescale, zscore,")
    assert msg.endswith("; did you mean 'rescale'?")


def test_unknown_step_without_a_close_match():
    msg = refused(VALID + "steps: [frobnicate]\n")
    assert "unknown step 'frobnicate'" in msg and "did you mean" not in msg and "nyul" in msg


# ---------------------------------------------------------------------------
# 6. wrong types and values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID.replace("version: 1", "version: 2"), "<spec>, line 1: version: only version 1 exists"),
        (VALID.replace("version: 1", "version: '1'"), "<spec>, line 1: version: only version 1 exists"),
        (VALID + "engine:\n  n_workers: two\n", "<spec>, line 7: engine.n_workers: expected a positive integer"),
        (VALID + "engine:\n  n_workers: 0\n", "<spec>, line 7: engine.n_workers: expected a positive integer"),
        (VALID + "engine:\n  n_workers: 2.5\n", "<spec>, line 7: engine.n_workers: expected a positive integer"),
        (VALID + "outputs:\n  voxel_histogram:\n    range: [1, 0]\n",
         "<spec>, line 8: outputs.voxel_histogram.range: expected [lo, hi] with lo < hi"),
        (VALID + "outputs:\n  voxel_histogram:\n    range: [0, 1, 2]\n",
         "<spec>, line 8: outputs.voxel_histogram.range: expected [lo, hi] with lo < hi"),
        (VALID + "outputs:\n  voxel_histogram:\n    range: [0, .nan]\n",
         "<spec>, line 8: outputs.voxel_histogram.range: expected [lo, hi] with lo < hi"),
        (VALID + "outputs:\n  statistics:\n    path: s.json\n    quantiles: [0.5, 1.5]\n",
         "<spec>, line 9: outputs.statistics.quantiles: expected a list of quantiles in [0, 1]"),
        (VALID + "outputs:\n  statistics:\n    path: s.json\n    quantiles: [-0.1]\n",
         "<spec>, line 9: outputs.statistics.quantiles: expected a list of quantiles in [0, 1]"),
        (VALID + "outputs:\n  statistics:\n    path: s.json\n    quantiles: []\n",
         "<spec>, line 9: outputs.statistics.quantiles: expected a list of quantiles in [0, 1]"),
        (VALID + "engine:\n  scheduler: dask\n",
         "<spec>, line 7: engine.scheduler: expected 'local', 'threads', 'sync', 'slurm', 'pbs', 'kubernetes' or an address tcp://host:port / tls://host:port; got 'dask'"),
        (VALID.replace("  store: out.zarr\n", "  store: out.zarr\n  codec: gzip\n"),
         "<spec>, line 6: output.codec: expected lz4, zstd, zarr-default or none"),
        (VALID.replace("nifti: scans/*.nii.gz", "nifti: []"),
         "<spec>, line 3: input.nifti: expected a path or glob, or a list of them"),
        (VALID.replace("nifti: scans/*.nii.gz", "nifti: [a.nii, 3]"),
         "<spec>, line 3: input.nifti: expected a path or glob, or a list of them"),
        (VALID.replace("nifti: scans/*.nii.gz", "nifti: a.nii\n  chunks: {z: 0}"),
         "<spec>, line 4: input.chunks: expected 'auto', a size in MiB, or a mapping dim -> chunk length (e.g. {z: 64})"),
        (VALID + "mask:\n  threshold: otsu\n", "<spec>, line 7: mask.threshold: expected dict, got str 'otsu'"),
        (VALID.replace("store: out.zarr", "store: 5"), "<spec>, line 5: output.store: expected str, got int 5"),
    ],
)
def test_wrong_values_name_path_and_line(text, expected):
    assert refused(text) == expected


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("outputs:\n  voxel_histogram:\n    range: [0, 1]\n    bins: true\n",
         "<spec>, line 9: outputs.voxel_histogram.bins: expected a positive integer"),
        ("engine:\n  n_workers: yes\n", "<spec>, line 7: engine.n_workers: expected a positive integer"),
        ("outputs:\n  voxel_histogram:\n    range: [false, true]\n",
         "<spec>, line 8: outputs.voxel_histogram.range: expected [lo, hi] with lo < hi"),
        ("outputs:\n  statistics:\n    path: s.json\n    quantiles: [true]\n",
         "<spec>, line 9: outputs.statistics.quantiles: expected a list of quantiles in [0, 1]"),
        ("engine:\n  memory_limit: true\n",
         "<spec>, line 7: engine.memory_limit: expected a size such as '2GiB', a number of bytes, or 'auto'"),
        ("name: true\n", "<spec>, line 6: name: expected str, got a boolean"),
        ("outputs:\n  images: 1\n", "<spec>, line 7: outputs.images: expected bool, got int 1"),
        ("engine:\n  allow_insecure: 'yes'\n",
         "<spec>, line 7: engine.allow_insecure: expected bool, got str 'yes'; write true or false"),
    ],
)
def test_booleans_and_numbers_are_not_interchangeable(extra, expected):
    assert refused(VALID + extra) == expected


def test_chunks_dict_with_boolean_length_is_refused():
    msg = refused(VALID.replace("nifti: scans/*.nii.gz", "nifti: a.nii\n  chunks: {z: true}"))
    assert msg.startswith("<spec>, line 4: input.chunks: expected")


def test_version_true_is_refused():
    msg = refused(VALID.replace("version: 1", "version: true"))
    assert msg == "<spec>, line 1: version: only version 1 exists"


@pytest.mark.parametrize(
    ("input_section", "got"),
    [
        ("input:\n  nifti: a.nii\n  store: s.zarr\n", "; got nifti, store"),
        ("input:\n  nifti: a.nii\n  images: '*.png'\n  store: s.zarr\n", "; got nifti, images, store"),
        ("input:\n  chunks: auto\n", ""),
        ("input:\n", ""),
        ("input: {}\n", ""),
    ],
)
def test_input_needs_exactly_one_source(input_section, got):
    text = "version: 1\n" + input_section + "output:\n  store: o.zarr\n"
    assert refused(text) == f"<spec>, line 2: input needs exactly one of nifti, images, store{got}"


def test_mask_needs_exactly_one_source():
    msg = refused(VALID + "mask:\n  file: m.nii\n  threshold: {method: otsu}\n")
    assert msg == "<spec>, line 6: mask needs exactly one of file, threshold; got file, threshold"
    assert refused(VALID + "mask: {}\n") == "<spec>, line 6: mask needs exactly one of file, threshold"


def test_steps_and_params_from_are_exclusive():
    msg = refused(VALID + "steps: [zscore]\nparams_from: old.zarr\n")
    assert msg == "<spec>, line 7: give either `steps` (fitted here) or `params_from` (fitted before), not both"
    # params_from with no steps is fine
    assert load_spec(VALID + "params_from: old.zarr\n", base="/b")["params_from"] == "/b/old.zarr"


@pytest.mark.parametrize("option", ["mask", "params", "data"])
def test_step_options_set_by_the_pipeline_are_refused(option):
    msg = refused(VALID + f"steps:\n  - rescale:\n      {option}: x\n")
    assert msg == (f"<spec>, line 8: steps[0].rescale.{option}: step 'rescale': {option!r} is set by the pipeline, "
                   "not an option (use the spec's `mask` / `params_from`)")


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ("steps: equalize\n", "line 6: steps: expected a list of steps"),
        ("steps:\n  - rescale: 3\n", "line 7: steps[0].rescale: the options of step 'rescale' must be a mapping"),
        ("steps:\n  - {rescale: {}, zscore: {}}\n", "line 7: steps[0]: a step is a name or a one-key mapping {name: {options}}"),
        ("steps:\n  - 5\n", "line 7: steps[0]: a step is a name or a one-key mapping {name: {options}}"),
    ],
)
def test_malformed_steps(steps, expected):
    msg = refused(VALID + steps)
    assert msg.startswith(f"<spec>, {expected}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\noutput:\n  store: o.zarr\n", "<spec>, line 1: 'input' is required"),
        ("input:\n  nifti: a.nii\noutput:\n  store: o.zarr\n", "<spec>, line 1: 'version' is required (the spec format version: 1)"),
        ("version:\ninput:\n  nifti: a.nii\noutput:\n  store: o.zarr\n", "<spec>, line 1: 'version' is required"),
        ("version: 1\ninput:\n  nifti: a.nii\noutput:\n  codec: lz4\n", "<spec>, line 4: 'output.store' is required"),
        (VALID + "outputs:\n  voxel_histogram: {bins: 10}\n", "<spec>, line 7: 'outputs.voxel_histogram.range' is required"),
        (VALID + "outputs:\n  statistics: {}\n", "<spec>, line 7: 'outputs.statistics.path' is required"),
    ],
)
def test_required_keys(text, expected):
    assert refused(text).startswith(expected)


def test_outputs_asking_for_nothing_is_refused():
    msg = refused(VALID + "outputs:\n  images: false\n")
    assert msg == "<spec>, line 6: outputs asks for nothing (images: false and no voxel_histogram or statistics)"
    s = load_spec(VALID + "outputs:\n  images: false\n  statistics: {path: s.csv}\n", base="/b")
    assert s["outputs"]["images"] is False


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("output: out.zarr\n", "<spec>, line 4: output must be a mapping of keys, got str"),
        ("output: [out.zarr]\n", "<spec>, line 4: output must be a mapping of keys, got list"),
    ],
)
def test_sections_must_be_mappings(section, expected):
    text = "version: 1\ninput:\n  nifti: a.nii\n" + section
    assert refused(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\n", "<spec>: the spec is empty"),
        ("# only a comment\n", "<spec>: the spec is empty"),
        ("- a\n- b\n", "<spec>, line 1: the spec must be a mapping of keys, got list"),
        ("just text\n", "<spec>, line 1: the spec must be a mapping of keys, got str"),
        ("a: 1\n---\nb: 2\n", "<spec>: not valid YAML: expected a single document"),
        ("version: 1\ninput:\n\tnifti: a\n", "<spec>, line 3: not valid YAML: found character '\\t'"),
        ("version: [1\n", "<spec>, line 2: not valid YAML"),
        ("? [a, b]\n: 1\n", "<spec>, line 1: keys must be plain strings"),
    ],
)
def test_not_a_spec_at_all(text, expected):
    assert refused(text).startswith(expected)


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=rf"^{re.escape(str(missing))}: cannot read the spec"):
        load_spec(missing)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(binary))}: not a UTF-8 text file$"):
        load_spec(binary)
    # YAML text is told apart from a path by its newline: one line is a path
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec("version: 1")


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)
    with pytest.raises(ValueError, match="unknown key"):
        load_spec(VALID + "bogus: 1\n")


@pytest.mark.parametrize(
    "value",
    ["!!bool maybe", "!!int abc", "!!float abc", "!!timestamp 2001-13-45"],
)
def test_explicit_standard_tag_with_bad_value_is_a_spec_error(value):
    with pytest.raises(SpecError, match="line 6"):
        load_spec(VALID + f"name: {value}\n", base="/b")


# ---------------------------------------------------------------------------
# memory limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2GiB", 2 * 2**30), ("'2 GiB'", 2 * 2**30), ("500MB", 500 * 10**6), ("1024", 1024), ("auto", "auto"),
     ("4.0e+9", 4e9), ("4e9", 4 * 10**9)],  # YAML 1.1: 4e9 (no dot) is a string, parsed by parse_bytes
)
def test_memory_limit_is_parsed(value, expected):
    s = load_spec(VALID + f"engine:\n  memory_limit: {value}\n", base="/b")
    assert s["engine"]["memory_limit"] == expected
    assert type(s["engine"]["memory_limit"]) is type(expected)


@pytest.mark.parametrize("value", ["lots", "2 parsecs", "-5", "0", "[1]", "{a: 1}"])
def test_bad_memory_limit_is_refused(value):
    msg = refused(VALID + f"engine:\n  memory_limit: {value}\n")
    assert msg == "<spec>, line 7: engine.memory_limit: expected a size such as '2GiB', a number of bytes, or 'auto'"


@pytest.mark.parametrize("value", ["'-2GiB'", "'0'", "'0 B'"])
def test_non_positive_memory_limit_string_is_refused(value):
    msg = refused(VALID + f"engine:\n  memory_limit: {value}\n")
    assert "engine.memory_limit" in msg


def test_overflowing_memory_limit_is_a_spec_error():
    msg = refused(VALID + "engine:\n  memory_limit: '1e400'\n")
    assert "engine.memory_limit" in msg


# ---------------------------------------------------------------------------
# 7. valid specs: defaults, normalization, paths
# ---------------------------------------------------------------------------


def test_defaults_are_filled_in():
    s = load_spec(VALID, base="/b")
    assert isinstance(s, Spec)
    assert set(s.data) == {"version", "input", "steps", "output", "outputs", "engine"}  # optional sections stay out
    assert s["version"] == 1
    assert s["input"] == {"nifti": ["/b/scans/*.nii.gz"]}
    assert s["steps"] == []
    assert s["output"] == {"store": "/b/out.zarr", "codec": "lz4"}
    assert s["outputs"] == {"images": True}
    eng = s["engine"]
    assert "scheduler" not in eng  # the engine's default ($VOLNORM_SCHEDULER, else local), decided when it runs
    assert eng["memory_limit"] == "auto"
    assert eng["allow_insecure"] is False
    assert eng["progress"] is True
    assert "n_workers" not in eng
    assert s.source == "<spec>" and s.base == Path("/b")


def test_nested_defaults_are_filled_in():
    s = load_spec(VALID + "outputs:\n  voxel_histogram: {range: [0, 1]}\n  statistics: {path: s.json}\n", base="/b")
    assert s["outputs"]["voxel_histogram"] == {"bins": 100, "range": [0.0, 1.0], "name": "voxel_histogram"}
    assert s["outputs"]["statistics"] == {"path": "/b/s.json", "quantiles": [0.01, 0.5, 0.99]}
    assert s["outputs"]["images"] is True


def test_empty_sections_take_defaults():
    s = load_spec(VALID + "outputs:\nengine:\nsteps:\n", base="/b")
    assert s["outputs"] == {"images": True}
    assert "scheduler" not in s["engine"]
    assert s["steps"] == []


def test_steps_are_normalized():
    text = VALID + (
        "steps:\n"
        "  - equalize\n"
        "  - rescale: {percentiles: [1, 99]}\n"
        "  - zscore:\n"
        "  - gamma:\n"
        "      gamma: 0.5\n"
    )
    s = load_spec(text, base="/b")
    assert s["steps"] == [
        {"name": "equalize", "options": {}},
        {"name": "rescale", "options": {"percentiles": [1, 99]}},
        {"name": "zscore", "options": {}},
        {"name": "gamma", "options": {"gamma": 0.5}},
    ]


def test_values_are_converted():
    s = load_spec(VALID + "outputs:\n  voxel_histogram: {range: [-1, 3], bins: 7}\n"
                  "  statistics: {path: s.csv, quantiles: [0, 1]}\n", base="/b")
    assert s["outputs"]["voxel_histogram"]["range"] == [-1.0, 3.0]
    assert all(type(x) is float for x in s["outputs"]["voxel_histogram"]["range"])
    assert s["outputs"]["statistics"]["quantiles"] == [0.0, 1.0]
    assert s["outputs"]["voxel_histogram"]["bins"] == 7


@pytest.mark.parametrize("sched", ["local", "threads", "sync", "slurm", "tcp://10.0.0.1:8786", "tls://sched.example:8786", "ws://10.0.0.1:8786"])
def test_scheduler_values_accepted(sched):
    """The words of every command's --scheduler (volnorm.engine.check_scheduler); whether an
    address may be used (encryption) is the engine's address rule, applied before connecting."""
    assert load_spec(VALID + f"engine:\n  scheduler: '{sched}'\n", base="/b")["engine"]["scheduler"] == sched


@pytest.mark.parametrize("sched", ["TCP://10.0.0.1:8786", "10.0.0.1:8786", "processes", "tcp://"])
def test_scheduler_values_refused(sched):
    assert "engine.scheduler: expected 'local'" in refused(VALID + f"engine:\n  scheduler: '{sched}'\n")


FULL = """\
version: 1
name: full
input:
  nifti: [scans/a.nii, /abs/b.nii, ~/c.nii, s3://bucket/d.nii]
mask:
  file: masks/brain.nii.gz
steps:
  - rescale: {percentiles: [1, 99]}
output:
  store: out/o.zarr
outputs:
  statistics: {path: stats.json}
  params: params.json
"""


def _check_full(s: Spec, root: Path, home: Path) -> None:
    assert s["input"]["nifti"] == [str(root / "scans/a.nii"), "/abs/b.nii", str(home / "c.nii"), "s3://bucket/d.nii"]
    assert s["mask"]["file"] == str(root / "masks/brain.nii.gz")
    assert s["output"]["store"] == str(root / "out/o.zarr")
    assert s["outputs"]["statistics"]["path"] == str(root / "stats.json")
    assert s["outputs"]["params"] == str(root / "params.json")


def test_relative_paths_are_taken_from_the_spec_files_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    d = tmp_path / "project" / "specs"
    d.mkdir(parents=True)
    f = d / "run.yaml"
    f.write_text(FULL)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_spec(f)
    _check_full(s, d, home)
    assert s.source == str(f) and s.base == d
    # a relative spec path: still its directory, not the current one
    monkeypatch.chdir(tmp_path / "project")
    _check_full(load_spec(Path("specs/run.yaml")), d, home)
    _check_full(load_spec("specs/run.yaml"), d, home)
    # base= wins over the file's directory
    _check_full(load_spec(f, base=tmp_path / "other"), tmp_path / "other", home)


def test_other_path_keys_are_resolved(tmp_path):
    s = load_spec("version: 1\ninput: {store: in.zarr}\nparams_from: p.json\noutput: {store: o.zarr}\n", base=tmp_path)
    assert s["input"]["store"] == str(tmp_path / "in.zarr")
    assert s["params_from"] == str(tmp_path / "p.json")
    s = load_spec("version: 1\ninput: {images: ['img/*.png', x.tif]}\noutput: {store: o.zarr}\n", base=tmp_path)
    assert s["input"]["images"] == [str(tmp_path / "img/*.png"), str(tmp_path / "x.tif")]


def test_text_and_dicts_use_base_or_the_current_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    _check_full(load_spec(FULL), tmp_path, home)
    _check_full(load_spec(FULL, base="/data"), Path("/data"), home)
    as_dict = yaml.safe_load(FULL)
    _check_full(load_spec(as_dict), tmp_path, home)
    _check_full(load_spec(as_dict, base="/data"), Path("/data"), home)
    assert as_dict["output"]["store"] == "out/o.zarr"  # the caller's dict is not modified


def test_a_spec_is_returned_as_is():
    s = load_spec(VALID, base="/b")
    assert load_spec(s) is s


def test_lines_of_key_paths():
    data, lines = parse_yaml("a: 1\nb: [x, y]\nc:\n  d:\n    - e: 2\n", "s")
    assert data == {"a": 1, "b": ["x", "y"], "c": {"d": [{"e": 2}]}}
    assert lines == {"": 1, "a": 1, "b": 2, "b[0]": 2, "b[1]": 2, "c": 3, "c.d": 4, "c.d[0]": 5, "c.d[0].e": 5}
    s = load_spec(VALID + "steps:\n  - equalize\n", base="/b")
    assert s.lines["output.store"] == 5 and s.lines["steps[0]"] == 7


def test_yaml_scalars_are_plain_values():
    data, _ = parse_yaml("a: yes\nb: ~\nc: 0x10\nd: 1_000\ne: .inf\nf: '007'\ng: 2001-12-14\nh: true\n")
    import datetime

    assert data == {"a": "yes", "h": True, "b": None, "c": 16, "d": 1000, "e": float("inf"), "f": "007",
                    "g": datetime.date(2001, 12, 14)}


@pytest.mark.parametrize("path", sorted(str(p) for p in Path(__file__).parent.parent.glob("workflows/examples/*.yaml")))
def test_shipped_example_specs_are_valid(path):
    s = load_spec(path)
    assert s.source == path
    assert Path(s["output"]["store"]).is_absolute()


# ---------------------------------------------------------------------------
# dict input (no line numbers)
# ---------------------------------------------------------------------------

DICT = {"version": 1, "input": {"nifti": "a.nii"}, "output": {"store": "o.zarr"}}


def test_dict_input_missing_top_level_key():
    with watchdog(5), pytest.raises(SpecError, match=r"^<spec>: 'version' is required"):
        load_spec({"input": {"nifti": "a.nii"}, "output": {"store": "o.zarr"}})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"version": 1, "input": {"nifti": "a.nii"}, "output": {"stor": "o.zarr"}},
         "<spec>: unknown key 'output.stor'; did you mean 'store'?"),
        ({**DICT, "bogus": 1}, "<spec>: unknown key 'bogus'"),
        ({**DICT, "version": 2}, "<spec>: version: only version 1 exists"),
        ({**DICT, "steps": ["rescal"]}, "<spec>: steps[0]: unknown step 'rescal'"),
        ({**DICT, "input": {"nifti": "a.nii", "store": "s.zarr"}}, "<spec>: input needs exactly one of"),
    ],
)
def test_dict_input_errors(spec, expected):
    """Dicts have no lines: the message is the source and the key path (and must not hang looking for a line)."""
    with watchdog(5), pytest.raises(SpecError) as ei:
        load_spec(spec, base="/b")
    assert str(ei.value).startswith(expected)


def test_dict_input_non_string_key():
    with watchdog(5), pytest.raises(SpecError):
        load_spec({**DICT, 1: 2}, base="/b")


# ---------------------------------------------------------------------------
# 8. properties (hypothesis)
# ---------------------------------------------------------------------------


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def _dump(d) -> str:
    return yaml.dump(d, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=False)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True), _text,
)
#: mapping keys; '<<' is refused while parsing, before any schema check (tested on its own above)
_key = _text.filter(lambda k: k != "<<")
_garbage = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_key, inner, max_size=3),
    max_leaves=8,
)
_unknown_key = _key.filter(lambda k: k not in SCHEMA)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.dictionaries(_unknown_key, _garbage, min_size=1, max_size=4))
def test_unknown_top_level_keys_always_raise_spec_error(extra):
    spec = {**yaml.safe_load(VALID), **extra}
    text = _dump(spec)
    first = next(iter(extra))
    with watchdog():
        try:
            load_spec(text, base="/b")
        except SpecError as e:
            msg = str(e)
        else:
            pytest.fail(f"accepted unknown keys {list(extra)!r}")
    assert msg.startswith("<spec>, line ")
    assert f"unknown key {first!r}" in msg


def _all_fields(fields, prefix=()):
    for key, f in fields.items():
        yield (*prefix, key)
        if f.fields is not None:
            yield from _all_fields(f.fields, (*prefix, key))


#: every key path of the schema
_FIELDS = sorted(_all_fields(SCHEMA))
assert ("outputs", "voxel_histogram", "range") in _FIELDS and ("engine", "memory_limit") in _FIELDS


def _set(d: dict, path: tuple[str, ...], value) -> dict:
    cur = d
    for k in path[:-1]:
        if not isinstance(cur.get(k), dict):
            cur[k] = {}
        cur = cur[k]
    if path[0] == "input" and len(path) == 2 and path[1] in ("images", "store"):
        cur.pop("nifti", None)  # keep one input source, so the garbage is what is judged
    cur[path[-1]] = value
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(_FIELDS), value=_garbage, data=st.data())
def test_garbage_in_known_fields_only_ever_raises_spec_error(field, value, data):
    if field == ("engine", "memory_limit") and isinstance(value, str) and any(c.isdigit() for c in value):
        # numeric strings are covered by the explicit tests (e.g. '1e400', '-2GiB')
        value = data.draw(_text.filter(lambda s: not any(c.isdigit() for c in s)))
    spec = _set(yaml.safe_load(VALID), field, value)
    text = _dump(spec)
    with watchdog():
        try:
            s = load_spec(text, base="/b")
        except SpecError as e:
            assert str(e).startswith("<spec>, line "), str(e)
            return
    # accepted: the value must have passed the field's own rule
    assert isinstance(s, Spec)
    assert s["version"] == 1
    assert isinstance(s["output"]["store"], str) and s["output"]["store"].startswith("/")
    assert s["output"]["codec"] in ("lz4", "zstd", "zarr-default", "none")
    assert isinstance(s["outputs"]["images"], bool)
    assert isinstance(s["steps"], list)


# ---------------------------------------------------------------------------
# pipeline.run / plan and the CLI on valid specs (dry run: nothing written)
# ---------------------------------------------------------------------------


def _real_spec(tmp_path: Path, extra: str = "") -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"version: 1\nname: t\ninput:\n  nifti: {nib_file()}\nsteps:\n  - zscore\n"
        "output:\n  store: out.zarr\noutputs:\n  statistics: {path: stats.json}\n  params: params.json\n" + extra
    )
    return spec


def test_run_dry_run_plans_and_writes_nothing(tmp_path):
    spec = _real_spec(tmp_path)
    said: list[str] = []
    res = pipeline.run(str(spec), dry_run=True, echo=said.append)
    assert res.status == "planned"
    assert res.written == []
    assert [name for name, _ in res.plan["passes"]] == ["fit zscore", "write", "statistics"]
    assert res.plan["output"] == str(tmp_path / "out.zarr")
    assert res.plan["inputs"]["count"] == 1 and res.plan["inputs"]["kind"] == "nifti"
    assert len(said) == 1 and "volnorm run t" in said[0] and "1. fit zscore" in said[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_run_validates_before_reading_inputs(tmp_path):
    """A spec with an error and inputs that do not exist: the spec error, not a missing file."""
    text = f"version: 1\ninput:\n  nifti: {tmp_path / 'missing.nii'}\noutput:\n  store: o.zarr\n  stor: x\n"
    with pytest.raises(SpecError, match="unknown key 'output.stor'"):
        pipeline.run(text, dry_run=True, echo=None)
    with pytest.raises(SpecError, match="unknown key 'output.stor'"):
        pipeline.plan(text)


def test_cli_dry_run_on_a_valid_spec(tmp_path, capsys):
    spec = _real_spec(tmp_path)
    assert main(["run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"-> {tmp_path / 'out.zarr'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("engine:\n  n_workers: two\n", "line 13: engine.n_workers: expected a positive integer"),
        ("outputz: {}\n", "line 12: unknown key 'outputz'; did you mean 'output'?"),
        ("name: again\n", "line 12: 'name' is given twice (first on line 2)"),
    ],
)
def test_cli_reports_spec_errors(tmp_path, capsys, extra, needle):
    spec = _real_spec(tmp_path, extra)
    assert main(["run", str(spec), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"volnorm run: error: {spec}, ")
    assert needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


@pytest.mark.parametrize(
    "extra",
    ["flag: !!bool maybe\n", "engine:\n  memory_limit: '1e400'\n", _nested(1000, flow=True).replace("name:", "deep:")],
)
def test_cli_refuses_crashing_specs_with_exit_code_1(tmp_path, capsys, extra):
    spec = _real_spec(tmp_path, extra)
    with watchdog():
        rc = main(["run", str(spec), "--dry-run"])
    assert rc == 1
    assert capsys.readouterr().err.startswith("volnorm run: error: ")


# ---------------------------------------------------------------------------
# 9. the engine's rule: plain tcp:// only on this machine (unless allowed)
# ---------------------------------------------------------------------------


class WouldConnect(Exception):
    """Raised by the stand-ins below where a real run would open a connection or start a cluster."""

    def __init__(self, address: str):
        super().__init__(address)
        self.address = address


@pytest.fixture
def no_connect(monkeypatch):
    """No cluster and no network: distributed.Client, volnorm.engine's cluster helpers and
    socket connections are replaced; the list records what was asked for."""
    import socket

    import distributed

    import volnorm.engine

    calls: list[tuple[str, str]] = []

    def client(address, *a, **k):
        calls.append(("Client", address))
        raise WouldConnect(address)

    @contextlib.contextmanager
    def dask_scheduler(sched, progress=False):
        calls.append(("dask_scheduler", sched))
        if isinstance(sched, str) and "://" in sched:
            raise WouldConnect(sched)
        yield f"fake {sched}"

    def local_cluster(*a, **k):
        calls.append(("local_cluster", "local"))
        raise WouldConnect("local")

    def no_network(self, address, *a):
        raise OSError(f"test: no network connections ({address!r})")

    monkeypatch.setattr(distributed, "Client", client)
    monkeypatch.setattr(volnorm.engine, "dask_scheduler", dask_scheduler)
    monkeypatch.setattr(volnorm.engine, "local_cluster", local_cluster)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    return calls


@pytest.mark.parametrize("address", ["tcp://8.8.8.8:8786", "tcp://0.0.0.0:8786", "tcp://:8786", "tcp://10.1.2.3:8786"])
def test_engine_refuses_plain_tcp_to_another_machine(no_connect, address):
    with pytest.raises(ValueError, match="tls://") as ei, pipeline.engine({"scheduler": address}):
        pytest.fail("entered the block")
    assert str(ei.value).startswith(f"engine.scheduler {address}: a plain tcp:// connection to another machine is not encrypted")
    assert "allow_insecure" in str(ei.value)
    assert no_connect == []


def test_engine_refusal_with_allow_insecure_false(no_connect):
    with pytest.raises(ValueError, match="not encrypted"), pipeline.engine({"scheduler": "tcp://8.8.8.8:8786", "allow_insecure": False}):
        pass
    assert no_connect == []


@pytest.mark.parametrize(
    ("eng", "address"),
    [
        ({"scheduler": "tcp://8.8.8.8:8786", "allow_insecure": True}, "tcp://8.8.8.8:8786"),
        ({"scheduler": "tcp://127.0.0.1:8786"}, "tcp://127.0.0.1:8786"),
        ({"scheduler": "tcp://[::1]:8786"}, "tcp://[::1]:8786"),
        ({"scheduler": "tls://8.8.8.8:8786"}, "tls://8.8.8.8:8786"),
        ({"scheduler": "local"}, "local"),
    ],
)
def test_engine_lets_allowed_schedulers_through(no_connect, eng, address):
    """Past the rule, engine() goes on to connect to exactly that address (a stand-in stops it there)."""
    with pytest.raises(WouldConnect) as ei, pipeline.engine(eng):
        pytest.fail("entered the block without connecting")
    assert ei.value.address == address
    assert len(no_connect) == 1 and no_connect[0][1] == address


def test_engine_threads_needs_no_cluster(no_connect):
    from volnorm.engine import usable_cpus

    with pipeline.engine({"scheduler": "threads"}) as eng:
        assert eng.description == f"{usable_cpus()} threads" and eng.client is None
    assert no_connect == []


def test_engine_with_a_client_ignores_the_spec(no_connect):
    class FakeClient:
        class scheduler:
            address = "tcp://8.8.8.8:8786"

        dashboard_link = None

        def as_current(self):
            return contextlib.nullcontext()

        def run_on_scheduler(self, fn, *a, **k):
            return {"transitions": 0, "tasks": 0, "paused": []}

    with pipeline.engine({"scheduler": "tcp://8.8.8.8:8786"}, client=FakeClient()) as eng:
        assert eng.description.startswith("client tcp://8.8.8.8:8786")
    assert no_connect == []


def test_engine_refuses_plain_websockets_to_another_machine(no_connect):
    with pytest.raises(ValueError, match="tls://"), pipeline.engine({"scheduler": "ws://8.8.8.8:8786"}):
        pass
    assert no_connect == []


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:8786", True),
        ("tcp://127.0.0.2:8786", True),
        ("tcp://[::1]:8786", True),
        ("tcp://8.8.8.8:1", False),
        ("tcp://0.0.0.0:8786", False),
        ("tcp://10.1.2.3:8786", False),
        ("tcp://:8786", False),
        ("not an address", False),
    ],
)
def test_loopback(address, expected):
    assert is_loopback(address) is expected


def test_cli_scheduler_override_is_still_subject_to_the_rule(tmp_path, capsys, no_connect):
    """`--scheduler tcp://<remote>` replaces the spec's engine after validation: engine() must still refuse it."""
    spec = _real_spec(tmp_path)
    rc = main(["run", str(spec), "--scheduler", "tcp://8.8.8.8:8786"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("volnorm run: error: engine.scheduler tcp://8.8.8.8:8786:")
    assert "tls://" in err
    assert no_connect == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
