"""Metrics (JSON lines + TensorBoard), progress bars and console lines, from process 0 only.

The console is kept quiet: `say` prints one line (and logs it), `Progress` is a
stage's bar over steps, `progress` wraps any other loop over a dataset (feature
caching, evaluation, extraction, conversion) with a bar. Everything else goes to
the log (`<workdir>/log.txt` under `launch.py`).
"""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, TypeVar

import jax
import numpy as np
from absl import logging


T = TypeVar("T")

# Whether INFO logs already reach the console (`launch.py --verbosity=1`): then `say`
# only logs, so nothing is printed twice.
_CONSOLE = {"logs_info": False}


def set_console(logs_info: bool) -> None:
  _CONSOLE["logs_info"] = bool(logs_info)


def logs_reach_console() -> bool:
  """Whether INFO logs are shown on the console (then a line printed too shows twice)."""
  return _CONSOLE["logs_info"]


def say(message: str) -> None:
  """One line for the user on the console (above any progress bar) and in the log."""
  if jax.process_index() != 0:
    return
  logging.info("%s", message)
  if not _CONSOLE["logs_info"]:
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def _console_is_terminal() -> bool:
  """Whether the bars' stream (stderr) is a terminal, where a bar redraws in place."""
  return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: Optional[int] = None, desc: str = "",
             unit: str = "batch", enabled: Optional[bool] = None) -> Iterator[T]:
  """`iterable` with a progress bar (count, rate, ETA) on process 0's console.

  For loops over a dataset outside the training loop: feature caching,
  evaluation, extraction, conversion. `total` defaults to `len(iterable)`.
  The bar never reaches the log (`log.txt` gets one line when the loop ends); on a
  console that is not a terminal (output sent to a file) it redraws every 30 s, not
  every second, so such a file keeps a few lines per loop.
  """
  enabled = (jax.process_index() == 0) if enabled is None else enabled
  if not enabled:
    yield from iterable
    return
  from tqdm import tqdm
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)
  tty = _console_is_terminal()
  t0 = time.perf_counter()
  # On a terminal a finished bar is erased (the log keeps its line), so the console ends
  # with the stages' summaries and the results rather than a column of full bars.
  with tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True,
            mininterval=1.0 if tty else 30.0, file=sys.stderr, leave=not tty) as bar:
    yield from bar
    n = bar.n
  logging.info("%s: %d of %s %s(s) in %.1fs", desc or "loop", n, total, unit,
               time.perf_counter() - t0)


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Appends `{"step": s, ...}` lines to `<logdir>/metrics.jsonl` and TensorBoard scalars.

  On processes other than 0 every call is a no-op, so callers need no guards.
  """

  def __init__(self, logdir: str, enabled: Optional[bool] = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.logdir = logdir
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._path = os.path.join(logdir, "metrics.jsonl")
    self._jsonl = open(self._path, "a", buffering=1)
    if tensorboard:
      self._tb = _BackgroundTensorBoard(os.path.join(logdir, "tb"))

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in values.items():
      row[k] = _scalar(v)
    self._jsonl.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in row.items()
                                                 if k != "step"))

  def drop_after(self, step: int) -> None:
    """Forget rows past `step` (a resumed run replays those steps)."""
    if not self.enabled:
      return
    self._jsonl.close()
    with open(self._path) as f:
      lines = [line for line in f if line.strip()]
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) != len(lines):
      tmp = self._path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self._path)
      logging.info("%s: dropped %d rows past step %d", self._path, len(lines) - len(keep), step)
    self._jsonl = open(self._path, "a", buffering=1)

  def text(self, name: str, text: str, step: int = 0) -> None:
    """A block of text (rule table, config) to a file and TensorBoard."""
    if not self.enabled:
      return
    with open(os.path.join(self.logdir, f"{name}.txt"), "w") as f:
      f.write(text + "\n")
    if self._tb is not None:
      # Markdown code block so TensorBoard keeps the table's alignment.
      self._tb.add_text(name, "```\n" + text + "\n```", step)
    logging.info("%s:\n%s", name, text)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):  # a torn last line from a killed run
    return 1 << 62


class _BackgroundTensorBoard:
  """tensorboardX calls run on a worker thread: importing it can take seconds (it probes
  for torch), and event-file writes should not stall the training loop."""

  def __init__(self, logdir: str):
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._work, args=(logdir,), daemon=True)
    self._thread.start()

  def _work(self, logdir: str) -> None:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(logdir)
    while True:
      item = self._queue.get()
      if item is None:
        writer.close()
        return
      method, args = item
      getattr(writer, method)(*args)

  def add_scalar(self, *args) -> None:
    self._queue.put(("add_scalar", args))

  def add_text(self, *args) -> None:
    self._queue.put(("add_text", args))

  def flush(self) -> None:
    self._queue.put(("flush", ()))

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()


def write_json(path: str, obj: Any, indent: int = 2) -> None:
  """Atomic JSON write (results, counts), from process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=indent)
  os.replace(tmp, path)


def read_json(path: str) -> Optional[Any]:
  """The JSON in `path`, or None when there is no such file."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_jsonl(path: str) -> list[dict]:
  """All rows of a metrics.jsonl file (for tests and notebooks)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A stage's bar over steps with images/s, ETA and loss; silent off process 0.

  JAX dispatches steps asynchronously, so the bar moves and throughput is
  counted only where the loop has waited for results (`done`, called when
  metrics are fetched). `start` marks the end of the first (compiling) step;
  the steady-state rate is measured from there.
  """

  def __init__(self, total: int, initial: int, batch_size: int, desc: str = "",
               enabled: Optional[bool] = None):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self.batch_size = batch_size
    self._t0: Optional[float] = None  # when step `_n0` was known complete
    self._n0 = initial
    self._last: tuple[int, float] = (initial, 0.0)
    self._bar = None
    if self.enabled:
      from tqdm import tqdm
      # Erased when done on a terminal: the stage's summary line replaces it.
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                       leave=not _console_is_terminal())

  def start(self, step: int) -> None:
    """Steps up to `step` (the first, compiling one) are complete."""
    now = time.perf_counter()
    self._t0, self._n0, self._last = now, step, (step, now)
    self._advance(step)

  def done(self, step: int, loss: Optional[float] = None) -> float:
    """Steps up to `step` are complete; returns images/s since the previous call (or NaN)."""
    now = time.perf_counter()
    if self._t0 is None:
      self.start(step)
      return float("nan")
    prev_step, prev_t = self._last
    ips = (float("nan") if step <= prev_step or now <= prev_t
           else (step - prev_step) * self.batch_size / (now - prev_t))
    self._last = (step, now)
    if self._bar is not None:
      post = {}
      if math.isfinite(ips):
        post["img_s"] = f"{ips:.1f}"
      if loss is not None:
        post["loss"] = f"{loss:.4g}"
      self._bar.set_postfix(post, refresh=False)
    self._advance(step)
    return ips

  def update(self, step: int) -> None:
    """Alias of `done` for callers that only count completed steps."""
    self.done(step)

  def steady_images_per_second(self) -> float:
    """Images/s from the end of the first step to the last completed one (NaN if none)."""
    step, t = self._last
    if self._t0 is None or step <= self._n0 or t <= self._t0:
      return float("nan")
    return (step - self._n0) * self.batch_size / (t - self._t0)

  def _advance(self, step: int) -> None:
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
