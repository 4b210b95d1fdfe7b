"""Pipelines: modules exposing `run(config, workdir, stage=None)`.

`config.pipeline` names one: a bare name means `jaxprompt.pipelines.<name>`, a
dotted path is imported as is (e.g. a project's own module).
"""
from __future__ import annotations

import importlib
import types


def get(name: str) -> types.ModuleType:
  """Import the pipeline module `name` and check it has `run`."""
  module_name = name if "." in name else f"jaxprompt.pipelines.{name}"
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise ValueError(f"unknown pipeline {name!r}: no module {module_name!r}") from e
    raise
  if not callable(getattr(module, "run", None)):
    raise ValueError(f"pipeline module {module_name!r} has no run(config, workdir, stage=None)")
  return module
