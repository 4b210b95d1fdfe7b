"""`launch.py` in a subprocess, as the fault and launcher tests run it.

The environment: `devices` simulated CPU devices, the compilation cache and quick XLA
compiles of this test session (tests/conftest.py), and no torch. A `make run` install has no torch
(requirements.txt); in the test install tensorboardX would import it in every launcher
process (it probes for torch to accept torch tensors), seconds of CPU per process that
the toy pipeline never uses.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(ROOT, "tests", "toy_pipeline.py")
_NO_TORCH = os.path.join(ROOT, "tests", "no_torch")
# Quick compiles for the tests' tiny models (tests/conftest.py says why); this module imports
# no JAX, so conftest takes the flag from here before JAX starts.
XLA_OPT = "--xla_backend_optimization_level=0"


def env(devices: int, torch: bool = False) -> dict:
  """The subprocess environment; `torch=True` keeps torch importable."""
  e = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_OPT}")
  if not torch:
    e["PYTHONPATH"] = os.pathsep.join(p for p in (_NO_TORCH, e.get("PYTHONPATH")) if p)
  return e


def launch(workdir, *args, devices: int, config: str = TOY_CONFIG) -> subprocess.Popen:
  """`python launch.py --config=<config> --workdir=<workdir> <args>`, output captured."""
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}",
                           f"--workdir={workdir}", *args], cwd=ROOT, env=env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
