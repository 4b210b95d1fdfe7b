"""Metrics (JSON lines + TensorBoard) and a progress bar, written by process 0 only."""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging


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
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", buffering=1)
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
  """A tqdm bar over steps with images/s and ETA; silent off process 0.

  The first step after (re)start is excluded from the throughput because it
  includes compilation.
  """

  def __init__(self, total: int, initial: int, batch_size: int, desc: str = "",
               enabled: Optional[bool] = None):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self.batch_size = batch_size
    self._t0 = None
    self._n0 = initial
    self._bar = None
    if self.enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

  def update(self, step: int) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._bar.n)
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._n0 = now, step
    elif now > self._t0:
      self._bar.set_postfix(img_s=f"{(step - self._n0) * self.batch_size / (now - self._t0):.1f}",
                            refresh=False)

  def images_per_second(self, step: int) -> float:
    if self._t0 is None or step <= self._n0:
      return float("nan")
    return (step - self._n0) * self.batch_size / (time.perf_counter() - self._t0)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
