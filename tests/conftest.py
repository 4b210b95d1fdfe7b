"""Test setup: 8 simulated CPU devices, a persistent compilation cache, quick XLA
compiles, long modules first.

The device count and the cache must be set before JAX initialises its backend, so they live
here. They are set in the environment too, so that the launch.py / worker subprocesses some
tests start share the cache (a tiny CLIP or ViT compiled by one test is read back by the next).

The tests' models are tiny: their time is XLA's compilation, most of it LLVM optimising
code that then runs for milliseconds. XLA_OPT (backend optimisation level 0) cuts a
compile by a third to a half; the parity tests still hold the results to the torch
references within their tolerances. Subprocesses that set XLA_FLAGS add XLA_OPT (also
the benchmark smoke tests, which check the rows, not the timings; `make bench` runs
without it).
"""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = os.path.join(ROOT, ".jax_cache")

from launcher import XLA_OPT  # noqa: E402  (no JAX import there)
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {XLA_OPT}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# The longest modules, longest first. With `pytest -n 2 --dist loadfile` (make test) files are
# handed to the two workers in collection order, so these start at once instead of leaving
# one worker busy on a long module after the other has run out of work.
LONG_FIRST = (  # from `pytest --durations`, longest first
    "test_default_job.py",
    "test_benchmarks.py",
    "test_clipreid_pipeline.py",
    "test_faults.py",
    "test_lpt_model.py",
    "test_fidelity_lpt.py",
    "test_clipreid_pitfalls.py",
    "test_launch.py",
    "test_lpt_pipeline.py",
    "test_lpt_pitfalls.py",
    "test_coop_train.py",
    "test_coop_model.py",
    "test_perf_paths.py",
    "test_all_configs.py",
    "test_demo_data.py",
    "test_vit.py",
    "test_precision.py",
    "test_release_eval.py",
    "test_stage_resume.py",
    "test_release_converters.py",
    "test_validate.py",
    "test_clip.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
  """Stable reorder: modules named in LONG_FIRST first (in that order), then the rest."""
  rank = {name: i for i, name in enumerate(LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
