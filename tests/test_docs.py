"""Every public function and class has a numpydoc docstring with an example (run as a doctest
by pytest's --doctest-modules); the README's table of equivalents names real functions."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import volnorm as vn

MODULES = ["volnorm", "volnorm.color", "volnorm.plot", "volnorm.pipeline", "volnorm.datasets", "volnorm.fsl", "volnorm.engine", "volnorm.stats"]


def _public():
    for name in MODULES:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
            obj = getattr(mod, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not obj.__module__.startswith("volnorm"):
                continue
            if inspect.isclass(obj) and issubclass(obj, (Exception, Warning)):
                continue  # errors and warnings: their docstring says when they are raised
            yield f"{name}.{attr}", obj


@pytest.mark.parametrize(("name", "obj"), list(_public()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_api_has_a_docstring_with_an_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name}: no docstring"
    assert re.search(r"^Examples\n-{8}", doc, re.M) and ">>> " in doc, f"{name}: no numpydoc Examples section with a doctest"
    if inspect.isfunction(obj):
        sig = inspect.signature(obj)
        assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"
        params = [p for p in sig.parameters if p != "self"]
        if params:
            assert re.search(r"^Parameters\n-{10}$", doc, re.M), f"{name}: no Parameters section"
            documented = re.findall(r"^(\w+)", doc.split("Parameters\n----------", 1)[1], re.M)
            missing = [p for p in params if p not in documented]
            assert not missing, f"{name}: parameters not documented: {missing}"
        assert re.search(r"^(Returns\n-{7}|Yields\n-{6})$", doc, re.M), f"{name}: no Returns section"


def test_readme_equivalents_name_real_functions():
    """Each row of the README's 'Coming from' table: the volnorm side must resolve to a
    volnorm function (or CLI command), the peer side to a real name in that library when
    it is installed here."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Coming from", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("|") and "---" not in r][1:]
    assert len(rows) >= 12
    from volnorm.cli import main  # noqa: F401 - the CLI's commands, for `volnorm ...` cells

    peers = {"skimage": "skimage", "intensity_normalization": "intensity_normalization", "torchio": "torchio"}
    for row in rows:
        peer, ours = [c.strip() for c in row.strip("|").split("|")[1:3]]
        for ref in re.findall(r"`(vn\.[\w.]+)", ours):
            obj = vn
            for part in ref.split(".")[1:]:
                obj = getattr(obj, part)  # AttributeError: a name that does not exist
            assert callable(obj), ref
        for ref in re.findall(r"`((?:skimage|intensity_normalization|torchio)\.[\w.]+)", peer):
            root = ref.split(".")[0]
            try:
                mod = importlib.import_module(peers[root])
            except ImportError:
                continue  # TorchIO is not installed here
            obj, parts = mod, ref.split(".")[1:]
            for i, part in enumerate(parts):
                if not hasattr(obj, part):
                    obj = importlib.import_module(".".join([root, *parts[: i + 1]]))
                else:
                    obj = getattr(obj, part)


def test_notebooks_are_committed_without_outputs():
    """The notebooks run in CI (pytest --nbmake); in git they carry code only."""
    import json

    books = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
    assert {b.name for b in books} >= {"mri-cohort.ipynb", "faces-stack.ipynb", "scaling.ipynb"}
    for b in books:
        cells = json.loads(b.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), b.name
