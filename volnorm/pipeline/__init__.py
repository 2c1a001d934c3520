"""Declarative runs: a YAML spec -> fit passes -> one lazy graph -> a committed store.

A spec (see ``workflows/``) names the input, an optional mask, the steps (the
Python API's transforms, by name, with their options), the outputs and the engine.
:func:`run` validates it before any data is read, prints the plan, runs each
step's fit pass, builds one lazy graph and writes it with the store's commit
protocol (staging directory, every chunk verified, completion marker last). A
run is idempotent: run again, it does nothing and says so; interrupted, it
resumes (volumes already written are not written again, fitted parameters are
reused); a changed spec or changed inputs never mix with an existing output
unless ``overwrite=True``.

The package: :mod:`~volnorm.pipeline.spec` (load and check a spec, every step's
options bound to the function it calls), :mod:`~volnorm.pipeline.steps` (steps by
name: parse, fit, apply, replay), :mod:`~volnorm.pipeline.planner` (inputs, digests,
what is already done), :mod:`~volnorm.pipeline.runner` (the run) and
:mod:`~volnorm.pipeline.outputs` (histograms, statistics, parameters beside the images).

Exit codes of ``volnorm run``: 0 done (or already up to date), 1 refused or
failed (bad spec, bad input, an output that exists), 2 command-line usage,
3 interrupted (SIGINT/SIGTERM: run again to resume), 4 the cluster was lost.
"""

from __future__ import annotations

from volnorm.engine import ClusterLostError, RunStalledError
from volnorm.engine.faults import PoisonInputError, WorkerMemoryError
from volnorm.pipeline.planner import describe, plan
from volnorm.pipeline.runner import RunResult, engine, open_input, run
from volnorm.pipeline.spec import Spec, SpecError, load_spec

__all__ = [
    "ClusterLostError", "PoisonInputError", "RunResult", "RunStalledError", "SpecError", "WorkerMemoryError",
    "engine", "load_spec", "plan", "run",
]
