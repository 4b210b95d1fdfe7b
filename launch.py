"""The one entry point: run a config's pipeline (all stages, or one with --stage).

  python launch.py                      # configs/default.py into workdir/default
  python launch.py --config configs/<name>.py --workdir /path/to/run
  python launch.py --config configs/<name>.py:arg --config.stage1.total_steps=100 --stage stage2
  python launch.py --list_configs

The config is locked: overriding a field that does not exist is an error.
Rerunning the same command resumes from the workdir's checkpoints. Multi-host:
pass --coordinator_address/--num_processes/--process_id, or --distributed to let
`jax.distributed.initialize()` read the cluster environment (SLURM, TPU, ...).

The console shows a header, one progress bar per stage or loop over a dataset,
a line per finished stage and the results; every log line goes to
`<workdir>/log.txt` (`--verbosity=1` shows them on the console too). An error
the user can cause is one message and a non-zero exit (the traceback is in
log.txt; `--traceback` prints it). SIGTERM at any point exits cleanly with a
message; rerunning the same command continues from where it stopped. Every run
records its config in `<workdir>/config.json`; a different earlier one is kept
in `<workdir>/config_history/`.
"""
from __future__ import annotations

import glob
import logging as pylogging
import os
import signal
import sys
import time
import traceback

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
flags.DEFINE_bool("traceback", False, "On an error, print the full traceback (it is always "
                  "in <workdir>/log.txt).")

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


class _ConsoleFilter(pylogging.Filter):
  """Orbax's own error reports (with tracebacks, from its background threads) stay in the
  log file: the failure reaches the console once, as the run's error message."""

  def filter(self, record) -> bool:
    return "/orbax/" not in record.pathname or record.levelno >= pylogging.CRITICAL


class _Sigterm(BaseException):
  """SIGTERM outside a training loop. A BaseException, so that no `except Exception`
  on the way (e.g. around a checkpoint read) mistakes it for a failure of its own."""


def _on_sigterm(signum, frame) -> None:
  raise _Sigterm()


def _console_shows_info() -> bool:
  return FLAGS.verbosity >= 1


def setup_console() -> None:
  """absl's stderr handler shows warnings only, unless --verbosity=1 (INFO and up)."""
  handler = logging.get_absl_handler()
  handler.addFilter(_QuietLibraries())
  if _console_shows_info():
    handler.setLevel(pylogging.INFO)
  else:
    handler.setLevel(pylogging.WARNING)
    handler.addFilter(_ConsoleFilter())
  pylogging.captureWarnings(True)  # library warnings.warn go through logging too


def log_to_file(workdir: str) -> str:
  """Every log record (INFO and up) is appended to <workdir>/log.txt."""
  path = os.path.join(workdir, "log.txt")
  fh = pylogging.FileHandler(path)
  fh.setLevel(pylogging.DEBUG if FLAGS.verbosity >= 1 else pylogging.INFO)
  fh.setFormatter(logging.PythonFormatter())
  fh.addFilter(_QuietLibraries())
  pylogging.getLogger().addHandler(fh)
  return path


def record_config(workdir: str, text: str) -> None:
  """Write config.json; an earlier, different one moves to config_history/ (kept)."""
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(os.path.getmtime(path)))
    history = os.path.join(workdir, "config_history")
    os.makedirs(history, exist_ok=True)
    dest = os.path.join(history, f"config-{stamp}.json")
    n = 1
    while os.path.exists(dest):
      dest, n = os.path.join(history, f"config-{stamp}-{n}.json"), n + 1
    os.replace(path, dest)
    logging.info("previous config.json kept as %s", dest)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _message(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  if isinstance(e, (FileNotFoundError, ValueError, FloatingPointError, app.UsageError)) or \
      type(e).__name__ in ("CorruptCheckpointError", "CheckpointSaveError", "WeightFileError",
                           "WeightMismatchError"):
    return text
  return f"{type(e).__name__}: {text}"


def _exit(code: int) -> None:
  """Exit now: after a failed asynchronous save Orbax's background threads can keep the
  interpreter from exiting, and nothing is left to wait for (logs are flushed first)."""
  for h in pylogging.getLogger().handlers:
    h.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main(argv) -> None:
  del argv
  signal.signal(signal.SIGTERM, _on_sigterm)
  setup_console()
  if FLAGS.list_configs:
    print(list_configs())
    return
  log_path = None
  try:
    init_distributed()
    import jax
    from jaxprompt import methods, metrics

    metrics.set_console(_console_shows_info())
    config = FLAGS.config
    if "pipeline" not in config:
      raise app.UsageError("the config has no `pipeline` field")
    workdir = os.path.abspath(FLAGS.workdir or default_workdir())
    module = methods.get(config.pipeline)
    validate = getattr(module, "validate_config", None)
    if callable(validate):
      validate(config)
    stages = getattr(module, "run_stages", None)
    if FLAGS.stage and callable(stages) and FLAGS.stage not in stages(config):
      raise app.UsageError(f"--stage={FLAGS.stage}: unknown stage; the {config.pipeline} "
                           f"pipeline has {tuple(stages(config))}")
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      log_path = log_to_file(workdir)
      record_config(workdir, config.to_json_best_effort(indent=2))
      spec = config_flags.get_config_filename(FLAGS["config"])
      print(f"jaxprompt: {os.path.relpath(spec.partition(':')[0], os.getcwd())} "
            f"(pipeline {config.pipeline}{', stage ' + FLAGS.stage if FLAGS.stage else ''}) on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"{jax.process_count()} process(es)\n  workdir {workdir}\n  log     {log_path}",
            file=sys.stderr, flush=True)
    logging.info("jaxprompt: pipeline %s, workdir %s, %d processes, %d devices (%s)",
                 config.pipeline, workdir, jax.process_count(), jax.device_count(),
                 jax.devices()[0].platform)
    module.run(config, workdir, stage=FLAGS.stage)
  except (_Sigterm, KeyboardInterrupt) as e:
    what = "SIGTERM" if isinstance(e, _Sigterm) else "interrupted"
    msg = (f"{what}: stopped between checkpoints; finished stages and saved checkpoints are "
           f"kept; rerun the same command to continue")
    logging.info("%s", msg)  # the console gets it once, below
    print(f"preempted: {msg}", file=sys.stderr, flush=True)
    _exit(0 if isinstance(e, _Sigterm) else 130)
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "Preempted":  # the trainer saved a checkpoint and stopped
      logging.info("%s", e)
      print(f"preempted: {e}", file=sys.stderr, flush=True)
      _exit(0)
    # The full traceback goes to the log file only (the console shows warnings, and
    # this record is below that level), or to the console with --traceback.
    pylogging.getLogger("jaxprompt.launch").info("error:\n%s", traceback.format_exc())
    if FLAGS.traceback:
      traceback.print_exc()
    where = f" (traceback in {log_path})" if log_path else ""
    print(f"error: {_message(e)}{where}", file=sys.stderr, flush=True)
    _exit(1)


if __name__ == "__main__":
  # An old field name fails in the locked config with a bare "not found": name the new one.
  from jaxprompt.renamed import hint as _renamed_hint
  _renamed = _renamed_hint(sys.argv[1:])
  if _renamed:
    print(f"error: {_renamed}", file=sys.stderr, flush=True)
    sys.exit(2)
  # Let JAX options be set from the command line too (e.g. --jax_platforms=cpu).
  import jax
  jax.config.parse_flags_with_absl()
  app.run(main)
