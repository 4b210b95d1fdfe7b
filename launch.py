"""The one entry point: run a config's pipeline (all stages, or one with --stage).

  python launch.py                      # configs/default.py into workdir/default
  python launch.py --config configs/<name>.py --workdir /path/to/run
  python launch.py --config configs/<name>.py:arg --config.stage1.total_steps=100 --stage stage2
  python launch.py --list_configs

The config is locked: overriding a field that does not exist is an error.
Rerunning the same command resumes from the workdir's checkpoints. Multi-host:
pass --coordinator_address/--num_processes/--process_id, or --distributed to let
`jax.distributed.initialize()` read the cluster environment (SLURM, TPU, ...).
"""
from __future__ import annotations

import glob
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(ROOT, "configs")

config_flags.DEFINE_config_file(
    "config", os.path.join(CONFIG_DIR, "default.py"),
    "Config file (optionally `path.py:arg`); override fields with --config.a.b=value.",
    lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Where checkpoints, metrics and logs go (default: workdir/<config name>).")
flags.DEFINE_string("stage", None, "Run or resume only this stage of the pipeline.")
flags.DEFINE_bool("list_configs", False, "List the configs in configs/ and exit.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with settings from the environment.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

FLAGS = flags.FLAGS


def list_configs() -> str:
  """One line per config file (its name and the first line of its docstring), then the
  method families `config.pipeline` names."""
  import ast
  from jaxprompt import methods
  lines = []
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.py"), recursive=True)):
    name = os.path.relpath(path, ROOT)
    if os.path.basename(path) == "__init__.py":
      continue
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    lines.append(f"{name:50s} {doc.splitlines()[0] if doc else ''}")
  lines.append("\nconfig.pipeline -> driver (each family's recipe: <package>/config.py, with tiny()):")
  lines += [f"  {k:10s} {v}" for k, v in methods.DRIVERS.items()]
  return "\n".join(lines)


def default_workdir() -> str:
  """workdir/<config file name>[_<arg>] under the repository root."""
  spec = config_flags.get_config_filename(FLAGS["config"])
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg else "")
  return os.path.join(ROOT, "workdir", name)


def init_distributed() -> None:
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


class _QuietLibraries(pylogging.Filter):
  """Drop INFO chatter from orbax (one line per array read/written); keep its warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.list_configs:
    print(list_configs())
    return
  init_distributed()

  import jax
  from jaxprompt import methods, trainer

  config = FLAGS.config
  if "pipeline" not in config:
    raise app.UsageError("the config has no `pipeline` field")
  workdir = os.path.abspath(FLAGS.workdir or default_workdir())
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("jaxprompt: pipeline %s, workdir %s, %d processes, %d devices (%s)",
               config.pipeline, workdir, jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  module = methods.get(config.pipeline)
  try:
    module.run(config, workdir, stage=FLAGS.stage)
  except trainer.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(0)


if __name__ == "__main__":
  # Let JAX options be set from the command line too (e.g. --jax_platforms=cpu).
  import jax
  jax.config.parse_flags_with_absl()
  app.run(main)
