"""Faults and bad input: blow-ups, failed saves, corrupt hand-offs, unsafe weight files,
metrics after a resume, SIGTERM outside the loop, one-line errors and a quiet console.

The in-process tests drive the toy pipeline through `trainer.run_stage`; the others run
the real launcher (`launch.py --config tests/toy_pipeline.py`) in subprocesses, each
bounded by a timeout.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxprompt import checkpoint as ckpt_lib, metrics, sharding as shd
from jaxprompt.convert import io

import launcher
import toy_pipeline as toy

ROOT = launcher.ROOT
DEVICES = 2
# Two short stages (4 + 4 steps), metrics every step, checkpoints every 2 steps.
SHORT = [f"--config.{s}.{k}={v}" for s in ("stage1", "stage2")
         for k, v in (("total_epochs", 0), ("total_steps", 4), ("log_every_steps", 1),
                      ("ckpt_every_steps", 2))]
# absl's console line prefix: a level letter and the date, e.g. "I1202 00:59:47.23".
ABSL_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d", re.M)


def _config(steps1=6, steps2=4, **stage1):
  c = toy.get_config()
  for name, n in (("stage1", steps1), ("stage2", steps2)):
    c[name].total_epochs = 0
    c[name].total_steps = n
    c[name].ckpt_every_steps = 2
    c[name].log_every_steps = 1
    c[name].async_checkpoints = False
    c[name].progress = False
  for k, v in stage1.items():
    c.stage1[k] = v
  return c


def _steps(ckdir):
  ck = ckpt_lib.Checkpointer(ckdir, async_save=False)
  try:
    return ck.all_steps()
  finally:
    ck.close()


def _launch(workdir, *args):
  return launcher.launch(workdir, *args, devices=DEVICES)


def _finish(p, timeout=150):
  try:
    out, err = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    out, err = p.communicate()
    pytest.fail(f"launcher did not exit within {timeout}s:\n{err[-3000:]}")
  return p.returncode, out, err


def _wait_for(pred, p, timeout=120, what="the condition"):
  t0 = time.time()
  while not pred():
    if p.poll() is not None:
      pytest.fail(f"run ended before {what}: rc={p.returncode}\n{p.communicate()[1][-3000:]}")
    assert time.time() - t0 < timeout, f"{what} did not happen in {timeout}s"
    time.sleep(0.01)


def _assert_one_message(err):
  """The console shows the error once, without Python's traceback."""
  assert "Traceback" not in err, err[-3000:]
  assert len(re.findall(r"^error: ", err, re.M)) == 1, err[-3000:]


# ------------------------------------------------------------------ item 1: blow-ups

def test_blowup_on_a_save_step_is_not_saved(tmp_path):
  # Step 4's update overflows (lr 1e30) while its loss, computed before the update, is
  # finite; step 4 is a checkpoint step.
  c = _config(steps1=6, lr_spike_at=4, log_every_steps=4)
  with pytest.raises(FloatingPointError, match=r"non-finite state after the update of step 4 of "
                     r"stage 'stage1'.*param_norm=inf.*last good checkpoint \(step 2\)"):
    toy.run(c, str(tmp_path), stage="stage1")
  ckdir = ckpt_lib.checkpoint_dir(str(tmp_path), "stage1")
  assert _steps(ckdir) == [2]
  assert ckpt_lib.final_step(ckdir) is None
  rows = metrics.read_jsonl(os.path.join(str(tmp_path), "stage1", "metrics.jsonl"))
  assert [r["step"] for r in rows] == [2]  # flushed before the save at 2; 4 never logged
  # The named checkpoint is intact and finite: a rerun without the spike resumes from it.
  res = toy.run(_config(steps1=6), str(tmp_path), stage="stage1")["stage1"]
  assert res.meta["final"] and int(res.state["step"]) == 6
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(res.state["params"]))


