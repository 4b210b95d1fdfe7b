"""Helpers shared by the benchmarks: interleaved timing, machine description, results.

Timings on a shared machine drift; every comparison here is a ratio of two candidates
timed alternately (A B A B ...) in one process, reported as the median of the per-round
times with the spread (min..max of the per-round ratios) so the noise is visible.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def machine() -> dict[str, Any]:
  """CPU model and core count (lscpu), Python platform, date (UTC)."""
  model = platform.processor() or "unknown"
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.lower().startswith("model name"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def interleaved(candidates: Mapping[str, Callable[[], Any]], rounds: int,
                warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of each candidate, timed alternately for `rounds` rounds.

  Each callable must block until its work is done. `warmup` untimed calls each first
  (compilation, allocator warm-up).
  """
  for fn in candidates.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {k: [] for k in candidates}
  for _ in range(rounds):
    for name, fn in candidates.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def ratio_summary(times: Mapping[str, Sequence[float]], ours: str, ref: str) -> dict[str, float]:
  """Speed-up of `ours` over `ref` (ref time / our time): median and per-round spread."""
  per_round = [r / o for o, r in zip(times[ours], times[ref])]
  return {"ratio": statistics.median(times[ref]) / statistics.median(times[ours]),
          "ratio_min": min(per_round), "ratio_max": max(per_round),
          f"{ours}_s": statistics.median(times[ours]), f"{ref}_s": statistics.median(times[ref])}


def add_common_args(ap) -> None:
  ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
  ap.add_argument("--json", default="", help="append the result as one JSON line to this file")


def emit(result: dict[str, Any], json_path: str = "") -> None:
  """Prints the result and appends it (one JSON line) to `json_path`."""
  result = {**result, "machine": machine()}
  print(json.dumps(result, sort_keys=True), flush=True)
  if json_path:
    with open(json_path, "a") as f:
      f.write(json.dumps(result, sort_keys=True) + "\n")


def set_threads(n: Optional[int] = None) -> int:
  """The same intra-op thread count for torch as XLA uses (all cores)."""
  n = n or os.cpu_count() or 1
  try:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(n)
  except ImportError:
    pass
  return n
