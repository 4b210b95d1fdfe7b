"""Which driver runs a config: `config.pipeline` -> a module with `run(config, workdir, stage=None)`.

A bare name is looked up in `DRIVERS` (one line per method family); a dotted path is
imported as is (e.g. a project's own module).
"""
from __future__ import annotations

import importlib
import types

# One line per method family; a new family adds its package's driver here.
DRIVERS: dict[str, str] = {
    "clipreid": "jaxprompt.clipreid.train",
    "lpt": "jaxprompt.lpt.train",
    "vpt": "jaxprompt.lpt.baselines",  # VPT-deep and the linear probe, LPT's baselines
    "coop": "jaxprompt.coop.train",
    "default": "jaxprompt.demo.job",
}


def get(name: str) -> types.ModuleType:
  """Import the driver module for `name` and check it has `run`."""
  if "." in name:
    module_name = name
  elif name in DRIVERS:
    module_name = DRIVERS[name]
  else:
    raise ValueError(f"unknown pipeline {name!r}: expected one of {sorted(DRIVERS)} "
                     "or a dotted module path")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise ValueError(f"unknown pipeline {name!r}: no module {module_name!r}") from e
    raise
  if not callable(getattr(module, "run", None)):
    raise ValueError(f"pipeline module {module_name!r} has no run(config, workdir, stage=None)")
  return module