def test_blowup_on_the_last_step_exits_nonzero_without_final(tmp_path):
  workdir = str(tmp_path)
  rc, out, err = _finish(_launch(workdir, *SHORT, "--config.stage1.lr_spike_at=4"))
  assert rc != 0
  _assert_one_message(err)
  ckdir = ckpt_lib.checkpoint_dir(workdir, "stage1")
  assert re.search(r"error: non-finite state after the update of step 4 of stage 'stage1'.*"
                   r"The last good checkpoint \(step 2\) in " + re.escape(ckdir) + " is intact",
                   err), err[-2000:]
  assert _steps(ckdir) == [2] and ckpt_lib.final_step(ckdir) is None
  assert not os.path.exists(os.path.join(workdir, "stage2"))
  assert "Traceback" in open(os.path.join(workdir, "log.txt")).read()


# ------------------------------------------------------------------ item 2: failed saves

def test_unwritable_checkpoint_folder_stops_the_run_within_seconds(tmp_path):
  workdir = str(tmp_path)
  p = _launch(workdir, *SHORT, "--config.data.delay_s=0.05")
  metrics_path = os.path.join(workdir, "stage1", "metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics_path) and os.path.getsize(metrics_path), p,
            what="the first step")
  # Replace the (still empty) checkpoint folder with a file: every write into it fails,
  # in Orbax's background thread.
  ckdir = ckpt_lib.checkpoint_dir(workdir, "stage1")
  shutil.rmtree(ckdir)
  with open(ckdir, "w") as f:
    f.write("not a folder")
  t0 = time.time()
  rc, out, err = _finish(p, timeout=60)
  assert time.time() - t0 < 30, "the process did not exit promptly after the failed save"
  assert rc != 0
  _assert_one_message(err)
  assert re.search(r"error: could not write checkpoint step 2 to " + re.escape(ckdir), err), \
      err[-2000:]


# ------------------------------------------------------------------ item 3: stage hand-off

