"""launch.py end to end in subprocesses: overrides, SIGTERM, SIGKILL + resume."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxprompt import checkpoint as ckpt_lib

import launcher

ROOT = launcher.ROOT
DEVICES = 4
# Log every step (the kill test watches the metrics) and checkpoint every 3 steps.
FAST = ["--config.stage1.log_every_steps=1", "--config.stage2.log_every_steps=1",
        "--config.stage1.ckpt_every_steps=3", "--config.stage2.ckpt_every_steps=3"]


def _launch(workdir, *args):
  return launcher.launch(workdir, *args, devices=DEVICES)


def _finish(p, timeout=180):
  out, err = p.communicate(timeout=timeout)
  return p.returncode, out, err


def _steps_logged(workdir) -> int:
  n = 0
  for stage in ("stage1", "stage2"):
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        n += sum(1 for line in f if line.endswith("\n"))
  return n


def _wait_for_steps(p, workdir, n, timeout=120):
  t0 = time.time()
  while _steps_logged(workdir) < n:
    assert p.poll() is None, p.communicate()[1][-3000:]
    assert time.time() - t0 < timeout, "run did not reach the step in time"
    time.sleep(0.005)


def test_unknown_override_is_an_error(tmp_path):
  rc, out, err = _finish(_launch(tmp_path, "--config.nonexistent=1"))
  assert rc != 0
  assert "nonexistent" in err
  assert not os.path.exists(tmp_path / "stage1")


def test_list_configs():
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--list_configs"],
                     cwd=ROOT, env=launcher.env(DEVICES), capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr[-2000:]
  assert re.search(r"configs/default\.py\s+\S", p.stdout)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path)
  p = _launch(workdir, "--config.data.delay_s=0.02", *FAST)
  _wait_for_steps(p, workdir, 2)
  p.send_signal(signal.SIGTERM)
  rc, out, err = _finish(p)
  assert rc == 0, err[-3000:]
  m = re.search(r"SIGTERM: saved checkpoint at step (\d+) of stage 'stage1'", err)
  assert m, err[-3000:]
  step = int(m.group(1))
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir, "stage1"), async_save=False)
  assert ck.latest_step() == step and not ck.read_meta(step)["final"]
  ck.close()
  assert not os.path.exists(os.path.join(workdir, "stage2"))


def _final_trees(workdir):
  return {s: jax.tree.leaves(ckpt_lib.read_final(workdir, s)[0]) for s in ("stage1", "stage2")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The final trees of an uninterrupted run, the reference of both kill -9 tests."""
  ref_dir = str(tmp_path_factory.mktemp("ref"))
  rc, _, err = _finish(_launch(ref_dir, *FAST))
  assert rc == 0, err[-3000:]
  return _final_trees(ref_dir)


def test_sigkill_and_resume_is_bit_identical(tmp_path, reference):
  run_dir = str(tmp_path / "run")
  # 40 steps over two stages; kill at a seeded random point of either stage.
  kill_at = int(np.random.default_rng(1234).integers(2, 38))
  p = _launch(run_dir, "--config.data.delay_s=0.004", *FAST)
  _wait_for_steps(p, run_dir, kill_at)
  p.kill()
  p.communicate()
  assert p.returncode == -signal.SIGKILL
  rc, _, err = _finish(_launch(run_dir, *FAST))
  assert rc == 0, err[-3000:]
  assert "resumed from checkpoint" in err
  ref, run = reference, _final_trees(run_dir)
  for stage in ref:
    assert len(ref[stage]) == len(run[stage])
    for a, b in zip(ref[stage], run[stage]):
      np.testing.assert_array_equal(a, b, err_msg=f"{stage} differs after kill at {kill_at}")


def _save_in_progress(workdir) -> bool:
  """An Orbax checkpoint being written (its temporary folder) in either stage."""
  for stage in ("stage1", "stage2"):
    d = ckpt_lib.checkpoint_dir(workdir, stage)
    if os.path.isdir(d) and any("tmp" in name for name in os.listdir(d)):
      return True
  return False


def test_sigkill_during_a_save_resumes_bit_identical(tmp_path, reference):
  """kill -9 while a periodic or final checkpoint is being written: the half-written one
  is never used, and the rerun ends with the same parameters as an uninterrupted run."""
  ref = reference
  caught = 0
  for attempt in range(3):  # a save lasts milliseconds: try until one is caught mid-write
    run_dir = str(tmp_path / f"run{attempt}")
    p = _launch(run_dir, "--config.data.delay_s=0.004", *FAST)
    while p.poll() is None and not _save_in_progress(run_dir):
      time.sleep(0.001)
    if p.poll() is not None:
      p.communicate()
      continue
    p.kill()
    p.communicate()
    caught += 1
    rc, _, err = _finish(_launch(run_dir, *FAST))
    assert rc == 0, err[-3000:]
    run = _final_trees(run_dir)
    for stage in ref:
      for a, b in zip(ref[stage], run[stage]):
        np.testing.assert_array_equal(a, b, err_msg=f"{stage} differs after a kill mid-save")
    break
  assert caught, "no save was caught in progress in 3 runs"