def _corrupt(ckdir, step):
  files = glob.glob(os.path.join(ckdir, str(step), "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_corrupt_final_checkpoint_between_stages(tmp_path):
  workdir = str(tmp_path)
  first = toy.run(_config(), workdir)
  dir1 = ckpt_lib.checkpoint_dir(workdir, "stage1")
  dir2 = ckpt_lib.checkpoint_dir(workdir, "stage2")
  _corrupt(dir1, 6)
  # Stage 2 has checkpoints of its own: drop its final one, so that it must resume
  # (from step 2) and train again, without reading stage 1.
  ck = ckpt_lib.Checkpointer(dir2, async_save=False)
  ck.delete(4)
  ck.close()
  again = toy.run(_config(), workdir, stage="stage2")["stage2"]
  for a, b in zip(jax.tree.leaves(first["stage2"].state), jax.tree.leaves(again.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(again.frozen["prompt"]["ctx"]),
                                np.asarray(first["stage2"].frozen["prompt"]["ctx"]))
  # Without stage 2's checkpoints, reading stage 1 reports, quarantines and names the stage.
  shutil.rmtree(os.path.join(workdir, "stage2"))
  with pytest.raises(ckpt_lib.CorruptCheckpointError,
                     match=r"final checkpoint of stage 'stage1' \(" + re.escape(dir1) +
                     r"/6\) is corrupt.*moved to .*corrupt_checkpoints.*--stage=stage1"):
    toy.run(_config(), workdir, stage="stage2")
  assert os.listdir(os.path.join(workdir, "stage1", "corrupt_checkpoints"))
  # Rerunning as told: stage 1 resumes from step 4, then stage 2 runs; the same result.
  redo = toy.run(_config(), workdir)
  for a, b in zip(jax.tree.leaves(first["stage2"].state), jax.tree.leaves(redo["stage2"].state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ item 4: weight files

class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors", ".pth"])
def test_unreadable_weight_files_name_the_file_and_field(tmp_path, suffix):
  path = str(tmp_path / f"weights{suffix}")
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  with pytest.raises(io.WeightFileError) as e:
    io.read_arrays(path, field="model.weights")
  text = str(e.value)
  assert path in text and "config field model.weights" in text
  assert "allow_pickle" not in text and "weights_only" not in text
  assert "\n" not in text


def test_pickles_that_would_run_code_are_refused(tmp_path):
  torch = pytest.importorskip("torch")
  marker = str(tmp_path / "code_ran")
  path = str(tmp_path / "evil.pt")
  torch.save({"w": torch.ones(2), "x": _RunsCode(marker)}, path)
  with pytest.raises(io.WeightFileError, match=r"refusing to load .*evil\.pt.*could run code"):
    io.read_arrays(path)
  assert not os.path.exists(marker)
  # A raw pickle (not torch's zip format) is refused too, without running it.
  raw = str(tmp_path / "raw.pth")
  with open(raw, "wb") as f:
    pickle.dump({"x": _RunsCode(marker)}, f)
  with pytest.raises(io.WeightFileError, match=re.escape(raw)):
    io.read_arrays(raw)
  assert not os.path.exists(marker)
  # An object-array .npz: refused, no allow_pickle invitation.
  npz = str(tmp_path / "objects.npz")
  np.savez(npz, a=np.array([{"k": 1}], dtype=object))
  with pytest.raises(io.WeightFileError, match="object arrays") as e:
    io.read_arrays(npz)
  assert "allow_pickle" not in str(e.value)


def test_wrapped_state_dicts_still_load_with_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  import argparse
  path = str(tmp_path / "wrapped.pth")
  sd = {"module.a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
  torch.save({"state_dict": sd, "epoch": 3, "best": np.float64(0.5),
              "args": argparse.Namespace(lr=0.1)}, path)
  arrays = io.read_arrays(path)
  np.testing.assert_array_equal(arrays["a.weight"], np.arange(6.0).reshape(2, 3))
  assert arrays["b"].dtype == np.int64


def test_convert_cli_errors_are_one_line(tmp_path):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"\x00" * 100)
  for src in (str(tmp_path / "missing.pt"), str(bad)):
    p = subprocess.run([sys.executable, "-m", "jaxprompt.convert", src, str(tmp_path / "o.npz")],
                       cwd=ROOT, env=launcher.env(DEVICES, torch=True), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and src in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")


# ------------------------------------------------------------------ items 6-9: the launcher

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """(workdir, stdout, stderr) of one successful SHORT run, read by two tests (each
  works on its own copy of the workdir)."""
  workdir = str(tmp_path_factory.mktemp("short") / "run")
  rc, out, err = _finish(_launch(workdir, *SHORT))
  assert rc == 0, err[-3000:]
  return workdir, out, err


def _copy_run(short_run, dst) -> str:
  workdir = str(dst)
  shutil.copytree(short_run[0], workdir)
  return workdir


def test_config_history_and_one_line_user_errors(short_run, tmp_path):
  workdir = _copy_run(short_run, tmp_path / "run")
  with open(os.path.join(workdir, "config.json")) as f:
    good = f.read()
  # A rerun that fails (a stage without a length) keeps the record of the first run.
  rc, out, err = _finish(_launch(workdir, *SHORT, "--config.stage1.total_steps=0"))
  assert rc == 1
  _assert_one_message(err)
  assert "error: a stage needs total_epochs or total_steps > 0" in err
  history = glob.glob(os.path.join(workdir, "config_history", "*.json"))
  assert len(history) == 1
  with open(history[0]) as f:
    assert f.read() == good
  assert json.load(open(os.path.join(workdir, "config.json")))["stage1"]["total_steps"] == 0
  log = open(os.path.join(workdir, "log.txt")).read()
  assert "Traceback" in log and "a stage needs total_epochs" in log
  # --traceback prints it on the console too.
  rc, _, err = _finish(_launch(workdir, *SHORT, "--config.stage1.total_steps=0", "--traceback"))
  assert rc == 1 and "Traceback" in err


def test_metrics_rows_are_not_repeated_after_a_resume(tmp_path):
  workdir = str(tmp_path)
  toy.run(_config(), workdir, stage="stage1")
  # A run killed after step 6's metrics but before its checkpoint: resume replays 5-6.
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir, "stage1"), async_save=False)
  ck.delete(6)
  ck.close()
  toy.run(_config(), workdir, stage="stage1")
  steps = [r["step"] for r in metrics.read_jsonl(os.path.join(workdir, "stage1", "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("phase", ["start-up", "evaluation"])
def test_sigterm_outside_the_loop_exits_cleanly_and_resumes(tmp_path, phase):
  workdir = str(tmp_path)
  if phase == "start-up":  # during the feature cache, before any stage
    p = _launch(workdir, *SHORT, "--config.data.cache_delay_s=0.05")
    _wait_for(lambda: os.path.exists(os.path.join(workdir, "log.txt")), p, what="start-up")
    time.sleep(0.5)
  else:
    p = _launch(workdir, *SHORT, "--config.data.eval_delay_s=0.3")
    # Stage 2's final checkpoint (step 4) is committed (renamed from its temporary name).
    final = os.path.join(ckpt_lib.checkpoint_dir(workdir, "stage2"), "4")
    _wait_for(lambda: os.path.isdir(final), p, what="the end of stage 2")
    time.sleep(0.6)
  p.send_signal(signal.SIGTERM)
  rc, _, err = _finish(p, timeout=60)
  assert rc == 0, err[-3000:]
  assert "Traceback" not in err
  assert re.search(r"^preempted: SIGTERM", err, re.M), err[-2000:]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  rc, _, err = _finish(_launch(workdir, *SHORT))
  assert rc == 0, err[-3000:]
  assert metrics.read_json(os.path.join(workdir, "results.json"))["accuracy"] >= 0
  if phase == "evaluation":
    assert "stage2: already finished" in err


def test_quiet_console_by_default_and_logs_with_verbosity(short_run, tmp_path):
  workdir, out, err = short_run
  console = out + err
  assert not ABSL_LINE.search(console), ABSL_LINE.findall(console)[:5]
  assert f"workdir {workdir}" in err and os.path.join(workdir, "log.txt") in err
  for stage in ("stage1", "stage2"):
    assert re.search(rf"^{stage}: 4 steps in [\d.]+s, [\d.]+ images/s \(steady state", err, re.M)
  assert "caching features" in err and "evaluating" in err
  log = open(os.path.join(workdir, "log.txt")).read()
  assert re.search(r"step 4: accuracy=", log) and "parameter shardings" in log
  rc, out, err = _finish(_launch(str(tmp_path / "loud"), *SHORT, "--verbosity=1"))
  assert rc == 0, err[-3000:]
  assert ABSL_LINE.search(err) and "step 4: accuracy=" in err


# ------------------------------------------------------------------ issue 12: throughput

def test_throughput_counts_completed_steps_only(tmp_path):
  # Each step takes 0.15 s on the "device" (a host callback) while its dispatch returns at
  # once: images/s must come from completed steps, 8 images / 0.15 s.
  c = _config(steps1=10)
  c.data.step_delay_s = 0.15
  c.stage1.log_every_steps = 3
  c.stage1.ckpt_every_steps = 0
  mesh = shd.make_mesh([("data", 1)], devices=jax.devices()[:1])
  from jaxprompt import trainer
  res = trainer.run_stage(
      c.stage1, workdir=str(tmp_path), stage="stage1",
      init=lambda rng: toy.init_params(c, jax.random.key(0)), loss_fn=toy.make_loss_fn(c),
      rules=toy.STAGE1_RULES, loader=toy.make_loader(c, 0), mesh=mesh)
  expected = c.data.batch_size / c.data.step_delay_s
  rows = metrics.read_jsonl(os.path.join(str(tmp_path), "stage1", "metrics.jsonl"))
  logged = [r["images_per_s"] for r in rows if "images_per_s" in r]
  assert len(logged) >= 3
  for ips in logged:
    assert 0.8 * expected < ips < 1.1 * expected, (logged, expected)
  steady = res.timing["images_per_s"]
  assert 0.8 * expected < steady < 1.1 * expected, (steady, expected)
  assert res.timing["steps"] == 10
